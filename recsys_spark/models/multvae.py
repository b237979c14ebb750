"""Mult-VAE / Mult-DAE (Liang et al. 2018): each user's item set in, a multinomial over the catalogue out.

The network and its loss are ``recsys_spark.nn.multvae``. Training rows are users: one row per user with
their train items as a padded array (``items``, PAD_IDX = -1; the latest ``max_history`` by first
interaction), streamed through the Petastorm loader like every torch model. Validation holds out each
validation user's latest train item (``_hold_out_last``); the input is the rest of their items, the
target ranked against the whole catalogue with those items filtered. β of the KL term rises linearly
to ``anneal_cap`` over ``total_anneal_steps`` optimizer steps (the paper's annealing).

Recommending is inductive: the model keeps each user's train items (``history/``) and runs the
encoder-decoder on them on the executors (``scoring.top_k_from_scores``, the weights broadcast), so a
user is scored from their items, never from a learnt per-user parameter. That is why the model can
fold in users its fit never saw (``fold_in_users``: their items are added to the history; no refit),
and the registry says so.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from torch import Tensor, nn

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.sequences import user_histories, user_sequences
from recsys_spark.errors import RecsysError
from recsys_spark.models.torch_base import TorchParams, TorchRecommender
from recsys_spark.nn.multvae import MultVAE, gaussian_kl, kl_weight, multinomial_nll
from recsys_spark.scoring import executor_module, matrix_frame, top_k_from_scores
from recsys_spark.tables import EMBEDDING, require_columns
from recsys_spark.train.distributed import unwrap
from recsys_spark.train.task import Holdout, SampledTask
from recsys_spark.train.trainer import TrainConfig

HISTORY_DIR = "history"


class MultVAENetParams(Section):
    """The network and its loss; the paper's sizes (600, 200), input dropout 0.5 and β cap 0.2."""

    variant: Literal["vae", "dae"] = "vae"
    hidden: int = Field(600, gt=0, description="encoder and decoder hidden layer")
    latent: int = Field(200, gt=0, description="size of z (of μ)")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout on the normalised input")
    anneal_cap: float = Field(0.2, ge=0, description="the largest β of the KL term (vae only)")
    total_anneal_steps: int = Field(2000, ge=0, description="optimizer steps over which β rises from 0 to "
                                                            "anneal_cap; 0: anneal_cap from the start")
    max_history: int = Field(1000, gt=0, description="a user's latest items read as the input")
    seed: int = Field(42, description="initial weights")


class MultVAEParams(TorchParams):
    """Hyper-parameters of ``multvae`` (``conf/models/multvae.yaml``)."""

    net: MultVAENetParams = MultVAENetParams()
    train: TrainConfig = TrainConfig(epochs=300, batch_size=64, lr=0.001, optimizer="adam", schedule="constant",
                                     early_stopping_metric="ndcg@10", patience=5, validate_every_steps=50)


class MultVAETask(SampledTask):
    """Mult-VAE/DAE on rows of users' items (``items`` [B, L], PAD_IDX = -1). No negatives: the
    multinomial likelihood normalises over the whole catalogue. ``holdout.inputs`` are padded item
    lists [U, L] too."""

    columns = [tb.ITEMS]

    def __init__(self, params: MultVAENetParams, n_items: int, holdout: Holdout | None = None) -> None:
        super().__init__(params.seed, n_items, None, 0.0, holdout)
        self.params = params

    def build_model(self) -> nn.Module:
        p = self.params
        with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank, global RNG untouched
            torch.manual_seed(p.seed)
            return MultVAE(self.n_items, hidden=p.hidden, latent=p.latent, dropout=p.dropout, variant=p.variant)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        items = batch[tb.ITEMS].long()  # [B, L]
        logits, mu, logvar = model(items)  # [B, n_items], [B, latent], [B, latent] or None
        nll = multinomial_nll(logits, items).mean()  # -Σ_i x_ui log π_i(z_u), averaged over users
        if logvar is None:  # Mult-DAE
            return nll
        inner = unwrap(model)
        beta = kl_weight(int(inner.anneal_steps), self.params.total_anneal_steps, self.params.anneal_cap)
        inner.anneal_steps += 1
        return nll + beta * gaussian_kl(mu.float(), logvar.float()).mean()

    def holdout_scores(self, model: nn.Module, inputs: Tensor) -> Tensor:
        return model.score_all(inputs.long())  # [U, L] -> [U, n_items]


def padded(lists) -> np.ndarray:
    """Item lists of different lengths -> [U, max length] int64, PAD_IDX after each list's items."""
    width = max([1, *(len(x) for x in lists)])
    out = np.full((len(lists), width), tb.PAD_IDX, dtype=np.int64)
    for row, items in enumerate(lists):
        out[row, : len(items)] = items
    return out


