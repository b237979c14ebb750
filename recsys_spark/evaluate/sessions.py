"""Next-item evaluation of session models (GRU4Rec's protocol), and its popularity and item-kNN baselines.

Protocol. In every test session, every event after the first is a query: the scorer has read the
session up to the previous event and scores the **whole catalogue**; the query's rank is the position
of the actual next item. Items already in the session are *not* filtered (a session may click an item
again, and that click counts). Sessions of length 1 hold no query.

Tie rule, stated once: ``ties="standard"`` (the default, the official GRU4Rec evaluation's convention)
ranks the target at ``1 + #items with a strictly higher score``, i.e. first among the items that tie
with it; ``ties="conservative"`` at ``#items with a score >= the target's`` (last among them). A model
whose scores tie a lot (popularity, co-occurrence counts) is flattered by the standard rule, so the
baselines here break their ties by popularity.

Metrics at each k: ``recall@k`` (= HR@k: one relevant item per query), ``mrr@k`` and ``ndcg@k``, averaged
over queries, each computed by ``recsys_spark.metrics`` (the same per-user functions as the ranking
evaluator) from the query's rank.

Scorers. A scorer has ``n_items`` and ``start(batch_size)``, which returns a fresh ``score_fn(inputs [B],
reset [B]) -> scores [B, n_items]`` holding its own per-row state: it is fed the steps of a session-parallel
iteration (``recsys_spark.data.session_batches``), ``reset`` True where a row starts a new session and
``inputs`` PAD (-1) on idle rows, whose scores are ignored.

A model with a session form returns its scorer from ``Recommender.fit_session_scorer`` (GRU4Rec's is in
``recsys_spark.models.gru4rec``; networks are wrapped by :class:`ModuleScorer`). The baselines
(:data:`BASELINES`) are the protocol's own, with their own names in ``gold/metrics``: ``session_pop``
(:class:`PopularityScorer`) and ``session_itemknn`` (:class:`ItemKNNScorer`, the GRU4Rec paper's
item-kNN), fitted on the train sessions.

Distribution. :func:`evaluate_sessions` groups ``silver/sessions`` into item lists on Spark and scores
them on the executors with ``mapInPandas``; the scorer (for a network, its weights as numpy arrays) is
broadcast once, and each partition sends back only its metric sums. :func:`next_item_metrics` is the same
computation in one process (validation, benchmarks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol, Self

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys_spark import metrics as M
from recsys_spark import tables as tb
from recsys_spark.data.sequences import session_item_arrays
from recsys_spark.data.session_batches import SessionData, SessionParallelBatches
from recsys_spark.errors import RecsysError
from recsys_spark.scoring import ModuleSnapshot

log = logging.getLogger(__name__)

SESSION_METRICS = (M.RECALL, M.MRR, M.NDCG)
N_QUERIES = "n_queries"
TIES = ("standard", "conservative")

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class SessionScorer(Protocol):
    n_items: int

    def start(self, batch_size: int) -> ScoreFn: ...


# ------------------------------------------------------------------------------------------- metrics


def query_ranks(scores: np.ndarray, targets: np.ndarray, ties: str = "standard") -> np.ndarray:
    """Rank (1 = best) of each row's target among the row's scores: scores [Q, n_items], targets [Q]."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    target_scores = np.take_along_axis(scores, targets[:, None], axis=1)  # [Q, 1]
    if ties == "standard":
        return 1 + (scores > target_scores).sum(axis=1)
    return (scores >= target_scores).sum(axis=1)


