"""Blocks that skip the padding compute what the padded forward computes at the real tokens (tiny model)."""

import contextlib
import copy

import pytest
import torch

from rlhf.models.load import load_causal_lm
from rlhf.models.reward import position_ids
from rlhf.models.unpadded import reading, skip_padding


def without_hooks(model):
    """The same model computing the padded way: a copy with every module hook removed."""
    plain = copy.deepcopy(model)
    for m in plain.modules():
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    return plain


def block_inputs(model) -> list[tuple]:
    """The shapes of what block 0 is given in each forward (recorded after the packing hook)."""
    shapes = []
    model.model.layers[0].register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    return shapes


def ppo_rows():
    """Prompts left-padded, responses right-padded after EOS, as a PPO step lays out its rollouts; (B, T)."""
    mask = torch.tensor(
        [
            [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        ]
    )
    ids = torch.randint(5, 200, mask.shape, generator=torch.Generator().manual_seed(0))
    return ids, mask


@pytest.mark.parametrize(
    ("rows", "computed"),
    [
        ("ppo_rows", lambda mask: int(mask.sum())),  # the real tokens only
        # 9 + 7 + 8 + 7 real tokens; row 1 shares 4 with row 0, row 3 shares 5 with row 2
        ("rows_beginning_alike", lambda mask: int(mask.sum()) - 4 - 5),
    ],
)
@pytest.mark.parametrize("autocast", [False, True])
def test_padding_is_skipped_and_shared_tokens_computed_once_with_the_same_outputs_and_gradients(
    autocast, rows, computed
):
    model, _ = load_causal_lm("tiny")
    assert model.model._rlhf_skip_padding
    plain = without_hooks(model)
    shapes = block_inputs(model)
    ids, mask = globals()[rows]()
    real = mask.bool()
    results = []
    for m in (model, plain):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = m(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        logits = out.logits.float()
        (logits[real].log_softmax(-1)[:, 7].sum()).backward()
        results.append((logits, {n: p.grad for n, p in m.named_parameters()}))
    assert shapes == [(1, computed(mask), 64)]  # block 0 saw the tokens it computes only, as one sequence
    (packed, grads), (padded, plain_grads) = results
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(packed[real], padded[real], rtol=tol, atol=tol)
    for name, g in plain_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=tol, atol=tol * g.abs().max().item(), msg=name)
    # the padding leaves the trunk as zeros: the final norm of zero is zero, so the logits there are the head's 0
    assert packed[~real].abs().max() == 0


def test_forwards_that_keep_a_cache_run_padded_and_generate_the_same():
    model, tokenizer = load_causal_lm("tiny")
    plain = without_hooks(model)
    shapes = block_inputs(model)
    ids, mask = ppo_rows()
    ids, mask = ids[:, :6], mask[:, :6]  # left-padded prompts
    kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    torch.testing.assert_close(model.generate(ids, **kwargs), plain.generate(ids, **kwargs), rtol=0, atol=0)
    assert shapes and all(s[0] == 3 for s in shapes)  # the 3 rows padded: the cache is read later
    shapes.clear()
    model(input_ids=ids, attention_mask=torch.ones_like(mask), use_cache=False)
    assert shapes == [(3, 6, 64)]  # no padding: nothing to skip


def test_scoring_and_evaluation_forwards_skip_the_padding():
    """Their models keep a KV cache by default (config use_cache): the callers must say they keep none."""
    from rlhf.models.reward import load_reward_model, score
    from rlhf.stages.evaluate import summed_logprobs

    ids, mask = ppo_rows()
    reward_model, tokenizer = load_reward_model("tiny")
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)  # it reads each row at its last non-pad token
    assert reward_model.config.use_cache
    shapes = block_inputs(reward_model)
    scores = score(reward_model, ids, mask)
    assert shapes == [(1, int(mask.sum()), 64)]
    torch.testing.assert_close(scores, score(without_hooks(reward_model), ids, mask))
    policy, _ = load_causal_lm("tiny")
    shapes = block_inputs(policy)
    rows = [{"prompt_ids": [5, 6, 7], "ids": [8, 9]}, {"prompt_ids": [5, 6], "ids": [8]}]
    summed = summed_logprobs(policy, rows, tokenizer.pad_token_id, batch_size=2)
    assert shapes == [(1, 5 + 3 - 2, 64)]  # real tokens only, and the rows' common 5, 6 once
    torch.testing.assert_close(torch.tensor(summed), torch.tensor(summed_logprobs(without_hooks(policy), rows, 0, 2)))


