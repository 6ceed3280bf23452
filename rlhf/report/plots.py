"""Training curves as inline PNGs (base64), drawn with matplotlib's object API: no pyplot, no global state."""

from __future__ import annotations

import base64
import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# A stage's rounds in order: [(stage name, rows sorted by step)], e.g. [("ppo", ...), ("ppo-r1", ...)].
Rounds = list[tuple[str, list[dict]]]

# A figure is a row of panels: (panel title, metric keys drawn in it).
Panels = list[tuple[str, list[str]]]

LINESTYLES = ("-", "--", ":", "-.")


def offset_steps(rounds: Rounds) -> Rounds:
    """Shift each round's steps to start where the previous round ended, so rounds follow each other on one axis."""
    out, offset = [], 0
    for stage, rows in rounds:
        out.append((stage, [{**r, "step": r["step"] + offset} for r in rows]))
        steps = [r["step"] for r in rows]
        offset += max(steps) if steps else 0
    return out


def points(rows: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    """The (x, y) pairs of rows where both are numbers (null marks a non-finite value; absent keys are skipped)."""
    xs, ys = [], []
    for r in rows:
        a, b = r.get(x), r.get(y)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            xs.append(a)
            ys.append(b)
    return xs, ys


def panel_figure(rounds: Rounds, panels: Panels, x: str = "step", xlabel: str | None = None) -> str | None:
    """One figure, one panel per (title, keys) that has data; a colour per round, a line style per key.

    Returns the PNG as base64, or None when no panel has a single point."""
    drawn = [(title, keys) for title, keys in panels if any(points(rows, x, k)[0] for _, rows in rounds for k in keys)]
    if not drawn:
        return None
    fig = Figure(figsize=(5.2 * len(drawn), 3.3), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, keys) in enumerate(drawn):
        ax = fig.add_subplot(1, len(drawn), i + 1)
        for r, (stage, rows) in enumerate(rounds):
            for k, key in enumerate(keys):
                xs, ys = points(rows, x, key)
                if not xs:
                    continue
                label = key if len(rounds) == 1 else f"{stage} {key}" if len(keys) > 1 else stage
                if x != "step":  # per-step noise makes a line through (KL, reward) points zigzag: show the cloud
                    ax.scatter(xs, ys, color=f"C{r}", s=12, label=label, marker="os^D"[k % 4])
                    continue
                marker = "o" if len(xs) <= 40 else None
                ax.plot(xs, ys, color=f"C{r}", linestyle=LINESTYLES[k % 4], marker=marker, markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel or x, fontsize=9)
        if x == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(rounds) > 1 or len(keys) > 1:
            ax.legend(fontsize=7)
    return png_base64(fig)


def png_base64(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def training_plots(sft: Rounds, rm: Rounds, ppo: Rounds) -> list[tuple[str, str | None]]:
    """[(caption, base64 PNG or None when its data is absent)] for the report's training section."""
    sft, rm, ppo = offset_steps(sft), offset_steps(rm), offset_steps(ppo)
    return [
        ("SFT: training and held-out loss", panel_figure(sft, [("loss", ["loss", "heldout_loss"])])),
        (
            "Reward model: training loss and accuracy on held-out and gold comparisons",
            panel_figure(
                rm, [("loss", ["loss"]), ("accuracy", ["train_accuracy", "heldout_accuracy", "gold_accuracy"])]
            ),
        ),
        (
            "PPO: mean reward-model score and mean gold (simulated panel) utility of the rollouts",
            panel_figure(ppo, [("reward (RM score)", ["reward"]), ("gold reward", ["gold_reward"])]),
        ),
        (
            "PPO: reward against the KL it cost (x = mean per-response KL to the reference policy, nats)",
            panel_figure(
                ppo,
                [("reward (RM score) vs KL", ["reward"]), ("gold reward vs KL", ["gold_reward"])],
                x="kl",
                xlabel="KL to reference (nats)",
            ),
        ),
        (
            "PPO: KL to the reference policy and the KL coefficient β",
            panel_figure(ppo, [("KL (nats)", ["kl"]), ("kl_coef", ["kl_coef"])]),
        ),
        (
            "PPO: response length (tokens) and share of responses that emit EOS",
            panel_figure(ppo, [("response length", ["response_length"]), ("EOS rate", ["eos_rate"])]),
        ),
    ]
