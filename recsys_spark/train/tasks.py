"""Training tasks: what the trainer needs to know about one model (the ``TrainTask`` protocol).

A task names the columns the loader delivers (``columns``), builds the module (``build_model``), computes
the loss of a batch with its negatives sampled inside (``loss``) and scores a small in-memory holdout
(``validate``). Tasks hold plain data only (params, counts, numpy arrays), so they pickle to the ranks;
the device is never chosen here: ``loss`` follows the batch, ``validate`` the model's parameters.

Negatives are drawn from a per-device ``torch.Generator``. Its seed comes from ``seed_negatives(seed)``
when the trainer calls it, else from ``params.seed`` and ``torch.initial_seed()``, which the distributed
launcher sets per rank, so ranks draw different negatives and a seeded run repeats.

Defaults are sized for MovieLens-100K (943 users, 1,682 items, 100K interactions; a few thousand items
at most): there, full-softmax cross-entropy over the catalogue costs nothing, so it is SASRec's default
loss (DESIGN section 4: the loss matters more than the architecture).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from recsys_spark import metrics
from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.models.ncf import GMF, MLP, NeuMF
from recsys_spark.models.sasrec import SASRec
from recsys_spark.train import losses, negatives
from recsys_spark.train.distributed import unwrap


class TrainTask(Protocol):
    columns: list[str]  # DataFrame columns the loader delivers as tensors in ``batch``

    def build_model(self) -> nn.Module: ...

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor: ...

    def validate(self, model: nn.Module) -> dict[str, float]: ...


class NCFParams(Section):
    """NCF (He et al. 2017): the network and its loss. Defaults follow the paper's set-up (4 negatives
    per positive) with 16 predictive factors; optimisation lives in the trainer's ``TrainConfig``."""

    model: Literal["gmf", "mlp", "neumf"] = "neumf"
    mf_dim: int = Field(16, gt=0, description="GMF embedding size")
    mlp_layers: list[int] = Field(default_factory=lambda: [64, 32, 16],
                                  description="MLP tower sizes; the first is user + item embedding")
    dropout: float = Field(0.0, ge=0, lt=1, description="after each MLP layer")
    loss: Literal["bce", "bpr"] = "bce"
    n_negatives: int = Field(4, gt=0, description="sampled negatives per positive")
    negatives: Literal["uniform", "popularity"] = "uniform"
    popularity_exponent: float = Field(0.75, ge=0, description="q ∝ count ** exponent")
    weighted: bool = Field(False, description="weigh each positive's loss by its interaction weight")
    seed: int = Field(42, description="negative sampling")

    @model_validator(mode="after")
    def _layers(self) -> NCFParams:
        if not self.mlp_layers or self.mlp_layers[0] % 2 or any(x <= 0 for x in self.mlp_layers):
            raise ValueError("mlp_layers must be positive sizes with an even first one (user + item embedding)")
        return self


class SASRecParams(Section):
    """SASRec (Kang & McAuley 2018). ``max_len`` matches ``interactions.max_sequence_length`` (the model
    sees ``max_len - 1`` inputs in training, the whole sequence at inference); two blocks, one head,
    dropout 0.2 as the paper used on MovieLens-1M, with d = 64."""

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
    def _consistent(self) -> SASRecParams:
        if self.d % self.heads:
            raise ValueError(f"d={self.d} must be divisible by heads={self.heads}")
        if self.negatives == "in_batch" and self.loss != "sampled_softmax":
            raise ValueError("negatives=in_batch needs loss=sampled_softmax")
        return self


