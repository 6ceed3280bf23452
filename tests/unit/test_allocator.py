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


REUSE = (
    "from rlhf.runtime.allocator import use_jemalloc; use_jemalloc(); "
    "import resource, torch\n"
    "def faults():\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "torch.ones(8, 32, 49152)\n"  # 50 MB, freed at once
    "before = faults(); torch.ones(8, 32, 49152); print(faults() - before, flush=True)"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_a_freed_large_tensor_is_reused_without_faulting_its_pages_in_again():
    if jemalloc_path() is None:
        pytest.fail("no libjemalloc on this machine: `make setup` installs Debian's libjemalloc2 as root")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_MALLOC", "LD_PRELOAD", "MALLOC_CONF"))}

    def page_faults(**env) -> int:
        proc = subprocess.run([sys.executable, "-c", REUSE], env={**clean, **env}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.strip())

    pages = 8 * 32 * 49152 * 4 // 4096  # 12288 pages of 4 KiB
    assert page_faults() < pages // 10  # the second 50 MB tensor lands on the first one's pages
    # the user's own MALLOC_CONF is kept: jemalloc purging at once faults every page in again
    assert page_faults(MALLOC_CONF="dirty_decay_ms:0,muzzy_decay_ms:0") > pages // 2
