"""`small_attention` computes grouped-query attention as the plain definition does, hands what it does not pay for to
transformers' SDPA attention unchanged, and is what loaded models run (without being saved into them)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rlhf.models import attention, attention_kernel
from rlhf.models.attention import ATTENTION, small_attention
from rlhf.models.load import load_causal_lm
from rlhf.models.reward import load_reward_model


class Module:  # what an attention function reads of its transformers module
    is_causal = True
    num_key_value_groups = 2


def inputs(b=3, h=4, hkv=2, tq=7, tk=7, d=16, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, t, d, generator=gen).to(dtype) for n, t in ((h, tq), (hkv, tk), (hkv, tk)))
    return q, k, v


def left_padded_causal(pads: list[int], t: int) -> torch.Tensor:
    """SDPA's boolean mask (B, 1, T, T) for left-padded rows: True = attend."""
    keys = torch.arange(t)[None, :] >= torch.tensor(pads)[:, None]  # (B, T): real key positions
    return torch.ones(t, t, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]


def reference(q, k, v, mask):
    """The definition, one query head at a time, in float64: head h reads key/value head h // (H / Hkv)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for h in range(q.shape[1]):
        scores = q[:, h] @ k[:, h // g].transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, Tq, Tk)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        out[:, h] = torch.softmax(scores, -1) @ v[:, h // g]
    return out.transpose(1, 2)  # (B, Tq, H, D)


@pytest.fixture(params=["kernel", "plain products"])
def path(request, monkeypatch):
    """Each test twice: through the C kernel (where this CPU has AVX512-BF16; it must then run) and through the plain
    torch products."""
    if request.param == "plain products":
        monkeypatch.setattr(attention_kernel, "applies", lambda *args: False)
        yield []
        return
    if attention_kernel.kernel() is None:
        pytest.skip("the attention kernel needs a CPU with AVX512-BF16 and a C compiler")
    calls = []
    run = attention_kernel.attention
    monkeypatch.setattr(attention_kernel, "attention", lambda *args: calls.append(1) or run(*args))
    yield calls
    assert calls, "the kernel did not run"


@pytest.fixture
def no_sdpa(monkeypatch):
    """Fail if small_attention hands the call to SDPA: the plain products must have run."""

    def refuse(*args, **kwargs):
        raise AssertionError("handed to SDPA")

    monkeypatch.setattr(attention, "sdpa_attention_forward", refuse)


def test_plain_products_compute_grouped_attention_with_the_padding_mask_and_its_gradients(no_sdpa, path):
    q, k, v = (x.requires_grad_() for x in inputs())
    mask = left_padded_causal([0, 2, 5], 7)
    out, _ = small_attention(Module(), q, k, v, mask)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 7, 4, 16)
    real = mask[:, 0].any(-1)  # (B, Tq): query positions with something to attend to
    want = reference(q.detach(), k.detach(), v.detach(), mask)
    torch.testing.assert_close(out.double()[real], want[real], rtol=0.02, atol=0.02)
    # gradients of a loss on the real positions, against float64 autograd of the definition
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) * real[:, :, None, None]
    (out.float() * weights).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    anything = mask | ~mask.any(-1, keepdim=True)  # rows that see only padding: any finite value (weight 0)
    (reference(q64, k64, v64, anything) * weights.double()).sum().backward()
    for got, exact in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), exact, rtol=0.03, atol=0.03)


def test_no_mask_means_causal_for_a_full_square_and_everything_for_one_query(no_sdpa, path):
    q, k, v = inputs(tq=5, tk=5)
    out, _ = small_attention(Module(), q, k, v, None)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(3, 1, 5, 5)
    torch.testing.assert_close(out.double(), reference(q, k, v, causal), rtol=0.02, atol=0.02)
    bidirectional = type("Encoder", (Module,), {"is_causal": False})()
    out, _ = small_attention(bidirectional, q, k, v, None)
    torch.testing.assert_close(out.double(), reference(q, k, v, None), rtol=0.02, atol=0.02)


def test_a_position_with_nothing_to_attend_to_stays_finite(no_sdpa, path):
    q, k, v = inputs()
    mask = left_padded_causal([3, 0, 0], 7)  # row 0: query positions 0-2 see only padding
    assert not mask[0, 0, 0].any()
    out, _ = small_attention(Module(), q, k, v, mask)
    assert torch.isfinite(out.float()).all()


def test_under_autocast_float32_queries_and_keys_run_the_plain_products_in_the_autocast_dtype(no_sdpa, path):
    """A float32 model under bf16 autocast: q and k leave the rotary embedding in float32, v the projection in bf16.
    SDPA would cast them to bf16 and so does small_attention, with the same result to rounding."""
    q, k, v = inputs(dtype=torch.float32)
    v = v.to(torch.bfloat16)
    mask = left_padded_causal([0, 2, 5], 7)
    with torch.autocast("cpu", torch.bfloat16):
        out, _ = small_attention(Module(), q, k, v, mask)
    assert out.dtype == torch.bfloat16
    real = mask[:, 0].any(-1)
    want = reference(q.to(torch.bfloat16), k.to(torch.bfloat16), v, mask)
    torch.testing.assert_close(out.double()[real], want[real], rtol=0.02, atol=0.02)


def test_the_kernel_is_at_least_as_close_to_float64_as_the_plain_products(monkeypatch):
    """At a PPO update's shape (8 left-padded rows of 90 tokens, 9 query heads over 3 key/value heads of 64), in the
    layout the padding-free trunk gives it: its output and gradients are no further from float64 attention's than
    those of the plain products (which multiply the probabilities in float32)."""
    if attention_kernel.kernel() is None:
        pytest.skip("the attention kernel needs a CPU with AVX512-BF16 and a C compiler")
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, t, d = 8, 9, 3, 90, 64
    q, k, v = (torch.randn(b, t, n, d, generator=gen).bfloat16().transpose(1, 2) for n in (h, hkv, hkv))
    mask = left_padded_causal([0, 3, 10, 17, 30, 41, 52, 60], t) | torch.eye(t, dtype=torch.bool)
    dout = torch.randn(b, t, h, d, generator=gen).bfloat16()
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = attention_kernel.reference(*leaves, mask[:, 0], d**-0.5)
    want.backward(dout.double())

    def errors(kernel_on: bool) -> list[float]:
        monkeypatch.setattr(attention_kernel, "applies", lambda *args: kernel_on)
        runs = attention_kernel.attention if kernel_on else None
        calls = []
        monkeypatch.setattr(attention_kernel, "attention", lambda *args: calls.append(1) or runs(*args))
        xs = [x.detach().requires_grad_() for x in (q, k, v)]
        out, _ = small_attention(Module(), *xs, mask)
        out.backward(dout)
        assert bool(calls) == kernel_on
        pairs = [(out.detach(), want.detach())] + [(x.grad, leaf.grad) for x, leaf in zip(xs, leaves, strict=True)]
        return [float((got.double() - exact).norm() / exact.norm()) for got, exact in pairs]

    kernel, plain = errors(True), errors(False)
    assert all(e < 0.01 for e in kernel), kernel
    assert all(ek <= 1.05 * ep for ek, ep in zip(kernel, plain, strict=True)), (kernel, plain)


@pytest.mark.parametrize(
    "case",
    ["float32", "one query", "too many scores", "no mask, queries after a cache"],
)
def test_what_does_not_pay_goes_to_sdpa_unchanged(case, monkeypatch):
    q, k, v = inputs(dtype=torch.float32 if case == "float32" else torch.bfloat16)
    mask = left_padded_causal([0, 2, 5], 7)
    if case == "one query":
        q, mask = q[:, :, -1:], mask[:, :, -1:]
    if case == "too many scores":
        monkeypatch.setattr(attention, "MAX_SCORES", 3 * 4 * 7 * 7 - 1)
    if case == "no mask, queries after a cache":
        q, mask = q[:, :, -3:], None  # 3 queries, 7 keys: where the causal diagonal lies is SDPA's to decide
    got, _ = small_attention(Module(), q, k, v, mask)
    want, _ = sdpa_attention_forward(Module(), q, k, v, mask)
    assert torch.equal(got, want)


def test_loaded_models_run_it_and_saved_models_do_not_record_it(tmp_path):
    policy, tokenizer = load_causal_lm("tiny")
    reward_model, _ = load_reward_model("tiny")
    assert policy.config._attn_implementation == ATTENTION
    assert reward_model.config._attn_implementation == ATTENTION
    ids = torch.randint(5, 200, (3, 11))
    mask = (torch.arange(11) >= torch.tensor([[3], [0], [6]])).long()
    kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
    with torch.autocast("cpu", torch.bfloat16):
        ours = policy(input_ids=ids, **kwargs).logits
        policy.set_attn_implementation("sdpa")
        fused = policy(input_ids=ids, **kwargs).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real].float(), fused[real].float(), rtol=0.05, atol=0.05)
    policy.set_attn_implementation(ATTENTION)
    policy.save_pretrained(tmp_path)
    assert ATTENTION not in (tmp_path / "config.json").read_text()
    assert "_attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # what anyone else loads: transformers' own attention
    assert again.config._attn_implementation != ATTENTION
