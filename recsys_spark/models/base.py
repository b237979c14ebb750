"""The one interface every model implements (after ``implicit``'s RecommenderBase and pyspark.ml).

Public methods validate their input and do the shared post-processing; subclasses implement the
underscored ones. Inputs and outputs are Spark DataFrames in index space (``user_idx``, ``item_idx``,
dense 0..n-1); ``recsys_spark.recommend`` maps them back to the original ids.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pyspark.sql import DataFrame

from recsys_spark import tables as tb
from recsys_spark.errors import RecsysError

RECS_COLUMNS = [tb.USER_IDX, tb.ITEM_IDX, tb.SCORE, tb.RANK]
SIMILAR_COLUMNS = [tb.ITEM_IDX, "similar_item_idx", tb.SCORE, tb.RANK]


def require_columns(df: DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise RecsysError(f"{what} lacks column(s) {missing}; it has {df.columns}")


class Recommender(ABC):
    """A trained-on-Spark recommender.

    ``recommend`` returns, for each requested user, at most ``k`` rows (user_idx, item_idx, score, rank)
    with rank 1 the best; items in ``seen`` (the user's train interactions) never appear, nor do
    ``exclude_items``. Ties in score are broken by the smaller item_idx, so results are deterministic.
    """

    name: ClassVar[str]
    workdir: str | None = None  # where a model may keep checkpoints and caches while it fits
    # Set by the pipeline before ``fit`` and ``recommend``, for models that read more than their train
    # frame (DeepFM: the feature tables, and another model's rows of gold/recommendations): the
    # warehouse root and the run's logical date. Models that need neither ignore them.
    warehouse: str | None = None
    run_date: dt.date | None = None

    def __init__(self, params: Any = None) -> None:
        self.params = params

    def fit(self, train: DataFrame) -> Recommender:
        """Fit on (user_idx, item_idx, weight) rows."""
        require_columns(train, [tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT], f"{self.name} training data")
        self._fit(train)
        return self

    def recommend(self, users: DataFrame, k: int, seen: DataFrame | None = None,
                  exclude_items: list[int] | None = None) -> DataFrame:
        """Top-``k`` items for each row of ``users`` (a frame with ``user_idx``)."""
        if k <= 0:
            raise RecsysError(f"k must be positive, got {k}")
        require_columns(users, [tb.USER_IDX], "users")
        if seen is not None:
            require_columns(seen, [tb.USER_IDX, tb.ITEM_IDX], "seen items")
        return self._recommend(users.select(tb.USER_IDX).distinct(), k, seen, exclude_items or []).select(
            *RECS_COLUMNS
        )

    def similar_items(self, k: int) -> DataFrame:
        """Top-``k`` most similar other items for every item: (item_idx, similar_item_idx, score, rank)."""
        if k <= 0:
            raise RecsysError(f"k must be positive, got {k}")
        return self._similar_items(k).select(*SIMILAR_COLUMNS)

    def known_users(self) -> DataFrame | None:
        """Users the model can score (user_idx); others get the popularity fallback. None: all users."""
        return None

    def user_factors(self) -> DataFrame | None:
        """(user_idx, embedding array<float>) for models that learn user embeddings."""
        return None

    def item_factors(self) -> DataFrame | None:
        """(item_idx, embedding array<float>) for models that learn item embeddings."""
        return None

    @abstractmethod
    def _fit(self, train: DataFrame) -> None: ...

    @abstractmethod
    def _recommend(self, users: DataFrame, k: int, seen: DataFrame | None,
                   exclude_items: list[int]) -> DataFrame: ...

    def _similar_items(self, k: int) -> DataFrame:
        raise RecsysError(f"model {self.name} does not provide similar items")

    @abstractmethod
    def save(self, path: str) -> None:
        """Write the fitted model under ``path`` (no pickles: Spark formats, Parquet, JSON)."""

    @classmethod
    @abstractmethod
    def load(cls, spark, path: str) -> Recommender: ...


def write_json(path: str, payload: dict) -> None:
    """Small metadata file beside a model (local paths; a cluster run writes models to a shared FS)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model.json"), "w") as fh:
        json.dump(payload, fh, indent=2, default=str)


def read_json(path: str) -> dict:
    with open(os.path.join(path, "model.json")) as fh:
        return json.load(fh)
