"""Training only the top layers of a transformer (trlx's `num_layers_unfrozen`): the backward pass stops at the
lowest trainable layer, so on small hardware a PPO update costs a fraction of a full one."""

from __future__ import annotations

import torch


def decoder_layers(model) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a causal LM or sequence classifier (Llama/Mistral/Qwen `layers`, GPT `h`)."""
    base = getattr(model, model.base_model_prefix, model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"{type(model).__name__}: no stack of decoder layers found; train all layers instead")


def train_top_layers(model, n: int) -> int:
    """Freeze the input embeddings and all but the top `n` blocks; what follows the blocks (final norm, an LM head
    not tied to the embeddings, a score head) stays trainable. Returns the number of trainable parameters."""
    layers = decoder_layers(model)
    if not 1 <= n <= len(layers):
        raise ValueError(f"trainable_layers ({n}) must be between 1 and the model's {len(layers)} layers")
    frozen = {id(p) for layer in layers[: len(layers) - n] for p in layer.parameters()}
    frozen |= {id(p) for p in model.get_input_embeddings().parameters()}  # a tied LM head stays frozen with them
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