def test_activation_checkpointing_runs_padded():
    model, _ = load_causal_lm("tiny")
    plain = without_hooks(model)
    model.gradient_checkpointing_enable()
    model.train()
    shapes = block_inputs(model)
    ids, mask = ppo_rows()
    kwargs = {"attention_mask": mask, "position_ids": position_ids(mask), "use_cache": False}
    model(input_ids=ids, **kwargs).logits.float().square().mean().backward()  # the blocks run again: still padded
    assert shapes and all(s == (3, 11, 64) for s in shapes)
    model.eval()
    shapes.clear()
    with torch.no_grad():
        packed = model(input_ids=ids, **kwargs).logits
    assert shapes == [(1, int(mask.sum()), 64)]  # not training: nothing is run again, so it packs
    torch.testing.assert_close(packed[mask.bool()], plain(input_ids=ids, **kwargs).logits[mask.bool()])


def test_forwards_that_return_every_layer_run_padded():
    model, _ = load_causal_lm("tiny")
    shapes = block_inputs(model)
    ids, mask = ppo_rows()
    model.config.output_hidden_states = True  # from the config, not the call
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert shapes == [(3, 11, 64)] and all(h.shape[:2] == (3, 11) for h in out.hidden_states)


def test_a_sliding_window_model_keeps_the_padding():
    from transformers import MistralConfig, MistralForCausalLM

    from rlhf.models.attention import use_small_attention

    config = MistralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, attn_implementation="sdpa",
    )  # fmt: skip
    model = MistralForCausalLM(config)
    assert use_small_attention(model)
    assert not getattr(model.model, "_rlhf_skip_padding", False)  # its window is not in the layout's mask


def test_a_model_whose_attention_cannot_skip_padding_keeps_its_own_forward():
    model, _ = load_causal_lm("tiny")
    eager = without_hooks(model)
    eager.model._rlhf_skip_padding = False
    eager.set_attn_implementation("eager")  # does not know the packed layout: the probe fails
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in eager.modules())
    assert not skip_padding(eager)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in eager.modules()) == hooks
    ids, mask = ppo_rows()
    eager(input_ids=ids, attention_mask=mask, use_cache=False)  # runs, padded


@pytest.mark.parametrize("rows", ["ppo_rows", "rows_beginning_alike"])
def test_the_last_block_computes_whole_only_the_positions_read(rows):
    model, _ = load_causal_lm("tiny")
    assert model.model._rlhf_partial
    plain = without_hooks(model)
    last = model.model.layers[-1]
    seen = []  # how many positions the last block's query projection and MLP compute, per forward
    for part in (last.self_attn.q_proj, last.mlp):
        part.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    ids, mask = globals()[rows]()
    reads = torch.zeros_like(mask, dtype=torch.bool)
    reads[:, 3:7] = True  # some prompt and response positions, shared ones among them, some padding
    read = reads & mask.bool()
    results = []
    for m, context in ((model, reading(reads)), (plain, contextlib.nullcontext())):
        with context:
            logits = m(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
        logits[read].log_softmax(-1)[:, 7].sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (got, grads), (want, plain_grads) = results
    # rows 1 and 3 read 1 and 3 tokens they share with positions rows 0 and 2 read: computed once
    computed = int(read.sum()) - (1 + 3 if rows == "rows_beginning_alike" else 0)
    assert seen == [computed, computed]
    torch.testing.assert_close(got[read], want[read], rtol=1e-5, atol=1e-5)
    for name, g in plain_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)
    assert not torch.allclose(got[mask.bool() & ~read], want[mask.bool() & ~read])  # the rest was not computed
    # outside `reading` the last block computes every position again
    model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    assert seen[2:] == [int(mask.sum()) - (4 + 5 if rows == "rows_beginning_alike" else 0)] * 2


