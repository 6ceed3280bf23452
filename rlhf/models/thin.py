"""Float32 products of a few rows by a weight, for decoding on CPUs with AVX2 but not AVX-512.

Decoding 8 rows of the embedded 135M model reads all 540 MB of its float32 weights once per token and does 8
multiply-adds per weight read, so a token costs what streaming the weights costs. On a 2-core AMD EPYC with AVX2
(no AVX-512), oneDNN's packed product (`packing.linear_product`) streams them at ~9 GB/s, while the machine reads
memory at ~15 GB/s: all the model's products for one token of 8 rows took 58-72 ms. `thin_linear.c` stores each
weight in panels of 24 output columns, read front to back once per call, and takes 36-42 ms for the same products
(outputs equal `F.linear`'s to rounding). The same panels serve the prefill's hundreds of rows as fast as oneDNN's
packed product (126 against 124 GFLOP/s on 464 rows), so one copy of the weights serves both. On AVX-512 CPUs
oneDNN is left in charge.

The kernel is C, compiled on first use with the system's C compiler (`$CC`, else `cc`; about a second) into the
user cache directory and loaded with ctypes; it runs on torch's own OpenMP threads. Where it cannot be built or
loaded, or where its result differs from `F.linear` on a probe, `available()` is False and decoding keeps oneDNN's
product; `RLHF_THIN_LINEAR=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.runtime import kernels

SOURCE = Path(__file__).with_name("thin_linear.c")
PANEL = 24  # output columns per panel, as in thin_linear.c
FLAGS = ["-O3", "-mavx2", "-mfma"]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel where it applies (`applies()`, not turned off), else None."""
    if os.environ.get("RLHF_THIN_LINEAR", "1") == "0" or not applies():
        return None
    return load()


def load() -> ctypes.CDLL | None:
    """The kernel built, loaded and checked on a probe; None, with a warning that says why, where any of that fails
    (no compiler, a second OpenMP runtime, a wrong result). Needs AVX2 and FMA (any x86-64 CPU since 2013)."""
    instead = "float32 decoding keeps oneDNN's products (slower on this CPU)"
    return kernels.load(SOURCE, FLAGS, bind, probe, instead, "its products differ from F.linear's on a probe")


def bind(path: Path) -> ctypes.CDLL:
    """The compiled kernel loaded, with its C signatures declared."""
    lib = ctypes.CDLL(str(path))
    lib.thin_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    lib.thin_linear.restype = None
    lib.pack_panels.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.pack_panels.restype = None
    i64, ptr, ptrs = ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    lib.decode_layers.argtypes = [
        *[i64] * 7,  # B, H, heads, kv heads, head size, intermediate size, layers
        *[ptr] * 3,  # x, cos, sin
        ptrs,  # norm1 weights
        ptrs,  # norm2 weights
        ptr,  # eps (2 a layer)
        *[ptrs, i64] * 4,  # qkv, o, gate_up, down panels and their padded widths
        *[ptr] * 2,  # keys_t, values
        i64,  # cache length
        i64,  # position written
        ptr,  # bias
        ctypes.c_float,  # scale
        i64,  # record
        ptr,  # recorded
    ]
    lib.decode_layers.restype = None
    return lib


def available() -> bool:
    return library() is not None


def serves(dtype: torch.dtype) -> bool:
    """Whether the lean decoder multiplies in `dtype` by this kernel (float32, where it is available)."""
    return dtype == torch.float32 and available()


def applies() -> bool:
    """Linux on x86-64 with AVX2 and FMA but no AVX-512 (torch's own dispatch level), torch on GNU OpenMP."""
    return (
        sys.platform == "linux"
        and torch.backends.cpu.get_cpu_capability() == "AVX2"
        and "OpenMP" in torch.__config__.parallel_info()
    )


def build() -> Path:
    """The kernel compiled into the cache (`kernels.build`)."""
    return kernels.build(SOURCE, FLAGS)


