"""Blind side-by-side evaluation of two models by people: an `rlhf eval` folder's generations become tasks.

`rlhf serve --compare runs/NAME/eval` loads OUT/generations.jsonl (each prompt answered by model a and model b)
into the library's `side_by_side` table under a set name; people see the two answers as "A" and "B" in a random
order per assignment and say which is better or "tie". `rlhf eval human --eval runs/NAME/eval --library ...` then
adds the people's win rate of b over a to OUT/summary.json (win_rates.human), which `rlhf report` shows beside the
reward model's, gold's and the AI judge's.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.algos.aggregate import win_rate
from rlhf.store.library import Library


def default_set_name(eval_dir: str | Path) -> str:
    """PARENT/FOLDER of the eval folder ("demo/eval" for runs/demo/eval): stable whatever the working directory."""
    path = Path(eval_dir).resolve()
    return f"{path.parent.name}/{path.name}"


def load_eval_folder(library: Library, eval_dir: str | Path, set_name: str | None = None) -> tuple[str, int, int]:
    """Load an eval folder's pairs as side-by-side tasks. Returns (set name, pairs in the file, new pairs)."""
    eval_dir = Path(eval_dir)
    summary_path = eval_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    rows = []
    with open(eval_dir / "generations.jsonl", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({k: str(row[k]) for k in ("prompt_id", "prompt", "a", "b")})
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{eval_dir / 'generations.jsonl'}:{lineno}: not a generation row ({e})") from None
    name = set_name or default_set_name(eval_dir)
    a_label = str(summary.get("a_label") or summary.get("a") or "A")
    b_label = str(summary.get("b_label") or summary.get("b") or "B")
    return name, len(rows), library.add_side_by_side(name, a_label, b_label, rows)


def human_win_rate(library: Library, set_name: str, seed: int = 0) -> dict:
    """People's win rate of b over a on one set: each prompt's outcome is the mean of its votes (1 for b, 0.5 a
    tie, 0 for a), with a 95% bootstrap interval over prompts; `votes` counts the votes behind it."""
    outcomes = library.side_by_side_outcomes(set_name)
    rate = win_rate([sum(v) / len(v) for v in outcomes.values()], seed)
    return {**rate, "votes": sum(len(v) for v in outcomes.values())}


def write_human_win_rate(eval_dir: str | Path, library: Library, set_name: str | None = None, seed: int = 0) -> dict:
    """Add people's win rate (human_win_rate) to EVAL_DIR/summary.json as win_rates.human, atomically."""
    from rlhf.runtime.files import atomic_write_text

    path = Path(eval_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (run `rlhf eval --out {eval_dir}` first)")
    name = set_name or default_set_name(eval_dir)
    if name not in library.side_by_side_sets():
        raise ValueError(
            f"the library has no side-by-side set {name!r}; load it with `rlhf serve --compare {eval_dir}`"
        )
    summary = json.loads(path.read_text(encoding="utf-8"))
    rate = human_win_rate(library, name, seed)
    if rate["n"] == 0:
        raise ValueError(f"side-by-side set {name!r} has no votes yet")
    summary.setdefault("win_rates", {})["human"] = {**rate, "set": name}
    atomic_write_text(path, json.dumps(summary, indent=1))
    return rate
