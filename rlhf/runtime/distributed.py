"""The Accelerator every training stage runs under: single process, DDP, FSDP or DeepSpeed by launch alone.

On a machine without a GPU, a multi-process launch (`accelerate launch --multi_gpu --num_processes 2 ...` or
`torchrun --nproc_per_node 2 ...`) gives each process LOCAL_RANK but Accelerate only forms a process group
(gloo) when told to use the CPU, so we tell it whenever no CUDA device exists.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    # Accelerate keeps one state per process and refuses a second Accelerator with another precision; stages run
    # one after another in one process (the pipeline, tests, benchmarks), so each starts afresh. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
