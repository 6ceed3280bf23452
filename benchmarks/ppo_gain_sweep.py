"""How much reward PPO gains per step under changed settings, over several seeds: the check that a faster setting
does not learn less, before it ships.

    .venv/bin/python benchmarks/ppo_gain_sweep.py --seeds 1 2 3 \
        --variant 'policy-6={"trainable_layers": 6}' --variant 'epochs-1={"ppo_epochs": 1}'

The work is `ppo_vs_trl.py`'s (the embedded model as policy, reference, reward and value model, the same 8 prompts
every step, 32-token answers), trained `--steps` steps with the demo preset's PPO settings ("demo", always run) or
those settings with a variant's overrides (any `PPOConfig` field; `"base": "identical"` starts from TRL's settings
instead). The gain of a run is `ppo_vs_trl.reward_gain`'s: the reward model's mean score of the final policy's
32 answers to each prompt minus the starting policy's under the same sampling seeds (± its paired standard error).
One seed's gain moves by more than its standard error from seed to seed, so the table compares each variant with
"demo" seed by seed (the paired difference, ± its standard error over seeds).
Timing-free: the runs go one after another in this process; run it alone only to keep it short.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ppo_vs_trl as bench  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, sep, overrides = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=JSON, e.g. 'epochs-1={{\"ppo_epochs\": 1}}'")
    try:
        parsed = json.loads(overrides)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--variant {name}: the overrides are not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise SystemExit(f"--variant {name}: the overrides must be a JSON object")
    return name, parsed


def variant_config(spec: dict, overrides: dict, out: Path):
    overrides = dict(overrides)
    base = overrides.pop("base", "defaults")
    if base not in ("defaults", "identical"):
        raise SystemExit(f"base {base!r}: expected 'defaults' or 'identical'")
    cfg = bench.ours_config(spec, base, out)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cfg)}
    if unknown:
        raise SystemExit(f"not PPOConfig fields: {sorted(unknown)}")
    return dataclasses.replace(cfg, **overrides)


def compare(gains: dict[str, dict[int, tuple[float, float]]], baseline: str = "demo") -> list[dict]:
    """Per variant: the gain of each seed, their mean, and the mean paired difference to `baseline` over the
    seeds both ran, with its standard error over seeds (None with fewer than two seeds)."""
    rows = []
    for name, by_seed in gains.items():
        means = [g for g, _ in by_seed.values()]
        row = {"variant": name, "seeds": {s: g for s, (g, _) in by_seed.items()}, "mean": statistics.fmean(means)}
        if name != baseline:
            diffs = [g - gains[baseline][s][0] for s, (g, _) in by_seed.items() if s in gains[baseline]]
            row["diff"] = statistics.fmean(diffs)
            row["diff_se"] = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=6, help="PPO steps per run")
    parser.add_argument("--variant", action="append", default=[], help="NAME=JSON of PPOConfig overrides")
    parser.add_argument("--samples", type=int, default=32, help="answers per prompt scored for the gain")
    parser.add_argument("--out", default="runs/bench-gain-sweep")
    args = parser.parse_args()
    variants = {"demo": {}, **dict(parse_variant(v) for v in args.variant)}
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from rlhf.stages import ppo

    finals: dict[tuple[str, int], str] = {}
    for seed in args.seeds:
        spec = bench.prepare(out, args.steps, seed)
        for name, overrides in variants.items():
            run_dir = out / f"{name}-seed{seed}"
            cfg = variant_config(spec, overrides, run_dir)
            if (run_dir / "ppo" / "final" / "config.json").exists():
                finals[name, seed] = str(run_dir / "ppo" / "final")  # a finished run of an interrupted sweep
            else:
                shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished one starts again
                finals[name, seed] = str(ppo.run(cfg))
            print(f"seed {seed} {name}: trained", flush=True)
    # every final policy scored as its own entry, against one scoring of the starting policy (the spec of any seed:
    # model, reward model, prompts and sampling are the same for all)
    entries = {f"{name}|{seed}": [path] for (name, seed), path in finals.items()}
    scored = bench.reward_gain(spec, entries, samples=args.samples)
    gains: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in variants}
    for key, gain in scored.items():
        name, seed = key.rsplit("|", 1)
        gains[name][int(seed)] = gain
    rows = compare(gains)
    (out / "gains.json").write_text(json.dumps({"variants": variants, "rows": rows}, indent=1))
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"\n| variant | overrides | {seeds} | mean | − demo, paired over seeds |")
    print("|---|---|" + "---:|" * (len(args.seeds) + 2))
    for row in rows:
        per = " | ".join(f"{row['seeds'][s]:+.3f} ± {gains[row['variant']][s][1]:.3f}" for s in args.seeds)
        diff = ""
        if "diff" in row:
            diff = f"{row['diff']:+.3f}" + (f" ± {row['diff_se']:.3f}" if row["diff_se"] is not None else "")
        print(f"| {row['variant']} | {json.dumps(variants[row['variant']])} | {per} | {row['mean']:+.3f} | {diff} |")


if __name__ == "__main__":
    main()
