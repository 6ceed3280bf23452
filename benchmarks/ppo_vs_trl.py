"""Our PPO step measured side by side with TRL 1.12's (`trl.experimental.ppo`), on the same work.

    .venv/bin/python benchmarks/ppo_vs_trl.py [--rounds 3] [--steps 6] [--out runs/bench-ppo-vs-trl]

The work: the embedded SmolLM2-135M-Instruct as policy, reference, reward and value model (the reward and value
models are its trunk with one seeded scalar head); the same 8 prompts every step; responses of at most 32 tokens
(stopped at EOS), sampled at temperature 0.7; the reward is the reward model's score, with no penalty for a
response that never emits EOS (TRL's `missing_eos_penalty=None`); 1 PPO epoch of 1 minibatch; TRL's defaults for
the rest (lr 3e-6, β 0.05, Adam's β2 0.999, no gradient clipping). Temperature and reward define the task (the
reward gained is measured at that temperature, by that reward), so every runner gets them; the rest is how each
trains.
Three runners, alternated `--rounds` times, each a fresh process (so its peak resident memory is its own):
- TRL: float32, full fine-tuning, in its own virtual environment (built here on first use, kept out of the
  project's dependencies);
- ours, identical settings: the same float32 full fine-tuning;
- ours, shipped settings: the PPO section of the `demo` preset that the main job runs (mixed precision auto: bf16
  autocast where the CPU has bf16 instructions, else float32; the top 10 of 30 layers of the policy and the top 2
  of the value model trained, λ = 1, lr 1e-4, β 0.1, 2 PPO epochs), on the same work (its EOS penalty, a reward
  of −1 for an answer cut at the length limit, would change the reward: at 32 tokens most answers are cut, and the
  run would learn to stop early, not to please the reward model);
- TRL again with jemalloc preloaded (`trl-jemalloc`): `rlhf` runs itself under jemalloc where the system has it
  (rlhf/runtime/allocator.py), so this row shows how much of the difference is the allocator.
Step 1 of every run is a warm-up and is not counted. After the runs, every final policy and the initial one
answer the 8 prompts 32 times each (same seeds) and the reward model scores them: the reward gained, ± its standard
error over the paired answers.
It also measures this CPU's sustained matrix-multiply rate (float32 and bfloat16) and reports each of our phases'
achieved FLOP/s (the matrix-multiply FLOPs each phase executes on the real tokens: padding not counted, a frozen
bottom computed once a step counted once, a last block that computes only the positions read counted so, the
attention's products over each row's causal pairs of real tokens included) as a share of the ceiling of the
precision used.
Run it alone on the machine: it is a timing benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
TRL_PINS = ["trl==1.12.0", "datasets"]
WORK = {"batch_size": 8, "max_new_tokens": 32, "lr": 3e-6, "temperature": 0.7, "kl_coef": 0.05, "seed": 0}
TASK = {"temperature": WORK["temperature"], "eos_penalty": None}  # what the reward is, for every runner


# ---------------------------------------------------------------------------------------------------- set-up
def trl_python(venv: Path) -> Path:
    """TRL's virtual environment, built on first use with the torch, transformers and accelerate we run."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import trl.experimental.ppo"]).returncode == 0:
        return python
    import accelerate
    import transformers

    print(f"building TRL's virtual environment in {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
    pins = [f"transformers=={transformers.__version__}", f"accelerate=={accelerate.__version__}", *TRL_PINS]
    subprocess.run([*pip, *pins], check=True)
    return python


def prepare(out: Path, steps: int, seed: int) -> dict:
    """The embedded model, a reward/value model with a seeded head, the 8 prompts as token ids; the spec file.
    `seed` seeds the runs (sampling, shuffling), not the reward model's head, so runs of different seeds compare."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.data.chat import encode_prompt
    from rlhf.data.records import read_prompts
    from rlhf.models.load import load_tokenizer, resolve

    model = resolve("embedded")
    tokenizer = load_tokenizer(model)
    pad = tokenizer.convert_ids_to_tokens(0)  # <|endoftext|>: never in chat text, unlike EOS (<|im_end|>)
    assert pad != tokenizer.eos_token, "the benchmark needs a pad token distinct from EOS"
    reward = out / "reward"
    if not (reward / "config.json").exists():
        torch.manual_seed(WORK["seed"])
        rm = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
        tokenizer.pad_token = pad
        rm.config.pad_token_id = tokenizer.pad_token_id
        rm.save_pretrained(reward)
        tokenizer.save_pretrained(reward)
    prompts = read_prompts(ROOT / "examples" / "prompts.jsonl")[: WORK["batch_size"]]
    (out / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": p.id, "messages": list(p.messages)}) + "\n" for p in prompts)
    )
    spec = {
        **WORK,
        "seed": seed,
        "steps": steps,
        "model": model,
        "reward": str(reward),
        "pad_token": pad,
        "prompts": str(out / "prompts.jsonl"),
        "prompt_ids": [encode_prompt(tokenizer, p.messages) for p in prompts],
    }
    (out / "spec.json").write_text(json.dumps(spec))
    return spec


# ---------------------------------------------------------------------------------------------------- runners
def run_worker(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run one measurement in a fresh process; its RESULT line, plus its peak resident memory from wait4."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} failed ({proc.returncode}); see {log}")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return result


def ours_config(spec: dict, variant: str, out: Path):
    from rlhf.config import PPOConfig

    work = {
        "policy": spec["model"],
        "reward": spec["reward"],
        "prompts": spec["prompts"],
        "out": str(out),
        "epochs": float(spec["steps"]),  # the same 8 prompts every step
        "batch_size": spec["batch_size"],
        "max_new_tokens": spec["max_new_tokens"],
        "seed": spec["seed"],
        "save_every": 10**6,
        "progress": False,
    }
    if variant == "defaults":
        from rlhf.config import load_yaml

        shipped = load_yaml(ROOT / "rlhf" / "presets" / "demo.yaml")["ppo"]
        shipped = {k: v for k, v in shipped.items() if k not in ("epochs", "save_every")}
        batch = {"batch_size": spec["batch_size"], "mini_batch_size": spec["batch_size"], "micro_batch_size": 8}
        return PPOConfig(**{**work, **shipped, **batch, **TASK, "max_new_tokens": spec["max_new_tokens"]})
    # TRL's settings: 1 epoch of 1 minibatch, float32, all weights, TRL's defaults for the rest
    return PPOConfig(
        **work,
        mini_batch_size=spec["batch_size"],
        micro_batch_size=spec["batch_size"],
        ppo_epochs=1,
        **TASK,
        lr=spec["lr"],
        kl_coef=spec["kl_coef"],
        schedule="linear",
        warmup_ratio=0.0,
        mixed_precision="no",
        trainable_layers=None,
        vf_coef=0.1,
        lam=0.95,
        max_grad_norm=0.0,  # TRL's PPO trainer clips no gradient
        adam_betas=(0.9, 0.999),  # transformers' TrainingArguments
    )


def ours_worker(spec_path: str, variant: str, out: str) -> None:
    from rlhf.runtime.allocator import use_jemalloc

    use_jemalloc()  # as the `rlhf` command does
    from rlhf.stages import ppo

    spec = json.loads(Path(spec_path).read_text())
    cfg = ours_config(spec, variant, Path(out))
    final = ppo.run(cfg)
    precision = SimpleNamespace(mixed_precision=cfg.mixed_precision)  # as the accelerator reports it
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == "ppo"]
    keys = ("seconds_step", "seconds_generate", "seconds_score", "seconds_train", "tokens_prompt", "tokens_response")
    result = {k: [r[k] for r in rows] for k in (*keys, "tokens_shared", "attention_pairs")}
    result.update(
        {
            "step_seconds": result.pop("seconds_step"),
            "scores": [r["reward"] for r in rows],
            "kl": [r["kl"] for r in rows],
            "final": str(final),
            "mixed_precision": cfg.mixed_precision,
            "trainable_layers": cfg.trainable_layers,
            "value_trainable_layers": cfg.value_trainable_layers,
            "logprobs_from_sampling": ppo.logprobs_from_sampling(cfg, precision),
            # the policy's frozen bottom is read from decoding (a plain Llama policy, the lean decoder, no LoRA)
            "bottom_from_decoding": cfg.trainable_layers is not None and not cfg.lora,
            "ppo_epochs": cfg.ppo_epochs,
        }
    )
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------- measures
def matmul_ceiling(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """Sustained GFLOP/s of n×n matrix products in `dtype` on this CPU (all threads torch uses). A CPU without bf16
    instructions multiplies bf16 in a scalar loop (a 2048² product takes ~20 s): it is measured on 256² there."""
    from rlhf.runtime.distributed import bf16_pays

    if dtype == torch.bfloat16 and not bf16_pays()[0]:
        n = 256
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


def model_flops(config) -> dict:
    """Forward FLOPs per token of a transformer block (`layer`) and of its key and value projections (`kv`), of the
    LM head (2 · params each), and of the attention's two products per causal query–key pair (`pair`: 2 · head size
    for the score and 2 · head size for the value, for every query head)."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = 2 * (2 * d * d + 2 * d * kv + 3 * d * f)
    return {
        "layer": per_layer,
        "kv": 2 * 2 * d * kv,
        "layers": layers,
        "head": 2 * d * config.vocab_size,
        "pair": 4 * d,
    }


