"""rlhf/runtime/kernels.build: a kernel's cache key covers the shared headers it includes, so editing one rebuilds
every kernel instead of loading a library compiled from the old text."""

import ctypes
import shutil

import pytest

from rlhf.runtime import kernels


def test_a_changed_shared_header_builds_a_new_library(tmp_path, monkeypatch):
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    headers = tmp_path / "headers"
    headers.mkdir()
    monkeypatch.setattr(kernels, "HEADERS", headers)
    source = tmp_path / "k.c"
    source.write_text('#include "shared.h"\nint value(void) { return VALUE; }\n')

    def built_value(value: int):
        (headers / "shared.h").write_text(f"#define VALUE {value}\n")
        path = kernels.build(source, ["-O1"])
        return path, ctypes.CDLL(str(path)).value()

    first, one = built_value(1)
    second, two = built_value(2)
    assert (one, two) == (1, 2)
    assert first != second
    assert kernels.build(source, ["-O1"]) == second  # the same text again: the cached library


def test_the_kernels_bf16_conversions_round_as_torch_does(tmp_path, monkeypatch):
    """bf16.h, which the kernels share: round to nearest even (ties included) and widen exactly, as torch's casts."""
    torch = pytest.importorskip("torch")
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "conv.c"
    source.write_text(
        '#include "bf16.h"\n'
        "void narrow(const float *x, bf16 *y, long n) { for (long i = 0; i < n; i++) y[i] = f32_to_bf16(x[i]); }\n"
        "void widen(const bf16 *x, float *y, long n) { for (long i = 0; i < n; i++) y[i] = bf16_to_f32(x[i]); }\n"
    )
    lib = ctypes.CDLL(str(kernels.build(source, ["-O2"])))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * torch.logspace(-30, 30, 4096)
    # exact ties between two bf16 values, to both even neighbours
    ties = (torch.arange(1, 9, dtype=torch.int32) * 0x10000 + 0x8000 + 0x3F800000).view(torch.float32)
    x = torch.cat([x, ties, -ties])
    narrowed = torch.empty(x.numel(), dtype=torch.int16)
    lib.narrow(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(narrowed.data_ptr()), ctypes.c_long(x.numel()))
    assert torch.equal(narrowed.view(torch.bfloat16), x.to(torch.bfloat16))
    widened = torch.empty(x.numel())
    lib.widen(ctypes.c_void_p(narrowed.data_ptr()), ctypes.c_void_p(widened.data_ptr()), ctypes.c_long(x.numel()))
    assert torch.equal(widened, x.to(torch.bfloat16).float())
