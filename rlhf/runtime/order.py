"""The order training examples are visited in: a pure function of (seed, position), so resume is exact."""

from __future__ import annotations

import torch


def sample_indices(start: int, count: int, n: int, seed: int) -> list[int]:
    """Indices of samples start..start+count-1 of the endless stream of per-epoch shuffles of range(n).

    Batches run across epoch boundaries, so no example is ever dropped for not filling a batch, and the order
    is a pure function of (seed, position): a resumed run picks up exactly where it stopped.
    """
    perms: dict[int, list[int]] = {}
    out = []
    for i in range(start, start + count):
        epoch, j = divmod(i, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.append(perms[epoch][j])
    return out