def phase_flops(fl: dict, prompt_tokens: float, response_tokens: float, run: dict, shared=0.0, pairs=0.0, rows=8):
    """Matrix-multiply FLOPs one step of ours executes, phase by phase, counting real tokens only (padding is not
    useful work) and each shared or replayed computation once, as it runs: the policy's frozen bottom (depth
    30 − trainable layers) once a step, the value model's deeper bottom continued from it, the reference above the
    policy's bottom, the value and reward model above the value model's; the blocks compute the `shared` tokens
    (the rows' common start, a system prompt) once for all rows that have them. The last block of a forward that
    reads only some positions (`unpadded.reading`) computes keys and values at every token and the rest at those
    positions only: the response positions (policy, reference, value model) or one a row (reward model). Every
    block's attention multiplies over `pairs`, the rows' causal pairs of real tokens; the attention of a reading
    forward's last block, whose queries are the positions read, is not counted (an undercount).

    generate: the policy over prompt + response tokens, the LM head once per response token;
    score: the bottoms (the policy's not, when decoding computed it: `bottom_from_decoding`); the policy above its
      bottom when its log-probs are recomputed (not kept from sampling); the reference above the policy's bottom;
      the value and reward model above the value model's; LM heads on response tokens;
    train, per PPO epoch: forward of policy and value model above their bottoms (the first update back-propagates
      the scoring forward of one of them instead of running it again: the policy's when scoring ran it, else the
      value model's) + backward (2× forward) of their trainable layers, the LM head forward on response tokens and
      its backward (1× for the input's gradient, 2× when the head trains)."""
    tokens, responses = prompt_tokens + response_tokens - shared, response_tokens
    layer, head, depth = fl["layer"], fl["head"], fl["layers"]
    block = tokens * layer + pairs * fl["pair"]  # a block computed whole

    def trunk(blocks: int, reads: float) -> float:  # `blocks` blocks whose last computes whole only `reads` positions
        return blocks * block - (tokens - reads) * (layer - fl["kv"]) - pairs * fl["pair"] if blocks else 0.0

    policy_trained = run["trainable_layers"] or depth
    value_trained = run["value_trainable_layers"] or policy_trained
    policy_bottom, value_bottom = depth - policy_trained, depth - value_trained
    recompute = not run["logprobs_from_sampling"]
    bottoms = policy_bottom + max(value_bottom - policy_bottom, 0)  # each frozen bottom once
    if run.get("bottom_from_decoding"):
        bottoms -= policy_bottom  # computed while generating (counted there)
    score = bottoms * block + (recompute + 1) * trunk(depth - policy_bottom, responses)  # [policy,] reference
    score += trunk(depth - value_bottom, responses) + trunk(depth - value_bottom, rows)  # value model, reward model
    score += (recompute + 1) * responses * head
    head_backward = 2 if run["trainable_layers"] is None else 1  # a tied head trains with the embeddings
    policy, value = trunk(policy_trained, responses), trunk(value_trained, responses)
    train = 0.0
    for epoch in range(run["ppo_epochs"]):
        reused_policy, reused_value = epoch == 0 and recompute, epoch == 0 and not recompute
        train += (not reused_policy) * policy + (not reused_value) * value + 2 * (policy + value)
        train += responses * head * ((not reused_policy) + head_backward)
    generate = depth * block + responses * head
    return {"generate": generate, "score": score, "train": train}


