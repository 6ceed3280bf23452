"""SFT through the real command line on the tiny model: it learns, it saves a normal transformers folder,
it resumes exactly, and two processes train exactly like one."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, read_metrics, run_cli
from safetensors.torch import load_file

TINY = ["--model", "tiny", "--max-seq-len", "256", "--no-progress"]


def test_sft_learns_and_saves_a_plain_transformers_model(tmp_path, small_demos):
    out = tmp_path / "run"
    run_cli(
        "sft",
        *TINY,
        "--data",
        str(small_demos),
        "--out",
        str(out),
        "--epochs",
        "30",
        "--lr",
        "3e-3",
        "--eval-fraction",
        "0",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--save-every",
        "20",
    )
    losses = read_metrics(out, "loss")
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5  # memorising 8 short answers halves the loss

    final = out / "sft" / "final"
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "Say the word number 3."}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.startswith("Word")  # it learned the demonstrations' form
    generated = pipeline("text-generation", model=str(final))(messages, max_new_tokens=8, do_sample=False)
    assert generated[0]["generated_text"][-1]["role"] == "assistant"

    assert list((out / "tb" / "sft").glob("events.out.tfevents.*"))  # TensorBoard got the same metrics
    config = (out / "config.yaml").read_text()
    assert "sft:" in config and "rlhf_version" in config
    # Running again finds the stage complete instead of training twice.
    again = run_cli("sft", *TINY, "--data", str(small_demos), "--out", str(out), "--resume")
    assert "already complete" in again.stdout


def test_auto_precision_is_decided_once_and_recorded(tmp_path, small_demos):
    from rlhf.runtime.distributed import bf16_pays

    out = tmp_path / "run"
    proc = run_cli(
        "sft", *TINY, "--data", str(small_demos), "--out", str(out), "--epochs", "1", "--eval-fraction", "0",
        "--batch-size", "4", "--micro-batch-size", "4", "--mixed-precision", "auto",
    )  # fmt: skip
    expected = "bf16" if bf16_pays()[0] else "no"
    assert "mixed precision auto: " in proc.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["sft"]["mixed_precision"] == expected


def _weights(run):
    return load_file(run / "sft" / "final" / "model.safetensors")


def test_resume_equals_uninterrupted(tmp_path, small_demos):
    common = [
        *TINY,
        "--data",
        str(small_demos),
        "--epochs",
        "4",
        "--lr",
        "1e-3",
        "--eval-fraction",
        "0.25",
        "--eval-every",
        "3",
        "--save-every",
        "100",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "1",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli("sft", *common, "--out", str(straight))
    first = run_cli("sft", *common, "--out", str(split), "--stop-after-steps", "5")
    assert "stopped at step 5 of 12" in first.stdout
    assert not (split / "sft" / "final").exists()

    refused = run_cli("sft", *common, "--out", str(split), check=False)  # forgot --resume
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    changed = run_cli("sft", *common, "--out", str(split), "--resume", "--lr", "2e-3", check=False)
    assert changed.returncode == 2 and "lr: checkpoint has 0.001, this run has 0.002" in changed.stderr

    run_cli("sft", *common, "--out", str(split), "--resume")
    assert read_metrics(straight, "loss") == read_metrics(split, "loss")
    assert read_metrics(straight, "heldout_loss") == read_metrics(split, "heldout_loss")
    a, b = _weights(straight), _weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def free_port() -> int:
    """A port nobody listens on now, so a rerun never meets the last run's rendezvous port in TIME_WAIT."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_with_double_batch(tmp_path, small_demos):
    common = [
        *TINY,
        "--data",
        str(small_demos),
        "--epochs",
        "3",
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--eval-fraction",
        "0.25",
        "--save-every",
        "100",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("sft", *common, "--out", str(one), "--micro-batch-size", "4")
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    proc = subprocess.run(
        [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "rlhf",
            "sft",
            *common,
            "--out",
            str(two),
            "--micro-batch-size",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    for key in ("loss", "heldout_loss"):
        a, b = read_metrics(one, key), read_metrics(two, key)
        assert len(a) == len(b) > 0
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_lora_trains_adapters_and_saves_merged_model(tmp_path, small_demos):
    out = tmp_path / "lora"
    proc = run_cli(
        "sft",
        *TINY,
        "--data",
        str(small_demos),
        "--out",
        str(out),
        "--lora",
        "--lora-r",
        "4",
        "--epochs",
        "10",
        "--lr",
        "1e-2",
        "--eval-fraction",
        "0",
    )
    assert "(LoRA)" in proc.stdout
    losses = read_metrics(out, "loss")
    assert losses[-1] < losses[0]
    from transformers import AutoModelForCausalLM

    from rlhf.models.load import load_causal_lm

    tuned = AutoModelForCausalLM.from_pretrained(out / "sft" / "final")  # plain model, no peft needed
    base, _ = load_causal_lm("tiny")
    names = {n for n, _ in tuned.named_parameters()}
    assert not any("lora" in n for n in names)
    assert not torch.equal(tuned.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_malformed_data_stops_the_cli_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok", "response": "fine"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    proc = run_cli("sft", *TINY, "--data", str(bad), "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    assert f'{bad}:2: field "response" is missing' in proc.stderr


def test_interactive_chat_keeps_the_conversation():
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf", "chat", "--model", "tiny", "--max-new-tokens", "4"],
        input="Hello\nAnd again\n/reset\nThird\n/quit\n",
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model> ") == 3


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_chat_and_generate_answer_once(tmp_path, small_demos, command):
    if command == "chat":
        proc = run_cli("chat", "--model", "tiny", "--prompt", "Hello?", "--max-new-tokens", "5")
    else:
        proc = run_cli(
            "generate",
            "--model",
            "tiny",
            "--model",
            "tiny",
            "--prompts",
            str(small_demos),
            "-n",
            "2",
            "--max-new-tokens",
            "5",
        )
        assert proc.stdout.count("=== [d") == 2 and proc.stdout.count("--- tiny:") == 4
    assert proc.stdout.strip()


def test_response_nll_runs_the_head_from_the_first_trained_column_with_the_full_forwards_loss():
    import torch.nn.functional as F

    from rlhf.data.chat import TokenizedDemo
    from rlhf.data.collate import IGNORE_INDEX, collate_sft
    from rlhf.models.load import load_causal_lm
    from rlhf.stages.sft import response_nll

    model, _ = load_causal_lm("tiny")
    gen = torch.Generator().manual_seed(0)
    demos = [  # prompts of 9, 5 and 12 tokens: the head starts at column 4, which predicts row 2's first answer token
        TokenizedDemo(torch.randint(5, 200, (n,), generator=gen).tolist(), p, False)
        for n, p in ((20, 9), (8, 5), (15, 12))
    ]
    batch = collate_sft(demos, 0)
    rows = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    nll, count = response_nll(model, batch)
    hook.remove()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(nll, full, rtol=1e-6, atol=1e-5)
    assert count == (20 - 9) + (8 - 5) + (15 - 12)
    assert rows == [20 - 1 - 4]  # positions 4 … 18 of the 20 columns
    nll.backward()  # gradients flow as before
    assert model.get_input_embeddings().weight.grad is not None
