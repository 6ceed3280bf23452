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


FAILING_PPO = """
import ctypes, sys
from rlhf.config import PPOConfig
from rlhf.runtime.allocator import _mallctl, _read
from rlhf.stages import ppo

def decay():
    return _read(_mallctl(), "arena.0.dirty_decay_ms", ctypes.c_ssize_t)

def broken(*args, **kwargs):
    print("kept during the step:", decay() == -1, flush=True)
    raise RuntimeError("a step that fails")

ppo.ppo_updates = broken
before = decay()
cfg = PPOConfig(policy="tiny", reward="tiny", prompts="examples/prompts.jsonl", out=sys.argv[1], epochs=0.02,
                batch_size=4, mini_batch_size=4, micro_batch_size=4, max_new_tokens=4, mixed_precision="no",
                keep_freed_memory=True, progress=False)
try:
    ppo.run(cfg)
except RuntimeError as e:
    print("raised:", e, flush=True)
    error = e  # kept, with the run's frames, as a notebook keeps the last error
print("restored:", decay() == before != -1, flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_a_ppo_step_that_raises_gives_the_decay_back(tmp_path):
    """keep_freed_memory is for PPO's loop only: a step that raises (caught by a caller that goes on, a notebook
    that keeps the error and its frames) does not leave the process keeping every freed page."""
    if jemalloc_path() is None:
        pytest.fail("no libjemalloc on this machine: `make setup` installs Debian's libjemalloc2 as root")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_MALLOC", "LD_PRELOAD", "MALLOC_CONF"))}
    proc = subprocess.run(
        [sys.executable, "-c", FAILING_PPO, str(tmp_path / "run")],
        env={**clean, "LD_PRELOAD": jemalloc_path()},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "kept during the step: True" in proc.stdout
    assert "raised: a step that fails" in proc.stdout
    assert "restored: True" in proc.stdout
