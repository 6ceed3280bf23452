"""PPO, evaluation, the pipeline and the report on the tiny model, through the real command line."""

import json
import math

import pytest
import torch
from conftest import read_metrics, run_cli
from safetensors.torch import load_file

from rlhf.config import PPOConfig
from rlhf.models import thin
from rlhf.models.load import load_causal_lm
from rlhf.models.policy_value import PolicyAndValue
from rlhf.models.reward import load_reward_model
from rlhf.stages.ppo import response_logprobs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The `tiny` pipeline end to end, two rounds: SFT → (sample → annotate → filter → RM → PPO → eval) × 2 →
    report."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    proc = run_cli("pipeline", "tiny", "--out", str(out), "--rounds", "2")
    return out, proc


def stage_metrics(run_dir, stage: str, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["stage"] == stage and key in r]


def test_tiny_pipeline_trains_ppo_against_the_reward_model(tiny_run):
    out, proc = tiny_run
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "final" / "rlhf_stage.json").is_file()
    reward = stage_metrics(out, "ppo", "reward")
    third = len(reward) // 3
    assert len(reward) >= 9
    # the reward model's score of the rollouts rises while PPO optimises it
    assert sum(reward[-third:]) / third > sum(reward[:third]) / third
    kl = stage_metrics(out, "ppo", "kl")
    assert kl[0] == pytest.approx(0.0, abs=1e-4)  # the first rollouts come from the reference policy itself
    assert max(kl) > 0
    for key in ("gold_reward", "entropy", "eos_rate", "policy_clipfrac", "value_loss", "explained_variance"):
        assert read_metrics(out, key), key
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert set(summary["win_rates"]) == {"rm", "gold"}
    rm = summary["win_rates"]["rm"]
    assert rm["rate"] > 0.5  # the trained policy beats SFT by the reward model it was trained on
    assert rm["low"] <= rm["rate"] <= rm["high"]
    assert rm["wins"] + rm["ties"] + rm["losses"] == rm["n"] == 16
    assert summary["kl_to_reference"]["a"] == pytest.approx(0.0, abs=1e-4)
    assert summary["kl_to_reference"]["b"] > 0
    html = (out / "report.html").read_text()
    assert f"{rm['rate']:.1%}" in html and f"{summary['win_rates']['gold']['rate']:.1%}" in html
    assert "pipeline: done" in proc.stdout


def test_a_second_round_samples_from_the_ppo_policy_and_retrains_on_everything(tiny_run):
    from rlhf.store.library import Library

    out, _ = tiny_run
    lib = Library(out / "library.db")
    models = {s.round: s.model for s in lib.samples()}
    assert models == {0: str(out / "sft" / "final"), 1: str(out / "ppo" / "final")}
    assert {r.task_key for r in lib.rankings()} == {"r0", "r1"}
    rm0 = json.loads((out / "rm" / "final" / "rlhf_stage.json").read_text())
    rm1 = json.loads((out / "rm-r1" / "final" / "rlhf_stage.json").read_text())
    assert rm1["heldout"]["heldout_pairs"] > rm0["heldout"]["heldout_pairs"]  # round 1 adds ranked prompts
    config = (out / "config.yaml").read_text()
    assert "ppo-r1:" in config and f"policy: {out / 'ppo' / 'final'}" in config
    assert f"reference: {out / 'sft' / 'final'}" in config  # the KL stays measured against the SFT policy
    assert stage_metrics(out, "ppo-r1", "reward")
    assert json.loads((out / "eval-r1" / "summary.json").read_text())["b"] == str(out / "ppo-r1" / "final")
    assert "ppo-r1" in (out / "report.html").read_text()


