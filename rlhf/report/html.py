"""The run folder as one self-contained HTML page: headline numbers, evaluation, curves, reward model, preference
data, sample generations and the resolved config. Reads the run folder only; every part is optional."""

from __future__ import annotations

import json
import re
import warnings
from html import escape
from pathlib import Path

from rlhf.report.plots import Rounds, training_plots
from rlhf.runtime.files import atomic_write_text

# headline order: people first (`rlhf eval human`: side-by-side votes in the web app), then the stand-ins for them
JUDGES = {
    "human": "people (side by side)",
    "gold": "gold (simulated panel)",
    "judge": "AI judge",
    "rm": "reward model",
}
N_SAMPLES = 8
PPO_COLUMNS = ("reward", "gold_reward", "kl", "kl_coef", "entropy", "response_length", "eos_rate", "approx_kl")


# ---------------------------------------------------------------- reading the run folder


def read_metrics(path: str | Path) -> dict[str, list[dict]]:
    """{stage: rows sorted by step} from metrics.jsonl, one row per (stage, step).

    A resumed run logs some steps again, and a step may have several lines (training and held-out): the lines of a
    (stage, step) are merged in file order, a later line winning per key. Unreadable lines (a write cut short by a
    crash) are skipped with a warning."""
    merged: dict[tuple[str, int], dict] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = (str(row["stage"]), int(row["step"]))
            except (ValueError, KeyError, TypeError):
                warnings.warn(f"{path}:{lineno}: not a metrics row (JSON with stage and step), skipped", stacklevel=2)
                continue
            merged.setdefault(key, {}).update(row)
    out: dict[str, list[dict]] = {}
    for (stage, step), row in sorted(merged.items(), key=lambda kv: kv[0][1]):
        out.setdefault(stage, []).append({**row, "step": step})
    return out


