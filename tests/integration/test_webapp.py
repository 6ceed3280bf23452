"""The annotation web app over real HTTP: `rlhf serve` in a subprocess on loopback, one rule per test."""

from __future__ import annotations

import hashlib
import json
import re

import httpx
import pytest
from conftest import run_cli
from sqlalchemy import select
from webapp_helpers import Person, Server, add_people, build_library

from rlhf.config import FilterConfig
from rlhf.store.library import AnnotatorRow, AssignmentRow, Library, SampleRow, VoteRow, WebSessionRow

XSS = '<script>alert("owned")</script><img src=x onerror=alert(1)>'


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the tests that need no special settings: 40 prompts, overlap 2, generous rate limits.
    Each test signs in its own new evaluators, so tests do not see each other's tasks."""
    db = build_library(
        tmp_path_factory.mktemp("webapp") / "lib.db", 40, text=lambda p, i: f"{XSS} answer {i}" if i == 1 else f"a{i}"
    )
    with Server(db, "--overlap", "2", "--rate-limit", "100000", "--rate-burst", "10000") as server:
        yield server


def people(server: Server, *names: str, admins: tuple[str, ...] = ()) -> list[Person]:
    tokens = add_people(server.db, list(names), admins)
    return [Person(server.url, tokens[n]) for n in names]


def n_rankings(db) -> int:
    return len(Library(db).rankings())


