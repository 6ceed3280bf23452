"""One dataclass per stage. Every field has a default and a docstring (shown by `rlhf STAGE --help`).

YAML files and command-line flags only set fields of these dataclasses: there is one source of truth.
Precedence: dataclass default < `--config FILE.yaml` < flags.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    """What every training stage shares: run folder, optimiser, schedule, LoRA, precision, checkpoints."""

    eval_fraction: float = 0.1
    """share of the data held out for evaluation when no held-out file is given (0 disables evaluation)"""
    out: str = "runs/default"
    """run folder; a stage writes OUT/STAGE/ (final/ and checkpoints/), OUT/metrics.jsonl, OUT/tb/"""
    epochs: float = 2.0
    """passes over the training data (fractions allowed)"""
    batch_size: int = 8
    """examples per optimiser step (demonstrations; ranked prompts for the reward model), over all processes and
    accumulation steps"""
    micro_batch_size: int = 4
    """examples per forward pass on each process; batch_size / (micro_batch_size · processes) = accumulation"""
    lr: float = 5e-5
    """peak learning rate of AdamW"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW β1, β2"""
    warmup_ratio: float = 0.1
    """share of optimiser steps spent warming the learning rate up linearly from 0"""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """learning-rate decay after warm-up (to 0 for cosine and linear)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (0 disables clipping)"""
    max_seq_len: int = 512
    """longest prompt + response in tokens. Longer ones are counted and reported: SFT cuts the response (or leaves
    out a demonstration whose prompt alone fills it); the reward model keeps the conversation's last tokens"""
    lora: bool = False
    """train LoRA adapters instead of all weights (peft); final/ holds the merged model"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling numerator: the update is (alpha / r)·BA"""
    lora_dropout: float = 0.0
    """dropout on the LoRA input"""
    lora_target_modules: str = "all-linear"
    """modules that get adapters: `all-linear` or comma-separated names (q_proj,v_proj)"""
    mixed_precision: Literal["no", "bf16", "auto"] = "no"
    """bf16 autocast with float32 master weights (faster on GPUs and on CPUs with bf16 instructions: AVX512-BF16,
    AMX, Arm BF16; ~100× slower on CPUs without them); auto: bf16 where it is faster, else float32 (decided at the
    start and recorded)"""
    seed: int = 0
    """seeds the data order, the held-out split and initialisation of new weights"""
    eval_every: int = 25
    """optimiser steps between held-out evaluations (also at the start and the end)"""
    save_every: int = 50
    """optimiser steps between checkpoints (one is also written when stopping early; the end writes final/)"""
    keep_checkpoints: int = 2
    """checkpoints kept; older ones are deleted once a newer one is complete"""
    log_every: int = 1
    """optimiser steps between metric lines"""
    stop_after_steps: int | None = None
    """stop (with a checkpoint) after this many optimiser steps; the schedule still spans the full run"""
    resume: bool = False
    """continue from OUT/STAGE/checkpoints/latest (refused if the checkpoint's config differs)"""
    progress: bool = True
    """show a progress bar"""
    stage_name: str | None = None
    """folder under OUT and tag in metrics.jsonl (default: the stage's own name; the pipeline's later rounds use
    rm-r1, ppo-r1, ...)"""

    # Fields that may differ between a checkpoint and the run that resumes it: they do not shape the trajectory.
    RESUME_FREE: ClassVar[tuple[str, ...]] = (
        "out",
        "resume",
        "stop_after_steps",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "progress",
        "stage_name",
    )

    def validate(self) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("batch_size and micro_batch_size must be at least 1")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction ({self.eval_fraction}) must be in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio ({self.warmup_ratio}) must be in [0, 1)")
        if self.epochs <= 0 or self.lr <= 0:
            raise ConfigError("epochs and lr must be positive")
        if self.max_seq_len < 2:
            raise ConfigError("max_seq_len must be at least 2")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ConfigError("stop_after_steps must be at least 1")

    def fingerprint(self) -> dict:
        """The fields a checkpoint must agree with to be resumed."""
        return {k: v for k, v in to_dict(self).items() if k not in self.RESUME_FREE}


