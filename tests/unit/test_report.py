"""The HTML report from a fake run folder: headline numbers, inline plots, escaping, resume dedup, missing parts."""

import json
import math

import pytest
import yaml

from rlhf.report import write_report
from rlhf.report.html import read_metrics, split_round
from rlhf.report.plots import offset_steps

WIN = {"wins": 30, "ties": 2, "losses": 8, "n": 40, "rate": 0.775, "low": 0.62, "high": 0.88}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _metrics(run):
    rows = []
    for step in range(1, 11):
        rows.append({"stage": "sft", "step": step, "time": 0.0, "loss": 3.0 / step, "lr": 1e-4})
        if step % 5 == 0:
            rows.append({"stage": "sft", "step": step, "time": 0.0, "heldout_loss": 3.2 / step})
    rows.append({"stage": "sft", "step": 3, "time": 1.0, "loss": 0.9})  # resumed: step 3 logged again
    for step in range(1, 9):
        acc = 0.5 + step / 40
        rows.append({"stage": "rm", "step": step, "time": 0.0, "loss": 0.7 - step / 50, "train_accuracy": acc})
        rows.append({"stage": "rm", "step": step, "time": 0.0, "heldout_accuracy": acc - 0.05, "gold_accuracy": acc})
    for stage in ("ppo", "ppo-r1"):
        for step in range(1, 21):
            kl = step * 0.15 + (2.0 if stage == "ppo-r1" else 0.0)
            rows.append(
                {
                    "stage": stage,
                    "step": step,
                    "time": 0.0,
                    "reward": math.sqrt(kl),
                    "gold_reward": 0.5 + 0.1 * math.sqrt(kl),
                    "kl": kl,
                    "kl_coef": 0.05,
                    "entropy": 2.0,
                    "response_length": 80 - step,
                    "eos_rate": 0.5 + step / 50,
                    "approx_kl": None if step == 7 else 0.01,  # non-finite values are logged as null
                    "non_finite_skips": 0,
                }
            )
    _jsonl(run / "metrics.jsonl", rows)


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run-1"
    run.mkdir()
    _metrics(run)
    config = {"rlhf_version": "0.1.0", "git_sha": "abc123", "sft": {"model": "tiny", "lr": 1e-4, "prompts": ["a"]}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    filt = {
        "input": {"tasks": 20, "rankings": 60, "evaluators": 3, "candidate_pairs": 120},
        "dropped_pairs": {"low_quality_evaluator": 0, "all_bad": 6, "tie": 10, "near_identical": 4},
        "kept": {"tasks": 18, "pairs": 100},
        "low_quality_evaluators": [],
        "agreement": {
            "pairwise_agreement": 0.812,
            "krippendorff_alpha": 0.456,
            "per_evaluator": {"ann-0": {"loo_agreement": 0.8, "n_prompts": 20}},
            "n_prompts": 20,
            "n_labels": 60,
        },
    }
    (run / "filter_report.json").write_text(json.dumps(filt))
    (run / "rm" / "final").mkdir(parents=True)
    heldout = {"heldout_accuracy": 0.7, "heldout_pairs": 50, "gold_accuracy": 0.85, "gold_pairs": 50}
    (run / "rm" / "final" / "rlhf_stage.json").write_text(
        json.dumps({"stage": "rm", "steps": 8, "heldout": {**heldout, "score_mean": 0.1, "score_std": 1.0}})
    )
    (run / "eval").mkdir()
    summary = {
        "a": "runs/x/sft/final",
        "b": "runs/x/ppo/final",
        "a_label": "SFT",
        "b_label": "PPO",
        "round": 0,
        "n_prompts": 40,
        "win_rates": {"rm": {**WIN, "rate": 0.9}, "gold": WIN},
        "mean_length": {"a": 80.1, "b": 45.2},
        "eos_rate": {"a": 0.6, "b": 0.95},
        "kl_to_reference": {"a": 0.0, "b": 3.2},
        "mean_reward": {"a": -0.2, "b": 1.1},
        "mean_gold": {"a": 0.6, "b": 0.7},
    }
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    gens = [
        {
            "prompt_id": f"p{i}",
            "prompt": f"Question {i}?\nSecond line <script>alert(1)</script>",
            "a": "SFT answer & more",
            "b": "PPO answer\n\nwith a paragraph",
            "a_tokens": 30,
            "b_tokens": 12,
            "a_finished": False,
            "b_finished": True,
            "a_rm": -0.3,
            "b_rm": 1.2,
            "a_gold": 0.5,
            "b_gold": 0.8,
            "judge": "b" if i % 2 else None,
        }
        for i in range(12)
    ]
    _jsonl(run / "eval" / "generations.jsonl", gens)
    return run


def test_full_report(run):
    path = write_report(run)
    assert path == run / "report.html" and path.is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".report")], "no temporary file is left behind"
    page = path.read_text()
    assert "run-1" in page
    assert "PPO vs SFT win rate by gold (simulated panel): 77.5% [62.0%, 88.0%]" in page
    assert "90.0%" in page  # the reward model's verdict
    assert "81.2%" in page and "0.456" in page  # panel agreement
    assert "85.0%" in page  # RM gold accuracy
    assert page.count('<img src="data:image/png;base64,') >= 5
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "SFT answer &amp; more" in page
    assert page.count('class="sample"') == 8  # the first 8 prompts only
    assert "not run" not in page
    assert "<details><summary>sft</summary>" in page and "abc123" in page


def test_metrics_last_line_wins_and_lines_of_a_step_merge(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"stage": "sft", "step": 2, "time": 0, "loss": 1.0},
        {"stage": "sft", "step": 1, "time": 0, "loss": 2.0},
        {"stage": "sft", "step": 2, "time": 0, "heldout_loss": 1.5},  # a held-out line for the same step
        {"stage": "ppo", "step": 1, "time": 0, "kl": None},
        {"stage": "sft", "step": 2, "time": 1, "loss": 0.5},  # resumed: step 2 logged again
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "sft", "st')  # torn last line
    with pytest.warns(UserWarning, match=r"metrics.jsonl:6"):
        m = read_metrics(path)
    assert [r["step"] for r in m["sft"]] == [1, 2]
    assert m["sft"][1] == {"stage": "sft", "step": 2, "time": 1, "loss": 0.5, "heldout_loss": 1.5}
    assert m["ppo"] == [{"stage": "ppo", "step": 1, "time": 0, "kl": None}]


def test_rounds_follow_each_other():
    assert split_round("ppo") == ("ppo", 0) and split_round("ppo-r12") == ("ppo", 12)
    assert split_round("rm-r1") == ("rm", 1)
    rounds = offset_steps([("ppo", [{"step": 1}, {"step": 20}]), ("ppo-r1", [{"step": 1}, {"step": 5}])])
    assert [r["step"] for _, rows in rounds for r in rows] == [1, 20, 21, 25]


def test_missing_parts_say_not_run(tmp_path):
    _jsonl(tmp_path / "metrics.jsonl", [{"stage": "sft", "step": s, "time": 0, "loss": 1.0 / s} for s in (1, 2, 3)])
    page = write_report(tmp_path).read_text()
    assert page.count('<img src="data:image/png;base64,') == 1
    for part in ("Evaluation: not run", "RM: not run", "PPO: not run", "Preference data filter: not run"):
        assert part in page
    assert "Config: no config.yaml" in page


def test_eval_only(run):
    for p in ("metrics.jsonl", "filter_report.json", "config.yaml"):
        (run / p).unlink()
    page = write_report(run).read_text()
    assert "77.5%" in page and "SFT: not run" in page


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        write_report(tmp_path)
