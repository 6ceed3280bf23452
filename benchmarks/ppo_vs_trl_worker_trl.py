"""TRL 1.12's PPO trainer on the benchmark's work, run by `benchmarks/ppo_vs_trl.py` inside TRL's own virtual
environment (it imports nothing of this project). Prints one JSON line: per-step seconds, peak memory, rewards.

    TRL_VENV/bin/python benchmarks/ppo_vs_trl_worker_trl.py --spec SPEC.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer


class StepClock(TrainerCallback):
    """Wall time at the start of training and at the end of every PPO step; the logged metrics of each step."""

    def __init__(self):
        self.marks: list[float] = []
        self.logs: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "objective/scores" in logs:
            self.logs.append(dict(logs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True, help="the benchmark's settings (JSON)")
    parser.add_argument("--out", required=True, help="output folder (the trained policy is saved to OUT/final)")
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    torch.manual_seed(spec["seed"])

    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    tokenizer.pad_token = spec["pad_token"]  # never in text, so TRL's `!= pad_token_id` masks are right
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ref_policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1)
    for m in (policy, ref_policy, reward_model, value_model):
        m.config.pad_token_id = tokenizer.pad_token_id
        if getattr(m, "generation_config", None) is not None:
            m.generation_config.pad_token_id = tokenizer.pad_token_id

    prompts = spec["prompt_ids"]  # token ids of the chat-formatted prompts, in the order the steps use them
    dataset = Dataset.from_dict({"input_ids": prompts})
    config = PPOConfig(
        output_dir=str(Path(args.out) / "trainer"),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=spec["batch_size"],
        total_episodes=spec["steps"] * spec["batch_size"],
        response_length=spec["max_new_tokens"],
        stop_token="eos",
        temperature=spec["temperature"],
        learning_rate=spec["lr"],
        kl_coef=spec["kl_coef"],
        missing_eos_penalty=None,
        num_sample_generations=0,
        bf16=False,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=spec["seed"],
        dataloader_num_workers=0,
    )
    clock = StepClock()
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
        eval_dataset=dataset,
        callbacks=[clock],
    )
    trainer.train()
    final = Path(args.out) / "final"
    trainer.model.policy.save_pretrained(final)
    tokenizer.save_pretrained(final)
    step_seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)]
    result = {
        "step_seconds": step_seconds,
        "scores": [log["objective/scores"] for log in clock.logs],
        "kl": [log["objective/kl"] for log in clock.logs],
        "eos_tokens": [log.get("val/num_eos_tokens") for log in clock.logs],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final": str(final),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
