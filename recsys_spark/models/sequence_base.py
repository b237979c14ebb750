"""What the sequence models (SASRec, GRU4Rec) share: training rows that cover every transition, a user
level and a session level, and recommending from each user's latest items.

At the user level (``fit``) a model trains on each user's time-ordered train history cut into windows of
``max_length`` items (``data.sequences.user_windows``: every (item, next item) pair once), validates as
the subclass says, and recommends from each user's last ``max_length`` items (``silver/sequences``'s
rows, kept with the model). At the session level (``fit_sessions``) it trains on the windows of every
session and validates on whole held-out sessions with the next-item protocol; such a model scores
sessions (``scorer()``), not users.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.data.sequences import session_windows, user_sequences, user_windows
from recsys_spark.errors import RecsysError
from recsys_spark.models.torch_base import TorchRecommender
from recsys_spark.scoring import sequence_vectors, top_k_from_factors
from recsys_spark.tables import require_columns

log = logging.getLogger(__name__)

SEQUENCES_DIR = "sequences"
KEY = "_key"  # a training row's key: user_idx (user histories) or session_id (sessions)
USERS, SESSIONS = "users", "sessions"


class SequenceRecommender(TorchRecommender):
    """A torch model over item sequences. Subclasses give ``max_length()``, ``scorer()``, ``item_factors``,
    ``_task(item_counts, holdout)`` (the holdout is whole sequences at the session level) and
    ``_user_holdout(train)`` (the user level's training rows and validation data)."""

    # Whether user vectors carry a constant 1, for item factors whose last column is a bias.
    append_one: ClassVar[bool] = False

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self._sequences: DataFrame | None = None  # (user_idx, items, length): what recommend encodes
        self._session_rows: DataFrame | None = None  # training windows of sessions (fit_sessions)
        self._min_items = 0

    def max_length(self) -> int:
        raise NotImplementedError

    def window_length(self) -> int:
        """Items per training row (each row's windows cover every transition of its history): by default
        ``max_length()``, the items inference reads."""
        return self.max_length()

    def scorer(self):
        """The trained network as a session scorer (``recsys_spark.evaluate.sessions``)."""
        raise NotImplementedError

    @property
    def level(self) -> str:
        return USERS if self._sequences is not None else SESSIONS

    # -- training -------------------------------------------------------------------------------
    def _fit(self, train: DataFrame) -> None:
        require_columns(train, [tb.FIRST_TS], f"{self.name} training data")
        self._sequences = user_sequences(train, self.max_length()).localCheckpoint()
        self._session_rows, self._min_items = None, 0
        super()._fit(train)

    def fit_sessions(self, sessions: DataFrame, n_items: int | None = None) -> SequenceRecommender:
        """Train on sessions (``silver/sessions`` rows: session_id, user_idx, item_idx, position), every
        transition of each. ``n_items``: the catalogue the scores cover (default: the largest item_idx of
        ``sessions`` + 1); items of later sessions must be in it."""
        require_columns(sessions, [tb.SESSION_ID, tb.USER_IDX, tb.ITEM_IDX, tb.POSITION], f"{self.name} sessions")
        self._session_rows = session_windows(sessions, self.window_length()).withColumnRenamed(tb.SESSION_ID, KEY)
        self._session_rows = self._session_rows.localCheckpoint()
        self._sequences, self._min_items = None, n_items or 0
        super()._fit(sessions.select(tb.USER_IDX, tb.ITEM_IDX))
        return self

    def fit_session_scorer(self, sessions: DataFrame, n_items: int):
        return self.fit_sessions(sessions, n_items).scorer()

    def _sizes(self, n_users: int, n_items: int) -> tuple[int, int]:
        return n_users, max(n_items, self._min_items)

    def _training_data(self, train: DataFrame):
        if self._session_rows is not None:
            return self._hold_out_sequences(self._session_rows)
        return self._user_holdout(train)

    def _user_holdout(self, train: DataFrame):
        raise NotImplementedError

    def _user_rows(self, train: DataFrame) -> DataFrame:
        """The user level's training rows: every transition of every history (key = user_idx)."""
        return user_windows(train, self.window_length()).withColumnRenamed(tb.USER_IDX, KEY)

    def _hold_out_sequences(self, rows: DataFrame) -> tuple[DataFrame, list[list[int]] | None]:
        """(the ``items`` of ``rows`` less those of the validation keys, the held-out keys' windows as item
        lists, or None): for validation with the next-item protocol. ``validation_users`` keys at most,
        and no more than a fifth of them."""
        rows = rows.filter(F.col(tb.LENGTH) >= 2)  # one item: no (input, target) pair
        n_val = self.params.validation_users
        if not n_val:
            return rows.select(tb.ITEMS), None
        keys = rows.select(KEY).distinct()
        n_keys = keys.count()
        if n_val > n_keys // 5:
            log.info("%s: %d sequences; holding out %d of them for validation", self.name, n_keys, n_keys // 5)
            n_val = n_keys // 5
        val = self._validation_users(keys, key=KEY).limit(n_val).withColumn("_val", F.lit(True))
        marked = rows.join(val, KEY, "left")
        held = marked.filter(F.col("_val").isNotNull()).orderBy(KEY, tb.ITEMS).select(tb.ITEMS).collect()
        log.info("%s: collected %d validation sequences to the driver", self.name, len(held))
        holdout = [[i for i in row[0] if i != tb.PAD_IDX] for row in held] or None
        return marked.filter(F.col("_val").isNull()).select(tb.ITEMS), holdout

    # -- scoring ----------------------------------------------------------------------------------
    def _user_vectors(self, users: DataFrame) -> DataFrame:
        """(user_idx, embedding): the network's output after each user's last items."""
        if self._sequences is None:
            raise RecsysError(f"this {self.name} model was trained on sessions (fit_sessions): it scores "
                              "sessions (scorer()), not users")
        return sequence_vectors(self._sequences, users, self._broadcast_network(users.sparkSession),
                                self.users_per_block, append_one=self.append_one)

    def user_factors(self) -> DataFrame | None:
        return None if self._sequences is None else self._user_vectors(self._users)

    def _recommend(self, users, k, seen, exclude_items):
        return top_k_from_factors(self._user_vectors(users), self.item_factors(), k, seen, exclude_items,
                                  self.users_per_block)

    # -- persistence ------------------------------------------------------------------------------
    def _extra_meta(self) -> dict[str, Any]:
        return {"level": self.level}

    def _save_extra(self, path: str) -> None:
        if self._sequences is not None:
            self._sequences.write.mode("overwrite").parquet(os.path.join(path, SEQUENCES_DIR))

    def _load_extra(self, spark: SparkSession, path: str, meta: dict[str, Any]) -> None:
        if meta.get("level", USERS) == USERS:
            self._sequences = spark.read.parquet(os.path.join(path, SEQUENCES_DIR))
