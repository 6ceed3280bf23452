"""bf16 working copies of the weights that train, for bf16 autocast on a CPU; AdamW steps their float32 masters.

Under bf16 autocast a float32 weight is cast to bf16 in every forward, its product's gradient comes out in bf16 and
is cast to float32 for the weight's `.grad`, and the optimiser's step then reads that float32 gradient three times
(the clipping's norm and multiply, AdamW). Four passes over memory per weight and update besides AdamW's own, with
no arithmetic to hide them behind: with AdamW, ~90 of the ~580 ms the demo settings' two updates took on a 2-core
Zen 5 (benchmarks/ppo_vs_trl.py), against ~45 ms here.

Here each linear weight of a trained block keeps a bf16 copy, a leaf that requires grad, which its products multiply
by under bf16 autocast (`weight_of`): nothing is cast in the forward, and the gradient stays in the copy's bf16
`.grad`. `adamw_bf16.c` then steps the float32 weight, the master, from that gradient in one pass that also applies
the clipping factor and writes the copy anew; a first pass sums the gradient's squares for the norm. The masters
remain the module's parameters: the optimiser's state, checkpoints and saved models are as before.

The products and gradients are the ones autocast makes (the copy is the cast autocast would make, the gradient the
bf16 one it would cast); only the optimiser's arithmetic order differs, to float32 rounding. Gradients that
accumulate over micro-batches would accumulate in bf16, so `install` is for updates of one micro-batch; and for one
process (a DDP reducer synchronises the parameters' `.grad`, not the copies'). `RLHF_FUSED_ADAMW=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.runtime import kernels

SOURCE = Path(__file__).with_name("adamw_bf16.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fno-math-errno"]  # vectorised square roots need no errno
ATTRIBUTE = "rlhf_working_copy"  # on an nn.Linear: its WorkingCopy


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, checked on a probe; None (with a warning that says why) where it cannot serve."""
    if not kernels.wanted("RLHF_FUSED_ADAMW"):
        return None
    instead = "bf16 training casts its weights as autocast does (slower)"
    return kernels.load(SOURCE, FLAGS, bind, probe, instead, "its step differs from torch's AdamW on a probe")


def bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    ptrs, i64, f32 = ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.c_float
    floats = ctypes.POINTER(ctypes.c_float)
    lib.bf16_square_sum.argtypes = [ptrs, ctypes.POINTER(i64), i64]
    lib.bf16_square_sum.restype = ctypes.c_double
    lib.adamw_bf16.argtypes = [ptrs] * 5 + [ctypes.POINTER(i64), i64, floats, floats, floats, f32, f32, f32, f32]
    lib.adamw_bf16.restype = None
    return lib


