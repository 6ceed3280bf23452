"""Record schemas and readers. Imports no model code, so it loads in milliseconds."""

from rlhf.data.jsonl import DataError, read_jsonl
from rlhf.data.records import Demonstration, Prompt, read_demonstrations, read_prompts

__all__ = ["DataError", "Demonstration", "Prompt", "read_demonstrations", "read_jsonl", "read_prompts"]
