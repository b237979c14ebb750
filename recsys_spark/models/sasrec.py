"""SASRec (Kang & McAuley 2018): causal self-attention over each user's time-ordered history.

The network is ``recsys_spark.nn.sasrec``. Training (:class:`SASRecTask`): each user's train items in
time order (first interaction), the last ``max_len``, left-padded; every position predicts the next item,
with full-softmax cross-entropy (default), the paper's one-negative BCE, or a sampled softmax.
Validation: each of ``validation_users`` users' latest train item is held out; the sequence before it
ranks the whole catalogue, the user's other train items filtered. Recommending encodes each user's
sequence on the executors (the last position's hidden state) and takes the dot product with the item
embeddings (the output layer), so the embedding tables hold exactly what ranks. :class:`SASRecScorer`
is the same network on the session protocol (``recsys_spark.evaluate.sessions``).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from pyspark.sql import DataFrame, SparkSession
from torch import Tensor, nn

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.sequences import user_sequences
from recsys_spark.data.session_batches import PAD
from recsys_spark.evaluate.sessions import ModuleScorer, ScoreFn
from recsys_spark.models.torch_base import TorchParams, TorchRecommender
from recsys_spark.nn.sasrec import SASRec
from recsys_spark.scoring import matrix_frame, sequence_vectors, top_k_from_factors
from recsys_spark.tables import require_columns
from recsys_spark.train import losses, negatives
from recsys_spark.train.distributed import unwrap
from recsys_spark.train.task import Holdout, SampledTask
from recsys_spark.train.trainer import TrainConfig

SEQUENCES_DIR = "sequences"


class SASRecNetParams(Section):
    """The network and its loss. ``max_len`` matches ``interactions.max_sequence_length`` (the network
    sees ``max_len - 1`` inputs in training, the whole sequence at inference); two blocks, one head,
    dropout 0.2 as the paper used on MovieLens-1M, with d = 64. Full-softmax cross-entropy by default:
    on catalogues of a few thousand items it costs little, and the loss matters more than the
    architecture (Klenitskiy & Vasilev, RecSys 2023)."""

    max_len: int = Field(50, ge=2)
    d: int = Field(64, gt=0)
    heads: int = Field(1, gt=0)
    blocks: int = Field(2, gt=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    loss: Literal["ce", "bce", "sampled_softmax"] = "ce"
    n_negatives: int = Field(256, gt=0, description="sampled_softmax: negatives shared by the batch")
    negatives: Literal["uniform", "popularity", "in_batch"] = Field(
        "uniform", description="in_batch: the batch's other targets, only with sampled_softmax"
    )
    popularity_exponent: float = Field(0.75, ge=0)
    seed: int = 42

    @model_validator(mode="after")
    def _consistent(self) -> SASRecNetParams:
        if self.d % self.heads:
            raise ValueError(f"d={self.d} must be divisible by heads={self.heads}")
        if self.negatives == "in_batch" and self.loss != "sampled_softmax":
            raise ValueError("negatives=in_batch needs loss=sampled_softmax")
        return self


class SASRecTask(SampledTask):
    """SASRec on left-padded sequences (``items`` [B, L], PAD_IDX = -1): input ``seq[:, :-1]``, target
    ``seq[:, 1:]``; positions whose input or target is padding are left out of the loss."""

    columns = [tb.ITEMS]

    def __init__(self, params: SASRecNetParams, n_items: int, item_counts: np.ndarray | None = None,
                 holdout: Holdout | None = None) -> None:
        super().__init__(params.seed, n_items, item_counts, params.popularity_exponent, holdout)
        self.params = params

    def build_model(self) -> nn.Module:
        p = self.params
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            return SASRec(self.n_items, max_len=p.max_len, d=p.d, heads=p.heads, blocks=p.blocks,
                          dropout=p.dropout)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        seq = batch[tb.ITEMS].long()  # [B, L]
        inputs, targets = seq[:, :-1], seq[:, 1:]  # [B, L-1] each: position t predicts item t + 1
        valid = (inputs != tb.PAD_IDX) & (targets != tb.PAD_IDX)  # [B, L-1]
        hidden = model(inputs)[valid]  # [N, d], N real (input, target) pairs
        target = targets[valid]  # [N]
        inner = unwrap(model)
        if self.params.loss == "ce":
            return losses.full_softmax_ce(inner.logits(hidden), target)  # logits [N, n_items]
        emb = inner.item_embeddings()  # [n_items, d], shared with the input embedding
        pos_logits = (hidden * emb[target]).sum(-1)  # [N]
        if self.params.loss == "bce":  # the paper's loss: one negative per position
            neg = self.sample(self.params.negatives, tuple(target.shape), seq.device, positives=target)  # [N]
            return losses.bce_sampled(pos_logits, (hidden * emb[neg.items]).sum(-1))
        if self.params.negatives == "in_batch":  # the other targets of the batch, masked where equal
            neg = negatives.in_batch(target, self.probs(seq.device) if self.item_counts is not None else None)
            pos_log_q = None if neg.log_q is None else torch.log(self.probs(seq.device)[target])
            return losses.sampled_softmax(pos_logits, hidden @ emb[target].T, neg.log_q, pos_log_q, neg.mask)
        # m negatives shared by the whole batch (one [N, d] x [d, m] product); accidental hits masked.
        neg = self.sample(self.params.negatives, (self.params.n_negatives,), seq.device)  # [m]
        neg_logits = hidden @ emb[neg.items].T  # [N, m]
        hits = neg.items.unsqueeze(0) == target.unsqueeze(1)  # [N, m]
        return losses.sampled_softmax(pos_logits, neg_logits, neg_log_q=neg.log_q, neg_mask=~hits)


class SASRecParams(TorchParams):
    """Hyper-parameters of ``sasrec`` (``conf/models/sasrec.yaml``)."""

    net: SASRecNetParams = SASRecNetParams()
    train: TrainConfig = TrainConfig(epochs=200, batch_size=128, lr=0.001, optimizer="adam", schedule="constant",
                                     early_stopping_metric="ndcg@10", patience=10)


class SASRecRecommender(TorchRecommender):
    """SASRec over each user's train sequence; recommends from the representation of the last position."""

    name = "sasrec"
    network = SASRec
    params_class = SASRecParams

    def __init__(self, params: SASRecParams | None = None) -> None:
        super().__init__(params)
        self._sequences: DataFrame | None = None  # (user_idx, items, length) of the whole train split

    def _fit(self, train: DataFrame) -> None:
        require_columns(train, [tb.FIRST_TS], "sasrec training data")
        self._sequences = user_sequences(train, self.params.net.max_len).localCheckpoint()
        super()._fit(train)

    def _training_data(self, train: DataFrame):
        # The hold-out's "latest" item is the last of the sequence: both order by first interaction.
        fit_rows, held = self._hold_out_last(train, order=tb.FIRST_TS)
        sequences = user_sequences(fit_rows, self.params.net.max_len)
        holdout = None
        if held is not None:
            users = fit_rows.sparkSession.createDataFrame(held[[tb.USER_IDX]].astype("int32"))
            inputs = sequences.join(users, tb.USER_IDX).orderBy(tb.USER_IDX).toPandas()  # before the target
            held = held[held[tb.USER_IDX].isin(inputs[tb.USER_IDX])].reset_index(drop=True)
            holdout = self._holdout(np.stack(inputs[tb.ITEMS].to_numpy()).astype(np.int64), held)
        return sequences.select(tb.ITEMS), holdout

    def _task(self, item_counts, holdout):
        return SASRecTask(self.params.net, self.n_items, item_counts, holdout)

    def _user_vectors(self, users: DataFrame) -> DataFrame:
        """(user_idx, embedding): the last position's hidden state over each user's sequence."""
        return sequence_vectors(self._sequences, users, self._broadcast_network(users.sparkSession),
                                self.users_per_block)

    def user_factors(self) -> DataFrame:
        return self._user_vectors(self._users)

    def item_factors(self) -> DataFrame:
        return matrix_frame(self._users.sparkSession, self.module.item_embeddings().detach().cpu().numpy(),
                            tb.ITEM_IDX)

    def _recommend(self, users, k, seen, exclude_items):
        return top_k_from_factors(self._user_vectors(users), self.item_factors(), k, seen, exclude_items,
                                  self.users_per_block)

    def _save_extra(self, path: str) -> None:
        self._sequences.write.mode("overwrite").parquet(os.path.join(path, SEQUENCES_DIR))

    def _load_extra(self, spark: SparkSession, path: str, meta: dict[str, Any]) -> None:
        self._sequences = spark.read.parquet(os.path.join(path, SEQUENCES_DIR))


