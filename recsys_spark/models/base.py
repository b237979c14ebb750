"""The one interface every model implements (after ``implicit``'s RecommenderBase and pyspark.ml).

Public methods validate their input and do the shared post-processing; subclasses implement the
underscored ones. Inputs and outputs are Spark DataFrames in index space (``user_idx``, ``item_idx``,
dense 0..n-1); ``recsys_spark.recommend`` maps them back to the original ids.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pyspark.sql import DataFrame

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.errors import RecsysError
from recsys_spark.scoring import similar_from_factors
from recsys_spark.tables import require_columns

log = logging.getLogger(__name__)

RECS_COLUMNS = [tb.USER_IDX, tb.ITEM_IDX, tb.SCORE, tb.RANK]
SIMILAR_COLUMNS = [tb.ITEM_IDX, tb.SIMILAR_ITEM_IDX, tb.SCORE, tb.RANK]


class Recommender(ABC):
    """A trained-on-Spark recommender.

    ``recommend`` returns, for each requested user, at most ``k`` rows (user_idx, item_idx, score, rank)
    with rank 1 the best; items in ``seen`` (the user's train interactions) never appear, nor do
    ``exclude_items``. Ties in score are broken by the smaller item_idx, so results are deterministic.

    A subclass names itself (``name``, the registry key) and its hyper-parameters (``params_class``, a
    ``Section`` whose defaults equal ``conf/models/<name>.yaml``).
    """

    name: ClassVar[str]
    params_class: ClassVar[type[Section]]

    # Set by the pipeline before ``fit`` and ``recommend``; a model uses what it needs and ignores the rest.
    workdir: str | None = None  # where it may keep checkpoints and caches while it fits
    warehouse: str | None = None  # the warehouse root, for models that read more than their train frame
    run_date: dt.date | None = None  # the run's logical date (e.g. whose gold rows to re-rank)
    users_per_block: int = 2048  # users scored by one matrix product or forward pass (recommend.users_per_block)

    def __init__(self, params: Section | None = None) -> None:
        self.params = params if params is not None else self.params_class()

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
        """Top-``k`` most similar other items for every item: (item_idx, similar_item_idx, score, rank);
        by default the cosine of ``item_factors``."""
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

    def fold_in_users(self, interactions: DataFrame) -> DataFrame:
        """Give the users of ``interactions`` (user_idx, item_idx, weight) that the fit never saw what the
        model needs to score them, without a refit; ``recommend`` and ``known_users`` then include them.
        Returns their (user_idx, embedding). Only models whose registry entry says ``fold_in`` can."""
        raise RecsysError(f"model {self.name} cannot fold in users it was not fitted on")

    def fit_session_scorer(self, sessions: DataFrame, n_items: int):
        """Train on ``silver/sessions`` rows (session_id, user_idx, item_idx, position) and return a
        next-item scorer of ``recsys_spark.evaluate.sessions`` over ``n_items`` items, or None when the
        model has no session form (the default). The pipeline's session protocol scores what it returns."""
        return None

    @abstractmethod
    def _fit(self, train: DataFrame) -> None: ...

    @abstractmethod
    def _recommend(self, users: DataFrame, k: int, seen: DataFrame | None,
                   exclude_items: list[int]) -> DataFrame: ...

    def _similar_items(self, k: int) -> DataFrame:
        """By default the cosine of the item factors, for models that have them."""
        factors = self.item_factors()
        if factors is None:
            raise RecsysError(f"model {self.name} does not provide similar items")
        return similar_from_factors(factors, k, self.users_per_block)

    def save(self, path: str) -> None:
        """Write the fitted model under ``path`` (no pickles: Spark formats, Parquet, JSON).

        The state goes first and ``model.json`` last, by an atomic rename, and a save over an older model
        removes the old ``model.json`` before anything else: a directory is a model exactly when its
        ``model.json`` is there, so a save killed half-way is never loaded, alone or mixed with the files
        of the model it was replacing (``read_json`` says so and names the path)."""
        meta = os.path.join(path, META_FILE)
        if os.path.exists(meta):
            os.remove(meta)
        os.makedirs(path, exist_ok=True)
        write_json(path, {"model": self.name, **self._save_state(path)})

    @abstractmethod
    def _save_state(self, path: str) -> dict[str, Any]:
        """Write what the model needs to be loaded under ``path``; return what ``model.json`` keeps (the
        parameters at least, plain JSON)."""

    @classmethod
    @abstractmethod
    def load(cls, spark, path: str) -> Recommender: ...


META_FILE = "model.json"


def write_json(path: str, payload: dict) -> None:
    """The model's metadata file (``model.json``) beside its state (local paths; a cluster run writes
    models to a shared file system); written to a temporary name and renamed, so it is whole or absent."""
    target = os.path.join(path, META_FILE)
    with open(target + ".tmp", "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
    os.replace(target + ".tmp", target)


def read_json(path: str) -> dict:
    """The model's ``model.json``; a clear error when the directory holds no complete model."""
    target = os.path.join(path, META_FILE)
    if not os.path.exists(target):
        raise RecsysError(f"{path} holds no complete model (no {META_FILE}: its save did not finish); "
                          "train the model again")
    with open(target) as fh:
        return json.load(fh)


def training_record(path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-epoch history, summary: best epoch, steps to best, wall time) a saved torch model keeps in its
    ``model.json``; ([], {}) when there is none or the file cannot be read. For the tracker and the run
    report, which only display them."""
    location = path.removeprefix("file://")
    if "://" in location:
        return [], {}  # models are saved with plain file IO; nothing to read on object storage
    if not os.path.exists(os.path.join(location, META_FILE)):
        return [], {}
    try:
        meta = read_json(location)
    except (OSError, ValueError) as exc:
        log.warning("cannot read the training record in %s: %s", location, exc)
        return [], {}
    history, summary = meta.get("history"), meta.get("training")
    return (history if isinstance(history, list) else []), (summary if isinstance(summary, dict) else {})
