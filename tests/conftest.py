import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_cli(*args: str, env: dict | None = None, check: bool = True, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The real command line: `python -m rlhf ARGS` in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"rlhf {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_metrics(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture
def small_demos(tmp_path: Path) -> Path:
    """Eight short demonstrations: a tiny model can learn them within a few dozen steps."""
    rows = [
        {"id": f"d{i}", "prompt": f"Say the word number {i}.", "response": f"Word {i}: {w}."}
        for i, w in enumerate(["apple", "river", "stone", "cloud", "lemon", "tiger", "piano", "maple"])
    ]
    return write_jsonl(tmp_path / "demos.jsonl", rows)


@pytest.fixture
def server(monkeypatch):
    """A running FakeOpenAI; proxies and judge settings are cleared from the environment."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # urllib would send 127.0.0.1 through a proxy
    for name in ("RLHF_JUDGE_BASE_URL", "RLHF_JUDGE_MODEL", "RLHF_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    srv = FakeOpenAI()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
