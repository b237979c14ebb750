"""Implicit-feedback matrix factorisation with Spark MLlib's ALS (Hu, Koren & Volinsky 2008).

Each (user, item) row of the training table has confidence ``1 + alpha * weight`` that the user
prefers the item; unobserved pairs have confidence 1 and preference 0. MLlib solves each user's and
item's least squares with the regularisation scaled by its number of interactions (ALS-WR), so
``reg_param`` is per interaction, not absolute as in ``implicit``.

Top-N does not use MLlib's ``recommendForAllUsers``: ``recsys_spark.scoring.top_k_from_factors``
scores blocks of users with one BLAS product each, and filters seen items inside the same pass.

Users the model never saw get factors without a refit by *folding in* (``fold_in``, ``fold_in_users``):
one user half-step of ALS with the item factors fixed, the same normal equation MLlib solves, which no
Spark library offers (``implicit`` calls it ``recalculate_user``).
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import pandas as pd
from pydantic import Field
from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.errors import RecsysError
from recsys_spark.models.base import Recommender, read_json
from recsys_spark.scoring import collect_factors, top_k_from_factors
from recsys_spark.tables import EMBEDDING, require_columns

log = logging.getLogger(__name__)

SPARK_MODEL_DIR = "spark_model"
CHECKPOINT_DIR = "checkpoints"
# Column names of MLlib's factor frames.
_MLLIB_ID = "id"
_MLLIB_FEATURES = "features"


_ITEMS, _WEIGHTS = "_items", "_weights"
_FACTORS_SCHEMA = T.StructType([T.StructField(tb.USER_IDX, T.IntegerType(), False),
                                T.StructField(EMBEDDING, T.ArrayType(T.FloatType()), False)])


def _solve_normal_equation(a: np.ndarray, b: np.ndarray, nonnegative: bool) -> np.ndarray:
    """argmin_x x^T a x - 2 b^T x for a symmetric positive definite ``a`` (rank, rank): ``a^-1 b`` by
    Cholesky, or, with x >= 0, the NNLS problem ``min ||L^T x - L^-1 b||`` where ``a = L L^T`` (the same
    objective up to a constant; MLlib's NNLSSolver minimises it by projected gradients)."""
    from scipy.linalg import cho_factor, cho_solve, solve_triangular
    from scipy.optimize import nnls

    if not nonnegative:
        return cho_solve(cho_factor(a, lower=True), b)
    lower = np.linalg.cholesky(a)
    return nnls(lower.T, solve_triangular(lower, b, lower=True))[0]


class ALSParams(Section):
    """Hyper-parameters; the defaults are tuned on MovieLens 100K (conf/models/als.yaml says how)."""

    rank: int = Field(128, gt=0, description="number of latent factors")
    max_iter: int = Field(10, gt=0)
    reg_param: float = Field(0.05, ge=0, description="L2 penalty per interaction (MLlib scales by count)")
    alpha: float = Field(0.3, ge=0, description="confidence = 1 + alpha * weight")
    seed: int = 42
    num_blocks: int | None = Field(None, gt=0, description="user and item blocks; none = defaultParallelism")
    nonnegative: bool = False
    checkpoint_interval: int = Field(10, ge=-1, description="iterations between checkpoints; -1 = never")
    checkpoint_dir: str | None = Field(
        None, description="shared path for ALS checkpoints when the SparkContext has none; none = a temp dir "
        "under a local master, else the model's workdir"
    )


class ALSRecommender(Recommender):
    """MLlib ALS with implicit preferences, behind the project's ``Recommender`` interface.

    Examples
    --------
    >>> model = ALSRecommender(ALSParams(rank=16)).fit(train)  # doctest: +SKIP
    >>> model.recommend(train.select("user_idx"), k=10, seen=train)  # doctest: +SKIP
    """

    name = "als"
    params_class = ALSParams

    def __init__(self, params: ALSParams | None = None) -> None:
        super().__init__(params)
        self._model: ALSModel | None = None
        self._folded: DataFrame | None = None  # (user_idx, embedding) of users added by fold_in_users

    def num_blocks(self, spark) -> int:
        """MLlib defaults to 10 blocks; on a small machine that is mostly scheduling overhead."""
        return self.params.num_blocks or max(1, spark.sparkContext.defaultParallelism)

    def _ensure_checkpoint_dir(self, sc) -> None:
        """Without checkpoints the lineage grows with every iteration, and past about 20 a task's
        deserialisation overflows the stack (seen here at rank 200, 25 iterations). Where to: the
        ``checkpoint_dir`` param, else a temp dir under a local master, else the model's ``workdir``."""
        p = self.params
        if p.checkpoint_interval <= 0 or p.max_iter <= p.checkpoint_interval or sc.getCheckpointDir():
            return
        if p.checkpoint_dir:
            sc.setCheckpointDir(p.checkpoint_dir)
        elif sc.master.startswith("local"):
            sc.setCheckpointDir(tempfile.mkdtemp(prefix="recsys-als-checkpoints-"))
        elif self.workdir:
            sc.setCheckpointDir(os.path.join(self.workdir, CHECKPOINT_DIR))
        else:
            log.warning("no checkpoint dir: ALS runs %d iterations without checkpoints; set the model's "
                        "checkpoint_dir to a shared path if it fails with StackOverflowError", p.max_iter)
            return
        log.info("ALS checkpoints go to %s", sc.getCheckpointDir())

    def _fit(self, train: DataFrame) -> None:
        p = self.params
        self._ensure_checkpoint_dir(train.sparkSession.sparkContext)
        blocks = self.num_blocks(train.sparkSession)
        data = train.select(
            F.col(tb.USER_IDX).cast("int"), F.col(tb.ITEM_IDX).cast("int"), F.col(tb.WEIGHT).cast("float")
        ).repartition(blocks)
        als = ALS(
            rank=p.rank, maxIter=p.max_iter, regParam=p.reg_param, alpha=p.alpha, implicitPrefs=True,
            nonnegative=p.nonnegative, seed=p.seed, numUserBlocks=blocks, numItemBlocks=blocks,
            checkpointInterval=p.checkpoint_interval, userCol=tb.USER_IDX, itemCol=tb.ITEM_IDX,
            ratingCol=tb.WEIGHT, coldStartStrategy="drop",
        )
        log.info("fitting ALS rank=%d iterations=%d reg=%g alpha=%g on %d blocks", p.rank, p.max_iter,
                 p.reg_param, p.alpha, blocks)
        self._model = als.fit(data)

    @property
    def model(self) -> ALSModel:
        if self._model is None:
            raise RecsysError("the ALS model is not fitted: call fit() or load() first")
        return self._model

    def learnt_user_factors(self) -> DataFrame:
        """The users of the fit: (user_idx, embedding) as MLlib learnt them."""
        factors = self.model.userFactors
        return factors.select(F.col(_MLLIB_ID).alias(tb.USER_IDX), F.col(_MLLIB_FEATURES).alias(EMBEDDING))

    def user_factors(self) -> DataFrame:
        """The learnt users, and the users added by ``fold_in_users`` when there are some."""
        learnt = self.learnt_user_factors()
        return learnt if self._folded is None else learnt.unionByName(self._folded)

    def item_factors(self) -> DataFrame:
        factors = self.model.itemFactors
        return factors.select(F.col(_MLLIB_ID).alias(tb.ITEM_IDX), F.col(_MLLIB_FEATURES).alias(EMBEDDING))

    def known_users(self) -> DataFrame:
        return self.user_factors().select(tb.USER_IDX)

    def _recommend(self, users: DataFrame, k: int, seen: DataFrame | None, exclude_items: list[int]) -> DataFrame:
        wanted = self.user_factors().join(users, tb.USER_IDX, "left_semi")
        return top_k_from_factors(wanted, self.item_factors(), k, seen, exclude_items, self.users_per_block)

    def fold_in(self, interactions: DataFrame) -> DataFrame:
        """Factors for the users of ``interactions`` (user_idx, item_idx, weight) with the item factors
        fixed: the user half-step of MLlib's implicit ALS (``ALS.computeFactors``), solved again.

        For user u with observed items I(u), Y the item factors (n_items, rank) and r_ui the weights::

            c1_ui  = alpha * |r_ui|                       (confidence - 1; MLlib uses |r|)
            p_ui   = 1 if r_ui > 0 else 0                 (a negative weight means preference 0)
            n_u    = #{i in I(u): r_ui > 0}
            A_u    = Y^T Y + sum_{i in I(u)} c1_ui y_i y_i^T + reg_param * n_u * I     (rank, rank)
            b_u    = sum_{i in I(u)} (1 + c1_ui) p_ui y_i                              (rank,)
            p_u    = A_u^-1 b_u                                                        (rank,)

        which is Hu et al.'s ``(Y^T C^u Y + lambda I)^-1 Y^T C^u p(u)`` with MLlib's regularisation (ALS-WR:
        ``reg_param`` times the user's positive interactions). Solved by Cholesky as MLlib's
        ``CholeskySolver`` does, or as a non-negative least squares when ``nonnegative`` (``NNLSSolver``).
        ``Y^T Y`` is computed once on the driver and broadcast with ``Y``; each user's solve runs on the
        executors. Why it matters: a user who signs up after the fit gets recommendations tomorrow
        without the cost of a refit, and known users keep their factors (``fold_in`` of a known user
        from its train rows gives back, to float precision, the factor of the fit's last half-step).

        Items the model never saw are ignored; a user with no positive weight on a known item gets no
        row (the popularity fallback serves them). Rows are taken as given, one term each, like MLlib.
        """
        require_columns(interactions, [tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT], "interactions to fold in")
        p = self.params
        item_ids, item_matrix = collect_factors(self.item_factors(), tb.ITEM_IDX)  # (n_items,), (n_items, rank)
        y = item_matrix.astype(np.float64)
        yty = y.T @ y  # (rank, rank), once for every user
        shared = interactions.sparkSession.sparkContext.broadcast((item_ids, y, yty))
        alpha, reg, nonnegative = float(p.alpha), float(p.reg_param), bool(p.nonnegative)

        def solve_users(batches):
            ids, y, yty = shared.value
            for batch in batches:
                users, vectors = [], []
                for user, items, weights in zip(batch[tb.USER_IDX], batch[_ITEMS], batch[_WEIGHTS], strict=True):
                    items = np.asarray(items, dtype=np.int64)
                    at = np.minimum(np.searchsorted(ids, items), len(ids) - 1)  # ids are sorted
                    known = ids[at] == items  # items the model has factors for
                    r = np.asarray(weights, dtype=np.float32)[known].astype(np.float64)  # MLlib's ratings are floats
                    y_u = y[at[known]]  # (n_u, rank), rows in the order of r
                    n_positive = int((r > 0).sum())
                    if n_positive == 0:
                        continue
                    c1 = alpha * np.abs(r)  # (n_u,)
                    a = yty + (y_u * c1[:, None]).T @ y_u + reg * n_positive * np.eye(len(yty))  # (rank, rank)
                    b = y_u.T @ np.where(r > 0, 1.0 + c1, 0.0)  # (rank,)
                    users.append(user)
                    vectors.append(_solve_normal_equation(a, b, nonnegative).astype(np.float32))
                if users:
                    yield pd.DataFrame({tb.USER_IDX: np.asarray(users, dtype=np.int32), EMBEDDING: vectors})

        per_user = interactions.groupBy(tb.USER_IDX).agg(
            F.collect_list(F.col(tb.ITEM_IDX).cast("int")).alias(_ITEMS),
            F.collect_list(F.col(tb.WEIGHT).cast("float")).alias(_WEIGHTS),
        )
        return per_user.mapInPandas(solve_users, _FACTORS_SCHEMA)

    def fold_in_users(self, interactions: DataFrame) -> DataFrame:
        """Fold in the users of ``interactions`` the fit never saw (``fold_in``); from now on ``recommend``,
        ``known_users`` and ``user_factors`` include them. Users the fit knew keep their learnt factors.
        Returns the new users' (user_idx, embedding), persisted (it is read by every use)."""
        new = interactions.join(self.learnt_user_factors().select(tb.USER_IDX), tb.USER_IDX, "left_anti")
        self._folded = self.fold_in(new).persist()
        return self._folded

    def _save_state(self, path: str) -> dict:
        self.model.write().overwrite().save(os.path.join(path, SPARK_MODEL_DIR))
        return {"params": self.params.model_dump()}

    @classmethod
    def load(cls, spark, path: str) -> ALSRecommender:
        meta = read_json(path)
        model = cls(ALSParams.model_validate(meta["params"]))
        model._model = ALSModel.load(os.path.join(path, SPARK_MODEL_DIR))
        return model
