"""LightFM-style hybrid (Kula 2015): users and items are the sums of their feature embeddings, trained
with WARP (or BPR, or logistic), and cold users and items are scored from their features alone.

The network is ``recsys_spark.nn.lightfm`` (``f(u, i) = <p_u, q_i> + b_u + b_i``); its input is the
feature tables (``recsys-spark features``) laid out by ``recsys_spark.data.feature_spec``, as DeepFM's:
the user block (the identity feature ``user_idx`` first, unless ``identity: false``, then the side and
activity fields) and the item block (``item_idx``, then the item's fields).

Training (:class:`LightFMTask`): every train pair is a positive; its negatives are drawn uniformly
inside the loop (never the positive), ``max_sampled`` of them at once for WARP (``losses.warp``: the
first that violates the margin is the one whose hinge counts, weighted by the rank its number of draws
implies), ``n_negatives`` for BPR and logistic (``losses.bpr``, ``losses.bce_sampled``). LightFM skips
any negative the user has interacted with; here only the positive itself is excluded (the samplers keep
no per-user state; on sparse data the difference is negligible).

Cold start: an item with no train interaction has its identity feature unknown (0) in the item table
the model trains and serves with, and a user the fit never saw (absent from the train split but in
``silver/user_features``) has its identity and activity fields unknown (``FeatureSpec.history_fields``):
their vectors are the sums of their remaining features' embeddings, which training learnt from every
user and item that has them. Untrained identity rows are never read. A departure from LightFM: with
``id_dropout`` > 0 (0.1 by default) that share of the training rows reads its user the way a cold user
reads (id and activity fields unknown), so the side features also learn to stand alone, not only as
small corrections to an identity that a cold user lacks (DropoutNet, Volkovs et al. 2017); 0 is LightFM's
own training. A second departure: a cold user's list adds the popularity prior to f (``cold_user_weight``,
``scoring.with_popularity_prior``), since f from four side fields alone ranked worse than popularity.

Serving is a dot product: ``user_factors`` is ``[p_u, b_u, 1]`` and ``item_factors`` ``[q_i, 1, b_i]``
(d + 2 dimensions), whose dot product is exactly f(u, i); ``recommend`` ranks by it (a cold user's f
standardised, plus the prior), and both land in gold/*_embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from pyspark.sql import DataFrame
from pyspark.sql import types as T
from torch import Tensor, nn

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.feature_spec import FeatureSpec, field_frame
from recsys_spark.errors import RecsysError
from recsys_spark.models.field_base import FeatureParams, FeatureRecommender, FeatureTask
from recsys_spark.nn.lightfm import LightFM
from recsys_spark.scoring import executor_module, matrix_frame, similar_from_factors
from recsys_spark.tables import EMBEDDING
from recsys_spark.train import losses
from recsys_spark.train.task import Holdout
from recsys_spark.train.trainer import TrainConfig

log = logging.getLogger(__name__)

_VECTORS_SCHEMA = T.StructType([T.StructField(tb.USER_IDX, T.IntegerType(), False),
                                T.StructField(EMBEDDING, T.ArrayType(T.FloatType()), False)])


class LightFMNetParams(Section):
    """The network and its loss. LightFM's own defaults: WARP, ``max_sampled`` 10, a margin of 1."""

    dim: int = Field(64, gt=0, description="embedding size d of every feature")
    identity: bool = Field(True, description="include the user and item id as features (Kula's identity "
                                             "features); false = pure content model")
    loss: Literal["warp", "bpr", "logistic"] = "warp"
    max_sampled: int = Field(10, gt=0, description="warp: negatives drawn per positive at most")
    n_negatives: int = Field(1, gt=0, description="bpr, logistic: sampled negatives per positive")
    id_dropout: float = Field(0.1, ge=0, lt=1, description="share of rows trained as a cold user: the user's "
                                                            "id and activity fields unknown (0 = LightFM's)")
    seed: int = 42


