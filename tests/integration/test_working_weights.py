"""bf16 working copies of the trained weights: the fused kernel steps as torch's AdamW does, PPO under bf16 autocast
trains what it trained without them, and a copy follows its float32 master (tiny models)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf.models.load import load_causal_lm
from rlhf.runtime import working_weights
from rlhf.runtime.working_weights import WorkingCopy, WorkingWeights, step_copies, weight_of


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """working_weights.library() decided again in this test (in a fresh cache folder), and again after it."""
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    working_weights.library.cache_clear()
    yield
    working_weights.library.cache_clear()


def kernel():
    """The kernel built and loaded without the probe that `library()` runs (which would hide a wrong result)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the kernel needs an x86-64 CPU with AVX2")
    try:
        return working_weights.bind(working_weights.kernels.build(working_weights.SOURCE, working_weights.FLAGS))
    except FileNotFoundError as e:
        pytest.skip(f"no C compiler to build the kernel: {e}")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_kernel_steps_as_torchs_fused_adamw_on_the_bf16_gradients_and_writes_the_copies(weight_decay):
    lib = kernel()
    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 11), (3000,), (64, 64)]  # vector tails, a block sum's tail (3000 = 2 · 1024 + 952)
    masters = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    references = [torch.nn.Parameter(m.detach().clone()) for m in masters]
    settings = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    ours = torch.optim.AdamW(masters, **settings)
    theirs = torch.optim.AdamW(references, **settings, fused=True)
    copies = [WorkingCopy(m) for m in masters]
    for step, scale in enumerate([1.0, 0.3, 0.7]):
        grads = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
        for c, g in zip(copies, grads, strict=True):
            c.copy.grad = g
        # the norm's pass: Σ g² of the bf16 gradients as float32 sums them
        want = sum(float(g.float().pow(2).sum()) for g in grads)
        got = WorkingWeights(copies, ours, lib).square_sum(copies)
        assert got == pytest.approx(want, rel=1e-6)
        step_copies(lib, ours, copies[: 2 if step == 1 else 3], scale)  # step 2 leaves the last weight out
        for r, g in zip(references, grads, strict=True):
            r.grad = g.float() * scale
        references[2].grad = None if step == 1 else references[2].grad
        theirs.step()
        for m, r, c in zip(masters, references, copies, strict=True):
            torch.testing.assert_close(m, r, rtol=1e-5, atol=1e-7)
            assert torch.equal(c.copy, m.detach().bfloat16())  # the copy is the cast of the new weight
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(ours.state[m][key], theirs.state[r][key], rtol=1e-4, atol=1e-6)
    assert float(ours.state[masters[2]]["step"]) == 2  # its step count moved only when it stepped
    assert all(m._version > 0 for m in masters)  # autograd sees the weights changed


def test_a_copy_follows_its_master_and_a_product_that_bypasses_it_is_an_error():
    if working_weights.library() is None:
        pytest.skip("the fused AdamW kernel is not available here")
    linear = torch.nn.Linear(8, 4, bias=False)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=0.1)
    working = WorkingWeights.install([linear], optimizer)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", torch.bfloat16):
        assert weight_of(linear) is working.copies[0].copy  # multiplied under bf16 autocast
        linear(x).float().sum().backward()
    assert linear.weight.grad is None and working.copies[0].copy.grad.dtype == torch.bfloat16
    assert weight_of(linear) is linear.weight  # outside autocast: the float32 weight itself
    with torch.no_grad():
        linear.weight.mul_(2)  # as a checkpoint loaded into the model would change it
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(weight_of(linear), (linear.weight * 1).bfloat16())
    linear(x).sum().backward()  # a float32 product: the master gets a gradient of its own
    with pytest.raises(RuntimeError, match="got a float32 gradient too"):
        working.pending()


def bf16_run(out, **overrides):
    """PPO on the tiny model under bf16 autocast with clipping that bites: 3 steps × 2 epochs of one update of one
    micro-batch. All its layers train by default (its tied head and embeddings too)."""
    from rlhf.config import PPOConfig

    settings = dict(epochs=0.06, batch_size=4, mini_batch_size=4, micro_batch_size=4, ppo_epochs=2, max_new_tokens=8)
    settings.update(mixed_precision="bf16", max_grad_norm=0.05, lr=1e-3, progress=False, **overrides)
    return PPOConfig(policy="tiny", reward="tiny", prompts="examples/prompts.jsonl", out=str(out), **settings)