@dataclass
class SFTConfig(TrainConfig):
    """Stage 1, supervised fine-tuning on human demonstrations (InstructGPT §3.5)."""

    model: str = "embedded"
    """policy to fine-tune: a save_pretrained folder, `embedded` (SmolLM2-135M-Instruct) or `tiny` (random, tests)"""
    data: str = "examples/demos.jsonl"
    """demonstrations (JSONL): prompt or messages + response; Alpaca/Self-Instruct; or Anthropic HH dialogues"""
    data_format: Literal["auto", "rlhf", "alpaca", "hh"] = "auto"
    """format of `data` and `eval_data`; `auto` decides from the first row's fields"""
    eval_data: str | None = None
    """held-out demonstrations; when unset, `eval_fraction` of `data` is held out"""
    epochs: float = 2.0
    """passes over the training demonstrations (fractions allowed)"""
    lr: float = 5e-5
    """peak learning rate of AdamW"""


@dataclass
class SampleConfig:
    """Stage 2a: the policy writes K responses per prompt into the response library (InstructGPT §3.4)."""

    model: str = "embedded"
    """the policy that answers: a save_pretrained folder (usually OUT/sft/final), `embedded` or `tiny`"""
    prompts: str = "examples/prompts.jsonl"
    """prompts JSONL (id + prompt or messages); they are added to the library"""
    library: str = "runs/default/library.db"
    """the response library: an SQLite path or a database URL (postgresql://...)"""
    k: int = 4
    """responses per prompt, 2 to 9 (InstructGPT ranked K = 4 to 9)"""
    round: int = 0
    """which round of the recipe these samples belong to (round r samples from round r-1's policy)"""
    temperature: float = 1.0
    """sampling temperature: 1 samples the policy as it is, so rankings describe its own distribution"""
    top_p: float = 1.0
    """nucleus sampling threshold (1 disables)"""
    max_new_tokens: int = 128
    """longest response; a response cut here is recorded with finish reason `length`"""
    batch_size: int = 8
    """prompts per generation batch (each yields k sequences); one database transaction per batch"""
    limit: int | None = None
    """only the first N prompts of the file"""
    seed: int = 0
    """each batch is seeded from this and its prompt ids, so a resumed run writes what an uninterrupted one would"""
    progress: bool = True
    """show a progress bar"""

    def validate(self) -> None:
        if not 2 <= self.k <= 9:
            raise ConfigError(f"k ({self.k}) must be between 2 and 9")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class AnnotateConfig:
    """Stage 2b: rank each prompt's K responses (simulated panel, AI judge, or your function)."""

    library: str = "runs/default/library.db"
    """the response library"""
    annotator: str = "simulated"
    """who ranks: `simulated` (a panel standing in for people), `judge` (an OpenAI-compatible endpoint) or
    `python:module:function` (your function (prompt, responses) -> ranking)"""
    round: int | None = None
    """rank only this round's samples (default: every round with unranked samples)"""
    evaluators: int = 3
    """simulated: evaluators per prompt, each ranking every prompt (more evaluators, more reliable consensus)"""
    noise: Literal["bradley_terry", "thurstone"] = "bradley_terry"
    """simulated: choice noise model"""
    noise_scale: float = 0.035
    """simulated: choice noise; the default makes evaluators agree on ~72.6% of sampled pairs, as InstructGPT's did
    (calibration: rlhf/annotators/simulated.py, PanelConfig)"""
    weight_spread: float = 0.5
    """simulated: how much evaluators' priorities differ (log-normal σ of their criterion weights)"""
    seed: int = 0
    """simulated: seeds the evaluators' hidden weights and choice noise"""
    judge_base_url: str | None = None
    """judge: base URL of the chat-completions API, e.g. http://localhost:8000/v1 (or env RLHF_JUDGE_BASE_URL)"""
    judge_model: str | None = None
    """judge: model name (or env RLHF_JUDGE_MODEL); the key is read from env RLHF_JUDGE_API_KEY or OPENAI_API_KEY"""
    limit: int | None = None
    """rank at most this many tasks (prompts) in this run"""
    progress: bool = True
    """show a progress bar"""

    def validate(self) -> None:
        if not (self.annotator in ("simulated", "judge") or self.annotator.startswith("python:")):
            raise ConfigError(
                f"annotator {self.annotator!r}: expected `simulated`, `judge` or `python:module:function`"
            )
        if self.evaluators < 1:
            raise ConfigError(f"evaluators ({self.evaluators}) must be at least 1")


