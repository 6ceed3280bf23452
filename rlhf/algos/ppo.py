"""PPO for RLHF as small pure functions on tensors: masks, KL estimates, reward shaping, GAE, the clipped losses.

The reward each response token gets is InstructGPT's objective (Ouyang et al. 2022, eq. 2) spread over tokens the
way Ziegler et al. (2019) and "The N+ implementation details of RLHF with PPO" (Huang et al. 2024) do it:

    r_t = −β·KL_t            for every response token t,   KL_t = log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)
    r_T += score(x, y)       at the last response token T

Conventions: B = batch of responses, T = response length (padded), V = vocabulary. `mask` is a (B, T) bool response
mask, True for the real tokens of each row (a prefix: True for t < length_b); values under ~mask are padding and
never change a result. Masks given as 0/1 are accepted and converted with .bool().
"""

from __future__ import annotations

import math

import torch


def _float32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32 for the math; float64 (the tests' references) stays float64."""
    return x if x.dtype == torch.float64 else x.float()


# ----------------------------------------------------------------------------------------------------------------
# masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x over the entries where mask is True; padding may hold anything, even NaN (x·mask would not)."""
    masked = torch.where(mask.bool(), x, 0)
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the entries where mask is True (over all of them when dim is None); NaN where none is."""
    mask = mask.bool()
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance (a scalar) of x over the entries where mask is True; unbiased uses Bessel's n / (n − 1)."""
    mask = mask.bool()
    n = int(mask.sum())
    if n < (2 if unbiased else 1):
        raise ValueError(
            f"masked_var needs at least {2 if unbiased else 1} masked entries, got {n}: "
            "check the response mask (an empty batch of responses?)"
        )
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-8) over the masked entries; 0 outside the mask.

    Advantages are whitened over the whole batch's response tokens (N+ details, "advantage whitening"); with
    shift_mean=False the mean is added back, which only rescales (used for rewards, where the sign carries meaning).
    """
    mask = mask.bool()
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0)


# ----------------------------------------------------------------------------------------------------------------
# log-probabilities, entropy, KL


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) under softmax(logits), in float32: logits (B, T, V), labels (B, T) long -> (B, T).

    bf16 log-probabilities are too coarse for the PPO ratio exp(logp − logp_old) and for KL ≈ 1e-3 per token, so
    the softmax runs in float32. Memory: this materialises one float32 (B, T, V) copy; with a large vocabulary,
    call it on chunks of B. The plain version, whose gradient `LabelLogprobs` computes in fewer passes:
        torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]
    """
    return LabelLogprobs.apply(logits, labels.long())


class LabelLogprobs(torch.autograd.Function):
    """log softmax(logits)[label], with the backward in one new (B, T, V) tensor: the gradient of the logits is
    (onehot(label) − softmax(logits)) · g, so it is exp(log p) scaled by −g with g added at the labels. Autograd's
    backward of the plain version fills a zero (B, T, V) tensor for the gather's gradient and writes another for
    log_softmax's: forward and backward of 8 × 32 positions of a 49k vocabulary 150–163 → 130–140 ms (2-core CPU)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        ctx.save_for_backward(logp, labels)
        ctx.dtype = logits.dtype
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logp, labels = ctx.saved_tensors
        g = grad.float().unsqueeze(-1)  # (B, T, 1)
        out = logp.exp().mul_(-g).scatter_add_(-1, labels.unsqueeze(-1), g)
        return out.to(ctx.dtype), None


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position in float32: (B, T, V) -> (B, T).

    H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v, which never takes log of an underflowed p_v = 0.
    """
    z = logits.float()  # (B, T, V)
    p = torch.softmax(z, dim=-1)  # (B, T, V)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)  # (B, T)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from tokens sampled from π (Schulman, "Approximating KL divergence").

    logprobs, ref_logprobs: (B, T) log π(y_t) and log π_ref(y_t) of the sampled tokens -> (B, T).
      k1 = log π − log π_ref                  unbiased, high variance, negative on some tokens
      k2 = ½ (log π − log π_ref)²             biased (low when π ≈ π_ref), low variance, never negative
      k3 = (r − 1) − log r, r = π_ref / π     unbiased and never negative (log r ≤ r − 1), low variance
    Ziegler et al. 2019 and InstructGPT penalise with k1.
    """
    log_ratio = _float32_or_wider(logprobs) - _float32_or_wider(ref_logprobs)  # (B, T) log π/π_ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        log_r = -log_ratio  # log π_ref/π
        return torch.expm1(log_r) - log_r  # expm1 keeps r − 1 exact for r ≈ 1, where most tokens are
    raise ValueError(f'kl_penalty kind must be "k1", "k2" or "k3", got {kind!r}')


# ----------------------------------------------------------------------------------------------------------------
# rewards


def eos_penalized_scores(scores: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores (B,) with every response that never emitted EOS given the constant `penalty` instead.

    N+ details #23 ("EOS trick"): a truncated response is not a complete answer, and the reward model was never
    trained on one, so its score is not trusted; a fixed low score also teaches the policy to finish.
    """
    scores = _float32_or_wider(scores)
    return torch.where(finished.bool(), scores, torch.full_like(scores, penalty))  # (B,)


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): −kl_coef·KL_t on response tokens, plus the score at each row's last response token.

    scores (B,), kl (B, T), mask (B, T). Ziegler et al. 2019 eq. (2); InstructGPT eq. (2). A row with no response
    token gets no reward at all.
    """
    mask = mask.bool()
    B, T = mask.shape
    rewards = torch.where(mask, -kl_coef * _float32_or_wider(kl), 0)  # (B, T), 0 under ~mask
    # for b in range(B):
    #     if mask[b].any():
    #         last = max(t for t in range(T) if mask[b, t])
    #         rewards[b, last] += scores[b]
    positions = torch.arange(T, device=mask.device).expand(B, T)  # (B, T)
    last = torch.where(mask, positions, 0).amax(dim=1)  # (B,) index of the last True (0 for an empty row)
    score = torch.where(mask.any(dim=1), scores.to(rewards.dtype), 0)  # (B,) nothing for an empty row
    return rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1))  # (B, T)


# ----------------------------------------------------------------------------------------------------------------
# advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) per response: -> advantages, returns, both (B, T).

    rewards, values: (B, T), anything under ~mask. The episode ends after the last response token: the value
    after it is 0 (terminal), so no padding value or reward leaks in. returns = advantages + values, the value
    model's target. Both outputs are 0 under ~mask. Call it on detached tensors (under torch.no_grad()).

        δ_t = r_t + γ V_{t+1} − V_t,      A_t = δ_t + γ λ A_{t+1}
    """
    mask = mask.bool()
    B, T = mask.shape
    rewards = torch.where(mask, _float32_or_wider(rewards), 0)  # (B, T)
    values = torch.where(mask, _float32_or_wider(values), 0)  # (B, T), so V after the last real token is 0
    next_values = torch.cat([values[:, 1:], values.new_zeros(B, 1)], dim=1)  # (B, T) V_{t+1}
    deltas = rewards + gamma * next_values - values  # (B, T)
    # Per row, the loop this replaces:
    #     last_gae = 0
    #     for t in reversed(range(length_b)):
    #         last_gae = deltas[b, t] + gamma * lam * last_gae
    #         advantages[b, t] = last_gae
    # Here all rows step back together; at a padding position the running sum is reset to 0, so each row starts
    # from its own last real token.
    last_gae = values.new_zeros(B)  # (B,)
    advantages_reversed = []
    for t in reversed(range(T)):
        last_gae = torch.where(mask[:, t], deltas[:, t] + gamma * lam * last_gae, 0)  # (B,)
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = torch.where(mask, advantages + values, 0)  # (B, T)
    return advantages, returns


