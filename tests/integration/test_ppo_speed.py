"""The shortcuts PPO takes for speed compute what the slow way computes (tiny model)."""

import copy

import pytest
import torch
from conftest import read_metrics

from rlhf.models.generation import (
    inference_copy,
    refresh_inference_copy,
    release_inference_copy,
    sample_responses,
)
from rlhf.models.load import load_causal_lm
from rlhf.models.lora import plain_model, wrap_lora
from rlhf.models.policy_value import lm_response_logits
from rlhf.models.reward import load_reward_model, position_ids, score
from rlhf.stages.ppo import Rollouts, attention_pairs, response_logprobs, shared_token_count


def perturbed_lora(model, task_type="CAUSAL_LM"):
    """LoRA adapters (and any trainable head copy) moved away from zero, as training would."""
    model = wrap_lora(model, 4, 8, 0.0, "all-linear", task_type)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def padded_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 9 tokens, the first left-padded by 2, as rollouts are."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10, 11], [21, 22, 23, 24, 25, 26, 27, 28, 29]])
    return ids, (torch.arange(9) >= torch.tensor([[2], [0]])).long()


def assert_replay_is_whole(whole, pv, bottoms, ids, mask, context: int = 5) -> None:
    """`pv` given the replayed `bottoms` gives the logits, values and gradients of `whole` (a copy of it whose
    models run every block), bit for bit."""

    def outputs_and_grads(model, bottoms):
        model.zero_grad(set_to_none=True)
        logits, values = model(ids, mask, context, bottoms)
        (logits.square().mean() + values.square().mean()).backward()
        return logits, values, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    expected, got = outputs_and_grads(whole, (None, None)), outputs_and_grads(pv, bottoms)
    for a, b in zip(expected[:2], got[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert expected[2].keys() == got[2].keys() and len(expected[2]) > 0
    for name in expected[2]:
        torch.testing.assert_close(expected[2][name], got[2][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logits_are_the_full_forwards_at_the_response_positions(temperature):
    torch.manual_seed(0)
    policy, _ = load_causal_lm("tiny")
    ids = torch.randint(3, 100, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding before the prompt
    mask[2, -2:] = 0  # padding after a short response
    context = 5
    full = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits.detach()
    got = lm_response_logits(policy, ids, mask, context, temperature=temperature)
    assert got.shape == (3, 6, full.shape[-1])  # positions 4 … 9 predict tokens 5 … 10
    real = mask[:, context - 1 : -1].bool()  # (what a padding position predicts is never read)
    expected = full[:, context - 1 : -1][real] / temperature
    torch.testing.assert_close(got.detach()[real], expected, rtol=1e-5, atol=1e-5)
    assert not policy.get_output_embeddings()._forward_pre_hooks  # the head's input is scaled for this call only
    got.square().mean().backward()  # the head's and the blocks' gradients flow through the gathered positions
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters() if p.requires_grad)


def test_sampling_logprobs_equal_a_forward_pass():
    torch.manual_seed(0)
    policy, tok = load_causal_lm("tiny")
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]  # different lengths: left padding
    prompt_ids, prompt_mask, responses, logprobs = sample_responses(
        policy, prompts, tok.pad_token_id, tok.eos_token_id, 12, 0.7, with_logprobs=True
    )
    ids = torch.cat([prompt_ids, responses], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(responses)], 1)
    context = prompt_ids.shape[1]
    with torch.no_grad():
        recomputed = response_logprobs(lm_response_logits(policy, ids, mask, context, temperature=0.7), ids, context)
    is_eos = (responses == tok.eos_token_id).int()
    before_eos = (is_eos.cumsum(1) - is_eos) == 0  # tokens up to and including the first EOS
    assert before_eos.sum() > 10
    torch.testing.assert_close(logprobs[before_eos], recomputed[before_eos], rtol=0, atol=1e-4)


def test_inference_copy_is_the_policy_with_lora_merged():
    torch.manual_seed(0)
    base, _ = load_causal_lm("tiny")
    policy = perturbed_lora(base)
    merged = plain_model(copy.deepcopy(policy))
    sampler = inference_copy(policy, torch.float32)
    refresh_inference_copy(sampler, policy)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        torch.testing.assert_close(sampler(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(policy(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    # a bf16 copy samples from (nearly) the same distribution
    low = inference_copy(policy, torch.bfloat16)
    refresh_inference_copy(low, policy)
    with torch.no_grad():
        p_low = torch.softmax(low(input_ids=ids).logits.float(), -1)
    assert (p_low - torch.softmax(expected, -1)).abs().max() < 0.02


def test_inference_copy_holds_weights_only_between_refresh_and_release():
    policy, _ = load_causal_lm("tiny")
    sampler = inference_copy(policy, torch.bfloat16)
    assert all(p.numel() == 0 for p in sampler.parameters())  # nothing held until the first refresh
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    outputs = []
    for _ in range(2):
        refresh_inference_copy(sampler, policy)
        for (name, p), (_, q) in zip(sampler.named_parameters(), policy.named_parameters(), strict=True):
            assert p.dtype == torch.bfloat16 and torch.equal(p, q.to(torch.bfloat16)), name
        with torch.no_grad():
            outputs.append(sampler(input_ids=ids).logits)
        release_inference_copy(sampler)
        assert all(p.numel() == 0 for p in sampler.parameters())
    assert sampler.lm_head.weight is sampler.model.embed_tokens.weight  # still tied
    assert torch.equal(outputs[0], outputs[1])


def test_value_model_with_adapters_off_is_the_reward_model():
    torch.manual_seed(0)
    reward_model, tok = load_reward_model("tiny")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = score(reward_model, ids, mask)
    value_model = perturbed_lora(copy.deepcopy(reward_model), "SEQ_CLS")
    with torch.no_grad():
        assert (score(value_model, ids, mask) - expected).abs().min() > 1e-3  # the value model has moved
        with value_model.disable_adapter():
            torch.testing.assert_close(score(value_model, ids, mask), expected, rtol=0, atol=1e-6)


def test_frozen_bottom_is_shared_and_stays_what_it_was():
    from rlhf.models.freeze import share_frozen_layers, train_top_layers
    from rlhf.models.tiny import tiny_model

    torch.manual_seed(0)
    policy, tok = load_causal_lm("tiny")
    reference, _ = load_causal_lm("tiny")
    reference.requires_grad_(False)  # as PPO loads it
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    train_top_layers(policy, 1)
    shared = share_frozen_layers(reference, policy)
    embeddings, layers = policy.get_input_embeddings(), policy.model.layers
    assert shared == sum(p.numel() for m in (embeddings, layers[0]) for p in m.parameters())
    assert reference.get_input_embeddings() is embeddings and reference.lm_head.weight is embeddings.weight
    assert reference.model.layers[0] is layers[0] and reference.model.layers[1] is not layers[1]
    # training the policy's top moves the policy, never the reference that shares its bottom
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    policy(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, expected, rtol=0, atol=0)
        assert (policy(input_ids=ids).logits - expected).abs().max() > 1e-3
    # different weights, trained embeddings, or a model that trains what would be shared: nothing is shared
    assert share_frozen_layers(tiny_model(tok, seed=1).requires_grad_(False), policy) == 0
    fresh, _ = load_causal_lm("tiny")
    assert share_frozen_layers(load_causal_lm("tiny")[0].requires_grad_(False), fresh) == 0
    assert share_frozen_layers(load_causal_lm("tiny")[0], policy) == 0

    value_model, _ = load_reward_model("tiny")
    reward_model, _ = load_reward_model("tiny")
    reward_model.requires_grad_(False)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        scores = score(reward_model, ids, mask)
    train_top_layers(value_model, 1)
    assert share_frozen_layers(reward_model, value_model) > 0
    assert reward_model.model.layers[0] is value_model.model.layers[0]
    with torch.no_grad():
        torch.testing.assert_close(score(reward_model, ids, mask), scores, rtol=0, atol=0)


def test_frozen_blocks_stored_in_bf16_give_the_same_outputs_under_bf16_autocast():
    from rlhf.models.freeze import store_frozen_blocks_in

    torch.manual_seed(0)
    reference, _ = load_causal_lm("tiny")
    reference.requires_grad_(False)
    policy, _ = load_causal_lm("tiny")
    reference.model.layers[0] = policy.model.layers[0]  # as if shared with a policy being trained
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected = reference(input_ids=ids).logits
    stored = store_frozen_blocks_in(reference, torch.bfloat16, keep=policy)
    assert stored == sum(p.numel() for p in reference.model.layers[1].parameters() if p.ndim == 2)
    assert reference.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    assert reference.model.layers[1].input_layernorm.weight.dtype == torch.float32
    assert reference.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # kept: shared
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        torch.testing.assert_close(reference(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_replayed_frozen_bottom_gives_the_same_logits_values_and_gradients():
    from rlhf.models.freeze import share_frozen_layers, store_frozen_blocks_in, train_top_layers
    from rlhf.models.policy_value import PolicyAndValue, replay_frozen_bottoms

    torch.manual_seed(0)
    policy, tok = load_causal_lm("tiny")
    reference, _ = load_causal_lm("tiny")
    value_model, _ = load_reward_model("tiny")
    reference.requires_grad_(False)
    for m in (policy, value_model):
        train_top_layers(m, 1)
    share_frozen_layers(reference, policy)
    store_frozen_blocks_in(reference, torch.bfloat16, keep=policy)
    pv = PolicyAndValue(policy, value_model)
    ids, mask = padded_rows()
    context = 5
    with torch.autocast("cpu", torch.bfloat16):
        ref_replays, _ = replay_frozen_bottoms(pv, reference, [[5, 6, 7, 8], [9, 10]], tok.pad_token_id, "cpu", print)
    assert pv.policy_depth == 1 and pv.value_depth == 1 and ref_replays

    def run(replay: bool):
        pv.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16):
            with torch.no_grad():
                bottoms = pv.bottoms(ids, mask) if replay else (None, None)
                ref = lm_response_logits(reference, ids, mask, context, bottoms[0], pv.policy_depth)
            logits, values = pv(ids, mask, context, bottoms)
        (logits.float().square().mean() + values.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in pv.named_parameters() if p.requires_grad}
        return ref, logits, values, grads

    plain, replayed = run(False), run(True)
    for a, b in zip(plain[:3], replayed[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert plain[3].keys() == replayed[3].keys() and len(plain[3]) > 0
    for name in plain[3]:
        torch.testing.assert_close(plain[3][name], replayed[3][name], rtol=0, atol=0, msg=name)
    # and the bottoms really stand in for the frozen blocks: a wrong bottom changes the outputs
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        hp, hv = pv.bottoms(ids, mask)
        logits, values = pv(ids, mask, context, (hp + 1, hv + 1))
    assert (logits.float() - plain[1].float()).abs().max() > 1e-3 and (values - plain[2]).abs().max() > 1e-3


def test_value_model_with_the_policys_bottom_shares_it_and_computes_it_once():
    from transformers import LlamaForSequenceClassification

    from rlhf.models.freeze import share_frozen_layers, train_top_layers
    from rlhf.models.policy_value import PolicyAndValue, replay_frozen_bottoms
    from rlhf.models.unpadded import skip_padding

    torch.manual_seed(0)
    policy, tok = load_causal_lm("tiny")
    config = copy.deepcopy(policy.config)
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id
    value_model = LlamaForSequenceClassification(config)
    value_model.model.load_state_dict(policy.model.state_dict())  # value_init policy
    # the copied config names small attention already; its blocks skip the padding as the policy's do (as
    # load_reward_model would give it), else its padded products round differently on some CPUs (AVX2)
    skip_padding(value_model)
    for m in (policy, value_model):
        train_top_layers(m, 1)
    separate = copy.deepcopy(PolicyAndValue(policy, value_model))
    assert share_frozen_layers(value_model, policy) > 0
    assert value_model.model.layers[0] is policy.model.layers[0]
    assert value_model.get_input_embeddings() is policy.get_input_embeddings()
    assert value_model.model.layers[1] is not policy.model.layers[1]  # its trained top stays its own
    pv = PolicyAndValue(policy, value_model)
    replay_frozen_bottoms(pv, None, [[5, 6, 7, 8], [9, 10]], tok.pad_token_id, "cpu", print)
    assert pv.value_bottom_is_policys
    ids, mask = padded_rows()
    with torch.no_grad():
        bottoms = pv.bottoms(ids, mask)
    assert bottoms[1] is bottoms[0]  # one forward of the shared blocks serves both models
    assert_replay_is_whole(separate, pv, bottoms, ids, mask)
    # a value model with other bottom weights shares nothing
    other = LlamaForSequenceClassification(config)
    train_top_layers(other, 1)
    assert share_frozen_layers(other, policy) == 0


def test_ppo_loads_one_frozen_bottom_for_all_four_models_when_their_weights_agree(tmp_path):
    """The stage's own wiring: a policy folder serving as the reward model too (a new head), value_init policy."""
    from rlhf.config import PPOConfig
    from rlhf.models.policy_value import PolicyAndValue, load_models, replay_frozen_bottoms

    policy, tok = load_causal_lm("tiny")
    policy.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    folder = str(tmp_path / "sft")
    cfg = PPOConfig(policy=folder, reward=folder, value_init="policy", trainable_layers=1, out=str(tmp_path / "run"))
    policy, tok, reference, value_model, reward_model, _ = load_models(cfg, print)
    embeddings, bottom = policy.get_input_embeddings(), policy.model.layers[0]
    for other in (reference, value_model, reward_model):
        assert other.get_input_embeddings() is embeddings and other.model.layers[0] is bottom
    assert value_model.model.layers[1] is not policy.model.layers[1]  # the trained tops stay apart
    pv = PolicyAndValue(policy, value_model)
    replay_frozen_bottoms(pv, reference, [[5, 6, 7, 8], [9, 10]], tok.pad_token_id, "cpu", print)
    assert pv.value_bottom_is_policys


def test_reward_model_holding_the_value_models_bottom_scores_from_it_what_it_scores_whole(tmp_path, monkeypatch):
    """`reward_scores` with the value model's bottom (and an EOS column for cut responses): the scores of the whole
    reward model on the re-tokenised text, without running its bottom for the rows whose tokens are the rollout's."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from rlhf.config import PPOConfig
    from rlhf.data.chat import encode_prompt
    from rlhf.models import policy_value
    from rlhf.stages import ppo

    policy, tok = load_causal_lm("tiny")
    policy.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    folder = str(tmp_path / "sft")
    cfg = PPOConfig(policy=folder, reward=folder, prompts="x", trainable_layers=1, micro_batch_size=2, out="x")
    policy, tok, reference, value_model, reward_model, rm_tok = policy_value.load_models(cfg, print)
    pv = policy_value.PolicyAndValue(policy, value_model).eval()
    ref_replays, rm_replays = policy_value.replay_frozen_bottoms(
        pv, reference, [[5, 6, 7, 8], [9, 10]], tok.pad_token_id, "cpu", print, reward_model
    )
    assert ref_replays and rm_replays and pv.value_depth == 1
    with torch.no_grad():  # a reward model that is not the value model's twin above the bottom
        for p_ in reward_model.parameters():
            if p_ is not reward_model.get_input_embeddings().weight and p_ not in set(
                reward_model.model.layers[0].parameters()
            ):
                p_.add_(torch.randn_like(p_) * 0.2)
    messages = {
        "a": [{"role": "user", "content": "Say hi"}],
        "b": [{"role": "user", "content": "Count to three, slowly"}],
    }
    # (prompt, response text, finished): a finished answer, a cut one, and one whose text re-tokenises otherwise
    rows = [("a", "Hi there!", True), ("b", "One, two, thr", False), ("a", "Hello", True), ("b", " padded", True)]
    prompts = [encode_prompt(tok, messages[pid]) for pid, _, _ in rows]
    responses = [
        tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if done else [])
        for _, text, done in rows
    ]
    context, width = max(map(len, prompts)), max(map(len, responses))
    ids = torch.full((4, context + width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, (p_ids, r_ids) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, context - len(p_ids) : context + len(r_ids)] = torch.tensor(p_ids + r_ids)
        mask[i, context - len(p_ids) : context + len(r_ids)] = 1
    response_mask = mask[:, context:].bool()
    finished = torch.tensor([done for _, _, done in rows])
    texts = [text.strip() for _, text, _ in rows]  # as `rollout` decodes them: row 3 loses its leading space
    ro = ppo.Rollouts(ids, mask, response_mask, finished, context, texts, [pid for pid, _, _ in rows], None)
    st = SimpleNamespace(accelerator=Accelerator(cpu=True))
    whole = ppo.reward_scores(st, cfg, reward_model, rm_tok, messages, ro, pv)
    fwd = ppo.forward_rollouts(st, cfg, pv, reference, ro, ref_replays, None, rm_tok.eos_token_id)
    assert fwd["bottom_rm"].shape[1] == ids.shape[1] + 1 and fwd["bottom_policy"].shape[1] == ids.shape[1]
    scored_whole = []
    monkeypatch.setattr(
        ppo, "score", lambda model, ids, mask: scored_whole.append(len(ids)) or score(model, ids, mask)
    )
    replayed = ppo.reward_scores(st, cfg, reward_model, rm_tok, messages, ro, pv, fwd, pv.value_depth)
    assert scored_whole == [1]  # only the row whose text re-tokenises differently ran the whole reward model
    torch.testing.assert_close(replayed, whole, rtol=1e-5, atol=1e-5)
    assert whole.std() > 0.01  # the rows really differ: a mix-up of rows would show
    # and the updates still replay the rows' own columns: the same values as without the EOS column
    plain = ppo.forward_rollouts(st, cfg, pv, reference, ro, ref_replays, None)
    for key in ("values", "ref_logprobs", "logprobs"):
        torch.testing.assert_close(fwd[key], plain[key], rtol=1e-5, atol=1e-5, msg=key)


def test_release_file_map_copies_all_but_the_shared_tensors():
    from rlhf.models.freeze import release_file_map, share_frozen_layers, train_top_layers

    policy, _ = load_causal_lm("tiny")
    reference, _ = load_causal_lm("tiny")
    reference.requires_grad_(False)
    train_top_layers(policy, 1)
    assert share_frozen_layers(reference, policy) > 0
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in reference.named_parameters()}
    release_file_map(reference, keep=policy)
    shared = {id(p) for p in policy.parameters()}
    for n, p in reference.named_parameters():
        ptr, value = before[n]
        assert (p.data_ptr() == ptr) == (id(p) in shared), n  # own tensors now live in fresh memory
        torch.testing.assert_close(p.detach(), value, rtol=0, atol=0)
    assert reference.lm_head.weight is policy.get_input_embeddings().weight  # ties kept


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_policy_and_value_losses_backpropagated_apart_give_the_joint_gradients(entropy_coef):
    """One process back-propagates the policy loss before the value model's forward (half the activations held);
    the gradients, and the losses reported, are the joint backward's (what DDP runs)."""
    from accelerate import Accelerator

    from rlhf.config import PPOConfig
    from rlhf.models.policy_value import PolicyAndValue
    from rlhf.stages.ppo import Rollouts, backward_losses

    torch.manual_seed(0)
    policy, tok = load_causal_lm("tiny")
    value_model, _ = load_reward_model("tiny")
    pv = PolicyAndValue(policy, value_model).eval()
    b, p, t = 4, 5, 7
    ids = torch.randint(5, 200, (b, p + t))
    response_mask = torch.arange(t)[None, :] < torch.tensor([[7], [3], [5], [1]])
    attention = torch.cat([torch.ones(b, p, dtype=torch.long), response_mask.long()], 1)
    ro = Rollouts(ids, attention, response_mask, response_mask[:, -1], p, [""] * b, [""] * b, None)
    fwd = {"logprobs": -torch.rand(b, t) * 3, "values": torch.randn(b, t)}
    advantages, returns = torch.randn(b, t), torch.randn(b, t)
    cfg = PPOConfig(policy="tiny", reward="tiny", prompts="x", entropy_coef=entropy_coef, vf_coef=0.3)
    accelerator = Accelerator(cpu=True)

    def run(split: bool):
        pv.zero_grad(set_to_none=True)
        losses, pg, vf = backward_losses(accelerator, pv, cfg, ro, fwd, advantages, returns, [0, 1, 2, 3], 2, split)
        grads = {n: q.grad.clone() for n, q in pv.named_parameters() if q.grad is not None}
        return losses, grads

    (joint_losses, joint), (split_losses, split) = run(False), run(True)
    assert joint.keys() == split.keys() == {n for n, q in pv.named_parameters() if q.requires_grad}
    for name in joint:
        torch.testing.assert_close(split[name], joint[name], rtol=0, atol=0, msg=name)
    for a, c in zip(joint_losses, split_losses, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert any(n.startswith("value_model.") for n in joint) and any(n.startswith("policy.") for n in joint)


def one_microbatch_run(out, **overrides):
    """PPO on the tiny model: 3 steps of 4 of the 200 example prompts, 2 epochs of one update of one micro-batch."""
    from rlhf.config import PPOConfig

    settings = dict(epochs=0.06, batch_size=4, mini_batch_size=4, micro_batch_size=4, ppo_epochs=2, max_new_tokens=8)
    settings.update(mixed_precision="no", progress=False, **overrides)
    return PPOConfig(policy="tiny", reward="tiny", prompts="examples/prompts.jsonl", out=str(out), **settings)


@pytest.mark.parametrize("rollout_logprobs", ["forward", "sampling"])
def test_first_update_reusing_the_scoring_forward_trains_what_a_second_forward_would(
    tmp_path, monkeypatch, rollout_logprobs
):
    """With one micro-batch per update on one process, the first update back-propagates the scoring forward of
    the policy (log-probs recomputed) or of the value model (log-probs from sampling) instead of running it again."""
    from rlhf.models import policy_value
    from rlhf.stages import ppo

    calls = {"values": 0, "logits": 0}
    for name in calls:
        original = getattr(policy_value.PolicyAndValue, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(policy_value.PolicyAndValue, name, counted)

    def train(out, reuse: bool):
        if not reuse:
            monkeypatch.setattr(ppo, "first_update_reuses", lambda *a: None)
        cfg = one_microbatch_run(out, rollout_logprobs=rollout_logprobs)
        for k in calls:
            calls[k] = 0
        final = ppo.run(cfg)
        return load_causal_lm(str(final))[0].state_dict(), dict(calls)

    reused, reused_calls = train(tmp_path / "reuse", True)
    again, again_calls = train(tmp_path / "again", False)
    steps = 3
    model = "logits" if rollout_logprobs == "forward" else "values"
    assert again_calls[model] - reused_calls[model] == steps  # one forward fewer per step: really reused
    for k in again:
        torch.testing.assert_close(reused[k], again[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(again[k], v) for k, v in load_causal_lm("tiny")[0].state_dict().items())  # trained


def test_a_frozen_head_multiplies_by_one_cast_copy_under_autocast_with_the_same_logits():
    from torch.utils._python_dispatch import TorchDispatchMode

    from rlhf.models.freeze import cast_frozen_heads_once, train_top_layers

    policy, _ = load_causal_lm("tiny")
    value_model, _ = load_reward_model("tiny")
    train_top_layers(policy, 1)  # the tied head freezes with the embeddings
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        plain = policy(input_ids=ids).logits
        with torch.autocast("cpu", torch.bfloat16):
            autocast = policy(input_ids=ids).logits
    assert cast_frozen_heads_once([policy, None, value_model], torch.bfloat16) == 1  # a score head is no LM head

    head = policy.get_output_embeddings().weight

    class CastsOfTheHead(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() == head.data_ptr():
                CastsOfTheHead.count += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), CastsOfTheHead():
        with torch.autocast("cpu", torch.bfloat16):
            torch.testing.assert_close(policy(input_ids=ids).logits, autocast, rtol=0, atol=0)
        torch.testing.assert_close(policy(input_ids=ids).logits, plain, rtol=0, atol=0)
    assert CastsOfTheHead.count == 0
    # the input's gradient, by the contiguous copy of the head's transpose: what autograd's product gives
    x = torch.randn(2, 3, head.shape[1])
    ours, theirs = x.clone().requires_grad_(), x.bfloat16().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        policy.get_output_embeddings()(ours).float().pow(2).sum().backward()
    torch.nn.functional.linear(theirs, head.detach().bfloat16()).float().pow(2).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad.float(), rtol=0.01, atol=1e-3)
    fresh, _ = load_causal_lm("tiny")  # a trainable head is left to autocast, which keeps its cast within a forward
    assert cast_frozen_heads_once([fresh], torch.bfloat16) == 0


def four_block_sft(tmp_path) -> str:
    """A random tiny Llama of 4 blocks saved with the tiny tokenizer, as an SFT folder; its path."""
    from transformers import LlamaForCausalLM

    tiny, tok = load_causal_lm("tiny")
    config = copy.deepcopy(tiny.config)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    return str(tmp_path / "sft")


def test_value_model_training_fewer_layers_carries_the_policys_bottom_through_its_own_frozen_blocks(tmp_path):
    """--value-trainable-layers below --trainable-layers: the value model's frozen bottom is the policy's bottom
    (the same modules) plus frozen blocks of its own, which the reward model shares; its output is computed from the
    policy's, and values and gradients are those of the value model run whole."""
    from rlhf.config import PPOConfig
    from rlhf.models.freeze import bottom_output
    from rlhf.models.policy_value import PolicyAndValue, forward_kwargs, load_models, replay_frozen_bottoms

    folder = four_block_sft(tmp_path)
    cfg = PPOConfig(policy=folder, reward=folder, trainable_layers=2, value_trainable_layers=1, out="x")
    policy, tok, reference, value_model, reward_model, _ = load_models(cfg, print)
    trained = {n.split(".")[1] for n, p in value_model.model.named_parameters() if p.requires_grad and "layers" in n}
    assert trained == {"3"}  # the value model trains its top block (and head) only
    assert [value_model.model.layers[i] is policy.model.layers[i] for i in range(4)] == [True, True, False, False]
    assert reward_model.model.layers[2] is value_model.model.layers[2]  # its own frozen block, shared onwards
    separate = copy.deepcopy(PolicyAndValue(policy, value_model))
    pv = PolicyAndValue(policy, value_model)
    ref_replays, rm_replays = replay_frozen_bottoms(
        pv, reference, [[5, 6, 7, 8], [9, 10]], tok.pad_token_id, "cpu", print, reward_model
    )
    assert (pv.policy_depth, pv.value_depth) == (2, 3) and pv.value_bottom_continues_policys
    assert ref_replays and rm_replays and not pv.value_bottom_is_policys
    ids, mask = padded_rows()
    with torch.no_grad():
        bottoms = pv.bottoms(ids, mask)
        own = bottom_output(value_model, 3, ids, **forward_kwargs(mask))
    torch.testing.assert_close(bottoms[1], own, rtol=0, atol=0)  # what the value model's own 3 blocks give
    assert_replay_is_whole(separate, pv, bottoms, ids, mask)


def test_the_frozen_bottom_kept_from_decoding_scores_what_the_scoring_forward_computes(tmp_path, monkeypatch):
    """A rollout decoded by the lean decoder keeps its frozen bottom's output (and an EOS column for the reward
    model): scoring from it gives the values, reference log-probs and bottoms of scoring that runs the bottom
    itself, without running the policy's bottom again."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from rlhf.config import PPOConfig
    from rlhf.data.chat import encode_prompt
    from rlhf.models import policy_value
    from rlhf.stages import ppo

    folder = four_block_sft(tmp_path)
    cfg = PPOConfig(
        policy=folder, reward=folder, trainable_layers=2, value_trainable_layers=1, max_new_tokens=10, out="x"
    )
    policy, tok, reference, value_model, reward_model, _ = policy_value.load_models(cfg, print)
    pv = policy_value.PolicyAndValue(policy, value_model).eval()
    ref_replays, rm_replays = policy_value.replay_frozen_bottoms(
        pv, reference, [[5, 6, 7, 8], [9, 10]], tok.pad_token_id, "cpu", print, reward_model
    )
    assert ref_replays and rm_replays and pv.value_bottom_continues_policys
    questions = ["Say hi", "Count to three, slowly", "Why is the sky blue?", "A haiku about tea"]
    prompts = [SimpleNamespace(id=str(i), messages=[{"role": "user", "content": q}]) for i, q in enumerate(questions)]
    encoded = [encode_prompt(tok, p.messages) for p in prompts]
    st = SimpleNamespace(accelerator=Accelerator(cpu=True), say=print)
    eos = tok.eos_token_id
    with torch.no_grad():  # one row finishes early, the others are cut at the limit
        policy.lm_head.weight.data[eos] *= 0
        policy.lm_head.weight.data[eos, 0] = 8.0
    decoding = {"bottom": pv.policy_depth, "append": eos}
    ro = ppo.rollout(st, cfg, policy, tok, prompts, encoded, [0, 1, 2, 3], 0, False, decoding)
    assert ro.bottom.shape == (4, ro.input_ids.shape[1] + 1, policy.config.hidden_size)
    assert 0 < int(ro.finished.sum()) < 4  # finished and cut rows both
    plain = ppo.Rollouts(**{**vars(ro), "bottom": None})
    want = ppo.forward_rollouts(st, cfg, pv, reference, plain, ref_replays, None, eos)
    ran = []
    bottom_output = policy_value.bottom_output
    monkeypatch.setattr(policy_value, "bottom_output", lambda *a, **k: ran.append(1) or bottom_output(*a, **k))
    got = ppo.forward_rollouts(st, cfg, pv, reference, ro, ref_replays, None, eos)
    assert not ran  # the policy's bottom did not run again
    for key in ("bottom_policy", "bottom_rm", "values", "ref_logprobs"):
        real = torch.cat([ro.attention_mask, (~ro.finished)[:, None]], 1).bool()
        a, b = got[key], want[key]
        if key == "bottom_policy":
            a, b = a[ro.attention_mask.bool()], b[ro.attention_mask.bool()]
        elif key == "bottom_rm":  # the EOS column too, where a cut response is read
            a, b = a[real], b[real]
        else:
            a, b = a[ro.response_mask], b[ro.response_mask]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=key)


def test_tokens_shared_and_attention_pairs_count_what_the_rows_compute():
    # row 1 begins with row 0's 3 tokens at the same positions (row 0's left padding does not shift them), row 2 with
    # their first 2; the same token at another position is not shared
    ids = torch.tensor([[0, 5, 6, 7, 8, 9], [5, 6, 7, 10, 11, 12], [5, 6, 9, 9, 9, 0], [0, 0, 0, 0, 6, 7]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1]])
    ro = Rollouts(ids, mask, mask[:, 3:].bool(), torch.ones(4, dtype=torch.bool), 3, [""] * 4, ["p"] * 4, None)
    assert shared_token_count(ro).item() == 3 + 2
    # rows of 5, 6, 5 and 2 real tokens relate n(n + 1) / 2 causal pairs each
    assert attention_pairs(ro).item() == 15 + 21 + 15 + 3


def test_without_clipping_the_two_models_step_apart_and_train_what_one_step_would(tmp_path, monkeypatch):
    """Full fine-tuning without gradient clipping (TRL's PPO) steps the model back-propagated first before the
    other's forward, so its gradients are freed before the other's exist: the same weights as one step for both."""
    from rlhf.stages import ppo

    freed = []
    original = ppo.step_part

    def watched(st, opt, norms):
        original(st, opt, norms)
        freed.append(all(p.grad is None for p in opt.params))

    monkeypatch.setattr(ppo, "step_part", watched)

    def train(out, apart: bool):
        if not apart:
            monkeypatch.setattr(ppo, "steps_apart", lambda *a: False)
        cfg = one_microbatch_run(out, max_grad_norm=0.0)
        final = ppo.run(cfg)
        return load_causal_lm(str(final))[0].state_dict(), read_metrics(out, "grad_norm")

    apart, apart_norms = train(tmp_path / "apart", True)
    assert freed == [True] * 6  # 3 steps × 2 epochs, each freeing the first model's gradients
    together, together_norms = train(tmp_path / "together", False)
    assert len(freed) == 6
    for k in together:
        torch.testing.assert_close(apart[k], together[k], rtol=1e-5, atol=1e-6, msg=k)
    assert apart_norms == pytest.approx(together_norms, rel=1e-5)  # the whole gradient's norm, as before
    assert any(not torch.equal(together[k], v) for k, v in load_causal_lm("tiny")[0].state_dict().items())


def test_the_models_step_apart_only_where_that_is_one_step():
    from rlhf.config import PPOConfig
    from rlhf.stages.ppo import kept_step, steps_apart

    unclipped = PPOConfig(policy="tiny", reward="tiny", prompts="p.jsonl", out="o", max_grad_norm=0.0)
    clipped = PPOConfig(policy="tiny", reward="tiny", prompts="p.jsonl", out="o", max_grad_norm=1.0)
    assert steps_apart(unclipped, True, [[0, 1, 2, 3]])
    assert not steps_apart(clipped, True, [[0, 1, 2, 3]])  # the clipping factor needs the whole gradient
    assert not steps_apart(unclipped, True, [[0, 1], [2, 3]])  # gradients accumulate over micro-batches
    assert not steps_apart(unclipped, False, [[0, 1, 2, 3]])  # several processes: one forward, one backward
    # a skipped update says when the model stepped first had already stepped
    assert "already stepped" in kept_step([0.5]) and kept_step([]) == kept_step([float("nan")]) == ""
