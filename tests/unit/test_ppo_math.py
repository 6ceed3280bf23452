"""PPO math against naive per-row loops and closed forms, and the invariances: padding never changes a result."""

import json
import math

import numpy as np
import pytest
import torch

from rlhf.algos.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    eos_penalized_scores,
    explained_variance,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    shape_rewards,
    value_loss,
)


def prefix_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)


def with_garbage_padding(x: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """x with every entry under ~mask replaced by large random numbers, one of them NaN."""
    g = torch.Generator().manual_seed(seed)
    garbage = 1e6 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    out = torch.where(mask, x, garbage)
    padding = (~mask).nonzero()  # (n_pad, 2)
    if len(padding):
        out[tuple(padding[0])] = math.nan
    return out


# ----------------------------------------------------------------------------------------------------------------
# masked statistics


def test_masked_sum_mean_var_equal_the_plain_statistics_of_the_masked_entries():
    torch.manual_seed(0)
    lengths, T = [5, 2, 7, 1], 7
    mask = prefix_mask(lengths, T)
    x = with_garbage_padding(torch.randn(4, T, dtype=torch.float64), mask, seed=1)
    kept = [x[b, t].item() for b in range(4) for t in range(T) if mask[b, t]]
    assert masked_sum(x, mask).item() == pytest.approx(sum(kept), abs=1e-12)
    assert masked_mean(x, mask).item() == pytest.approx(np.mean(kept), abs=1e-12)
    assert masked_var(x, mask).item() == pytest.approx(np.var(kept, ddof=1), abs=1e-12)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(np.var(kept), abs=1e-12)
    per_row = masked_mean(x, mask, dim=1)  # (B,)
    for b, n in enumerate(lengths):
        assert per_row[b].item() == pytest.approx(np.mean(x[b, :n].tolist()), abs=1e-12)
        assert masked_sum(x, mask, dim=1)[b].item() == pytest.approx(sum(x[b, :n].tolist()), abs=1e-12)
    # 0/1 masks work like bool masks
    assert masked_mean(x, mask.long()).item() == masked_mean(x, mask).item()


def test_masked_var_refuses_too_few_entries():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(torch.ones(2, 3), prefix_mask([1, 0], 3))


def test_masked_whiten_gives_mean_0_var_1_over_the_mask_and_ignores_padding():
    torch.manual_seed(0)
    lengths, T = [6, 3, 8], 8
    mask = prefix_mask(lengths, T)
    x = 3.0 + 2.5 * torch.randn(3, T, dtype=torch.float64)
    white = masked_whiten(x, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(white, mask).item() == pytest.approx(1.0, abs=1e-7)  # the 1e-8 in sqrt(var + 1e-8)
    assert torch.all(white[~mask] == 0)
    assert torch.equal(masked_whiten(with_garbage_padding(x, mask, seed=2), mask), white)
    # shift_mean=False: the same spread, the mean kept
    scaled = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(scaled, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-12)
    assert masked_var(scaled, mask).item() == pytest.approx(1.0, abs=1e-7)
    assert torch.all(scaled[~mask] == 0)


# ----------------------------------------------------------------------------------------------------------------
# log-probabilities and entropy


def test_logprobs_and_entropy_equal_the_naive_softmax_per_position():
    torch.manual_seed(0)
    B, T, V = 2, 3, 7
    logits = 4 * torch.randn(B, T, V, dtype=torch.float64)
    labels = torch.randint(V, (B, T))
    logprobs, entropy = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
    assert logprobs.shape == entropy.shape == (B, T) and logprobs.dtype == entropy.dtype == torch.float32
    for b in range(B):
        for t in range(T):
            z = logits[b, t].tolist()
            norm = sum(math.exp(v) for v in z)
            p = [math.exp(v) / norm for v in z]
            assert logprobs[b, t].item() == pytest.approx(math.log(p[labels[b, t]]), abs=1e-5)
            assert entropy[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_logprobs_have_the_gradient_of_the_plain_log_softmax(dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 4, 11)).to(dtype).requires_grad_()
    labels = torch.randint(11, (3, 4))
    labels[0, :] = 5  # the same label at several positions
    upstream = torch.randn(3, 4)
    (logprobs_from_logits(logits, labels) * upstream).sum().backward()
    got, logits.grad = logits.grad, None
    plain = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]
    (plain * upstream).sum().backward()
    assert got.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got, logits.grad, rtol=tol, atol=tol)