def test_eval_asks_the_judge_with_alternating_order(tiny_run, tmp_path, server):
    out = tiny_run[0]
    server.reply("The first is better.\nRANKING: 1 > 2")  # a judge that always prefers what it sees first
    run_cli(
        "eval",
        "--a",
        str(out / "sft" / "final"),
        "--b",
        str(out / "ppo" / "final"),
        "--prompts",
        str(out / "prompts.heldout.jsonl"),
        "--limit",
        "6",
        "--max-new-tokens",
        "8",
        "--judge-base-url",
        server.base_url,
        "--judge-model",
        "judge",
        "--out",
        str(tmp_path / "eval"),
        "--no-progress",
    )
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    judge = summary["win_rates"]["judge"]
    # shown A first on even prompts and B first on odd ones, a position-biased judge splits evenly
    assert (judge["wins"], judge["losses"], judge["rate"]) == (3, 3, 0.5)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert [r["judge"] for r in rows] == ["a", "b"] * 3
    assert len(server.requests) == 6


def test_pipeline_rerun_skips_every_completed_stage(tiny_run):
    out, _ = tiny_run
    before = (out / "ppo" / "final" / "model.safetensors").stat().st_mtime_ns
    proc = run_cli("pipeline", "tiny", "--out", str(out))
    assert "already complete" in proc.stdout
    assert "generating for 0" in proc.stdout and "0 tasks to rank" in proc.stdout
    assert (out / "ppo" / "final" / "model.safetensors").stat().st_mtime_ns == before
    assert len(json.loads((out / "timings.json").read_text())) == 2


def ppo_args(tiny_run, out, *extra):
    run = tiny_run[0]
    return [
        "ppo",
        "--policy",
        str(run / "sft" / "final"),
        "--reward",
        str(run / "rm" / "final"),
        "--prompts",
        str(run / "prompts.train.jsonl"),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--mini-batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--max-new-tokens",
        "16",
        "--max-prompt-len",
        "512",
        "--lr",
        "1e-3",
        "--epochs",
        "0.17",  # ceil(0.17 · 184 prompts / 8) = 4 PPO steps
        "--adaptive-kl",
        "--reward-normalize",
        "--no-progress",
        *extra,
    ]


