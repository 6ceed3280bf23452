"""The PPO benchmark's FLOP count (benchmarks/ppo_vs_trl.py): partial last blocks and attention pairs, by hand."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ppo_vs_trl as bench  # noqa: E402


def test_the_count_follows_partial_last_blocks_and_attention_pairs():
    config = SimpleNamespace(
        hidden_size=4,
        intermediate_size=8,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=10,
    )
    fl = bench.model_flops(config)
    # q, o: 4×4; k, v: 4×2; gate, up, down: 4×8 → 2 · (32 + 16 + 96) per token; k and v alone 2 · 16
    assert fl == {"layer": 288, "kv": 32, "layers": 3, "head": 80, "pair": 16}
    run = dict(trainable_layers=1, value_trainable_layers=1, logprobs_from_sampling=True, ppo_epochs=1)
    prompt, response, shared, pairs, rows = 10.0, 6.0, 2.0, 50.0, 2
    got = bench.phase_flops(fl, prompt, response, run, shared, pairs, rows)
    tokens = prompt + response - shared  # 14 computed
    block = tokens * 288 + pairs * 16  # a whole block: its products and its attention
    # one trained block whose last (only) block computes keys and values everywhere, the rest at the 6 read
    # positions, and whose attention is not counted
    trained = tokens * 32 + response * (288 - 32)
    assert got["generate"] == 3 * block + response * 80
    # the two frozen bottom blocks (shared by policy and value model) once; the reference's trained block reads the
    # responses, the value model's too, the reward model's one position a row; the reference's head
    reward_model = tokens * 32 + rows * (288 - 32)
    assert got["score"] == 2 * block + trained + trained + reward_model + response * 80
    # log-probs from sampling: the value model's scoring forward is reused; policy forward + both backwards (2×)
    assert got["train"] == trained + 2 * (trained + trained) + response * 80 * (1 + 1)
    assert got["train"] == pytest.approx(5 * 14 * 32 + 5 * 6 * 256 + 960)  # 5 trained-block passes
