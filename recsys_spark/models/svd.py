"""PureSVD (Cremonesi, Koren & Turrin 2010): a truncated SVD of the user x item matrix, scored as
its low-rank reconstruction.

With ``X`` the (users x items) matrix of the (optionally re-weighted) train weights::

    X ~ U_k Sigma_k V_k^T                        # U_k (users, k), Sigma_k (k, k), V_k (items, k)
    score(u, .) = u_k Sigma_k V_k^T = X_u V_k V_k^T   # (items,): the same, since X V_k = U_k Sigma_k

so the item factors are ``V_k`` and the user factors ``U_k Sigma_k = X V_k``; top-N is the dot product
of the two (``scoring.top_k_from_factors``, the blocked path ALS uses), and both land in
``gold/*_embeddings``. Unobserved entries count as zeros, as in the paper: that is what makes PureSVD
a top-N model rather than a rating predictor.

Two solvers, both on Spark (``solver``):

- ``mllib``: ``pyspark.mllib``'s ``RowMatrix.computeSVD`` (users as sparse rows); on a catalogue of
  more than a few hundred items it runs ARPACK on the driver with one distributed ``X^T X v`` product,
  one Spark job, per Lanczos step (hundreds of them).
- ``randomized``: subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4, on the Gram side):
  ``Q <- orth(X^T X Q)`` from a random (items x (k + oversample)) start, each product one pass of the
  executors over the sparse user blocks, ``power_iters`` passes in all, then the Rayleigh-Ritz step
  ``eig(Q^T X^T X Q)`` on the driver. scripts/bench_linear.py measures both (rank 64): on ML-100K
  computeSVD took 126 s, the randomized solver 8 s with 6 passes (its 64th singular value 3% off
  ARPACK's, the leading ones closer) and 12 s with 10 passes (1.3%); on synthetic 20k users x 1.5k items
  358 s against 6 s. Hence the default ``randomized``, 6 passes; raise ``power_iters`` for tighter values.

Only ``V_k`` (items x k) and small (l x l) matrices ever reach the driver; ``X`` stays distributed.
"""

from __future__ import annotations

import logging
import operator
import os
import time
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.matrix import (
    POSITIONS,
    VALUES,
    bm25_weight,
    catalogue,
    part_block,
    sparse_blocks,
    tfidf_weight,
    user_rows,
)
from recsys_spark.errors import RecsysError
from recsys_spark.models.base import Recommender, read_json
from recsys_spark.scoring import matrix_frame, top_k_from_factors
from recsys_spark.tables import EMBEDDING

log = logging.getLogger(__name__)

ITEM_FACTORS_FILE = "item_factors.npy"
ITEMS_FILE = "item_ids.npy"
USER_FACTORS_DIR = "user_factors"

FACTORS_SCHEMA = T.StructType([T.StructField(tb.USER_IDX, T.IntegerType()),
                               T.StructField(EMBEDDING, T.ArrayType(T.FloatType()))])


class SVDParams(Section):
    """Hyper-parameters; conf/models/svd.yaml says how the defaults were chosen."""

    rank: int = Field(48, gt=0, description="k, the number of singular vectors kept")
    weighting: Literal["raw", "binary", "bm25", "tfidf"] = Field(
        "raw", description="the matrix's entries: the train weights, 1, or BM25 / TF-IDF of the weights")
    bm25_k1: float = Field(1.2, ge=0)
    bm25_b: float = Field(0.75, ge=0, le=1)
    solver: Literal["randomized", "mllib"] = Field(
        "randomized", description="randomized subspace iteration on the executors, or MLlib's computeSVD")
    oversample: int = Field(10, ge=0, description="randomized: extra columns of the subspace beyond rank")
    power_iters: int = Field(6, ge=1, description="randomized: passes of X^T X over the data")
    seed: int = 42


def weighted(rows: DataFrame, params: SVDParams) -> DataFrame:
    """(user_idx, item_idx, weight) with the entries of ``X`` under ``params.weighting``."""
    rows = rows.select(F.col(tb.USER_IDX).cast("int"), F.col(tb.ITEM_IDX).cast("int"),
                       F.col(tb.WEIGHT).cast("double"))
    if params.weighting == "binary":
        return rows.withColumn(tb.WEIGHT, F.lit(1.0))
    if params.weighting == "bm25":
        return bm25_weight(rows, params.bm25_k1, params.bm25_b)
    if params.weighting == "tfidf":
        return tfidf_weight(rows)
    return rows


def mllib_svd(users: DataFrame, n_items: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigma (k,), V (items, k)) from ``RowMatrix.computeSVD`` over the users' sparse rows. MLlib drops
    singular values below 1e-9 sigma_1, so k may come out below ``rank``."""
    from pyspark.mllib.linalg import Vectors
    from pyspark.mllib.linalg.distributed import RowMatrix

    vectors = users.select(POSITIONS, VALUES).rdd.map(lambda r: Vectors.sparse(n_items, r[0], r[1]))
    svd = RowMatrix(vectors, numCols=n_items).computeSVD(rank, computeU=False)
    return svd.s.toArray(), svd.V.toArray()


def randomized_svd(users: DataFrame, n_items: int, rank: int, oversample: int, power_iters: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigma (k,), V (items, k)) of ``X`` by subspace iteration on ``G = X^T X`` (Halko et al. 2011).

    Each pass computes ``Z = X^T (X Q)`` on the executors (a partition's block ``X_p`` gives
    ``X_p^T (X_p Q)``, a tree reduction sums them) and orthonormalises it on the driver. The last pass's
    ``Z`` also gives the Rayleigh-Ritz matrix ``H = Q^T G Q`` whose eigenpairs ``(s^2, W)`` yield
    ``V = Q W`` and ``sigma = s``: the right singular vectors of ``X`` are the eigenvectors of ``G``."""
    sc = users.sparkSession.sparkContext
    blocks = sparse_blocks(users, n_items).persist()
    width = min(rank + oversample, n_items)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n_items, width)))  # (items, l)
    try:
        for step in range(power_iters):
            basis = sc.broadcast(q)
            z = blocks.map(lambda x, basis=basis: x.T @ (x @ basis.value)).treeReduce(operator.add)  # (items, l)
            basis.destroy()
            if step < power_iters - 1:
                q, _ = np.linalg.qr(z)
    finally:
        blocks.unpersist()
    h = q.T @ z  # (l, l): Q^T X^T X Q
    evals, w = np.linalg.eigh((h + h.T) / 2)
    top = np.argsort(evals)[::-1][:rank]
    return np.sqrt(np.clip(evals[top], 0.0, None)), q @ w[:, top]  # (k,), (items, k)


