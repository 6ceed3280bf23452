"""Giving people tasks and taking their labels; every query is scoped to the evaluator who asks.

Assignment. An evaluator with an open task gets that task again (a reload shows it in the same order). Otherwise
they get a task they were never given, among those with fewer than `overlap` live assignments (submitted, or open
for less than `assignment_minutes`), preferring the tasks closest to complete so that tasks reach their full
overlap early (agreement statistics need two or more labels per task), at random among equals. Choosing and
recording happen in one IMMEDIATE transaction: two evaluators asking at once cannot both take a task's last place.
Nobody gets a task twice (unique (annotator, task)); a task is one prompt's responses of one round, or one
side-by-side pair.

Submission. The label is checked against the evaluator's own assignment (someone else's assignment id is "not
found"), stored as an ordinary `rankings` row (or a side-by-side vote) and committed before the answer is sent.
Sending the same label again answers as the first time did and stores nothing new; a different label for a task
already labelled is refused (409). A task that meanwhile got `overlap` labels from others refuses more (409).
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhf.store.library import (
    AssignmentRow,
    Library,
    PromptRow,
    RankingRow,
    SampleRow,
    SideBySideRow,
    VoteRow,
    WebTaskRow,
)
from rlhf.webapp.security import now

Kind = Literal["rank", "compare"]
MAX_RATIONALE = 5000
_shuffle = random.SystemRandom()


class TaskError(Exception):
    """A request about a task that cannot be honoured: an HTTP status and the reason, shown to the evaluator."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _live_load(cutoff):
    """Per task: assignments that hold a place (submitted, or open and younger than the cutoff)."""
    live = AssignmentRow.done_at.is_not(None) | (AssignmentRow.created_at > cutoff)
    return (
        select(func.count())
        .where(AssignmentRow.task_id == WebTaskRow.id, live)
        .correlate(WebTaskRow)
        .scalar_subquery()
    )


def _open_for_others(name: str, kind: Kind, overlap: int, minutes: float):
    """Tasks of this kind that `name` was never given and that still have a place."""
    load = _live_load(now() - timedelta(minutes=minutes))
    mine = select(AssignmentRow.task_id).where(AssignmentRow.annotator == name)
    return load, (WebTaskRow.kind == kind) & WebTaskRow.id.not_in(mine) & (load < overlap)


def _done_by_others(s: Session, task_id: int, name: str) -> int:
    q = select(func.count()).where(
        AssignmentRow.task_id == task_id, AssignmentRow.done_at.is_not(None), AssignmentRow.annotator != name
    )
    return s.scalar(q)


def next_task(library: Library, name: str, kind: Kind, overlap: int, minutes: float) -> int | None:
    """The id of the evaluator's assignment to work on now (an open one, or a new one); None when none is left."""
    with library.write() as s:
        open_rows = s.scalars(
            select(AssignmentRow)
            .join(WebTaskRow, WebTaskRow.id == AssignmentRow.task_id)
            .where(AssignmentRow.annotator == name, AssignmentRow.done_at.is_(None), WebTaskRow.kind == kind)
            .order_by(AssignmentRow.id)
        ).all()
        for row in open_rows:
            if _done_by_others(s, row.task_id, name) < overlap:
                return row.id
            s.delete(row)  # left open too long, and others completed the task meanwhile
        load, where = _open_for_others(name, kind, overlap, minutes)
        task = s.scalars(select(WebTaskRow).where(where).order_by(load.desc(), func.random()).limit(1)).first()
        if task is None:
            return None
        shown = _shuffle.sample(task.sample_ids, len(task.sample_ids)) if kind == "rank" else _shuffle.sample("ab", 2)
        row = AssignmentRow(annotator=name, task_id=task.id, shown=shown)
        s.add(row)
        s.flush()
        return row.id


def view(library: Library, name: str, assignment_id: int) -> dict:
    """What the evaluator sees of their assignment: the prompt's turns and the responses in the shown order.

    Side-by-side tasks show the two answers as "A" (left) and "B" (right) in the assignment's random order;
    which model wrote which is never sent."""
    with library.read() as s:
        a, task = _own(s, name, assignment_id)
        if task.kind == "rank":
            messages = s.get(PromptRow, task.prompt_id).messages
            texts = {x.id: x.text for x in s.scalars(select(SampleRow).where(SampleRow.id.in_(task.sample_ids)))}
            responses = [{"id": sid, "label": "ABCDEFGHI"[i], "text": texts[sid]} for i, sid in enumerate(a.shown)]
        else:
            pair = s.get(SideBySideRow, task.pair_id)
            messages = [{"role": "user", "content": pair.prompt}]
            text = {"a": pair.a_text, "b": pair.b_text}
            responses = [
                {"id": side, "label": side, "text": text[model]} for side, model in zip("AB", a.shown, strict=True)
            ]
        return {
            "assignment": a.id,
            "kind": task.kind,
            "prompt": [{"role": m["role"], "content": m["content"]} for m in messages],
            "responses": responses,
            "done": a.done_at is not None,
        }


def _own(s: Session, name: str, assignment_id: int) -> tuple[AssignmentRow, WebTaskRow]:
    """The evaluator's own assignment and its task; another evaluator's looks exactly like a missing one."""
    a = s.get(AssignmentRow, assignment_id)
    if a is None or a.annotator != name:
        raise TaskError(404, f"task {assignment_id} is not one of yours")
    return a, s.get(WebTaskRow, a.task_id)


