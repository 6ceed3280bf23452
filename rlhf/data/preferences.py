"""Readers of outside preference data: comparisons or rankings made elsewhere, ready for the response library.

Formats (picked per file from the first row's keys with `fmt="auto"`):

- `pairwise`: `{"id"?, "prompt": str | "messages": [...], "chosen": str, "rejected": str, "tie"?: bool,
  "annotator"?}` → K=2, tiers `[[0], [1]]` (chosen is response 0), or `[[0, 1]]` when `tie` is true.
- `ranked`: `{"id"?, "prompt" | "messages", "responses": [str, ...] best first, "annotator"?}` → tiers
  `[[0], [1], ...]`. Either `"ranking"`: tiers over the listed responses (`[[2], [0, 1]]`, each index once)
  instead of best-first order, or `"ties"`: groups of neighbours in the best-first order that are level
  (`[[1, 2]]` turns `[[0], [1], [2], [3]]` into `[[0], [1, 2], [3]]`).
- `hh` (Anthropic HH-RLHF): `{"chosen": dialogue, "rejected": dialogue}`, two `"\\n\\nHuman: ...\\n\\nAssistant: ..."`
  transcripts that share everything before their last Assistant turn; that shared part is the prompt and the
  two last Assistant turns are the responses.

`annotator` may also be spelled `labeler`. A row without `"id"` gets a content hash of its prompt, so the same
prompt seen in several rows or files gets the same `prompt_id` and its comparisons land together.

Bad rows do not raise: outside data is messy and the rest of a file is usable, so every bad row, invalid JSON
included, becomes one `FILE:LINE: what is wrong` in `ImportResult.errors` for the caller to report. Only a file
that cannot be read at all (missing, not gzip, empty, or of an undetectable format) raises DataError.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlhf.data.jsonl import DataError, ErrorCollector
from rlhf.data.records import RowError, _check_messages, _native_prompt, _row_id, _str_field, parse_hh_dialogue

PreferenceFormat = Literal["auto", "pairwise", "ranked", "hh"]
Tiers = list[list[int]]


@dataclass(frozen=True)
class PreferenceRecord:
    source: str  # "FILE:LINE"
    prompt_id: str  # the row's "id", else "h-" + sha256 of the prompt messages (see prompt_hash)
    messages: tuple[dict, ...]  # the prompt's chat turns, ending with the user's
    responses: tuple[str, ...]  # K >= 2 distinct responses
    tiers: Tiers  # ranking over responses, best first; tied responses share a tier
    annotator: str | None  # who labelled it, where the file says


@dataclass
class ImportResult:
    records: list[PreferenceRecord]
    errors: list[str]  # "FILE:LINE: what is wrong", one per row not imported
    rows: int  # non-blank rows read; always len(records) + len(errors)


def prompt_hash(messages: tuple[dict, ...]) -> str:
    """Stable id for a prompt without one: equal turns give equal ids across rows, files and runs."""
    canonical = json.dumps(list(messages), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "h-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def detect_preference_format(row: dict) -> PreferenceFormat | None:
    """The format the keys of `row` point to, or None when they fit none."""
    if "responses" in row:
        return "ranked"
    if "chosen" in row or "rejected" in row:
        return "pairwise" if "prompt" in row or "messages" in row else "hh"
    return None


# --- reading lines ---------------------------------------------------------------------------------------------


def _read_rows(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    """`(line_number, object)` per non-blank line, or `(line_number, RowError)` for a line that is no JSON object.

    Unlike `read_jsonl`, which stops at the first bad line, this goes on: one broken line in a file of outside
    labels should cost that row, not the file. Bytes are decoded per line so bad UTF-8 is a row error too.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))  # so an error at the end names this line
            except UnicodeDecodeError as e:
                yield lineno, RowError(f"not valid UTF-8 (byte {e.start + 1})")
                continue
            except json.JSONDecodeError as e:
                yield lineno, RowError(f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield lineno, RowError(f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield lineno, obj


# --- fields shared by the formats -------------------------------------------------------------------------------


def _annotator(row: dict) -> str | None:
    names = [name for name in ("annotator", "labeler") if row.get(name) is not None]
    if len(names) > 1:
        raise RowError('give either "annotator" or "labeler", not both')
    return _str_field(row, names[0]) if names else None


def _check_responses(responses: list, what: str) -> tuple[str, ...]:
    """Non-empty strings, no two alike: the same text twice cannot be preferred over itself."""
    first_seen: dict[str, int] = {}
    for i, text in enumerate(responses):
        if not isinstance(text, str):
            raise RowError(f"{what}[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise RowError(f"{what}[{i}] is empty")
        if text.strip() in first_seen:
            raise RowError(f"{what}[{i}] is the same text as {what}[{first_seen[text.strip()]}]")
        first_seen[text.strip()] = i
    return tuple(responses)


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ranking_tiers(ranking: object, k: int) -> Tiers:
    """Validate `"ranking"`: non-empty tiers of indices into the K responses, each index exactly once."""
    if not isinstance(ranking, list) or not all(isinstance(tier, list) and tier for tier in ranking):
        raise RowError('field "ranking" must be a list of non-empty lists of response indices, e.g. [[1], [0, 2]]')
    seen: set[int] = set()
    for t, tier in enumerate(ranking):
        for r in tier:
            if not _is_index(r) or not 0 <= r < k:
                raise RowError(f"ranking[{t}] holds {r!r}; response indices run 0..{k - 1}")
            if r in seen:
                raise RowError(f'response {r} appears more than once in "ranking"')
            seen.add(r)
    missing = sorted(set(range(k)) - seen)
    if missing:
        raise RowError(f'"ranking" leaves out response(s) {missing}; rank every listed response')
    return [sorted(tier) for tier in ranking]


def _ties_tiers(ties: object, k: int) -> Tiers:
    """Best-first order with each `"ties"` group of neighbours merged into one tier."""
    if not isinstance(ties, list) or not all(isinstance(group, list) for group in ties):
        raise RowError('field "ties" must be a list of groups of response indices, e.g. [[1, 2]]')
    group_of: dict[int, int] = {}
    for g, group in enumerate(ties):
        if len(group) < 2 or not all(_is_index(r) and 0 <= r < k for r in group):
            raise RowError(f"ties[{g}] must hold two or more response indices in 0..{k - 1}, got {group!r}")
        if sorted(group) != list(range(min(group), max(group) + 1)):
            # In best-first order a tie between 0 and 2 would also tie 1 with both: say so rather than guess.
            raise RowError(f"ties[{g}] = {group!r} is not a run of neighbours in the best-first order")
        for r in group:
            if r in group_of:
                raise RowError(f'response {r} appears in more than one group of "ties"')
            group_of[r] = g
    tiers: Tiers = []
    for r in range(k):
        if tiers and r in group_of and group_of.get(tiers[-1][-1]) == group_of[r]:
            tiers[-1].append(r)
        else:
            tiers.append([r])
    return tiers


# --- one row per format -----------------------------------------------------------------------------------------

Parsed = tuple[tuple[dict, ...], tuple[str, ...], Tiers]  # (prompt messages, responses, tiers)


def _pairwise(row: dict) -> Parsed:
    messages = _native_prompt(row)
    for name in ("ties", "ranking"):
        if name in row:  # ranked-row fields; ignoring them would silently drop what they say
            raise RowError(f'field "{name}" is for ranked rows; a pairwise row marks a tie with "tie": true')
    chosen, rejected = _str_field(row, "chosen"), _str_field(row, "rejected")
    if chosen.strip() == rejected.strip():
        raise RowError("chosen and rejected are the same text, so the row states no preference")
    tie = row.get("tie", False)
    if not isinstance(tie, bool):
        raise RowError(f'field "tie" must be true or false, got {tie!r}')
    return messages, (chosen, rejected), [[0, 1]] if tie else [[0], [1]]


def _ranked(row: dict) -> Parsed:
    messages = _native_prompt(row)
    if "responses" not in row:
        raise RowError('field "responses" is missing')
    if "tie" in row:  # a pairwise field; ignoring it would silently turn a tie into an order
        raise RowError('field "tie" is for pairwise rows; a ranked row marks ties with "ties" or "ranking"')
    listed = row["responses"]
    if not isinstance(listed, list) or len(listed) < 2:
        raise RowError('field "responses" must be a list of two or more strings')
    responses = _check_responses(listed, "responses")
    if row.get("ranking") is not None and row.get("ties") is not None:
        raise RowError('give either "ranking" or "ties", not both')
    if row.get("ranking") is not None:
        return messages, responses, _ranking_tiers(row["ranking"], len(responses))
    if row.get("ties") is not None:
        return messages, responses, _ties_tiers(row["ties"], len(responses))
    return messages, responses, [[i] for i in range(len(responses))]


_SPEAKER_INSIDE = re.compile(r"\b(Human|Assistant):")


def _hh_turns(row: dict, name: str) -> list[dict]:
    """The turns of the dialogue in `row[name]`, checked to end with a non-empty Assistant turn (the response)."""
    try:
        turns = parse_hh_dialogue(_str_field(row, name))
    except RowError as e:
        raise RowError(f"{name}: {e}") from None
    if turns[-1]["role"] != "assistant":
        raise RowError(f"{name} does not end with an Assistant turn, so it holds no response")
    if not turns[-1]["content"]:
        raise RowError(f"{name}'s last Assistant turn is empty")
    return turns


def _speaker(turn: dict) -> str:
    return "Human" if turn["role"] == "user" else "Assistant"


def _out_of_step(turns: list[dict], start: int) -> str | None:
    """Where a dialogue's turn split goes wrong from turn `start` on, in HH-RLHF's two usual ways, if it does."""
    for i in range(start, len(turns)):
        tag = _SPEAKER_INSIDE.search(turns[i]["content"])
        if tag:  # a speaker tag without the "\n\n" before it, so the split missed a turn boundary
            return f'turn {i + 1} ({_speaker(turns[i])}) has "{tag.group(0)}" inside it'
        if i > 0 and turns[i]["role"] == turns[i - 1]["role"]:
            return f"turns {i} and {i + 1} are both {_speaker(turns[i])} turns"
    return None


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _hh_mismatch(chosen: list[dict], rejected: list[dict]) -> str:
    """Why two dialogues' prompts (all turns but the last) differ: the first differing turn, and a likely cause."""
    c, r = chosen[:-1], rejected[:-1]
    differ = next((i for i in range(min(len(c), len(r))) if c[i] != r[i]), min(len(c), len(r)))
    details = [f"they differ at turn {differ + 1}"]
    if len(c) != len(r):
        details.append(f"chosen has {_plural(len(c), 'turn')} before it, rejected {len(r)}")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        cause = _out_of_step(turns, differ)
        if cause:
            details.append(f"{name} {cause}")
            break
    return f"chosen and rejected do not share the dialogue before their last Assistant turn ({'; '.join(details)})"


def _hh(row: dict) -> Parsed:
    chosen, rejected = _hh_turns(row, "chosen"), _hh_turns(row, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise RowError(_hh_mismatch(chosen, rejected))
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise RowError("chosen and rejected end with the same Assistant turn, so the row states no preference")
    try:
        messages = _check_messages(chosen[:-1])
    except RowError as e:
        raise RowError(f"the dialogue before the last Assistant turn: {e}") from None
    return messages, (chosen[-1]["content"], rejected[-1]["content"]), [[0], [1]]


def _parse_row(row: dict, fmt: PreferenceFormat) -> Parsed:
    if fmt == "pairwise":
        return _pairwise(row)
    if fmt == "ranked":
        return _ranked(row)
    if fmt == "hh":
        return _hh(row)
    raise ValueError(f"unknown preference format {fmt!r}")


# --- the file ---------------------------------------------------------------------------------------------------


def _resolve_format(fmt: PreferenceFormat, row: dict, where: str) -> PreferenceFormat:
    if fmt != "auto":
        return fmt
    detected = detect_preference_format(row)
    if detected is None:
        # Every row would fail the same way; one clear error beats thousands of identical ones.
        raise DataError(
            f'{where}: cannot tell the format from the keys {sorted(row)}; expected "responses" (ranked), '
            f'"chosen"/"rejected" with "prompt" or "messages" (pairwise) or without (hh), or pass fmt='
        )
    return detected


def read_preferences(path: str | Path, fmt: PreferenceFormat = "auto") -> ImportResult:
    """Every row of `path` as a record or as an error; DataError only if the file as a whole is unusable.

    A row's explicit "id" must name one prompt throughout the file: the same id with other prompt turns is an
    error on the later row. Rows without an id get `prompt_hash(messages)`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    errors = ErrorCollector(path)
    records: list[PreferenceRecord] = []
    id_first_seen: dict[str, tuple[int, tuple[dict, ...]]] = {}
    rows = 0
    try:
        for lineno, row in _read_rows(path):
            rows += 1
            if isinstance(row, RowError):
                errors.add(lineno, str(row))
                continue
            fmt = _resolve_format(fmt, row, f"{path}:{lineno}")
            try:
                messages, responses, tiers = _parse_row(row, fmt)
                annotator = _annotator(row)
                prompt_id = _row_id(row, prompt_hash(messages))
                first_line, first_messages = id_first_seen.setdefault(prompt_id, (lineno, messages))
                if first_messages != messages:
                    raise RowError(f'id "{prompt_id}" was used on line {first_line} for a different prompt')
                source = f"{path}:{lineno}"
                records.append(PreferenceRecord(source, prompt_id, messages, responses, tiers, annotator))
            except RowError as e:
                errors.add(lineno, str(e))
    except (OSError, EOFError) as e:  # not gzip, truncated, unreadable: nothing after this point can be trusted
        raise DataError(f"{path}: cannot be read ({e})") from None
    if rows == 0:
        raise DataError(f"{path}: no rows in the file")
    return ImportResult(records, errors.errors, rows)
