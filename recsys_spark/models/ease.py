"""EASE, the closed-form item-item model (Steck 2019, "Embarrassingly Shallow Autoencoders").

With ``X`` the (users x items) matrix of the train weights, EASE learns the item-item matrix ``B`` that
best reconstructs ``X`` from ``X B`` with a zero diagonal (no item may predict itself)::

    G = X^T X + lambda I                    # (items, items), the regularised Gram matrix
    P = G^-1                                # (items, items)
    B = I - P diagMat(1 / diag(P))          # B_ij = -P_ij / P_jj for i != j, and diag(B) = 0
    score(u, .) = X_u B                     # (items,), the user's row times B

Where it runs: ``X^T X`` on the executors (a sparse ``X_p^T X_p`` per partition of user rows, summed by
a tree reduction, ``recsys_spark.data.matrix.gram``); the inversion on the driver in float64, because
``P`` is a dense (items x items) matrix that no partitioning shrinks. That holds ``G``, its inverse
and ``B`` on the driver: 12 n^2 bytes (``P`` in float64, in place of the Gram, and ``B`` in float32) and
n^3 flops. At 20k items that measured 4.5 GiB and 262 s on 2 busy cores (scripts/bench_linear.py), so a
catalogue above ``max_items`` (20000) is refused with an error naming the count.
``B`` is kept in float32 and broadcast to the executors, which score blocks of users as ``X_u B``
(``scoring.top_k_from_scores``).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pandas as pd
from pydantic import Field
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.matrix import POSITIONS, catalogue, gram, part_block, sparse_blocks, user_rows
from recsys_spark.errors import RecsysError
from recsys_spark.models.base import Recommender, read_json
from recsys_spark.scoring import top_k_from_scores
from recsys_spark.tables import SIMILAR_ITEM_IDX

log = logging.getLogger(__name__)

WEIGHTS_FILE = "B.npy"
ITEMS_FILE = "item_ids.npy"
HISTORY_DIR = "history"


class EASEParams(Section):
    """Hyper-parameters; conf/models/ease.yaml says how the defaults were chosen."""

    reg: float = Field(300.0, gt=0, description="lambda, the L2 penalty on B (added to the Gram's diagonal)")
    max_items: int = Field(20000, gt=0, description="largest catalogue inverted on the driver (dense items^2)")


def ease_weights(g: np.ndarray, reg: float) -> np.ndarray:
    """``B = I - P diagMat(1/diag(P))`` with ``P = (G + reg I)^-1``, zero diagonal, float32.

    ``g`` is the (items, items) Gram ``X^T X`` in float64; it is overwritten (it becomes ``P``), so the
    driver holds one n^2 float64 matrix plus the float32 result. ``G + reg I`` is symmetric positive
    definite: LAPACK's Cholesky (``potrf``) and inverse-from-Cholesky (``potri``) take n^3 flops, a
    third of a general inverse's, and work in place."""
    from scipy.linalg import lapack

    n = g.shape[0]
    g[np.diag_indices(n)] += reg  # (n, n): X^T X + lambda I
    a = g.T  # the same symmetric matrix, Fortran-ordered: LAPACK works on it without a copy
    c, info = lapack.dpotrf(a, lower=False, clean=False, overwrite_a=True)
    if info == 0:
        c, info = lapack.dpotri(c, lower=False, overwrite_c=True)
    if info != 0:
        raise RecsysError(f"EASE: X^T X + {reg:g} I is not positive definite (LAPACK info {info}); raise reg")
    p = c  # (n, n): P, its upper triangle only; mirror it
    for start in range(0, n, 1024):
        stop = min(start + 1024, n)
        p[start:stop, :start] = p[:start, start:stop].T
        block = p[start:stop, start:stop]
        block[:] = np.triu(block) + np.triu(block, 1).T
    p /= -np.diag(p).copy()[None, :]  # (n, n): B_ij = -P_ij / P_jj
    p[np.diag_indices(n)] = 0.0  # diag(B) = 0 (the closed form gives exactly 1 - 1)
    return p.astype(np.float32)