def index_tiers(tiers: object, sample_ids: list[int]) -> list[list[int]]:
    """A submitted ranking (tiers of sample ids, best first) as tiers of indices into sample_ids, checked to be
    exactly the task's samples, each once."""
    if not isinstance(tiers, list) or not tiers:
        raise TaskError(422, "tiers must be a non-empty list of tiers, best first")
    index = {sid: i for i, sid in enumerate(sample_ids)}
    seen: set[int] = set()
    out = []
    for tier in tiers:
        if not isinstance(tier, list) or not tier:
            raise TaskError(422, "every tier must be a non-empty list of sample ids")
        for sid in tier:
            if not isinstance(sid, int) or isinstance(sid, bool):
                raise TaskError(422, f"sample ids are integers, got {sid!r}")
            if sid not in index:
                raise TaskError(422, f"sample {sid} is not one of this task's responses")
            if sid in seen:
                raise TaskError(422, f"sample {sid} appears more than once")
            seen.add(sid)
        out.append(sorted(index[sid] for sid in tier))
    missing = sorted(set(sample_ids) - seen)
    if missing:
        raise TaskError(422, f"samples {missing} are missing: rank every response of the task")
    return out


def _check_rationale(rationale: object) -> str | None:
    if rationale is not None and not isinstance(rationale, str):
        raise TaskError(422, "rationale must be text")
    if rationale and len(rationale) > MAX_RATIONALE:
        raise TaskError(422, f"rationale is longer than {MAX_RATIONALE} characters")
    return rationale.strip() or None if rationale else None


def _claim(s: Session, a: AssignmentRow, name: str, overlap: int) -> None:
    """Mark the assignment done, unless others filled the task while it was left open."""
    if _done_by_others(s, a.task_id, name) >= overlap:
        raise TaskError(409, f"this task already has {overlap} labels from others (it was open for too long)")
    a.done_at = now()


def submit_ranking(
    library: Library, name: str, assignment_id: int, tiers: object, all_bad: bool, rationale: object, overlap: int
) -> dict:
    """Store the evaluator's ranking of their task (see the module docstring); committed before returning."""
    rationale = _check_rationale(rationale)
    with library.write() as s:
        a, task = _own(s, name, assignment_id)
        if task.kind != "rank":
            raise TaskError(404, f"task {assignment_id} is not a ranking task")
        indexed = index_tiers(tiers, task.sample_ids)
        old = s.scalars(
            select(RankingRow).where(
                RankingRow.annotator == name,
                RankingRow.prompt_id == task.prompt_id,
                RankingRow.task_key == task.task_key,
            )
        ).first()
        if old is not None:
            if (old.sample_ids, old.tiers, old.all_bad, old.rationale) == (
                task.sample_ids,
                indexed,
                all_bad,
                rationale,
            ):
                return {"stored": True, "repeated": True}
            raise TaskError(409, "you already ranked this task; a label cannot be changed")
        _claim(s, a, name, overlap)
        s.add(
            RankingRow(
                prompt_id=task.prompt_id,
                annotator=name,
                task_key=task.task_key,
                sample_ids=list(task.sample_ids),
                tiers=indexed,
                all_bad=all_bad,
                rationale=rationale,
            )
        )
    return {"stored": True, "repeated": False}


def submit_vote(
    library: Library, name: str, assignment_id: int, choice: object, rationale: object, overlap: int
) -> dict:
    """Store a side-by-side verdict: choice "A" or "B" (the sides shown) or "tie", mapped to the models here."""
    if choice not in ("A", "B", "tie"):
        raise TaskError(422, f'choice must be "A", "B" or "tie", got {choice!r}')
    rationale = _check_rationale(rationale)
    with library.write() as s:
        a, task = _own(s, name, assignment_id)
        if task.kind != "compare":
            raise TaskError(404, f"task {assignment_id} is not a side-by-side task")
        verdict = "tie" if choice == "tie" else a.shown["AB".index(choice)]
        old = s.scalars(select(VoteRow).where(VoteRow.annotator == name, VoteRow.pair_id == task.pair_id)).first()
        if old is not None:
            if (old.verdict, old.rationale) == (verdict, rationale):
                return {"stored": True, "repeated": True}
            raise TaskError(409, "you already judged this pair; a verdict cannot be changed")
        _claim(s, a, name, overlap)
        s.add(VoteRow(pair_id=task.pair_id, annotator=name, verdict=verdict, rationale=rationale))
    return {"stored": True, "repeated": False}


def progress(library: Library, name: str, overlap: int, minutes: float) -> dict[str, dict]:
    """{kind: {"done": labels given, "open": an unsubmitted task waiting, "available": tasks one could still get}}."""
    out = {}
    with library.read() as s:
        for kind in ("rank", "compare"):
            mine = select(AssignmentRow).join(WebTaskRow, WebTaskRow.id == AssignmentRow.task_id)
            mine = mine.where(AssignmentRow.annotator == name, WebTaskRow.kind == kind)
            rows = s.scalars(mine).all()
            _, where = _open_for_others(name, kind, overlap, minutes)
            out[kind] = {
                "done": sum(r.done_at is not None for r in rows),
                "open": any(r.done_at is None for r in rows),
                "available": s.scalar(select(func.count()).select_from(WebTaskRow).where(where)),
            }
    return out
