"""The web app under load on loopback: many evaluators at once lose and duplicate nothing, and a label the server
acknowledged survives the server being killed with SIGKILL. Only counts are asserted; benchmarks/webapp_load.py
reports the throughput."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import select
from webapp_helpers import Person, Server, add_people, build_library

from rlhf.store.library import AssignmentRow, Library, RankingRow, WebTaskRow

UNLIMITED = ("--rate-limit", "1000000", "--rate-burst", "100000")


def shuffled_tiers(task: dict, rng: random.Random) -> list[list[int]]:
    ids = [r["id"] for r in task["responses"]]
    rng.shuffle(ids)
    return [ids[:1], ids[1:3], ids[3:]]  # a tie in the middle, so tiers travel too


def stored(db) -> dict[tuple[str, int], RankingRow]:
    """{(annotator, assignment id): ranking} for every ranking made through the app."""
    with Library(db).read() as s:
        rows = s.execute(
            select(AssignmentRow.annotator, AssignmentRow.id, RankingRow)
            .join(WebTaskRow, WebTaskRow.id == AssignmentRow.task_id)
            .join(
                RankingRow,
                (RankingRow.annotator == AssignmentRow.annotator)
                & (RankingRow.prompt_id == WebTaskRow.prompt_id)
                & (RankingRow.task_key == WebTaskRow.task_key),
            )
        ).all()
    return {(name, aid): r for name, aid, r in rows}


def assert_no_duplicates(db) -> list[RankingRow]:
    rankings = Library(db).rankings()
    assert len({(r.annotator, r.prompt_id, r.task_key) for r in rankings}) == len(rankings)
    return rankings


def test_50_concurrent_evaluators_store_1000_labels_exactly_once(tmp_path):
    clients, submits, overlap = 50, 20, 4
    db = build_library(tmp_path / "lib.db", 300)  # 1200 places for 1000 labels: nobody runs out of tasks
    tokens = add_people(db, [f"e{i:02d}" for i in range(clients)])
    acked: list[tuple[str, int, list]] = []

    def evaluator(name: str) -> None:
        rng = random.Random(name)
        person = Person(server.url, tokens[name], timeout=120)
        for _ in range(submits):
            task = person.task()
            tiers = shuffled_tiers(task, rng)
            r = person.rank(task, tiers)
            assert r.status_code == 200, r.text
            acked.append((name, task["assignment"], tiers))
        person.close()

    with Server(db, "--overlap", str(overlap), *UNLIMITED) as server:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(evaluator, tokens))  # re-raises the first failure
        seconds = time.perf_counter() - start
    print(
        f"\n{len(acked)} labels from {clients} concurrent evaluators in {seconds:.1f} s ({len(acked) / seconds:.0f}/s)"
    )

    rankings = assert_no_duplicates(db)
    assert len(acked) == len(rankings) == clients * submits
    by_assignment = stored(db)
    for name, assignment, tiers in acked:  # each acknowledged label is stored as it was sent
        r = by_assignment[(name, assignment)]
        assert [sorted(r.sample_ids[i] for i in tier) for tier in r.tiers] == [sorted(t) for t in tiers]
    per_task = {}
    for r in rankings:
        per_task[r.prompt_id] = per_task.get(r.prompt_id, 0) + 1
    assert max(per_task.values()) <= overlap


def test_acknowledged_labels_survive_sigkill_of_the_server(tmp_path):
    db = build_library(tmp_path / "lib.db", 200)
    names = [f"k{i:02d}" for i in range(20)]
    tokens = add_people(db, names)
    server = Server(db, "--overlap", "4", *UNLIMITED).start()
    people = {name: Person(server.url, tokens[name], timeout=30) for name in names}
    acked: list[tuple[str, int]] = []
    stop = threading.Event()

    def evaluator(name: str) -> None:
        rng = random.Random(name)
        while not stop.is_set():
            try:
                task = people[name].task()
                if task is None:
                    return
                if people[name].rank(task, shuffled_tiers(task, rng)).status_code == 200:
                    acked.append((name, task["assignment"]))  # the server said it is stored
            except httpx.TransportError:
                return  # the server is gone; whatever was in flight was never acknowledged

    threads = [threading.Thread(target=evaluator, args=(n,)) for n in names]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 150 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # SIGKILL, mid-load: no shutdown handler, no flush
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acked) >= 150, "the load never got going"

    with Server(db, "--overlap", "4", *UNLIMITED, port=server.port):  # restart on the same address
        kept = stored(db)
        lost = [a for a in acked if a not in kept]
        assert not lost, f"{len(lost)} acknowledged labels lost after SIGKILL: {lost[:5]}"
        assert_no_duplicates(db)
        # sessions live in the library too: everyone carries on, and a task cut off mid-submit can be resent
        for name, person in people.items():
            task = person.task()
            assert person.rank(task).status_code == 200, name
    assert len(assert_no_duplicates(db)) >= len(acked) + len(names)
