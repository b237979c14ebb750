"""Two-tower / DSSM retrieval (Huang et al. 2013; YouTube's candidate generator, Covington et al. 2016),
trained with an in-batch softmax and the log-Q correction of Yi et al. 2019.

The network is ``recsys_spark.nn.two_tower``: a user tower over the user's feature fields (the query block
of ``recsys_spark.data.feature_spec``, as DeepFM reads it) and the pooled embedding of the user's last
``history_len`` train items, an item tower over the item's fields with its id; both end L2-normalised and
``s(u, i) = cos(u, i) / temperature``.

Training (:class:`TwoTowerTask`): one row per train positive (user_idx, item_idx, ``fields`` = the user
block, ``items`` = the user's last ``history_len`` items *before* that positive in time order, so the
history never holds the positive or what came after it). The batch's other positives are the negatives
(``negatives.in_batch``), plus ``uniform_negatives`` items drawn uniformly and shared by the batch; the
loss is the softmax cross-entropy of :func:`in_batch_loss` over them with the log-Q correction.

Cold start, as DeepFM: with ``id_dropout`` > 0 a row's user is made cold with that probability (id and
activity fields 0, empty history) and each candidate item's id independently, so the towers learn to
work from side features alone. Items without a train row read id 0 (cold) at training and at serving;
users without a train row (indexed later, or side-file users) read id, activity and history as unknown.
Their lists add the popularity prior (``cold_user_weight``, ``scoring.with_popularity_prior``): from
four side fields the towers alone ranked worse than popularity.

Serving is a dot product: ``item_factors`` are the item tower's outputs for the whole catalogue (items
indexed after the fit included, from ``silver/item_features``, with id 0), ``user_factors`` the user
tower's, and ``recommend`` ranks their dot products (scores are cosines; a cold user's standardised, plus
the prior). Both land in ``gold/*_embeddings``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from torch import Tensor, nn

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.feature_spec import FeatureSpec, item_field_matrix
from recsys_spark.data.sequences import user_sequences
from recsys_spark.errors import RecsysError
from recsys_spark.models.field_base import FeatureParams, FeatureRecommender, FeatureTask
from recsys_spark.nn.two_tower import TwoTower
from recsys_spark.scoring import executor_module, matrix_frame
from recsys_spark.train import losses, negatives
from recsys_spark.train.task import Holdout
from recsys_spark.train.trainer import TrainConfig

log = logging.getLogger(__name__)

HISTORIES_DIR = "histories"
_ITEMS, _POS = "_items", "_pos"


class TwoTowerNetParams(Section):
    """The towers and the loss. A softmax over in-batch negatives with the log-Q correction is the
    YouTube recipe (Yi et al. 2019); the temperature is theirs (0.05); one hidden layer per tower is
    enough for data the size of MovieLens-100K."""

    dim: int = Field(64, gt=0, description="output size of both towers (the exported embedding)")
    field_dim: int = Field(32, gt=0, description="embedding size of each categorical field and history item")
    hidden: list[int] = Field(default_factory=lambda: [256], description="ReLU layers of each tower")
    dropout: float = Field(0.1, ge=0, lt=1)
    temperature: float = Field(0.05, gt=0, description="score = cos(u, i) / temperature")
    history_len: int = Field(20, ge=1, description="the user's latest train items pooled by the user tower")
    history_decay: float = Field(1.0, gt=0, le=1, description="weight decay^age of a history item (1 = mean)")
    uniform_negatives: int = Field(0, ge=0, description="uniform negatives per batch, beside the in-batch ones")
    log_q_correction: bool = Field(True, description="subtract log Q of each candidate (Yi et al. 2019)")
    id_dropout: float = Field(0.1, ge=0, lt=1, description="share of rows whose user (or item) id reads unknown")
    seed: int = 42

    @field_validator("hidden")
    @classmethod
    def _layers(cls, hidden: list[int]) -> list[int]:
        if any(h <= 0 for h in hidden):
            raise ValueError("hidden layer sizes must be positive")
        return hidden


class TwoTowerParams(FeatureParams):
    """Hyper-parameters of ``two_tower`` (``conf/models/two_tower.yaml``). ``cold_user_weight`` 0.5 was the
    best of 0.1 to 2 on the validation seed of ``scripts/bench_cold.py`` (docs/BENCHMARKS.md)."""

    cold_user_weight: float | None = Field(0.5, gt=0, description=FeatureParams.model_fields[
        "cold_user_weight"].description)

    net: TwoTowerNetParams = TwoTowerNetParams()
    train: TrainConfig = TrainConfig(epochs=30, batch_size=512, lr=0.001, optimizer="adam", schedule="constant",
                                     early_stopping_metric="ndcg@10", patience=3, validate_every_steps=100)


def in_batch_loss(logits: Tensor, positives: Tensor, uniform: Tensor, probs: Tensor | None,
                  n_items: int) -> Tensor:
    """Softmax cross-entropy of each row's positive against the batch's candidates, log-Q corrected.

    ``logits`` [B, C], C = B + N: column j < B scores the batch's j-th positive (``positives`` [B]),
    column B + n the n-th uniform draw (``uniform`` [N], shared by the batch). A row's own positive
    (wherever it recurs) is masked out of its negatives. ``probs`` [n_items]: each item's share of the
    train positives, the in-batch sampling distribution; None = no correction.

    The C candidates are a mixture of B draws from ``probs`` and N uniform draws, so item j is expected
    ``m·Q(j) = B·p_j + N / n_items`` times among them; every candidate's logit, the positive's included,
    becomes ``s - log(m·Q(j))`` (Yi et al. 2019, eq. 3; with N = 0 it is ``s - log(B·p_j)``), which
    stops popular items, negatives more often, from being pushed down for being popular.
    """
    B, N = positives.shape[0], uniform.shape[0]
    C = B + N
    if logits.shape != (B, C):
        raise ValueError(f"logits must be [{B}, {C}], got {tuple(logits.shape)}")
    batch = negatives.in_batch(positives)  # items [B, B], mask: False where an item is the row's positive
    mask = torch.cat([batch.mask, uniform.unsqueeze(0) != positives.unsqueeze(1)], dim=1)  # [B, C]
    pos = logits.diagonal()  # [B]: row i's positive is column i
    neg_log_q = pos_log_q = None
    if probs is not None:
        candidates = torch.cat([positives, uniform]).long()  # [C]
        expected = B * probs.to(logits.device)[candidates] + N / n_items  # m·Q(j) [C]
        log_q = torch.log(expected) - math.log(C)  # log Q(j); sampled_softmax adds log m = log C back
        neg_log_q, pos_log_q = log_q.unsqueeze(0).expand(B, C), log_q[:B]
    return losses.sampled_softmax(pos, logits.float(), neg_log_q, pos_log_q, neg_mask=mask)


class TwoTowerTask(FeatureTask):
    """The two towers on (user_idx, item_idx, fields = user block, items = history) positives.

    ``item_fields`` [n_items, Fi]: every item's block (id 0 for items without a train row);
    ``holdout.inputs`` [U, Fu + L]: the user block then the history of each validation user."""

    columns = [tb.USER_IDX, tb.ITEM_IDX, tb.FIELDS, tb.ITEMS]

    def __init__(self, params: TwoTowerNetParams, spec: FeatureSpec, item_fields: np.ndarray,
                 item_counts: np.ndarray, holdout: Holdout | None = None) -> None:
        # exponent 1: the in-batch negatives follow the positives' own distribution, the raw popularity
        super().__init__(params.seed, spec, item_fields, item_counts, 1.0, holdout)
        self.params = params
        self.n_user_fields = len(spec.user_fields)
        self.cold_user_positions = spec.positions(spec.history_fields)  # inside the user block (it comes first)
        self.item_id_positions = [i for i, f in enumerate(spec.item_fields) if f == tb.ITEM_IDX]

    def build_model(self) -> nn.Module:
        p = self.params
        with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank, global RNG untouched
            torch.manual_seed(p.seed)
            cards = self.spec.cardinalities
            return TwoTower([cards[f] for f in self.spec.user_fields], [cards[f] for f in self.spec.item_fields],
                            self.n_items, dim=p.dim, field_dim=p.field_dim, hidden=p.hidden, dropout=p.dropout,
                            temperature=p.temperature, history_decay=p.history_decay)

    def _make_cold(self, user_fields: Tensor, history: Tensor, item_rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """At rate ``id_dropout``: each row's user cold (id and activity fields 0, history all padding),
        and each candidate item's id 0, independently."""
        p = self.params.id_dropout
        if p <= 0:
            return user_fields, history, item_rows
        cold_user = self.coin((user_fields.shape[0], 1), p, user_fields.device)  # [B, 1]
        user_fields = self.blank_(user_fields.clone(), self.cold_user_positions, cold_user)
        history = torch.where(cold_user, torch.full_like(history, tb.PAD_IDX), history)  # [B, L]
        cold_item = self.coin((item_rows.shape[0], 1), p, item_rows.device)  # [C, 1]
        return user_fields, history, self.blank_(item_rows.clone(), self.item_id_positions, cold_item)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        user_fields = batch[tb.FIELDS].long()  # [B, Fu]
        history = batch[tb.ITEMS].long()  # [B, L]
        items = batch[tb.ITEM_IDX].long()  # [B]
        device, n = items.device, self.params.uniform_negatives
        uniform = (self.sample("uniform", (n,), device).items if n
                   else torch.zeros(0, dtype=torch.long, device=device))  # [N]
        item_rows = self.items_on(device)[torch.cat([items, uniform])]  # [C, Fi], C = B + N
        logits = model(*self._make_cold(user_fields, history, item_rows))  # [B, C]
        probs = self.probs(device) if self.params.log_q_correction else None
        return in_batch_loss(logits, items, uniform, probs, self.n_items)

    def holdout_scores(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """inputs [U, Fu + L] -> logits [U, n_items]."""
        inputs = inputs.long()
        return model(inputs[:, : self.n_user_fields], inputs[:, self.n_user_fields:], self.items_on(inputs.device))


def prefix_histories(rows: DataFrame, length: int) -> DataFrame:
    """(user_idx, item_idx, items): each of ``rows`` (train pairs with first_ts) with the user's last
    ``length`` items *before* it in time order (first interaction; ties in id order, as
    ``data.sequences`` orders them), left-padded with ``PAD_IDX``: the history the user tower reads for
    that positive, which never holds the positive itself or anything after it."""
    ordered = F.sort_array(F.collect_list(F.struct(tb.FIRST_TS, tb.item_tie(rows).alias("_tie"), tb.ITEM_IDX)))
    seqs = rows.groupBy(tb.USER_IDX).agg(F.transform(ordered, lambda p: p[tb.ITEM_IDX]).alias(_ITEMS))
    exploded = seqs.select(tb.USER_IDX, _ITEMS, F.posexplode(_ITEMS).alias(_POS, tb.ITEM_IDX))
    pos = F.col(_POS)  # 0-based: the items before it are 1-based positions 1..pos
    before = F.slice(_ITEMS, F.greatest(pos - length + 1, F.lit(1)), F.least(pos, F.lit(length)))
    padded = F.concat(F.array_repeat(F.lit(tb.PAD_IDX), F.lit(length) - F.size(before)), before)
    return exploded.select(tb.USER_IDX, tb.ITEM_IDX, padded.cast("array<int>").alias(tb.ITEMS))


class TwoTowerRecommender(FeatureRecommender):
    """Two towers over ``silver/user_features``, ``silver/item_features`` and the users' histories.

    Reads the feature tables under ``warehouse`` (the pipeline sets it; ``recsys-spark features`` builds
    them). Saved with the model: the field layout, every item's block and each trained user's latest
    ``history_len`` train items; the user block is read from the warehouse when serving, so every user
    with a feature row is served (``known_users``), cold ones from their side features.
    """

    name = "two_tower"
    network = TwoTower
    params_class = TwoTowerParams

    def __init__(self, params: TwoTowerParams | None = None) -> None:
        super().__init__(params)
        self._histories: DataFrame | None = None  # (user_idx, items): each trained user's latest items

    # -- training -------------------------------------------------------------------------------
    def _fit(self, train: DataFrame) -> None:
        tb.require_columns(train, [tb.FIRST_TS], f"{self.name} training data")
        super()._fit(train)
        self._histories = user_sequences(train, self.params.net.history_len).select(
            tb.USER_IDX, tb.ITEMS).localCheckpoint()

    def _training_data(self, train: DataFrame):
        spark = train.sparkSession
        length = self.params.net.history_len
        fit_rows, held = self._hold_out_last(train)
        blocks = self._queries(fit_rows.select(tb.USER_IDX).distinct(), trained=None)  # (user_idx, fields, _cold)
        frame = prefix_histories(fit_rows, length).join(blocks, tb.USER_IDX)
        holdout = None
        if held is not None:
            users = spark.createDataFrame(held[[tb.USER_IDX]].astype("int32"))
            inputs = (self._queries(users, trained=None)
                      .join(user_sequences(fit_rows, length).select(tb.USER_IDX, tb.ITEMS), tb.USER_IDX).collect())
            by_user = {r[tb.USER_IDX]: [*r[tb.FIELDS], *r[tb.ITEMS]] for r in inputs}
            held = held[held[tb.USER_IDX].isin(list(by_user))].reset_index(drop=True)
            if len(held):
                holdout = self._holdout(np.array([by_user[u] for u in held[tb.USER_IDX]], dtype=np.int64), held)
        return frame.select(tb.USER_IDX, tb.ITEM_IDX, tb.FIELDS, tb.ITEMS), holdout

    def _task(self, item_counts, holdout):
        # An item the fit never saw is cold: its id reads unknown, here and when serving.
        if tb.ITEM_IDX in self.spec.item_fields:
            self.item_fields[np.asarray(item_counts) == 0, self.spec.item_fields.index(tb.ITEM_IDX)] = 0
        return TwoTowerTask(self.params.net, self.spec, self.item_fields, item_counts, holdout)

    # -- the towers on Spark --------------------------------------------------------------------
    def _user_vectors(self, users: DataFrame) -> DataFrame:
        """(user_idx, embedding): the user tower's output for each of ``users`` with a feature row; users
        without a train history get an empty one (and, untrained, the cold user block)."""
        snapshot = self._broadcast_network(users.sparkSession)
        length, block = self.params.net.history_len, max(1, self.users_per_block)
        rows = self._queries(users, trained=self._users).join(self._histories, tb.USER_IDX, "left")

        def encode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            module = executor_module(snapshot)
            empty = np.full(length, tb.PAD_IDX, dtype=np.int64)
            for batch in batches:
                for start in range(0, len(batch), block):
                    part = batch.iloc[start:start + block]
                    fields = torch.as_tensor(np.stack(part[tb.FIELDS].to_numpy()).astype(np.int64))  # [U, Fu]
                    history = torch.as_tensor(np.stack([empty if h is None else np.asarray(h, np.int64)
                                                        for h in part[tb.ITEMS]]))  # [U, L]
                    with torch.no_grad():
                        vectors = module.user_vectors(fields, history).float().numpy()  # [U, d]
                    yield pd.DataFrame({tb.USER_IDX: part[tb.USER_IDX].to_numpy(), tb.EMBEDDING: list(vectors)})

        schema = T.StructType([T.StructField(tb.USER_IDX, T.IntegerType()),
                               T.StructField(tb.EMBEDDING, T.ArrayType(T.FloatType()))])
        return rows.mapInPandas(encode, schema)

    def _item_block(self, spark: SparkSession) -> np.ndarray:
        """Every item's block [n, Fi]: the fit's catalogue, then items indexed since (read from
        ``silver/item_features``, id 0: they are scored from their side features alone)."""
        table = self.item_fields
        if not self.warehouse or not tb.exists(spark, self.warehouse, tb.ITEM_FEATURES):
            return table
        features = tb.read(spark, self.warehouse, tb.ITEM_FEATURES)
        top = features.agg(F.max(tb.ITEM_IDX)).first()[0]
        if top is None or top < len(table):
            return table
        extra = item_field_matrix(features, self.spec, int(top) + 1)[len(table):]
        extra[:, [i for i, f in enumerate(self.spec.item_fields) if f == tb.ITEM_IDX]] = 0
        log.info("%s: %d items indexed after the fit get vectors from their features", self.name, len(extra))
        return np.concatenate([table, extra])

    # -- serving --------------------------------------------------------------------------------
    def user_factors(self) -> DataFrame:
        return self._user_vectors(self.known_users())

    def _item_matrix(self) -> np.ndarray:
        """The item tower's output for every item [n, d] (row = item_idx), on the driver."""
        if self.module is None:
            raise RecsysError(f"{self.name} is not fitted: call fit() or load() first")
        self.module.eval()
        with torch.no_grad():
            return self.module.item_vectors(torch.as_tensor(self._item_block(self._users.sparkSession))).float().numpy()

    def item_factors(self) -> DataFrame:
        return matrix_frame(self._users.sparkSession, self._item_matrix(), tb.ITEM_IDX)

    def _recommend(self, users, k, seen, exclude_items):
        return self._top_k_of_vectors(self._user_vectors(users), self._item_matrix(), k, seen, exclude_items)

    # -- persistence ----------------------------------------------------------------------------
    def _save_extra(self, path: str) -> None:
        super()._save_extra(path)
        self._histories.write.mode("overwrite").parquet(os.path.join(path, HISTORIES_DIR))

    def _load_extra(self, spark: SparkSession, path: str, meta: dict[str, Any]) -> None:
        super()._load_extra(spark, path, meta)
        self._histories = spark.read.parquet(os.path.join(path, HISTORIES_DIR))
