"""Training tasks for DeepFM (side features) and GRU4Rec (sessions): the ``TrainTask`` protocol of
``recsys_spark.train.tasks``, plus the one-process session-parallel loop of the GRU4Rec paper.

DeepFM batch layout (``DeepFMTask.columns``): ``user_idx`` int, ``item_idx`` int and ``fields``
array<int> of fixed length F, one positive (user, item) pair per row, as ``features.deepfm_frame``
builds it: the query block (user fields, then context fields) followed by the item block, in
``FeatureSpec.fields`` order. Negatives are items drawn inside ``loss`` (uniform or popularity); the
task holds the item block of every item (``item_fields`` [n_items, Fi], from
``features.item_field_matrix``) and swaps it in for the positive's, keeping the query block. With
``id_dropout`` > 0 a row's user is made cold with that probability (its id and the fields that grow
with use, ``FeatureSpec.history_fields``, read 0 = unknown, for the positive and its negatives alike),
and each item's id independently: the model also learns to score from side features alone, which is
exactly what a cold user or item gets at inference.

GRU4Rec batch layout (``GRU4RecTask.columns``): ``items`` array<int> of fixed length L, one whole session
per row, padded with PAD (-1) (``evaluate_sessions.session_item_arrays(..., max_length=L)``). The
trainer's batch of R sessions is one optimiser step: ``loss`` runs the session-parallel iteration
(``session_batches``) over those R sessions with ``parallel`` rows, scoring each step's targets against
the step's other targets plus ``n_sample`` shared popularity-sampled negatives, and returns the mean
loss over all R sessions' events. The hidden state is detached between steps by default
(``truncate_bptt``: one-step back-propagation through time, as the official implementation); the
gradient is then the mean of the steps' gradients. The paper's own schedule, one update per
session-parallel step, is :func:`fit_session_parallel` (one process; what ``scripts/bench_sessions.py``
runs).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.features import FeatureSpec
from recsys_spark.models import gru4rec as g4r
from recsys_spark.models.deepfm import DeepFM
from recsys_spark.train import losses
from recsys_spark.train.distributed import unwrap
from recsys_spark.train.session_batches import SessionData, SessionParallelBatches, Step, sessions_from_padded
from recsys_spark.train.tasks import Holdout, _SamplingTask, evaluating, model_device

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ DeepFM


class DeepFMParams(Section):
    """DeepFM (Guo et al. 2017). The paper's network: 3 ReLU layers of 200-400 units, embedding size 10,
    dropout 0.5 on Criteo; on data the size of MovieLens-100K a smaller tower overfits less."""

    dim: int = Field(10, gt=0, description="embedding size k, shared by FM and the deep part")
    hidden: list[int] = Field(default_factory=lambda: [200, 200, 200])
    dropout: float = Field(0.2, ge=0, lt=1)
    loss: Literal["bce", "bpr"] = "bce"
    n_negatives: int = Field(4, gt=0, description="sampled negatives per positive")
    negatives: Literal["uniform", "popularity"] = "uniform"
    popularity_exponent: float = Field(0.75, ge=0)
    id_dropout: float = Field(0.1, ge=0, lt=1, description="share of rows whose id fields read as unknown")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(256, gt=0)
    epochs: int = Field(20, gt=0)
    seed: int = 42

    @model_validator(mode="after")
    def _layers(self) -> DeepFMParams:
        if any(h <= 0 for h in self.hidden):
            raise ValueError("hidden layer sizes must be positive")
        return self


class DeepFMTask(_SamplingTask):
    """DeepFM on (user_idx, item_idx, fields) positives, n sampled negatives per positive, BCE (or BPR).

    ``holdout.inputs`` are query blocks [U, Fq] (``features.query_frame``), ranked against the catalogue.
    """

    columns = [tb.USER_IDX, tb.ITEM_IDX, tb.FIELDS]

    def __init__(self, params: DeepFMParams, spec: FeatureSpec, item_fields: np.ndarray,
                 item_counts: np.ndarray | None = None, holdout: Holdout | None = None) -> None:
        item_fields = np.asarray(item_fields, dtype=np.int64)
        if item_fields.ndim != 2 or item_fields.shape[1] != len(spec.item_fields):
            raise ValueError(f"item_fields must be [n_items, {len(spec.item_fields)}], got {item_fields.shape}")
        super().__init__(params.seed, item_fields.shape[0], item_counts, params.popularity_exponent, holdout)
        self.params, self.spec, self.item_fields = params, spec, item_fields
        self.cold_user_positions = spec.positions(spec.history_fields)
        self.item_id_positions = spec.positions([tb.ITEM_IDX])
        self._item_tables: dict[torch.device, Tensor] = {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_item_tables"] = {}
        return state

    @property
    def model_args(self) -> dict:
        p = self.params
        return {"cardinalities": self.spec.sizes, "n_numeric": len(self.spec.numeric), "dim": p.dim,
                "hidden": list(p.hidden), "dropout": p.dropout}

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params.seed)
            return DeepFM(**self.model_args)

    def items_on(self, device: torch.device) -> Tensor:
        """The item blocks of all items on ``device`` [n_items, Fi] (moved once per device)."""
        device = torch.device(device)
        if device not in self._item_tables:
            self._item_tables[device] = torch.as_tensor(self.item_fields, device=device)
        return self._item_tables[device]

    def _make_cold(self, rows: Tensor) -> Tensor:
        """rows [B, 1 + n, F] with, at rate ``id_dropout``, each group's user made cold (its history
        fields 0 in all 1 + n rows) and each row's item id 0."""
        p = self.params.id_dropout
        if p <= 0:
            return rows
        g = self.generator(rows.device)
        rows = rows.clone()
        cold_user = torch.rand(rows.shape[0], 1, 1, generator=g, device=rows.device) < p  # [B, 1, 1]
        users = rows[..., self.cold_user_positions]  # [B, 1 + n, Pu]
        rows[..., self.cold_user_positions] = torch.where(cold_user, torch.zeros_like(users), users)
        cold_item = torch.rand(rows.shape[:2] + (1,), generator=g, device=rows.device) < p  # [B, 1 + n, 1]
        items = rows[..., self.item_id_positions]  # [B, 1 + n, Pi]
        rows[..., self.item_id_positions] = torch.where(cold_item, torch.zeros_like(items), items)
        return rows

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

    @torch.no_grad()
    def score_candidates(self, model: nn.Module, query: Tensor, candidates: Tensor) -> Tensor:
        """Re-rank another model's top-N: query blocks [U, Fq], candidate item indices [U, C] -> logits [U, C]."""
        inner = unwrap(model)
        items = self.items_on(query.device)[candidates.long()]  # [U, C, Fi]
        return inner.score_items(query.long(), items)

    @torch.no_grad()
    def score_all(self, model: nn.Module, query: Tensor, max_rows: int = 1 << 18) -> Tensor:
        """Every item for each query block: [U, Fq] -> logits [U, n_items], by blocks of items so that at
        most ``max_rows`` (query, item) rows run at once. For small catalogues (every pair goes through
        the MLP); large ones re-rank candidates with :meth:`score_candidates`."""
        inner = unwrap(model)
        table = self.items_on(query.device)
        block = max(1, max_rows // max(1, query.shape[0]))
        parts = [inner.score_items(query.long(), table[start:start + block])
                 for start in range(0, self.n_items, block)]
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def recommend(self, model: nn.Module, query: Tensor, k: int,
                  exclude: Sequence[Sequence[int]] | None = None) -> tuple[Tensor, Tensor]:
        """Top-k (items [U, k], logits [U, k]) for query blocks [U, Fq], e.g. cold users' (id 0) features;
        ``exclude[u]`` lists items not to recommend to row u. Ties go to the smaller item index."""
        scores = self.score_all(model, query).float()  # [U, n_items]
        for row, items in enumerate(exclude or []):
            if len(items):
                scores[row, torch.as_tensor(list(items), device=scores.device)] = -torch.inf
        top = torch.sort(scores, dim=1, descending=True, stable=True)
        return top.indices[:, :k], top.values[:, :k]

    def holdout_scores(self, model: nn.Module, inputs: Tensor) -> Tensor:
        return self.score_all(model, inputs)  # inputs: the hold-out users' query blocks [U, Fq]


# ----------------------------------------------------------------------------------------------- GRU4Rec


class GRU4RecParams(Section):
    """GRU4Rec (Hidasi et al. 2016; Hidasi & Karatzoglou 2018). Defaults follow the official
    implementation's best cross-entropy set-up on RSC15 (Yoochoose) with 100 units: constrained
    embedding, batch 32, hidden dropout 0.4, 2048 sampled negatives with alpha 0.5, log-Q correction 1.
    For BPR-max its parameter files use ELU 0.5 on the scores and a score regulariser of about 1-2."""

    hidden: int = Field(100, gt=0)
    layers: int = Field(1, gt=0)
    embedding: int = Field(0, ge=0, description="input embedding size; 0 = hidden (one-hot-equivalent)")
    constrained: bool = Field(True, description="input embedding = output item embedding")
    dropout_embed: float = Field(0.0, ge=0, lt=1)
    dropout_hidden: float = Field(0.4, ge=0, lt=1)
    loss: Literal["ce", "bpr-max", "top1-max"] = "ce"
    parallel: int = Field(32, gt=0, description="session-parallel rows (the paper's mini-batch size)")
    n_sample: int = Field(2048, ge=0, description="extra negatives per step, shared by its rows")
    sample_alpha: float = Field(0.5, ge=0, le=1, description="negatives ∝ count ** alpha")
    logq: float = Field(1.0, ge=0, description="ce only: weight of the log-Q sampling correction")
    bpreg: float = Field(1.0, ge=0, description="bpr-max only: score regularisation λ")
    elu_param: float = Field(0.0, ge=0, description="ELU alpha on scores before bpr-max; 0 = none")
    truncate_bptt: bool = Field(True, description="detach the hidden state after every step")
    # The optimiser of fit_session_parallel (the paper's schedule); the trainer path takes TrainConfig's.
    optimizer: Literal["adagrad", "adam"] = "adagrad"
    lr: float = Field(0.2, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="adagrad only")
    # The trainer path: sessions per batch (TrainConfig.batch_size). 64 with Adam at lr 0.005 matched the
    # paper's schedule on a Yoochoose validation split (scripts/bench_sessions.py).
    batch_sessions: int = Field(64, gt=0, description="sessions per trainer batch (TrainTask path)")
    max_length: int = Field(50, ge=2, description="items kept per session in the fixed-length column")
    epochs: int = Field(10, gt=0)
    seed: int = 42


class AdagradM(torch.optim.Optimizer):
    """Adagrad with momentum, the optimiser of the official GRU4Rec: the accumulator G += g², the step
    v = μ v - lr g / sqrt(G + ε), θ += v (μ = 0 is plain Adagrad with ε inside the square root)."""

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["acc"] = torch.zeros_like(p)
                    state["velocity"] = torch.zeros_like(p)
                state["acc"].add_(p.grad.pow(2))
                update = p.grad / (state["acc"] + group["eps"]).sqrt()
                state["velocity"].mul_(group["momentum"]).sub_(update, alpha=group["lr"])
                p.add_(state["velocity"])


def make_gru4rec_optimizer(model: nn.Module, params: GRU4RecParams) -> torch.optim.Optimizer:
    if params.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=params.lr)
    return AdagradM(model.parameters(), lr=params.lr, momentum=params.momentum)


