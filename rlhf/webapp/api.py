"""The JSON API the pages' JavaScript uses (and scripts may use): tasks, labels, progress.

Every route needs a session; POSTs also need the session's CSRF token in the X-CSRF-Token header. Bodies are
checked field by field, and a label is committed to the library before the 200 that acknowledges it."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, StrictBool

from rlhf.webapp import tasks
from rlhf.webapp.deps import Changing, SignedIn, state

router = APIRouter(prefix="/api")


class RankBody(BaseModel):
    """tiers: sample ids, best first, tied ones sharing a tier: [[12], [10, 13], [11]]."""

    model_config = ConfigDict(extra="forbid")
    tiers: object  # checked by tasks.index_tiers, whose messages say exactly what is wrong
    all_bad: StrictBool = False
    rationale: object = None


class VoteBody(BaseModel):
    """choice: the side shown, "A" (left) or "B" (right), or "tie"."""

    model_config = ConfigDict(extra="forbid")
    choice: object
    rationale: object = None


@router.get("/session")
def session(who: SignedIn) -> dict:
    return {"name": who.name, "is_admin": who.is_admin, "csrf": who.csrf}


@router.get("/progress")
def progress(request: Request, who: SignedIn) -> dict:
    cfg = state(request).cfg
    return tasks.progress(state(request).library, who.name, cfg.overlap, cfg.assignment_minutes)


@router.get("/task/{kind}")
def task(kind: tasks.Kind, request: Request, who: SignedIn) -> dict:
    """The evaluator's current task of this kind (the same one until it is submitted), or {"task": null}."""
    web = state(request)
    assignment = web.assign(who.name, kind)
    return {"task": tasks.view(web.library, who.name, assignment) if assignment is not None else None}


@router.post("/rank/{assignment_id}")
def rank(assignment_id: int, body: RankBody, request: Request, who: Changing) -> dict:
    web = state(request)
    return tasks.submit_ranking(
        web.library, who.name, assignment_id, body.tiers, body.all_bad, body.rationale, web.cfg.overlap
    )


@router.post("/compare/{assignment_id}")
def compare(assignment_id: int, body: VoteBody, request: Request, who: Changing) -> dict:
    web = state(request)
    return tasks.submit_vote(web.library, who.name, assignment_id, body.choice, body.rationale, web.cfg.overlap)
