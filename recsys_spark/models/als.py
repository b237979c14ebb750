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

``als_cg`` (``ALSCGRecommender``) is the same model with ``implicit``'s solver: a few conjugate-gradient
steps per row on the executors instead of MLlib's exact solve, about 3x faster from 2.5M interactions
up (docs/BENCHMARKS.md), at the price of holding the user factors on the driver. Both are in this
module because they share everything after the fit.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

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
from recsys_spark.scoring import MAX_BROADCAST_BYTES, collect_factors, matrix_frame, top_k_from_factors
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
    # MLlib's ALS-WR: a row's penalty is reg_param times its positive interactions (fold_in solves the same).
    regularisation_per_interaction = True

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
        alpha, reg = float(p.alpha), float(p.reg_param)
        per_interaction = self.regularisation_per_interaction
        nonnegative = bool(getattr(p, "nonnegative", False))  # MLlib's option; the CG solver has none

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
                    ridge = reg * n_positive if per_interaction else reg
                    a = yty + (y_u * c1[:, None]).T @ y_u + ridge * np.eye(len(yty))  # (rank, rank)
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


# The CG solver's state on disk, beside model.json.
ITEM_FACTORS_FILE, ITEMS_FILE, USER_FACTORS_DIR = "item_factors.npy", "item_ids.npy", "user_factors"
_CONFIDENCE = "_confidence"
_SOLVED_SCHEMA = "ids binary, factors binary"  # one row per task: its ids (int32) and factors (float32), raw


class ALSCGParams(Section):
    """Hyper-parameters of ``als_cg``; the defaults are tuned on MovieLens 100K (conf/models/als_cg.yaml)."""

    rank: int = Field(128, gt=0, description="number of latent factors")
    max_iter: int = Field(10, gt=0)
    reg_param: float = Field(20.0, ge=0, description="L2 penalty of every factor (Hu et al.'s lambda, not "
                             "scaled by the row's interactions as MLlib's is)")
    alpha: float = Field(3.0, ge=0, description="confidence = 1 + alpha * weight")
    cg_steps: int = Field(3, gt=0, description="conjugate-gradient steps per solve, warm-started from the "
                          "previous iteration's factor")
    seed: int = 42
    num_blocks: int | None = Field(None, gt=0, description="partitions of each side; none = defaultParallelism")


def confidences(train: DataFrame, alpha: float) -> DataFrame:
    """(user_idx, item_idx, _confidence) in ``implicit``'s signed encoding of Hu et al.'s c and p:
    ``+(1 + alpha |w|)`` for a preference (w > 0), ``-(1 + alpha |w|)`` for a known dislike (w < 0, p = 0).
    A zero weight is dropped: c = 1, p = 0 is what every unobserved pair already has (MLlib agrees)."""
    c = F.lit(1.0) + F.lit(alpha) * F.abs(F.col(tb.WEIGHT))
    return train.filter(F.col(tb.WEIGHT) != 0).select(
        F.col(tb.USER_IDX).cast("int"), F.col(tb.ITEM_IDX).cast("int"),
        F.when(F.col(tb.WEIGHT) > 0, c).otherwise(-c).cast("float").alias(_CONFIDENCE),
    )


