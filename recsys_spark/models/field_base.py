"""What the feature-field models (DeepFM, Wide&Deep, DCN) share: their input, training task and scoring.

The networks are ``recsys_spark.nn.deepfm``, ``nn.widedeep`` and ``nn.dcn`` (on ``nn.fields``); their input
is the feature tables (``recsys-spark features``) laid out by ``recsys_spark.data.feature_spec``. Training
(:class:`FieldTask`): ``user_idx``, ``item_idx`` and ``fields`` (the query block, then the item block) per
positive pair, as ``field_frame`` builds them. Negatives are items drawn inside ``loss`` (uniform or
popularity); the task holds the item block of every item (``item_fields`` [n_items, Fi]) and swaps it in
for the positive's, keeping the query block. With ``id_dropout`` > 0 a row's user is made cold with that
probability (its id and the fields that grow with use, ``FeatureSpec.history_fields``, read 0 = unknown,
for the positive and its negatives alike), and each item's id independently: the model also learns to
score from side features alone, which is exactly what a cold user or item gets at inference.

Scoring, one path for validation and serving: :func:`score_catalogue` (every item for each query
block, by blocks of items) and :func:`score_candidates` (re-ranking another model's lists, optionally
fused with their order). A model joins with its network class, a ``FieldNetParams`` subclass (what the
network's constructor gets: :meth:`FieldNetParams.network_kwargs`), and a ``FieldRecommender`` subclass
naming both; nothing else differs, so each of them serves as the ranker of a two-stage design alike.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from torch import Tensor, nn

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.feature_spec import (
    FeatureSpec,
    assemble,
    field_frame,
    item_field_matrix,
    load_feature_spec,
)
from recsys_spark.errors import RecsysError
from recsys_spark.models.torch_base import TorchParams, TorchRecommender
from recsys_spark.scoring import executor_module, top_k_from_scores, with_popularity_prior
from recsys_spark.tables import EMBEDDING
from recsys_spark.train import losses
from recsys_spark.train.task import Holdout, SampledTask
from recsys_spark.train.trainer import TrainConfig

log = logging.getLogger(__name__)

ITEM_FIELDS_FILE = "item_fields.npy"
ITEM_COUNTS_FILE = "item_counts.npy"  # train rows per item: the popularity prior of cold users
COLD = "_cold"  # bool beside a query or user vector: the user has no train rows
CANDIDATES = "_candidates"  # (user_idx, _candidates array<int>): a candidate model's list, best first
# Every (query, item) pair runs through the network: at most this many pairs per forward pass.
MAX_PAIRS = 1 << 16


class FieldNetParams(Section):
    """The field network's size and its training task: embeddings, the deep tower, sampled negatives,
    id dropout. Subclasses add their network's own parameters (and pass them in ``network_kwargs``)."""

    dim: int = Field(64, gt=0, description="embedding size k of every field")
    hidden: list[int] = Field(default_factory=lambda: [200, 200, 200])
    dropout: float = Field(0.2, ge=0, lt=1)
    loss: Literal["bce", "bpr"] = "bce"
    n_negatives: int = Field(4, gt=0, description="sampled negatives per positive")
    negatives: Literal["uniform", "popularity"] = "uniform"
    popularity_exponent: float = Field(0.75, ge=0)
    id_dropout: float = Field(0.1, ge=0, lt=1, description="share of rows whose id fields read as unknown")
    seed: int = 42

    removed_keys: ClassVar[dict[str, str]] = {
        key: f"the model trains with train.{key}" for key in ("lr", "weight_decay", "batch_size", "epochs")}

    @field_validator("hidden")
    @classmethod
    def _layers(cls, hidden: list[int]) -> list[int]:
        # A field validator, so the error names net.hidden, not only net.
        if any(h <= 0 for h in hidden):
            raise ValueError("hidden layer sizes must be positive")
        return hidden

    def network_kwargs(self, spec: FeatureSpec) -> dict[str, Any]:
        """The network's constructor arguments besides ``cardinalities`` and ``n_numeric``."""
        return {"dim": self.dim, "hidden": self.hidden, "dropout": self.dropout}


