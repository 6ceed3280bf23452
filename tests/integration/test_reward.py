"""The reward model on the tiny model: score position under padding, one forward per response, learning from
simulated rankings, and a saved model that plain transformers loads with identical scores."""

import json

import pytest
import torch
from conftest import run_cli, write_jsonl

from rlhf.annotators.synthetic import write_synthetic_library
from rlhf.models.reward import load_reward_model, pad_batch, score

TINY = ["--model", "tiny", "--max-seq-len", "384", "--no-progress"]


def test_score_is_read_at_the_last_real_token_whatever_the_padding():
    model, tok = load_reward_model("tiny")
    model.eval()
    seqs = [[5, 6, 7, 8, 9, tok.eos_token_id], [10, 11, tok.eos_token_id], [12, 13, 14, 15]]
    alone = torch.stack([score(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
    for side in ("right", "left"):
        ids, mask = pad_batch(seqs, tok.pad_token_id, side)
        assert torch.allclose(score(model, ids, mask), alone, atol=1e-5)
    # and the pad token can never be confused with a real final token (SmolLM2-style tokenizers pad with EOS)
    assert tok.pad_token_id != tok.eos_token_id


@pytest.fixture(scope="module")
def simulated_library(tmp_path_factory):
    """K = 4 responses of known quality per prompt (demonstrations and degraded copies), ranked by the panel."""
    db = tmp_path_factory.mktemp("lib") / "library.db"
    write_synthetic_library(db, draws=2, seed=0)
    run_cli("annotate", "--library", str(db), "--evaluators", "3", "--no-progress")
    run_cli("filter", "--library", str(db), "--no-require-eos", "--max-repetition", "1.0")
    return db


def test_tiny_reward_model_learns_simulated_preferences_and_round_trips(tmp_path, simulated_library):
    out = tmp_path / "run"
    proc = run_cli(
        "rm",
        *TINY,
        "--library",
        str(simulated_library),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--lr",
        "3e-3",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--eval-fraction",
        "0.2",
        "--eval-every",
        "1000",
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "heldout_accuracy" in m]
    before, after = evals[0], evals[-1]
    # ~230 held-out pairs: 0.6 is over three standard errors above chance
    assert after["heldout_accuracy"] > 0.6 and after["heldout_accuracy"] > before["heldout_accuracy"] + 0.1, (
        proc.stdout
    )
    assert after["gold_accuracy"] > 0.6  # the panel's hidden gold, never trained on
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5

    # Plain transformers loads it and gives the scores `rlhf rm score` gives.
    rows = [
        {"prompt": "How do I boil an egg?", "response": "Boil it for 7 minutes, then cool it in cold water."},
        {"prompt": "Say hi.", "response": "Hi!"},
        {"prompt": "Say hi.", "response": "GO AWAY, IDIOT!!"},
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    run_cli(
        "rm", "score", "--model", str(out / "rm" / "final"), "--data", str(data), "--out", str(tmp_path / "s.jsonl")
    )
    ours = [json.loads(line)["score"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(out / "rm" / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "rm" / "final")
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}], tokenize=False
        )
        for r in rows
    ]
    texts = [t[: t.rindex(tok.eos_token) + len(tok.eos_token)] for t in texts]  # end at the response's EOS
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        theirs = hf(**enc).logits[:, 0].tolist()
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_each_response_is_forwarded_once_per_step(tmp_path, simulated_library, monkeypatch):
    from rlhf.config import RewardConfig
    from rlhf.stages import reward

    calls = []
    real_score = reward.score

    def counting(model, input_ids, attention_mask):
        if torch.is_grad_enabled():
            calls.append(input_ids.shape[0])
        return real_score(model, input_ids, attention_mask)

    monkeypatch.setattr(reward, "score", counting)
    cfg = RewardConfig(
        model="tiny",
        library=str(simulated_library),
        out=str(tmp_path),
        batch_size=8,
        micro_batch_size=4,
        stop_after_steps=3,
        max_seq_len=384,
        eval_fraction=0.0,
        progress=False,
    )
    reward.run(cfg)
    assert calls == [4 * 4] * 6  # 3 steps × 2 micro-batches, each 4 prompts × K=4 responses, one forward each


def test_pairwise_file_with_reference_centring(tmp_path):
    rows = [
        {"prompt": f"Question {i}?", "chosen": f"A careful answer number {i}.", "rejected": f"no {i}"}
        for i in range(24)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"prompt": f"Q{i}?", "response": f"Answer {i}."} for i in range(5)])
    out = tmp_path / "run"
    proc = run_cli(
        "rm",
        *TINY,
        "--data",
        str(data),
        "--out",
        str(out),
        "--reference",
        str(refs),
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
    )
    assert "K=2–2" in proc.stdout
    summary = json.loads((out / "rm" / "final" / "rlhf_stage.json").read_text())
    shift = summary["reference_shift"]
    assert shift["n_reference"] == 5 and abs(shift["reference_mean_after"]) < 1e-5
    scored = run_cli("rm", "score", "--model", str(out / "rm" / "final"), "--data", str(refs))
    scores = [json.loads(line)["score"] for line in scored.stdout.splitlines() if line.startswith("{")]
    assert len(scores) == 5 and abs(sum(scores) / 5) < 1e-4  # the saved model scores its references 0 on average


def test_lora_reward_model_saves_a_plain_model(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"A careful answer {i}.", "rejected": f"no {i}"} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run_cli(
        "rm",
        *TINY,
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--lora",
        "--lora-r",
        "4",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--eval-fraction",
        "0",
    )
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "rm" / "final")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert model.score.weight.abs().sum() > 0
