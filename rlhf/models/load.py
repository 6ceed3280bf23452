"""Loading a causal LM and its tokenizer by name: a save_pretrained folder, `embedded`, or `tiny`."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.models.attention import use_small_attention
from rlhf.models.tiny import CHATML_TEMPLATE

EMBEDDED_NAMES = ("embedded", "default")
TINY = "tiny"


class ModelLoadError(RuntimeError):
    pass


def resolve(name: str | None) -> str:
    """The folder (or `tiny`) that `name` stands for; `None` and `embedded` mean the embedded default."""
    if name is None or name in EMBEDDED_NAMES:
        from rlhf.models.embedded import embedded_model_dir

        return str(embedded_model_dir())
    return name


def _fix_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        warnings.warn(f"{name}: the tokenizer has no chat template; using ChatML", stacklevel=3)
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_tokenizer(name: str | None) -> PreTrainedTokenizerBase:
    path = resolve(name)
    if path == TINY:
        from rlhf.models.tiny import tiny_tokenizer

        return tiny_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_not_found(path, e)) from e
    return _fix_tokenizer(tokenizer, path)


# use_kernels=False: where the `kernels` package is installed (transformers 5 brings it), transformers would swap
# layers for kernels from the Hugging Face hub (a download at run time) and, at every train() and eval(), take away
# the forward that `lean_backward` gives each RMSNorm: PPO's trained norms ran transformers' own, with its larger
# backward, until this was seen.
def load_causal_lm(
    name: str | None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for `name`; the tokenizer always has a pad token and a chat template. Attention runs as
    `small_attention` (plain products where they beat SDPA's kernel on a CPU)."""
    path = resolve(name)
    tokenizer = load_tokenizer(path)
    if path == TINY:
        from rlhf.models.tiny import tiny_model

        model = tiny_model(tokenizer).to(dtype)
        use_small_attention(model)
        return model, tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=False)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_not_found(path, e)) from e
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    use_small_attention(model)
    return model, tokenizer


def _not_found(path: str, error: Exception) -> str:
    hint = "" if Path(path).exists() else " (no such folder; the model hub may not be reachable from here)"
    return (
        f"could not load the model {path!r}{hint}: {error}\n"
        "Give a folder written by save_pretrained, `embedded` for the built-in SmolLM2-135M-Instruct, "
        "or `tiny` for a small random model."
    )
