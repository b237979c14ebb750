"""Negative samplers, drawn inside the training loop: negatives are never materialised in Spark.

Every sampler draws on the device of its ``torch.Generator`` (create the generator on the batch's device),
so a training step needs no host round-trip and a fixed seed gives the same negatives. Each returns a
``Negatives``: the sampled item indices, the log-probability ``log_q`` with which the sampler proposed each
of them (what the log-Q correction of ``losses.sampled_softmax`` subtracts), and, for in-batch negatives,
a mask of the usable ones.

Excluding the positive: ``uniform`` and ``popularity`` take ``positives`` and never return a row's own
positive: both skip it (``uniform`` shifts draws past it, ``popularity`` cuts its interval out of the
CDF), exactly and in one pass; ``in_batch`` cannot choose its items, so it masks instead. ``positives``
has the leading dimensions of ``shape`` (e.g. positives [B] and shape (B, n)), and a negative positive
(``PAD_IDX = -1``, a padded sequence position) excludes nothing. Only the row's positive is excluded, not
every item the user has seen: with sparse data the difference is negligible and it keeps
the samplers free of per-user state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class Negatives(NamedTuple):
    items: Tensor  # [*shape] int64 item indices in 0..n_items-1
    log_q: Tensor | None  # [*shape] log-probability the sampler proposed the item (given the exclusion)
    mask: Tensor | None  # [*shape] bool, True = a usable negative; None = all usable


def _expand_positives(positives: Tensor, shape: tuple[int, ...]) -> Tensor:
    """positives [*lead] -> [*shape], where ``lead`` is a prefix of ``shape``."""
    lead = tuple(positives.shape)
    if lead != tuple(shape[: len(lead)]):
        raise ValueError(f"positives of shape {lead} must match the leading dimensions of {tuple(shape)}")
    return positives.long().reshape(lead + (1,) * (len(shape) - len(lead))).expand(shape)


def uniform(n_items: int, shape: tuple[int, ...], generator: torch.Generator,
            positives: Tensor | None = None) -> Negatives:
    """Items drawn uniformly from the catalogue.

    With ``positives``, each draw is uniform over the ``n_items - 1`` other items: draw from
    ``0..n_items-2`` and shift every draw ``>= positive`` up by one (exact, no resampling loop).
    Positions whose positive is negative (padding) draw from ``0..n_items-2``; their loss is masked anyway.

    >>> g = torch.Generator().manual_seed(0)
    >>> neg = uniform(5, (3, 4), g, positives=torch.tensor([0, 1, 2]))
    >>> bool((neg.items != torch.tensor([[0], [1], [2]])).all())
    True
    """
    device = generator.device
    if positives is None:
        if n_items < 1:
            raise ValueError("uniform sampling needs n_items >= 1")
        items = torch.randint(n_items, shape, generator=generator, device=device)
        return Negatives(items, torch.full(shape, -math.log(n_items), device=device), None)
    if n_items < 2:
        raise ValueError("excluding the positive needs n_items >= 2")
    pos = _expand_positives(positives.to(device), shape)
    items = torch.randint(n_items - 1, shape, generator=generator, device=device)
    items = items + ((items >= pos) & (pos >= 0)).long()
    return Negatives(items, torch.full(shape, -math.log(n_items - 1), device=device), None)


def popularity_probs(item_counts: np.ndarray | Tensor, exponent: float = 0.75) -> Tensor:
    """Sampling distribution ``q_j ∝ count_j ** exponent`` (exponent 0.75 as in word2vec; 1 = raw
    popularity, 0 = uniform over items with a count). float32 [n_items], sums to 1."""
    counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float64)
    if counts.dim() != 1 or (counts < 0).any():
        raise ValueError("item_counts must be a 1-d array of non-negative counts")
    weights = torch.where(counts > 0, counts.pow(exponent), torch.zeros_like(counts))
    if weights.sum() <= 0:
        raise ValueError("item_counts has no positive count")
    return (weights / weights.sum()).float()


def popularity(probs: Tensor, shape: tuple[int, ...], generator: torch.Generator,
               positives: Tensor | None = None) -> Negatives:
    """Items drawn with replacement from ``probs`` [n_items] (see ``popularity_probs``), by inverting the CDF.

    With ``positives``, the positive's interval is cut out of the CDF: ``u`` is uniform on
    ``[0, 1 - q_pos)`` and ``u`` at or past the start of the positive's interval moves up by ``q_pos``,
    so each draw follows ``q_j / (1 - q_pos)`` over the other items exactly, in one pass, with no
    resampling loop and no host synchronisation. ``log_q`` is ``log q_j - log(1 - q_pos)``. Items with
    ``q = 0`` are never drawn.
    """
    device = generator.device
    probs = probs.to(device)
    n_items = probs.shape[0]
    cdf = torch.cumsum(probs.double(), dim=0)  # [n_items], float64 so large catalogues keep their tail
    if positives is None:
        start = width = torch.zeros((), dtype=torch.float64, device=device)
        q_pos = torch.zeros((), device=device)
        pos = None
    else:
        if n_items < 2:
            raise ValueError("excluding the positive needs n_items >= 2")
        pos = _expand_positives(positives.to(device), shape)  # [*shape]
        real = pos >= 0  # a padded position (PAD_IDX) excludes nothing
        idx = pos.clamp(min=0)
        zero = torch.zeros((), dtype=cdf.dtype, device=device)
        start = torch.where(real & (idx > 0), cdf[(idx - 1).clamp(min=0)], zero)  # the positive's interval
        width = torch.where(real, cdf[idx] - start, zero)  # [start, start + width) in the CDF
        q_pos = torch.where(real, probs[idx], torch.zeros((), device=device))
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=device) * (cdf[-1] - width)
    x = torch.where(u >= start, u + width, u)  # skip the positive's interval [start, start + width)
    items = torch.searchsorted(cdf, x, right=True).clamp(max=n_items - 1)  # first j with cdf_j > x
    if pos is not None:  # float rounding at the interval's edge: step off the positive
        items = torch.where(items == pos, (pos + 1) % n_items, items)
    log_q = torch.log(probs[items]) - torch.log1p(-q_pos.clamp(max=1 - 1e-6))
    return Negatives(items, log_q, None)


def in_batch(positives: Tensor, probs: Tensor | None = None) -> Negatives:
    """The other positives of the batch as negatives: positives [B] -> items [B, B], row i = all positives.

    ``mask[i, j]`` is False where ``items[i, j]`` equals row i's positive (the diagonal, and duplicates of
    the same item elsewhere in the batch), so they are never scored as negatives. With ``probs`` (the
    items' share of training positives), ``log_q = log probs[item]``: the sampling-bias correction of
    Yi et al. 2019, to pass to ``sampled_softmax`` for the negatives and the positive alike.
    """
    if positives.dim() != 1:
        raise ValueError(f"in-batch negatives need positives of shape [B], got {tuple(positives.shape)}")
    positives = positives.long()
    items = positives.unsqueeze(0).expand(positives.shape[0], -1)  # [B, B]
    mask = items != positives.unsqueeze(1)  # [B, B]
    log_q = torch.log(probs.to(positives.device)[items]) if probs is not None else None
    return Negatives(items, log_q, mask)


def top_non_positives(scores: Tensor, seen_indptr: np.ndarray, seen_items: np.ndarray, n_hard: int) -> Tensor:
    """Hard negatives: each row's ``n_hard`` highest-scoring items that are not among its positives.

    ``scores`` [U, n_items] (a model's scores of the whole catalogue for U users); the positives are a CSR
    (``seen_indptr`` [U + 1], ``seen_items``) over the same rows. Returns item indices [U, n_hard], best
    first (ties: the smaller item index, a stable sort); a row with fewer than ``n_hard`` non-positives
    is padded with ``PAD_IDX = -1``. ``scores`` is modified in place.
    """
    n_rows, n_items = scores.shape
    rows = np.repeat(np.arange(n_rows), np.diff(seen_indptr))
    device = scores.device
    scores[torch.as_tensor(rows, device=device), torch.as_tensor(seen_items, device=device)] = -torch.inf
    k = min(n_hard, n_items)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # [U, k]
    top = torch.where(torch.isfinite(scores.gather(1, order)), order, torch.full_like(order, -1))
    if k < n_hard:
        top = torch.cat([top, torch.full((n_rows, n_hard - k), -1, dtype=top.dtype, device=device)], dim=1)
    return top


def from_candidates(candidates: Tensor, users: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw ``n`` items per row uniformly from each user's own candidate list, with replacement.

    ``candidates`` [n_users, m] int64: row u holds user u's candidates first, then ``PAD_IDX = -1``
    padding (hard negatives of :func:`top_non_positives`; viewed-but-not-bought items). ``users`` [B].
    Returns (items [B, n], usable [B, n] bool): a user with no candidate gets ``usable`` False (its items
    are 0 and must not be used).
    """
    device = generator.device
    rows = candidates.to(device)[users.long().to(device)]  # [B, m]
    counts = (rows >= 0).sum(-1, keepdim=True)  # [B, 1]
    u = torch.rand((rows.shape[0], n), generator=generator, device=device)  # [B, n]
    pick = (u * counts).long().clamp(max=max(rows.shape[1] - 1, 0))  # [B, n], uniform in 0..count-1
    items = rows.gather(1, pick) if rows.shape[1] else torch.zeros_like(pick)
    usable = (counts > 0).expand_as(items) & (items >= 0)
    return items.clamp(min=0), usable


def mix(base: Negatives, items: Tensor, usable: Tensor, share: float, generator: torch.Generator,
        positives: Tensor | None = None) -> Negatives:
    """``base`` negatives with, at rate ``share``, each position replaced by ``items`` where ``usable``
    (and, given ``positives`` [B], where the item is not the row's positive). ``log_q`` is dropped: the
    mixture's proposal probabilities are not tracked, so use it with bce, bpr, margin or triplet, not
    with a log-Q corrected softmax."""
    take = (torch.rand(base.items.shape, generator=generator, device=generator.device) < share) & usable
    if positives is not None:
        take &= items != _expand_positives(positives.to(items.device), tuple(items.shape))
    return Negatives(torch.where(take, items, base.items), None, base.mask)
