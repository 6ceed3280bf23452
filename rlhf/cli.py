"""The `rlhf` command: one subcommand per stage, plus `pipeline`, `report`, `chat` and `generate`.

Stage flags are generated from the stage's config dataclass (names, types, choices and help from the field
docstrings), so a flag can never drift from the field it sets.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Literal

from rlhf.config import (
    AnnotateConfig,
    ConfigError,
    EvalConfig,
    FilterConfig,
    PipelineConfig,
    PPOConfig,
    RewardConfig,
    SampleConfig,
    ServeConfig,
    SFTConfig,
    build,
    field_docs,
    load_yaml,
)


def _flag_kwargs(hint) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return {"choices": list(args)}
    if origin is not None and type(None) in args:  # X | None
        return _flag_kwargs(next(a for a in args if a is not type(None)))
    if origin is tuple:
        return {"nargs": len(args), "type": args[0]}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": hint}


def add_config_flags(parser: argparse.ArgumentParser, cls, config_flag: bool = True) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    if config_flag:
        parser.add_argument(
            "--config", help="YAML file of field: value, or with the fields under a section named after the stage"
        )
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            help=f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%"),  # argparse formats help with %
            **_flag_kwargs(hints[f.name]),
        )


def config_from_args(cls, args: argparse.Namespace, section: str):
    values = load_yaml(args.config, section) if args.config else {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return build(cls, values)


# (command, module in rlhf.stages, config class, one-line help): each runs `module.run(config)`.
STAGES = (
    ("sft", "sft", SFTConfig, "stage 1: supervised fine-tuning on demonstrations"),
    ("sample", "sample", SampleConfig, "stage 2a: write K responses per prompt into the response library"),
    ("annotate", "annotate", AnnotateConfig, "stage 2b: rank each prompt's responses (panel, judge, function)"),
    ("filter", "filter", FilterConfig, "stage 2c: consensus, agreement, selection, filter_report.json"),
    ("rm", "reward", RewardConfig, "stage 2d: train the reward model on K-way rankings"),
    ("ppo", "ppo", PPOConfig, "stage 3: PPO against the reward model with a KL penalty to the SFT policy"),
    ("eval", "evaluate", EvalConfig, "compare two policies on held-out prompts: win rates by RM, gold, judge"),
)


def run_stage(args) -> None:
    import importlib

    module = importlib.import_module(f"rlhf.stages.{args.stage_module}")
    module.run(config_from_args(args.stage_config, args, args.command))


def cmd_rm_score(args) -> None:
    import json

    from rlhf.stages.reward import score_file

    rows = score_file(args.model, args.data, args.format, args.max_seq_len, args.batch_size)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    if args.out:
        out.close()
        scores = [r["score"] for r in rows]
        print(f"rm score: {len(rows)} rows scored (mean {sum(scores) / len(scores):.3f}) into {args.out}")


def rm_score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf rm score", description="Score prompt/response rows with a reward model.")
    p.add_argument("--model", required=True, help="a reward model folder (OUT/rm/final)")
    p.add_argument("--data", required=True, help="JSONL of prompt (or messages) + response; Alpaca or HH also read")
    p.add_argument("--format", default="auto", choices=["auto", "rlhf", "alpaca", "hh"])
    p.add_argument("--out", help="write JSONL rows with a `score` here (default: standard output)")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_rm_score, command="rm score")
    return p


def cmd_import(args) -> None:
    from rlhf.stages import import_data

    result = import_data.run(args.file, args.library, args.format)
    if args.strict and result["errors"]:
        sys.exit(1)


def _sampling(args):
    from rlhf.models.generation import SamplingConfig

    return SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size
    )


def cmd_chat(args) -> None:
    from rlhf.models.generation import generate
    from rlhf.models.load import load_causal_lm

    model, tokenizer = load_causal_lm(args.model)
    sampling = _sampling(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        print(
            generate(model, tokenizer, [[*history, {"role": "user", "content": args.prompt}]], sampling, args.seed)[0]
        )
        return
    print(f"Chatting with {args.model or 'the embedded model'}. /reset clears the conversation, /quit or Ctrl-D ends.")
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        answer = generate(model, tokenizer, [history], sampling)[0]
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}\n")


def cmd_generate(args) -> None:
    """Answer prompts with one or more models and print the answers side by side."""
    import random

    from rlhf.data.records import read_demonstrations, read_prompts
    from rlhf.models.generation import generate
    from rlhf.models.load import load_causal_lm

    prompts = read_prompts(args.prompts)
    if args.exclude:
        seen = {d.prompt.text for d in read_demonstrations(args.exclude)}
        prompts = [p for p in prompts if p.text not in seen]
    if args.n and args.n < len(prompts):
        prompts = random.Random(args.seed).sample(prompts, args.n)
    answers = {}
    for name in args.model:
        model, tokenizer = load_causal_lm(name)
        answers[name] = generate(model, tokenizer, [list(p.messages) for p in prompts], _sampling(args), args.seed)
        del model
    for i, p in enumerate(prompts):
        print(f"\n=== [{p.id}] {p.text}")
        for name in args.model:
            print(f"--- {name}:\n{answers[name][i]}")


def cmd_serve(args) -> None:
    from rlhf.webapp.server import serve

    serve(config_from_args(ServeConfig, args, "serve"))


def cmd_annotators(args) -> None:
    from rlhf.webapp.server import annotators

    annotators(args)


def cmd_eval_human(args) -> None:
    from rlhf.store.library import Library
    from rlhf.webapp.side_by_side import write_human_win_rate

    w = write_human_win_rate(args.eval, Library(args.library), args.name, args.seed)
    print(
        f"eval human: B beats A by people: {w['rate']:.1%} [{w['low']:.1%}, {w['high']:.1%}] over {w['n']} prompts "
        f"({w['votes']} votes); written to {args.eval}/summary.json"
    )


def eval_human_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhf eval human", description="Add people's side-by-side win rate to an eval folder's summary.json."
    )
    p.add_argument(
        "--eval", required=True, help="the eval folder whose generations people judged (rlhf serve --compare)"
    )
    p.add_argument("--library", required=True, help="the response library holding their votes")
    p.add_argument("--name", help="the side-by-side set (default: PARENT/FOLDER of --eval, as rlhf serve named it)")
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap interval (default: 0)")
    p.set_defaults(func=cmd_eval_human, command="eval human")
    return p


def cmd_pipeline(args) -> None:
    from rlhf import pipeline

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PipelineConfig)}
    pc, sections = pipeline.load_pipeline(args.pipeline_config, overrides)
    pipeline.run(pc, sections)


def cmd_report(args) -> None:
    from rlhf.report import write_report

    print(f"report: wrote {write_report(args.run_dir)}")


def _add_sampling_flags(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=160, help="longest answer in tokens (default: 160)")
    p.add_argument("--temperature", type=float, default=temperature, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default: 0.9)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for command, module, cls, help_text in STAGES:
        p = sub.add_parser(command, help=help_text, description=cls.__doc__)
        add_config_flags(p, cls)
        p.set_defaults(func=run_stage, stage_module=module, stage_config=cls)

    p = sub.add_parser(
        "import", help="bring outside preference data (pairwise, ranked, Anthropic HH) into the library"
    )
    p.add_argument("file", help="JSONL (or .jsonl.gz) of comparisons")
    p.add_argument("--library", required=True, help="the response library (SQLite path or database URL)")
    p.add_argument("--format", default="auto", choices=["auto", "pairwise", "ranked", "hh"])
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any row could not be imported")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "pipeline",
        help="the whole recipe in one run folder: SFT → sample → annotate → filter → RM → PPO → eval → report",
        description=PipelineConfig.__doc__,
    )
    p.add_argument("pipeline_config", metavar="CONFIG", help="a preset (tiny, demo) or a pipeline YAML file")
    add_config_flags(p, PipelineConfig, config_flag=False)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("serve", help="the annotation web app: people rank responses and judge two models")
    add_config_flags(p, ServeConfig)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("annotators", help="add people who may sign in to `rlhf serve` (prints their sign-in link)")
    p.add_argument("action", choices=["add", "token", "list"], help="add NAME, a new token for NAME, or list")
    p.add_argument("name", nargs="?", help="the evaluator's name")
    p.add_argument("--library", required=True, help="the response library the app serves")
    p.add_argument("--admin", action="store_true", help="may see the dashboard and export labels")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="where people reach the app, for the link")
    p.set_defaults(func=cmd_annotators)

    p = sub.add_parser("report", help="write RUN_DIR/report.html from a run folder")
    p.add_argument("run_dir", help="the run folder (runs/NAME)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("chat", help="talk to a model (or answer one --prompt and exit)")
    p.add_argument("--model", default="embedded", help="save_pretrained folder, `embedded` or `tiny`")
    p.add_argument("--prompt", help="answer this once and exit")
    p.add_argument("--system", help="system message")
    _add_sampling_flags(p, temperature=0.7)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="answer prompts with one or more models, printed side by side")
    p.add_argument("--model", action="append", required=True, help="a model (repeat to compare several)")
    p.add_argument("--prompts", required=True, help="prompts JSONL")
    p.add_argument("--exclude", help="demonstrations JSONL whose prompts to skip (to show held-out prompts)")
    p.add_argument("-n", type=int, default=4, help="how many prompts, chosen at random by --seed (0: all)")
    _add_sampling_flags(p, temperature=0.0)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # the real command (not a call from Python): run under jemalloc where the system has it
        from rlhf.runtime.allocator import use_jemalloc

        use_jemalloc()
    argv = sys.argv[1:] if argv is None else argv
    # `rlhf rm score ...` scores with a trained reward model; plain `rlhf rm ...` trains one.
    if argv[:2] == ["rm", "score"]:
        args = rm_score_parser().parse_args(argv[2:])
    elif argv[:2] == ["eval", "human"]:
        args = eval_human_parser().parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    if args.command in ("serve", "annotators", "eval human"):
        return run_without_torch(args)
    from transformers.utils import logging as hf_logging

    from rlhf.annotators.judge import JudgeError
    from rlhf.annotators.ranking import RankingError
    from rlhf.data.jsonl import DataError

    hf_logging.disable_progress_bar()  # per-tensor loading bars; our own bars show the work that takes time
    from rlhf.runtime.checkpoint import ResumeError

    try:
        args.func(args)
        shut_down_process_group(clean=True)
    except (ConfigError, DataError, ResumeError, RankingError, JudgeError, FloatingPointError) as e:
        print(f"rlhf {args.command}: error: {e}", file=sys.stderr)
        shut_down_process_group(clean=False)
        sys.exit(2)


def run_without_torch(args) -> None:
    """The web app and its helpers never touch a model: starting them should not import torch (seconds)."""
    try:
        args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"rlhf {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


def shut_down_process_group(clean: bool) -> None:
    """Leave a multi-process run together: without it one process can exit while gloo threads in another still
    talk to it, and that process dies with SIGABRT ("terminate called without an active exception")."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
