"""Loading policies (a save_pretrained folder, the embedded default, or a tiny random model) and generation."""

from rlhf.models.load import ModelLoadError, load_causal_lm, load_tokenizer

__all__ = ["ModelLoadError", "load_causal_lm", "load_tokenizer"]
