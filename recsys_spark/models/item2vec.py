"""item2vec (Barkan & Koenigstein 2016): word2vec's skip-gram over users' item histories, items as words.

Training. Each user's train history, in time order (first interaction; ties in id order:
``data.sequences.user_histories``), is one "sentence"; Spark MLlib's ``Word2Vec`` learns a vector ``e_i``
per item that predicts the items within ``window`` positions of it. Items seen fewer than ``min_count``
times get no vector: they are never recommended (nor similar), and a user none of whose items has a vector
is not known to the model (``known_users``), so the pipeline serves them the popularity fallback.

Not quite the paper. MLlib's Word2Vec is skip-gram with **hierarchical softmax** (a Huffman tree over the
vocabulary), whereas the paper trains skip-gram with **negative sampling** and treats a user's items as a
set (every other item is context; here a large ``window`` comes close). A negative-sampling variant is not
implemented now: MLlib offers none, and the Yoochoose and MovieLens numbers of this one
(conf/models/item2vec.yaml) come first.

Scoring is by **cosine**, not by dot product. Word2vec vector norms grow with an item's frequency and with
how many updates it received, not with how alike two items are; the paper, like word2vec itself, compares
items by cosine. So every item vector is scaled to unit length, ``ê_i = e_i / |e_i|``, and

    user vector     u = Σ_i w_i ê_i / |Σ_i w_i ê_i|,   w_i = recency_decay ^ (n - 1 - i)      (1)
    score(u, j)     = u · ê_j = cos(u, e_j)                                                   (2)

over the user's ``n`` train items in time order, ``i = 0`` the oldest: the latest item weighs 1, the one
before ``recency_decay``, and so on (``recency_decay = 1``: the plain mean of the paper's slide). Items
without a vector add nothing but still age the older ones. Top-N goes through
``scoring.top_k_from_factors`` (unit user vectors x unit item vectors, seen items filtered there); similar
items are the cosine of the item vectors (the base class's default).

Sessions (``fit_session_scorer``). For the next-item protocol Word2Vec trains on the train sessions as
sentences; a session's state is the same recency-weighted sum (1), updated one click at a time
(``s <- recency_decay * s + ê_item``), and every candidate scores its cosine to it (2).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pydantic import Field
from pyspark.ml.feature import Word2Vec
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.sequences import session_item_arrays, user_histories
from recsys_spark.errors import RecsysError
from recsys_spark.evaluate.sessions import ScoreFn, popularity_order
from recsys_spark.models.base import Recommender, read_json
from recsys_spark.scoring import collect_factors, normalized, top_k_from_factors
from recsys_spark.tables import EMBEDDING, require_columns

log = logging.getLogger(__name__)

ITEMS_DIR = "item_vectors"
USERS_DIR = "user_vectors"
USERS, SESSIONS = "users", "sessions"  # what the model was fitted on (model.json's "level")

_WORDS = "_words"
_VECTOR = "_vector"
# Column names of MLlib's Word2VecModel.getVectors().
_MLLIB_WORD = "word"
_MLLIB_VECTOR = "vector"
_EPS = 1e-12

_VECTORS_SCHEMA = T.StructType([T.StructField(tb.USER_IDX, T.IntegerType(), False),
                                T.StructField(EMBEDDING, T.ArrayType(T.FloatType()), False)])


class Item2VecParams(Section):
    """Hyper-parameters: MLlib Word2Vec's (same names, snake case) and the user vector's recency decay."""

    vector_size: int = Field(64, gt=0, description="dimension of the item vectors")
    window: int = Field(20, gt=0, description="context: items up to this many positions before and after")
    min_count: int = Field(2, ge=1, description="items seen fewer times get no vector and are never recommended")
    max_iter: int = Field(10, gt=0, description="passes over the corpus")
    step_size: float = Field(0.025, gt=0, description="initial learning rate (decays linearly to ~0)")
    seed: int = 42
    num_partitions: int = Field(1, gt=0, description="partitions trained in parallel (averaged each pass); "
                                "more is faster and less accurate")
    max_sentence_length: int = Field(1000, gt=0, description="longer histories are cut into sentences of this length")
    recency_decay: float = Field(0.7, gt=0, le=1, description="w = decay^(items since): 1 = plain mean")


class Item2VecScorer:
    """item2vec as a session scorer: each row's state is the recency-weighted sum of the unit vectors of
    the session's items so far, and the scores are the cosines of every item to it.

    Items with no vector score below every item with one (``-2 + popularity / 2``, in (-2, -1.5]), and a
    row whose items so far have no vector at all gets the popularity order: no two items ever tie, so the
    standard tie rule of the protocol flatters nothing (as for its baselines)."""

    def __init__(self, unit: np.ndarray, item_counts: np.ndarray, recency_decay: float) -> None:
        self.unit = np.ascontiguousarray(unit, dtype=np.float32)  # [n_items, d], zero rows: no vector
        self.n_items = len(self.unit)
        self.has_vector = np.linalg.norm(self.unit, axis=1) > 0  # [n_items]
        self.prior = popularity_order(item_counts).astype(np.float32)  # [n_items] in (0, 1], distinct
        self.no_vector = (-2.0 + 0.5 * self.prior).astype(np.float32)  # [n_items]
        self.decay = float(recency_decay)

    def start(self, batch_size: int) -> ScoreFn:
        state = np.zeros((batch_size, self.unit.shape[1]), dtype=np.float32)  # [B, d]

        def score(inputs: np.ndarray, reset: np.ndarray) -> np.ndarray:
            inputs = np.asarray(inputs, dtype=np.int64)
            state[np.asarray(reset, dtype=bool)] = 0.0
            state[:] *= self.decay
            active = inputs >= 0  # PAD rows are idle: their scores are ignored
            state[active] += self.unit[inputs[active]]
            norm = np.linalg.norm(state, axis=1)  # [B]
            scores = (state / np.maximum(norm, _EPS)[:, None]) @ self.unit.T  # [B, n_items], cosines
            scores[:, ~self.has_vector] = self.no_vector[~self.has_vector]
            scores[norm == 0] = self.prior
            return scores

        return score


class Item2VecRecommender(Recommender):
    """Word2Vec item vectors and recency-weighted user vectors; see the module docstring for the formulas.

    Examples
    --------
    >>> model = Item2VecRecommender(Item2VecParams(vector_size=32)).fit(train)  # doctest: +SKIP
    >>> model.recommend(train.select("user_idx"), k=10, seen=train)  # doctest: +SKIP
    """

    name = "item2vec"
    params_class = Item2VecParams

    def __init__(self, params: Item2VecParams | None = None) -> None:
        super().__init__(params)
        self._items: DataFrame | None = None  # (item_idx, embedding): the Word2Vec vectors as learned
        self._users: DataFrame | None = None  # (user_idx, embedding): unit user vectors (1); None for sessions
        self._level = USERS

    # -- training -------------------------------------------------------------------------------
    def _fit(self, train: DataFrame) -> None:
        require_columns(train, [tb.FIRST_TS], f"{self.name} training data")
        histories = user_histories(train)  # (user_idx, items): the sentences
        self._items = self._word2vec(histories, tb.USER_IDX)
        self._users = self._user_vectors(histories).persist()
        self._level = USERS
        log.info("item2vec: %d item vectors, %d user vectors", self._items.count(), self._users.count())

    def _word2vec(self, sentences: DataFrame, key: str) -> DataFrame:
        """(item_idx, embedding array<float>) learned by MLlib's Word2Vec from ``sentences`` (key, items).

        The corpus goes in one partition in key order, so that a fixed seed gives the same vectors on every
        run (MLlib redistributes it to ``num_partitions`` itself)."""
        p = self.params
        frequent = (sentences.select(F.explode(tb.ITEMS).alias(tb.ITEM_IDX)).groupBy(tb.ITEM_IDX).count()
                    .filter(F.col("count") >= p.min_count).limit(1).count())
        if not frequent:
            raise RecsysError(f"item2vec: no item occurs min_count={p.min_count} times in the training data; "
                              "lower min_count or train on more data")
        corpus = (sentences.orderBy(key)
                  .select(F.transform(tb.ITEMS, lambda i: i.cast("string")).alias(_WORDS)).coalesce(1))
        w2v = Word2Vec(vectorSize=p.vector_size, windowSize=p.window, minCount=p.min_count, maxIter=p.max_iter,
                       stepSize=p.step_size, seed=p.seed, numPartitions=p.num_partitions,
                       maxSentenceLength=p.max_sentence_length, inputCol=_WORDS, outputCol=_VECTOR)
        log.info("fitting Word2Vec (skip-gram, hierarchical softmax): size=%d window=%d min_count=%d iter=%d",
                 p.vector_size, p.window, p.min_count, p.max_iter)
        vectors = w2v.fit(corpus).getVectors()  # (word string, vector), built on the driver
        return vectors.select(F.col(_MLLIB_WORD).cast("int").alias(tb.ITEM_IDX),
                              vector_to_array(_MLLIB_VECTOR, "float32").alias(EMBEDDING)).persist()

    def _user_vectors(self, histories: DataFrame) -> DataFrame:
        """(user_idx, embedding): equation (1) for every user with at least one item that has a vector,
        on the executors, the unit item matrix broadcast (as for top-N)."""
        ids, unit = _unit_matrix(self.item_factors())
        shared = histories.sparkSession.sparkContext.broadcast((ids, unit))
        decay = self.params.recency_decay

        def encode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            item_ids, matrix = shared.value
            for batch in batches:
                users, vectors = [], []
                for user, items in zip(batch[tb.USER_IDX], batch[tb.ITEMS], strict=True):
                    items = np.asarray(items, dtype=np.int64)
                    n = len(items)
                    pos = np.minimum(np.searchsorted(item_ids, items), max(len(item_ids) - 1, 0))
                    known = item_ids[pos] == items if len(item_ids) else np.zeros(n, dtype=bool)
                    if not known.any():
                        continue  # nothing to go on: the popularity fallback serves this user
                    weights = decay ** (n - 1 - np.flatnonzero(known)).astype(np.float64)  # [known]
                    vector = weights @ matrix[pos[known]]  # [d]
                    users.append(int(user))
                    vectors.append((vector / max(float(np.linalg.norm(vector)), _EPS)).astype(np.float32))
                if users:
                    yield pd.DataFrame({tb.USER_IDX: np.asarray(users, dtype=np.int32), EMBEDDING: vectors})

        return histories.mapInPandas(encode, _VECTORS_SCHEMA)

    def fit_session_scorer(self, sessions: DataFrame, n_items: int) -> Item2VecScorer:
        """Word2Vec over the train sessions (``silver/sessions`` rows: session_id, item_idx, position) as
        sentences; the scorer of the module docstring over ``n_items`` items. The model keeps the item
        vectors (similar items, gold embeddings) and has no user vectors: it recommends to no user."""
        require_columns(sessions, [tb.SESSION_ID, tb.ITEM_IDX, tb.POSITION], f"{self.name} sessions")
        self._items = self._word2vec(session_item_arrays(sessions, min_length=1), tb.SESSION_ID)
        self._users, self._level = None, SESSIONS
        ids, unit = _unit_matrix(self._items)
        if len(ids) and ids[-1] >= n_items:
            raise RecsysError(f"item2vec: item {int(ids[-1])} of the sessions is outside the {n_items} items scored")
        full = np.zeros((n_items, unit.shape[1]), dtype=np.float32)  # [n_items, d]
        full[ids] = unit
        counts = np.zeros(n_items, dtype=np.int64)
        for row in sessions.groupBy(tb.ITEM_IDX).count().collect():
            counts[row[0]] = row[1]
        log.info("item2vec sessions: %d of %d items have a vector", len(ids), n_items)
        return Item2VecScorer(full, counts, self.params.recency_decay)

    # -- state ----------------------------------------------------------------------------------
    @property
    def items(self) -> DataFrame:
        if self._items is None:
            raise RecsysError("the item2vec model is not fitted: call fit() or load() first")
        return self._items

    def item_factors(self) -> DataFrame:
        """The Word2Vec vectors as learned (not normalised), of the items that reached ``min_count``."""
        return self.items

    def user_factors(self) -> DataFrame | None:
        """Unit user vectors (1) of the users with a known item; None for a model fitted on sessions."""
        self.items  # noqa: B018  (raises when not fitted)
        return self._users

    def known_users(self) -> DataFrame:
        if self._users is None:  # fitted on sessions
            return self.items.sparkSession.createDataFrame([], _VECTORS_SCHEMA).select(tb.USER_IDX)
        return self._users.select(tb.USER_IDX)

    def _recommend(self, users: DataFrame, k: int, seen: DataFrame | None, exclude_items: list[int]) -> DataFrame:
        vectors = self._users
        if vectors is None:  # fitted on sessions: no user is known
            vectors = self.items.sparkSession.createDataFrame([], _VECTORS_SCHEMA)
        wanted = vectors.join(users, tb.USER_IDX, "left_semi")
        return top_k_from_factors(wanted, normalized(self.items), k, seen, exclude_items, self.users_per_block)

    def _save_state(self, path: str) -> dict:
        self.items.write.mode("overwrite").parquet(os.path.join(path, ITEMS_DIR))
        if self._users is not None:
            self._users.write.mode("overwrite").parquet(os.path.join(path, USERS_DIR))
        return {"params": self.params.model_dump(), "level": self._level}

    @classmethod
    def load(cls, spark, path: str) -> Item2VecRecommender:
        meta = read_json(path)
        model = cls(Item2VecParams.model_validate(meta["params"]))
        model._level = meta.get("level", USERS)
        model._items = spark.read.parquet(os.path.join(path, ITEMS_DIR)).persist()
        if model._level == USERS:
            model._users = spark.read.parquet(os.path.join(path, USERS_DIR)).persist()
        return model


def _unit_matrix(items: DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(item ids ascending, their vectors scaled to unit length [n, d]) collected to the driver."""
    ids, matrix = collect_factors(items, tb.ITEM_IDX)
    return ids, matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), _EPS)