class GRU4RecTask(_SamplingTask):
    """GRU4Rec on whole sessions (``items`` [R, L], PAD = -1); see the module docstring for the layout.

    ``holdout_sessions`` (item lists) are scored with the next-item protocol (Recall@20, MRR@20).
    ``loss`` steps the GRU through ``forward_step``, not ``forward`` (``ddp_forward = False``): under the
    ``torch`` backend the model is not wrapped in DDP and the optimizer averages the gradients instead.
    """

    columns = [tb.ITEMS]
    ddp_forward = False

    def __init__(self, params: GRU4RecParams, n_items: int, item_counts: np.ndarray | None = None,
                 holdout_sessions: Sequence[Sequence[int]] | None = None, k: int = 20) -> None:
        if params.n_sample > 0 and item_counts is None:
            raise ValueError("sampled negatives (n_sample > 0) need item_counts")
        super().__init__(params.seed, n_items, item_counts, params.sample_alpha, None)
        self.params, self.k = params, k
        self._counts: dict[torch.device, Tensor] = {}
        self.holdout_sessions = None if holdout_sessions is None else SessionData.from_lists(holdout_sessions)

    @property
    def model_args(self) -> dict:
        p = self.params
        return {"n_items": self.n_items, "hidden": p.hidden, "layers": p.layers, "embedding": p.embedding,
                "constrained": p.constrained, "dropout_embed": p.dropout_embed, "dropout_hidden": p.dropout_hidden}

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params.seed)
            return g4r.GRU4Rec(**self.model_args)

    def step_loss(self, model: nn.Module, step: Step | tuple[Tensor, Tensor, Tensor, Tensor],
                  hidden: Tensor | None) -> tuple[Tensor, Tensor, int]:
        """The loss of one session-parallel step: (mean loss over its active rows, new hidden, #events).

        Candidates: the active rows' targets (row i's target in column i) then ``n_sample`` negatives
        drawn ∝ count ** alpha for the whole step; accidental hits (a candidate equal to the row's
        target off the diagonal) are masked out.
        """
        p = self.params
        inputs, targets, reset, active = (torch.as_tensor(x) for x in step)
        device = model_device(model)
        inputs, targets, reset, active = (x.to(device) for x in (inputs, targets, reset, active))
        out, hidden = model.forward_step(inputs, hidden, reset)  # [B, H], [layers, B, H]
        rows = active.nonzero().squeeze(1)  # [b]
        target = targets[rows]  # [b]
        candidates, log_q = target, None
        if p.n_sample > 0:
            sample = self.sample("popularity", (p.n_sample,), device)  # items [S]
            candidates = torch.cat([target, sample.items])  # [b + S]
        if p.loss == "ce" and p.logq > 0 and self.item_counts is not None:
            log_q = p.logq * self._log_expected_draws(candidates, len(target), device)  # [b + S]
        scores = unwrap(model).scores(out[rows], candidates)  # [b, b + S]
        mask = candidates.unsqueeze(0) != target.unsqueeze(1)  # [b, b + S], True = usable negative
        if p.loss == "ce":
            loss = g4r.cross_entropy(scores, mask, log_q)
        elif p.loss == "bpr-max":
            loss = g4r.bpr_max(g4r.elu_scores(scores, p.elu_param), mask, reg=p.bpreg)
        else:
            loss = g4r.top1_max(scores, mask)
        if p.truncate_bptt:
            hidden = hidden.detach()
        return loss, hidden, int(rows.numel())

    def _log_expected_draws(self, items: Tensor, n_targets: int, device: torch.device) -> Tensor:
        """log E[times item j is a candidate] = log(b·c_j/Σc + S·q_j): the step's b targets arrive in
        proportion to the counts c (they are the data), its S samples with q ∝ c ** alpha. Subtracting it
        from the scores is the log-Q correction of sampled softmax, for both kinds of candidates alike."""
        counts = self._counts_on(device)
        expected = n_targets * counts[items] / counts.sum()
        if self.params.n_sample > 0:
            expected = expected + self.params.n_sample * self.probs(device)[items]
        return torch.log(expected)

    def _counts_on(self, device: torch.device) -> Tensor:
        device = torch.device(device)
        if device not in self._counts:
            self._counts[device] = torch.as_tensor(self.item_counts, dtype=torch.float32, device=device)
        return self._counts[device]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_counts"] = {}
        return state

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        sessions = sessions_from_padded(batch[tb.ITEMS].cpu().numpy())
        total, events, hidden = None, 0, None
        for step in SessionParallelBatches(sessions, self.params.parallel):
            loss, hidden, n = self.step_loss(model, step, hidden)
            total = loss * n if total is None else total + loss * n
            events += n
        if total is None:  # no session with two items in this batch: a zero loss with a gradient path
            return sum(p.sum() for p in model.parameters()) * 0.0
        return total / events

    def validate(self, model: nn.Module) -> dict[str, float]:
        if self.holdout_sessions is None:
            return {}
        from recsys_spark.evaluate_sessions import GRU4RecScorer, next_item_metrics

        inner = unwrap(model)
        with evaluating(inner):
            scorer = GRU4RecScorer.from_model(inner, live=True)
            values = next_item_metrics(scorer.start(256), self.holdout_sessions, ks=[self.k])
        return {key: v for key, v in values.items() if "@" in key}


