"""Run the `rlhf` command under jemalloc when the system has it (PyTorch's CPU performance guide recommends
jemalloc or tcmalloc over glibc's malloc for training).

Training allocates and frees large tensors of many sizes every step; glibc's malloc fragments under that and hands
memory back to the kernel only to fault it in again. Measured on a PPO step of the embedded model (2-core CPU,
benchmarks/ppo_vs_trl.py): about 15% less time and 0.5 GB lower peak memory with jemalloc. The process re-executes
itself once with LD_PRELOAD set, before any heavy import; `RLHF_MALLOC=system` keeps glibc. Debian/Ubuntu:
`apt-get install libjemalloc2` (`make setup` does it where it may).

jemalloc itself, by default, hands the pages of a freed large block (tens of MB: logits, activations) back to the
kernel within milliseconds, so the next tensor of that size faults every page in again: 15–50 ms for 50 MB on a
virtual machine, more than the arithmetic on it (an `exp` of a fresh (8, 32, 49152) tensor took 27 ms, into an
existing one 6 ms). Any finite decay time measured the same; only keeping freed pages (`KEEP_FREED_PAGES`, set
unless MALLOC_CONF is) removes it: a PPO step of the benchmark's shipped settings 5.8–6.6 → 4.5–4.9 s, for 0.2 GB
more peak resident memory (freed pages stay the process's, and are what its next tensors reuse).
"""

from __future__ import annotations

import ctypes.util
import os
import sys

MARKER = "RLHF_MALLOC_REEXEC"
KEEP_FREED_PAGES = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # jemalloc's MALLOC_CONF: never purge freed pages


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
    env.setdefault("MALLOC_CONF", KEEP_FREED_PAGES)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
