"""Prompt and demonstration records, and the readers that build them from the supported file formats.

Formats (picked per file from the first row's keys with `format="auto"`):

- `rlhf` (native): `{"id"?, "prompt": str}` or `{"id"?, "messages": [{"role", "content"}, ...]}`;
  a demonstration adds `"response": str`.
- `alpaca`: Alpaca / Self-Instruct rows, `{"instruction", "input"?, "output"}`, or Self-Instruct seed tasks
  `{"id"?, "instruction", "instances": [{"input", "output"}, ...]}` (one record per instance).
- `hh`: Anthropic HH dialogues, `"\\n\\nHuman: ...\\n\\nAssistant: ..."` in a `chosen`, `transcript` or `text`
  field. As a demonstration the last Assistant turn is the response; as a prompt, the turns before it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhf.data.jsonl import DataError, ErrorCollector, read_jsonl

Format = Literal["auto", "rlhf", "alpaca", "hh"]
ROLES = ("system", "user", "assistant")
HH_FIELDS = ("chosen", "transcript", "text")


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple[dict, ...]  # chat turns ending with the user's; {"role", "content"} each

    @property
    def text(self) -> str:
        """The last user turn: what a person would call 'the prompt'."""
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class Demonstration:
    id: str
    messages: tuple[dict, ...]  # the prompt's turns, ending with the user's
    response: str  # what the assistant should answer
    source: str = field(default="", compare=False)  # "FILE:LINE", for error messages downstream

    @property
    def prompt(self) -> Prompt:
        return Prompt(self.id, self.messages)


class RowError(ValueError):
    """One row is malformed; the reader adds FILE:LINE."""


def _str_field(row: dict, name: str, required: bool = True) -> str | None:
    if name not in row or row[name] is None:
        if required:
            raise RowError(f'field "{name}" is missing')
        return None
    value = row[name]
    if not isinstance(value, str):
        raise RowError(f'field "{name}" must be a string, got {type(value).__name__}')
    if required and not value.strip():
        raise RowError(f'field "{name}" is empty')
    return value


def _check_messages(messages: object) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise RowError('field "messages" must be a non-empty list of {"role", "content"} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f'messages[{i}] must be an object with "role" and "content"')
        if m["role"] not in ROLES:
            raise RowError(f"messages[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise RowError(f"messages[{i}].content must be a non-empty string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise RowError(f'the last message must be from the user, got "{out[-1]["role"]}"')
    return tuple(out)


def _native_prompt(row: dict) -> tuple[dict, ...]:
    if "prompt" in row and "messages" in row:
        raise RowError('give either "prompt" or "messages", not both')
    if "messages" in row:
        return _check_messages(row["messages"])
    if "prompt" not in row:
        raise RowError('field "prompt" is missing (or give "messages")')
    return ({"role": "user", "content": _str_field(row, "prompt")},)


def _alpaca_prompt(instruction: str, input_text: str | None) -> tuple[dict, ...]:
    text = instruction.strip()
    if input_text and input_text.strip():
        text = f"{text}\n\n{input_text.strip()}"
    return ({"role": "user", "content": text},)


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh_dialogue(text: str) -> list[dict]:
    """Split `\\n\\nHuman: a\\n\\nAssistant: b ...` into chat turns; raise RowError if it is not one."""
    if not isinstance(text, str):
        raise RowError("the dialogue must be a string")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowError('a dialogue must start with "\\n\\nHuman: "')
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if not turns:
        raise RowError('no "\\n\\nHuman: " turn found')
    if turns[0]["role"] != "user":
        raise RowError("the first turn must be the Human's")
    return turns


def _hh_text(row: dict) -> str:
    for name in HH_FIELDS:
        if name in row:
            return _str_field(row, name)
    raise RowError(f"no dialogue field; expected one of {', '.join(HH_FIELDS)}")


def detect_format(row: dict) -> Format:
    if "instruction" in row:
        return "alpaca"
    if any(name in row for name in HH_FIELDS) and "prompt" not in row and "messages" not in row:
        return "hh"
    return "rlhf"


def _row_id(row: dict, default: str) -> str:
    value = row.get("id")
    if value is None:
        return default
    if not isinstance(value, (str, int)):
        raise RowError('field "id" must be a string or an integer')
    return str(value)


def _demos_from_row(row: dict, fmt: Format, default_id: str) -> list[tuple[str, tuple[dict, ...], str]]:
    rid = _row_id(row, default_id)
    if fmt == "rlhf":
        return [(rid, _native_prompt(row), _str_field(row, "response"))]
    if fmt == "alpaca":
        instruction = _str_field(row, "instruction")
        if "instances" in row:
            instances = row["instances"]
            if not isinstance(instances, list) or not instances:
                raise RowError('field "instances" must be a non-empty list of {"input", "output"}')
            out = []
            for k, inst in enumerate(instances):
                if not isinstance(inst, dict):
                    raise RowError(f"instances[{k}] must be an object")
                try:
                    output = _str_field(inst, "output")
                    input_text = _str_field(inst, "input", required=False)
                except RowError as e:
                    raise RowError(f"instances[{k}]: {e}") from None
                iid = rid if len(instances) == 1 else f"{rid}-{k}"
                out.append((iid, _alpaca_prompt(instruction, input_text), output))
            return out
        return [(rid, _alpaca_prompt(instruction, _str_field(row, "input", False)), _str_field(row, "output"))]
    if fmt == "hh":
        turns = parse_hh_dialogue(_hh_text(row))
        if turns[-1]["role"] != "assistant":
            raise RowError("the dialogue must end with an Assistant turn to be a demonstration")
        if not turns[-1]["content"]:
            raise RowError("the last Assistant turn is empty")
        return [(rid, _check_messages(turns[:-1]), turns[-1]["content"])]
    raise ValueError(f"unknown format {fmt!r}")


def _prompt_from_row(row: dict, fmt: Format, default_id: str) -> tuple[str, tuple[dict, ...]]:
    rid = _row_id(row, default_id)
    if fmt == "rlhf":
        return rid, _native_prompt(row)
    if fmt == "alpaca":
        instances = row.get("instances")
        first_input = instances[0].get("input") if isinstance(instances, list) and instances else None
        input_text = _str_field(row, "input", False) if "input" in row else first_input
        return rid, _alpaca_prompt(_str_field(row, "instruction"), input_text)
    if fmt == "hh":
        turns = parse_hh_dialogue(_hh_text(row))
        if turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        return rid, _check_messages(turns)
    raise ValueError(f"unknown format {fmt!r}")


def _resolve_format(fmt: Format, row: dict) -> Format:
    if fmt != "auto":
        return fmt
    return detect_format(row)


def read_demonstrations(path: str | Path, fmt: Format = "auto") -> list[Demonstration]:
    """All demonstrations in `path`; DataError naming FILE:LINE for every malformed row (up to 10 shown)."""
    path = Path(path)
    errors = ErrorCollector(path)
    demos: list[Demonstration] = []
    for lineno, row in read_jsonl(path):
        fmt = _resolve_format(fmt, row)
        try:
            for rid, messages, response in _demos_from_row(row, fmt, f"{path.stem}:{lineno}"):
                demos.append(Demonstration(rid, messages, response, source=f"{path}:{lineno}"))
        except RowError as e:
            errors.add(lineno, str(e))
    errors.raise_if_any()
    if not demos:
        raise DataError(f"{path}: no demonstrations in the file")
    return demos


def read_prompts(path: str | Path, fmt: Format = "auto") -> list[Prompt]:
    """All prompts in `path` (ids must be unique); DataError naming FILE:LINE for every malformed row."""
    path = Path(path)
    errors = ErrorCollector(path)
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for lineno, row in read_jsonl(path):
        fmt = _resolve_format(fmt, row)
        try:
            rid, messages = _prompt_from_row(row, fmt, f"{path.stem}:{lineno}")
            if rid in seen:
                raise RowError(f'id "{rid}" was already used on line {seen[rid]}')
            seen[rid] = lineno
            prompts.append(Prompt(rid, messages))
        except RowError as e:
            errors.add(lineno, str(e))
    errors.raise_if_any()
    if not prompts:
        raise DataError(f"{path}: no prompts in the file")
    return prompts
