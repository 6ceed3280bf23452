"""Chat-template formatting and tokenisation of demonstrations, with the response located exactly.

The prompt is tokenised alone, exactly as it will be at generation time, and the response is the rest of the
rendered conversation tokenised separately; so the tokens the model is trained to produce after a prompt are
the tokens it would see when it generates after that prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.data.jsonl import DataError
from rlhf.data.records import Demonstration


class TemplateError(DataError):
    """The tokenizer's chat template cannot be used the way training needs."""


class PromptTooLong(DataError):
    """A prompt alone fills max_seq_len, leaving no room for its response."""


@dataclass(frozen=True)
class TokenizedDemo:
    input_ids: list[int]  # prompt tokens then response tokens (ending with EOS unless truncated)
    prompt_len: int  # the first prompt_len tokens are the prompt: no loss on them
    truncated: bool  # the response was cut to fit max_seq_len (its EOS is then not trained)


def render_prompt(tokenizer, messages) -> str:
    """The prompt as text, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, messages) -> list[int]:
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def tokenize_demonstration(tokenizer, demo: Demonstration, max_seq_len: int) -> TokenizedDemo:
    prompt_text = render_prompt(tokenizer, demo.messages)
    full_text = tokenizer.apply_chat_template(
        [*demo.messages, {"role": "assistant", "content": demo.response}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise TemplateError(
            "the tokenizer's chat template does not render the prompt as a prefix of the conversation, "
            "so the response cannot be located; use a template that does (ChatML, Llama, ...)"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    # The template may add text after the end-of-turn token (ChatML adds "\n"); the model should learn to stop
    # at EOS, which is also where generation stops, so drop anything after the last EOS, or add one.
    eos = tokenizer.eos_token_id
    if eos in response_ids:
        last = len(response_ids) - 1 - response_ids[::-1].index(eos)
        response_ids = response_ids[: last + 1]
    else:
        response_ids = [*response_ids, eos]
    room = max_seq_len - len(prompt_ids)
    if room < 1:
        raise PromptTooLong(
            f"{demo.source or demo.id}: the prompt is {len(prompt_ids)} tokens, which leaves no room for a response "
            f"within max_seq_len={max_seq_len}; raise max_seq_len or shorten the prompt"
        )
    truncated = len(response_ids) > room
    return TokenizedDemo(prompt_ids + response_ids[:room], len(prompt_ids), truncated)
