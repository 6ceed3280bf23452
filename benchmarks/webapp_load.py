"""How many labels per second does the annotation web app take on this machine?

    .venv/bin/python benchmarks/webapp_load.py [--clients 50] [--submits 20] [--overlap 4] [--k 4]

Builds a throw-away library (prompts with K samples, no model), adds one evaluator per client, starts `rlhf serve`
on a free loopback port, and has every client sign in and then ask for a task and submit a ranking `submits`
times, all clients at once (threads, httpx). Prints labels per second over the whole run, the latency of task
requests and of submissions (p50 / p95 / max), and checks that the library holds exactly clients × submits labels.
Each label is two requests (the task, then the ranking) and two committed transactions (the assignment, then the
label; SQLite WAL with synchronous=FULL, so each commit waits for the disk).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from rlhf.store.library import Library, PromptRow, SampleRow
from rlhf.webapp.security import add_evaluator


def build(db: Path, prompts: int, k: int, clients: int) -> dict[str, str]:
    lib = Library(db)
    with lib.write() as s:
        for p in range(prompts):
            s.add(PromptRow(id=f"q{p}", messages=[{"role": "user", "content": f"Question {p}?"}]))
            for i in range(k):
                s.add(SampleRow(key=f"{p}-{i}", prompt_id=f"q{p}", model="m", text=f"answer {i}", finish_reason="eos"))
    return {f"e{i:03d}": add_evaluator(lib, f"e{i:03d}") for i in range(clients)}


def serve(db: Path, overlap: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limits = ["--rate-limit", "1000000", "--rate-burst", "100000"]
    args = [
        sys.executable,
        "-m",
        "rlhf",
        "serve",
        "--library",
        str(db),
        "--port",
        str(port),
        "--overlap",
        str(overlap),
    ]
    proc = subprocess.Popen([*args, *limits], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/healthz", trust_env=False)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    raise SystemExit("rlhf serve did not start")


def client(url: str, token: str, submits: int, task_s: list, submit_s: list) -> None:
    with httpx.Client(base_url=url, trust_env=False, timeout=120) as c:
        c.post("/signin", data={"token": token})
        headers = {"X-CSRF-Token": c.get("/api/session").json()["csrf"]}
        for _ in range(submits):
            t0 = time.perf_counter()
            task = c.get("/api/task/rank").json()["task"]
            t1 = time.perf_counter()
            tiers = [[r["id"]] for r in task["responses"]]
            r = c.post(f"/api/rank/{task['assignment']}", json={"tiers": tiers}, headers=headers)
            r.raise_for_status()
            task_s.append(t1 - t0)
            submit_s.append(time.perf_counter() - t1)


def quantiles(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"p50 {1000 * statistics.median(xs):.0f} ms, p95 {1000 * xs[int(0.95 * (len(xs) - 1))]:.0f} ms, max {1000 * xs[-1]:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--submits", type=int, default=20, help="labels per client")
    ap.add_argument("--overlap", type=int, default=4)
    ap.add_argument("--k", type=int, default=4, help="responses per prompt")
    args = ap.parse_args()
    labels = args.clients * args.submits
    # 20% more places than labels, and at least one task per submission of a client: nobody runs out of tasks
    prompts = max(-(-labels * 6 // 5 // args.overlap), args.submits * 6 // 5)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "lib.db"
        tokens = build(db, prompts, args.k, args.clients)
        proc, url = serve(db, args.overlap)
        task_s: list[float] = []
        submit_s: list[float] = []
        try:
            threads = [
                threading.Thread(target=client, args=(url, t, args.submits, task_s, submit_s)) for t in tokens.values()
            ]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait()
        stored = len(Library(db).rankings())
    print(
        f"{args.clients} clients × {args.submits} submissions, K = {args.k}, overlap {args.overlap}, {prompts} prompts"
    )
    print(
        f"labels stored: {stored} of {labels} sent; {seconds:.1f} s including sign-in: {stored / seconds:.0f} labels/s"
    )
    print(f"task request: {quantiles(task_s)}")
    print(f"submission:   {quantiles(submit_s)}")
    if stored != labels:
        raise SystemExit(f"expected {labels} labels in the library, found {stored}")


if __name__ == "__main__":
    main()
