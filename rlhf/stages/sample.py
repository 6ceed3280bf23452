"""Stage 2a: the policy writes K responses per prompt into the response library.

Resumable and idempotent: each sample has a key (round, model, prompt, index); a prompt with all K keys present is
skipped, and each batch of prompts is written in one transaction, so a run killed between batches re-runs only
the missing batches. Batches are seeded from the seed and their prompt ids, and the batches still to do are the
same ones an uninterrupted run would have done, so the resumed library holds the same rows.
"""

from __future__ import annotations

import hashlib

import torch
from tqdm.auto import tqdm

from rlhf.config import SampleConfig
from rlhf.data.records import read_prompts
from rlhf.models.generation import SamplingConfig, generate_batch
from rlhf.models.load import load_causal_lm
from rlhf.store.library import Library, SampleRow


def sample_key(round: int, model: str, prompt_id: str, index: int) -> str:
    return f"r{round}|{model}|{prompt_id}|{index}"


def batch_seed(seed: int, prompt_ids: list[str]) -> int:
    digest = hashlib.sha256("\n".join([str(seed), *prompt_ids]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def run(cfg: SampleConfig) -> dict:
    cfg.validate()
    library = Library(cfg.library)
    prompts = read_prompts(cfg.prompts)[: cfg.limit]
    new_prompts = library.add_prompts(prompts, source=str(cfg.prompts))

    # 1. which prompts still lack some of their K samples for this (round, model)
    done = library.sample_keys(prefix=f"r{cfg.round}|{cfg.model}|")
    todo = [p for p in prompts if any(sample_key(cfg.round, cfg.model, p.id, i) not in done for i in range(cfg.k))]
    print(
        f"sample: {len(prompts)} prompts ({new_prompts} new to the library), {len(prompts) - len(todo)} already "
        f"have {cfg.k} samples from {cfg.model} in round {cfg.round}; generating for {len(todo)}"
    )
    if not todo:
        return {"prompts": len(prompts), "generated": 0}

    # 2. generate batch by batch, one transaction per batch
    model, tokenizer = load_causal_lm(cfg.model)
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    written = n_eos = 0
    bar = tqdm(total=len(todo), desc="sample", unit="prompt", disable=not cfg.progress)
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start : start + cfg.batch_size]
        torch.manual_seed(batch_seed(cfg.seed, [p.id for p in batch]))
        outs = generate_batch(model, tokenizer, [list(p.messages) for p in batch], sampling, n=cfg.k)
        with library.write() as s:
            for b, p in enumerate(batch):
                for i in range(cfg.k):
                    key = sample_key(cfg.round, cfg.model, p.id, i)
                    if key in done:
                        continue
                    g = outs[b * cfg.k + i]
                    s.add(
                        SampleRow(
                            key=key,
                            prompt_id=p.id,
                            model=cfg.model,
                            round=cfg.round,
                            text=g.text,
                            n_tokens=g.n_tokens,
                            finish_reason="eos" if g.finished else "length",
                        )
                    )
                    written += 1
                    n_eos += g.finished
        bar.update(len(batch))
        bar.set_postfix(samples=written, eos=f"{n_eos / max(written, 1):.0%}")
    bar.close()
    print(f"sample: wrote {written} samples to {cfg.library}; {n_eos / max(written, 1):.0%} ended with EOS")
    return {"prompts": len(prompts), "generated": written, "eos_rate": n_eos / max(written, 1)}