def test_logprobs_and_entropy_of_bf16_logits_are_float32_and_exact_cases():
    V = 50
    uniform = torch.zeros(1, 1, V, dtype=torch.bfloat16)
    assert entropy_from_logits(uniform).dtype == torch.float32
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(V), abs=1e-6)
    assert logprobs_from_logits(uniform, torch.tensor([[3]])).item() == pytest.approx(-math.log(V), abs=1e-6)
    certain = torch.full((1, 1, V), -1e4, dtype=torch.bfloat16)
    certain[0, 0, 7] = 0
    assert entropy_from_logits(certain).item() == pytest.approx(0.0, abs=1e-6)  # no NaN from 0·log 0


# ----------------------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_equal_their_formulas_and_k3_is_never_negative():
    torch.manual_seed(0)
    logp, logref = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    for (b, t), lp, lr in zip(np.ndindex(4, 9), logp.flatten().tolist(), logref.flatten().tolist(), strict=True):
        r = math.exp(lr - lp)
        assert kl_penalty(logp, logref, "k1")[b, t].item() == pytest.approx(lp - lr, abs=1e-12)
        assert kl_penalty(logp, logref, "k2")[b, t].item() == pytest.approx(0.5 * (lp - lr) ** 2, abs=1e-12)
        assert kl_penalty(logp, logref, "k3")[b, t].item() == pytest.approx((r - 1) - math.log(r), abs=1e-6)
    assert kl_penalty(logp, logref).equal(kl_penalty(logp, logref, "k1"))
    assert (kl_penalty(logp, logref, "k3") >= 0).all()
    assert (kl_penalty(logp, logref, "k1") < 0).any()  # k1 is not: the k3 check above is not vacuous
    assert torch.all(kl_penalty(logp, logp, "k3") == 0)
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, logref, "k4")


def test_k1_and_k3_averaged_over_samples_of_p_approach_the_exact_kl():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.1, 0.25, 0.15], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())  # KL(p || q) ≈ 0.32
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)  # samples of p, as rollouts are of π
    logp, logq = p.log()[tokens], q.log()[tokens]
    for kind in ("k1", "k3"):
        estimates = kl_penalty(logp, logq, kind)
        standard_error = float(estimates.std()) / math.sqrt(len(tokens))  # ≈ 0.002
        assert abs(float(estimates.mean()) - exact) < 4 * standard_error, kind
    # k2 is biased: on this p, q it is off by far more than its sampling error
    k2 = kl_penalty(logp, logq, "k2")
    assert abs(float(k2.mean()) - exact) > 10 * float(k2.std()) / math.sqrt(len(tokens))


# ----------------------------------------------------------------------------------------------------------------
# rewards


def test_shape_rewards_puts_the_score_at_each_rows_last_real_token():
    lengths, T = [4, 1, 6, 0, 2], 6
    mask = prefix_mask(lengths, T)
    scores = torch.tensor([1.0, -2.0, 0.5, 9.0, 3.0])
    kl = torch.arange(5 * T, dtype=torch.float32).reshape(5, T) / 10
    kl = with_garbage_padding(kl, mask, seed=3)
    rewards = shape_rewards(scores, kl, mask, kl_coef=0.2)
    for b, n in enumerate(lengths):
        for t in range(T):
            expected = -0.2 * kl[b, t].item() if t < n else 0.0
            if t == n - 1:
                expected += scores[b].item()
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6), (b, t)
    assert torch.all(rewards[3] == 0)  # the empty row gets nothing, not its score 9 at position 0


def test_eos_penalized_scores_then_shape_rewards_gives_no_eos_rows_the_penalty():
    lengths, T = [3, 5, 2], 5
    mask = prefix_mask(lengths, T)
    scores = torch.tensor([2.0, 4.0, -1.0])
    finished = torch.tensor([1, 0, 1])  # row 1 ran to the length limit without EOS
    penalized = eos_penalized_scores(scores, finished, penalty=-1.0)
    assert penalized.tolist() == [2.0, -1.0, -1.0] and penalized.dtype == torch.float32
    rewards = shape_rewards(penalized, torch.zeros(3, T), mask, kl_coef=0.1)
    assert rewards.tolist() == [[0, 0, 2.0, 0, 0], [0, 0, 0, 0, -1.0], [0, -1.0, 0, 0, 0]]