@dataclass
class FilterConfig:
    """Stage 2c: aggregate evaluators into consensus comparisons and select what the reward model trains on."""

    library: str = "runs/default/library.db"
    """the response library; nothing is deleted from it: filtering selects"""
    selection: str = "default"
    """name of the selection written (the reward model reads a selection by name)"""
    report: str | None = None
    """where to write filter_report.json (default: beside the library)"""
    min_evaluator_agreement: float = 0.5
    """drop every label of an evaluator whose agreement with the others' consensus is below this"""
    min_pair_agreement: float = 0.6
    """drop a consensus pair when fewer than this share of its evaluators (ties half) agree with it"""
    near_duplicate: float = 0.9
    """drop a pair whose two responses are this similar (difflib ratio of normalised text; 1 = identical)"""
    max_repetition: float = 0.5
    """a response whose share of repeated word 3-grams exceeds this is degenerate and leaves its pairs"""
    require_eos: bool = True
    """a response cut at max_new_tokens (no EOS) is degenerate"""
    drop_all_bad: bool = True
    """drop a task that most of its evaluators flagged as all bad"""

    def validate(self) -> None:
        for name in ("min_evaluator_agreement", "min_pair_agreement", "near_duplicate", "max_repetition"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be in [0, 1]")


@dataclass
class RewardConfig(TrainConfig):
    """Stage 2d: a reward model trained on whole K-way rankings (InstructGPT §3.5, eq. 1)."""

    model: str = "embedded"
    """trunk of the reward model (usually OUT/sft/final, or a reward model to continue); a scalar head reads the
    last token"""
    library: str | None = None
    """the response library to train on: the comparisons `rlhf filter` selected"""
    selection: str = "default"
    """which filtered selection of the library"""
    data: str | None = None
    """instead of a library: a pairwise, ranked or Anthropic HH JSONL file"""
    data_format: Literal["auto", "pairwise", "ranked", "hh"] = "auto"
    """format of `data` and `eval_data`"""
    eval_data: str | None = None
    """held-out comparisons file; when unset, `eval_fraction` of the prompts is held out"""
    reference: str | None = None
    """demonstrations JSONL whose responses should score 0 on average: the head is shifted after training"""
    margin_scale: float = 0.0
    """each pair must be won by margin_scale · (2·agreement − 1) (Llama 2 §3.2.2); 0 disables margins"""
    epochs: float = 1.0
    """passes over the training rankings (InstructGPT: one; more overfits)"""
    lr: float = 2e-5
    """peak learning rate of AdamW"""
    eval_every: int = 25
    """optimiser steps between held-out evaluations (also at the start and the end)"""

    def validate(self) -> None:
        super().validate()
        if (self.library is None) == (self.data is None):
            raise ConfigError("give exactly one of --library (a filtered response library) or --data (a file)")
        if self.margin_scale < 0:
            raise ConfigError("margin_scale must be >= 0")


@dataclass
class PPOConfig(TrainConfig):
    """Stage 3: PPO against the reward model with a per-token KL penalty to the SFT policy (InstructGPT §3.5;
    Huang et al. 2024, "The N+ implementation details of RLHF with PPO")."""

    policy: str = "embedded"
    """the policy to train, usually OUT/sft/final (or the previous round's OUT/ppo/final)"""
    reward: str | None = None
    """the reward model, usually OUT/rm/final (required)"""
    reference: str | None = None
    """frozen reference policy for the KL penalty (default: the policy as it starts; with --lora, the same weights
    with the adapters switched off, not a second copy)"""
    value_init: Literal["reward", "policy"] = "reward"
    """the value model starts from the reward model (InstructGPT) or from the policy with a new head"""
    prompts: str = "examples/prompts.jsonl"
    """prompts to roll out on (JSONL: id + prompt or messages)"""
    trainable_layers: int | None = None
    """train only the top N transformer layers of policy and value model (trlx's num_layers_unfrozen): the
    backward pass stops below them, so updates cost much less on small hardware; a frozen bottom that several of the
    policy, reference, value and reward model hold with the same weights is kept once, and its output computed once
    per step; None trains every layer"""
    value_trainable_layers: int | None = None
    """train only the top N layers of the value model (default: as many as --trainable-layers). The value model only
    gives PPO its baseline, and a few trained layers over the frozen bottom learn it: with fewer than the policy's,
    its frozen bottom continues the policy's (computed once per step from it, and shared by the reward model), and
    each update back-propagates through fewer blocks"""
    gold: bool = False
    """also log the simulated panel's gold reward of the rollouts (its criteria need no model; evaluation only)"""
    epochs: float = 1.0
    """passes over the prompts; PPO steps = ceil(epochs · prompts / batch_size)"""
    batch_size: int = 16
    """prompts rolled out per PPO step, over all processes"""
    mini_batch_size: int = 8
    """rollouts per PPO update (minibatch), over all processes; batch_size / mini_batch_size updates per epoch"""
    micro_batch_size: int = 4
    """rollouts per forward pass on each process (gradient accumulation inside a minibatch)"""
    ppo_epochs: int = 2
    """passes of PPO updates over each step's rollouts"""
    lr: float = 1e-5
    """peak learning rate of AdamW (policy and value model together, one optimiser as in N+ details)"""
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    """learning-rate decay over the PPO updates (N+ details anneal linearly)"""
    warmup_ratio: float = 0.0
    """share of updates spent warming the learning rate up"""
    save_every: int = 10
    """PPO steps between checkpoints"""
    keep_freed_memory: bool = False
    """while PPO runs, keep the memory of freed tensors for the next ones (jemalloc's decay off) instead of handing it
    back to the system, which faults it in and zero-fills it again page by page: on the demo settings ~195k fewer
    page faults a step (~0.3 s of ~5.5 s on a 2-core CPU) for ~0.11 GB more peak memory (2.20 → 2.31 GB); full fine-tuning holds
    more memory freed and reused at other sizes (its peak grew 5.8 → 6.1–6.9 GB). Needs the `rlhf` command's jemalloc
    (`make setup`); elsewhere nothing changes"""
    max_prompt_len: int = 256
    """prompts longer than this many tokens are left out (counted and named)"""
    max_new_tokens: int = 64
    """the longest response; a response that reaches it without EOS gets eos_penalty instead of its score"""
    temperature: float = 1.0
    """rollout sampling temperature; log-probabilities use the same temperature (N+ details)"""
    rollout_logprobs: Literal["auto", "sampling", "forward"] = "auto"
    """the rollouts' log-probs under the policy (for the KL and PPO's old log-probs): kept from the sampling pass
    (its logits were computed anyway: one forward pass fewer per step), or recomputed by the forward pass that
    training uses (N+ details); auto: sampling in float32 (equal within 1e-5), forward under bf16 (the cached bf16
    pass differs by ~0.04 nats per token, which showed as lower win rates)"""
    kl_coef: float = 0.05
    """β in r_t = score·1[t=T] − β·KL_t; the starting value when adaptive_kl"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimate: k1 = log π − log π_ref (InstructGPT) or k3 = (r − 1) − log r (Schulman, never < 0)"""
    adaptive_kl: bool = False
    """adapt β towards kl_target (Ziegler et al. 2019 §2.2)"""
    kl_target: float = 6.0
    """adaptive_kl: the KL (nats per response) that β is steered to"""
    kl_horizon: int = 10000
    """adaptive_kl: rollouts over which β moves by at most ±20% of its error"""
    gamma: float = 1.0
    """discount in GAE"""
    lam: float = 0.95
    """λ in GAE"""
    whiten_advantages: bool = True
    """normalise advantages to mean 0, variance 1 over each step's response tokens"""
    cliprange: float = 0.2
    """PPO ratio clip ε"""
    cliprange_value: float = 0.2
    """value clip: the new value may move at most this far from the rollout's value before the loss clips"""
    vf_coef: float = 0.1
    """weight of the value loss in the one loss of policy and value model"""
    entropy_coef: float = 0.0
    """entropy bonus weight (0: none, as in InstructGPT)"""
    eos_penalty: float | None = -1.0
    """score given instead of the reward model's to a response that never emits EOS (None: keep the RM score)"""
    reward_normalize: bool = False
    """standardise scores with running mean and std over all rollouts so far (kept in checkpoints)"""
    reward_clip: float | None = None
    """clip scores (after normalisation) to ±this"""
    target_approx_kl: float | None = None
    """stop a step's PPO epochs early once the mean approximate KL of an epoch exceeds this"""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of a language-model loss on ptx_data mixed into every update (InstructGPT §3.5)"""
    ptx_data: str | None = None
    """PPO-ptx: demonstrations or plain-text prompts/responses JSONL for the language-model loss"""
    max_non_finite: int = 3
    """stop after this many PPO updates in a row skipped for a non-finite loss, gradient, reward or KL"""

    def validate(self) -> None:
        super().validate()
        if not self.reward:
            raise ConfigError("give the reward model: --reward OUT/rm/final")
        if self.mini_batch_size < 1 or self.batch_size % self.mini_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"mini_batch_size ({self.mini_batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if self.ppo_epochs < 1 or self.max_new_tokens < 1 or self.max_non_finite < 1:
            raise ConfigError("ppo_epochs, max_new_tokens and max_non_finite must be at least 1")
        if self.temperature <= 0:
            raise ConfigError("temperature must be positive (PPO samples the policy)")
        if self.kl_coef < 0 or self.ptx_coef < 0 or self.vf_coef < 0:
            raise ConfigError("kl_coef, vf_coef and ptx_coef must be >= 0")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("ptx_coef > 0 needs --ptx-data (demonstrations for the language-model loss)")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError("gamma and lam must be in [0, 1]")
        for name in ("trainable_layers", "value_trainable_layers"):
            n = getattr(self, name)
            if n is not None and (self.lora or n < 1):
                raise ConfigError(f"{name} must be at least 1, and cannot be combined with --lora")


@dataclass
class EvalConfig:
    """Compare two policies on held-out prompts: win rate by the reward model, by gold and by an AI judge."""

    a: str = "embedded"
    """the baseline policy (usually OUT/sft/final)"""
    b: str = "embedded"
    """the policy compared with it (usually OUT/ppo/final); win rates say how often B beats A"""
    a_label: str = "A"
    """name of A in the summary and report"""
    b_label: str = "B"
    """name of B in the summary and report"""
    prompts: str = "examples/prompts.jsonl"
    """held-out prompts (never trained on)"""
    limit: int | None = None
    """only the first N prompts"""
    reward: str | None = None
    """reward model for the RM win rate (optional)"""
    reference: str | None = None
    """reference policy for the KL of each model's responses (default: A)"""
    gold: bool = False
    """win rate by the simulated panel's gold utility (meaningful when the panel labelled the training data)"""
    judge_base_url: str | None = None
    """AI judge: base URL of an OpenAI-compatible API (or env RLHF_JUDGE_BASE_URL); unset: no judge win rate"""
    judge_model: str | None = None
    """AI judge: model name (or env RLHF_JUDGE_MODEL)"""
    out: str = "runs/default/eval"
    """folder for summary.json and generations.jsonl"""
    max_new_tokens: int = 64
    """the longest response (use the PPO run's, so both models have the same room)"""
    temperature: float = 0.7
    """sampling temperature of both models (0: greedy)"""
    top_p: float = 0.9
    """nucleus sampling threshold"""
    batch_size: int = 16
    """prompts per generation batch"""
    seed: int = 0
    """seeds sampling (each model sees the same seeds) and the bootstrap intervals"""
    progress: bool = True
    """show a progress bar"""

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class ServeConfig:
    """`rlhf serve`: the annotation web app. People rank each prompt's responses and judge two models side by side;
    their labels are ordinary rows of the library. Evaluators are added with `rlhf annotators add NAME`."""

    library: str = "runs/default/library.db"
    """the response library: its samples become ranking tasks and people's labels are stored in it"""
    host: str = "127.0.0.1"
    """address to listen on; 0.0.0.0 for every interface (then put HTTPS in front and set secure_cookie)"""
    port: int = 8000
    """TCP port to listen on"""
    guidelines: str | None = None
    """markdown file of labelling instructions shown to evaluators (raw HTML in it is shown as text)"""
    overlap: int = 3
    """evaluators per task: each prompt's responses (and each side-by-side pair) go to this many different people"""
    compare: str | None = None
    """an `rlhf eval` folder: its generations.jsonl become blind side-by-side tasks (model A vs B)"""
    compare_name: str | None = None
    """name of that side-by-side set (default: PARENT/FOLDER of the eval folder, e.g. demo/eval)"""
    assignment_minutes: float = 60.0
    """a task left unsubmitted this long may also go to someone else (never beyond `overlap` labels)"""
    session_hours: float = 12.0
    """how long a sign-in lasts"""
    max_body_bytes: int = 65536
    """a request with a larger body is refused with 413 before it is read"""
    rate_limit: float = 120.0
    """requests per minute one evaluator may make, sustained (a token bucket); beyond it the answer is 429"""
    rate_burst: int = 60
    """requests one evaluator may make in a burst before rate_limit applies"""
    secure_cookie: bool = False
    """mark the session cookie Secure (sent over HTTPS only): set it whenever the app is reached over HTTPS"""

    def validate(self) -> None:
        if self.overlap < 1:
            raise ConfigError(f"overlap ({self.overlap}) must be at least 1")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port ({self.port}) must be in 1..65535")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes ({self.max_body_bytes}) must be at least 1024")
        if self.rate_limit <= 0 or self.rate_burst < 1:
            raise ConfigError("rate_limit must be positive and rate_burst at least 1")
        if self.assignment_minutes <= 0 or self.session_hours <= 0:
            raise ConfigError("assignment_minutes and session_hours must be positive")
        if self.guidelines and not Path(self.guidelines).is_file():
            raise ConfigError(f"guidelines: {self.guidelines}: no such file")
        if self.compare and not (Path(self.compare) / "generations.jsonl").is_file():
            raise ConfigError(
                f"compare: {self.compare}/generations.jsonl not found (run `rlhf eval --out` there first)"
            )


