"""`rlhf pipeline CONFIG`: the whole recipe in one run folder, as many rounds as asked.

    round 0:  sft → sample (SFT policy) → annotate → filter → rm → ppo → eval
    round r:  sample (round r−1's PPO policy) → annotate → filter (everything ranked so far) → rm-rR → ppo-rR
              (continuing from ppo-r(R−1), KL still to the SFT policy) → eval-rR
    finally:  report.html

Every stage skips what is already complete (training stages: a final/ folder; sampling and annotation: the keys
already in the library; eval: its summary.json) and training stages resume from their checkpoints, so running the
same command again after a crash continues where it stopped. CONFIG is a preset name (`tiny`, `demo`) or a YAML
file: top-level fields of PipelineConfig, stage fields under sections named after the stages.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from rlhf.config import (
    AnnotateConfig,
    ConfigError,
    EvalConfig,
    FilterConfig,
    PipelineConfig,
    PPOConfig,
    RewardConfig,
    SampleConfig,
    SFTConfig,
    build,
    load_yaml,
)
from rlhf.data.records import read_demonstrations, read_prompts
from rlhf.runtime.files import atomic_write_text

PRESETS = Path(__file__).parent / "presets"
STAGE_CLASSES = {
    "sft": SFTConfig,
    "sample": SampleConfig,
    "annotate": AnnotateConfig,
    "filter": FilterConfig,
    "rm": RewardConfig,
    "ppo": PPOConfig,
    "eval": EvalConfig,
}


def load_pipeline(config: str, overrides: dict) -> tuple[PipelineConfig, dict[str, dict]]:
    """(pipeline fields, stage sections) from a preset name or YAML path, with command-line overrides on top."""
    path = PRESETS / f"{config}.yaml" if (PRESETS / f"{config}.yaml").is_file() else Path(config)
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise ConfigError(f"{config}: neither a preset ({presets}) nor a YAML file")
    doc = load_yaml(path)
    sections = {name: doc.pop(name) or {} for name in PipelineConfig.SECTIONS if name in doc}
    for name, values in sections.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {name!r} must be a mapping of field: value")
    doc.update({k: v for k, v in overrides.items() if v is not None})
    return build(PipelineConfig, doc), sections


def stage_config(sections: dict, name: str, **wiring):
    """The stage's config: its section of the YAML, then the paths the pipeline wires in."""
    values = dict(sections.get(name, {}))
    clash = sorted(set(values) & set(wiring))
    if clash:
        raise ConfigError(f"pipeline section {name!r} sets {clash}, which the pipeline sets itself")
    values.update(wiring)
    return build(STAGE_CLASSES[name], values)


def split_prompts(pc: PipelineConfig) -> tuple[Path, Path]:
    """OUT/prompts.train.jsonl and OUT/prompts.heldout.jsonl: eval_prompts seeded picks among the prompts that
    have no demonstration (SFT never saw them), the rest for training. Written once; later runs reuse them."""
    out = Path(pc.out)
    train_path, held_path = out / "prompts.train.jsonl", out / "prompts.heldout.jsonl"
    if train_path.is_file() and held_path.is_file():
        return train_path, held_path
    prompts = read_prompts(pc.prompts)
    demo_prompts = {tuple((m["role"], m["content"]) for m in d.messages) for d in read_demonstrations(pc.demos)}
    candidates = [
        i for i, p in enumerate(prompts) if tuple((m["role"], m["content"]) for m in p.messages) not in demo_prompts
    ]
    if len(candidates) <= pc.eval_prompts:
        raise ConfigError(
            f"{pc.prompts}: {len(candidates)} prompts have no demonstration; eval_prompts={pc.eval_prompts} "
            "would leave none to train PPO on"
        )
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(pc.seed)).tolist()
    held = {candidates[i] for i in order[: pc.eval_prompts]}

    def rows(keep) -> str:
        return "".join(
            json.dumps({"id": p.id, "messages": list(p.messages)}, ensure_ascii=False) + "\n"
            for i, p in enumerate(prompts)
            if keep(i)
        )

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(train_path, rows(lambda i: i not in held))
    atomic_write_text(held_path, rows(lambda i: i in held))
    return train_path, held_path