# ----------------------------------------------------------------------------------------------------------------
# GAE


def naive_gae(rewards, values, lengths, gamma, lam):
    """Per row, the textbook backward recursion over the real tokens only, terminal after the last one."""
    B, T = len(rewards), len(rewards[0])
    advantages, returns = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        last_gae = 0.0
        for t in reversed(range(lengths[b])):
            next_value = values[b][t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            last_gae = delta + gamma * lam * last_gae
            advantages[b][t] = last_gae
            returns[b][t] = last_gae + values[b][t]
    return torch.tensor(advantages, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


def test_gae_equals_the_naive_per_row_loop():
    torch.manual_seed(0)
    lengths, T = [7, 3, 1, 5, 0], 7
    mask = prefix_mask(lengths, T)
    rewards, values = torch.randn(5, T, dtype=torch.float64), torch.randn(5, T, dtype=torch.float64)
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0)]:
        advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
        ref_advantages, ref_returns = naive_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
        assert torch.allclose(advantages.double(), ref_advantages, atol=1e-5), (gamma, lam)
        assert torch.allclose(returns.double(), ref_returns, atol=1e-5), (gamma, lam)
        assert torch.all(advantages[~mask] == 0) and torch.all(returns[~mask] == 0)


def test_gae_with_gamma_and_lam_1_returns_the_reward_to_go():
    torch.manual_seed(0)
    lengths, T = [6, 2, 4], 6
    mask = prefix_mask(lengths, T)
    rewards, values = torch.randn(3, T), torch.randn(3, T)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b, n in enumerate(lengths):
        for t in range(n):
            reward_to_go = sum(rewards[b, t:n].tolist())
            assert returns[b, t].item() == pytest.approx(reward_to_go, abs=1e-5)
            assert advantages[b, t].item() == pytest.approx(reward_to_go - values[b, t].item(), abs=1e-5)


def test_gae_does_not_change_when_values_and_rewards_under_the_padding_are_randomised():
    torch.manual_seed(0)
    lengths, T = [9, 4, 1, 6], 9
    mask = prefix_mask(lengths, T)
    rewards, values = torch.randn(4, T), torch.randn(4, T)
    advantages, returns = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    for seed in range(5):
        noisy_rewards = with_garbage_padding(rewards, mask, seed=seed)
        noisy_values = with_garbage_padding(values, mask, seed=100 + seed)
        noisy_advantages, noisy_returns = gae(noisy_rewards, noisy_values, mask, gamma=0.99, lam=0.95)
        assert torch.equal(noisy_advantages, advantages) and torch.equal(noisy_returns, returns)
    # and a row computed alone, unpadded, gives the same numbers as inside the padded batch
    alone, _ = gae(rewards[1:2, :4], values[1:2, :4], torch.ones(1, 4, dtype=torch.bool), gamma=0.99, lam=0.95)
    assert torch.allclose(alone[0], advantages[1, :4])


# ----------------------------------------------------------------------------------------------------------------
# losses


def naive_policy_loss(logprobs, old_logprobs, advantages, lengths, c):
    terms = []
    for b, n in enumerate(lengths):
        for t in range(n):
            ratio = math.exp(logprobs[b][t] - old_logprobs[b][t])
            a = advantages[b][t]
            terms.append(max(-a * ratio, -a * min(max(ratio, 1 - c), 1 + c)))
    return sum(terms) / len(terms)