def rows_beginning_alike():
    """Four left-padded rows: rows 1 and 3 begin with row 0's first 4 tokens, row 3 with row 2's first 5 (longer),
    row 2 with nothing of the others (its first token differs)."""
    gen = torch.Generator().manual_seed(1)
    system = torch.randint(5, 200, (4,), generator=gen)
    rows = [
        torch.cat([system, torch.randint(5, 200, (5,), generator=gen)]),
        torch.cat([system, torch.randint(5, 200, (3,), generator=gen)]),
        torch.randint(5, 200, (8,), generator=gen),
    ]
    rows.append(torch.cat([rows[2][:5], torch.randint(5, 200, (2,), generator=gen)]))
    rows[3][0] = rows[2][0]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def test_a_replayed_bottom_shares_what_the_bottom_shared():
    """Sharing is read from the first block's inputs bit for bit: the frozen bottom's output, replayed into the
    blocks above it, shares the same tokens; hidden states that differ in one value share nothing from there on."""
    from rlhf.models.freeze import bottom_output, forward_from

    model, _ = load_causal_lm("tiny")
    ids, mask = rows_beginning_alike()
    kwargs = {"attention_mask": mask, "position_ids": position_ids(mask), "use_cache": False}
    with torch.no_grad():
        bottom = bottom_output(model, 1, ids, **kwargs)
        whole = model(input_ids=ids, **kwargs).logits
        shapes = block_inputs(model)
        replayed = forward_from(model, ids, bottom, 1, **kwargs).logits
        assert shapes == []  # block 0 does not run: block 1 is the first
        model.model.layers[1].register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
        forward_from(model, ids, bottom, 1, **kwargs)
        assert shapes == [(1, 31 - 4 - 5, 64)]
        real = mask.bool()
        torch.testing.assert_close(replayed[real], whole[real], rtol=1e-5, atol=1e-5)
        nudged = bottom.clone()
        nudged[1, -3 - 2, 0] += 1e-3  # row 1's third real token (row 1 is 7 real tokens at the right)
        shapes.clear()
        forward_from(model, ids, nudged, 1, **kwargs)
        assert shapes == [(1, 31 - 2 - 5, 64)]  # row 1 now shares its first two tokens only


def test_shared_tokens_index_and_source():
    from rlhf.models.unpadded import shared_tokens

    real = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    keys = torch.tensor([[0, 7, 8, 9], [7, 8, 5, 0], [7, 8, 9, 4]])
    index, source = shared_tokens(real, keys)
    # row 0: its 3 tokens; row 1: 7 8 shared with row 0, 5 its own; row 2: 7 8 9 shared with row 0, 4 its own
    assert index.tolist() == [1, 2, 3, 6, 11]
    assert source.view(3, 4).tolist() == [[0, 1, 2, 3], [1, 2, 4, 0], [1, 2, 3, 5]]
    # keys that only fingerprint the tokens: the check has the last word (here: rows agree on their first token)
    index, source = shared_tokens(real, keys, same=lambda i, j, ci, cj: 1)
    assert index.tolist() == [1, 2, 3, 5, 6, 9, 10, 11]
    assert source.view(3, 4).tolist() == [[0, 1, 2, 3], [1, 4, 5, 0], [1, 6, 7, 8]]
    index, source = shared_tokens(real, torch.arange(12).view(3, 4))  # nothing alike: every real token
    assert index.tolist() == real.flatten().nonzero().squeeze(1).tolist()


def test_a_block_the_hooks_are_on_is_freed_once_the_model_lets_it_go():
    # PPO shares a frozen model's bottom blocks with the policy (freeze.share_frozen_layers): the blocks replaced
    # must go at once, not wait for the cycle collector (held by their own hooks, they kept ~0.5 GB resident)
    import gc
    import weakref

    model, _ = load_causal_lm("tiny")
    assert model.model._rlhf_partial
    replaced = weakref.ref(model.model.layers[0])
    gc.disable()
    try:
        model.model.layers[0] = copy.deepcopy(model.model.layers[1])
        assert replaced() is None
    finally:
        gc.enable()