def round_prompts(pc: PipelineConfig, train_path: Path, r: int) -> Path:
    """The prompts ranked in round r: the next sample_prompts of the training prompts, cycling."""
    if pc.sample_prompts is None:
        return train_path
    lines = train_path.read_text(encoding="utf-8").splitlines(keepends=True)
    n = min(pc.sample_prompts, len(lines))
    picked = [lines[(r * n + i) % len(lines)] for i in range(n)]
    path = Path(pc.out) / f"prompts.round{r}.jsonl"
    if not path.is_file():
        atomic_write_text(path, "".join(picked))
    return path


def suffix(r: int) -> str:
    return "" if r == 0 else f"-r{r}"


def run(pc: PipelineConfig, sections: dict) -> Path:
    from rlhf.report import write_report
    from rlhf.stages import annotate, evaluate, filter, ppo, reward, sample, sft

    out = Path(pc.out)
    for name in sections:  # every section must build before hours of training start
        if name not in STAGE_CLASSES:
            raise ConfigError(f"unknown pipeline section {name!r}; sections: {', '.join(STAGE_CLASSES)}")
    train_prompts, heldout = split_prompts(pc)
    library = str(out / "library.db")
    simulated = sections.get("annotate", {}).get("annotator", "simulated") == "simulated"
    timings: dict[str, float] = {}

    def timed(name: str, fn, cfg):
        print(f"\n== pipeline: {name} ==", flush=True)
        t0 = time.perf_counter()
        result = fn(cfg)
        timings[name] = round(time.perf_counter() - t0, 1)
        return result

    common = {"out": str(out), "resume": True}
    sft_final = timed("sft", sft.run, stage_config(sections, "sft", model=pc.model, data=pc.demos, **common))
    policy = str(sft_final)
    for r in range(pc.rounds):
        s = suffix(r)
        prompts_r = round_prompts(pc, train_prompts, r)
        timed(
            f"sample{s}",
            sample.run,
            stage_config(sections, "sample", model=policy, prompts=str(prompts_r), library=library, round=r),
        )
        timed(f"annotate{s}", annotate.run, stage_config(sections, "annotate", library=library, round=r))
        timed(f"filter{s}", filter.run, stage_config(sections, "filter", library=library))
        rm_start = str(sft_final) if r == 0 or not pc.rm_continue else str(out / f"rm{suffix(r - 1)}" / "final")
        rm_final = timed(
            f"rm{s}",
            reward.run,
            stage_config(
                sections, "rm", model=rm_start, library=library, reference=pc.demos, stage_name=f"rm{s}", **common
            ),
        )
        ppo_final = timed(
            f"ppo{s}",
            ppo.run,
            stage_config(
                sections,
                "ppo",
                policy=policy,
                reference=str(sft_final),
                reward=str(rm_final),
                prompts=str(train_prompts),
                gold=simulated,
                stage_name=f"ppo{s}",
                **common,
            ),
        )
        policy = str(ppo_final)
        eval_dir = out / f"eval{s}"
        if not (eval_dir / "summary.json").is_file():
            # both models get the room PPO trained with, unless the eval section says otherwise
            max_new = sections.get("ppo", {}).get("max_new_tokens", PPOConfig.max_new_tokens)
            timed(
                f"eval{s}",
                evaluate.run,
                stage_config(
                    sections,
                    "eval",
                    a=str(sft_final),
                    b=policy,
                    a_label="SFT",
                    b_label=f"PPO round {r}" if r else "PPO",
                    prompts=str(heldout),
                    reward=str(rm_final),
                    reference=str(sft_final),
                    gold=simulated,
                    out=str(eval_dir),
                    **({"max_new_tokens": max_new} if "max_new_tokens" not in sections.get("eval", {}) else {}),
                ),
            )
    report = write_report(out)
    record_timings(out, timings)
    print(f"\npipeline: done in {sum(timings.values()):.0f} s; report: {report}")
    return report


def record_timings(out: Path, timings: dict[str, float]) -> None:
    """OUT/timings.json: seconds per stage of every pipeline invocation (a resumed run adds an entry)."""
    path = out / "timings.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs.append({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": timings})
    atomic_write_text(path, json.dumps(runs, indent=1))