def test_policy_loss_equals_the_naive_per_token_computation():
    torch.manual_seed(0)
    lengths, T = [5, 2, 6], 6
    mask = prefix_mask(lengths, T)
    old_logprobs = -torch.rand(3, T, dtype=torch.float64) * 3
    logprobs = old_logprobs + 0.4 * torch.randn(3, T, dtype=torch.float64)  # ratios in about [0.5, 2]
    advantages = torch.randn(3, T, dtype=torch.float64)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    expected = naive_policy_loss(logprobs.tolist(), old_logprobs.tolist(), advantages.tolist(), lengths, 0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    kept = [(logprobs[b, t] - old_logprobs[b, t]).item() for b, n in enumerate(lengths) for t in range(n)]
    assert stats["approx_kl"].item() == pytest.approx(np.mean([0.5 * d**2 for d in kept]), abs=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx(np.mean([math.exp(d) for d in kept]), abs=1e-5)
    # padding garbage changes nothing and does not turn gradients into NaN
    logprobs = logprobs.clone().requires_grad_()
    loss, _ = policy_loss(
        with_garbage_padding(logprobs, mask, 1), old_logprobs, with_garbage_padding(advantages, mask, 2), mask, 0.2
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert loss.item() == pytest.approx(expected, abs=1e-5) and torch.isfinite(grad).all()
    assert torch.all(grad[~mask] == 0)


def test_policy_loss_gives_no_gradient_where_the_ratio_is_clipped_in_the_direction_of_the_advantage():
    c = 0.2
    log_ratios = [math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5), math.log(1.1), 0.0]
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0, 2.0, -3.0, 5.0]])
    # token 0: ratio 1.5 > 1.2 and A > 0  -> clipped, no gradient
    # token 1: ratio 0.5 < 0.8 and A < 0  -> clipped, no gradient
    # token 2: ratio 1.5 but A < 0        -> the unclipped term is larger: gradient −A·ρ = 1.5
    # token 3: ratio 0.5 but A > 0        -> unclipped: gradient −A·ρ = −0.5
    # token 4: ratio 1.1 inside the range -> gradient −2·1.1
    # token 5: ratio 1                    -> gradient 3
    # token 6: padding (its ratio would be clipped)
    old_logprobs = torch.full((1, 7), -2.0, dtype=torch.float64)
    logprobs = (old_logprobs + torch.tensor([log_ratios + [math.log(3.0)]], dtype=torch.float64)).requires_grad_()
    mask = prefix_mask([6], 7)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages.double(), mask, cliprange=c)
    (grad,) = torch.autograd.grad(loss, logprobs)
    # d/dlogp (−A·ρ) = −A·ρ, divided by the 6 real tokens of the mean
    expected = torch.tensor([[0.0, 0.0, 1.5, -0.5, -2.2, 3.0, 0.0]], dtype=torch.float64) / 6
    assert torch.allclose(grad, expected, atol=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(2 / 6)  # tokens 0 and 1; the padding token is not counted
    assert not stats["clipfrac"].requires_grad


def test_value_loss_equals_the_naive_per_token_computation():
    torch.manual_seed(0)
    lengths, T = [4, 6, 1], 6
    mask = prefix_mask(lengths, T)
    old_values, returns = torch.randn(3, T, dtype=torch.float64), torch.randn(3, T, dtype=torch.float64)
    values = (old_values + 0.5 * torch.randn(3, T, dtype=torch.float64)).requires_grad_()
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    terms, clipped = [], []
    for b, n in enumerate(lengths):
        for t in range(n):
            v, old, ret = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            v_clipped = old + min(max(v - old, -0.2), 0.2)
            terms.append(max((v - ret) ** 2, (v_clipped - ret) ** 2))
            clipped.append((v_clipped - ret) ** 2 > (v - ret) ** 2)
    assert loss.item() == pytest.approx(0.5 * np.mean(terms), abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(np.mean(clipped))
    assert 0 < stats["clipfrac"].item() < 1  # the case exercises both branches


def test_value_loss_clipfrac_on_a_hand_made_case():
    old_values = torch.zeros(1, 3)
    values = torch.tensor([[1.0, 1.0, 0.1]])  # moved by 1, 1 and 0.1 from old
    returns = torch.tensor([[2.0, -1.0, 0.0]])
    # token 0: v_clipped 0.2, loss max(1, 3.24) = 3.24 clipped; token 1: max(4, 1.44) = 4; token 2: max(0.01, 0.01)
    loss, stats = value_loss(values, old_values, returns, torch.ones(1, 3), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 4 + 0.01) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)


def test_explained_variance_is_1_for_perfect_predictions_and_0_for_the_mean():
    torch.manual_seed(0)
    mask = prefix_mask([5, 3, 6], 6)
    returns = torch.randn(3, 6, dtype=torch.float64)
    garbage = with_garbage_padding(returns, mask, seed=4)
    assert explained_variance(garbage, returns, mask).item() == pytest.approx(1.0, abs=1e-12)
    mean = masked_mean(returns, mask)
    assert explained_variance(torch.full_like(returns, mean.item()), returns, mask).item() == pytest.approx(
        0.0, abs=1e-12
    )
    noisy = returns + 0.5 * torch.randn(3, 6, dtype=torch.float64)
    kept = mask.flatten()
    r, v = returns.flatten()[kept].numpy(), noisy.flatten()[kept].numpy()
    assert explained_variance(noisy, returns, mask).item() == pytest.approx(1 - np.var(r - v) / np.var(r), abs=1e-9)
    assert math.isnan(explained_variance(returns, torch.ones(3, 6), mask).item())


# ----------------------------------------------------------------------------------------------------------------
# KL controllers and running moments


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(100.0, 512)
    assert controller.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert other.value == 0.05


def test_adaptive_kl_controller_follows_ziegler_et_al():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    controller.update(6.6, n_steps=256)  # 10 % above target: β ×(1 + 0.1·256/10000)
    assert controller.value == pytest.approx(0.1 * (1 + 0.1 * 0.0256))
    beta = controller.value
    controller.update(4.8, n_steps=256)  # 20 % below: β ×(1 − 0.2·0.0256)
    assert controller.value == pytest.approx(beta * (1 - 0.2 * 0.0256))
    for kl, error in [(60.0, 0.2), (6.0 * 1.2, 0.2), (0.0, -0.2), (1.0, -0.2)]:  # the error is clipped to ±0.2
        beta = controller.value
        controller.update(kl, n_steps=256)
        assert controller.value == pytest.approx(beta * (1 + error * 0.0256)), kl
    above, below = AdaptiveKLController(0.1, 6.0, 10_000), AdaptiveKLController(0.1, 6.0, 10_000)
    above.update(8.0, 64)
    below.update(3.0, 64)
    assert above.value > 0.1 > below.value


def test_adaptive_kl_controller_state_dict_round_trip_reproduces_the_trajectory():
    kls = [9.0, 7.5, 3.0, 6.2, 12.0, 0.5, 5.9, 6.0]
    uninterrupted = AdaptiveKLController(0.2, target=6.0, horizon=5_000)
    trajectory = []
    for kl in kls:
        uninterrupted.update(kl, 128)
        trajectory.append(uninterrupted.value)
    first = AdaptiveKLController(0.2, target=6.0, horizon=5_000)
    for kl in kls[:3]:
        first.update(kl, 128)
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    resumed.load_state_dict(saved)
    for kl, value in zip(kls[3:], trajectory[3:], strict=True):
        resumed.update(kl, 128)
        assert resumed.value == value


def test_running_moments_equal_numpy_over_the_concatenated_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(5.0, 3.0, size) for size in (1, 7, 0, 64, 2, 33)]
    moments = RunningMoments()
    assert moments.mean == 0.0 and moments.std == 1.0 and moments.count == 0
    moments.update(torch.tensor(batches[0], dtype=torch.float32))
    assert moments.std == 1.0  # one value: no spread yet
    seen = list(batches[0].astype(np.float32))
    for batch in batches[1:]:
        moments.update(torch.tensor(batch, dtype=torch.float32))
        seen += list(batch.astype(np.float32))
        everything = np.array(seen, dtype=np.float64)
        assert moments.count == len(everything)
        assert moments.mean == pytest.approx(everything.mean(), abs=1e-10)
        assert moments.std == pytest.approx(everything.std(ddof=1), abs=1e-10)


def test_running_moments_state_dict_round_trip():
    rng = np.random.default_rng(1)
    batches = [torch.tensor(rng.normal(-2.0, 0.5, 16)) for _ in range(6)]
    uninterrupted, first = RunningMoments(), RunningMoments()
    for batch in batches:
        uninterrupted.update(batch)
    for batch in batches[:3]:
        first.update(batch)
    resumed = RunningMoments()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for batch in batches[3:]:
        resumed.update(batch)
    assert (resumed.count, resumed.mean, resumed.std) == (uninterrupted.count, uninterrupted.mean, uninterrupted.std)
