"""InstructGPT's reward-model loss over whole K-way rankings (Ouyang et al. 2022, eq. 1).

    loss(θ) = −1/C(K,2) · E_{(x, y_w, y_l)} [ log σ(r_θ(x, y_w) − r_θ(x, y_l)) ]

For each prompt all ranked pairs of its K responses form ONE batch element: every response goes through the
reward model once, and the C(K,2) comparisons reuse those K scores (instead of 2·C(K,2) forwards, and without the
overfitting InstructGPT saw when the pairs were shuffled into the dataset as independent examples). Pairwise data
is the K = 2 case. Tied responses form no pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kwise_loss(
    scores: torch.Tensor,
    pairs: torch.Tensor,
    pair_task: torch.Tensor,
    n_tasks: int,
    margins: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over tasks of the mean over each task's pairs of −log σ(r_better − r_worse − margin).

    scores:    (N,)  one score per response of the batch, every task's responses concatenated
    pairs:     (P, 2) long, (better, worse) indices into scores
    pair_task: (P,)  long, which task each pair belongs to (0..n_tasks-1); every task has at least one pair
    margins:   (P,)  optional margin each pair must be won by (Touvron et al. 2023, Llama 2 §3.2.2)

    Naive form it replaces:
        sum(mean(-logsigmoid(s[b] - s[w] - m) for b, w, m in task_pairs) for task_pairs in tasks) / n_tasks
    """
    diff = scores[pairs[:, 0]] - scores[pairs[:, 1]]  # (P,)
    if margins is not None:
        diff = diff - margins
    per_pair = -F.logsigmoid(diff)  # (P,)
    per_task = torch.zeros(n_tasks, dtype=per_pair.dtype, device=per_pair.device).index_add_(0, pair_task, per_pair)
    counts = torch.bincount(pair_task, minlength=n_tasks).to(per_pair.dtype)  # (n_tasks,)
    return (per_task / counts).mean()