def project(users: DataFrame, v: np.ndarray) -> DataFrame:
    """(user_idx, embedding): each user's row times ``V`` (= ``U Sigma``), on the executors."""
    factors = users.sparkSession.sparkContext.broadcast(v)
    n_items = v.shape[0]

    def rows_times_v(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for part in batches:
            vectors = np.asarray(part_block(part, n_items, np.float64) @ factors.value, dtype=np.float32)  # (u, k)
            yield pd.DataFrame({tb.USER_IDX: part[tb.USER_IDX].to_numpy(), EMBEDDING: list(vectors)})

    return users.mapInPandas(rows_times_v, FACTORS_SCHEMA)


class SVDRecommender(Recommender):
    """PureSVD behind the project's ``Recommender`` interface; its state is ``V`` and ``U Sigma``.

    Examples
    --------
    >>> model = SVDRecommender(SVDParams(rank=64)).fit(train)  # doctest: +SKIP
    >>> model.recommend(train.select("user_idx"), k=10, seen=train)  # doctest: +SKIP
    """

    name = "svd"
    params_class = SVDParams

    def __init__(self, params: SVDParams | None = None) -> None:
        super().__init__(params)
        self._v: np.ndarray | None = None  # (items, k) float32, rows follow _item_ids
        self._item_ids: np.ndarray | None = None
        self._users: DataFrame | None = None  # (user_idx, embedding): U Sigma
        self.sigma: np.ndarray | None = None  # (k,), after fit

    def _fit(self, train: DataFrame) -> None:
        p = self.params
        rows = weighted(train, p).persist()
        item_ids = catalogue(rows)
        n = item_ids.size
        if p.rank >= n:
            raise RecsysError(f"svd rank {p.rank} must be below the number of train items ({n})")
        users = user_rows(rows, item_ids).persist()
        started = time.perf_counter()
        if p.solver == "mllib":
            sigma, v = mllib_svd(users, n, p.rank)
        else:
            sigma, v = randomized_svd(users, n, p.rank, p.oversample, p.power_iters, p.seed)
        log.info("PureSVD (%s): %d users x %d items, rank %d in %.1f s; sigma %.3g .. %.3g", p.solver,
                 users.count(), n, sigma.size, time.perf_counter() - started, sigma[0], sigma[-1])
        self.sigma = sigma
        self._set_state(v.astype(np.float32), item_ids, project(users, v))
        self._users.count()  # materialised before its inputs leave the cache
        users.unpersist()
        rows.unpersist()

    def _set_state(self, v: np.ndarray, item_ids: np.ndarray, user_factors: DataFrame) -> None:
        self._v, self._item_ids, self._users = v, item_ids, user_factors.persist()

    def _fitted(self) -> None:
        if self._v is None:
            raise RecsysError("the SVD model is not fitted: call fit() or load() first")

    def user_factors(self) -> DataFrame:
        """(user_idx, embedding = the user's row of U_k Sigma_k)."""
        self._fitted()
        return self._users

    def item_factors(self) -> DataFrame:
        """(item_idx, embedding = the item's row of V_k)."""
        self._fitted()
        return matrix_frame(self._users.sparkSession, self._v, tb.ITEM_IDX, self._item_ids)

    def known_users(self) -> DataFrame:
        return self.user_factors().select(tb.USER_IDX)

    def _recommend(self, users: DataFrame, k: int, seen: DataFrame | None, exclude_items: list[int]) -> DataFrame:
        wanted = self.user_factors().join(users, tb.USER_IDX, "left_semi")
        return top_k_from_factors(wanted, self.item_factors(), k, seen, exclude_items, self.users_per_block)

    def _save_state(self, path: str) -> dict:
        self._fitted()
        np.save(os.path.join(path, ITEM_FACTORS_FILE), self._v, allow_pickle=False)
        np.save(os.path.join(path, ITEMS_FILE), self._item_ids, allow_pickle=False)
        self._users.write.mode("overwrite").parquet(os.path.join(path, USER_FACTORS_DIR))
        sigma = None if self.sigma is None else [float(s) for s in self.sigma]
        return {"params": self.params.model_dump(), "sigma": sigma}

    @classmethod
    def load(cls, spark, path: str) -> SVDRecommender:
        meta = read_json(path)
        model = cls(SVDParams.model_validate(meta["params"]))
        model.sigma = None if meta.get("sigma") is None else np.array(meta["sigma"])
        model._set_state(np.load(os.path.join(path, ITEM_FACTORS_FILE), allow_pickle=False),
                         np.load(os.path.join(path, ITEMS_FILE), allow_pickle=False),
                         spark.read.parquet(os.path.join(path, USER_FACTORS_DIR)))
        return model
