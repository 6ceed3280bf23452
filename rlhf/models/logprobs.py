"""Log-probabilities of chosen tokens over a large vocabulary, by a C kernel on x86-64 CPUs.

`rlhf.algos.ppo.logprobs_from_logits` is the definition (torch ops, any device). On a CPU its forward makes float32
copies of the (B, T, V) logits and of their log-softmax (kept for the backward: 50 MB for 8 × 32 positions of a
49k vocabulary), and forward + backward pass over them ~7 times: ~12 ms for those 256 rows on a 2-core CPU, where
a PPO step of the demo settings runs the forward 3 times and the backward twice. `label_logprobs.c` reads each row
twice while it is in the cache, keeps one number a row (its log-sum-exp) and writes the gradient once, in the
logits' dtype.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from rlhf.algos.ppo import logprobs_from_logits
from rlhf.runtime import kernels

SOURCE = Path(__file__).with_name("label_logprobs.c")
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] in float32: logits (B, T, V), labels (B, T) -> (B, T); the kernel where it serves
    (float32 or bf16 logits on the CPU), else `logprobs_from_logits`. Equal to it to float32 rounding."""
    if logits.device.type != "cpu" or logits.dtype not in _SUFFIX or logits.shape[-1] == 0 or kernel() is None:
        return logprobs_from_logits(logits, labels)
    return KernelLabelLogprobs.apply(logits, labels.long())


class KernelLabelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = logits.detach().contiguous()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= z.shape[-1]):
            raise IndexError(f"label_logprobs: a label outside the vocabulary of {z.shape[-1]}")
        ids = labels.contiguous()
        out = torch.empty(labels.shape, dtype=torch.float32)
        lse = torch.empty(labels.shape, dtype=torch.float32)
        rows, width = ids.numel(), z.shape[-1]
        getattr(kernel(), f"label_logprobs_forward_{_SUFFIX[z.dtype]}")(
            z.data_ptr(), ids.data_ptr(), out.data_ptr(), lse.data_ptr(), rows, width
        )
        ctx.save_for_backward(z, ids, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, ids, lse = ctx.saved_tensors
        g = grad.to(torch.float32).contiguous()
        dz = torch.empty_like(z)
        getattr(kernel(), f"label_logprobs_backward_{_SUFFIX[z.dtype]}")(
            z.data_ptr(), ids.data_ptr(), lse.data_ptr(), g.data_ptr(), dz.data_ptr(), ids.numel(), z.shape[-1]
        )
        return dz, None


def flags() -> list[str]:
    wide = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return ["-O3", "-mavx2", "-mfma", "-fno-math-errno", *(wide if avx512 else [])]


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """`label_logprobs.c` built, loaded and checked on a probe; None where it cannot serve (with a warning that
    says why) or does not apply (x86-64 Linux with AVX2 or AVX-512); `RLHF_LOGPROBS_KERNEL=0` turns it off."""
    if not kernels.wanted("RLHF_LOGPROBS_KERNEL"):
        return None
    instead = "log-probabilities of the vocabulary run as torch ops (slower)"
    wrong = "its log-probabilities or gradients differ from torch's on a probe"
    return kernels.load(SOURCE, flags(), _bind, _probe, instead, wrong)


def _bind(path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for suffix in _SUFFIX.values():
        forward, backward = (
            getattr(lib, f"label_logprobs_forward_{suffix}"),
            getattr(lib, f"label_logprobs_backward_{suffix}"),
        )
        forward.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
        backward.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2
        forward.restype = backward.restype = None
    return lib


def _probe(lib) -> bool:
    """Whether the kernel's log-probabilities and gradients match torch's, in float32 and bf16, on rows of 37
    logits (vector tails) spread wide enough that some exponentials underflow."""
    gen = torch.Generator().manual_seed(0)
    for dtype in _SUFFIX:
        logits = (torch.randn(3, 4, 37, generator=gen) * 30).to(dtype)
        labels = torch.randint(0, 37, (3, 4), generator=gen)
        g = torch.randn(3, 4, generator=gen)
        z = logits.clone().requires_grad_()
        with torch.enable_grad():  # first asked for where autograd may be off (a scoring forward)
            logprobs_from_logits(z, labels).backward(g)
        out = torch.empty(3, 4)
        lse = torch.empty(3, 4)
        dz = torch.empty_like(logits)
        getattr(lib, f"label_logprobs_forward_{_SUFFIX[dtype]}")(
            logits.data_ptr(), labels.data_ptr(), out.data_ptr(), lse.data_ptr(), 12, 37
        )
        getattr(lib, f"label_logprobs_backward_{_SUFFIX[dtype]}")(
            logits.data_ptr(), labels.data_ptr(), lse.data_ptr(), g.data_ptr(), dz.data_ptr(), 12, 37
        )
        want = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]
        if not torch.allclose(out, want, rtol=1e-5, atol=1e-5):
            return False
        if not torch.allclose(dz.float(), z.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5):
            return False
    return True