def split_round(name: str) -> tuple[str, int]:
    """ "ppo" -> ("ppo", 0), "ppo-r2" -> ("ppo", 2): later rounds of the recipe carry a -rN suffix."""
    m = re.fullmatch(r"(.*?)-r(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


def stage_rounds(metrics: dict[str, list[dict]], base: str) -> Rounds:
    """The rounds of one stage in order: [("ppo", rows), ("ppo-r1", rows), ...]."""
    names = [s for s in metrics if split_round(s)[0] == base]
    return [(s, metrics[s]) for s in sorted(names, key=lambda s: split_round(s)[1])]


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        warnings.warn(f"{path}: not valid JSON ({e}), left out of the report", stacklevel=2)
        return None


def round_dirs(run_dir: Path, base: str, file: str) -> list[tuple[str, Path]]:
    """[(folder name, path of `file`)] for base, base-r1, ... that hold it, in round order."""
    found = [(p.relative_to(run_dir).parts[0], p) for p in run_dir.glob(f"{base}*/{file}")]
    found = [(name, p) for name, p in found if split_round(name)[0] == base]
    return sorted(found, key=lambda t: split_round(t[0])[1])


def read_config(path: Path) -> dict | str | None:
    """config.yaml as a mapping; its raw text when it does not parse as one."""
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    import yaml  # a dependency of the package; imported here so that importing the report stays light

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:  # an unparsable config is still worth showing as text
        return text
    return doc if isinstance(doc, dict) else text


def read_generations(path: Path, n: int) -> list[dict]:
    """The first n rows of an eval's generations.jsonl; unreadable lines are skipped with a warning."""
    rows = []
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if len(rows) >= n:
                    break
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    warnings.warn(f"{path}:{lineno}: not JSON, skipped", stacklevel=2)
    return rows


# ---------------------------------------------------------------- formatting


def pct(x) -> str:
    return f"{x:.1%}" if isinstance(x, (int, float)) else "–"


def num(x, digits: int = 3) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "–" if x is None else str(x)
    if isinstance(x, int) or abs(x) >= 10**digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def interval(w: dict) -> str:
    return f"[{pct(w.get('low'))}, {pct(w.get('high'))}]"


def table(header: list[str], rows: list[list], cls: str = "") -> str:
    """A table whose cells are plain text (escaped here)."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def not_run(text: str) -> str:
    return f'<p class="notrun">{escape(text)}</p>'


def rm_heldout(summary: dict) -> dict | None:
    """The reward model as PPO used it: after the reference shift when there was one."""
    return summary.get("heldout_after_shift") or summary.get("heldout")


# ---------------------------------------------------------------- sections


def summary_box(evals: list, rms: list, filt: dict | None, ppo: Rounds) -> str:
    cards = []
    if evals:
        name, s = evals[-1]
        rates = s.get("win_rates", {})
        by = next((j for j in JUDGES if j in rates), None)
        if by:
            w = rates[by]
            who = f"{s.get('b_label', 'B')} vs {s.get('a_label', 'A')}"
            cards.append((f"win rate by {JUDGES[by]}", pct(w.get("rate")), f"{interval(w)} · {who} · {name}"))
    if not cards:
        cards.append(("win rate", "not run", "no eval/summary.json"))
    kl = evals[-1][1].get("kl_to_reference", {}).get("b") if evals else None
    source = f"{evals[-1][1].get('b_label', 'B')} at evaluation, {evals[-1][0]}" if evals else ""
    if kl is None and ppo:
        kl, source = next((r["kl"] for r in reversed(ppo[-1][1]) if r.get("kl") is not None), None), "last PPO step"
    cards.append(("KL to reference", f"{num(kl)} nats" if kl is not None else "not run", source or "no eval or PPO"))
    if rms:
        name, s = rms[-1]
        h = rm_heldout(s) or {}
        gold = f" · gold {pct(h['gold_accuracy'])}" if h.get("gold_accuracy") is not None else ""
        cards.append(
            (
                "RM held-out accuracy",
                pct(h.get("heldout_accuracy")),
                f"{name}, {num(h.get('heldout_pairs'))} pairs{gold}",
            )
        )
    else:
        cards.append(("RM held-out accuracy", "not run", "no rm/final/rlhf_stage.json"))
    agreement = (filt or {}).get("agreement", {})
    if agreement.get("pairwise_agreement") is not None:
        alpha = agreement.get("krippendorff_alpha")
        cards.append(
            ("panel agreement", pct(agreement["pairwise_agreement"]), f"pairwise · Krippendorff α {num(alpha)}")
        )
    else:
        cards.append(("panel agreement", "not run", "no filter_report.json"))
    body = ""
    for k, v, sub in cards:
        cls = "v none" if v == "not run" else "v"
        body += (
            f'<div class="card"><div class="k">{escape(k)}</div><div class="{cls}">{escape(v)}</div>'
            f'<div class="s">{escape(sub)}</div></div>'
        )
    return f'<div class="summary">{body}</div>'


def eval_section(evals: list) -> str:
    if not evals:
        return not_run("Evaluation: not run (no eval/summary.json).")
    parts = []
    for name, s in evals:
        a, b = s.get("a_label", "A"), s.get("b_label", "B")
        rates = s.get("win_rates", {})
        rows = [
            [
                JUDGES.get(j, j),
                pct(w.get("rate")),
                interval(w),
                w.get("wins"),
                w.get("ties"),
                w.get("losses"),
                w.get("n"),
            ]
            for j in [*JUDGES, *sorted(set(rates) - set(JUDGES))]
            if (w := rates.get(j))
        ]
        headline = "".join(
            f"<li><b>{escape(b)} vs {escape(a)} win rate by {escape(r[0])}: {escape(r[1])} {escape(r[2])}</b></li>"
            for r in rows
        )
        compare = [
            [label, num(s.get(key, {}).get("a")), num(s.get(key, {}).get("b"))]
            for key, label in (
                ("mean_length", "mean length (tokens)"),
                ("eos_rate", "EOS rate"),
                ("kl_to_reference", "KL to reference (nats)"),
                ("mean_reward", "mean reward (RM)"),
                ("mean_gold", "mean gold utility"),
            )
            if key in s
        ]
        parts.append(
            f"<h3>{escape(name)}: {escape(b)} vs {escape(a)} on {escape(num(s.get('n_prompts')))} prompts</h3>"
            f'<p class="paths">A = {escape(str(s.get("a", "?")))}<br>B = {escape(str(s.get("b", "?")))}</p>'
            f"<ul>{headline}</ul>"
            + table(["judged by", f"{b} wins", "95% interval", "wins", "ties", "losses", "n"], rows)
            + table(["", a, b], compare)
        )
    return "".join(parts) + '<p class="note">win rate = (wins + ties/2) / n: how often B beats A.</p>'


def training_section(sft: Rounds, rm: Rounds, ppo: Rounds) -> str:
    parts = [
        not_run(f"{label}: not run (no metrics).") for label, r in (("SFT", sft), ("RM", rm), ("PPO", ppo)) if not r
    ]
    for caption, png in training_plots(sft, rm, ppo):
        if png:
            parts.append(
                f'<figure><img src="data:image/png;base64,{png}" alt="{escape(caption)}">'
                f"<figcaption>{escape(caption)}</figcaption></figure>"
            )
    if ppo:
        rows = []
        for stage, rs in ppo:
            last = rs[-1]
            skips = sum(r.get("non_finite_skips") or 0 for r in rs)
            rows.append([stage, last["step"], *(num(last.get(k)) for k in PPO_COLUMNS), num(skips)])
        parts.append("<h3>PPO: last logged step of each round</h3>")
        parts.append(table(["stage", "step", *PPO_COLUMNS, "non-finite skips"], rows, cls="small"))
    return "".join(parts)


def rm_section(rms: list) -> str:
    if not rms:
        return not_run("Reward model: not run (no rm/final/rlhf_stage.json).")
    rows = []
    for name, s in rms:
        for label, key in ((name, "heldout"), (f"{name} after reference shift", "heldout_after_shift")):
            if h := s.get(key):
                rows.append(
                    [
                        label,
                        num(s.get("steps")),
                        pct(h.get("heldout_accuracy")),
                        num(h.get("heldout_pairs")),
                        pct(h.get("gold_accuracy")),
                        num(h.get("gold_pairs")),
                        f"{num(h.get('score_mean'))} ± {num(h.get('score_std'))}",
                    ]
                )
    header = ["reward model", "steps", "held-out accuracy", "pairs", "gold accuracy", "gold pairs", "score mean ± std"]
    return table(header, rows) if rows else not_run("Reward model: no held-out evaluation recorded.")


def filter_section(filt: dict | None) -> str:
    if not filt:
        return not_run("Preference data filter: not run (no filter_report.json).")
    inp, kept, ag = filt.get("input", {}), filt.get("kept", {}), filt.get("agreement", {})
    parts = [
        f"<p>{escape(num(inp.get('tasks')))} tasks, {escape(num(inp.get('rankings')))} rankings by "
        f"{escape(num(inp.get('evaluators')))} evaluators, {escape(num(inp.get('candidate_pairs')))} candidate pairs; "
        f"<b>kept {escape(num(kept.get('pairs')))} pairs in {escape(num(kept.get('tasks')))} tasks</b>.</p>",
        f"<p>Agreement between evaluators: {escape(pct(ag.get('pairwise_agreement')))} of pairs, "
        f"Krippendorff α {escape(num(ag.get('krippendorff_alpha')))} "
        f"({escape(num(ag.get('n_prompts')))} prompts, {escape(num(ag.get('n_labels')))} rankings).</p>",
    ]
    low = set(filt.get("low_quality_evaluators") or [])
    per = ag.get("per_evaluator") or {}
    if per:
        rows = [
            [n, pct(e.get("loo_agreement")), num(e.get("n_prompts")), "dropped" if n in low else "kept"]
            for n, e in per.items()
        ]
        parts.append(table(["evaluator", "agreement with the others' consensus", "prompts", "labels"], rows))
    dropped = filt.get("dropped_pairs") or {}
    if dropped:
        total = inp.get("candidate_pairs") or 0
        rows = [[rule, n, pct(n / total) if total else "–"] for rule, n in dropped.items()]
        rows.append(["kept", kept.get("pairs"), pct(kept["pairs"] / total) if total and "pairs" in kept else "–"])
        parts.append(table(["rule (first that applies)", "pairs dropped", "share of candidates"], rows))
    return "".join(parts)


def samples_section(run_dir: Path, evals: list) -> str:
    if not evals:
        return not_run("Sample generations: not run (no eval/generations.jsonl).")
    name, s = evals[-1]
    rows = read_generations(run_dir / name / "generations.jsonl", N_SAMPLES)
    if not rows:
        return not_run(f"Sample generations: none ({name}/generations.jsonl is missing or empty).")
    a, b = s.get("a_label", "A"), s.get("b_label", "B")
    out = [f'<p class="note">The first {len(rows)} prompts of {escape(name)}/generations.jsonl.</p>']
    for row in rows:
        cols = []
        for side, label in (("a", a), ("b", b)):
            ended = {True: "EOS", False: "cut at max length"}.get(row.get(f"{side}_finished"), "")
            meta = f"RM {num(row.get(f'{side}_rm'))} · gold {num(row.get(f'{side}_gold'))} · {num(row.get(f'{side}_tokens'))} tokens · {ended}"
            cols.append(
                f'<div class="resp"><div class="who">{escape(label)}<span>{escape(meta)}</span></div>'
                f'<div class="text">{escape(str(row.get(side, "")))}</div></div>'
            )
        verdict = {"a": a, "b": b, "tie": "tie"}.get(row.get("judge"))
        judged = f'<div class="judge">AI judge prefers: {escape(verdict)}</div>' if verdict else ""
        out.append(
            f'<div class="sample"><div class="prompt">{escape(str(row.get("prompt", "")))}</div>'
            f'<div class="pair">{"".join(cols)}</div>{judged}</div>'
        )
    return "".join(out)


def config_section(config: dict | str | None) -> str:
    if config is None:
        return not_run("Config: no config.yaml.")
    if isinstance(config, str):
        return f'<pre class="text">{escape(config)}</pre>'
    scalars = [f"{k} {v}" for k, v in config.items() if not isinstance(v, dict)]
    parts = [f'<p class="note">{escape(" · ".join(scalars))}</p>'] if scalars else []
    for stage, cfg in config.items():
        if isinstance(cfg, dict):
            rows = [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in cfg.items()]
            parts.append(
                f"<details><summary>{escape(str(stage))}</summary>{table(['setting', 'value'], rows, 'small')}</details>"
            )
    return "".join(parts)


# ---------------------------------------------------------------- the page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;max-width:1100px;margin:24px auto;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.summary{display:grid;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));gap:10px;margin:14px 0}
.card{border:1px solid #cfd8e3;border-radius:6px;padding:10px 12px;background:#f6f9fc}
.card .k{font-size:12px;color:#555;text-transform:uppercase;letter-spacing:.03em}
.card .v{font-size:24px;font-weight:600;margin:2px 0} .card .v.none{font-size:16px;color:#999;font-style:italic} .card .s{font-size:12px;color:#555}
table{border-collapse:collapse;margin:8px 0 12px} th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f2f2f2} td{font-variant-numeric:tabular-nums} table.small{font-size:12px}
figure{margin:10px 0 18px} img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:12px;color:#555} .notrun{color:#888;font-style:italic} .note,.paths{font-size:12px;color:#555}
.sample{border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:8px}
.prompt{white-space:pre-wrap;font-weight:600;margin-bottom:6px;overflow-wrap:anywhere}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:8px}
.resp{background:#fafafa;border:1px solid #eee;border-radius:4px;padding:6px;min-width:0}
.who{font-weight:600;font-size:12px;margin-bottom:4px} .who span{font-weight:400;color:#666;margin-left:8px}
.text{white-space:pre-wrap;overflow-wrap:anywhere;font-size:13px} pre.text{background:#fafafa;padding:8px}
.judge{font-size:12px;color:#555;margin-top:4px} details{margin:4px 0} summary{cursor:pointer;font-weight:600}
"""


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.html (atomically) from whatever the run folder holds, and return its path."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    evals = [(name, s) for name, p in round_dirs(run_dir, "eval", "summary.json") if (s := read_json(p)) is not None]
    if not metrics_path.is_file() and not evals:
        raise FileNotFoundError(
            f"{run_dir}: nothing to report: no metrics.jsonl and no eval/summary.json "
            "(is this a run folder? run a stage with --run-dir there first)"
        )
    metrics = read_metrics(metrics_path) if metrics_path.is_file() else {}
    sft, rm, ppo = (stage_rounds(metrics, s) for s in ("sft", "rm", "ppo"))
    rms = [(n, s) for n, p in round_dirs(run_dir, "rm", "final/rlhf_stage.json") if (s := read_json(p)) is not None]
    filt = read_json(run_dir / "filter_report.json")
    title = f"RLHF run {run_dir.resolve().name}"
    sections = [
        ("Evaluation", eval_section(evals)),
        ("Training curves", training_section(sft, rm, ppo)),
        ("Reward model", rm_section(rms)),
        ("Preference data", filter_section(filt)),
        ("Sample generations", samples_section(run_dir, evals)),
        ("Config", config_section(read_config(run_dir / "config.yaml"))),
    ]
    body = "".join(f"<h2>{escape(h)}</h2>{html}" for h, html in sections)
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>"
        f'<p class="paths">{escape(str(run_dir.resolve()))}</p>'
        f"{summary_box(evals, rms, filt, ppo)}{body}</body></html>\n"
    )
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out
