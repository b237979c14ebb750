"""Training losses for implicit-feedback recommenders. Plain tensors in, a scalar tensor out.

Shapes: ``pos_logits`` [*] (one positive per row, ``*`` any leading dimensions), ``neg_logits`` [*, n]
(n negatives per positive; a tensor of the same shape as ``pos_logits`` means one negative each).
``weight`` [*] (optional) weighs each positive's term; a 0/1 weight is a mask. The result is the weighted
mean over positives (0 when every weight is 0, so an all-padding batch gives a zero loss, not NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _negatives(pos_logits: Tensor, neg_logits: Tensor) -> Tensor:
    """neg_logits as [*, n]."""
    if neg_logits.shape == pos_logits.shape:
        return neg_logits.unsqueeze(-1)
    if neg_logits.shape[:-1] != pos_logits.shape:
        raise ValueError(
            f"neg_logits {tuple(neg_logits.shape)} must be pos_logits {tuple(pos_logits.shape)} plus a last dim"
        )
    return neg_logits


def _weighted_mean(per_positive: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return per_positive.sum() / max(per_positive.numel(), 1)
    weight = weight.to(per_positive.dtype).expand_as(per_positive)
    return (per_positive * weight).sum() / weight.sum().clamp_min(torch.finfo(per_positive.dtype).tiny)


def bce_sampled(pos_logits: Tensor, neg_logits: Tensor, weight: Tensor | None = None) -> Tensor:
    """Binary cross-entropy with sampled negatives (NCF's log loss; SASRec's original loss with n = 1).

    Per positive: ``-log σ(s⁺) - Σ_k log(1 - σ(s⁻_k)) = softplus(-s⁺) + Σ_k softplus(s⁻_k)``,
    i.e. each negative counts as one labelled-0 instance next to its positive.
    """
    neg = _negatives(pos_logits, neg_logits)
    per_positive = F.softplus(-pos_logits) + F.softplus(neg).sum(-1)  # [*]
    return _weighted_mean(per_positive, weight)


def bpr(pos_logits: Tensor, neg_logits: Tensor, weight: Tensor | None = None) -> Tensor:
    """Bayesian personalised ranking (Rendle et al. 2009): ``-log σ(s⁺ - s⁻)``, averaged over the n
    (positive, negative) pairs of each positive, then over positives."""
    neg = _negatives(pos_logits, neg_logits)
    per_positive = F.softplus(neg - pos_logits.unsqueeze(-1)).mean(-1)  # -log σ(x) = softplus(-x); [*]
    return _weighted_mean(per_positive, weight)


def full_softmax_ce(logits: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """Cross-entropy of a softmax over the whole catalogue: logits [*, C], targets [*] in 0..C-1.

    Targets equal to ``ignore_index`` (``PAD_IDX = -1`` by default) are left out of the mean; if all are,
    the loss is 0.
    """
    flat_targets = targets.reshape(-1).long()
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), flat_targets, ignore_index=ignore_index, reduction="sum"
    )
    return total / (flat_targets != ignore_index).sum().clamp_min(1)


def sampled_softmax(pos_logits: Tensor, neg_logits: Tensor, neg_log_q: Tensor | None = None,
                    pos_log_q: Tensor | None = None, neg_mask: Tensor | None = None,
                    weight: Tensor | None = None) -> Tensor:
    """Softmax cross-entropy over the positive and m sampled negatives, with log-Q correction.

    With negatives j_1..j_m drawn from Q, the corrected logits are ``s'_k = s_k - log(m·Q(j_k))`` and

        loss = -s⁺ + log( exp(s⁺) + Σ_k exp(s'_k) ).

    ``Σ_k exp(s_k) / (m·Q(j_k))`` is the importance-sampling estimate of ``Σ_{j≠+} exp(s_j)`` (Bengio &
    Senecal 2008), so the loss approaches the full softmax cross-entropy; with all n-1 other items as
    negatives and Q uniform over them (m·Q = 1) it equals it exactly. ``neg_log_q`` [*, m] (or anything
    broadcastable, e.g. [m] for negatives shared by the batch) is ``log Q``; None means no correction.

    When the positive itself comes from the sampling distribution, as with in-batch negatives, pass
    ``pos_log_q`` too: every candidate is then corrected by ``log Q`` (Yi et al. 2019, "Sampling-bias-
    corrected neural modeling"), and the common ``log m`` cancels. ``neg_mask`` [*, m] (True = usable)
    drops negatives, e.g. accidental hits equal to the positive.
    """
    neg = _negatives(pos_logits, neg_logits)  # [*, m]
    log_m = math.log(max(neg.shape[-1], 1))
    pos = pos_logits
    if neg_log_q is not None:
        neg = neg - (neg_log_q + log_m)
    if pos_log_q is not None:
        pos = pos - (pos_log_q + log_m)
    if neg_mask is not None:
        neg = neg.masked_fill(~neg_mask, float("-inf"))
    logits = torch.cat([pos.unsqueeze(-1), neg], dim=-1)  # [*, 1 + m], the positive in column 0
    per_positive = torch.logsumexp(logits, dim=-1) - pos  # [*]
    return _weighted_mean(per_positive, weight)


def squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b||²`` over the last dimension: a, b [*, d] (broadcastable) -> [*]."""
    return (a - b).pow(2).sum(-1)


def triplet(anchor: Tensor, pos: Tensor, neg: Tensor, alpha: float = 1.0, weight: Tensor | None = None) -> Tensor:
    """Triplet loss on squared Euclidean distances (Schroff et al. 2015; CML, Hsieh et al. 2017)::

        loss = max(||u - p||² - ||u - n||² + α, 0)

    for an anchor ``u`` (the user), its positive ``p`` and a negative ``n``, averaged over the n negatives
    of each positive, then over positives. Shapes: ``anchor`` and ``pos`` [*, d], ``neg`` [*, n, d] (or
    [*, d] for one negative each); ``weight`` [*] as for the other losses. A model trained with it must
    score by ``-||u - i||²`` for the loss to rank what it trains.
    """
    d_pos = squared_distance(anchor, pos)  # [*]
    if neg.shape == pos.shape:
        neg = neg.unsqueeze(-2)  # [*, 1, d]
    d_neg = squared_distance(anchor.unsqueeze(-2), neg)  # [*, n]
    per_positive = F.relu(d_pos.unsqueeze(-1) - d_neg + alpha).mean(-1)  # [*]
    return _weighted_mean(per_positive, weight)


def margin_ranking(pos_logits: Tensor, neg_logits: Tensor, margin: float = 1.0,
                   weight: Tensor | None = None) -> Tensor:
    """Margin ranking (hinge) loss on scores: ``max(0, margin - s⁺ + s⁻)``, averaged over the n negatives
    of each positive, then over positives (``torch.nn.MarginRankingLoss`` with target 1, per pair).
    Shapes as ``bpr``."""
    neg = _negatives(pos_logits, neg_logits)  # [*, n]
    per_positive = F.relu(margin - pos_logits.unsqueeze(-1) + neg).mean(-1)  # [*]
    return _weighted_mean(per_positive, weight)


def warp(pos_logits: Tensor, neg_logits: Tensor, n_items: int, margin: float = 1.0,
         weight: Tensor | None = None) -> Tensor:
    """WARP, Weighted Approximate-Rank Pairwise loss (Weston et al. 2011), as LightFM trains it.

    For each positive p, negatives n_1, n_2, ... are drawn until one violates the margin,
    ``f(u, n) > f(u, p) - margin``; the number of draws it took estimates the positive's rank,
    ``rank ≈ floor((N - 1) / tries)`` with N = ``n_items``, and the hinge of that negative is weighted by
    ``log(rank)``::

        loss(p) = log(floor((N - 1) / tries)) · max(0, margin - f(u, p) + f(u, n_tries))

    and 0 when none of the ``M`` draws violates (LightFM stops after ``max_sampled`` = M tries). A positive
    ranked near the bottom violates on the first draw and gets the largest weight, one near the top
    rarely violates: the loss optimises the top of the list, which is why it beats BPR's uniform pair
    weights on top-k metrics. Vectorised: the M draws are made at once, ``neg_logits`` [*, M] (column j
    = draw j + 1), the first violating column is found by ``argmax`` over the violation mask, and the weight
    is a constant (no gradient flows through the rank estimate). ``weight`` [*] weighs positives as in
    the other losses; the result is the (weighted) mean over positives.

    >>> pos = torch.tensor([2.0, 0.0, 5.0])
    >>> neg = torch.tensor([[0.0, 1.5, 3.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> # row 0: draw 2 violates (1.5 > 2 - 1): log(floor(9 / 2)) · (1 - 2 + 1.5) = log 4 · 0.5
    >>> # row 1: draw 1 violates: log(9) · 1.5; row 2: no violation, 0
    >>> round(warp(pos, neg, n_items=10).item(), 6) == round((math.log(4) * 0.5 + math.log(9) * 1.5) / 3, 6)
    True
    """
    neg = _negatives(pos_logits, neg_logits)  # [*, M]
    hinge = margin - pos_logits.unsqueeze(-1) + neg  # [*, M]
    violating = hinge > 0  # [*, M]
    first = violating.float().argmax(-1, keepdim=True)  # [*, 1], index of the first violation (0 if none)
    tries = (first + 1).to(pos_logits.dtype).squeeze(-1)  # [*], draws it took
    rank = torch.floor((n_items - 1) / tries).clamp_min(1.0)  # [*], estimated rank of the positive
    found = violating.any(-1)  # [*]
    per_positive = torch.where(found, torch.log(rank) * hinge.gather(-1, first).squeeze(-1),
                               torch.zeros_like(pos_logits))  # [*]
    return _weighted_mean(per_positive, weight)
