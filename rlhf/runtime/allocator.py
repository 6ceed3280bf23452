"""Run the `rlhf` command under jemalloc when the system has it (PyTorch's CPU performance guide recommends
jemalloc or tcmalloc over glibc's malloc for training).

Training allocates and frees large tensors of many sizes every step; glibc's malloc fragments under that and hands
memory back to the kernel only to fault it in again. Measured on a PPO step of the embedded model (2-core CPU,
benchmarks/ppo_vs_trl.py): about 15% less time and 0.5 GB lower peak memory with jemalloc. The process re-executes
itself once with LD_PRELOAD set, before any heavy import; `RLHF_MALLOC=system` keeps glibc. Debian/Ubuntu:
`apt-get install libjemalloc2` (`make setup` does it where it may).

jemalloc hands the pages of a freed large block (8 MB and more) back to the kernel at once, so the next tensor of
that size faults its pages in again (12289 faults for the second of two (8, 32, 49152) float32 tensors). Keeping
freed pages (decay off) was measured and not kept: for the whole run it made a PPO step ~20% faster but left blocks
freed in an update resident (float32 peak 5.8 -> 6.1-6.9 GB); only around sampling and scoring, the purge at the
block's end cost the update what the block saved (two alternated rounds on both benchmark settings: no difference
beyond the 10% noise between runs). So it is a choice (`keep_freed_memory`, PPO's `--keep-freed-memory`): PPO's
demo settings, whose tensors are small beside the models, take it (~195k fewer page faults a step, ~0.11 GB more
peak memory); full fine-tuning does not.
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


def _mallctl():
    """jemalloc's control function where this process runs under jemalloc, else None."""
    try:
        control = ctypes.CDLL(None).mallctl
    except AttributeError:
        return None
    control.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p]
    control.argtypes += [ctypes.c_size_t]
    return control


def _read(control, name: str, ctype):
    value, size = ctype(), ctypes.c_size_t(ctypes.sizeof(ctype))
    if control(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0):
        raise OSError(f"mallctl {name} could not be read")
    return value.value


def _write(control, name: str, value: int) -> None:
    data = ctypes.c_ssize_t(value)
    if control(name.encode(), None, None, ctypes.byref(data), ctypes.sizeof(data)):
        raise OSError(f"mallctl {name} could not be set")


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True):
    """Within this block jemalloc keeps the pages of freed memory for the next allocations instead of handing them
    back to the kernel (every arena's dirty and muzzy decay off), so a tensor of a size freed before is not faulted
    in and zero-filled again page by page; at the end the decay times are restored and the kept pages released.
    Yields whether it acts: False where not `enabled` or the process is not under jemalloc (`use_jemalloc`)."""
    control = _mallctl() if enabled else None
    if control is None:
        yield False
        return
    arenas = _read(control, "arenas.narenas", ctypes.c_uint)
    names = [
        f"{p}.{kind}_decay_ms"
        for p in ["arenas", *(f"arena.{i}" for i in range(arenas))]
        for kind in ("dirty", "muzzy")
    ]
    before = {}
    for name in names:
        with contextlib.suppress(OSError):  # an arena index not in use
            before[name] = _read(control, name, ctypes.c_ssize_t)
            _write(control, name, -1)
    try:
        yield True
    finally:
        for name, value in before.items():
            _write(control, name, value)
        with contextlib.suppress(OSError):
            control(b"arena.4096.purge", None, None, None, 0)  # MALLCTL_ARENAS_ALL: hand the kept pages back
