"""The response library: prompts, sampled responses, annotators, rankings, gold utilities, selected comparisons."""

from rlhf.store.library import Library

__all__ = ["Library"]
