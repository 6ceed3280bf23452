"""The rotary position embedding of bf16 queries and keys by a C kernel (`rotary.c`), where the attention multiplies
in bf16 anyway.

Under bf16 autocast a Llama block's queries and keys leave their projections in bf16 and meet float32 cos and sin:
transformers' `apply_rotary_pos_emb` computes in float32 (7 torch operations a tensor, ~10 more backward) and the
attention casts the result back to bf16. The kernel computes the same float32 expression per element and rounds it
to bf16 at once: outputs bit-identical to that cast, gradients rounded once instead of per term. `use_rotary_kernel`
puts it in place of transformers' function for Llama models; `RLHF_ROTARY_KERNEL=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from rlhf.runtime import kernels

SOURCE = Path(__file__).with_name("rotary.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off"]  # no fused multiply-adds: torch's products, then its sum


def applies(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    """bf16 queries and keys (B, H, T, D) under bf16 autocast on the CPU, float32 cos and sin (B or 1, T, D)."""
    return (
        unsqueeze_dim == 1
        and q.device.type == "cpu"
        and q.dtype == k.dtype == torch.bfloat16
        and cos.dtype == sin.dtype == torch.float32
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and q.dim() == k.dim() == 4
        and cos.dim() == 3
        and cos.shape == sin.shape
        and cos.shape[1:] == (q.shape[2], q.shape[3]) == (k.shape[2], k.shape[3])
        and cos.shape[0] in (1, q.shape[0])
        and q.shape[-1] % 2 == 0
        and kernel() is not None
    )


def rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated and rounded to bf16, each (B, H, T, D) (a view of a (B, T, H, D) tensor)."""
    return KernelRotary.apply(q, cos, sin), KernelRotary.apply(k, cos, sin)


def _table(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rotate(lib, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) bf16 rotated by the kernel into a new (B, T, H, D) bf16 tensor."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    b, h, t, d = x.shape
    y = torch.empty(b, t, h, d, dtype=torch.bfloat16)
    lib.rotary(
        x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), cos.data_ptr(), sin.data_ptr(),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), y.data_ptr(), b, h, t, d,
    )  # fmt: skip
    return y


def _swapped(sin: torch.Tensor) -> torch.Tensor:
    """[−sin2, −sin1]: the rotation by it is the transpose of the rotation by sin (the backward, to the same roundings:
    dx1 = dy1 · cos1 + dy2 · sin2, dx2 = dy2 · cos2 − dy1 · sin1)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., half:], -sin[..., :half]), dim=-1)


class KernelRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = _table(cos), _table(sin)
        ctx.save_for_backward(cos, sin)
        return _rotate(kernel(), x, cos, sin).transpose(1, 2)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(kernel(), dy.to(torch.bfloat16), cos, _swapped(sin)).transpose(1, 2), None, None


def use_rotary_kernel(model) -> bool:
    """Put the kernel in place of transformers' `apply_rotary_pos_emb` for `model`'s kind of Llama model (where it
    does not apply, the original runs); returns whether it is in place."""
    if getattr(model.config, "model_type", None) != "llama":
        return False
    import transformers.models.llama.modeling_llama as llama

    original = llama.apply_rotary_pos_emb
    if getattr(original, "_rlhf_rotary", False):
        return True

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if applies(q, k, cos, sin, unsqueeze_dim):
            return rotate(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._rlhf_rotary = True
    llama.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """`rotary.c` built, loaded and checked on a probe; None where it cannot serve (with a warning that says why) or
    does not apply (x86-64 Linux with AVX2 or AVX-512); `RLHF_ROTARY_KERNEL=0` turns it off."""
    if not kernels.wanted("RLHF_ROTARY_KERNEL"):
        return None
    instead = "the rotary embedding runs as transformers' float32 torch ops (slower)"
    wrong = "its rotation differs from transformers' on a probe"
    return kernels.load(SOURCE, FLAGS, _bind, _probe, instead, wrong)


def _bind(path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.rotary.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    lib.rotary.argtypes += [ctypes.c_void_p] + [ctypes.c_int64] * 4
    lib.rotary.restype = None
    return lib


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotation of x (B, H, T, D) in float32, as `apply_rotary_pos_emb` computes it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def _probe(lib) -> bool:
    """Whether the kernel's output is the bf16 rounding of transformers' float32 rotation, bit for bit, and its
    gradient that of autograd's to bf16 rounding, on 2 rows of 5 positions, 3 heads of 8, strided like a projection's
    output."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=gen).bfloat16().transpose(1, 2)
    cos, sin = torch.randn(1, 5, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)
    dy = torch.randn(2, 5, 3, 8, generator=gen).bfloat16()
    y = _rotate(lib, x, cos, sin)  # (B, T, H, D)
    dx = _rotate(lib, dy.transpose(1, 2), cos, _swapped(sin))  # the backward, as KernelRotary runs it
    leaf = x.float().requires_grad_()
    with torch.enable_grad():  # first asked for where autograd may be off
        reference(leaf, cos, sin).backward(dy.float().transpose(1, 2))
    exact = torch.equal(y.transpose(1, 2), reference(x, cos, sin).bfloat16())
    return exact and torch.allclose(dx.float().transpose(1, 2), leaf.grad, rtol=1e-2, atol=1e-2)
