"""What the web app tests share: a library built directly (no model), a real `rlhf serve` process on a free
loopback port, and signed-in HTTP clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rlhf.store.library import Library, PromptRow, SampleRow
from rlhf.webapp.security import add_evaluator

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_library(db: Path, n_prompts: int, k: int = 4, text=None) -> Path:
    """n_prompts prompts q0, q1, ... with k samples each (round 0); text(p, i) gives sample i of prompt p."""
    text = text or (lambda p, i: f"Answer {i} to question {p}: " + "quite good. " * (i + 1))
    lib = Library(db)
    with lib.write() as s:
        for p in range(n_prompts):
            s.add(PromptRow(id=f"q{p}", messages=[{"role": "user", "content": f"Question {p}: tell me something."}]))
            for i in range(k):
                s.add(
                    SampleRow(
                        key=f"k{p}-{i}",
                        prompt_id=f"q{p}",
                        model="m",
                        round=0,
                        text=text(p, i),
                        n_tokens=9,
                        finish_reason="eos",
                    )
                )
    return db


def add_people(db: Path, names: list[str], admins: tuple[str, ...] = ()) -> dict[str, str]:
    """{name: sign-in token} for new evaluators (the same code path as `rlhf annotators add`)."""
    lib = Library(db)
    return {name: add_evaluator(lib, name, is_admin=name in admins) for name in names}


class Server:
    """`python -m rlhf serve` in a subprocess on a free loopback port, started and waited for."""

    def __init__(self, db: Path, *flags: str, port: int | None = None):
        self.db, self.flags, self.port = db, flags, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = db.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        args = [sys.executable, "-m", "rlhf", "serve", "--library", str(self.db), "--port", str(self.port)]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([*args, *self.flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"rlhf serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1, trust_env=False).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f"rlhf serve did not answer within 30 s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, like a crash or the OOM killer."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Person:
    """One evaluator's browser-like HTTP client: a session cookie and the session's CSRF token."""

    def __init__(self, url: str, token: str, timeout: float = 30):
        self.client = httpx.Client(base_url=url, trust_env=False, timeout=timeout)
        r = self.client.post("/signin", data={"token": token})
        assert r.status_code == 303, f"sign-in failed: {r.status_code} {r.text[:200]}"
        self.csrf = self.client.get("/api/session").json()["csrf"]

    def task(self, kind: str = "rank") -> dict | None:
        r = self.client.get(f"/api/task/{kind}")
        assert r.status_code == 200, r.text
        return r.json()["task"]

    def post(self, path: str, body: dict, csrf: str | None = "session") -> httpx.Response:
        headers = {} if csrf is None else {"X-CSRF-Token": self.csrf if csrf == "session" else csrf}
        return self.client.post(path, json=body, headers=headers)

    def rank(self, task: dict, tiers: list[list[int]] | None = None, **extra) -> httpx.Response:
        """Submit a ranking; by default the order shown, no ties."""
        tiers = tiers if tiers is not None else [[r["id"]] for r in task["responses"]]
        return self.post(f"/api/rank/{task['assignment']}", {"tiers": tiers, **extra})

    def close(self) -> None:
        self.client.close()
