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