@dataclass
class PipelineConfig:
    """`rlhf pipeline`: SFT → sample → annotate → filter → RM → PPO → eval → report in one run folder, in rounds.

    A pipeline YAML sets these fields at its top level and any stage's fields under a section named after the
    stage (`sft:`, `sample:`, `annotate:`, `filter:`, `rm:`, `ppo:`, `eval:`); the pipeline fills in the paths that
    connect the stages (models, library, run folder)."""

    out: str = "runs/demo"
    """the run folder"""
    model: str = "embedded"
    """the pretrained model SFT starts from"""
    prompts: str = "examples/prompts.jsonl"
    """the prompt library"""
    demos: str = "examples/demos.jsonl"
    """human demonstrations for SFT (and the reward model's zero point)"""
    eval_prompts: int = 40
    """prompts held out for evaluation (chosen among prompts without a demonstration; never trained on)"""
    sample_prompts: int | None = None
    """prompts whose responses are ranked in each round (round r takes the next ones, cycling); None: all"""
    rounds: int = 1
    """repetitions of sample → annotate → filter → RM → PPO; round r samples from round r−1's PPO policy"""
    rm_continue: bool = False
    """later rounds continue training the previous reward model instead of retraining from the SFT model"""
    seed: int = 0
    """seeds the held-out split (each stage has its own seed field)"""

    SECTIONS: ClassVar[tuple[str, ...]] = ("sft", "sample", "annotate", "filter", "rm", "ppo", "eval")

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds ({self.rounds}) must be at least 1")
        if self.eval_prompts < 1:
            raise ConfigError("eval_prompts must be at least 1")
        if self.sample_prompts is not None and self.sample_prompts < 1:
            raise ConfigError("sample_prompts must be at least 1")


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field), read from the source of cls and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs


def _coerce(cls, name: str, value, hint):
    """Check a YAML value against the field's type hint, converting where YAML is loose (int for float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{cls.__name__}.{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(cls, name, value, inner[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{cls.__name__}.{name} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(cls, name, v, a) for v, a in zip(value, args, strict=True))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{cls.__name__}.{name} must be {hint.__name__}, got {value!r}")
    return value


def build(cls, values: dict):
    """An instance of `cls` from a mapping, refusing unknown keys and wrongly typed values; validated."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {', '.join(names)}")
    cfg = cls(**{k: _coerce(cls, k, v, hints[k]) for k, v in values.items()})
    cfg.validate()
    return cfg


def load_yaml(path: str | Path, section: str | None = None) -> dict:
    """Field values from a YAML file: the whole mapping, or its `section:` when the file has one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value")
    if section and isinstance(doc.get(section), dict):
        return doc[section]
    return doc