def _metric_table(ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Each metric at each k for a single relevant item at rank r, looked up as table[name][r - 1]; the
    last row (index max(ks)) is a miss. Values come from ``recsys_spark.metrics``."""
    depth = int(max(ks))
    table = {name: np.zeros((depth + 1, len(ks))) for name in SESSION_METRICS}
    target, other = 0, -1
    for rank in range(1, depth + 2):
        ranked = np.full(min(rank, depth), other)
        if rank <= depth:
            ranked[rank - 1] = target
        values = M.user_metrics(ranked, [target], ks)
        for name in SESSION_METRICS:
            table[name][rank - 1] = values[name]
    return table


def metric_sums(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Sum over queries of each metric at each k ({name: [len(ks)]}), from the queries' ranks."""
    table = _metric_table(ks)
    rows = np.minimum(np.asarray(ranks, dtype=np.int64), int(max(ks)) + 1) - 1
    return {name: table[name][rows].sum(axis=0) for name in SESSION_METRICS}


def session_ranks(score_fn: ScoreFn, sessions: SessionData | Sequence[Sequence[int]], batch_size: int = 256,
                  ties: str = "standard") -> np.ndarray:
    """The rank of every query of ``sessions`` under ``score_fn`` (a fresh ``SessionScorer.start``)."""
    ranks = []
    for step in SessionParallelBatches(sessions, batch_size):
        scores = np.asarray(score_fn(step.inputs, step.reset))  # [B, n_items]
        rows = np.flatnonzero(step.active)
        ranks.append(query_ranks(scores[rows], step.targets[rows], ties))
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


def next_item_metrics(score_fn: ScoreFn, sessions: SessionData | Sequence[Sequence[int]],
                      ks: Sequence[int] = (20,), batch_size: int = 256, ties: str = "standard") -> dict[str, float]:
    """Recall@k, MRR@k and NDCG@k of next-item prediction over ``sessions`` (item lists, time order).

    ``score_fn(inputs [B], reset [B]) -> scores [B, n_items]``: see the module docstring (e.g.
    ``scorer.start(batch_size)``). Returns ``{"recall@20": ..., "mrr@20": ..., "ndcg@20": ...,
    "n_queries": ...}``; metric values are nan without queries.

    >>> fn = PopularityScorer(np.array([5, 1, 3])).start(2)  # scores: item 0 > item 2 > item 1
    >>> next_item_metrics(fn, [[2, 0, 1]], ks=[1, 2])  # targets 0 (rank 1) then 1 (rank 3)
    {'recall@1': 0.5, 'recall@2': 0.5, 'mrr@1': 0.5, 'mrr@2': 0.5, 'ndcg@1': 0.5, 'ndcg@2': 0.5, 'n_queries': 2}
    """
    cutoffs = [int(k) for k in M.check_ks(ks)]
    ranks = session_ranks(score_fn, sessions, batch_size, ties)
    sums = metric_sums(ranks, cutoffs)
    return _means(sums, len(ranks), cutoffs)


def _means(sums: dict[str, np.ndarray], n: int, ks: Sequence[int]) -> dict[str, float]:
    out: dict[str, Any] = {}
    for name in SESSION_METRICS:
        for i, k in enumerate(ks):
            out[f"{name}@{k}"] = float(sums[name][i] / n) if n else float("nan")
    out[N_QUERIES] = int(n)
    return out


# ---------------------------------------------------------------------------------------------- Spark


def evaluate_sessions(spark: SparkSession, sessions: DataFrame, scorer: SessionScorer, ks: Sequence[int] = (20,),
                      batch_size: int = 256, ties: str = "standard") -> dict[str, float]:
    """:func:`next_item_metrics` over ``sessions`` (``silver/sessions`` rows: session_id, item_idx, position),
    run on the executors: the scorer is broadcast, each partition scores its sessions and returns metric
    sums. Session order across partitions does not change the result (each query depends only on its own
    session's prefix)."""
    cutoffs = [int(k) for k in M.check_ks(ks)]
    if ties not in TIES:
        raise RecsysError(f"ties must be one of {TIES}, got {ties!r}")
    lists = session_item_arrays(sessions).select(tb.ITEMS)
    shared = spark.sparkContext.broadcast(scorer)
    try:
        sums = lists.mapInPandas(
            partial(_partition_sums, scorer=shared, ks=tuple(cutoffs), batch_size=batch_size, ties=ties),
            f"{tb.METRIC} string, {tb.K} int, _total double, _count long",
        )
        rows = sums.groupBy(tb.METRIC, tb.K).agg(F.sum("_total").alias("_total"),
                                                 F.sum("_count").alias("_count")).collect()
    finally:
        shared.unpersist()
    totals = {name: np.zeros(len(cutoffs)) for name in SESSION_METRICS}
    n = 0
    for row in rows:
        if row[tb.METRIC] == N_QUERIES:
            n = int(row["_count"])
        else:
            totals[row[tb.METRIC]][cutoffs.index(row[tb.K])] = row["_total"]
    log.info("session evaluation: %d queries", n)
    return _means(totals, n, cutoffs)


def _partition_sums(batches: Iterator[pd.DataFrame], scorer, ks: tuple[int, ...], batch_size: int,
                    ties: str) -> Iterator[pd.DataFrame]:
    sessions = [np.asarray(items, dtype=np.int64) for batch in batches for items in batch[tb.ITEMS]]
    ranks = session_ranks(scorer.value.start(batch_size), sessions, batch_size, ties)
    sums = metric_sums(ranks, ks)
    names = [name for name in SESSION_METRICS for _ in ks]
    yield pd.DataFrame({
        tb.METRIC: [*names, N_QUERIES],
        tb.K: np.array([*[k for _ in SESSION_METRICS for k in ks], 0], dtype=np.int32),
        "_total": np.concatenate([*(sums[name] for name in SESSION_METRICS), [0.0]]),
        "_count": np.full(len(names) + 1, len(ranks), dtype=np.int64),
    })


# -------------------------------------------------------------------------------------------- scorers


def popularity_order(item_counts: np.ndarray) -> np.ndarray:
    """A score per item in (0, 1] that orders items by count, ties broken by the smaller index (as the
    recommenders do): the most popular item scores 1, the next 1 - 1/n, and so on. No two items tie."""
    counts = np.asarray(item_counts, dtype=np.float64)
    n = len(counts)
    order = np.lexsort((np.arange(n), -counts))  # most popular first, then by index
    score = np.empty(n)
    score[order] = 1.0 - np.arange(n) / n
    return score


class PopularityScorer:
    """Every query gets the items by their training count (most clicked first, ties by the smaller item
    index), whatever the session."""

    def __init__(self, item_counts: np.ndarray) -> None:
        self.counts = np.asarray(item_counts, dtype=np.float64)
        self.n_items = len(self.counts)
        self.order = popularity_order(self.counts)

    @classmethod
    def fit(cls, sessions: SessionData | Sequence[Sequence[int]], n_items: int) -> PopularityScorer:
        data = sessions if isinstance(sessions, SessionData) else SessionData.from_lists(sessions, min_length=1)
        return cls(np.bincount(data.items, minlength=n_items))

    def start(self, batch_size: int) -> ScoreFn:
        def score(inputs: np.ndarray, reset: np.ndarray) -> np.ndarray:
            return np.broadcast_to(self.order, (len(inputs), self.n_items))

        return score


class ItemKNNScorer:
    """Items that co-occur in sessions with the current item (the GRU4Rec paper's item-kNN baseline).

    ``sim(i, j) = |S_i ∩ S_j| / ((|S_i| + λ)^α (|S_j| + λ)^(1-α))``, with S_i the training sessions that
    contain i: cosine similarity for α = 1/2, λ = 0; λ > 0 damps coincidental similarity of rare items.
    The ``neighbours`` most similar items of each item are kept (a CSR). A query scores the items by
    their similarity to the session's current item; the rest follow by popularity: ``popularity_order``
    times half the smallest kept similarity is added to every score, which breaks all ties and never
    lifts an item above one with a larger similarity, so the standard tie rule flatters nobody.
    """

    def __init__(self, n_items: int, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                 item_counts: np.ndarray) -> None:
        self.n_items = n_items
        self.indptr, self.indices, self.values = indptr, indices, values.astype(np.float32)
        smallest = float(values.min()) if len(values) else 1.0
        self.prior = (0.5 * smallest * popularity_order(item_counts)).astype(np.float32)  # [n_items]

    @classmethod
    def fit(cls, sessions: SessionData | Sequence[Sequence[int]], n_items: int, lam: float = 20.0,
            alpha: float = 0.5, neighbours: int = 100) -> ItemKNNScorer:
        data = sessions if isinstance(sessions, SessionData) else SessionData.from_lists(sessions, min_length=1)
        distinct = [np.unique(data.session(s)) for s in range(data.n_sessions)]
        support = np.zeros(n_items, dtype=np.float64)
        codes = []
        for items in distinct:
            support[items] += 1
            if len(items) > 1:
                pairs = items[:, None] * n_items + items[None, :]  # ordered pairs (i, j)
                codes.append(pairs[~np.eye(len(items), dtype=bool)])
        codes = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)
        pair, co = np.unique(codes, return_counts=True)
        i, j = pair // n_items, pair % n_items
        sim = co / ((support[i] + lam) ** alpha * (support[j] + lam) ** (1 - alpha))
        order = np.lexsort((-sim, i))  # by item, most similar first
        i, j, sim = i[order], j[order], sim[order]
        rank_in_row = np.arange(len(i)) - np.searchsorted(i, i)
        keep = rank_in_row < neighbours
        i, j, sim = i[keep], j[keep], sim[keep]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(i, minlength=n_items))]).astype(np.int64)
        counts = np.bincount(data.items, minlength=n_items)
        return cls(n_items, indptr, j.astype(np.int64), sim, counts)

    def start(self, batch_size: int) -> ScoreFn:
        def score(inputs: np.ndarray, reset: np.ndarray) -> np.ndarray:
            out = np.tile(self.prior, (len(inputs), 1))  # [B, n_items]
            items = np.where(inputs >= 0, inputs, 0)
            lengths = self.indptr[items + 1] - self.indptr[items]  # [B]
            rows = np.repeat(np.arange(len(inputs)), lengths)
            starts = np.repeat(self.indptr[items] - np.cumsum(np.concatenate([[0], lengths[:-1]])), lengths)
            flat = starts + np.arange(lengths.sum())  # positions in indices/values
            out[rows, self.indices[flat]] += self.values[flat]
            return out

        return score


