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
    "from rlhf.runtime.allocator import keep_freed_pages, use_jemalloc; use_jemalloc()\n"
    "import resource, torch\n"
    "def faults():\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "def second_of_two():  # page faults of a 50 MB tensor made right after one was freed\n"
    "    torch.ones(8, 32, 49152); before = faults(); torch.ones(8, 32, 49152); return faults() - before\n"
    "outside = second_of_two()\n"
    "with keep_freed_pages():\n"
    "    inside = second_of_two()\n"
    "print(outside, inside, second_of_two(), flush=True)"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_freed_pages_are_reused_within_a_keep_block_and_handed_back_after_it():
    if jemalloc_path() is None:
        pytest.fail("no libjemalloc on this machine: `make setup` installs Debian's libjemalloc2 as root")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_MALLOC", "LD_PRELOAD", "MALLOC_CONF"))}
    proc = subprocess.run([sys.executable, "-c", REUSE], env=clean, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    outside, inside, after = map(int, proc.stdout.split())
    pages = 8 * 32 * 49152 * 4 // 4096  # 12288 pages of 4 KiB
    assert outside > pages // 2  # jemalloc's own way: the freed block's pages went back to the kernel
    assert inside < pages // 10  # kept: the second tensor lands on the first one's pages
    assert after > pages // 2  # the block's end restored jemalloc's decay


def test_keep_block_does_nothing_under_another_allocator():
    from rlhf.runtime.allocator import keep_freed_pages

    probe = "from rlhf.runtime.allocator import keep_freed_pages\nwith keep_freed_pages():\n    print('ran')"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_MALLOC", "LD_PRELOAD"))}
    proc = subprocess.run([sys.executable, "-c", probe], env=clean, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ran", proc.stderr
    with keep_freed_pages():  # in this process too, whatever its allocator
        pass
