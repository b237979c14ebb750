"""SASRec (Kang & McAuley 2018): causal self-attention over each user's time-ordered history.

The network is ``recsys_spark.nn.sasrec``. Training (:class:`SASRecTask`): each user's train items in
time order (first interaction), cut from the end into windows of ``max_len + 1`` that overlap by one
item, so every transition of the history is trained on once and all ``max_len`` input positions that
inference reads are trained (as the reference implementations do); every
position predicts the next item, with full-softmax cross-entropy (default), the paper's one-negative
BCE, or a sampled softmax. Inference reads each user's last ``max_len`` items.
Validation: each of ``validation_users`` users' latest train item is held out; the sequence before it
ranks the whole catalogue, the user's other train items filtered. Recommending encodes each user's
sequence on the executors (the last position's hidden state) and takes the dot product with the item
embeddings (the output layer), so the embedding tables hold exactly what ranks. :class:`SASRecScorer`
is the same network on the session protocol (``recsys_spark.evaluate.sessions``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from pyspark.sql import DataFrame
from torch import Tensor, nn

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.sequences import user_sequences
from recsys_spark.data.session_batches import PAD, SessionData
from recsys_spark.evaluate.sessions import ModuleScorer, ScoreFn, next_item_metrics
from recsys_spark.models.sequence_base import SequenceRecommender
from recsys_spark.models.torch_base import TorchParams
from recsys_spark.nn.sasrec import SASRec
from recsys_spark.scoring import matrix_frame
from recsys_spark.train import losses, negatives
from recsys_spark.train.distributed import unwrap
from recsys_spark.train.task import Holdout, SampledTask, evaluating
from recsys_spark.train.trainer import TrainConfig


class SASRecNetParams(Section):
    """The network and its loss. ``max_len`` matches ``interactions.max_sequence_length``: the network
    reads ``max_len`` items, in training (rows of ``max_len + 1``) as at inference; two blocks, one head,
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
    ``seq[:, 1:]``; positions whose input or target is padding are left out of the loss.

    Validation: ``holdout`` (each user's held-out next item, HR/NDCG@10), or ``holdout_sessions`` (whole
    sequences, the next-item protocol at 10 and 20, as the session protocol scores them)."""

    columns = [tb.ITEMS]

    def __init__(self, params: SASRecNetParams, n_items: int, item_counts: np.ndarray | None = None,
                 holdout: Holdout | None = None, holdout_sessions: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__(params.seed, n_items, item_counts, params.popularity_exponent, holdout)
        self.params = params
        self.holdout_sessions = None if holdout_sessions is None else SessionData.from_lists(holdout_sessions)

    def validate(self, model: nn.Module) -> dict[str, float]:
        if self.holdout_sessions is None:
            return super().validate(model)
        inner = unwrap(model)
        with evaluating(inner):
            scorer = SASRecScorer.from_model(inner, live=True)
            values = next_item_metrics(scorer.start(256), self.holdout_sessions, ks=[10, 20])
        return {key: v for key, v in values.items() if "@" in key}

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
    train: TrainConfig = TrainConfig(epochs=300, batch_size=128, lr=0.001, optimizer="adam", schedule="constant",
                                     early_stopping_metric="ndcg@10", patience=5, validate_every_steps=100)


class SASRecRecommender(SequenceRecommender):
    """SASRec over each user's train sequence; recommends from the representation of the last position
    (see ``models.sequence_base`` for the user and session levels)."""

    name = "sasrec"
    network = SASRec
    params_class = SASRecParams

    def max_length(self) -> int:
        return self.params.net.max_len

    def window_length(self) -> int:
        """``max_len + 1``: a row's first ``max_len`` items are the inputs and every one predicts the item
        after it, so training fills all ``max_len`` positions that inference reads (as the reference
        implementations cut their windows)."""
        return self.params.net.max_len + 1

    def _user_holdout(self, train: DataFrame):
        # The hold-out's "latest" item is the last of the sequence: both order by first interaction.
        fit_rows, held = self._hold_out_last(train, order=tb.FIRST_TS)
        holdout = None
        if held is not None:
            users = fit_rows.sparkSession.createDataFrame(held[[tb.USER_IDX]].astype("int32"))
            inputs = (user_sequences(fit_rows, self.max_length()).join(users, tb.USER_IDX)
                      .orderBy(tb.USER_IDX).toPandas())  # the last max_len items before the held-out one
            held = held[held[tb.USER_IDX].isin(inputs[tb.USER_IDX])].reset_index(drop=True)
            holdout = self._holdout(np.stack(inputs[tb.ITEMS].to_numpy()).astype(np.int64), held)
        return self._user_rows(fit_rows).select(tb.ITEMS), holdout

    def _task(self, item_counts, holdout):
        if isinstance(holdout, Holdout) or holdout is None:
            return SASRecTask(self.params.net, self.n_items, item_counts, holdout)
        return SASRecTask(self.params.net, self.n_items, item_counts, holdout_sessions=holdout)

    def scorer(self) -> SASRecScorer:
        return SASRecScorer(self.snapshot())

    def item_factors(self) -> DataFrame:
        return matrix_frame(self._users.sparkSession, self.module.item_embeddings().detach().cpu().numpy(),
                            tb.ITEM_IDX)


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