def read_metrics(out, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.mark.parametrize("trainable_layers", [None, 1])
def test_ppo_with_working_copies_trains_what_autocast_alone_trains(
    tmp_path, monkeypatch, fresh_library, trainable_layers
):
    """One step of two updates: the same weights to float32 rounding. (Over more steps a last-bit difference flips
    the bf16 rounding of some activation, and Adam turns gradients that small into steps of a full learning rate:
    the runs part by ~1e-4 after 3 steps, both ways. Already after the first update the two AdamW implementations
    round one master weight of 200k to a different bf16 copy; the plain products' bf16 scores and float32 rotary
    embedding absorb that, the attention and rotary kernels carry it on (float32 scores, one rounding), and the
    runs then part by up to ~3e-5 at the second update, while after one update they agree to 7e-9 either way. So
    this test runs without those two kernels; their own tests check them against float64 and transformers.)"""
    from rlhf.models import attention_kernel, rotary
    from rlhf.stages import ppo

    monkeypatch.setattr(attention_kernel, "applies", lambda *args: False)
    monkeypatch.setattr(rotary, "applies", lambda *args: False)
    scales = []
    original = WorkingWeights.step

    def step(self, pending, scale):
        scales.append(scale)
        return original(self, pending, scale)

    monkeypatch.setattr(WorkingWeights, "step", step)

    def train(out, fused: bool):
        monkeypatch.setenv("RLHF_FUSED_ADAMW", "1" if fused else "0")
        working_weights.library.cache_clear()
        final = ppo.run(bf16_run(out, trainable_layers=trainable_layers, epochs=0.02))
        return load_file(final / "model.safetensors"), read_metrics(out, "grad_norm")

    if working_weights.library() is None:
        pytest.skip("the fused AdamW kernel is not available here")
    fused, fused_norms = train(tmp_path / "fused", True)
    assert len(scales) == 2 and max(scales) < 0.1  # both updates stepped the copies' masters, clipped
    plain, plain_norms = train(tmp_path / "plain", False)
    assert len(scales) == 2  # turned off: autocast's casts and torch's AdamW
    assert fused.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], rtol=0, atol=1e-7, msg=k)
    assert fused_norms == pytest.approx(plain_norms, rel=1e-6)
    start, _ = load_causal_lm("tiny")
    moved = [k for k, v in start.state_dict().items() if k in plain and not torch.equal(plain[k], v)]
    assert any("mlp" in k for k in moved) and any("self_attn" in k for k in moved)  # the copies' masters trained


def test_ppo_with_working_copies_resumes_where_it_stopped(tmp_path, fresh_library):
    """Adam's moments of the copies' masters are kept in the optimiser's state as torch keeps them: a run stopped
    after one step and resumed trains what an uninterrupted one does."""
    from rlhf.stages import ppo

    if working_weights.library() is None:
        pytest.skip("the fused AdamW kernel is not available here")
    straight = ppo.run(bf16_run(tmp_path / "straight", trainable_layers=1))
    ppo.run(bf16_run(tmp_path / "resumed", trainable_layers=1, stop_after_steps=1))
    resumed = ppo.run(bf16_run(tmp_path / "resumed", trainable_layers=1, resume=True))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_working_copies_apply_to_one_bf16_cpu_process_updating_one_micro_batch():
    from types import SimpleNamespace

    from rlhf.config import PPOConfig
    from rlhf.stages.ppo import working_copies_apply

    one = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    two = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    settings = dict(policy="tiny", reward="tiny", prompts="p.jsonl", out="o", mini_batch_size=8, micro_batch_size=8)
    assert working_copies_apply(PPOConfig(**settings, mixed_precision="bf16"), one)
    assert not working_copies_apply(PPOConfig(**settings, mixed_precision="no"), one)
    assert not working_copies_apply(PPOConfig(**settings, mixed_precision="bf16"), two)
    assert not working_copies_apply(PPOConfig(**settings, mixed_precision="bf16", lora=True), one)
    accumulating = {**settings, "micro_batch_size": 4}  # gradients would accumulate in bf16
    assert not working_copies_apply(PPOConfig(**accumulating, mixed_precision="bf16"), one)