class FeatureTask(SampledTask):
    """A training task over the feature tables: it holds every item's block of fields (``item_fields``
    [n_items, Fi], row item_idx) and serves it on each device (:meth:`items_on`), where negatives (or the
    whole catalogue) are looked up."""

    def __init__(self, seed: int, spec: FeatureSpec, item_fields: np.ndarray, item_counts: np.ndarray | None,
                 exponent: float, holdout: Holdout | None) -> None:
        item_fields = np.asarray(item_fields, dtype=np.int64)
        if item_fields.ndim != 2 or item_fields.shape[1] != len(spec.item_fields):
            raise ValueError(f"item_fields must be [n_items, {len(spec.item_fields)}], got {item_fields.shape}")
        super().__init__(seed, item_fields.shape[0], item_counts, exponent, holdout)
        self.spec, self.item_fields = spec, item_fields
        self._item_tables: dict[torch.device, Tensor] = {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_item_tables"] = {}
        return state

    def coin(self, shape: tuple[int, ...], rate: float, device: torch.device) -> Tensor:
        """A bool tensor of ``shape``, True at ``rate`` independently, from the task's generator on
        ``device``: which rows (or users, or items) id dropout makes cold in this batch."""
        return torch.rand(shape, generator=self.generator(device), device=device) < rate

    @staticmethod
    def blank_(rows: Tensor, positions: list[int], cold: Tensor) -> Tensor:
        """``rows`` [..., F] with its fields at ``positions`` set to 0, unknown, where ``cold`` holds
        (broadcast against ``rows[..., positions]``), in place: what a cold user or item reads. Returns
        ``rows``."""
        fields = rows[..., positions]
        rows[..., positions] = torch.where(cold, torch.zeros_like(fields), fields)
        return rows

    def items_on(self, device: torch.device) -> Tensor:
        """The item blocks of all items on ``device`` [n_items, Fi] (moved once per device)."""
        device = torch.device(device)
        if device not in self._item_tables:
            self._item_tables[device] = torch.as_tensor(self.item_fields, device=device)
        return self._item_tables[device]


class FieldTask(FeatureTask):
    """A field network (``network``, set by the subclass) on (user_idx, item_idx, fields) positives, n
    sampled negatives per positive, BCE (or BPR).

    ``holdout.inputs`` are query blocks [U, Fq] (``features.query_frame``), ranked against the catalogue.
    """

    columns = [tb.USER_IDX, tb.ITEM_IDX, tb.FIELDS]
    network: ClassVar[type[nn.Module]]

    def __init__(self, params: FieldNetParams, spec: FeatureSpec, item_fields: np.ndarray,
                 item_counts: np.ndarray | None = None, holdout: Holdout | None = None) -> None:
        super().__init__(params.seed, spec, item_fields, item_counts, params.popularity_exponent, holdout)
        self.params = params
        self.cold_user_positions = spec.positions(spec.history_fields)
        self.item_id_positions = spec.positions([tb.ITEM_IDX])

    def build_model(self) -> nn.Module:
        p = self.params
        with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank, global RNG untouched
            torch.manual_seed(p.seed)
            return self.network(self.spec.sizes, n_numeric=len(self.spec.numeric), **p.network_kwargs(self.spec))

    def _make_cold(self, rows: Tensor) -> Tensor:
        """rows [B, 1 + n, F] with, at rate ``id_dropout``, each group's user made cold (its history
        fields 0 in all 1 + n rows) and each row's item id 0."""
        p = self.params.id_dropout
        if p <= 0:
            return rows
        cold_user = self.coin((rows.shape[0], 1, 1), p, rows.device)  # [B, 1, 1]: the group's rows alike
        rows = self.blank_(rows.clone(), self.cold_user_positions, cold_user)
        cold_item = self.coin(rows.shape[:2] + (1,), p, rows.device)  # [B, 1 + n, 1]: each row's item
        return self.blank_(rows, self.item_id_positions, cold_item)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        fields = batch[tb.FIELDS].long()  # [B, F]
        items = batch[tb.ITEM_IDX].long()  # [B]
        B, n = fields.shape[0], self.params.n_negatives
        neg = self.sample(self.params.negatives, (B, n), fields.device, positives=items)  # items [B, n]
        query = fields[:, : self.spec.n_query]  # [B, Fq]
        neg_rows = torch.cat([query.unsqueeze(1).expand(B, n, query.shape[1]),
                              self.items_on(fields.device)[neg.items]], dim=-1)  # [B, n, F]
        rows = torch.cat([fields.unsqueeze(1), neg_rows], dim=1)  # [B, 1 + n, F], the positive first
        logits = model(self._make_cold(rows).reshape(B * (1 + n), -1)).view(B, 1 + n)  # one forward
        loss_fn = losses.bpr if self.params.loss == "bpr" else losses.bce_sampled
        return loss_fn(logits[:, 0], logits[:, 1:])

    def holdout_scores(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """inputs: the hold-out users' query blocks [U, Fq] -> logits [U, n_items]."""
        return score_catalogue(model, inputs.long(), self.items_on(inputs.device))


def score_catalogue(module: nn.Module, query: Tensor, items: Tensor, max_pairs: int = MAX_PAIRS) -> Tensor:
    """Logits of every item for each query row: query [U, Fq], items [n_items, Fi] -> [U, n_items], by
    blocks of items so that at most ``max_pairs`` (query, item) pairs run through the network at once."""
    block = max(1, max_pairs // max(1, query.shape[0]))
    return torch.cat([module.score_items(query, items[start:start + block])
                      for start in range(0, items.shape[0], block)], dim=1)


def score_candidates(module: nn.Module, query: Tensor, items: Tensor, candidates, n_items: int,
                     rrf_k: float | None = None, max_pairs: int = MAX_PAIRS) -> np.ndarray:
    """Scores [U, n_items] that are -inf except at each row's candidates (item_idx lists of any length,
    the candidate model's best first), scored by the network: the shared top-k then picks among the
    candidates only. With ``rrf_k``, a candidate's score is ``1/(rrf_k + its rank by the network) + 1/(rrf_k +
    its rank in the list)`` (ranks from 1; reciprocal-rank fusion, Cormack et al. 2009) instead of the
    logit."""
    lists = [np.asarray(c, dtype=np.int64) for c in candidates]
    width = max((len(c) for c in lists), default=0)
    out = np.full((len(lists), n_items), -np.inf, dtype=np.float32)
    if width == 0:
        return out
    padded = np.full((len(lists), width), -1, dtype=np.int64)  # [U, C], -1 = no candidate
    for row, c in enumerate(lists):
        padded[row, :len(c)] = c
    cand = torch.as_tensor(padded)
    block = max(1, max_pairs // width)
    parts = [module.score_items(query[s:s + block], items[cand[s:s + block].clamp(min=0)])  # [b, C]
             for s in range(0, len(lists), block)]
    scores = torch.cat(parts).float().numpy()  # [U, C]
    valid = padded >= 0
    if rrf_k is not None:
        order = np.argsort(np.where(valid, -scores, np.inf), axis=1, kind="stable")  # best logit first
        own_rank = np.empty_like(order)
        np.put_along_axis(own_rank, order, np.arange(1, width + 1)[None, :].repeat(len(lists), 0), axis=1)
        list_rank = np.arange(1, width + 1)[None, :]
        scores = (1.0 / (rrf_k + own_rank) + 1.0 / (rrf_k + list_rank)).astype(np.float32)  # [U, C]
    rows, cols = np.nonzero(valid)
    out[rows, padded[rows, cols]] = scores[rows, cols]
    return out


class FeatureParams(TorchParams):
    """What every model on the feature tables shares: how it ranks for a user without train rows."""

    cold_user_weight: float | None = Field(
        None, gt=0, description="a user without train rows is ranked by log(1 + item train rows) + this x the "
                                "model's scores standardised over the catalogue; null: the model's scores alone")


class FieldParams(FeatureParams):
    """A field model over ``silver/user_features`` and ``silver/item_features`` (``recsys-spark features``).

    ``candidates``: re-rank the top ``candidates_k`` of that model's rows of gold/recommendations for the
    same run date instead of scoring the whole catalogue (the two-stage design: a cheap model retrieves,
    this one ranks); the candidate model must recommend first."""

    net: FieldNetParams = FieldNetParams()
    train: TrainConfig = TrainConfig(epochs=30, batch_size=512, lr=0.001, optimizer="adam", schedule="constant",
                                     early_stopping_metric="ndcg@10", patience=3, validate_every_steps=100)
    candidates: str | None = Field(None, description="model whose gold/recommendations rows are re-ranked")
    candidates_k: int = Field(100, gt=0, description="candidates per user: the candidate model's top ranks")
    fusion: Literal["none", "rrf"] = Field(
        "none", description="with candidates: none = this model's order alone; rrf = reciprocal-rank "
                            "fusion (Cormack et al. 2009) of this model's rank and the candidate model's rank")
    rrf_k: float = Field(60.0, gt=0, description="rrf: score = 1/(rrf_k + rank) summed over both rankings")
    max_catalogue: int = Field(50_000, gt=0, description="largest catalogue scored in full without candidates")


class FeatureRecommender(TorchRecommender):
    """A torch model on the feature tables: what every model that reads them shares (DeepFM, Wide&Deep and
    DCN through :class:`FieldRecommender`; the two-tower model and LightFM directly).

    Reads ``silver/user_features``, ``silver/item_features`` and ``silver/feature_vocab`` under
    ``warehouse`` (the pipeline sets it; ``recsys-spark features`` builds them). The field layout
    (``FeatureSpec``, with the user and item ids as fields unless :meth:`_include_ids` says otherwise) and
    the item block of every item are saved with the model; the user block is read from the warehouse when
    recommending (:meth:`_queries`), so users indexed after training, and users without train interactions
    (side-file users), are cold: their id and activity fields read as unknown (0), which id dropout trained
    the model for, and their side features rank. ``known_users`` are the users with a feature row; the
    pipeline's popularity fallback serves the rest.
    """

    def __init__(self, params: TorchParams | None = None) -> None:
        super().__init__(params)
        self.spec: FeatureSpec | None = None
        self.item_fields: np.ndarray | None = None  # [n_items, len(spec.item_fields)], row item_idx

    def _include_ids(self) -> bool:
        """Whether the user and item ids are fields (LightFM's identity features may be switched off)."""
        return True

    def _need_warehouse(self) -> str:
        if not self.warehouse:
            raise RecsysError(f"{self.name} reads the feature tables under the warehouse: set model.warehouse "
                              "(the pipeline does) and run `recsys-spark features` first")
        return self.warehouse

    def _user_features(self, spark: SparkSession) -> DataFrame:
        return tb.read(spark, self._need_warehouse(), tb.USER_FEATURES)

    def _fit(self, train: DataFrame) -> None:
        spark = train.sparkSession
        warehouse = self._need_warehouse()
        self.spec = load_feature_spec(spark, warehouse, include_ids=self._include_ids())
        if tb.ITEM_IDX in self.spec.cardinalities:
            n_catalogue = self.spec.cardinalities[tb.ITEM_IDX] - 1
        else:  # no id field: the item index says how many items there are
            top = tb.read(spark, warehouse, tb.ITEM_INDEX).agg(F.max(tb.ITEM_IDX)).first()[0]
            if top is None:
                raise RecsysError(f"{self.name}: {tb.ITEM_INDEX} is empty: run the interactions step first")
            n_catalogue = top + 1
        self.item_fields = item_field_matrix(tb.read(spark, warehouse, tb.ITEM_FEATURES), self.spec, n_catalogue)
        super()._fit(train)

    def _sizes(self, n_users: int, n_items: int) -> tuple[int, int]:
        if n_items > len(self.item_fields):
            raise RecsysError(f"the train split has item_idx {n_items - 1}, past silver/item_features' "
                              f"{len(self.item_fields)} items: rebuild the features (`recsys-spark features`)")
        return max(n_users, self.spec.cardinalities.get(tb.USER_IDX, 1) - 1), len(self.item_fields)

    def _queries(self, users: DataFrame, trained: DataFrame | None) -> DataFrame:
        """(user_idx, fields, _cold): the query block of each of ``users`` that has a feature row. Users not
        in ``trained`` (None: all are) are cold (``_cold`` true): their id and activity fields read as
        unknown (0), so they are scored from their side features, as the id-dropout rows of training were."""
        spark = users.sparkSession
        rows = (self._user_features(spark).filter(F.col(tb.USER_IDX).isNotNull())
                .join(users.select(tb.USER_IDX), tb.USER_IDX, "left_semi"))
        missing = [f for f in self.spec.user_fields if f not in rows.columns]
        if missing:
            raise RecsysError(f"silver/user_features lacks the fields {missing} this {self.name} model was trained "
                              "with: rebuild the features with the same side files")
        if trained is None:
            rows = rows.withColumn("_trained", F.lit(True))
        else:
            rows = rows.join(trained.select(tb.USER_IDX).withColumn("_trained", F.lit(True)), tb.USER_IDX, "left")
        rows = rows.withColumn("_user", F.col(tb.USER_IDX))
        for name in self.spec.history_fields:  # as id dropout trained: id and activity unknown (null -> 0)
            rows = rows.withColumn(name, F.when(F.col("_trained"), F.col(name)))
        return rows.select(F.col("_user").alias(tb.USER_IDX), assemble(self.spec.user_fields),
                           F.col("_trained").isNull().alias(COLD))

    def known_users(self) -> DataFrame:
        if not self.warehouse:
            return self._users
        return (self._user_features(self._users.sparkSession).filter(F.col(tb.USER_IDX).isNotNull())
                .select(tb.USER_IDX).distinct())

    def _extra_meta(self) -> dict[str, Any]:
        return {"feature_spec": self.spec.to_dict(), "warehouse": self.warehouse}

    def _save_extra(self, path: str) -> None:
        np.save(os.path.join(path, ITEM_FIELDS_FILE), self.item_fields, allow_pickle=False)
        if self.item_counts is not None:
            np.save(os.path.join(path, ITEM_COUNTS_FILE), self.item_counts, allow_pickle=False)

    def _load_extra(self, spark: SparkSession, path: str, meta: dict[str, Any]) -> None:
        self.spec = FeatureSpec.from_dict(meta["feature_spec"])
        self.warehouse = meta.get("warehouse")  # the pipeline sets its own after loading
        self.item_fields = np.load(os.path.join(path, ITEM_FIELDS_FILE), allow_pickle=False)
        counts = os.path.join(path, ITEM_COUNTS_FILE)
        if os.path.exists(counts):
            self.item_counts = np.load(counts, allow_pickle=False)
        elif self.params.cold_user_weight is not None:
            log.warning("%s: saved without item counts (before cold_user_weight): cold users are ranked by the "
                        "model's scores alone; refit to add the popularity prior", self.name)
            self.params = self.params.model_copy(update={"cold_user_weight": None})

    def _top_k_of_vectors(self, vectors: DataFrame, items: np.ndarray, k: int, seen: DataFrame | None,
                          exclude_items) -> DataFrame:
        """Top-``k`` by the dot product of (user_idx, embedding) ``vectors`` with ``items`` [n, d] (row =
        item_idx), a cold user's scores with the popularity prior (``scoring.with_popularity_prior``)."""
        spark = vectors.sparkSession
        flagged = vectors.join(self._users.select(tb.USER_IDX).withColumn("_trained", F.lit(True)), tb.USER_IDX,
                               "left").select(tb.USER_IDX, EMBEDDING, F.col("_trained").isNull().alias(COLD))
        matrix = spark.sparkContext.broadcast(items.astype(np.float32))
        counts, weight = self.item_counts, self.params.cold_user_weight

        def scores(part: pd.DataFrame) -> np.ndarray:
            dots = np.stack(part[EMBEDDING].to_numpy()).astype(np.float32) @ matrix.value.T  # [U, n]
            return with_popularity_prior(dots, part[COLD].to_numpy(bool), counts, weight)

        return top_k_from_scores(flagged, scores, np.arange(len(items), dtype=np.int32), k, seen, exclude_items,
                                 self.users_per_block)


class FieldRecommender(FeatureRecommender):
    """A field network on user and item features, trained on the train pairs with sampled negatives
    (``task_class``, a :class:`FieldTask`). Subclasses set ``name``, ``network``, ``params_class`` and
    ``task_class``.

    Recommending ranks the whole catalogue (up to ``max_catalogue`` items: every pair goes through the
    network) or, with ``candidates``, only that model's top ``candidates_k`` for the user (and
    ``known_users`` are then the users with a feature row and candidates).
    """

    params_class: ClassVar[type[FieldParams]] = FieldParams
    task_class: ClassVar[type[FieldTask]] = FieldTask

    def _training_data(self, train: DataFrame):
        spark = train.sparkSession
        fit_rows, held = self._hold_out_last(train)
        item_features = tb.read(spark, self.warehouse, tb.ITEM_FEATURES)
        frame = field_frame(fit_rows, self._user_features(spark), item_features, self.spec)
        holdout = None
        if held is not None:
            # Validation users have other train rows: their query block keeps their id.
            queries = self._queries(spark.createDataFrame(held[[tb.USER_IDX]].astype("int32")), trained=None)
            by_user = {r[tb.USER_IDX]: list(r[tb.FIELDS]) for r in queries.collect()}
            held = held[held[tb.USER_IDX].isin(list(by_user))].reset_index(drop=True)
            if len(held):
                inputs = np.array([by_user[u] for u in held[tb.USER_IDX]], dtype=np.int64)  # [U, Fq]
                holdout = self._holdout(inputs, held)
        return frame, holdout

    def _task(self, item_counts, holdout):
        return self.task_class(self.params.net, self.spec, self.item_fields, item_counts, holdout)

    def _candidate_lists(self, spark: SparkSession) -> DataFrame:
        """(user_idx, _candidates array<int>, best first): the candidate model's top ``candidates_k`` of ``run_date``
        (the latest run date of that model when unset) from gold/recommendations."""
        p: FieldParams = self.params
        warehouse = self._need_warehouse()
        recs = tb.read(spark, warehouse, tb.RECOMMENDATIONS).filter(F.col(tb.MODEL) == p.candidates)
        day = self.run_date or recs.agg(F.max(tb.RUN_DATE)).first()[0]
        recs = recs.filter((F.col(tb.RUN_DATE) == F.lit(day)) & (F.col(tb.RANK) <= p.candidates_k))
        if day is None or recs.limit(1).count() == 0:
            raise RecsysError(f"{self.name} re-ranks the recommendations of {p.candidates!r}, but "
                              f"{tb.RECOMMENDATIONS} has none for run date {day}: recommend with "
                              f"{p.candidates} first (the pipeline does when both are in models)")
        users, items = tb.read(spark, warehouse, tb.USER_INDEX), tb.read(spark, warehouse, tb.ITEM_INDEX)
        pairs = recs.join(users, tb.USER_ID).join(items, tb.ITEM_ID).filter(F.col(tb.ITEM_IDX) < self.n_items)
        ranked = F.sort_array(F.collect_list(F.struct(tb.RANK, tb.ITEM_IDX)))  # the candidate model's order
        return pairs.groupBy(tb.USER_IDX).agg(ranked[tb.ITEM_IDX].alias(CANDIDATES))

    def known_users(self) -> DataFrame:
        known = super().known_users()
        if self.warehouse and self.params.candidates:
            known = known.join(self._candidate_lists(known.sparkSession), tb.USER_IDX, "left_semi")
        return known

    def _recommend(self, users, k, seen, exclude_items):
        spark = users.sparkSession
        p: FieldParams = self.params
        network = self._broadcast_network(spark)
        table = spark.sparkContext.broadcast(self.item_fields)
        n_items = self.n_items
        queries = self._queries(users, trained=self._users)
        if p.candidates:
            queries = queries.join(self._candidate_lists(spark), tb.USER_IDX)  # others: no rows
        elif n_items > p.max_catalogue:
            raise RecsysError(f"{self.name} would score all {n_items} items per user (max_catalogue="
                              f"{p.max_catalogue}): re-rank another model's top-N with candidates=<model>")
        with_candidates = bool(p.candidates)
        rrf_k = p.rrf_k if p.fusion == "rrf" else None
        counts, weight = self.item_counts, p.cold_user_weight

        def scores(part: pd.DataFrame) -> np.ndarray:
            module = executor_module(network)
            items = torch.from_numpy(table.value)  # [n_items, Fi]
            query = torch.as_tensor(np.stack(part[tb.FIELDS].to_numpy()).astype(np.int64))  # [U, Fq]
            with torch.no_grad():
                if not with_candidates:
                    catalogue = score_catalogue(module, query, items).float().numpy()  # [U, n_items]
                    return with_popularity_prior(catalogue, part[COLD].to_numpy(bool), counts, weight)
                return score_candidates(module, query, items, part[CANDIDATES].to_numpy(), n_items, rrf_k=rrf_k)

        return top_k_from_scores(queries, scores, np.arange(n_items, dtype=np.int32), k, seen, exclude_items,
                                 self.users_per_block)
