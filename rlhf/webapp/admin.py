"""Admins only: progress, agreement per evaluator, side-by-side win rates, and JSONL exports of the labels.

Agreement uses the same statistics as `rlhf filter` (rlhf/algos/aggregate.py) over people's rankings only:
pairwise agreement, Krippendorff's alpha, and each evaluator's agreement with the leave-one-out consensus of the
others, from the tasks that two or more people ranked."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import func, select

from rlhf.algos.aggregate import agreement_report
from rlhf.store.library import (
    AnnotatorRow,
    AssignmentRow,
    Library,
    PromptRow,
    RankingRow,
    SampleRow,
    SideBySideRow,
    VoteRow,
    WebTaskRow,
)
from rlhf.webapp.deps import Admin, state
from rlhf.webapp.pages import page
from rlhf.webapp.side_by_side import human_win_rate

router = APIRouter()


def human_rankings(library: Library) -> list[RankingRow]:
    with library.read() as s:
        humans = select(AnnotatorRow.name).where(AnnotatorRow.kind == "human")
        return list(s.scalars(select(RankingRow).where(RankingRow.annotator.in_(humans)).order_by(RankingRow.id)))


def task_counts(library: Library, overlap: int) -> dict[str, dict]:
    """{kind: {"tasks", "started" (≥ 1 label), "complete" (overlap labels), "labels"}}."""
    with library.read() as s:
        done = (
            select(AssignmentRow.task_id, func.count().label("n"))
            .where(AssignmentRow.done_at.is_not(None))
            .group_by(AssignmentRow.task_id)
            .subquery()
        )
        rows = s.execute(
            select(WebTaskRow.kind, func.coalesce(done.c.n, 0)).outerjoin(done, done.c.task_id == WebTaskRow.id)
        ).all()
    out = {kind: {"tasks": 0, "started": 0, "complete": 0, "labels": 0} for kind in ("rank", "compare")}
    for kind, n in rows:
        c = out[kind]
        c["tasks"] += 1
        c["started"] += n > 0
        c["complete"] += n >= overlap
        c["labels"] += n
    return out


def evaluator_rows(library: Library, rankings: list[RankingRow], loo: dict[str, dict]) -> list[dict]:
    with library.read() as s:
        people = s.scalars(select(AnnotatorRow).where(AnnotatorRow.kind == "human").order_by(AnnotatorRow.name))
        votes = Counter(s.scalars(select(VoteRow.annotator)))
        open_tasks = Counter(s.scalars(select(AssignmentRow.annotator).where(AssignmentRow.done_at.is_(None))))
        people = list(people)
    ranked = Counter(r.annotator for r in rankings)
    all_bad = Counter(r.annotator for r in rankings if r.all_bad)
    last = {r.annotator: r.created_at for r in rankings}
    return [
        {
            "name": p.name,
            "admin": p.is_admin,
            "rankings": ranked[p.name],
            "votes": votes[p.name],
            "open": open_tasks[p.name],
            "all_bad_share": all_bad[p.name] / ranked[p.name] if ranked[p.name] else None,
            "loo_agreement": _finite(loo.get(p.name, {}).get("loo_agreement")),
            "shared_tasks": loo.get(p.name, {}).get("n_prompts", 0),
            "last_ranking": last[p.name].isoformat(timespec="seconds") if p.name in last else None,
        }
        for p in people
    ]


def side_by_side_rates(library: Library) -> list[dict]:
    out = []
    for name in library.side_by_side_sets():
        with library.read() as s:
            pair = s.scalars(select(SideBySideRow).where(SideBySideRow.set_name == name)).first()
            pairs = s.scalar(select(func.count()).where(SideBySideRow.set_name == name))
        rate = human_win_rate(library, name)
        out.append(
            {
                "set": name,
                "a": pair.a_label,
                "b": pair.b_label,
                "pairs": pairs,
                "votes": rate["votes"],
                "win_rate": {k: _finite(v) for k, v in rate.items()},
            }
        )
    return out


def stats(library: Library, overlap: int) -> dict:
    rankings = human_rankings(library)
    by_task: dict[tuple, dict] = defaultdict(dict)
    for r in rankings:
        by_task[(r.prompt_id, r.task_key)][r.annotator] = r.tiers  # one web task's labels share its sample_ids
    shared = [labels for labels in by_task.values() if len(labels) >= 2]
    report = agreement_report(shared) if shared else {"per_evaluator": {}, "n_prompts": 0, "n_labels": 0}
    return {
        "overlap": overlap,
        "tasks": task_counts(library, overlap),
        "agreement": {
            "pairwise_agreement": _finite(report.get("pairwise_agreement")),
            "krippendorff_alpha": _finite(report.get("krippendorff_alpha")),
            "shared_tasks": report["n_prompts"],
        },
        "evaluators": evaluator_rows(library, rankings, report["per_evaluator"]),
        "side_by_side": side_by_side_rates(library),
    }


def _finite(x):
    return None if isinstance(x, float) and math.isnan(x) else x


@router.get("/admin")
def dashboard(request: Request, who: Admin) -> HTMLResponse:
    web = state(request)
    return page(web, "admin.html", title="Admin", who=who, stats=stats(web.library, web.cfg.overlap))


@router.get("/api/admin/stats")
def stats_json(request: Request, who: Admin) -> dict:
    web = state(request)
    return stats(web.library, web.cfg.overlap)


def _jsonl(rows: list[dict], filename: str) -> Response:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    headers = {"content-disposition": f'attachment; filename="{filename}"'}
    return Response(body, media_type="application/x-ndjson", headers=headers)


@router.get("/admin/export/rankings.jsonl")
def export_rankings(request: Request, who: Admin) -> Response:
    """People's rankings with their prompt and responses: one JSON object per ranking, tiers index `responses`."""
    library = state(request).library
    rankings = human_rankings(library)
    with library.read() as s:
        prompts = {p.id: p.messages for p in s.scalars(select(PromptRow))}
        ids = {sid for r in rankings for sid in r.sample_ids}
        texts = dict(s.execute(select(SampleRow.id, SampleRow.text).where(SampleRow.id.in_(ids))).all())
    rows = [
        {
            "annotator": r.annotator,
            "prompt_id": r.prompt_id,
            "task_key": r.task_key,
            "messages": prompts[r.prompt_id],
            "sample_ids": r.sample_ids,
            "responses": [texts[sid] for sid in r.sample_ids],
            "tiers": r.tiers,
            "all_bad": r.all_bad,
            "rationale": r.rationale,
            "created_at": r.created_at.isoformat(),
        }
        for r in rankings
    ]
    return _jsonl(rows, "rankings.jsonl")


@router.get("/admin/export/side-by-side.jsonl")
def export_votes(request: Request, who: Admin) -> Response:
    """Every side-by-side vote with its pair: verdict "a", "b" (the models, not the sides shown) or "tie"."""
    with state(request).library.read() as s:
        rows = s.execute(
            select(VoteRow, SideBySideRow)
            .join(SideBySideRow, SideBySideRow.id == VoteRow.pair_id)
            .order_by(VoteRow.id)
        ).all()
        out = [
            {
                "set": p.set_name,
                "prompt_id": p.prompt_id,
                "annotator": v.annotator,
                "verdict": v.verdict,
                "a": p.a_label,
                "b": p.b_label,
                "rationale": v.rationale,
                "created_at": v.created_at.isoformat(),
            }
            for v, p in rows
        ]
    return _jsonl(out, "side-by-side.jsonl")