class LightFMParams(FeatureParams):
    """Hyper-parameters of ``lightfm`` (``conf/models/lightfm.yaml``). ``cold_user_weight`` 0.5 was the best
    of 0.1 to 2 on the validation seed of ``scripts/bench_cold.py`` (docs/BENCHMARKS.md)."""

    cold_user_weight: float | None = Field(0.5, gt=0, description=FeatureParams.model_fields[
        "cold_user_weight"].description)

    net: LightFMNetParams = LightFMNetParams()
    train: TrainConfig = TrainConfig(epochs=50, batch_size=512, lr=0.003, optimizer="adam", schedule="constant",
                                     early_stopping_metric="ndcg@10", patience=3, validate_every_steps=100)


def cold_items_unknown(item_fields: np.ndarray, spec: FeatureSpec, item_counts: np.ndarray) -> np.ndarray:
    """``item_fields`` [n_items, Fi] with the identity of every item without a train interaction
    (``item_counts`` [<= n_items], missing = 0) set to unknown (0), a copy.

    Why: such an item only ever appears as a sampled negative, so its id embedding learns nothing but
    "not this"; with its identity unknown in training and in serving alike, it is scored from its
    features alone, as the paper's cold items are."""
    out = np.array(item_fields, dtype=np.int64, copy=True)
    if tb.ITEM_IDX not in spec.item_fields:
        return out
    counts = np.zeros(len(out))
    counts[:len(item_counts)] = np.asarray(item_counts)[:len(out)]
    out[counts == 0, spec.item_fields.index(tb.ITEM_IDX)] = 0
    return out


