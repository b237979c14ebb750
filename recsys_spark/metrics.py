"""Ranking metrics, each written once as a per-user function, shared by the Spark evaluator, the session
protocol and the validation loop.

Every function takes one user's ranked items (best first), the user's relevant items and a cut-off
``k``, as plain Python lists or numpy arrays, so that the Spark evaluator (``recsys_spark.evaluate``)
and a torch validation loop score with the same code. Relevance is binary.

Definitions, with "hits" the relevant items among the first ``k`` of ``ranked`` and positions 1-based:

- ``hit_rate``: 1 if there is at least one hit, else 0.
- ``recall``: ``|hits| / |relevant|``, the standard definition. It is not divided by
  ``min(|relevant|, k)``, so a user with more than ``k`` relevant items cannot reach 1.
- ``precision``: ``|hits| / k``, by ``k`` even when ``ranked`` is shorter than ``k``: a model that
  returns fewer items is not rewarded for it.
- ``ndcg``: ``sum over hits at i of 1 / log2(i + 1)`` divided by the ideal DCG, the same sum over
  positions ``1 .. min(|relevant|, k)``.
- ``average_precision`` (MAP@k per user): the sum of precision@i over hit positions i, divided by
  ``min(|relevant|, k)``.
- ``reciprocal_rank`` (MRR@k per user): ``1 / i`` for the first hit at position i, 0 without a hit.

Tie rule: ``ranked`` is taken as given. Recommenders break score ties by the smaller ``item_idx``
(``recsys_spark.models.base``) and the evaluator orders each list by ``rank``, never by score.

Preconditions: ``ranked`` holds distinct items (duplicates in ``relevant`` are ignored). A user with
no relevant items cannot be scored: every function returns nan for such a user, so that one cannot
silently pull an average down; the evaluator leaves such users out.

Examples
--------
>>> recall([3, 1, 4], {1, 5}, k=2)
0.5
>>> user_metrics([3, 1, 4], {1, 5}, ks=[1, 2])["hr"]
array([0., 1.])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

HR = "hr"
RECALL = "recall"
PRECISION = "precision"
NDCG = "ndcg"
MAP = "map"
MRR = "mrr"
RANKING_METRICS = (HR, RECALL, PRECISION, NDCG, MAP, MRR)


def hits_at(ranked: Sequence | np.ndarray, relevant: Iterable | np.ndarray, k: int) -> np.ndarray:
    """Boolean hit indicator of positions 1..k; positions past the end of ``ranked`` are misses."""
    top = np.asarray(ranked)[:k]
    hits = np.zeros(k, dtype=bool)
    hits[: top.size] = np.isin(top, _as_array(relevant))
    return hits


# Each formula once, on the hit indicator of the first max(ks) positions, for several ks at once
# (``ks`` is an int array of cut-offs >= 1, ``n_relevant`` >= 1).


def _hit_rate(hits: np.ndarray, n_relevant: int, ks: np.ndarray) -> np.ndarray:
    return (np.cumsum(hits)[ks - 1] > 0).astype(np.float64)


def _recall(hits: np.ndarray, n_relevant: int, ks: np.ndarray) -> np.ndarray:
    return np.cumsum(hits)[ks - 1] / n_relevant


def _precision(hits: np.ndarray, n_relevant: int, ks: np.ndarray) -> np.ndarray:
    return np.cumsum(hits)[ks - 1] / ks


def _ndcg(hits: np.ndarray, n_relevant: int, ks: np.ndarray) -> np.ndarray:
    discount = 1.0 / np.log2(np.arange(2, hits.size + 2))
    dcg = np.cumsum(hits * discount)[ks - 1]
    ideal = np.cumsum(discount)[np.minimum(n_relevant, ks) - 1]
    return dcg / ideal


def _average_precision(hits: np.ndarray, n_relevant: int, ks: np.ndarray) -> np.ndarray:
    precision_at_i = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return np.cumsum(hits * precision_at_i)[ks - 1] / np.minimum(n_relevant, ks)


def _reciprocal_rank(hits: np.ndarray, n_relevant: int, ks: np.ndarray) -> np.ndarray:
    positions = np.flatnonzero(hits)
    if positions.size == 0:
        return np.zeros(ks.size)
    first = positions[0]  # 0-based
    return np.where(ks > first, 1.0 / (first + 1), 0.0)


_FORMULAS: dict[str, Callable[[np.ndarray, int, np.ndarray], np.ndarray]] = {
    HR: _hit_rate,
    RECALL: _recall,
    PRECISION: _precision,
    NDCG: _ndcg,
    MAP: _average_precision,
    MRR: _reciprocal_rank,
}


def user_metrics(ranked: Sequence | np.ndarray, relevant: Iterable | np.ndarray,
                 ks: Sequence[int]) -> dict[str, np.ndarray]:
    """All metrics of one user at each of ``ks``: ``{name: array of len(ks)}``, names in ``RANKING_METRICS``.

    One hit vector of length ``max(ks)`` serves every metric and cut-off; this is what the evaluator
    runs per user. Values are nan when ``relevant`` is empty.
    """
    cutoffs = check_ks(ks)
    rel = _as_array(relevant)
    if rel.size == 0:
        return {name: np.full(cutoffs.size, np.nan) for name in RANKING_METRICS}
    hits = hits_at(ranked, rel, int(cutoffs.max()))
    return {name: formula(hits, rel.size, cutoffs) for name, formula in _FORMULAS.items()}


def hit_rate(ranked: Sequence | np.ndarray, relevant: Iterable | np.ndarray, k: int) -> float:
    """1.0 if a relevant item is among the first ``k``, else 0.0."""
    return _one(HR, ranked, relevant, k)


def recall(ranked: Sequence | np.ndarray, relevant: Iterable | np.ndarray, k: int) -> float:
    """Share of the relevant items found in the first ``k``: ``|hits| / |relevant|``."""
    return _one(RECALL, ranked, relevant, k)


def precision(ranked: Sequence | np.ndarray, relevant: Iterable | np.ndarray, k: int) -> float:
    """Share of the first ``k`` positions that hold a relevant item: ``|hits| / k``."""
    return _one(PRECISION, ranked, relevant, k)


def ndcg(ranked: Sequence | np.ndarray, relevant: Iterable | np.ndarray, k: int) -> float:
    """Binary-relevance NDCG with a log2 discount; the ideal DCG is over ``min(|relevant|, k)`` hits."""
    return _one(NDCG, ranked, relevant, k)


def average_precision(ranked: Sequence | np.ndarray, relevant: Iterable | np.ndarray, k: int) -> float:
    """AP@k: sum of precision@i over hit positions i <= k, divided by ``min(|relevant|, k)``."""
    return _one(MAP, ranked, relevant, k)


def reciprocal_rank(ranked: Sequence | np.ndarray, relevant: Iterable | np.ndarray, k: int) -> float:
    """1 / position of the first hit within ``k``, 0.0 without a hit."""
    return _one(MRR, ranked, relevant, k)


def check_ks(ks: Sequence[int]) -> np.ndarray:
    """Cut-offs as an int array; each must be an integer >= 1, since a top-0 list measures nothing."""
    cutoffs = np.asarray(list(ks))
    if cutoffs.size == 0 or cutoffs.ndim != 1 or not np.issubdtype(cutoffs.dtype, np.integer) or cutoffs.min() < 1:
        raise ValueError(f"cut-offs must be a non-empty list of integers >= 1, got {list(ks)}")
    return cutoffs.astype(np.int64)


def _one(name: str, ranked: Sequence | np.ndarray, relevant: Iterable | np.ndarray, k: int) -> float:
    cutoffs = check_ks([k])
    rel = _as_array(relevant)
    if rel.size == 0:
        return float("nan")
    return float(_FORMULAS[name](hits_at(ranked, rel, k), rel.size, cutoffs)[0])


def _as_array(items: Iterable | np.ndarray) -> np.ndarray:
    """Distinct items as an array; sets are accepted as well as lists and arrays."""
    if isinstance(items, np.ndarray):
        return np.unique(items)
    return np.unique(np.asarray(list(items)))
