"""Run the `rlhf` command under jemalloc when the system has it (PyTorch's CPU performance guide recommends
jemalloc or tcmalloc over glibc's malloc for training).

Training allocates and frees large tensors of many sizes every step; glibc's malloc fragments under that and hands
memory back to the kernel only to fault it in again. Measured on a PPO step of the embedded model (2-core CPU,
benchmarks/ppo_vs_trl.py): about 15% less time and 0.5 GB lower peak memory with jemalloc. The process re-executes
itself once with LD_PRELOAD set, before any heavy import; `RLHF_MALLOC=system` keeps glibc. Debian/Ubuntu:
`apt-get install libjemalloc2` (`make setup` does it where it may).

jemalloc itself hands the pages of a freed large block (8 MB and more: logits, activations, KV caches; its
"oversize" arena purges at once) back to the kernel, so the next tensor of that size faults every page in again:
15–50 ms for 50 MB on a virtual machine, more than the arithmetic on it (an `exp` of a fresh (8, 32, 49152)
tensor took 27 ms, into an existing one 6 ms; the second of two such tensors faulted 12289 pages in). Keeping
freed pages for the whole run removes that, but then blocks freed in a training update, of other sizes than the
next ones, stay resident: peak memory of a float32 PPO step rose 5.8 → 6.1–6.9 GB. So freed pages are kept only
within `keep_freed_pages()` blocks, around work that allocates and frees much and trains nothing (sampling,
scoring), and handed back when the block ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

MARKER = "RLHF_MALLOC_REEXEC"


def jemalloc_path() -> str | None:
    """The shared library to preload, or None when the system has no jemalloc."""
    for candidate in ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2"):
        if os.path.exists(candidate):
            return candidate
    return ctypes.util.find_library("jemalloc")


def use_jemalloc() -> None:
    """Re-execute this process under jemalloc if it is available and not in use yet; otherwise return."""
    if not sys.platform.startswith("linux") or os.environ.get("RLHF_MALLOC", "").lower() == "system":
        return
    if os.environ.get(MARKER) or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = jemalloc_path()
    if lib is None:
        return
    env = dict(os.environ)
    env[MARKER] = "1"
    env["LD_PRELOAD"] = " ".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


@contextlib.contextmanager
def keep_freed_pages():
    """Within this block, jemalloc keeps the pages of freed blocks for the next allocations (decay off in every
    arena in use); at its end each arena's decay is restored and the kept pages go back to the kernel. Does
    nothing under another allocator."""
    mallctl = _mallctl()
    if mallctl is None:
        yield
        return
    saved = {}
    for i in range(_arenas(mallctl)):
        for key in (b"dirty_decay_ms", b"muzzy_decay_ms"):
            name = b"arena.%d.%s" % (i, key)
            old = _swap(mallctl, name, -1)
            if old is not None:  # an arena no thread has used yet has no settings
                saved[name] = old
    try:
        yield
    finally:
        for name, old in saved.items():
            _swap(mallctl, name, old)
        mallctl(b"arena.4096.purge", None, None, None, 0)  # 4096: every arena


def _mallctl():
    """jemalloc's control function when jemalloc is this process's allocator, else None."""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (AttributeError, OSError):
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    return mallctl


def _arenas(mallctl) -> int:
    n, size = ctypes.c_uint(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
    if mallctl(b"arenas.narenas", ctypes.byref(n), ctypes.byref(size), None, 0):
        return 0
    return n.value + 1  # and the oversize arena, made after the others


def _swap(mallctl, name: bytes, value: int) -> int | None:
    """Set a decay time (ms, −1 = never); returns the old one, or None where the arena has none."""
    old, new = ctypes.c_ssize_t(), ctypes.c_ssize_t(value)
    size = ctypes.c_size_t(ctypes.sizeof(old))
    if mallctl(name, ctypes.byref(old), ctypes.byref(size), ctypes.byref(new), ctypes.sizeof(new)):
        return None
    return old.value
