"""LoRA wrapping with peft, and turning a (possibly LoRA-wrapped) model back into a plain one for saving."""

from __future__ import annotations


def wrap_lora(model, r: int, alpha: int, dropout: float, target_modules: str, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type)
    return get_peft_model(model, config)


def plain_model(model):
    """The model with any LoRA adapters merged into its weights: a normal transformers model."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