def test_ppo_resume_equals_uninterrupted(tiny_run, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(*ppo_args(tiny_run, straight))
    run_cli(*ppo_args(tiny_run, resumed, "--stop-after-steps", "2"))
    assert not (resumed / "ppo" / "final").exists()
    run_cli(*ppo_args(tiny_run, resumed, "--resume"))
    a = load_file(straight / "ppo" / "final" / "model.safetensors")
    b = load_file(resumed / "ppo" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # the adaptive KL coefficient and the reward statistics came back too: the logs of the last steps agree
    for key in ("kl_coef", "score", "reward"):
        assert read_metrics(straight, key)[-2:] == pytest.approx(read_metrics(resumed, key)[-2:], abs=1e-6)
    kl_coef = read_metrics(straight, "kl_coef")
    assert kl_coef[-1] != kl_coef[0]  # adaptive: it moved


def test_ppo_with_lora_uses_the_base_as_reference_and_ptx(tiny_run, tmp_path):
    out = tmp_path / "lora"
    proc = run_cli(
        *ppo_args(tiny_run, out, "--lora", "--ptx-coef", "0.5", "--ptx-data", "examples/demos.jsonl"),
    )
    assert "(adapters off)" in proc.stdout
    assert read_metrics(out, "kl")[0] == pytest.approx(0.0, abs=1e-4)
    assert all(math.isfinite(v) for v in read_metrics(out, "ptx_loss"))
    model, _ = load_causal_lm(str(out / "ppo" / "final"))  # merged: a plain transformers model
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize(("value_init", "precision"), [("reward", "no"), ("policy", "bf16")])
def test_ppo_top_layers_share_and_replay_the_frozen_bottom(tiny_run, tmp_path, value_init, precision):
    out = tmp_path / "top"
    extra = ("--trainable-layers", "1", "--mixed-precision", precision, "--value-init", value_init)
    proc = run_cli(*ppo_args(tiny_run, out, *extra))
    assert "frozen parameters shared, not copied" in proc.stdout
    # and that bottom runs once per step, replayed for the log-probs, the reference and every update; a value model
    # started from the policy holds the policy's very bottom, so one forward serves both
    assert "replayed: policy 1 blocks (shared by the reference), value model 1 blocks" in proc.stdout
    assert ("(the policy's own: computed once for both)" in proc.stdout) == (value_init == "policy")
    # sampling casts the policy as the lean decoder packs it; the frozen bottom and head are packed once a run
    in_precision = "bf16" if precision == "bf16" else "its precision"
    kernel = ", float32 products by the AVX2 kernel" if precision != "bf16" and thin.available() else ""
    assert (
        f"decoded from the policy itself in {in_precision} (no copy{kernel}); packed once for the run: 1 frozen "
        "blocks and the head" in proc.stdout
    )
    # and decoding computes the frozen bottom's output, which scoring reads instead of running the bottom again
    assert "the frozen bottom's output (1 blocks) kept from decoding" in proc.stdout
    # the reference shares the policy's bottom and still is the SFT model: the first rollouts have KL 0
    assert read_metrics(out, "kl")[0] == pytest.approx(0.0, abs=1e-4)
    sft = load_file(tiny_run[0] / "sft" / "final" / "model.safetensors")
    ppo = load_file(out / "ppo" / "final" / "model.safetensors")
    for k in sft:
        moved = not torch.equal(sft[k], ppo[k])
        assert moved == k.startswith(("model.layers.1.", "model.norm.")), k


def test_ppo_stops_with_a_clear_message_after_non_finite_rewards(tiny_run, tmp_path):
    broken = tmp_path / "nan-rm"
    model, tok = load_reward_model(str(tiny_run[0] / "rm" / "final"))
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    tok.save_pretrained(broken)
    no_penalty = tmp_path / "ppo.yaml"
    no_penalty.write_text("eos_penalty: null\n")  # else the EOS penalty would replace the NaN scores of cut responses
    args = ppo_args(tiny_run, tmp_path / "out", "--max-non-finite", "2", "--config", str(no_penalty))
    args[args.index("--reward") + 1] = str(broken)
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2
    assert "2 updates in a row were skipped for non-finite values" in proc.stderr
    assert read_metrics(tmp_path / "out", "non_finite_skips") == [1.0]


def test_response_logprobs_do_not_depend_on_padding():
    policy, tok = load_causal_lm("tiny")
    value, _ = load_reward_model("tiny")
    model = PolicyAndValue(policy, value).eval()
    pad = tok.pad_token_id
    prompt, response = [5, 6, 7, 8], [20, 21, 22, tok.eos_token_id]
    alone_ids = torch.tensor([prompt + response])
    alone = response_logprobs(model(alone_ids, torch.ones_like(alone_ids), 4)[0], alone_ids, 4)
    # in a batch: 3 pads left of the prompt (a longer prompt beside it), 2 pads after the response
    other = [9, 10, 11, 12, 13, 14, 15] + [30, 31, 32, 33, 34, 35]
    ids = torch.tensor([[pad] * 3 + prompt + response + [pad] * 2, other])
    mask = torch.tensor([[0] * 3 + [1] * 8 + [0] * 2, [1] * 13])
    batched = response_logprobs(model(ids, mask, 7)[0], ids, 7)
    torch.testing.assert_close(batched[0, :4], alone[0], rtol=0, atol=1e-5)
    # the values too
    _, v_alone = model(alone_ids, torch.ones_like(alone_ids), 4)
    _, v_batched = model(ids, mask, 7)
    torch.testing.assert_close(v_batched[0, :4], v_alone[0], rtol=0, atol=1e-5)


def test_ppo_config_explains_inconsistent_batch_sizes():
    from rlhf.config import ConfigError, build

    with pytest.raises(ConfigError, match=r"batch_size \(12\) must be a multiple of mini_batch_size \(8\)"):
        build(PPOConfig, {"reward": "x", "batch_size": 12, "mini_batch_size": 8})
    with pytest.raises(ConfigError, match="--reward"):
        build(PPOConfig, {})
    with pytest.raises(ConfigError, match="--ptx-data"):
        build(PPOConfig, {"reward": "x", "ptx_coef": 0.1})
    with pytest.raises(ConfigError, match="value_trainable_layers must be at least 1, and cannot be combined"):
        build(PPOConfig, {"reward": "x", "value_trainable_layers": 2, "lora": True})
