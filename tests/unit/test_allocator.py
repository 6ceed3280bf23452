"""The `rlhf` command re-runs itself under jemalloc where the system has it, once, and never when told not to."""

import os
import subprocess
import sys

import pytest

from rlhf.runtime.allocator import jemalloc_path

PROBE = (
    "from rlhf.runtime.allocator import use_jemalloc; use_jemalloc(); "
    "print('jemalloc' in open('/proc/self/maps').read(), flush=True)"
)


def probe(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_MALLOC", "LD_PRELOAD"))}
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_runs_under_jemalloc_when_the_system_has_it():
    if jemalloc_path() is None:
        pytest.fail("no libjemalloc on this machine: `make setup` installs Debian's libjemalloc2 as root")
    assert probe() == "True"  # one line: the process re-executed once, not in a loop
    assert probe(RLHF_MALLOC="system") == "False"


KEEP = """
import ctypes, resource, torch
from rlhf.runtime.allocator import _mallctl, _read, keep_freed_memory

def faults():  # page faults of allocating and filling a tensor the size of a PPO step's logits (50 MB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(8, 32, 49152)
    x.fill_(1.0)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def decay():
    control = _mallctl()
    return None if control is None else _read(control, "arena.0.dirty_decay_ms", ctypes.c_ssize_t)

faults()
handed_back, before = faults(), decay()
with keep_freed_memory() as acts:
    faults()
    kept = faults()
print(acts, handed_back, kept, before == decay(), flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_freed_memory_is_kept_for_the_next_tensor_only_within_the_block():
    if jemalloc_path() is None:
        pytest.fail("no libjemalloc on this machine: `make setup` installs Debian's libjemalloc2 as root")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_MALLOC", "LD_PRELOAD", "MALLOC_CONF"))}
    for env, acts in (({"LD_PRELOAD": jemalloc_path()}, True), ({}, False)):
        proc = subprocess.run([sys.executable, "-c", KEEP], env={**clean, **env}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        on, handed_back, kept, restored = proc.stdout.split()
        assert on == str(acts) and restored == "True"
        if acts:  # 50 MB is 12,289 pages: faulted in again each time, unless kept
            assert int(handed_back) > 10_000 and int(kept) < 1_000
