"""The Accelerator every training stage runs under: single process, DDP, FSDP or DeepSpeed by launch alone.

On a machine without a GPU, a multi-process launch (`accelerate launch --multi_gpu --num_processes 2 ...` or
`torchrun --nproc_per_node 2 ...`) gives each process LOCAL_RANK but Accelerate only forms a process group
(gloo) when told to use the CPU, so we tell it whenever no CUDA device exists.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from rlhf.runtime.kernels import cpu_flags_in


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    # Accelerate keeps one state per process and refuses a second Accelerator with another precision; stages run
    # one after another in one process (the pipeline, tests, benchmarks), so each starts afresh. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


# CPU feature flags (Linux /proc/cpuinfo) that mean the CPU multiplies bf16 matrices natively: AVX512-BF16 and AMX on
# x86 (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later), the BF16 extension on Arm
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def native_bf16_in(cpuinfo: str) -> str | None:
    """The flag in a /proc/cpuinfo text that says the CPU has bf16 matrix instructions, or None."""
    found = NATIVE_BF16_FLAGS & cpu_flags_in(cpuinfo)
    return sorted(found)[0] if found else None


@functools.cache
def bf16_pays() -> tuple[bool, str]:
    """Whether bf16 autocast speeds training up on this machine, and why. On a CPU without bf16 instructions the
    matrix products fall back to a scalar loop: measured on an AVX2-only AMD EPYC, 0.85 GFLOP/s against float32's
    110 (130× slower), which turns a 7-second PPO step into 4 minutes."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name()} supports bf16"
        return False, f"{torch.cuda.get_device_name()} does not support bf16"
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return False, f"no way to tell whether this {platform.machine()} CPU has bf16 instructions"
    flag = native_bf16_in(info.read_text(errors="replace"))
    if flag:
        return True, f"this CPU has bf16 instructions ({flag})"
    return False, "this CPU has no bf16 instructions (no avx512_bf16 / amx_bf16 flag): bf16 runs ~100× slower"


def resolve_mixed_precision(requested: str) -> tuple[str, str | None]:
    """`auto` → `bf16` where bf16 pays (`bf16_pays`), else `no`; other values stay. Also a line to tell the user:
    what auto chose and why, or a warning when bf16 was asked for where it is slow."""
    if requested not in ("auto", "bf16"):
        return requested, None
    pays, why = bf16_pays()
    if requested == "auto":
        return ("bf16" if pays else "no"), f"mixed precision auto: {'bf16' if pays else 'float32'} ({why})"
    return (
        requested,
        None if pays else f"warning: bf16 asked for, but {why}; mixed_precision auto or no is faster here",
    )


GQA_FLAG = "TRANSFORMERS_SDPA_FORCE_GQA"


def native_gqa_attention(device: torch.device) -> bool:
    """On a CPU, let transformers' SDPA attention hand grouped key/value heads to torch as they are
    (`enable_gqa`) instead of repeating them to one per query head, which it does whenever a padding mask is given
    because some CUDA kernels need that. Torch's CPU kernel takes the mask and the groups together: outputs are
    bit-identical (tested), and a training forward of the embedded model keeps 63 MB less per 720 tokens (its 9
    query heads share 3 key/value heads). Sets the flag transformers reads unless the user set it; returns whether
    it is on."""
    if device.type != "cpu" or tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5):
        return False  # enable_gqa came with torch 2.5
    os.environ.setdefault(GQA_FLAG, "1")
    return os.environ[GQA_FLAG] == "1"
