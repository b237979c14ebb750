"""Most popular items, globally or over a recent window: the baseline every model must beat, and the
fallback for users a model cannot score."""

from __future__ import annotations

import logging
import os
from typing import Literal

from pydantic import Field
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.errors import RecsysError
from recsys_spark.models.base import Recommender, read_json
from recsys_spark.tables import require_columns

log = logging.getLogger(__name__)

RANKING_DIR = "ranking"
_N_SEEN = "_n_seen"
_LIMIT = "_limit"
_POP_RANK = "_pop_rank"


class PopularityParams(Section):
    window_days: float | None = Field(
        None, gt=0, description="count only interactions whose last_ts is within this many days of the newest; "
        "none = all of train"
    )
    by: Literal["users", "weight"] = Field("users", description="distinct users, or summed weights")


class PopularityRecommender(Recommender):
    """Ranks the catalogue once at fit time; every user gets its head minus the items they have seen.

    Only items with an interaction (in the window) are ranked, so a user who has seen all of them gets
    fewer than ``k`` rows.
    """

    name = "popularity"
    params_class = PopularityParams

    def __init__(self, params: PopularityParams | None = None) -> None:
        super().__init__(params)
        self._ranking: DataFrame | None = None

    def _fit(self, train: DataFrame) -> None:
        p = self.params
        data = train
        if p.window_days is not None:
            require_columns(train, [tb.LAST_TS], "training data of a recent-window popularity model")
            seconds = F.col(tb.LAST_TS).cast("double")
            newest = train.agg(F.max(seconds)).first()[0]
            if newest is None:
                raise RecsysError("cannot fit popularity on empty training data")
            data = train.filter(seconds >= F.lit(newest - p.window_days * 86400.0))
        score = F.countDistinct(tb.USER_IDX) if p.by == "users" else F.sum(tb.WEIGHT)
        scores = data.groupBy(tb.ITEM_IDX).agg(score.cast("double").alias(tb.SCORE))
        # One global order of the catalogue (ties: smaller item_idx first); recommend reads its head only.
        order = Window.orderBy(F.desc(tb.SCORE), F.asc(tb.ITEM_IDX))
        self._set_ranking(scores.withColumn(tb.RANK, F.row_number().over(order)))

    def _set_ranking(self, ranking: DataFrame) -> None:
        self._ranking = ranking.select(
            F.col(tb.ITEM_IDX).cast("int"), F.col(tb.SCORE).cast("double"), F.col(tb.RANK).cast("int")
        ).persist()
        log.info("popularity ranking of %d items", self._ranking.count())

    @property
    def ranking(self) -> DataFrame:
        """(item_idx, score, rank) of every ranked item, rank 1 the most popular."""
        if self._ranking is None:
            raise RecsysError("the popularity model is not fitted: call fit() or load() first")
        return self._ranking

    def _recommend(self, users: DataFrame, k: int, seen: DataFrame | None, exclude_items: list[int]) -> DataFrame:
        # A user needs at most k + (their seen items) + (excluded items) of the head of the ranking, so
        # only that many candidates are joined to them, never the whole catalogue.
        if seen is not None:
            seen = seen.select(tb.USER_IDX, tb.ITEM_IDX).join(users, tb.USER_IDX, "left_semi")
            counts = seen.groupBy(tb.USER_IDX).agg(F.count(F.lit(1)).alias(_N_SEEN))
            users = users.join(counts, tb.USER_IDX, "left").fillna(0, subset=[_N_SEEN])
        else:
            users = users.withColumn(_N_SEEN, F.lit(0))
        users = users.select(tb.USER_IDX, (F.col(_N_SEEN) + k + len(exclude_items)).alias(_LIMIT))
        deepest = users.agg(F.max(_LIMIT)).first()[0] or 0
        head = self.ranking.filter(F.col(tb.RANK) <= deepest).select(
            tb.ITEM_IDX, tb.SCORE, F.col(tb.RANK).alias(_POP_RANK)
        )
        pairs = users.join(F.broadcast(head), F.col(_POP_RANK) <= F.col(_LIMIT))
        if seen is not None:
            pairs = pairs.join(seen, [tb.USER_IDX, tb.ITEM_IDX], "left_anti")
        if exclude_items:
            pairs = pairs.filter(~F.col(tb.ITEM_IDX).isin(list(exclude_items)))
        by_user = Window.partitionBy(tb.USER_IDX).orderBy(_POP_RANK)
        return pairs.withColumn(tb.RANK, F.row_number().over(by_user)).filter(F.col(tb.RANK) <= k)

    def _save_state(self, path: str) -> dict:
        self.ranking.write.mode("overwrite").parquet(os.path.join(path, RANKING_DIR))
        return {"params": self.params.model_dump()}

    @classmethod
    def load(cls, spark, path: str) -> PopularityRecommender:
        meta = read_json(path)
        model = cls(PopularityParams.model_validate(meta["params"]))
        model._set_ranking(spark.read.parquet(os.path.join(path, RANKING_DIR)))
        return model
