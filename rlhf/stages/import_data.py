"""`rlhf import`: outside preference data (pairwise, ranked, Anthropic HH) into the response library.

Each row becomes a prompt (shared by rows with the same prompt), K samples with finish reason `imported`, and one
ranking by the file's annotator (the row's `annotator` field, else `import:FILE`). Rows that cannot be read are
reported by line, never dropped silently: `imported + not imported == rows`. Importing the same file again adds
nothing.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.data.preferences import read_preferences
from rlhf.store.library import Library, PromptRow, RankingRow, SampleRow

CHUNK = 500  # records per transaction


def run(path: str, library: str, fmt: str = "auto", max_errors_shown: int = 20) -> dict:
    result = read_preferences(path, fmt)
    lib = Library(library)
    tag = Path(path).name
    imported = skipped = 0
    errors = list(result.errors)
    known = lib.sample_keys(prefix=f"import|{tag}|")
    for start in range(0, len(result.records), CHUNK):
        with lib.write() as s:
            for rec in result.records[start : start + CHUNK]:
                line = rec.source.rsplit(":", 1)[-1]
                keys = [f"import|{tag}|{line}|{i}" for i in range(len(rec.responses))]
                if keys[0] in known:
                    skipped += 1
                    continue
                messages = [dict(m) for m in rec.messages]
                prompt = s.get(PromptRow, rec.prompt_id)
                if prompt is None:
                    s.add(PromptRow(id=rec.prompt_id, messages=messages, source=str(path)))
                elif prompt.messages != messages:
                    errors.append(f"{rec.source}: id {rec.prompt_id!r} is already in the library with another prompt")
                    continue
                samples = [
                    SampleRow(
                        key=key,
                        prompt_id=rec.prompt_id,
                        model=f"import:{tag}",
                        round=0,
                        text=text,
                        n_tokens=None,
                        finish_reason="imported",
                    )
                    for key, text in zip(keys, rec.responses, strict=True)
                ]
                s.add_all(samples)
                s.flush()  # assigns the sample ids the ranking refers to
                annotator = rec.annotator or f"import:{tag}"
                lib.ensure_annotator(s, annotator, "import", {"file": str(path)})
                s.add(
                    RankingRow(
                        prompt_id=rec.prompt_id,
                        annotator=annotator,
                        task_key=f"import|{tag}|{line}",
                        sample_ids=[x.id for x in samples],
                        tiers=rec.tiers,
                    )
                )
                imported += 1
    print(
        f"import: {result.rows} rows in {path}: {imported} imported, {skipped} already in the library, "
        f"{len(errors)} not imported"
    )
    for e in errors[:max_errors_shown]:
        print(f"  {e}")
    if len(errors) > max_errors_shown:
        print(f"  ... and {len(errors) - max_errors_shown} more")
    return {"rows": result.rows, "imported": imported, "already_present": skipped, "errors": errors}
