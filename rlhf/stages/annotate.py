"""Stage 2b: rank each prompt's K responses and keep every label, who gave it and when.

A task is one prompt's samples of one round. Annotators:
- `simulated`: a panel of evaluators with hidden utilities and choice noise (rlhf/annotators/simulated.py); the
  panel-mean utility of each sample is stored apart as gold, for evaluation only;
- `judge`: an AI judge over an OpenAI-compatible endpoint (rlhf/annotators/judge.py);
- `python:module:function`: your function `(prompt, responses) -> ranking` (tiers, a best-first list of indices,
  or {"tiers", "all_bad", "rationale"}).
Tasks an annotator already ranked are skipped, so re-running continues; each task's labels are committed in
one transaction.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from tqdm.auto import tqdm

from rlhf.annotators.ranking import RankResult, from_user_value
from rlhf.config import AnnotateConfig
from rlhf.store.library import GoldRow, Library, RankingRow, SampleRow


def tasks(library: Library, round: int | None) -> list[tuple[str, str, list[SampleRow]]]:
    """(prompt_id, task_key, samples sorted by id) for every prompt and round with at least 2 samples: the same
    tasks the web app gives people (Library.ranking_tasks)."""
    return library.ranking_tasks(round)


def load_user_function(spec: str):
    """`python:package.module:function` → the function."""
    _, _, target = spec.partition(":")
    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"annotator {spec!r}: expected python:module:function")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"annotator {spec!r}: cannot load it ({e})") from None
    if not callable(func):
        raise ValueError(f"annotator {spec!r}: {func_name} is not callable")
    return func


@dataclass
class Rankers:
    """Who ranks, and how: `rank(messages, samples, task_key)` gives one RankResult per name."""

    names: list[str]
    kind: str  # simulated, judge, function
    rank: Callable[[list, list[SampleRow], str], list[RankResult]]
    meta: dict | None = None  # stored with the annotator (the panel's config)
    gold: Callable[[list, list[SampleRow]], list[float]] | None = None  # the simulated panel's gold utilities
    gold_source: str | None = None  # what defines that gold


def _texts(samples: list[SampleRow]) -> tuple[list[str], list[bool]]:
    return [s.text for s in samples], [s.finish_reason == "eos" for s in samples]


def make_rankers(cfg: AnnotateConfig) -> Rankers:
    if cfg.annotator == "simulated":
        from rlhf.annotators.simulated import PanelConfig, SimulatedPanel

        panel_cfg = PanelConfig(
            n_evaluators=cfg.evaluators,
            noise=cfg.noise,
            noise_scale=cfg.noise_scale,
            weight_spread=cfg.weight_spread,
            seed=cfg.seed,
        )
        panel = SimulatedPanel(panel_cfg)

        def rank(messages, samples, key):
            ranked = panel.rank(messages[-1]["content"], *_texts(samples), prompt_key=key)
            return [RankResult(tiers) for _, tiers in ranked]

        def gold(messages, samples):
            return panel.gold(messages[-1]["content"], *_texts(samples))

        return Rankers(
            [f"{name}@seed{cfg.seed}" for name in panel.names],
            "simulated",
            rank,
            {"panel": vars(panel_cfg)},
            gold,
            repr(vars(panel_cfg)),
        )
    if cfg.annotator == "judge":
        from rlhf.annotators.judge import Judge, JudgeConfig

        judge = Judge(JudgeConfig(base_url=cfg.judge_base_url or "", model=cfg.judge_model or "").resolved())
        return Rankers([judge.name], "judge", lambda m, s, k: [judge.rank(m, _texts(s)[0])])
    func = load_user_function(cfg.annotator)

    def rank_user(messages, samples, key):
        return [from_user_value(func(messages[-1]["content"], _texts(samples)[0]), len(samples))]

    return Rankers([cfg.annotator.removeprefix("python:")], "function", rank_user)


def run(cfg: AnnotateConfig) -> dict:
    cfg.validate()
    library = Library(cfg.library)
    rankers = make_rankers(cfg)
    names = rankers.names
    done = {(p, t) for a, p, t in library.ranked_tasks() if a == names[0]}
    todo = [t for t in tasks(library, cfg.round) if (t[0], t[1]) not in done][: cfg.limit]
    messages = library.prompt_messages()
    print(f"annotate: {len(todo)} tasks to rank by {rankers.kind} ({', '.join(names)})")
    labels = 0
    for prompt_id, task_key, samples in tqdm(todo, desc="annotate", unit="task", disable=not cfg.progress):
        results = rankers.rank(messages[prompt_id], samples, f"{prompt_id}|{task_key}")
        with library.write() as s:
            if s.scalar(
                select(RankingRow.id).where(
                    RankingRow.annotator == names[0],
                    RankingRow.prompt_id == prompt_id,
                    RankingRow.task_key == task_key,
                )
            ):
                continue  # another process ranked this task meanwhile; the write lock makes this check exact
            for name, result in zip(names, results, strict=True):
                library.ensure_annotator(s, name, rankers.kind, rankers.meta)
                s.add(
                    RankingRow(
                        prompt_id=prompt_id,
                        annotator=name,
                        task_key=task_key,
                        sample_ids=[x.id for x in samples],
                        tiers=result.tiers,
                        all_bad=result.all_bad,
                        rationale=result.rationale,
                    )
                )
                labels += 1
            if rankers.gold is not None:
                for sample, utility in zip(samples, rankers.gold(messages[prompt_id], samples), strict=True):
                    if s.get(GoldRow, sample.id) is None:
                        s.add(GoldRow(sample_id=sample.id, utility=float(utility), panel=rankers.gold_source))
    print(f"annotate: stored {labels} rankings in {cfg.library}")
    return {"tasks": len(todo), "labels": labels}