class MultVAERecommender(TorchRecommender):
    """Mult-VAE/DAE behind the ``Recommender`` interface; scores a user from their items (inductive).

    Examples
    --------
    >>> model = MultVAERecommender(MultVAEParams(backend="local")).fit(train)  # doctest: +SKIP
    >>> model.recommend(train.select("user_idx"), k=10, seen=train)  # doctest: +SKIP
    """

    name = "multvae"
    network = MultVAE
    params_class = MultVAEParams

    def __init__(self, params: MultVAEParams | None = None) -> None:
        super().__init__(params)
        self._history: DataFrame | None = None  # (user_idx, items array<int>): what each user is scored from

    # -- training ---------------------------------------------------------------------------------
    def _fit(self, train: DataFrame) -> None:
        super()._fit(train)
        self._history = self._histories(train).persist()

    def _histories(self, train: DataFrame) -> DataFrame:
        """(user_idx, items): each user's latest ``max_history`` train items (by first interaction)."""
        cap = self.params.net.max_history
        items = F.col(tb.ITEMS)
        latest = F.slice(items, F.greatest(F.size(items) - cap + 1, F.lit(1)), cap)
        return user_histories(train).select(tb.USER_IDX, latest.alias(tb.ITEMS))

    def _training_data(self, train: DataFrame):
        fit_rows, held = self._hold_out_last(train)
        longest = fit_rows.groupBy(tb.USER_IDX).count().agg(F.max("count")).first()[0]
        width = min(self.params.net.max_history, int(longest))
        rows = user_sequences(fit_rows, width)  # (user_idx, items [width] left-padded, length)
        holdout = None
        if held is not None:
            users = fit_rows.sparkSession.createDataFrame(held[[tb.USER_IDX]].astype("int32"))
            inputs = rows.join(users, tb.USER_IDX).orderBy(tb.USER_IDX).toPandas()  # the items but the held-out
            held = held[held[tb.USER_IDX].isin(inputs[tb.USER_IDX])].reset_index(drop=True)
            holdout = self._holdout(np.stack(inputs[tb.ITEMS].to_numpy()).astype(np.int64), held)
        return rows.select(tb.ITEMS), holdout

    def _task(self, item_counts, holdout):
        return MultVAETask(self.params.net, self.n_items, holdout)

    # -- users and items --------------------------------------------------------------------------
    @property
    def user_items(self) -> DataFrame:
        if self._history is None:
            raise RecsysError("multvae is not fitted: call fit() or load() first")
        return self._history

    def known_users(self) -> DataFrame:
        """Every user with a history: the fit's users and those added by ``fold_in_users``."""
        return self.user_items.select(tb.USER_IDX)

    def fold_in_users(self, interactions: DataFrame) -> DataFrame:
        """Add the users of ``interactions`` (user_idx, item_idx, weight) the model does not know to its
        history: the encoder reads any user's items, so no refit is needed. Items past the fit's
        catalogue and rows of weight <= 0 are ignored; a user left with none is not added. Returns the
        new users' (user_idx, embedding = μ)."""
        require_columns(interactions, [tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT], "interactions to fold in")
        cap = self.params.net.max_history
        new = (interactions.filter((F.col(tb.ITEM_IDX) < self.n_items) & (F.col(tb.WEIGHT) > 0))
               .join(self.user_items.select(tb.USER_IDX), tb.USER_IDX, "left_anti")
               .groupBy(tb.USER_IDX)
               .agg(F.slice(F.sort_array(F.collect_set(F.col(tb.ITEM_IDX).cast("int"))), 1, cap).alias(tb.ITEMS)))
        self._history = self.user_items.unionByName(new.select(F.col(tb.USER_IDX).cast("int"), tb.ITEMS)).persist()
        return self._vectors(new)

    def user_factors(self) -> DataFrame:
        """μ of every known user's items, the encoder's mean [latent]."""
        return self._vectors(self.user_items)

    def item_factors(self) -> DataFrame:
        """The decoder's output weights W_3 [n_items, hidden], one row per item: the item side of the last
        layer's dot product (in the decoder's hidden space, not the latent space of ``user_factors``);
        their cosine gives ``similar_items``."""
        if self.module is None:
            raise RecsysError("multvae is not fitted: call fit() or load() first")
        matrix = self.module.item_embeddings().detach().cpu().numpy()
        return matrix_frame(self.user_items.sparkSession, matrix, tb.ITEM_IDX)

    def _vectors(self, histories: DataFrame) -> DataFrame:
        network, block = self._broadcast_network(histories.sparkSession), self.users_per_block

        def encode(batches):
            module = executor_module(network)
            for batch in batches:
                for start in range(0, len(batch), block):
                    part = batch.iloc[start:start + block]
                    items = torch.as_tensor(padded(part[tb.ITEMS].to_numpy()))  # [B, L]
                    mu = module.user_embedding(items).float().numpy()  # [B, latent]
                    yield pd.DataFrame({tb.USER_IDX: part[tb.USER_IDX].to_numpy(), EMBEDDING: list(mu)})

        schema = T.StructType([T.StructField(tb.USER_IDX, T.IntegerType()),
                               T.StructField(EMBEDDING, T.ArrayType(T.FloatType()))])
        return histories.select(tb.USER_IDX, tb.ITEMS).mapInPandas(encode, schema)

    # -- scoring ----------------------------------------------------------------------------------
    def _recommend(self, users, k, seen, exclude_items):
        network = self._broadcast_network(users.sparkSession)
        rows = self.user_items.join(users, tb.USER_IDX, "left_semi")  # (user_idx, items)

        def scores(part: pd.DataFrame) -> np.ndarray:
            module = executor_module(network)
            items = torch.as_tensor(padded(part[tb.ITEMS].to_numpy()))  # [U, L]
            return module.score_all(items).float().numpy()  # [U, n_items]

        return top_k_from_scores(rows, scores, np.arange(self.n_items, dtype=np.int32), k, seen, exclude_items,
                                 self.users_per_block)

    # -- persistence ------------------------------------------------------------------------------
    def _save_extra(self, path: str) -> None:
        self.user_items.write.mode("overwrite").parquet(os.path.join(path, HISTORY_DIR))

    def _load_extra(self, spark: SparkSession, path: str, meta: dict[str, Any]) -> None:
        self._history = spark.read.parquet(os.path.join(path, HISTORY_DIR)).persist()
