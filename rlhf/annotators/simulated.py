"""A simulated evaluator panel that stands in for human labelers: hidden utility + choice noise + disagreement.

Each evaluator e scores response k as a weighted sum of the criteria in `criteria.py`,
u[e, k] = Σ_c w[e, c] · f_c(prompt, response_k), with its own hidden weights w[e] scattered log-normally around
DEFAULT_WEIGHTS (people value brevity, tone, ... differently), and ranks the K responses of a prompt by u plus
choice noise. The panel-mean utility (`SimulatedPanel.gold`) is the gold preference used to evaluate reward models
and policies, never to train them.

Rankings are lists of tiers, best first, each tier a sorted list of response indices; tied responses share a tier:
`[[2], [0, 3], [1]]` means 2 is best, 0 and 3 are tied, 1 is worst.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from rlhf.algos.aggregate import tiers_from_scores
from rlhf.annotators.criteria import CRITERIA, DEFAULT_WEIGHTS, features
from rlhf.config import AnnotateConfig


@dataclass
class PanelConfig:
    """The simulated panel. Defaults are calibrated to human inter-labeler agreement on the pipeline's own data.

    Target: InstructGPT's training labelers agree with each other on 72.6 ± 1.5% of comparisons (Ouyang et al.
    2022, §5.1). Agreement depends on the data as much as on the noise: responses of clearly different quality are
    easy to agree on. `weight_spread` was fixed first, so that without choice noise evaluators still disagree on
    ~10% of pairs (differing priorities, not only slips: 0.5 gives 0.909 agreement on the synthetic set). Then
    `noise_scale` was chosen on what the pipeline actually ranks: K=4 responses sampled (temperature 1, 128 new
    tokens) by the embedded model after the demo SFT run, for 40 example prompts. Mean agreement of the default
    3-evaluator panel over seeds 0–7:

        noise_scale       0.02   0.03   0.035  0.04   0.05   0.085
        sampled (real)    0.780  0.741  0.723  0.700  0.669  0.593
        synthetic set     0.862  0.836  0.825  0.813  0.789  0.722

    0.035 lands on 72.3% (± 2.7 over seeds) for sampled responses. On the easier synthetic set
    (rlhf/annotators/synthetic.py: demonstrations and degraded copies of them) the same panel agrees on ~82%.
    `benchmarks/annotators.py --library LIBRARY` measures it on any library.
    """

    # Defaults are AnnotateConfig's (what `rlhf annotate` exposes), so the calibrated values live in one place.
    n_evaluators: int = AnnotateConfig.evaluators
    """evaluators in the panel; each ranks every prompt's responses (InstructGPT had ~40 labelers, 1 per prompt)"""
    noise: Literal["bradley_terry", "thurstone"] = AnnotateConfig.noise
    """choice noise: Gumbel (Plackett–Luce rankings, logistic pairwise marginals) or Gaussian (Thurstone case V)"""
    noise_scale: float = AnnotateConfig.noise_scale
    """scale of the choice noise added to utilities (in [0, 1]); calibrated so evaluators agree on ~72.6% of pairs"""
    weight_spread: float = AnnotateConfig.weight_spread
    """log-normal σ of each evaluator's criterion weights around DEFAULT_WEIGHTS (how much their priorities differ)"""
    tie_margin: float = 0.0
    """responses whose noisy utilities differ by less than this (or are exactly equal) are tied"""
    seed: int = 0
    """seeds the evaluators' hidden weights and, with each prompt key, their choice noise"""

    def validate(self) -> None:
        if self.n_evaluators < 1:
            raise ValueError(f"n_evaluators ({self.n_evaluators}) must be at least 1")
        if self.noise not in ("bradley_terry", "thurstone"):
            raise ValueError(f"noise must be 'bradley_terry' or 'thurstone', got {self.noise!r}")
        if self.noise_scale < 0 or self.weight_spread < 0 or self.tie_margin < 0:
            raise ValueError("noise_scale, weight_spread and tie_margin must be non-negative")
        if self.seed < 0:
            raise ValueError(f"seed ({self.seed}) must be non-negative (it seeds numpy's SeedSequence)")


