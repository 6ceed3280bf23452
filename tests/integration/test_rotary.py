"""The rotary kernel (`rlhf/models/rotary.c`) gives the bf16 rounding of transformers' float32 rotation and its
gradient, and takes transformers' place in Llama models under bf16 autocast only."""

import pytest
import torch
from transformers.models.llama import modeling_llama

from rlhf.models import rotary
from rlhf.models.load import load_causal_lm


@pytest.fixture
def kernel(monkeypatch, tmp_path):
    """The kernel built and loaded without the probe `kernel()` runs (which would hide a wrong result)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the kernel needs an x86-64 CPU with AVX2")
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    try:
        lib = rotary._bind(rotary.kernels.build(rotary.SOURCE, rotary.FLAGS))
    except FileNotFoundError as e:
        pytest.skip(f"no C compiler to build the kernel: {e}")
    monkeypatch.setattr(rotary, "kernel", lambda: lib)
    return lib


@pytest.mark.parametrize("rows_of_cos", [1, 3])
def test_the_kernel_rounds_transformers_rotation_and_back_propagates_it(kernel, rows_of_cos):
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, t, d = 3, 4, 2, 11, 32
    q = torch.randn(b, t, h, d, generator=gen).bfloat16().transpose(1, 2)  # as a projection's output is viewed
    k = torch.randn(b, t, hkv, d, generator=gen).bfloat16().transpose(1, 2)
    angles = torch.rand(rows_of_cos, t, d, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    q.requires_grad_(), k.requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        assert rotary.applies(q, k, cos, sin, 1)
        got_q, got_k = rotary.rotate(q, k, cos, sin)
    want_q, want_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)  # (outside autocast: transformers' own)
    assert want_q.dtype == torch.float32  # transformers' promotes; the attention casts it to bf16
    assert torch.equal(got_q, want_q.bfloat16()) and torch.equal(got_k, want_k.bfloat16())
    assert got_q.shape == q.shape and got_q.dtype == torch.bfloat16

    gq, gk = (torch.randn(x.shape, generator=gen).bfloat16() for x in (got_q, got_k))
    dq, dk = torch.autograd.grad((got_q, got_k), (q, k), (gq, gk))
    exact_q, exact_k = (x.detach().float().requires_grad_() for x in (q, k))
    ref_q, ref_k = rotary.reference(exact_q, cos, sin), rotary.reference(exact_k, cos, sin)
    ref_dq, ref_dk = torch.autograd.grad((ref_q, ref_k), (exact_q, exact_k), (gq.float(), gk.float()))
    assert dq.dtype == torch.bfloat16
    # rounded once from float32: within half a bf16 step of the float32 gradient
    torch.testing.assert_close(dq.float(), ref_dq, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(dk.float(), ref_dk, rtol=2**-8, atol=1e-6)


def test_llama_models_take_it_under_bf16_autocast_only(kernel, monkeypatch):
    model, _ = load_causal_lm("tiny")  # switches it in (rlhf/models/attention.py: use_small_attention)
    assert getattr(modeling_llama.apply_rotary_pos_emb, "_rlhf_rotary", False)
    calls = []
    run = rotary.rotate
    monkeypatch.setattr(rotary, "rotate", lambda *args: calls.append(1) or run(*args))
    ids = torch.randint(5, 200, (2, 9))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        assert not calls  # float32: transformers' own
        with torch.autocast("cpu", torch.bfloat16):
            mixed = model(input_ids=ids).logits
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(mixed.float(), plain, rtol=0.1, atol=0.1)  # bf16 of the same model
