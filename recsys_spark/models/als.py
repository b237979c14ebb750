"""Implicit-feedback matrix factorisation with Spark MLlib's ALS (Hu, Koren & Volinsky 2008).

Each (user, item) row of the training table has confidence ``1 + alpha * weight`` that the user
prefers the item; unobserved pairs have confidence 1 and preference 0. MLlib solves each user's and
item's least squares with the regularisation scaled by its number of interactions (ALS-WR), so
``reg_param`` is per interaction, not absolute as in ``implicit``.

Top-N does not use MLlib's ``recommendForAllUsers``: ``recsys_spark.scoring.top_k_from_factors``
scores blocks of users with one BLAS product each, and filters seen items inside the same pass.
"""

from __future__ import annotations

import logging
import os
import tempfile

from pydantic import Field
from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.errors import RecsysError
from recsys_spark.models.base import Recommender, read_json
from recsys_spark.scoring import top_k_from_factors
from recsys_spark.tables import EMBEDDING

log = logging.getLogger(__name__)

SPARK_MODEL_DIR = "spark_model"
CHECKPOINT_DIR = "checkpoints"
# Column names of MLlib's factor frames.
_MLLIB_ID = "id"
_MLLIB_FEATURES = "features"


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

    def user_factors(self) -> DataFrame:
        factors = self.model.userFactors
        return factors.select(F.col(_MLLIB_ID).alias(tb.USER_IDX), F.col(_MLLIB_FEATURES).alias(EMBEDDING))

    def item_factors(self) -> DataFrame:
        factors = self.model.itemFactors
        return factors.select(F.col(_MLLIB_ID).alias(tb.ITEM_IDX), F.col(_MLLIB_FEATURES).alias(EMBEDDING))

    def known_users(self) -> DataFrame:
        return self.user_factors().select(tb.USER_IDX)

    def _recommend(self, users: DataFrame, k: int, seen: DataFrame | None, exclude_items: list[int]) -> DataFrame:
        wanted = self.user_factors().join(users, tb.USER_IDX, "left_semi")
        return top_k_from_factors(wanted, self.item_factors(), k, seen, exclude_items, self.users_per_block)

    def _save_state(self, path: str) -> dict:
        self.model.write().overwrite().save(os.path.join(path, SPARK_MODEL_DIR))
        return {"params": self.params.model_dump()}

    @classmethod
    def load(cls, spark, path: str) -> ALSRecommender:
        meta = read_json(path)
        model = cls(ALSParams.model_validate(meta["params"]))
        model._model = ALSModel.load(os.path.join(path, SPARK_MODEL_DIR))
        return model