def reward_gain(spec: dict, finals: dict[str, list[str]], samples: int = 32) -> dict[str, tuple[float, float]]:
    """Mean reward-model score of each policy's answers to the 8 prompts (`samples` each, the same seeds for every
    policy), minus the initial policy's; (mean gain, its standard error). The error comes from the answers: the
    gain of answer k to prompt i is paired with the initial policy's answer under the same seed, and the paired
    differences of all runs are averaged. (At 8 samples a prompt the error was ±0.05, the size of the gains.)"""
    from rlhf.data.records import Demonstration
    from rlhf.models.generation import sample_responses
    from rlhf.models.load import load_causal_lm, load_tokenizer
    from rlhf.models.reward import load_reward_model, pad_batch, score
    from rlhf.stages.reward import response_sequences

    tokenizer = load_tokenizer(spec["model"])
    rm, rm_tokenizer = load_reward_model(spec["reward"])
    prompts = [json.loads(x) for x in Path(spec["prompts"]).read_text().splitlines()]

    together = 4  # answers to each prompt drawn in one call: 32 rows decode at ~2× the time of 8 on a CPU

    @torch.no_grad()
    def scores(path: str) -> list[float]:
        policy, _ = load_causal_lm(path)
        out = []
        for k in range(0, samples, together):
            torch.manual_seed(1000 + k)  # row j of every policy's call: the same prompt under the same draws
            n = min(together, samples - k)
            _, _, responses = sample_responses(
                policy, spec["prompt_ids"] * n, 0, tokenizer.eos_token_id, spec["max_new_tokens"], spec["temperature"]
            )
            texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
            demos = [Demonstration(p["id"], p["messages"], t) for p, t in zip(prompts * n, texts, strict=True)]
            ids, mask = pad_batch(response_sequences(rm_tokenizer, demos, 512), rm_tokenizer.pad_token_id)
            out += score(rm, ids, mask).tolist()
        return out

    base = scores(spec["model"])
    gains = {}
    for name, paths in finals.items():
        diffs = [a - b for p in paths for a, b in zip(scores(p), base, strict=True)]
        gains[name] = (statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5)
    return gains


