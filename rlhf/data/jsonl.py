"""JSONL reading with errors that name the file and line. Nothing is skipped silently."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

MAX_ERRORS_SHOWN = 10


class DataError(ValueError):
    """A malformed input file. The message names every bad row as `FILE:LINE: what is wrong`."""


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, object)` for each non-blank line; raise DataError on the first bad JSON line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with _open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


class ErrorCollector:
    """Gathers `FILE:LINE: problem` messages so one run reports the first few bad rows together."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.errors: list[str] = []

    def add(self, lineno: int, problem: str) -> None:
        self.errors.append(f"{self.path}:{lineno}: {problem}")

    def raise_if_any(self) -> None:
        if not self.errors:
            return
        shown = self.errors[:MAX_ERRORS_SHOWN]
        more = len(self.errors) - len(shown)
        tail = f"\n... and {more} more bad rows" if more else ""
        raise DataError("\n".join(shown) + tail)