def test_sign_in_link_from_the_cli_and_what_is_stored(shared):
    out = run_cli("annotators", "add", "dora", "--library", str(shared.db), "--url", shared.url).stdout
    link = re.search(r"(http://\S+/signin#token=(\S+))", out)
    assert link, out
    token = link.group(2)
    with Library(shared.db).read() as s:
        row = s.get(AnnotatorRow, "dora")
    assert row.kind == "human" and not row.is_admin
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()  # only the hash is kept
    stored = b"".join(f.read_bytes() for f in shared.db.parent.glob(shared.db.name + "*"))  # db, -wal, -shm
    assert token.encode() not in stored
    assert run_cli("annotators", "add", "dora", "--library", str(shared.db), check=False).returncode == 2

    anonymous = httpx.Client(base_url=shared.url, trust_env=False)
    assert anonymous.get("/rank").headers["location"] == "/signin"  # pages send strangers to sign in
    assert anonymous.get("/api/task/rank").status_code == 401
    assert anonymous.post("/signin", data={"token": "guess"}).status_code == 403
    r = anonymous.post("/signin", data={"token": token}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403  # a sign-in form posted from another site
    r = anonymous.post("/signin", data={"token": token})
    assert r.status_code == 303
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert anonymous.get("/api/session").json()["name"] == "dora"
    with Library(shared.db).read() as s:  # the session is stored as a hash too
        stored = s.scalars(select(WebSessionRow.token_hash).where(WebSessionRow.annotator == "dora")).all()
    assert stored == [hashlib.sha256(anonymous.cookies["rlhf_session"].encode()).hexdigest()]

    run_cli("annotators", "token", "dora", "--library", str(shared.db))  # a leaked link is replaced...
    assert anonymous.get("/api/session").status_code == 401  # ...which ends every session it opened
    assert httpx.post(shared.url + "/signin", data={"token": token}, trust_env=False).status_code == 403


def test_nobody_reads_or_overwrites_another_evaluators_label(shared):
    a, b = people(shared, "ann", "ben")
    task_a = a.task()
    assert a.rank(task_a, rationale="mine").json() == {"stored": True, "repeated": False}
    before = [(r.annotator, r.tiers, r.rationale) for r in Library(shared.db).rankings()]
    reversed_tiers = [[r["id"]] for r in reversed(task_a["responses"])]
    r = b.rank(task_a, reversed_tiers, rationale="overwritten")  # b uses a's assignment id
    assert r.status_code == 404 and "not one of yours" in r.json()["detail"]
    assert [(r.annotator, r.tiers, r.rationale) for r in Library(shared.db).rankings()] == before
    for path in ("/admin/export/rankings.jsonl", "/api/admin/stats"):
        assert b.client.get(path).status_code == 403
    assert b.task()["assignment"] != task_a["assignment"]


def test_model_output_is_shown_as_text_and_no_inline_script_may_run(shared):
    (p,) = people(shared, "eve")
    page = p.client.get("/rank")
    assert page.status_code == 200
    html = page.text
    assert "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<script>alert" not in html and "<img" not in html
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/app.js" defer>']  # no inline script
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"


def test_forged_rankings_are_refused_and_nothing_is_stored(shared):
    (p,) = people(shared, "fay")
    task = p.task()
    ids = [r["id"] for r in task["responses"]]
    other = next(x.id for x in Library(shared.db).samples() if x.id not in ids)  # a sample of another prompt
    before = n_rankings(shared.db)
    forged = {
        "a sample missing": [[i] for i in ids[:-1]],
        "a sample twice": [[i] for i in ids] + [[ids[0]]],
        "another task's sample": [[i] for i in ids[:-1]] + [[other]],
        "an empty tier": [[i] for i in ids] + [[]],
        "not ids": [[str(i)] for i in ids],
        "no tiers": [],
    }
    for what, tiers in forged.items():
        r = p.rank(task, tiers)
        assert r.status_code == 422, what
        assert r.json()["detail"], what
    assert "missing" in p.rank(task, forged["a sample missing"]).json()["detail"]
    assert "not one of this task" in p.rank(task, forged["another task's sample"]).json()["detail"]
    assert p.rank(task, None, verdict="x").status_code == 422  # unknown field
    assert p.rank(task, None, all_bad="yes").status_code == 422
    assert p.rank(task, None, rationale="x" * 5001).status_code == 422
    assert p.post(f"/api/compare/{task['assignment']}", {"choice": "A"}).status_code == 404  # not a side-by-side task
    assert n_rankings(shared.db) == before
    assert p.rank(task).status_code == 200 and n_rankings(shared.db) == before + 1


def test_state_changes_need_the_sessions_csrf_token(shared):
    (p,) = people(shared, "gil")
    task = p.task()
    before = n_rankings(shared.db)
    assert p.rank(task).request.headers["x-csrf-token"] == p.csrf
    assert p.post(f"/api/rank/{task['assignment']}", {"tiers": [[1]]}, csrf=None).status_code == 403
    assert p.post(f"/api/rank/{task['assignment']}", {"tiers": [[1]]}, csrf="wrong").status_code == 403
    (q,) = people(shared, "hal")
    assert p.post(f"/api/rank/{task['assignment']}", {"tiers": [[1]]}, csrf=q.csrf).status_code == 403
    assert p.client.post("/signout", data={}).status_code == 403  # a cross-site "sign out" link does nothing
    assert p.client.get("/api/session").status_code == 200
    assert n_rankings(shared.db) == before + 1  # only the first, well-formed submission
    assert p.client.post("/signout", data={"csrf": p.csrf}).status_code == 303
    assert p.client.get("/api/session").status_code == 401


def test_oversized_bodies_are_refused_with_413(shared):
    (p,) = people(shared, "ida")
    task = p.task()
    before = n_rankings(shared.db)
    huge = {"tiers": [[r["id"]] for r in task["responses"]], "rationale": "x" * 100_000}
    r = p.post(f"/api/rank/{task['assignment']}", huge)
    assert r.status_code == 413

    def chunks():  # no Content-Length: the server must count as it reads
        yield b'{"tiers": [[1]], "rationale": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    headers = {"X-CSRF-Token": p.csrf, "Content-Type": "application/json"}
    r = p.client.post(f"/api/rank/{task['assignment']}", content=chunks(), headers=headers)
    assert r.status_code == 413
    assert n_rankings(shared.db) == before


def test_admin_pages_are_for_admins_only(shared):
    boss, worker = people(shared, "boss", "wes", admins=("boss",))
    for path in ("/admin", "/api/admin/stats", "/admin/export/rankings.jsonl", "/admin/export/side-by-side.jsonl"):
        assert worker.client.get(path).status_code == 403, path
        assert boss.client.get(path).status_code == 200, path
    assert httpx.get(shared.url + "/admin", trust_env=False).status_code == 303


def test_each_task_goes_to_overlap_people_and_nobody_gets_a_prompt_twice(tmp_path):
    db = build_library(tmp_path / "lib.db", 5, k=3)
    names = ["p1", "p2", "p3", "p4"]
    tokens = add_people(db, names)
    with Server(db, "--overlap", "3", "--rate-limit", "100000", "--rate-burst", "10000") as server:
        clients = [Person(server.url, tokens[n]) for n in names]
        seen: dict[str, list[str]] = {n: [] for n in names}
        active = list(zip(names, clients, strict=True))
        while active:  # round-robin, so everyone competes for the same tasks
            for name, person in list(active):
                task = person.task()
                if task is None:
                    active.remove((name, person))
                    continue
                assert person.task()["assignment"] == task["assignment"]  # a reload shows the same task
                assert person.rank(task).status_code == 200
                assert person.rank(task).json()["repeated"] is True  # a retried submit stores nothing new
                seen[name].append(task["prompt"][0]["content"])
    rankings = Library(db).rankings()
    assert len(rankings) == 5 * 3  # every task exactly `overlap` times
    per_prompt = {p: sum(r.prompt_id == p for r in rankings) for p in {r.prompt_id for r in rankings}}
    assert set(per_prompt.values()) == {3}
    for name, prompts in seen.items():
        assert len(prompts) == len(set(prompts)), f"{name} got a prompt twice"
    assert sum(len(v) for v in seen.values()) == 15


def test_samples_written_while_the_app_runs_become_tasks(tmp_path):
    db = build_library(tmp_path / "lib.db", 1)
    token = add_people(db, ["ola"])["ola"]
    with Server(db, "--overlap", "1") as server:
        person = Person(server.url, token)
        assert person.rank(person.task()).status_code == 200
        assert person.task() is None
        with Library(db).write() as s:  # `rlhf sample` writes round 1 beside the running app
            for i in range(3):
                s.add(
                    SampleRow(key=f"r1-{i}", prompt_id="q0", model="m", round=1, text=f"new {i}", finish_reason="eos")
                )
        task = person.task()
        assert task is not None and {r["text"] for r in task["responses"]} == {"new 0", "new 1", "new 2"}


def test_a_changed_resubmission_is_refused(shared):
    (p,) = people(shared, "joe")
    task = p.task()
    assert p.rank(task).status_code == 200
    r = p.rank(task, [[r["id"]] for r in reversed(task["responses"])])
    assert r.status_code == 409 and "cannot be changed" in r.json()["detail"]


def test_rate_limit_answers_429_per_evaluator(tmp_path):
    db = build_library(tmp_path / "lib.db", 3)
    tokens = add_people(db, ["fast", "calm"])
    with Server(db, "--rate-limit", "6", "--rate-burst", "4") as server:
        fast, calm = Person(server.url, tokens["fast"]), Person(server.url, tokens["calm"])  # sign-in: 1 each
        codes = [fast.client.get("/api/progress").status_code for _ in range(6)]
        assert codes[:3] == [200, 200, 200] and codes[-1] == 429  # GET /api/session at sign-in took the 4th
        assert "slow down" in fast.client.get("/api/progress").json()["detail"]
        assert calm.client.get("/api/progress").status_code == 200  # one evaluator's burst does not stop others


def test_a_label_made_over_http_is_picked_up_by_filter(tmp_path):
    from rlhf.stages.filter import run as run_filter

    answers = ["Paris.", "It is Lyon, I think.", "No idea, sorry about that.", "The capital of France is Paris."]
    db = build_library(tmp_path / "lib.db", 2, text=lambda p, i: f"{answers[i]} ({p})")
    tokens = add_people(db, ["kim", "lee"])
    with Server(db, "--overlap", "2") as server:
        for name in ("kim", "lee"):
            person = Person(server.url, tokens[name])
            while (task := person.task()) is not None:
                best_first = sorted((r["id"] for r in task["responses"]), reverse=True)
                tiers = [best_first[:1], best_first[1:3], best_first[3:]]  # the middle two tied
                assert person.rank(task, tiers).status_code == 200
    report = run_filter(FilterConfig(library=str(db), report=str(tmp_path / "filter_report.json")))
    assert report["input"] == {"tasks": 2, "rankings": 4, "evaluators": 2, "candidate_pairs": 12}
    assert report["kept"] == {"tasks": 2, "pairs": 10} and report["dropped_pairs"]["tie"] == 2
    for c in Library(db).comparisons():  # the selection the reward model trains on follows the people's order
        assert c.n_evaluators == 2 and len(c.pairs) == 5
        assert all(c.sample_ids[better] > c.sample_ids[worse] for better, worse, _ in c.pairs)


def test_side_by_side_votes_become_the_human_win_rate_of_eval_and_report(tmp_path):
    from rlhf.report import write_report

    run_dir = tmp_path / "run"
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(parents=True)
    rows = [
        {"prompt_id": f"e{i}", "prompt": f"Prompt {i}", "a": f"plain answer {i}", "b": f"better answer {i}"}
        for i in range(4)
    ]
    (eval_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"a": "sft/final", "b": "ppo/final", "a_label": "SFT-secret", "b_label": "PPO-secret", "n_prompts": 4}
    (eval_dir / "summary.json").write_text(json.dumps({**summary, "win_rates": {}}))
    db = run_dir / "library.db"
    tokens = add_people(db, ["mia", "ned"])
    with Server(db, "--overlap", "2", "--compare", str(eval_dir)) as server:
        for name in ("mia", "ned"):
            person = Person(server.url, tokens[name])
            page = person.client.get("/compare").text
            assert "SFT-secret" not in page and "PPO-secret" not in page and "ppo/final" not in page  # blind
            while (task := person.task("compare")) is not None:
                side_of_b = next(r["label"] for r in task["responses"] if r["text"].startswith("better"))
                choice = side_of_b if name == "mia" or task["prompt"][0]["content"] != "Prompt 0" else "tie"
                r = person.post(f"/api/compare/{task['assignment']}", {"choice": choice})
                assert r.status_code == 200, r.text
    with Library(db).read() as s:
        assert len(s.scalars(select(VoteRow)).all()) == 8
        assert all(a.done_at is not None for a in s.scalars(select(AssignmentRow)))
    out = run_cli("eval", "human", "--eval", str(eval_dir), "--library", str(db)).stdout
    assert "93.8%" in out  # prompt 0: (1 + 0.5) / 2 = 0.75, the other three 1: mean 0.9375
    human = json.loads((eval_dir / "summary.json").read_text())["win_rates"]["human"]
    assert human["rate"] == 0.9375 and human["n"] == 4 and human["votes"] == 8 and human["wins"] == 4
    assert 0.75 <= human["low"] <= 0.9375 <= human["high"] <= 1.0
    html = write_report(run_dir).read_text()
    assert "people (side by side)" in html and "93.8%" in html


def test_an_abandoned_task_goes_to_someone_else_but_never_beyond_overlap(tmp_path):
    from datetime import timedelta

    from rlhf.webapp import tasks

    db = build_library(tmp_path / "lib.db", 1)
    lib = Library(db)
    add_people(db, ["slow", "quick"])
    lib.sync_rank_tasks()
    slow = tasks.next_task(lib, "slow", "rank", overlap=1, minutes=60)
    assert tasks.next_task(lib, "quick", "rank", overlap=1, minutes=60) is None  # the one place is taken
    with lib.write() as s:  # an hour and a bit later, the task is still open
        row = s.get(AssignmentRow, slow)
        row.created_at = row.created_at - timedelta(minutes=61)
    quick = tasks.next_task(lib, "quick", "rank", overlap=1, minutes=60)
    assert quick is not None
    order = [[r["id"]] for r in tasks.view(lib, "quick", quick)["responses"]]
    tasks.submit_ranking(lib, "quick", quick, order, False, None, overlap=1)
    with pytest.raises(tasks.TaskError) as refused:
        tasks.submit_ranking(lib, "slow", slow, order, False, None, overlap=1)
    assert refused.value.status == 409
    assert tasks.next_task(lib, "slow", "rank", overlap=1, minutes=60) is None  # the stale task is gone
    assert len(lib.rankings()) == 1


def test_guidelines_are_rendered_without_html_or_script_links(tmp_path):
    from rlhf.webapp.render import markdown_to_html

    html = str(markdown_to_html("# Rules\n\n**Be kind.** <script>alert(1)</script> [x](javascript:alert(1))\n"))
    assert "<h1>Rules</h1>" in html and "<strong>Be kind.</strong>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html and 'href="javascript' not in html
    r = run_cli("serve", "--library", str(tmp_path / "lib.db"), "--guidelines", str(tmp_path / "none.md"), check=False)
    assert r.returncode == 2 and "no such file" in r.stderr