# ---------------------------------------------------------------------------------------------------- report
def summarise(results: list[dict], spec: dict) -> dict:
    per_step = [s for r in results for s in r["step_seconds"][1:]]  # step 1 is a warm-up
    tokens = [s for r in results for s in (r.get("tokens_response") or [])[1:]]
    out = {
        "median": statistics.median(per_step),
        "min": min(per_step),
        "max": max(per_step),
        "rss_gb": max(r["peak_rss_mb"] for r in results) / 1024,
    }
    if tokens:
        out["tok_s"] = statistics.fmean(t / s for t, s in zip(tokens, per_step, strict=True))
    else:  # TRL logs the EOS count, not lengths: count every response as generated to its limit at most
        out["tok_s"] = spec["batch_size"] * spec["max_new_tokens"] / out["median"]
        out["tok_s_is_bound"] = True
    return out


def print_tables(spec, summaries, results, gains, ceilings) -> None:
    trl = summaries["trl"]
    print(
        "\n| runner | s/step median | min | max | generated tok/s | peak RSS GB | time ÷ TRL | memory ÷ TRL "
        "| RM score gain after the run |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in summaries.items():
        bound = "≤" if s.get("tok_s_is_bound") else ""
        g, se = gains.get(name, (float("nan"), float("nan")))
        print(
            f"| {name} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} | {bound}{s['tok_s']:.0f} | "
            f"{s['rss_gb']:.2f} | {s['median'] / trl['median']:.2f} | {s['rss_gb'] / trl['rss_gb']:.2f} | "
            f"{g:+.3f} ± {se:.3f} |"
        )
    from rlhf.runtime.distributed import bf16_pays

    pays, why = bf16_pays()
    size = "2048²" if pays else "2048², bf16 256²"
    print(f"\nceiling: float32 {ceilings['no']:.0f} GFLOP/s, bfloat16 {ceilings['bf16']:.1f} GFLOP/s (matmul {size})")
    print(f"bf16 autocast (mixed_precision auto): {'yes' if pays else 'no'}, {why}")
    from transformers import AutoConfig

    fl = model_flops(AutoConfig.from_pretrained(spec["model"]))
    print("\n| ours | phase | seconds (median) | share of step | executed GFLOP/s | of ceiling |")
    print("|---|---|---:|---:|---:|---:|")
    for name in [n for n in results if n.startswith("ours")]:
        rs = results[name]
        precision = rs[0]["mixed_precision"]
        for phase in ("generate", "score", "train"):
            secs, rates = [], []
            for r in rs:
                for i in range(1, len(r["step_seconds"])):
                    shared, pairs = r["tokens_shared"][i], r["attention_pairs"][i]
                    tokens = r["tokens_prompt"][i], r["tokens_response"][i]
                    flops = phase_flops(fl, *tokens, r, shared, pairs, spec["batch_size"])[phase]
                    secs.append(r[f"seconds_{phase}"][i])
                    rates.append(flops / r[f"seconds_{phase}"][i] / 1e9)
            med, rate = statistics.median(secs), statistics.median(rates)
            share = med / summaries[name]["median"]
            print(f"| {name} | {phase} | {med:.2f} | {share:.0%} | {rate:.0f} | {rate / ceilings[precision]:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the three runners")
    parser.add_argument("--steps", type=int, default=6, help="PPO steps per run (the first is not timed)")
    parser.add_argument(
        "--seed", type=int, default=WORK["seed"], help="seed of the runs (the reward model's head stays)"
    )
    parser.add_argument("--out", default="runs/bench-ppo-vs-trl")
    parser.add_argument("--trl-venv", default="runs/trl-venv", help="TRL's own virtual environment (built once)")
    parser.add_argument("--only", nargs="*", default=["trl", "trl-jemalloc", "ours-identical", "ours-defaults"])
    parser.add_argument("--worker", choices=["identical", "defaults"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return ours_worker(args.spec, args.worker, args.out)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = prepare(out, args.steps, args.seed)
    python = trl_python(Path(args.trl_venv).resolve()) if any(n.startswith("trl") for n in args.only) else None
    from rlhf.runtime.allocator import jemalloc_path

    jemalloc_env = {**os.environ, "LD_PRELOAD": jemalloc_path() or ""}
    commands = {
        "trl": lambda d: [
            str(python),
            str(ROOT / "benchmarks" / "ppo_vs_trl_worker_trl.py"),
            "--spec",
            str(out / "spec.json"),
            "--out",
            str(d),
        ],
        "ours-identical": lambda d: [
            sys.executable,
            __file__,
            "--worker",
            "identical",
            "--spec",
            str(out / "spec.json"),
            "--out",
            str(d),
        ],
        "ours-defaults": lambda d: [
            sys.executable,
            __file__,
            "--worker",
            "defaults",
            "--spec",
            str(out / "spec.json"),
            "--out",
            str(d),
        ],
    }
    results: dict[str, list[dict]] = {name: [] for name in args.only}
    for k in range(args.rounds):
        for name in args.only:
            run_dir = out / f"{name}-{k}"
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            run_dir.mkdir()
            t0 = time.perf_counter()
            cmd = commands[name.removesuffix("-jemalloc")](run_dir)
            r = run_worker(cmd, out / f"{name}-{k}.log", jemalloc_env if name.endswith("-jemalloc") else None)
            results[name].append(r)
            steps = ", ".join(f"{s:.1f}" for s in r["step_seconds"])
            print(
                f"round {k + 1} {name}: {time.perf_counter() - t0:.0f} s; steps [{steps}] s; "
                f"peak {r['peak_rss_mb'] / 1024:.2f} GB",
                flush=True,
            )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    summaries = {name: summarise(rs, spec) for name, rs in results.items()}
    gains = reward_gain(spec, {name: [r["final"] for r in rs] for name, rs in results.items()})
    ceilings = {"no": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16)}
    if "trl" in summaries:
        print_tables(spec, summaries, results, gains, ceilings)
    else:
        print(json.dumps({"summaries": summaries, "gains": gains, "ceilings": ceilings}, indent=1))


if __name__ == "__main__":
    main()