class ModuleScorer:
    """A trained torch network as a scorer: a :class:`~recsys_spark.scoring.ModuleSnapshot` (it pickles and
    broadcasts; the network is rebuilt once per process), or with ``live=True`` the training module itself,
    copying nothing (validation inside a training loop; such a scorer is not for broadcasting).
    Subclasses define ``start``."""

    def __init__(self, snapshot: ModuleSnapshot, live_module=None) -> None:
        self.snapshot, self._live = snapshot, live_module
        self.n_items = int(snapshot.init_kwargs["n_items"])

    @classmethod
    def from_model(cls, model, device: str | None = None, live: bool = False) -> Self:
        """A scorer of ``model``'s weights (copied) on ``device`` (default: the model's), or with ``live``
        the model itself, on its own device."""
        if live:
            return cls(ModuleSnapshot(type(model), model.init_kwargs, {}), live_module=model)
        return cls(ModuleSnapshot.of(model, device or str(next(model.parameters()).device)))

    def __getstate__(self) -> dict:
        if self._live is not None:
            raise TypeError("a live ModuleScorer holds the training module: it is not for pickling")
        return self.__dict__.copy()

    def model(self):
        return self._live if self._live is not None else self.snapshot.module()

    @property
    def device(self):
        return next(self.model().parameters()).device


# The protocol's own baselines, fitted on the train sessions (item lists) over n_items items: their rows in
# gold/metrics carry these names, which no registered model has.
BASELINES: dict[str, Callable[[Sequence[Sequence[int]], int], SessionScorer]] = {
    "session_pop": PopularityScorer.fit,
    "session_itemknn": ItemKNNScorer.fit,
}
