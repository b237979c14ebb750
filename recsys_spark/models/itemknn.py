"""Item-based k-nearest neighbours on Spark (Sarwar et al. 2001; ``implicit``'s ItemItemRecommender).

Fit: the item-item cosine of the (optionally BM25- or TF-IDF-weighted) user-item matrix, from a self-join of the
interactions on user_idx, keeping each item's ``neighbours`` most similar items. A user with ``h``
items yields ``h^2`` pairs, so histories longer than ``max_user_items`` enter the similarity with their
most recent items only (all of them still count at recommend time).

Recommend: ``score(u, j) = sum over the user's items i of weight(u, i) * sim(i, j)``, over the
neighbour lists only, so a user gets fewer than ``k`` rows when their neighbourhoods hold fewer
unseen items.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

from pydantic import Field
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.matrix import bm25_weight, tfidf_weight
from recsys_spark.errors import RecsysError
from recsys_spark.models.base import Recommender, read_json
from recsys_spark.tables import SIMILAR_ITEM_IDX

log = logging.getLogger(__name__)

NEIGHBOURS_DIR = "neighbours"
HISTORY_DIR = "history"

_VALUE = "_value"
_OTHER_VALUE = "_other_value"
_NORM = "_norm"
_OTHER_NORM = "_other_norm"
_DOT = "_dot"
_COMMON = "_common"
_POS = "_pos"
_SIM = "_sim"


class ItemKNNParams(Section):
    neighbours: int = Field(100, gt=0, description="most similar items kept per item")
    weighting: Literal["cosine", "bm25", "tfidf"] = Field(
        "cosine", description="bm25 | tfidf: weight the matrix before the cosine; cosine: raw weights")
    shrink: float = Field(0.0, ge=0, description="sim = dot / (|a| |b| + shrink): damps rarely co-seen pairs")
    min_common: int = Field(1, ge=1, description="pairs with fewer users in common are dropped")
    max_user_items: int = Field(500, gt=0, description="history cap for the similarity self-join")
    bm25_k1: float = Field(1.2, ge=0)
    bm25_b: float = Field(0.75, ge=0, le=1)


WEIGHTINGS = {
    "cosine": lambda values, p: values,
    "bm25": lambda values, p: bm25_weight(values, p.bm25_k1, p.bm25_b),
    "tfidf": lambda values, p: tfidf_weight(values),
}


class ItemKNNRecommender(Recommender):
    """Item-item neighbourhood model; the neighbour table is its whole state besides the histories."""

    name = "itemknn"
    params_class = ItemKNNParams

    def __init__(self, params: ItemKNNParams | None = None) -> None:
        super().__init__(params)
        self._neighbours: DataFrame | None = None
        self._history: DataFrame | None = None

    def _fit(self, train: DataFrame) -> None:
        p = self.params
        history = train.select(F.col(tb.USER_IDX).cast("int"), F.col(tb.ITEM_IDX).cast("int"),
                               F.col(tb.WEIGHT).cast("double"))
        capped = self._capped(train).select(tb.USER_IDX, tb.ITEM_IDX, F.col(tb.WEIGHT).cast("double"))
        values = WEIGHTINGS[p.weighting](capped, p)
        self._set_state(self._similarities(values), history)

    def _capped(self, train: DataFrame) -> DataFrame:
        """Each user's ``max_user_items`` most recent items (by last_ts when present, then weight)."""
        order = [F.desc(tb.LAST_TS)] if tb.LAST_TS in train.columns else []
        by_user = Window.partitionBy(tb.USER_IDX).orderBy(*order, F.desc(tb.WEIGHT), F.asc(tb.ITEM_IDX))
        return train.withColumn(_POS, F.row_number().over(by_user)).filter(F.col(_POS) <= self.params.max_user_items)

    def _similarities(self, values: DataFrame) -> DataFrame:
        """(item_idx, similar_item_idx, score, rank): each item's top neighbours by shrunk cosine."""
        p = self.params
        values = values.select(tb.USER_IDX, tb.ITEM_IDX, F.col(tb.WEIGHT).alias(_VALUE))
        left = values.select(tb.USER_IDX, tb.ITEM_IDX, _VALUE)
        right = values.select(
            tb.USER_IDX, F.col(tb.ITEM_IDX).alias(SIMILAR_ITEM_IDX), F.col(_VALUE).alias(_OTHER_VALUE)
        )
        co = (
            left.join(right, tb.USER_IDX)
            .filter(F.col(tb.ITEM_IDX) != F.col(SIMILAR_ITEM_IDX))
            .groupBy(tb.ITEM_IDX, SIMILAR_ITEM_IDX)
            .agg(F.sum(F.col(_VALUE) * F.col(_OTHER_VALUE)).alias(_DOT), F.count(F.lit(1)).alias(_COMMON))
            .filter(F.col(_COMMON) >= p.min_common)
        )
        norms = values.groupBy(tb.ITEM_IDX).agg(F.sqrt(F.sum(F.col(_VALUE) * F.col(_VALUE))).alias(_NORM))
        other_norms = norms.select(F.col(tb.ITEM_IDX).alias(SIMILAR_ITEM_IDX), F.col(_NORM).alias(_OTHER_NORM))
        sims = (
            co.join(norms, tb.ITEM_IDX)
            .join(other_norms, SIMILAR_ITEM_IDX)
            .select(tb.ITEM_IDX, SIMILAR_ITEM_IDX,
                    (F.col(_DOT) / (F.col(_NORM) * F.col(_OTHER_NORM) + p.shrink)).alias(tb.SCORE))
            .filter(F.col(tb.SCORE) != 0)
        )
        by_item = Window.partitionBy(tb.ITEM_IDX).orderBy(F.desc(tb.SCORE), F.asc(SIMILAR_ITEM_IDX))
        return sims.withColumn(tb.RANK, F.row_number().over(by_item)).filter(F.col(tb.RANK) <= p.neighbours)

    def _set_state(self, neighbours: DataFrame, history: DataFrame) -> None:
        self._neighbours = neighbours.select(
            F.col(tb.ITEM_IDX).cast("int"), F.col(SIMILAR_ITEM_IDX).cast("int"), F.col(tb.SCORE).cast("double"),
            F.col(tb.RANK).cast("int"),
        ).persist()
        self._history = history.persist()
        log.info("item-kNN: %d neighbour pairs, %d history rows", self._neighbours.count(), self._history.count())

    @property
    def neighbours(self) -> DataFrame:
        """(item_idx, similar_item_idx, score, rank), at most ``neighbours`` rows per item."""
        if self._neighbours is None:
            raise RecsysError("the item-kNN model is not fitted: call fit() or load() first")
        return self._neighbours

    @property
    def history(self) -> DataFrame:
        """The (user_idx, item_idx, weight) rows the model recommends from."""
        if self._history is None:
            raise RecsysError("the item-kNN model is not fitted: call fit() or load() first")
        return self._history

    def known_users(self) -> DataFrame:
        return self.history.select(tb.USER_IDX).distinct()

    def _recommend(self, users: DataFrame, k: int, seen: DataFrame | None, exclude_items: list[int]) -> DataFrame:
        links = self.neighbours.select(tb.ITEM_IDX, SIMILAR_ITEM_IDX, F.col(tb.SCORE).alias(_SIM))
        scores = (
            self.history.join(users, tb.USER_IDX, "left_semi")
            .join(links, tb.ITEM_IDX)
            .groupBy(tb.USER_IDX, F.col(SIMILAR_ITEM_IDX).alias(tb.ITEM_IDX))
            .agg(F.sum(F.col(tb.WEIGHT) * F.col(_SIM)).alias(tb.SCORE))
        )
        if seen is not None:
            scores = scores.join(seen.select(tb.USER_IDX, tb.ITEM_IDX), [tb.USER_IDX, tb.ITEM_IDX], "left_anti")
        if exclude_items:
            scores = scores.filter(~F.col(tb.ITEM_IDX).isin(list(exclude_items)))
        by_user = Window.partitionBy(tb.USER_IDX).orderBy(F.desc(tb.SCORE), F.asc(tb.ITEM_IDX))
        return scores.withColumn(tb.RANK, F.row_number().over(by_user)).filter(F.col(tb.RANK) <= k)

    def _similar_items(self, k: int) -> DataFrame:
        if k > self.params.neighbours:
            log.warning("similar_items(k=%d) but only %d neighbours per item are kept", k, self.params.neighbours)
        return self.neighbours.filter(F.col(tb.RANK) <= k)

    def _save_state(self, path: str) -> dict:
        self.neighbours.write.mode("overwrite").parquet(os.path.join(path, NEIGHBOURS_DIR))
        self.history.write.mode("overwrite").parquet(os.path.join(path, HISTORY_DIR))
        return {"params": self.params.model_dump()}

    @classmethod
    def load(cls, spark, path: str) -> ItemKNNRecommender:
        meta = read_json(path)
        model = cls(ItemKNNParams.model_validate(meta["params"]))
        model._set_state(spark.read.parquet(os.path.join(path, NEIGHBOURS_DIR)),
                         spark.read.parquet(os.path.join(path, HISTORY_DIR)))
        return model
