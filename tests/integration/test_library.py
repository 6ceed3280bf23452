"""The response library through the real command line: sampling, annotating, importing and filtering."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SHARED_DATA, run_cli, write_jsonl
from sqlalchemy import select

from rlhf.store.library import GoldRow, Library, PromptRow, RankingRow, SampleRow

PROMPTS = ROOT / "examples" / "prompts.jsonl"


def rows(db) -> list[tuple]:
    return sorted((s.key, s.text, s.n_tokens, s.finish_reason) for s in Library(db).samples())


def test_sampling_resumes_after_a_kill_and_never_duplicates(tmp_path):
    args = [
        "sample",
        "--model",
        "tiny",
        "--prompts",
        str(PROMPTS),
        "--limit",
        "12",
        "--k",
        "3",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "96",
        "--temperature",
        "1.0",
        "--no-progress",
    ]
    straight, killed = tmp_path / "straight.db", tmp_path / "killed.db"
    run_cli(*args, "--library", str(straight))
    assert len(rows(straight)) == 36

    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", *args, "--library", str(killed)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if killed.exists() and Library(killed).count(SampleRow) >= 6:  # at least one batch committed
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(rows(killed))
    assert partial % 6 == 0  # whole batches only: a batch is one transaction
    resumed = run_cli(*args, "--library", str(killed))
    assert f"generating for {12 - partial // 3}" in resumed.stdout
    assert rows(killed) == rows(straight)  # the same rows an uninterrupted run wrote
    again = run_cli(*args, "--library", str(killed))
    assert "generating for 0" in again.stdout and rows(killed) == rows(straight)

    samples = Library(killed).samples()
    assert {s.model for s in samples} == {"tiny"} and {s.round for s in samples} == {0}
    assert all(s.finish_reason in ("eos", "length") and 0 < s.n_tokens <= 96 for s in samples)
    assert all(s.finish_reason == "eos" or s.n_tokens == 96 for s in samples)


def _library_with_tasks(db, n_prompts: int, k: int = 4) -> None:
    lib = Library(db)
    with lib.write() as s:
        for p in range(n_prompts):
            s.add(PromptRow(id=f"q{p}", messages=[{"role": "user", "content": f"Tell me about topic {p}."}]))
            for i in range(k):
                text = f"Topic {p} is interesting for reason {i}." * (i + 1)
                s.add(
                    SampleRow(
                        key=f"k{p}-{i}",
                        prompt_id=f"q{p}",
                        model="m",
                        round=0,
                        text=text,
                        n_tokens=10,
                        finish_reason="eos",
                    )
                )


def test_concurrent_annotators_lose_nothing(tmp_path):
    db = tmp_path / "lib.db"
    _library_with_tasks(db, 150)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "rlhf", "annotate", "--library", str(db), "--seed", seed, "--no-progress"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in ("0", "1", "0")  # two panels, one of them started twice at once
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    rankings = Library(db).rankings()
    assert len(rankings) == 2 * 150 * 3  # every label of both panels, none twice
    assert len({(r.annotator, r.prompt_id, r.task_key) for r in rankings}) == len(rankings)
    assert len(Library(db).gold()) == 150 * 4


def test_simulated_labels_are_complete_reproducible_and_keep_gold_apart(tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    for db in (a, b):
        _library_with_tasks(db, 20)
        run_cli("annotate", "--library", str(db), "--evaluators", "5", "--no-progress")
    ra, rb = Library(a).rankings(), Library(b).rankings()
    assert [(r.annotator, r.prompt_id, r.tiers) for r in ra] == [(r.annotator, r.prompt_id, r.tiers) for r in rb]
    assert len(ra) == 100 and {r.annotator for r in ra} == {f"sim-{e}@seed0" for e in range(5)}
    for r in ra:
        assert sorted(i for tier in r.tiers for i in tier) == [0, 1, 2, 3] and len(r.sample_ids) == 4
    with Library(a).read() as s:
        gold = list(s.scalars(select(GoldRow)))
    assert len(gold) == 80 and all(0 <= g.utility <= 1 for g in gold)


def test_user_function_annotator(tmp_path):
    db = tmp_path / "lib.db"
    _library_with_tasks(db, 3)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "integration"), os.environ.get("PYTHONPATH", "")])}
    run_cli("annotate", "--library", str(db), "--annotator", "python:user_ranker:shortest_first", env=env)
    rankings = Library(db).rankings()
    assert len(rankings) == 3 and all(r.tiers == [[0], [1], [2], [3]] and r.rationale == "brevity" for r in rankings)
    bad = run_cli("annotate", "--library", str(db), "--annotator", "python:user_ranker:broken", env=env, check=False)
    assert bad.returncode == 2 and "appears more than once" in bad.stderr
    assert len(Library(db).rankings()) == 3  # nothing half-written


def _comparison_library(db) -> None:
    """Hand-made tasks, one per filter rule, with known outcomes (comments say which pairs each rule drops)."""
    lib = Library(db)
    texts = {
        "good": [
            "Paris is the capital of France.",
            "It is Lyon, I think.",
            "France's capital city is Paris, on the Seine.",
            "No idea.",
        ],
        "dup": ["The answer is 42.", "The answer is 42!", "Forty-two, clearly.", "Maybe 41."],
        "degen": ["", "fine answer here.", "loop loop loop loop loop loop loop loop loop loop", "cut off answ"],
    }
    finish = {"degen": ["eos", "eos", "eos", "length"]}
    with lib.write() as s:
        for task, ts in texts.items():
            s.add(PromptRow(id=task, messages=[{"role": "user", "content": f"Question {task}?"}]))
            for i, t in enumerate(ts):
                s.add(
                    SampleRow(
                        key=f"{task}-{i}",
                        prompt_id=task,
                        model="m",
                        round=0,
                        text=t,
                        n_tokens=5,
                        finish_reason=finish.get(task, ["eos"] * 4)[i],
                    )
                )
        s.flush()
        ids = {
            task: [
                x.id for x in s.scalars(select(SampleRow).where(SampleRow.prompt_id == task).order_by(SampleRow.id))
            ]
            for task in texts
        }
        for name in ("e1", "e2", "e3", "bad"):
            lib.ensure_annotator(s, name, "human")

        def rank(task, annotator, tiers, all_bad=False):
            s.add(
                RankingRow(
                    prompt_id=task,
                    annotator=annotator,
                    task_key="r0",
                    sample_ids=ids[task],
                    tiers=tiers,
                    all_bad=all_bad,
                )
            )

        # "good": e1, e2 agree fully; e3 swaps 0 and 2 → pair (0,2) has strength 2/3 (kept at 0.6), (1,3) tied by
        # all three → dropped as a tie; "bad" reverses everyone everywhere → low-quality evaluator.
        rank("good", "e1", [[0], [2], [1, 3]])
        rank("good", "e2", [[0], [2], [1, 3]])
        rank("good", "e3", [[2], [0], [1, 3]])
        rank("good", "bad", [[1, 3], [2], [0]])
        # "dup": responses 0 and 1 are near-identical → that pair dropped; 2 vs 3 split 2:1 → strength 2/3, kept;
        # and with a stricter threshold dropped as low agreement.
        rank("dup", "e1", [[0], [1], [2], [3]])
        rank("dup", "e2", [[1], [0], [2], [3]])
        rank("dup", "e3", [[0], [1], [3], [2]])
        rank("dup", "bad", [[3], [2], [1], [0]])
        # "degen": responses 0 (empty), 2 (repetition) and 3 (no EOS) are degenerate → all 6 pairs dropped.
        rank("degen", "e1", [[1], [0], [2], [3]])
        rank("degen", "e2", [[1], [0], [2], [3]])
        rank("degen", "e3", [[1], [0], [2], [3]])
        rank("degen", "bad", [[3], [2], [0], [1]])
        # a task everyone labels "all bad"
        s.add(PromptRow(id="allbad", messages=[{"role": "user", "content": "Q?"}]))
        for i in range(3):
            s.add(
                SampleRow(
                    key=f"allbad-{i}",
                    prompt_id="allbad",
                    model="m",
                    round=0,
                    text=f"meh {i} " * (i + 1),
                    n_tokens=3,
                    finish_reason="eos",
                )
            )
        s.flush()
        ids["allbad"] = [x.id for x in s.scalars(select(SampleRow).where(SampleRow.prompt_id == "allbad"))]
        for name in ("e1", "e2", "e3"):
            rank("allbad", name, [[0], [1], [2]], all_bad=True)


def test_each_filter_rule_drops_exactly_its_pairs(tmp_path):
    db = tmp_path / "lib.db"
    _comparison_library(db)
    run_cli("filter", "--library", str(db), "--report", str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["low_quality_evaluators"] == ["bad"]
    assert report["input"] == {"tasks": 4, "rankings": 15, "evaluators": 4, "candidate_pairs": 6 + 6 + 6 + 3}
    assert report["dropped_pairs"] == {
        "low_quality_evaluator": 0,
        "all_bad": 3,
        "degenerate_response": 6,
        "tie": 1,
        "near_identical": 1,
        "low_agreement": 0,
    }
    assert report["kept"] == {"tasks": 2, "pairs": 5 + 5}
    assert report["degenerate_responses"] == {"empty": 1, "repetition": 1, "no_eos": 1}
    selected = {c.prompt_id: c for c in Library(db).comparisons()}
    assert set(selected) == {"good", "dup"}
    good = {(b, w): strength for b, w, strength in selected["good"].pairs}
    assert good[(0, 2)] == pytest.approx(2 / 3) and good[(0, 1)] == 1.0 and (1, 3) not in good and (3, 1) not in good
    assert all({b, w} != {0, 1} for b, w, _ in selected["dup"].pairs)

    # Stricter agreement: the 2:1 pairs now fall to low_agreement; the selection is replaced, not appended.
    run_cli("filter", "--library", str(db), "--report", str(tmp_path / "r2.json"), "--min-pair-agreement", "0.7")
    strict = json.loads((tmp_path / "r2.json").read_text())
    assert strict["dropped_pairs"]["low_agreement"] == 2  # (0, 2) of "good", (2, 3) of "dup"
    assert strict["kept"]["pairs"] == 10 - 2 == sum(len(c.pairs) for c in Library(db).comparisons())
    assert Library(db).count(RankingRow) == 15  # filtering selects; nothing is deleted


def test_import_pairwise_ranked_and_reimport(tmp_path):
    db = tmp_path / "lib.db"
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"prompt": "Capital of Peru?", "chosen": "Lima", "rejected": "Lima"},  # not a preference: reported
        ],
    )
    ranked = write_jsonl(tmp_path / "ranked.jsonl", [{"prompt": "2+2?", "responses": ["4", "four", "5"]}])
    out = run_cli("import", str(pairs), "--library", str(db))
    assert "1 imported" in out.stdout and "1 not imported" in out.stdout and "pairs.jsonl:2:" in out.stdout
    run_cli("import", str(ranked), "--library", str(db))
    again = run_cli("import", str(pairs), "--library", str(db))
    assert "0 imported, 1 already in the library" in again.stdout
    lib = Library(db)
    assert lib.count(PromptRow) == 1  # the same prompt in both files is one prompt
    tiers = sorted(r.tiers for r in lib.rankings())
    assert tiers == [[[0], [1]], [[0], [1], [2]]]
    strict = run_cli("import", str(pairs), "--library", str(db), "--strict", check=False)
    assert strict.returncode == 1


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the checkout")
def test_import_of_real_hh_accounts_for_every_row(tmp_path):
    db = tmp_path / "lib.db"
    out = run_cli("import", str(SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"), "--library", str(db))
    head = out.stdout.splitlines()[0]
    n_rows, n_imported, n_failed = (
        2312,
        Library(db).count(RankingRow),
        sum(line.startswith("  ") and ".jsonl.gz:" in line for line in out.stdout.splitlines()),
    )
    assert f"{n_rows} rows" in head and f"{n_imported} imported" in head and f"{n_failed} not imported" in head
    assert n_imported + n_failed == n_rows and n_imported >= 2250
    assert Library(db).count(SampleRow) == 2 * n_imported


def test_judge_annotator_through_the_cli(tmp_path, server):
    db = tmp_path / "lib.db"
    _library_with_tasks(db, 2)
    server.reply("RATIONALE: 2 is clearest.\nALL_BAD: no\nRANKING: 2 > 1 = 3 > 4")
    judge = ["--annotator", "judge", "--judge-base-url", server.base_url, "--judge-model", "judge-m"]
    run_cli("annotate", "--library", str(db), *judge)
    rankings = Library(db).rankings()
    assert [(r.annotator, r.tiers, r.rationale) for r in rankings] == [
        ("judge:judge-m", [[1], [0, 2], [3]], "2 is clearest.")
    ] * 2
    assert len(server.requests) == 2 and "Topic 0 is interesting" in json.dumps(server.requests[0]["json"])
    server.script.clear()
    server.reply("I like the second one best.")  # no RANKING line: a clear failure, never a default ranking
    _library_with_tasks(tmp_path / "other.db", 1)
    bad = run_cli("annotate", "--library", str(tmp_path / "other.db"), *judge, check=False)
    assert bad.returncode == 2 and "RANKING" in bad.stderr and Library(tmp_path / "other.db").count(RankingRow) == 0