@dataclass(frozen=True)
class Holdout:
    """A small validation set kept in memory: one target per row, ranked against the whole catalogue.

    ``inputs``: what the model scores from, user_idx [U] for NCF or left-padded sequences [U, L] for
    SASRec. ``targets`` [U]: the held-out item. ``seen_indptr`` [U + 1], ``seen_items``: a CSR of the items
    filtered from each row's ranking (its train items); the target itself is never filtered.
    """

    inputs: np.ndarray
    targets: np.ndarray
    seen_indptr: np.ndarray
    seen_items: np.ndarray
    k: int = 10

    @classmethod
    def from_lists(cls, inputs: np.ndarray, targets: np.ndarray, seen: Sequence[Sequence[int]],
                   k: int = 10) -> Holdout:
        lengths = np.array([len(s) for s in seen], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        items = np.concatenate([np.asarray(s, dtype=np.int64) for s in seen]) if len(seen) else np.zeros(0, np.int64)
        return cls(np.asarray(inputs), np.asarray(targets, dtype=np.int64), indptr, items, k)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def rank_holdout(score: Callable[[Tensor], Tensor], holdout: Holdout, n_items: int,
                 device: torch.device) -> dict[str, float]:
    """HR@k and NDCG@k of ``holdout`` under ``score`` (inputs [b, ...] -> logits [b, n_items]).

    Seen items are filtered, the rest of the catalogue ranked; ties go to the smaller item_idx (a stable
    sort), as in ``Recommender.recommend``. The per-user formulas are ``recsys_spark.metrics``.
    """
    k, n = holdout.k, len(holdout.targets)
    users_per_block = max(1, (1 << 22) // max(1, n_items))
    hr, ndcg = np.zeros(n), np.zeros(n)
    for start in range(0, n, users_per_block):
        stop = min(start + users_per_block, n)
        scores = score(torch.as_tensor(holdout.inputs[start:stop], device=device)).float()  # [b, n_items]
        lo, hi = holdout.seen_indptr[start], holdout.seen_indptr[stop]
        rows = np.repeat(np.arange(stop - start), np.diff(holdout.seen_indptr[start : stop + 1]))
        cols = holdout.seen_items[lo:hi]
        keep = cols != holdout.targets[start:stop][rows]  # never filter the target itself
        scores[torch.as_tensor(rows[keep], device=device), torch.as_tensor(cols[keep], device=device)] = -torch.inf
        top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].cpu().numpy()  # [b, k]
        for row, (ranked, target) in enumerate(zip(top, holdout.targets[start:stop], strict=True)):
            values = metrics.user_metrics(ranked, [target], ks=[k])
            hr[start + row], ndcg[start + row] = values[metrics.HR][0], values[metrics.NDCG][0]
    return {f"{metrics.HR}@{k}": float(hr.mean()), f"{metrics.NDCG}@{k}": float(ndcg.mean())} if n else {}


class _SamplingTask:
    """Per-device negative generators and the popularity distribution, shared by the tasks."""

    def __init__(self, seed: int, n_items: int, item_counts: np.ndarray | None, exponent: float,
                 holdout: Holdout | None) -> None:
        if item_counts is not None and len(item_counts) != n_items:
            raise ValueError(f"item_counts has {len(item_counts)} entries for {n_items} items")
        self.seed, self.n_items, self.holdout = seed, n_items, holdout
        self.item_counts = None if item_counts is None else np.asarray(item_counts, dtype=np.float64)
        self.exponent = exponent
        self._negative_seed: int | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._probs: dict[torch.device, Tensor] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_generators"], state["_probs"] = {}, {}  # rebuilt on the rank's device
        return state

    def seed_negatives(self, seed: int) -> None:
        """Fix the negatives' stream (e.g. ``rank_seed(seed, rank)``); resets the generators."""
        self._negative_seed, self._generators = seed, {}

    def generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device not in self._generators:
            seed = self._negative_seed
            if seed is None:
                seed = int(np.random.SeedSequence([self.seed, torch.initial_seed()]).generate_state(1)[0])
            self._generators[device] = torch.Generator(device=device).manual_seed(seed)
        return self._generators[device]

    def probs(self, device: torch.device) -> Tensor:
        """Popularity sampling distribution [n_items] (``negatives.popularity_probs``) on ``device``."""
        if self.item_counts is None:
            raise ValueError("popularity negatives need item_counts (train interactions per item)")
        if device not in self._probs:
            self._probs[device] = negatives.popularity_probs(self.item_counts, self.exponent).to(device)
        return self._probs[device]

    def sample(self, kind: str, shape: tuple[int, ...], device: torch.device,
               positives: Tensor | None = None) -> negatives.Negatives:
        g = self.generator(device)
        if kind == "popularity":
            return negatives.popularity(self.probs(device), shape, g, positives=positives)
        return negatives.uniform(self.n_items, shape, g, positives=positives)

    def holdout_scores(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """Scores of the whole catalogue for hold-out inputs [U, ...] -> [U, n_items]: the model's
        ``score_all`` (users for NCF, sequences for SASRec); DeepFM scores its query blocks itself."""
        return model.score_all(inputs.long())

    def validate(self, model: nn.Module) -> dict[str, float]:
        """HR/NDCG@k of the hold-out over the whole catalogue."""
        if self.holdout is None:
            return {}
        inner = unwrap(model)
        with evaluating(inner):
            return rank_holdout(lambda inputs: self.holdout_scores(inner, inputs), self.holdout, self.n_items,
                                model_device(inner))


class NCFTask(_SamplingTask):
    """GMF, MLP or NeuMF on (user_idx, item_idx, weight) rows, n sampled negatives per positive."""

    columns = [tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT]

    def __init__(self, params: NCFParams, n_users: int, n_items: int, item_counts: np.ndarray | None = None,
                 holdout: Holdout | None = None) -> None:
        super().__init__(params.seed, n_items, item_counts, params.popularity_exponent, holdout)
        self.params, self.n_users = params, n_users

    def build_model(self) -> nn.Module:
        p = self.params
        with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank, global RNG untouched
            torch.manual_seed(p.seed)
            if p.model == "gmf":
                return GMF(self.n_users, self.n_items, dim=p.mf_dim)
            if p.model == "mlp":
                return MLP(self.n_users, self.n_items, layers=p.mlp_layers, dropout=p.dropout)
            return NeuMF(self.n_users, self.n_items, mf_dim=p.mf_dim, layers=p.mlp_layers, dropout=p.dropout)

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


class SASRecTask(_SamplingTask):
    """SASRec on left-padded sequences (``items`` [B, L], PAD_IDX = -1): input ``seq[:, :-1]``, target
    ``seq[:, 1:]``; positions whose input or target is padding are left out of the loss."""

    columns = [tb.ITEMS]

    def __init__(self, params: SASRecParams, n_items: int, item_counts: np.ndarray | None = None,
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
