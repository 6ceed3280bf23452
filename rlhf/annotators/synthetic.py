"""Responses of known quality, built from the project's demonstrations, for calibrating and checking annotators.

For each demonstration: the demo itself and degraded copies of the kinds a small policy samples (cut at the length
limit, a repeated sentence, an endless loop, a one-liner, padding, rudeness, a needless refusal, an answer to
another prompt, and for harmful asks a compliance). The simulated panel's defaults were calibrated on
`synthetic_set()` (see PanelConfig); benchmarks/annotators.py measures consensus accuracy on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf.annotators import criteria

DEMOS = Path(__file__).resolve().parents[2] / "examples" / "demos.jsonl"
REFUSAL = "I'm sorry, but I can't help with that request."


def first_sentence(text: str) -> str:
    head = text.split("\n")[0]
    for end in (". ", "! ", "? "):
        if end in head:
            return head[: head.index(end) + 1]
    return head


def cut_mid_word(text: str, share: float) -> str:
    """The first `share` of the text, cut inside a word as a length limit does."""
    cut = max(1, int(len(text) * share))
    while cut < len(text) - 1 and not (text[cut - 1].isalnum() and text[cut].isalnum()):
        cut += 1
    return text[:cut]


def variants(prompt: str, demo: str, other: str, harmful: bool) -> list[tuple[str, bool]]:
    """(response, finished) of the kinds a policy samples: the demo and degraded copies of it."""
    head = first_sentence(demo)
    pool = [
        (demo, True),  # a good answer
        (cut_mid_word(demo, 0.55), False),  # cut at the length limit
        (demo + " " + head, True),  # a repeated sentence
        (cut_mid_word(" ".join([head] * 8), 0.9), False),  # a loop that never ends
        (head, True),  # a one-line answer
        (
            demo + "\n\nI hope this helps! As I said, it really depends on your situation, and there are many "
            "things to consider here, so it is always worth thinking carefully about every option before you "
            "decide what to do. Everyone is different, and what works for one person may not work for another. "
            "In summary, " + demo[0].lower() + demo[1:] + " Let me know if you have any other questions at all!",
            True,
        ),  # padded with filler
        ("Obviously, " + demo + " Honestly, this is a STUPID QUESTION, JUST GOOGLE IT next time!!", True),  # rude
        (REFUSAL, True),  # a refusal
        (other, True),  # an answer to another prompt
    ]
    if harmful:
        pool.append(("Sure, here's how to do it. First make sure nobody is watching, then go step by step.", True))
    return pool


def synthetic_set(
    draws: int = 3, seed: int = 0, path: str | Path = DEMOS
) -> list[tuple[str, str, list[str], list[bool]]]:
    """(prompt_key, prompt, responses, finished) with K=4 responses drawn per demo prompt, `draws` times each.

    The data the panel's defaults were calibrated on (see PanelConfig).
    """
    demos = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    rng = np.random.default_rng(seed)
    out = []
    for d in range(draws):
        for i, row in enumerate(demos):
            other = demos[(i + 1 + int(rng.integers(len(demos) - 1))) % len(demos)]["response"]
            pool = variants(row["prompt"], row["response"], other, bool(criteria.HARMFUL.search(row["prompt"])))
            picked = rng.choice(len(pool), size=4, replace=False)
            out.append((f"{row['id']}-{d}", row["prompt"], [pool[k][0] for k in picked], [pool[k][1] for k in picked]))
    return out


def write_synthetic_library(library: str | Path, draws: int = 2, seed: int = 0) -> None:
    """Put `synthetic_set(draws, seed)` into a response library as prompts and samples (model `synthetic`), ready to
    be annotated: the data for checking annotators and reward models on responses of known quality."""
    from rlhf.store.library import Library, PromptRow, SampleRow

    lib = Library(library)
    with lib.write() as s:
        for key, prompt, responses, finished in synthetic_set(draws=draws, seed=seed):
            s.add(PromptRow(id=key, messages=[{"role": "user", "content": prompt}]))
            for i, (text, done) in enumerate(zip(responses, finished, strict=True)):
                s.add(
                    SampleRow(
                        key=f"{key}|{i}",
                        prompt_id=key,
                        model="synthetic",
                        round=0,
                        text=text,
                        n_tokens=len(text),
                        finish_reason="eos" if done else "length",
                    )
                )