# ----------------------------------------------------------------------------------------------------------------
# losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated for minimisation, mean over response tokens.

    logprobs (B, T) of the policy being trained; old_logprobs, advantages (B, T) from the rollout; mask (B, T).
        loss = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − c, 1 + c)),   ρ_t = π(y_t) / π_old(y_t)
    Where the clipped term is the larger one the token gives no gradient: the policy already moved far enough
    in the direction its advantage asks for.
    Stats (detached): clipfrac, the share of tokens where that happened; approx_kl, mean ½(log ρ)² (k2 above) of
    π_old to π; ratio_mean.
    """
    mask = mask.bool()
    log_ratio = _float32_or_wider(logprobs) - _float32_or_wider(old_logprobs)  # (B, T)
    log_ratio = torch.where(mask, log_ratio, 0)  # 0 under ~mask, so padding garbage cannot make NaN gradients
    ratio = torch.exp(log_ratio)  # (B, T)
    advantages = _float32_or_wider(advantages)
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, ½·mean_t max((V − R)², (V_clipped − R)²), V_clipped = V_old + clamp(V − V_old, ±c).

    values (B, T) of the value model being trained; old_values, returns (B, T) from the rollout; mask (B, T).
    Clipping the value update like the policy's is what Ziegler et al.'s lm-human-preferences code does, kept by
    the N+ details; stats: clipfrac, the share of tokens where the clipped loss was the larger (detached).
    """
    mask = mask.bool()
    values, old_values = _float32_or_wider(values), _float32_or_wider(old_values)
    returns = _float32_or_wider(returns)
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)  # (B, T)
    vf_losses = (values - returns) ** 2  # (B, T)
    vf_losses_clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((vf_losses_clipped > vf_losses).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(R − V) / Var(R) over response tokens: 1 = the value model predicts returns exactly, 0 = no better
    than predicting their mean, < 0 = worse. NaN when the returns do not vary."""
    mask = mask.bool()
    values, returns = _float32_or_wider(values.detach()), _float32_or_wider(returns.detach())
    var_returns = masked_var(returns, mask)
    ev = 1 - masked_var(returns - values, mask) / var_returns
    return torch.where(var_returns == 0, torch.nan, ev)


# ----------------------------------------------------------------------------------------------------------------
# KL coefficient controllers and reward normalisation


class FixedKLController:
    """A constant β (InstructGPT uses a fixed KL coefficient)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """β steered towards a target KL (Ziegler et al. 2019, §2.2):

        e_t = clip(KL_t / KL_target − 1, −0.2, 0.2),    β_{t+1} = β_t (1 + K_β e_t),   K_β = n_steps / horizon

    KL above target raises β, below lowers it; the clip bounds each update to ±20 % of n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        self.value, self.target, self.horizon = float(d["value"]), float(d["target"]), float(d["horizon"])


class RunningMoments:
    """Running mean and (unbiased) std of every value seen, for optional reward normalisation.

    Batches are combined with the parallel-variance formula (Chan, Golub & LeVeque 1979), in float64 Python
    numbers: for counts n_a, n_b, means μ_a, μ_b and sums of squared deviations M_a, M_b, with δ = μ_b − μ_a,
        μ = μ_a + δ n_b / n,    M = M_a + M_b + δ² n_a n_b / n,    n = n_a + n_b,    std = sqrt(M / (n − 1))
    """

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # Σ (x − mean)² over everything seen

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count >= 2 else 1.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.count * n_b / n
        self.count = n

    def state_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, d: dict) -> None:
        self.count, self.mean, self.m2 = int(d["count"]), float(d["mean"]), float(d["m2"])
