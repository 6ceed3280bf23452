"""SFT label masking against exact tensors, and where tokenisation puts the prompt/response boundary."""

import torch

from rlhf.data.chat import TokenizedDemo, encode_prompt, tokenize_demonstration
from rlhf.data.collate import IGNORE_INDEX, collate_sft
from rlhf.data.records import Demonstration
from rlhf.models.tiny import tiny_tokenizer

PAD = 2  # the tiny tokenizer's pad token is its EOS, as in SmolLM2


def test_collate_masks_prompt_and_padding_exactly():
    examples = [
        TokenizedDemo([10, 11, 12, 13, PAD], prompt_len=2, truncated=False),  # response [12, 13, EOS]
        TokenizedDemo([20, 21, 22], prompt_len=1, truncated=False),
    ]
    batch = collate_sft(examples, pad_token_id=PAD)
    x = IGNORE_INDEX
    assert torch.equal(batch["input_ids"], torch.tensor([[10, 11, 12, 13, PAD], [20, 21, 22, PAD, PAD]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    # The response's own EOS (== pad id) is a label; the padding after the second example is not.
    assert torch.equal(batch["labels"], torch.tensor([[x, x, 12, 13, PAD], [x, 21, 22, x, x]]))


def test_tokenized_demo_prompt_matches_generation_prompt_and_ends_at_eos():
    tok = tiny_tokenizer()
    demo = Demonstration("d", ({"role": "user", "content": "Hi?"},), "Hello.")
    t = tokenize_demonstration(tok, demo, max_seq_len=1000)
    assert t.input_ids[: t.prompt_len] == encode_prompt(tok, demo.messages)  # what generation will see
    response = t.input_ids[t.prompt_len :]
    assert response[-1] == tok.eos_token_id and response.count(tok.eos_token_id) == 1  # no "\n" after EOS
    assert tok.decode(response, skip_special_tokens=True) == "Hello."
    assert not t.truncated


def test_long_response_is_cut_and_flagged():
    tok = tiny_tokenizer()
    demo = Demonstration("d", ({"role": "user", "content": "Hi?"},), "x" * 100)
    prompt_len = len(encode_prompt(tok, demo.messages))
    t = tokenize_demonstration(tok, demo, max_seq_len=prompt_len + 10)
    assert len(t.input_ids) == prompt_len + 10 and t.truncated
    assert t.input_ids[-1] != tok.eos_token_id  # a cut response must not be taught to stop there
