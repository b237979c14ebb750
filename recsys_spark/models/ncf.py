"""NCF (He et al. 2017): GMF, MLP or NeuMF on (user, item) pairs with sampled negatives.

The networks are ``recsys_spark.nn.ncf``. Training (:class:`NCFTask`): each train pair is a positive
scored against ``n_negatives`` items drawn inside the loop (uniform or by popularity, never the
positive), with BCE or BPR. Validation: each of ``validation_users`` users' latest train item is held
out and ranked against the whole catalogue. Recommending runs the network over every item for blocks of
users on the executors (``score_all``); the GMF half's embeddings go to the embedding tables.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from torch import Tensor, nn

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.models.torch_base import TorchParams, TorchRecommender
from recsys_spark.nn.ncf import GMF, MLP, NeuMF
from recsys_spark.scoring import executor_module, matrix_frame, top_k_from_scores
from recsys_spark.train import losses
from recsys_spark.train.task import Holdout, SampledTask
from recsys_spark.train.trainer import TrainConfig

NETWORKS: dict[str, type[nn.Module]] = {"gmf": GMF, "mlp": MLP, "neumf": NeuMF}


class NCFNetParams(Section):
    """The network and its loss. Defaults follow the paper's set-up (4 negatives per positive)."""

    model: Literal["gmf", "mlp", "neumf"] = "neumf"
    mf_dim: int = Field(32, gt=0, description="GMF embedding size")
    mlp_layers: list[int] = Field(default_factory=lambda: [64, 32, 16],
                                  description="MLP tower sizes; the first is user + item embedding")
    dropout: float = Field(0.0, ge=0, lt=1, description="after each MLP layer")
    loss: Literal["bce", "bpr"] = "bce"
    n_negatives: int = Field(4, gt=0, description="sampled negatives per positive")
    negatives: Literal["uniform", "popularity"] = "uniform"
    popularity_exponent: float = Field(0.75, ge=0, description="q ∝ count ** exponent")
    weighted: bool = Field(False, description="weigh each positive's loss by its interaction weight")
    seed: int = Field(42, description="initial weights and negative sampling")

    @field_validator("mlp_layers")
    @classmethod
    def _layers(cls, layers: list[int]) -> list[int]:
        # A field validator, so the error names net.mlp_layers, not only net.
        if not layers or layers[0] % 2 or any(x <= 0 for x in layers):
            raise ValueError("mlp_layers must be positive sizes with an even first one (user + item embedding)")
        return layers


class NCFParams(TorchParams):
    """Hyper-parameters of ``ncf`` (``conf/models/ncf.yaml``)."""

    net: NCFNetParams = NCFNetParams()
    train: TrainConfig = TrainConfig(epochs=50, batch_size=512, lr=0.001, optimizer="adam", schedule="constant",
                                     early_stopping_metric="ndcg@10", patience=3, validate_every_steps=100)


class NCFTask(SampledTask):
    """GMF, MLP or NeuMF on (user_idx, item_idx, weight) rows, n sampled negatives per positive."""

    columns = [tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT]

    def __init__(self, params: NCFNetParams, n_users: int, n_items: int, item_counts: np.ndarray | None = None,
                 holdout: Holdout | None = None) -> None:
        super().__init__(params.seed, n_items, item_counts, params.popularity_exponent, holdout)
        self.params, self.n_users = params, n_users

    def build_model(self) -> nn.Module:
        p = self.params
        shape = {"gmf": {"dim": p.mf_dim}, "mlp": {"layers": p.mlp_layers, "dropout": p.dropout},
                 "neumf": {"mf_dim": p.mf_dim, "layers": p.mlp_layers, "dropout": p.dropout}}[p.model]
        with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank, global RNG untouched
            torch.manual_seed(p.seed)
            return NETWORKS[p.model](self.n_users, self.n_items, **shape)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        users = batch[tb.USER_IDX].long()  # [B]
        items = batch[tb.ITEM_IDX].long()  # [B]
        neg = self.sample(self.params.negatives, (items.shape[0], self.params.n_negatives), items.device,
                          positives=items)  # items [B, n], never the row's positive
        candidates = torch.cat([items.unsqueeze(1), neg.items], dim=1)  # [B, 1 + n], the positive first
        logits = model(users.unsqueeze(1), candidates)  # one forward: [B, 1] x [B, 1 + n] -> [B, 1 + n]
        weight = batch[tb.WEIGHT].float() if self.params.weighted else None
        loss_fn = losses.bpr if self.params.loss == "bpr" else losses.bce_sampled
        return loss_fn(logits[:, 0], logits[:, 1:], weight)


class NCFRecommender(TorchRecommender):
    """NCF (GMF, MLP or NeuMF) trained on (user, item) pairs with sampled negatives."""

    name = "ncf"
    params_class = NCFParams

    def network_class(self) -> type[nn.Module]:
        return NETWORKS[self.params.net.model]

    def _training_data(self, train: DataFrame):
        fit_rows, held = self._hold_out_last(train)
        holdout = None if held is None else self._holdout(held[tb.USER_IDX].to_numpy(), held)
        return fit_rows.select(tb.USER_IDX, tb.ITEM_IDX, F.col(tb.WEIGHT).cast("float").alias(tb.WEIGHT)), holdout

    def _task(self, item_counts, holdout):
        return NCFTask(self.params.net, self.n_users, self.n_items, item_counts, holdout)

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