def probe(lib) -> bool:
    """Whether the kernel computes F.linear (to float32 rounding): every tail of rows, a chunk boundary, a padded N."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(PANEL * 2 + 5, 37, generator=gen)
    for rows in (1, 2, 3, 4, 5, 8, 131):
        x = torch.randn(rows, 37, generator=gen)
        if not torch.allclose(ThinProduct([w], lib)(x), F.linear(x, w), rtol=1e-4, atol=1e-4):
            return False
    return True


class ThinProduct:
    """x -> x·Wᵀ for W the `weights` stacked along their output dimension, in float32 on a CPU, by the kernel.
    Keeps a copy of the stacked weights in panels (what oneDNN's packed copy would cost) and nothing else."""

    def __init__(self, weights: list[torch.Tensor], lib=None):
        self.lib = lib or library()
        weights = [w.detach().float().contiguous() for w in weights]  # (N_i, K) each, stacked: (N, K)
        self.n, self.k = sum(w.shape[0] for w in weights), weights[0].shape[1]
        # panel p, row k holds W[24p .. 24p + 23, k] (zeros past N), packed by the kernel library
        self.panels = torch.empty(-(-self.n // PANEL), self.k, PANEL)  # (N' / PANEL, K, PANEL)
        addresses = (ctypes.c_void_p * len(weights))(*[w.data_ptr() for w in weights])
        rows = (ctypes.c_int64 * len(weights))(*[w.shape[0] for w in weights])
        self.lib.pack_panels(addresses, rows, len(weights), self.k, self.panels.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.numel() // self.k
        x = x.reshape(rows, self.k).float().contiguous()
        y = torch.empty(rows, self.panels.shape[0] * PANEL)  # (rows, N')
        self.lib.thin_linear(x.data_ptr(), self.panels.data_ptr(), y.data_ptr(), rows, y.shape[1], self.k)
        return y[:, : self.n].reshape(*lead, self.n)  # a view where N' = N


class ThinLayers:
    """Every block of a `LlamaDecoder` step (one new token per row) in one call of the kernel library
    (`decode_layers` in thin_linear.c): the norms, rotary embedding, cache writes, attention, SiLU and residual adds
    that eager PyTorch runs as ~20 operations a layer (~15 ms a token for the embedded model's 30 layers on a
    2-core CPU), with the products by `ThinProduct`'s panels. `layers`: the decoder's (norm1, qkv, o, norm2,
    gate_up, down) tuples, every product a `ThinProduct`; `keys_t`, `values`: its float32 cache."""

    def __init__(self, layers, heads: int, kv_heads: int, head_dim: int, intermediate: int, keys_t, values):
        self.lib = library()
        self.shape = (heads, kv_heads, head_dim, intermediate, len(layers))
        self.keys_t, self.values = keys_t, values
        self.tensors = []  # everything the library reads by address, kept alive here

        def addresses(tensors):
            tensors = [t.detach().float().contiguous() for t in tensors]
            self.tensors += tensors
            return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])

        norm1, qkv, o, norm2, gate_up, down = zip(*layers, strict=True)
        self.norms = addresses([w for w, _ in norm1]), addresses([w for w, _ in norm2])
        self.eps = torch.tensor([e for a, b in zip(norm1, norm2, strict=True) for e in (a[1], b[1])])
        self.products = []
        for group in (qkv, o, gate_up, down):
            self.products += [addresses([p.panels for p in group]), group[0].panels.shape[0] * PANEL]

    @staticmethod
    def serves(layers, head_dim: int) -> bool:
        """Whether every product is the kernel's and the head fits its rotary buffer."""
        return head_dim <= 256 and all(isinstance(p, ThinProduct) for layer in layers for p in layer[1:3] + layer[4:])

    def __call__(self, x, cos, sin, bias, position: int, recorded=None, record: int = 0) -> None:
        """x (B, hidden) float32, advanced in place through every block; cos, sin (B, head size) (sin with its first
        half negated); bias (B, position + 1) additive mask of the cache positions. Writes the cache at
        `position` and, after block `record` − 1, x into `recorded` (B, length, hidden) there."""
        heads, kv_heads, head_dim, intermediate, layers = self.shape
        rows, hidden = x.shape
        self.lib.decode_layers(
            rows,
            hidden,
            heads,
            kv_heads,
            head_dim,
            intermediate,
            layers,
            x.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            *self.norms,
            self.eps.data_ptr(),
            *self.products,
            self.keys_t.data_ptr(),
            self.values.data_ptr(),
            self.keys_t.shape[-1],
            position,
            bias.data_ptr(),
            head_dim**-0.5,
            record,
            None if recorded is None else recorded.data_ptr(),
        )