class LightFMTask(FeatureTask):
    """LightFM on (user_idx, item_idx, fields) positives (``fields``: the user block, then the item block;
    only the user block is read: the item block comes from ``item_fields``, the table serving uses).

    ``holdout.inputs`` are user blocks [U, Fu], ranked against the catalogue."""

    columns = [tb.USER_IDX, tb.ITEM_IDX, tb.FIELDS]

    def __init__(self, params: LightFMNetParams, spec: FeatureSpec, item_fields: np.ndarray,
                 item_counts: np.ndarray | None = None, holdout: Holdout | None = None) -> None:
        super().__init__(params.seed, spec, item_fields, item_counts, 0.75, holdout)
        if self.n_items < 2:
            raise ValueError("lightfm needs at least 2 items to sample negatives")
        self.params = params
        self.n_user_fields = len(spec.user_fields)
        self.cold_user_positions = spec.positions(spec.history_fields)  # inside the user block (it comes first)

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank, global RNG untouched
            torch.manual_seed(self.params.seed)
            sizes = self.spec.sizes
            return LightFM(sizes[:self.n_user_fields], sizes[self.n_user_fields:], dim=self.params.dim)

    def _make_cold(self, users: Tensor) -> Tensor:
        """users [B, Fu] with, at rate ``id_dropout``, a row's id and activity fields 0: what a cold user
        reads at serving, so the side features learn to stand alone (DropoutNet, Volkovs et al. 2017)."""
        if self.params.id_dropout <= 0:
            return users
        cold = self.coin((users.shape[0], 1), self.params.id_dropout, users.device)  # [B, 1]
        return self.blank_(users.clone(), self.cold_user_positions, cold)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        p = self.params
        users = self._make_cold(batch[tb.FIELDS].long()[:, :self.n_user_fields])  # [B, Fu]
        items = batch[tb.ITEM_IDX].long()  # [B]
        m = p.max_sampled if p.loss == "warp" else p.n_negatives
        neg = self.sample("uniform", (items.shape[0], m), items.device, positives=items)  # items [B, m]
        candidates = torch.cat([items.unsqueeze(1), neg.items], dim=1)  # [B, 1 + m], the positive first
        scores = model(users, self.items_on(items.device), candidates)  # [B, Fu], [n_items, Fi] -> [B, 1 + m]
        if p.loss == "warp":
            return losses.warp(scores[:, 0], scores[:, 1:], n_items=self.n_items)
        loss_fn = losses.bpr if p.loss == "bpr" else losses.bce_sampled
        return loss_fn(scores[:, 0], scores[:, 1:])

    def holdout_scores(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """inputs: the hold-out users' blocks [U, Fu] -> f [U, n_items]."""
        return model.score_items(inputs.long(), self.items_on(inputs.device))


class LightFMRecommender(FeatureRecommender):
    """LightFM (Kula 2015) on the identity and side features of users and items (``LightFMTask``).

    Reads ``silver/user_features``, ``silver/item_features`` and ``silver/feature_vocab`` under
    ``warehouse`` (the pipeline sets it). The field layout and the item block of every item are saved
    with the model; the user block is read from the warehouse when recommending, so users indexed after
    training and side-file users without train interactions are cold and scored from their features.
    ``known_users`` are the users with a feature row; the pipeline's popularity fallback serves the rest.
    """

    name = "lightfm"
    network = LightFM
    params_class = LightFMParams

    def _include_ids(self) -> bool:
        return self.params.net.identity

    def _training_data(self, train: DataFrame):
        spark = train.sparkSession
        fit_rows, held = self._hold_out_last(train)
        frame = field_frame(fit_rows, self._user_features(spark), tb.read(spark, self.warehouse, tb.ITEM_FEATURES),
                            self.spec)
        holdout = None
        if held is not None:
            # Validation users have other train rows: their user block keeps its identity.
            users = spark.createDataFrame(held[[tb.USER_IDX]].astype("int32"))
            by_user = {r[tb.USER_IDX]: list(r[tb.FIELDS]) for r in self._queries(users, trained=None).collect()}
            held = held[held[tb.USER_IDX].isin(list(by_user))].reset_index(drop=True)
            if len(held):
                inputs = np.array([by_user[u] for u in held[tb.USER_IDX]], dtype=np.int64)  # [U, Fu]
                holdout = self._holdout(inputs, held)
        return frame, holdout

    def _task(self, item_counts: np.ndarray, holdout):
        self.item_fields = cold_items_unknown(self.item_fields, self.spec, item_counts)  # trained and served so
        return LightFMTask(self.params.net, self.spec, self.item_fields, item_counts, holdout)

    # -- vectors --------------------------------------------------------------------------------
    def _user_vectors(self, queries: DataFrame) -> DataFrame:
        """(user_idx, [p_u, b_u, 1]) of (user_idx, fields) rows, on the executors by blocks."""
        network = self._broadcast_network(queries.sparkSession)
        block = self.users_per_block

        def encode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            module = executor_module(network)
            for batch in batches:
                for start in range(0, len(batch), block):
                    part = batch.iloc[start:start + block]
                    fields = torch.as_tensor(np.stack(part[tb.FIELDS].to_numpy()).astype(np.int64))  # [U, Fu]
                    with torch.no_grad():
                        vectors = module.user_vectors(fields).float().numpy()  # [U, d + 2]
                    yield pd.DataFrame({tb.USER_IDX: part[tb.USER_IDX].to_numpy(np.int32), EMBEDDING: list(vectors)})

        return queries.mapInPandas(encode, _VECTORS_SCHEMA)

    def _item_matrix(self, with_bias: bool = True) -> np.ndarray:
        """[q_i, 1, b_i] of every item [n_items, d + 2] (or q_i alone [n_items, d]), on the driver."""
        if self.module is None:
            raise RecsysError("lightfm is not fitted: call fit() or load() first")
        with torch.no_grad():
            fields = torch.as_tensor(self.item_fields)
            out = self.module.item_vectors(fields) if with_bias else self.module.items(fields)[0]
        return out.float().numpy()

    def user_factors(self) -> DataFrame:
        """[p_u, b_u, 1] of every user with a feature row (cold ones from their features): dot
        ``item_factors`` = f(u, i)."""
        return self._user_vectors(self._queries(self.known_users(), trained=self._users))

    def item_factors(self) -> DataFrame:
        """[q_i, 1, b_i] of every indexed item (cold ones from their features)."""
        return matrix_frame(self._users.sparkSession, self._item_matrix(), tb.ITEM_IDX)

    def _similar_items(self, k: int) -> DataFrame:
        """The cosine of q_i alone: the bias dimensions would make every pair look alike."""
        return similar_from_factors(matrix_frame(self._users.sparkSession, self._item_matrix(with_bias=False),
                                                 tb.ITEM_IDX), k, self.users_per_block)

    # -- scoring --------------------------------------------------------------------------------
    def _recommend(self, users, k, seen, exclude_items):
        vectors = self._user_vectors(self._queries(users, trained=self._users))
        return self._top_k_of_vectors(vectors, self._item_matrix(), k, seen, exclude_items)
