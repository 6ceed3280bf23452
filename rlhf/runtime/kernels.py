"""C kernels compiled on first use with the system's C compiler (`$CC`, else `cc`) into the user cache directory,
once per source text, compiler and flags, and loaded with ctypes. They run on torch's own OpenMP threads, so a
kernel is used only where the process has one OpenMP runtime (`openmp_runtimes`)."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path


def cpu_flags_in(cpuinfo: str) -> set[str]:
    """The CPU feature flags in a /proc/cpuinfo text (its `flags` lines on x86, `Features` on Arm)."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (Linux's /proc/cpuinfo); empty where it cannot be read."""
    try:
        return frozenset(cpu_flags_in(Path("/proc/cpuinfo").read_text(errors="replace")))
    except OSError:
        return frozenset()


def wanted(switch: str) -> bool:
    """Whether a kernel may be tried here: its environment switch does not turn it off (`0`; anything else, or
    unset, leaves it on), and this is Linux on an x86-64 CPU with AVX2 or AVX-512 (as torch reports it)."""
    import torch

    if os.environ.get(switch, "1") == "0" or sys.platform != "linux":
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


HEADERS = Path(__file__).parent  # the kernels' shared headers (bf16.h), on every build's include path


def build(source: Path, flags: list[str]) -> Path:
    """`source` compiled into a shared library in the cache (atomic, so concurrent runs agree); its path. The cache
    key covers the source, the shared headers, the compiler and the flags. Raises OSError or
    subprocess.SubprocessError where that fails (no compiler, a compile error)."""
    from rlhf.models.embedded import cache_root

    compiler = os.environ.get("CC", "cc")
    flags = [*flags, "-fopenmp", "-shared", "-fPIC"]
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(HEADERS.glob("*.h")))
    key = hashlib.sha256(text + " ".join([compiler, *flags, "-lm"]).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *flags, f"-I{HEADERS}", "-o", str(built), str(source), "-lm"]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        os.replace(built, target)
    return target


def load(source: Path, flags: list[str], bind, probe, instead: str, wrong: str):
    """`source` built (`build`), loaded (`bind(path)`: the ctypes library with its signatures declared) and checked
    (`probe(lib)`: True where it computes what it should). Where any of that fails, or a second OpenMP runtime would
    come into the process, None, with a warning that says what runs `instead` and why (`wrong`: a failed probe)."""
    try:
        lib = bind(build(source, flags))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None)
        why = f"it could not be built or loaded ({e}{': ' + detail.decode()[-300:] if detail else ''})"
    else:
        if openmp_runtimes() > 1:  # a second OpenMP runtime beside torch's would fight its threads for the cores
            why = "it would bring a second OpenMP runtime into the process"
        elif probe(lib):
            return lib
        else:
            why = wrong
    warnings.warn(f"{instead}: rlhf's kernel {source.name} is not used, as {why}", RuntimeWarning, stacklevel=3)
    return None


def openmp_runtimes() -> int:
    """How many GNU OpenMP libraries this process has mapped (a kernel's must be torch's, already loaded)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return 0
    return len({line.split()[-1] for line in maps.splitlines() if "libgomp" in line})