class SASRecScorer(ModuleScorer):
    """A trained SASRec as a scorer. Each row keeps the last ``max_len`` items its session has read
    (cleared where the row starts a new session); a query is scored as ``SASRecRecommender`` and
    ``SASRecTask`` do: the left-padded sequence (PAD = -1, the most recent item last) through the
    module, the last position's hidden state dotted with every item embedding. Only the rows that read
    an item are run (idle rows score 0), over the widest of their histories: leading columns that are
    padding in every row are dropped, which does not change the output (positions are right-aligned,
    padding is masked)."""

    def start(self, batch_size: int) -> ScoreFn:
        import torch

        model = self.model()
        device = self.device
        max_len = int(model.max_len)
        state = {"seq": np.full((batch_size, max_len), PAD, dtype=np.int64),  # [B, max_len], left-padded
                 "length": np.zeros(batch_size, dtype=np.int64)}  # [B] items held per row

        @torch.no_grad()
        def score(inputs: np.ndarray, reset: np.ndarray) -> np.ndarray:
            inputs, reset = np.asarray(inputs, dtype=np.int64), np.asarray(reset, dtype=bool)
            n = len(inputs)
            if n > len(state["length"]):  # more rows than announced: grow, new rows empty
                extra = n - len(state["length"])
                state["seq"] = np.vstack([state["seq"], np.full((extra, max_len), PAD, dtype=np.int64)])
                state["length"] = np.concatenate([state["length"], np.zeros(extra, dtype=np.int64)])
            seq, length = state["seq"][:n], state["length"][:n]  # views
            seq[reset], length[reset] = PAD, 0
            rows = np.flatnonzero(inputs >= 0)
            seq[rows, :-1] = seq[rows, 1:]  # shift left, append the new item
            seq[rows, -1] = inputs[rows]
            length[rows] = np.minimum(length[rows] + 1, max_len)
            out = np.zeros((n, self.n_items), dtype=np.float32)
            if len(rows):
                width = int(length[rows].max())
                batch = torch.from_numpy(np.ascontiguousarray(seq[rows, max_len - width:])).to(device)
                out[rows] = model.score_all(batch).float().cpu().numpy()  # [b, n_items]
            return out

        return score
