"""NCF (He et al. 2017): GMF, MLP or NeuMF on (user, item) pairs with sampled negatives.

The networks are ``recsys_spark.nn.ncf``. Training (:class:`NCFTask`): each train pair is a positive
scored against ``n_negatives`` items drawn inside the loop, never the positive, with BCE, BPR, margin
ranking or the triplet loss (GMF scoring by distance). Negatives: uniform, by popularity, or uniform
mixed with *hard* negatives (each user's top-scored non-positives under the current weights, refreshed
at every epoch start: ``hard_share``) or with *funnel* negatives (items the user viewed but never
carted or purchased, from ``bronze/events``: ``funnel_share``).
Validation: each of ``validation_users`` users' latest train item is held out and ranked against the
whole catalogue. Recommending runs the network over every item for blocks of users on the executors
(``score_all``); the GMF half's embeddings go to the embedding tables.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from torch import Tensor, nn

from recsys_spark import tables as tb
from recsys_spark.config import EVENT_TYPES, Section
from recsys_spark.data.funnel import candidate_matrix, viewed_not_bought
from recsys_spark.errors import RecsysError
from recsys_spark.models.torch_base import TorchParams, TorchRecommender
from recsys_spark.nn.ncf import GMF, MLP, NeuMF
from recsys_spark.scoring import executor_module, matrix_frame, top_k_from_scores
from recsys_spark.train import losses, negatives
from recsys_spark.train.distributed import unwrap
from recsys_spark.train.task import Holdout, SampledTask, evaluating, model_device
from recsys_spark.train.trainer import TrainConfig

log = logging.getLogger(__name__)

NETWORKS: dict[str, type[nn.Module]] = {"gmf": GMF, "mlp": MLP, "neumf": NeuMF}


class NCFNetParams(Section):
    """The network and its loss. Defaults follow the paper's set-up (4 negatives per positive)."""

    model: Literal["gmf", "mlp", "neumf"] = "neumf"
    mf_dim: int = Field(32, gt=0, description="GMF embedding size")
    mlp_layers: list[int] = Field(default_factory=lambda: [64, 32, 16],
                                  description="MLP tower sizes; the first is user + item embedding")
    dropout: float = Field(0.0, ge=0, lt=1, description="after each MLP layer")
    loss: Literal["bce", "bpr", "triplet", "margin"] = "bce"
    margin: float = Field(1.0, gt=0, description="α of the triplet loss, the margin of margin ranking")
    n_negatives: int = Field(4, gt=0, description="sampled negatives per positive")
    negatives: Literal["uniform", "popularity", "hard", "funnel"] = "uniform"
    n_hard: int = Field(50, gt=0, description="hard negatives kept per user (negatives: hard)")
    hard_share: float = Field(0.5, ge=0, le=1, description="share of negatives drawn from the hard ones")
    funnel_share: float = Field(0.5, ge=0, le=1, description="share of negatives drawn from the items the user "
                                                             "viewed but never bought (negatives: funnel)")
    funnel_viewed: list[str] = Field(default_factory=lambda: ["view"], min_length=1,
                                     description="event types of a view")
    funnel_bought: list[str] = Field(default_factory=lambda: ["cart", "purchase"], min_length=1,
                                     description="event types of a conversion")
    funnel_max: int = Field(200, gt=0, description="viewed-not-bought items kept per user (the latest)")
    popularity_exponent: float = Field(0.75, ge=0, description="q ∝ count ** exponent")
    weighted: bool = Field(False, description="weigh each positive's loss by its interaction weight")
    seed: int = Field(42, description="initial weights and negative sampling")

    @field_validator("funnel_viewed", "funnel_bought")
    @classmethod
    def _event_types(cls, types: list[str]) -> list[str]:
        unknown = sorted(set(types) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event types {unknown}; known: {list(EVENT_TYPES)}")
        return types

    @field_validator("mlp_layers")
    @classmethod
    def _layers(cls, layers: list[int]) -> list[int]:
        # A field validator, so the error names net.mlp_layers, not only net.
        if not layers or layers[0] % 2 or any(x <= 0 for x in layers):
            raise ValueError("mlp_layers must be positive sizes with an even first one (user + item embedding)")
        return layers

    @model_validator(mode="after")
    def _triplet_needs_vectors(self) -> NCFNetParams:
        if self.loss == "triplet" and self.model != "gmf":
            raise ValueError("loss triplet works on user and item vectors: it needs model gmf (scored by distance)")
        return self


class NCFParams(TorchParams):
    """Hyper-parameters of ``ncf`` (``conf/models/ncf.yaml``)."""

    net: NCFNetParams = NCFNetParams()
    train: TrainConfig = TrainConfig(epochs=50, batch_size=512, lr=0.001, optimizer="adam", schedule="constant",
                                     early_stopping_metric="ndcg@10", patience=3, validate_every_steps=100)


class NCFTask(SampledTask):
    """GMF, MLP or NeuMF on (user_idx, item_idx, weight) rows, n sampled negatives per positive."""

    columns = [tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT]

    def __init__(self, params: NCFNetParams, n_users: int, n_items: int, item_counts: np.ndarray | None = None,
                 holdout: Holdout | None = None, positives: tuple[np.ndarray, np.ndarray] | None = None,
                 funnel: np.ndarray | None = None) -> None:
        super().__init__(params.seed, n_items, item_counts, params.popularity_exponent, holdout)
        self.params, self.n_users = params, n_users
        if params.negatives == "hard" and positives is None:
            raise ValueError("hard negatives need every user's positives (indptr [n_users + 1], items)")
        if params.negatives == "funnel" and funnel is None:
            raise ValueError("funnel negatives need the viewed-not-bought candidates [n_users, m]")
        self.positives, self.funnel = positives, funnel  # CSR of train items per user; [n_users, m] or None
        self._candidates: Tensor | None = None  # [n_users, m] on the training device: hard or funnel items

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_candidates"] = None  # rebuilt on the rank's device
        return state

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        """Hard negatives: recompute each user's ``n_hard`` top-scored non-positives with the current
        weights (``negatives.top_non_positives``), by blocks of users."""
        if self.params.negatives != "hard":
            return
        inner = unwrap(model)
        device = model_device(inner)
        indptr, items = self.positives
        block = max(1, (1 << 22) // max(1, self.n_items))
        parts = []
        with evaluating(inner), torch.no_grad():
            for start in range(0, self.n_users, block):
                stop = min(start + block, self.n_users)
                scores = inner.score_all(torch.arange(start, stop, device=device)).float()  # [b, n_items]
                seen = indptr[start : stop + 1]
                parts.append(negatives.top_non_positives(scores, seen - seen[0], items[seen[0]:seen[-1]],
                                                         self.params.n_hard))
        self._candidates = torch.cat(parts)  # [n_users, n_hard]

    def negatives_for(self, users: Tensor, items: Tensor) -> Tensor:
        """Negatives [B, n] for positives (users [B], items [B]), by ``params.negatives``."""
        p = self.params
        shape = (items.shape[0], p.n_negatives)
        if p.negatives in ("uniform", "popularity"):
            return self.sample(p.negatives, shape, items.device, positives=items).items
        base = self.sample("uniform", shape, items.device, positives=items)
        if p.negatives == "funnel" and self._candidates is None:
            self._candidates = torch.as_tensor(self.funnel, device=items.device)
        if self._candidates is None:
            raise RecsysError("hard negatives are computed at the start of each epoch: call start_epoch first")
        g = self.generator(items.device)
        special, usable = negatives.from_candidates(self._candidates, users, p.n_negatives, g)
        share = p.hard_share if p.negatives == "hard" else p.funnel_share
        return negatives.mix(base, special, usable, share, g, positives=items).items

    def build_model(self) -> nn.Module:
        p = self.params
        metric = {"metric": "distance"} if p.loss == "triplet" else {}
        shape = {"gmf": {"dim": p.mf_dim, **metric}, "mlp": {"layers": p.mlp_layers, "dropout": p.dropout},
                 "neumf": {"mf_dim": p.mf_dim, "layers": p.mlp_layers, "dropout": p.dropout}}[p.model]
        with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank, global RNG untouched
            torch.manual_seed(p.seed)
            return NETWORKS[p.model](self.n_users, self.n_items, **shape)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        users = batch[tb.USER_IDX].long()  # [B]
        items = batch[tb.ITEM_IDX].long()  # [B]
        neg = self.negatives_for(users, items)  # [B, n], never the row's positive
        candidates = torch.cat([items.unsqueeze(1), neg], dim=1)  # [B, 1 + n], the positive first
        logits = model(users.unsqueeze(1), candidates)  # one forward: [B, 1] x [B, 1 + n] -> [B, 1 + n]
        weight = batch[tb.WEIGHT].float() if self.params.weighted else None
        p = self.params
        if p.loss in ("margin", "triplet"):
            # triplet: GMF scores by -||p_u - q_i||², so this hinge is exactly losses.triplet(p_u, q_pos,
            # q_neg, α) (tests/test_losses.py checks it), computed through forward so DDP sees the gradients.
            return losses.margin_ranking(logits[:, 0], logits[:, 1:], p.margin, weight)
        loss_fn = losses.bpr if p.loss == "bpr" else losses.bce_sampled
        return loss_fn(logits[:, 0], logits[:, 1:], weight)


class NCFRecommender(TorchRecommender):
    """NCF (GMF, MLP or NeuMF) trained on (user, item) pairs with sampled negatives."""

    name = "ncf"
    params_class = NCFParams

    def __init__(self, params: NCFParams | None = None) -> None:
        super().__init__(params)
        self._positives: tuple[np.ndarray, np.ndarray] | None = None  # negatives: hard (CSR of fit items)
        self._funnel: np.ndarray | None = None  # negatives: funnel ([n_users, m] viewed-not-bought items)

    def network_class(self) -> type[nn.Module]:
        return NETWORKS[self.params.net.model]

    def _training_data(self, train: DataFrame):
        fit_rows, held = self._hold_out_last(train)
        holdout = None if held is None else self._holdout(held[tb.USER_IDX].to_numpy(), held)
        self._positives = self._funnel = None
        if self.params.net.negatives == "hard":
            self._positives = self._positive_lists(fit_rows)
        elif self.params.net.negatives == "funnel":
            self._funnel = self._funnel_lists(train)
        return fit_rows.select(tb.USER_IDX, tb.ITEM_IDX, F.col(tb.WEIGHT).cast("float").alias(tb.WEIGHT)), holdout

    def _positive_lists(self, fit_rows: DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Every user's fit items as a CSR (indptr [n_users + 1], items), collected to the driver: hard
        negatives exclude all of a user's positives, and every rank scores every user."""
        pairs = fit_rows.select(tb.USER_IDX, tb.ITEM_IDX).toPandas().sort_values([tb.USER_IDX, tb.ITEM_IDX])
        log.info("ncf: collected %d (user, item) pairs to the driver for hard negatives", len(pairs))
        counts = np.bincount(pairs[tb.USER_IDX].to_numpy(), minlength=self.n_users)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), pairs[tb.ITEM_IDX].to_numpy(np.int64)

    def _funnel_lists(self, train: DataFrame) -> np.ndarray:
        """[n_users, m]: each user's viewed-not-bought items (``data.funnel``), PAD_IDX-padded."""
        if not self.warehouse:
            raise RecsysError("ncf negatives: funnel reads bronze/events under the warehouse: set model.warehouse "
                              "(the pipeline does)")
        spark, p = train.sparkSession, self.params.net
        lists = viewed_not_bought(tb.read(spark, self.warehouse, tb.BRONZE_EVENTS),
                                  tb.read(spark, self.warehouse, tb.USER_INDEX),
                                  tb.read(spark, self.warehouse, tb.ITEM_INDEX), train,
                                  p.funnel_viewed, p.funnel_bought, p.funnel_max)
        matrix = candidate_matrix(lists.filter(F.col(tb.USER_IDX) < self.n_users), self.n_users)
        matrix[matrix >= self.n_items] = tb.PAD_IDX  # items the network has no row for
        matrix = -np.sort(-matrix, axis=1)  # real items first again, padding last
        return matrix

    def _task(self, item_counts, holdout):
        return NCFTask(self.params.net, self.n_users, self.n_items, item_counts, holdout,
                       positives=self._positives, funnel=self._funnel)

    def user_factors(self) -> DataFrame | None:
        return self._factor_frame(0, tb.USER_IDX)

    def item_factors(self) -> DataFrame | None:
        return self._factor_frame(1, tb.ITEM_IDX)

    def _factor_frame(self, side: int, idx_col: str) -> DataFrame | None:
        pair = self.module.user_item_embeddings()
        if pair is None:  # the MLP variant has no dot-product embeddings
            return None
        return matrix_frame(self._users.sparkSession, pair[side].detach().cpu().numpy(), idx_col)

    def _recommend(self, users, k, seen, exclude_items):
        network = self._broadcast_network(users.sparkSession)

        def scores(part: pd.DataFrame) -> np.ndarray:
            module = executor_module(network)
            with torch.no_grad():
                user_ids = torch.as_tensor(part[tb.USER_IDX].to_numpy(), dtype=torch.long)  # [U]
                return module.score_all(user_ids).float().numpy()  # [U, n_items]

        known = users.join(self._users, tb.USER_IDX, "left_semi")
        return top_k_from_scores(known, scores, np.arange(self.n_items, dtype=np.int32), k, seen, exclude_items,
                                 self.users_per_block)
