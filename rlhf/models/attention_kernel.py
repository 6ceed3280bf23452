"""`small_attention`'s products in one C kernel, on CPUs with AVX512-BF16 (`attention_kernel.c`).

The plain products (rlhf/models/attention.py) run the attention of a PPO update as ~15 torch operations a layer,
three of them float32 products (the probabilities times the values, and two in the backward), which multiply at a
quarter of bf16's rate on such a CPU: 2.3–2.5 ms for forward and backward of 8 rows × 90 tokens, 9 query heads over
3 key/value heads of 64 (the embedded model's layer), against ~0.5 ms that the products themselves need. The
kernel computes a (row, key/value head) pair's scores, softmax and products with the scores in registers and
cache: ~0.45 ms forward and ~0.65 backward there, and closer to float32's results (the float32 factors are carried
in two bf16 parts). `RLHF_ATTENTION_KERNEL=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from rlhf.runtime import kernels

SOURCE = Path(__file__).with_name("attention_kernel.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-fno-math-errno"]


def padded(length: int) -> int:
    """The kernel's row length for `length` keys: rounded up to 16 (one vector of floats)."""
    return (length + 15) // 16 * 16


def applies(query: torch.Tensor, key: torch.Tensor, attention_mask, causal: bool) -> bool:
    """Whether the kernel computes this attention: bf16 on the CPU, as many queries as keys, a head size that is a
    multiple of 16, and a boolean mask (or none, causal)."""
    b, h, t, d = query.shape
    if attention_mask is None and not causal:
        return False
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return False
    return (
        query.dtype == key.dtype == torch.bfloat16
        and query.device.type == "cpu"
        and key.shape[2] == t
        and d % 16 == 0
        and h % key.shape[1] == 0
        and kernel() is not None
    )


def attention(query, key, value, attention_mask, causal: bool, scaling: float) -> torch.Tensor:
    """softmax(scaling · Q Kᵀ + mask) V for query (B, H, T, D) and key, value (B, Hkv, T, D) bf16 (`applies`);
    returns (B, T, H, D) bf16."""
    b, _, t, _ = query.shape
    allowed = torch.zeros(b, t, padded(t), dtype=torch.uint8)
    if attention_mask is None:
        allowed[:, :, :t] = torch.ones(t, t, dtype=torch.bool).tril()
    else:
        allowed[:, :, :t] = attention_mask.expand(b, 1, t, t)[:, 0]
    query, key, value = (_usable(x) for x in (query, key, value))
    if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
        return KernelAttention.apply(query, key, value, allowed, scaling)
    return _forward(query, key, value, allowed, scaling, keep=False)[0]


def _usable(x: torch.Tensor) -> torch.Tensor:
    """x with its head dimension contiguous and every stride even (pairs of bf16 read as 32-bit words)."""
    if x.stride(-1) != 1 or any(s % 2 for s in x.stride()[:-1]) or x.data_ptr() % 4:
        return x.contiguous()
    return x


def _strides(x: torch.Tensor) -> list[int]:
    return list(x.stride()[:3])


def _forward(q, k, v, allowed, scaling: float, keep: bool):
    b, h, t, d = q.shape
    out = torch.empty(b, t, h, d, dtype=torch.bfloat16)
    P = torch.empty(b, h, t, padded(t)) if keep else None
    failed = kernel().attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), allowed.data_ptr(), out.data_ptr(), P.data_ptr() if keep else None,
        b, h, k.shape[1], t, d, scaling, *_strides(q), *_strides(k), *_strides(v),
    )  # fmt: skip
    if failed:
        raise MemoryError("attention_forward: no scratch memory")
    return out, P


class KernelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, allowed, scaling: float):
        out, P = _forward(q, k, v, allowed, scaling, keep=True)
        ctx.save_for_backward(q, k, v, P)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, P = ctx.saved_tensors
        b, h, t, d = q.shape
        hkv = k.shape[1]
        dout = dout.to(torch.bfloat16).contiguous()
        dq = torch.empty(b, t, h, d, dtype=torch.bfloat16)
        dk, dv = torch.empty(b, t, hkv, d, dtype=torch.bfloat16), torch.empty(b, t, hkv, d, dtype=torch.bfloat16)
        failed = kernel().attention_backward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), P.data_ptr(), dout.data_ptr(), dq.data_ptr(), dk.data_ptr(),
            dv.data_ptr(), b, h, hkv, t, d, ctx.scaling, *_strides(q), *_strides(k), *_strides(v),
        )  # fmt: skip
        if failed:
            raise MemoryError("attention_backward: no scratch memory")
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """`attention_kernel.c` built, loaded and checked on a probe; None where it cannot serve (with a warning that
    says why) or does not apply (Linux on a CPU with AVX512-BF16); `RLHF_ATTENTION_KERNEL=0` turns it off."""
    if not kernels.wanted("RLHF_ATTENTION_KERNEL") or "avx512_bf16" not in kernels.cpu_flags():
        return None
    instead = "attention runs as plain torch products (slower)"
    wrong = "its outputs or gradients differ from float64 attention's on a probe"
    return kernels.load(SOURCE, FLAGS, _bind, _probe, instead, wrong)


def _bind(path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.attention_forward.argtypes = (
        [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_float] + [ctypes.c_int64] * 9
    )
    lib.attention_backward.argtypes = (
        [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 5 + [ctypes.c_float] + [ctypes.c_int64] * 9
    )
    lib.attention_forward.restype = lib.attention_backward.restype = ctypes.c_int
    return lib


def reference(query, key, value, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """The attention in float64 from the same inputs, (B, T, H, D): what the kernel approximates. `allowed` is
    (B, T, T) bool."""
    g = query.shape[1] // key.shape[1]
    q, k, v = query.double(), key.double().repeat_interleave(g, 1), value.double().repeat_interleave(g, 1)
    scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~allowed[:, None], float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


def _probe(lib) -> bool:
    """Whether the kernel's output and gradients match float64 attention's to bf16 rounding, on 2 rows of 21 tokens
    (one left-padded), 4 query heads over 2 key/value heads of 16."""
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, t, d = 2, 4, 2, 21, 16
    q, k, v = (torch.randn(b, n, t, d, generator=gen).bfloat16() for n in (h, hkv, hkv))
    allowed = torch.ones(t, t, dtype=torch.bool).tril().repeat(b, 1, 1)
    allowed[1, :, :5] = False
    allowed[1] |= torch.eye(t, dtype=torch.bool)  # a padding position attends to itself
    mask = torch.zeros(b, t, padded(t), dtype=torch.uint8)
    mask[:, :, :t] = allowed
    dout = torch.randn(b, t, h, d, generator=gen).bfloat16()
    ptrs = lambda *xs: [x.data_ptr() for x in xs]  # noqa: E731
    dims = [b, h, hkv, t, d, d**-0.5, *_strides(q), *_strides(k), *_strides(v)]
    out, P = torch.empty(b, t, h, d, dtype=torch.bfloat16), torch.empty(b, h, t, padded(t))
    dq = torch.empty(b, t, h, d, dtype=torch.bfloat16)
    dk, dv = torch.empty(b, t, hkv, d, dtype=torch.bfloat16), torch.empty(b, t, hkv, d, dtype=torch.bfloat16)
    if lib.attention_forward(*ptrs(q, k, v, mask, out, P), *dims) or lib.attention_backward(
        *ptrs(q, k, v, P, dout, dq, dk, dv), *dims
    ):
        return False
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    with torch.enable_grad():  # first asked for where autograd may be off
        want = reference(*leaves, allowed, d**-0.5)
        want.backward(dout.double())
    close = functools.partial(torch.allclose, rtol=2e-2, atol=2e-2)
    grads = (dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2))
    return close(out.double(), want.detach()) and all(
        close(got.double(), leaf.grad) for got, leaf in zip(grads, leaves, strict=True)
    )