def mean_weights() -> np.ndarray:
    """DEFAULT_WEIGHTS as a vector in CRITERIA order, normalised to sum 1."""
    w = np.array([DEFAULT_WEIGHTS[c] for c in CRITERIA])
    return w / w.sum()


def feature_matrix(prompt: str, responses: Sequence[str], finished: Sequence[bool]) -> np.ndarray:
    """The criteria of each response, (K, C) in CRITERIA order."""
    if len(responses) != len(finished):
        raise ValueError(f"{len(responses)} responses but {len(finished)} finished flags")
    rows = [features(prompt, r, f) for r, f in zip(responses, finished, strict=True)]
    return np.array([[row[c] for c in CRITERIA] for row in rows]).reshape(len(rows), len(CRITERIA))


def weighted_utilities(weights: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """u[e, k] = Σ_c weights[e, c] · feats[k, c], (E, K).

    Elementwise product and a sum over the last axis rather than a matmul: the sum order is then the same for any
    number of evaluators, so an evaluator with the mean weights reproduces `gold` bit for bit.
    """
    return (weights[:, None, :] * feats[None, :, :]).sum(-1)


def stable_hash(key: str) -> int:
    """A 64-bit hash of a string that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


class SimulatedPanel:
    """Evaluators `sim-0`, `sim-1`, ... with hidden weights; deterministic given the config and the prompt key."""

    def __init__(self, cfg: PanelConfig | None = None):
        self.cfg = cfg or PanelConfig()
        self.cfg.validate()
        self.names = [f"sim-{e}" for e in range(self.cfg.n_evaluators)]
        base = mean_weights()
        weights = []
        for e in range(self.cfg.n_evaluators):
            rng = np.random.default_rng([self.cfg.seed, e])
            w = base * np.exp(rng.normal(0.0, 1.0, size=len(CRITERIA)) * self.cfg.weight_spread)
            weights.append(w / w.sum())
        self.weights = np.stack(weights)  # (E, C), rows sum to 1

    def utilities(self, prompt: str, responses: Sequence[str], finished: Sequence[bool]) -> np.ndarray:
        """Each evaluator's noiseless utility of each response, (E, K), in [0, 1]."""
        return weighted_utilities(self.weights, feature_matrix(prompt, responses, finished))

    def gold(self, prompt: str, responses: Sequence[str], finished: Sequence[bool]) -> np.ndarray:
        """The panel-mean utility under the mean weights, (K,): the gold preference, for evaluation only."""
        return weighted_utilities(mean_weights()[None, :], feature_matrix(prompt, responses, finished))[0]

    def rank(
        self, prompt: str, responses: Sequence[str], finished: Sequence[bool], prompt_key: str
    ) -> list[tuple[str, list[list[int]]]]:
        """Each evaluator's ranking of the responses as (name, tiers).

        The noise of evaluator e on a prompt depends only on (seed, e, prompt_key), so a prompt gets the same labels
        whatever order the prompts are labeled in, and re-labeling a prompt reproduces its labels.
        """
        utilities = self.utilities(prompt, responses, finished)  # (E, K)
        key = stable_hash(prompt_key)
        rankings = []
        for e, name in enumerate(self.names):
            rng = np.random.default_rng([self.cfg.seed, e, key])
            if self.cfg.noise == "bradley_terry":
                # argsort(u + Gumbel) samples a Plackett–Luce ranking; each pair's marginal is then
                # P(a > b) = σ((u_a − u_b) / noise_scale), the Bradley–Terry model (Luce 1959; Yellott 1977).
                eps = rng.gumbel(0.0, 1.0, size=len(responses))
            else:
                # Thurstone case V: P(a > b) = Φ((u_a − u_b) / (√2 · noise_scale)).
                eps = rng.normal(0.0, 1.0, size=len(responses))
            rankings.append(
                (name, tiers_from_scores(utilities[e] + self.cfg.noise_scale * eps, tol=self.cfg.tie_margin))
            )
        return rankings