def fit_session_parallel(task: GRU4RecTask, sessions: SessionData | Sequence[Sequence[int]], epochs: int | None = None,
                         model: nn.Module | None = None, device: str | torch.device = "cpu",
                         shuffle: bool = False) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train GRU4Rec the paper's way in one process: one optimiser step per session-parallel step.

    Sessions are read in the given order (time order of their starts, as in the paper), or shuffled per
    epoch. Returns the model and one row per epoch: mean loss per event, events/s, seconds and the
    task's validation metrics. Raises ``FloatingPointError`` when the loss is not finite.
    """
    p = task.params
    data = sessions if isinstance(sessions, SessionData) else SessionData.from_lists(sessions)
    model = (model or task.build_model()).to(device)
    optimizer = make_gru4rec_optimizer(model, p)
    task.seed_negatives(p.seed)
    batches = SessionParallelBatches(data, p.parallel, shuffle=shuffle, seed=p.seed)
    history = []
    for epoch in range(epochs or p.epochs):
        model.train()
        started, loss_sum, events, hidden = time.perf_counter(), 0.0, 0, None
        for step in batches:
            optimizer.zero_grad()
            loss, hidden, n = task.step_loss(model, step, hidden)
            loss.backward()
            optimizer.step()
            hidden = hidden.detach()
            loss_sum += float(loss.detach()) * n
            events += n
        seconds = time.perf_counter() - started
        mean = loss_sum / max(events, 1)
        if not math.isfinite(mean):
            raise FloatingPointError(f"GRU4Rec loss is {mean} in epoch {epoch + 1}")
        row = {"epoch": epoch + 1, "loss": mean, "events_per_s": events / seconds, "seconds": seconds}
        row.update(task.validate(model))
        history.append(row)
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items() if k != "epoch"})
    return model, history
