"""GRU4Rec (Hidasi et al. 2016; Hidasi & Karatzoglou 2018): a recurrent network over sessions, or over each
user's whole history read as one long session.

The network and its losses (cross-entropy with log-Q correction, BPR-max, TOP1-max) are
``recsys_spark.nn.gru4rec``. Batch layout of :class:`GRU4RecTask`: ``items`` array<int> of fixed length L,
one whole session per row, padded with PAD (-1) (``data.sequences.session_item_arrays(..., max_length=L)``
or ``user_sequences``). The trainer's batch of R sessions is one optimiser step: ``loss`` runs the
session-parallel iteration (``data.session_batches``) over those R sessions with ``parallel`` rows,
scoring each step's targets against the step's other targets plus ``n_sample`` shared
popularity-sampled negatives, and returns the mean loss over all R sessions' events. The whole pass is
cut on the host (``SessionParallelBatches.stacked``) and copied to the device in one go, its negatives
drawn at once; the GRU runs step by step, then the scores and losses of all steps are computed together,
and nothing is read back on the way, so on a GPU the kernels queue without waiting. The hidden state is
detached between steps by default (``truncate_bptt``: one-step back-propagation through time, as the
official implementation); the gradient is then the mean of the steps' gradients. The paper's own
schedule, one update per session-parallel step, is :func:`fit_session_parallel` (one process; what
``scripts/bench_sessions.py`` runs).

:class:`GRU4RecRecommender` trains on user histories (``fit``) for top-N, or on sessions
(``fit_session_scorer``) for the session protocol, whose scorer is :class:`GRU4RecScorer`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from pyspark.sql import DataFrame
from torch import Tensor, nn

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.session_batches import SessionData, SessionParallelBatches, Step, sessions_from_padded
from recsys_spark.evaluate.sessions import ModuleScorer, ScoreFn, next_item_metrics
from recsys_spark.models.sequence_base import SequenceRecommender
from recsys_spark.models.torch_base import TorchParams
from recsys_spark.nn import gru4rec as g4r
from recsys_spark.nn.gru4rec import GRU4Rec
from recsys_spark.scoring import matrix_frame, similar_from_factors
from recsys_spark.train.distributed import unwrap
from recsys_spark.train.task import SampledTask, evaluating, model_device
from recsys_spark.train.trainer import TrainConfig

log = logging.getLogger(__name__)


def steps_per_scoring(device: torch.device) -> int:
    """How many steps' outputs are scored in one [C, P, P + S] block. On a GPU all of a batch's at once:
    the cost is kernel launches (an H200 made 39k events/s so, 9-10k one step at a time); on a CPU
    blocks of 4, which stay in cache (2 cores: 25% faster than one step, and than all at once)."""
    return 1 << 30 if device.type == "cuda" else 4


def on_device(steps: Step, device: torch.device | str) -> Step:
    """Session-parallel numpy arrays ([T, P] or [P]) as tensors on ``device``, one copy per array."""
    return Step(*(torch.from_numpy(x).to(device, non_blocking=True) for x in steps))


class GRU4RecNetParams(Section):
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
    max_length: int = Field(50, ge=2, description="items kept per session in the fixed-length column")
    seed: int = 42

    removed_keys: ClassVar[dict[str, str]] = {
        **{key: f"the pipeline trains with train.{key}; the one-process fit_session_parallel takes a PaperSchedule"
           for key in ("optimizer", "lr", "epochs")},
        "momentum": "only the one-process fit_session_parallel used it: PaperSchedule(momentum=...)",
        "batch_sessions": "sessions per batch are train.batch_size",
    }


class PaperSchedule(Section):
    """The official implementation's optimisation, for :func:`fit_session_parallel`: one optimiser step
    per session-parallel step, Adagrad (with momentum) by default. The pipeline trains through the shared
    trainer instead (``GRU4RecParams.train``)."""

    optimizer: Literal["adagrad", "adam"] = "adagrad"
    lr: float = Field(0.2, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="adagrad only")
    epochs: int = Field(10, gt=0)


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


def make_optimizer(model: nn.Module, schedule: PaperSchedule) -> torch.optim.Optimizer:
    if schedule.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=schedule.lr)
    return AdagradM(model.parameters(), lr=schedule.lr, momentum=schedule.momentum)


class GRU4RecTask(SampledTask):
    """GRU4Rec on whole sessions (``items`` [R, L], PAD = -1); see the module docstring for the layout.

    ``holdout_sessions`` (item lists) are scored with the next-item protocol (Recall@20, MRR@20).
    ``loss`` steps the GRU through ``forward_step``, not ``forward`` (``ddp_forward = False``): under the
    ``torch`` backend the model is not wrapped in DDP and the optimizer averages the gradients instead.
    """

    columns = [tb.ITEMS]
    ddp_forward = False

    def __init__(self, params: GRU4RecNetParams, n_items: int, item_counts: np.ndarray | None = None,
                 holdout_sessions: Sequence[Sequence[int]] | None = None, k: int = 20) -> None:
        if params.n_sample > 0 and item_counts is None:
            raise ValueError("sampled negatives (n_sample > 0) need item_counts")
        super().__init__(params.seed, n_items, item_counts, params.sample_alpha, None)
        self.params, self.k = params, k
        self._counts: dict[torch.device, Tensor] = {}
        self.holdout_sessions = None if holdout_sessions is None else SessionData.from_lists(holdout_sessions)

    def build_model(self) -> nn.Module:
        p = self.params
        with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank, global RNG untouched
            torch.manual_seed(p.seed)
            return GRU4Rec(self.n_items, hidden=p.hidden, layers=p.layers, embedding=p.embedding,
                           constrained=p.constrained, dropout_embed=p.dropout_embed, dropout_hidden=p.dropout_hidden)

    def steps_loss(self, model: nn.Module, steps: Step, hidden: Tensor | None,
                   samples: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """T session-parallel steps on the device: (sum of their active rows' losses, the last hidden).

        ``steps`` holds tensors [T, P] on the model's device, ``samples`` each step's ``n_sample``
        negatives [T, S] (drawn ∝ count ** alpha). The GRU runs step by step; the scores and losses of
        all T steps are then computed at once. A step's candidates: every row's target (row i's in
        column i) then its sample; an idle row's column is no candidate and its row adds nothing, and
        accidental hits (a candidate equal to the row's target off the diagonal) are masked out.
        Nothing reads a value back to the host, so on a GPU the kernels queue without waiting.
        """
        p = self.params
        inputs, targets, reset, active = steps
        outputs = []
        for t in range(inputs.shape[0]):
            out, hidden = model.forward_step(inputs[t], hidden, reset[t])  # [P, H], [layers, P, H]
            outputs.append(out)
            if p.truncate_bptt:
                hidden = hidden.detach()
        out = torch.stack(outputs)  # [T, P, H]
        total, size = None, steps_per_scoring(out.device)
        for chunk in range(0, len(out), size):
            part = slice(chunk, chunk + size)
            loss = self._scored_loss(model, out[part], targets[part], active[part],
                                     None if samples is None else samples[part])
            total = loss if total is None else total + loss
        return total, hidden

    def _scored_loss(self, model: nn.Module, out: Tensor, targets: Tensor, active: Tensor,
                     samples: Tensor | None) -> Tensor:
        """The summed loss of C steps' outputs out [C, P, H] against their candidates."""
        p = self.params
        target = targets.clamp(min=0)  # [C, P]; an idle row's PAD reads item 0, masked below
        candidates, usable_column = target, active  # [C, M], M = P (+ S)
        if samples is not None:
            candidates = torch.cat([target, samples], dim=1)  # [C, P + S]
            usable_column = torch.cat([active, torch.ones_like(samples, dtype=torch.bool)], dim=1)
        log_q = None
        if p.loss == "ce" and p.logq > 0 and self.item_counts is not None:
            log_q = p.logq * self._log_expected_draws(candidates, active.sum(1, keepdim=True), out.device)
            log_q = torch.where(usable_column, log_q, torch.zeros_like(log_q)).unsqueeze(1)  # [C, 1, M]
        scores = unwrap(model).scores(out, candidates)  # [C, P, M]
        mask = (candidates.unsqueeze(1) != target.unsqueeze(2)) & usable_column.unsqueeze(1)  # [C, P, M]
        if p.loss == "ce":
            return g4r.cross_entropy(scores, mask, log_q, valid=active, reduction="sum")
        if p.loss == "bpr-max":
            return g4r.bpr_max(g4r.elu_scores(scores, p.elu_param), mask, reg=p.bpreg, valid=active, reduction="sum")
        return g4r.top1_max(scores, mask, valid=active, reduction="sum")

    def negatives(self, steps: int, device: torch.device) -> Tensor | None:
        """The ``n_sample`` negatives of each of ``steps`` steps, drawn in one call: [T, S], or None."""
        if self.params.n_sample == 0:
            return None
        return self.sample("popularity", (steps, self.params.n_sample), device).items

    def _log_expected_draws(self, items: Tensor, n_targets: int | Tensor, device: torch.device) -> Tensor:
        """log E[times item j is a candidate] = log(b·c_j/Σc + S·q_j), with b = ``n_targets`` per step
        (broadcast against ``items``): the step's b targets arrive in proportion to the counts c (they are
        the data), its S samples with q ∝ c ** alpha. Subtracting it from the scores is the log-Q
        correction of sampled softmax, for both kinds of candidates alike."""
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
        """The mean loss per event of the batch's sessions, run session-parallel: the whole pass is cut
        on the host, copied to the device at once, and its negatives drawn in one call."""
        sessions = sessions_from_padded(batch[tb.ITEMS].cpu().numpy())
        steps = SessionParallelBatches(sessions, self.params.parallel).stacked()  # [T, P] each
        events = int(steps.active.sum())
        if events == 0:  # no session with two items in this batch: a zero loss with a gradient path
            return sum(p.sum() for p in model.parameters()) * 0.0
        device = model_device(model)
        total, _ = self.steps_loss(model, on_device(steps, device), None, self.negatives(len(steps.inputs), device))
        return total / events

    def validate(self, model: nn.Module) -> dict[str, float]:
        if self.holdout_sessions is None:
            return {}
        inner = unwrap(model)
        with evaluating(inner):
            scorer = GRU4RecScorer.from_model(inner, live=True)
            values = next_item_metrics(scorer.start(256), self.holdout_sessions, ks=[self.k])
        return {key: v for key, v in values.items() if "@" in key}


def fit_session_parallel(task: GRU4RecTask, sessions: SessionData | Sequence[Sequence[int]],
                         schedule: PaperSchedule | None = None, model: nn.Module | None = None,
                         device: str | torch.device = "cpu",
                         shuffle: bool = False) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train GRU4Rec the paper's way in one process: one optimiser step per session-parallel step.

    Sessions are read in the given order (time order of their starts, as in the paper), or shuffled per
    epoch. Returns the model and one row per epoch: mean loss per event, events/s, seconds and the
    task's validation metrics. Raises ``FloatingPointError`` when the loss is not finite.
    """
    p = task.params
    data = sessions if isinstance(sessions, SessionData) else SessionData.from_lists(sessions)
    model = (model or task.build_model()).to(device)
    schedule = schedule or PaperSchedule()
    optimizer = make_optimizer(model, schedule)
    task.seed_negatives(p.seed)
    batches = SessionParallelBatches(data, p.parallel, shuffle=shuffle, seed=p.seed)
    history = []
    for epoch in range(schedule.epochs):
        model.train()
        started, loss_sum, events, hidden = time.perf_counter(), torch.zeros((), device=device), 0, None
        for step in batches:
            n = int(step.active.sum())
            optimizer.zero_grad()
            one = on_device(Step(*(x[None] for x in step)), device)  # [1, P] each
            loss, hidden = task.steps_loss(model, one, hidden, task.negatives(1, device))
            (loss / n).backward()
            optimizer.step()
            hidden = hidden.detach()
            loss_sum += loss.detach()
            events += n
        mean = float(loss_sum) / max(events, 1)
        seconds = time.perf_counter() - started
        if not math.isfinite(mean):
            raise FloatingPointError(f"GRU4Rec loss is {mean} in epoch {epoch + 1}")
        row = {"epoch": epoch + 1, "loss": mean, "events_per_s": events / seconds, "seconds": seconds}
        row.update(task.validate(model))
        history.append(row)
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items() if k != "epoch"})
    return model, history


class GRU4RecParams(TorchParams):
    """Hyper-parameters of ``gru4rec`` (``conf/models/gru4rec.yaml``), trained through the shared trainer:
    a batch is ``train.batch_size`` whole sequences (sessions), run session-parallel over ``net.parallel``
    rows; 64 per batch with Adam at lr 0.005 matched the paper's schedule on a Yoochoose validation split
    (``scripts/bench_sessions.py``). Validation: the whole sequences of ``validation_users`` users (or
    sessions), held out of training and scored with the next-item protocol (recall@20, mrr@20, ndcg@20).
    Every backend works: the GRU is stepped outside ``forward``, so under ``torch`` the network is not
    wrapped in DDP and the optimizer averages the gradients over the ranks before each step
    (``GRU4RecTask.ddp_forward``)."""

    net: GRU4RecNetParams = GRU4RecNetParams()
    train: TrainConfig = TrainConfig(epochs=30, batch_size=64, lr=0.005, optimizer="adam", schedule="constant",
                                     early_stopping_metric="recall@20", patience=3, validate_every_steps=100)


class GRU4RecRecommender(SequenceRecommender):
    """GRU4Rec at the user level: each user's train items in time order (first interaction) are one long
    session, trained on as windows of ``net.max_length`` that cover every transition, validated on the
    whole windows of ``validation_users`` users with the next-item protocol; recommending reads the last
    ``net.max_length`` items (see ``models.sequence_base``).

    ``recommend`` runs the GRU over each user's sequence on the executors; the final output h scores item
    j as ``<h, W_j> + b_j``, expressed as user factors ``[h, 1]`` and item factors ``[W_j, b_j]`` so the
    shared dot-product top-k applies (and gold/*_embeddings get those vectors). ``fit_sessions`` trains
    the same network on real sessions (``silver/sessions``) for the next-item protocol.
    """

    name = "gru4rec"
    network = GRU4Rec
    params_class = GRU4RecParams
    append_one = True

    def max_length(self) -> int:
        return self.params.net.max_length

    def _user_holdout(self, train: DataFrame):
        return self._hold_out_sequences(self._user_rows(train))

    def _task(self, item_counts, holdout):
        return GRU4RecTask(self.params.net, self.n_items, item_counts, holdout_sessions=holdout, k=20)

    def scorer(self) -> GRU4RecScorer:
        return GRU4RecScorer(self.snapshot())

    def item_factors(self) -> DataFrame:
        """(item_idx, [W_j, b_j]): output embedding and bias, so that ``[h, 1] . [W_j, b_j]`` is the score."""
        w = self.module.out_emb.weight.detach().cpu().numpy()  # [n_items, H]
        b = self.module.out_bias.weight.detach().cpu().numpy()  # [n_items, 1]
        return matrix_frame(self._users.sparkSession, np.concatenate([w, b], axis=1), tb.ITEM_IDX)

    def _similar_items(self, k: int) -> DataFrame:
        """Cosine of the output embeddings W alone: the bias b says how popular an item is, not what it is like."""
        w = matrix_frame(self._users.sparkSession, self.module.out_emb.weight.detach().cpu().numpy(), tb.ITEM_IDX)
        return similar_from_factors(w, k, self.users_per_block)


class GRU4RecScorer(ModuleScorer):
    """A trained GRU4Rec as a scorer: the hidden state of each row is carried from step to step and
    reset where a row starts a new session."""

    def start(self, batch_size: int) -> ScoreFn:
        model = self.model()
        device = self.device
        state: dict[str, Any] = {"hidden": None}

        @torch.no_grad()
        def score(inputs: np.ndarray, reset: np.ndarray) -> np.ndarray:
            items = torch.from_numpy(np.asarray(inputs, dtype=np.int64)).to(device)
            out, state["hidden"] = model.forward_step(items, state["hidden"],
                                                      torch.from_numpy(np.asarray(reset)).to(device))
            return model.scores(out).float().cpu().numpy()  # [B, n_items]

        return score