def cg_half_step(ratings: DataFrame, solve_col: str, other_col: str, previous: np.ndarray, fixed: np.ndarray,
                 reg: float, cg_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """One half-iteration of implicit ALS on the executors: a new factor for every ``solve_col`` id of
    ``ratings`` (partitioned by it, sorted by it within partitions) with the other side's factors
    ``fixed`` held.

    For row u with confidences c_ui over the ``other_col`` ids i (the fixed side Y = ``fixed``)::

        A_u = Y^T Y + sum_i (c_ui - 1) y_i y_i^T + reg * I      (rank, rank)
        b_u = sum_{i: p_ui = 1} c_ui y_i                         (rank,)
        x_u ~ A_u^-1 b_u:  ``cg_steps`` conjugate-gradient steps from ``previous[u]``

    the kernel of ``implicit`` (``least_squares_cg``, Takacs et al. 2011), run on each task's rows with
    one thread; ``Y^T Y`` is computed there from the broadcast ``fixed``. ``previous`` and ``fixed`` are
    dense by id (row r is id r). Returns the new dense matrix (ids absent from ``ratings`` all zero) and
    the ids solved, sorted.
    """
    shared = ratings.sparkSession.sparkContext.broadcast((previous, fixed))

    def solve(batches):
        import pyarrow as pa
        from implicit.cpu._als import least_squares_cg  # pinned in setup.cfg: a private module of implicit 0.7
        from scipy.sparse import csr_matrix

        rows = pa.Table.from_batches(list(batches))
        if rows.num_rows == 0:
            return
        previous, fixed = shared.value
        solving = rows.column(solve_col).to_numpy()  # sorted within the partition
        starts = np.flatnonzero(np.r_[True, solving[1:] != solving[:-1]])  # first row of each id
        ids = solving[starts]
        # Copies: Arrow's buffers are read-only, implicit's kernel takes writable views.
        cui = csr_matrix((np.array(rows.column(_CONFIDENCE).to_numpy()), np.array(rows.column(other_col).to_numpy()),
                          np.r_[starts, solving.size]), shape=(ids.size, fixed.shape[0]))  # (ids here, other side)
        x = np.ascontiguousarray(previous[ids])  # (ids here, rank), solved in place
        least_squares_cg(cui, x, fixed, reg, num_threads=1, cg_steps=cg_steps)
        yield pa.RecordBatch.from_pydict({"ids": [ids.astype(np.int32).tobytes()], "factors": [x.tobytes()]})

    solved, ids = np.zeros_like(previous), []
    for part in ratings.mapInArrow(solve, _SOLVED_SCHEMA).collect():  # one row per task, not per id
        ids.append(np.frombuffer(part["ids"], np.int32))
        solved[ids[-1]] = np.frombuffer(part["factors"], np.float32).reshape(-1, previous.shape[1])
    shared.destroy()  # 20 of these a fit: free the driver's copy too, not only the executors'
    return solved, np.sort(np.concatenate(ids))


def _check_factor_size(spark, rows: int, rank: int) -> None:
    """Every half-iteration broadcasts the factor matrices and collects one of them: refuse a size over
    ``MAX_BROADCAST_BYTES`` or over ``spark.driver.maxResultSize`` (0 = no limit) before the first one,
    with one line, instead of a failed job minutes later."""
    size = rows * rank * 4
    setting = spark.sparkContext.getConf().get("spark.driver.maxResultSize", "1g")
    result_limit = spark.sparkContext._jvm.org.apache.spark.network.util.JavaUtils.byteStringAsBytes(setting)
    for limit, what in ((MAX_BROADCAST_BYTES, "the broadcast limit"),
                        (result_limit, f"spark.driver.maxResultSize ({setting})")):
        if 0 < limit < size:
            raise RecsysError(f"als_cg: {rows} x {rank} factors ({size / 2**20:.0f} MB) are over {what}, "
                              f"{limit / 2**20:.0f} MB: use als, or raise the limit")


class ALSCGRecommender(ALSRecommender):
    """Implicit ALS (Hu, Koren & Volinsky 2008) solved by conjugate gradients on the executors: the same
    model as ``als``, with ``implicit``'s solver in place of MLlib's exact one.

    Why: at rank 64 MLlib's exact Cholesky solve of every row's normal equations is most of its fit, and
    a few conjugate-gradient steps warm-started from the last iteration's factor reach the same quality
    (Takacs et al. 2011; ``implicit``'s default). Here each half-iteration broadcasts both factor
    matrices, solves each task's rows with ``implicit``'s kernel and collects the new factors, one row per
    task; so the driver holds users x rank floats (refused above the broadcast limit or
    ``spark.driver.maxResultSize``, where ``als`` has no such limit). Two differences from ``als``:
    ``reg_param`` is Hu et al.'s lambda, the same for every row, where MLlib scales it by the row's
    interactions; and there is no non-negative option.
    Top-N, fold-in and the factor tables are ``als``'s (fold-in solves the same regularised equation).

    Examples
    --------
    >>> model = ALSCGRecommender(ALSCGParams(rank=64)).fit(train)  # doctest: +SKIP
    """

    name = "als_cg"
    params_class = ALSCGParams
    regularisation_per_interaction = False

    def __init__(self, params: ALSCGParams | None = None) -> None:
        super().__init__(params)
        self._item_ids: np.ndarray | None = None  # (items,) int32, sorted
        self._items: np.ndarray | None = None  # (items, rank) float32, rows follow _item_ids
        self._users: DataFrame | None = None  # (user_idx, embedding)

    def _fit(self, train: DataFrame) -> None:
        p = self.params
        spark = train.sparkSession
        blocks = self.num_blocks(spark)
        ratings = confidences(train, p.alpha)
        # Each side cached once, sorted by the id it solves, then the other: a task's rows are its ids' CSR
        # rows as read, in the order implicit sums them (float32 sums depend on it).
        by_user = ratings.repartition(blocks, tb.USER_IDX).sortWithinPartitions(tb.USER_IDX, tb.ITEM_IDX).persist()
        by_item = ratings.repartition(blocks, tb.ITEM_IDX).sortWithinPartitions(tb.ITEM_IDX, tb.USER_IDX).persist()
        try:
            n_users, n_items, n_rows = by_user.agg(
                F.max(tb.USER_IDX) + 1, F.max(tb.ITEM_IDX) + 1, F.count(F.lit(1))).first()
            if not n_rows:
                raise RecsysError("als_cg: no training rows with a non-zero weight")
            _check_factor_size(spark, max(n_users, n_items), p.rank)
            # implicit's initialisation (uniform in [0, 0.01), users then items), so that a fit from the
            # same seed follows implicit's own fit step for step.
            rng = np.random.default_rng(p.seed)
            x = rng.random((n_users, p.rank), dtype=np.float32) * 0.01  # (users, rank), dense by user_idx
            y = rng.random((n_items, p.rank), dtype=np.float32) * 0.01  # (items, rank), dense by item_idx
            log.info("fitting ALS (CG, %d steps) rank=%d iterations=%d reg=%g alpha=%g: %d rows on %d blocks",
                     p.cg_steps, p.rank, p.max_iter, p.reg_param, p.alpha, n_rows, blocks)
            for iteration in range(p.max_iter):
                started = time.perf_counter()
                x, user_ids = cg_half_step(by_user, tb.USER_IDX, tb.ITEM_IDX, x, y, p.reg_param, p.cg_steps)
                y, item_ids = cg_half_step(by_item, tb.ITEM_IDX, tb.USER_IDX, y, x, p.reg_param, p.cg_steps)
                log.info("ALS (CG) iteration %d/%d in %.1f s", iteration + 1, p.max_iter,
                         time.perf_counter() - started)
        finally:
            by_user.unpersist()
            by_item.unpersist()
        users = matrix_frame(spark, x[user_ids], tb.USER_IDX, user_ids)
        self._set_state(item_ids, np.ascontiguousarray(y[item_ids]), users)

    def _set_state(self, item_ids: np.ndarray, items: np.ndarray, users: DataFrame) -> None:
        self._item_ids, self._items, self._users = item_ids, items, users.persist()

    def _fitted(self) -> None:
        if self._items is None:
            raise RecsysError("the als_cg model is not fitted: call fit() or load() first")

    def learnt_user_factors(self) -> DataFrame:
        self._fitted()
        return self._users

    def item_factors(self) -> DataFrame:
        self._fitted()
        return matrix_frame(self._users.sparkSession, self._items, tb.ITEM_IDX, self._item_ids)

    def _save_state(self, path: str) -> dict:
        self._fitted()
        np.save(os.path.join(path, ITEM_FACTORS_FILE), self._items, allow_pickle=False)
        np.save(os.path.join(path, ITEMS_FILE), self._item_ids, allow_pickle=False)
        self._users.write.mode("overwrite").parquet(os.path.join(path, USER_FACTORS_DIR))
        return {"params": self.params.model_dump()}

    @classmethod
    def load(cls, spark, path: str) -> ALSCGRecommender:
        meta = read_json(path)
        model = cls(ALSCGParams.model_validate(meta["params"]))
        model._set_state(np.load(os.path.join(path, ITEMS_FILE), allow_pickle=False),
                         np.load(os.path.join(path, ITEM_FACTORS_FILE), allow_pickle=False),
                         spark.read.parquet(os.path.join(path, USER_FACTORS_DIR)))
        return model