def probe(lib) -> bool:
    """Whether two clipped steps of the kernel match torch's fused AdamW on a weight of 3000 (a vector tail)."""
    gen = torch.Generator().manual_seed(0)
    master = torch.nn.Parameter(torch.randn(3000, generator=gen))
    reference = torch.nn.Parameter(master.detach().clone())
    ours = torch.optim.AdamW([master], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    theirs = torch.optim.AdamW([reference], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    copy = WorkingCopy(master)
    for _ in range(2):
        grad = torch.randn(3000, generator=gen).bfloat16()
        copy.copy.grad = grad
        step_copies(lib, ours, [copy], 0.5)
        reference.grad = grad.float() * 0.5
        theirs.step()
    return torch.allclose(master, reference, rtol=1e-5, atol=1e-6) and torch.equal(copy.copy, master.bfloat16())


class WorkingCopy:
    """The bf16 copy of one float32 weight (`master`) that products multiply by under bf16 autocast. It is made
    again from the master whenever the master changed other than by `step_copies` (a checkpoint loaded into it)."""

    def __init__(self, master: torch.nn.Parameter):
        self.master = master
        self.copy = master.detach().to(torch.bfloat16).requires_grad_()
        self.seen = self.stamp()

    def stamp(self) -> tuple[int, int]:
        return self.master._version, self.master.data_ptr()

    def current(self) -> torch.Tensor:
        if self.stamp() != self.seen:
            with torch.no_grad():
                self.copy.copy_(self.master)
            self.seen = self.stamp()
        return self.copy


def weight_of(linear: torch.nn.Linear) -> torch.Tensor:
    """What `linear`'s product multiplies by: its bf16 working copy under bf16 autocast on a CPU, where it has one,
    else its weight."""
    working = getattr(linear, ATTRIBUTE, None)
    if working is None or not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return linear.weight
    return working.current()


def _linear_forward(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight_of(linear), linear.bias)


class WorkingWeights:
    """The working copies of a model's trained block weights, and the optimiser whose AdamW steps their masters."""

    def __init__(self, copies: list[WorkingCopy], optimizer: torch.optim.Optimizer, lib):
        self.copies, self.optimizer, self.lib = copies, optimizer, lib

    @classmethod
    def install(cls, blocks: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> WorkingWeights | None:
        """Give every plain nn.Linear of `blocks` whose float32 CPU weight trains a working copy that its forward
        (and the lean MLP, `rlhf.models.lean`) multiplies by; None where the kernel is not available, the optimiser
        is not a plain AdamW, or nothing qualifies."""
        lib = library()
        groups = getattr(optimizer, "param_groups", [])
        if lib is None or not isinstance(torch_optimizer(optimizer), torch.optim.AdamW):
            return None
        if any(g.get("amsgrad") or g.get("maximize") or g.get("differentiable") for g in groups):
            return None
        linears = [m for block in blocks for m in block.modules() if type(m) is torch.nn.Linear]
        linears = [m for m in linears if m.weight.requires_grad and m.weight.dtype == torch.float32]
        linears = [m for m in linears if m.weight.device.type == "cpu" and not hasattr(m, ATTRIBUTE)]
        if not linears:
            return None
        copies = []
        for m in linears:
            setattr(m, ATTRIBUTE, WorkingCopy(m.weight))
            m.forward = functools.partial(_linear_forward, m)  # an instance attribute shadows the class's forward
            copies.append(getattr(m, ATTRIBUTE))
        return cls(copies, optimizer, lib)

    def pending(self) -> list[WorkingCopy]:
        """The copies holding a gradient; raises if a master holds one too (a product that bypassed its copy)."""
        stray = [w for w in self.copies if w.master.grad is not None]
        if stray:
            raise RuntimeError(
                f"{len(stray)} weights with bf16 working copies got a float32 gradient too: a product multiplied by "
                "the weight itself (outside bf16 autocast?) while its copy trains; set RLHF_FUSED_ADAMW=0"
            )
        return [w for w in self.copies if w.copy.grad is not None]

    def square_sum(self, pending: list[WorkingCopy]) -> float:
        """Σ g² over the pending copies' gradients."""
        grads = [w.copy.grad for w in pending]
        return self.lib.bf16_square_sum(addresses(grads), lengths(grads), len(grads))

    def step(self, pending: list[WorkingCopy], scale: float) -> None:
        step_copies(self.lib, self.optimizer, pending, scale)

    def zero_grad(self) -> None:
        for w in self.copies:
            w.copy.grad = None


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimiser inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def step_copies(lib, optimizer, pending: list[WorkingCopy], scale: float) -> None:
    """AdamW's step of the pending copies' masters from their bf16 gradients times `scale`, by the kernel; Adam's
    state lives in `optimizer.state` as torch's fused AdamW keeps it (a float32 step count, float32 moments), so a
    checkpoint resumes under either."""
    if not pending:
        return
    optimizer = torch_optimizer(optimizer)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    first = group_of[id(pending[0].master)]
    betas, eps = first["betas"], first["eps"]
    moments, step_size, bias2_sqrt, decay = [], [], [], []
    for w in pending:
        group, state = group_of[id(w.master)], optimizer.state[w.master]
        if (group["betas"], group["eps"]) != (betas, eps):
            raise ValueError("the fused AdamW kernel steps weights of one betas and eps at a time")
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(w.master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(w.master, memory_format=torch.preserve_format)
        state["step"] += 1
        k, lr = float(state["step"]), float(group["lr"])
        step_size.append(lr / (1 - betas[0] ** k))
        bias2_sqrt.append(math.sqrt(1 - betas[1] ** k))
        decay.append(lr * group["weight_decay"])
        moments.append((state["exp_avg"], state["exp_avg_sq"]))
    floats = lambda xs: (ctypes.c_float * len(xs))(*xs)  # noqa: E731
    masters = [w.master.detach() for w in pending]
    lib.adamw_bf16(
        addresses(masters),
        addresses([m for m, _ in moments]),
        addresses([v for _, v in moments]),
        addresses([w.copy.grad for w in pending]),
        addresses([w.copy.detach() for w in pending]),
        lengths(masters),
        len(pending),
        floats(step_size),
        floats(bias2_sqrt),
        floats(decay),
        betas[0],
        betas[1],
        eps,
        scale,
    )
    with torch.no_grad():  # written through their addresses: tell autograd they changed, as an in-place step would
        for w in pending:
            w.master.view(-1)[:1].mul_(1)  # bumps the version counter, changes nothing
            w.copy.view(-1)[:1].mul_(1)
            w.seen = w.stamp()


def addresses(tensors: list[torch.Tensor]):
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("the fused AdamW kernel needs contiguous tensors")
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def lengths(tensors: list[torch.Tensor]):
    return (ctypes.c_int64 * len(tensors))(*[t.numel() for t in tensors])