class EASERecommender(Recommender):
    """EASE behind the project's ``Recommender`` interface; its state is ``B`` and the users' rows.

    Examples
    --------
    >>> model = EASERecommender(EASEParams(reg=100.0)).fit(train)  # doctest: +SKIP
    >>> model.recommend(train.select("user_idx"), k=10, seen=train)  # doctest: +SKIP
    """

    name = "ease"
    params_class = EASEParams

    def __init__(self, params: EASEParams | None = None) -> None:
        super().__init__(params)
        self._b: np.ndarray | None = None  # (items, items) float32
        self._item_ids: np.ndarray | None = None  # (items,) sorted item_idx of B's rows and columns
        self._history: DataFrame | None = None  # (user_idx, item_idx, weight)

    def _fit(self, train: DataFrame) -> None:
        p = self.params
        history = train.select(F.col(tb.USER_IDX).cast("int"), F.col(tb.ITEM_IDX).cast("int"),
                               F.col(tb.WEIGHT).cast("double")).persist()
        item_ids = catalogue(history)
        n = item_ids.size
        if n > p.max_items:
            raise RecsysError(f"EASE inverts a dense items x items matrix on the driver: the train rows hold {n} "
                              f"items, above max_items={p.max_items} (raise model_params.ease.max_items if the "
                              f"driver has ~{12 * n * n / 2**30:.1f} GiB, or use svd or als)")
        started = time.perf_counter()
        rows = user_rows(history, item_ids)
        g = gram(sparse_blocks(rows, n), n)  # (n, n) float64: X^T X
        gram_s = time.perf_counter() - started
        b = ease_weights(g, p.reg)
        log.info("EASE: %d items, Gram %.1f s, inversion %.1f s (reg=%g)", n, gram_s,
                 time.perf_counter() - started - gram_s, p.reg)
        self._set_state(b, item_ids, history)

    def _set_state(self, b: np.ndarray, item_ids: np.ndarray, history: DataFrame) -> None:
        self._b, self._item_ids, self._history = b, item_ids, history.persist()

    def _fitted(self) -> None:
        if self._b is None:
            raise RecsysError("the EASE model is not fitted: call fit() or load() first")

    @property
    def weights(self) -> np.ndarray:
        """``B``, (items, items) float32; rows and columns follow ``item_ids``."""
        self._fitted()
        return self._b

    @property
    def item_ids(self) -> np.ndarray:
        """The sorted item_idx of ``B``'s rows and columns: the items of the train rows."""
        self._fitted()
        return self._item_ids

    @property
    def history(self) -> DataFrame:
        """The (user_idx, item_idx, weight) rows the model recommends from (its ``X``)."""
        self._fitted()
        return self._history

    def known_users(self) -> DataFrame:
        return self.history.select(tb.USER_IDX).distinct()

    def _recommend(self, users: DataFrame, k: int, seen: DataFrame | None, exclude_items: list[int]) -> DataFrame:
        n = self.item_ids.size
        b = users.sparkSession.sparkContext.broadcast(self.weights)
        rows = user_rows(self.history.join(users, tb.USER_IDX, "left_semi"), self.item_ids)

        def score(part: pd.DataFrame) -> np.ndarray:
            return np.asarray(part_block(part, n) @ b.value)  # (users, items): X_u B

        return top_k_from_scores(rows, score, self.item_ids, k, seen, exclude_items, self.users_per_block)

    def _similar_items(self, k: int) -> DataFrame:
        """The top of each item's row ``B[i, :]``: row i is exactly the score vector ``X_u B`` of a user
        whose history is item i alone, so "similar to i" means "what EASE recommends after i". (Column
        ``B[:, j]`` would instead list the items that predict j.) Scores are B's entries, not cosines."""
        spark = self.history.sparkSession
        n = self.item_ids.size
        b = spark.sparkContext.broadcast(self.weights)
        queries = spark.createDataFrame(pd.DataFrame({tb.USER_IDX: self.item_ids,
                                                      POSITIONS: np.arange(n, dtype=np.int32)}))
        itself = queries.select(tb.USER_IDX, F.col(tb.USER_IDX).alias(tb.ITEM_IDX))

        def rows_of_b(part: pd.DataFrame) -> np.ndarray:
            return b.value[part[POSITIONS].to_numpy()]  # (queries, items): B[i, :]

        top = top_k_from_scores(queries, rows_of_b, self.item_ids, k, itself, (), self.users_per_block)
        return top.select(F.col(tb.USER_IDX).alias(tb.ITEM_IDX), F.col(tb.ITEM_IDX).alias(SIMILAR_ITEM_IDX),
                          tb.SCORE, tb.RANK)

    def _save_state(self, path: str) -> dict:
        np.save(os.path.join(path, WEIGHTS_FILE), self.weights, allow_pickle=False)
        np.save(os.path.join(path, ITEMS_FILE), self.item_ids, allow_pickle=False)
        self.history.write.mode("overwrite").parquet(os.path.join(path, HISTORY_DIR))
        return {"params": self.params.model_dump(), "items": int(self.item_ids.size)}

    @classmethod
    def load(cls, spark, path: str) -> EASERecommender:
        meta = read_json(path)
        model = cls(EASEParams.model_validate(meta["params"]))
        model._set_state(np.load(os.path.join(path, WEIGHTS_FILE), allow_pickle=False),
                         np.load(os.path.join(path, ITEMS_FILE), allow_pickle=False),
                         spark.read.parquet(os.path.join(path, HISTORY_DIR)))
        return model
