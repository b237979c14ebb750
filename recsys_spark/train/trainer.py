"""The training loop shared by the deep models: any backend, equal steps on every rank, checkpoints.

A model plugs in as a :class:`TrainTask` (build the module, compute a batch's loss with negatives sampled
inside, validate). :func:`fit` runs it on one rank of a :class:`~recsys_spark.train.distributed.DistContext`;
:class:`TrainJob` bundles task, Petastorm converter and config into the picklable function that
``distributed.launch`` ships to the ranks.

Determinism: the model is built under ``config.seed`` on every rank and rank 0's weights are broadcast;
each epoch reseeds the global generators (negative sampling, dropout) and the batch order from
(seed, rank, epoch), so a run resumed from a checkpoint repeats the epochs an uninterrupted run would have
run (on CPU, bit for bit).

Decisions that end the run (early stopping, errors in validation) are taken on rank 0 and broadcast, so
every rank stops after the same epoch: a rank that leaves early would hang the others' collectives.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from recsys_spark.config import Section
from recsys_spark.errors import RecsysError
from recsys_spark.train import checkpoint as ckpt
from recsys_spark.train.distributed import DistContext, rank_seed, seed_everything
from recsys_spark.train.loaders import ShardData, batches, load_shard, rank_batch_size, shard_to

log = logging.getLogger(__name__)


class TrainingDivergedError(RecsysError):
    """The mean training loss of an epoch is not finite."""


@runtime_checkable
class TrainTask(Protocol):
    """What a model gives the trainer. It is pickled and shipped to every rank: keep it to plain config
    and small numpy arrays (no SparkSession, no DataFrame, no CUDA tensors).

    ``columns``: the DataFrame columns the loader delivers; a batch maps each to a tensor of
    ``(batch,)`` or, for fixed-length array columns, ``(batch, length)``.

    ``loss(model, batch)``: the mean loss of one batch, negatives sampled inside (use torch's global
    generator; the trainer seeds it per rank and epoch). ``model`` is what ``ctx.prepare`` returned:
    compute outputs by calling ``model(...)`` (DDP averages gradients through ``forward`` only) and
    reach attributes through ``distributed.unwrap(model)``.

    Optionally ``ddp_forward`` (default True): set it to False on a task whose ``loss`` computes outputs
    through other methods of the model (GRU4Rec steps its GRU with ``forward_step``, many times per
    backward). Its model is then not wrapped in DDP under the ``torch`` backend; the optimizer averages
    the gradients over the ranks before every step instead (``DistContext.prepare``).

    ``validate(model)``: metrics on the validation data, higher is better (e.g. ``{"ndcg@10": 0.1}``),
    or ``{}``. Runs on rank 0 only, in eval mode under ``torch.no_grad``, with the unwrapped model.

    Optionally ``start_epoch(model, epoch)``: called on every rank before each epoch's first batch (after
    the epoch's seeding), with the unwrapped model, e.g. to refresh hard negatives from the current
    weights (NCF's ``negatives: hard``). It must not change the weights and must do the same on every rank.

    ``build_model()`` returns the network; when it carries ``init_kwargs`` (its constructor arguments
    as JSON, as every network of ``recsys_spark.nn`` does), they are recorded in each checkpoint and a
    resume from a checkpoint of another architecture is refused.
    """

    columns: list[str]

    def build_model(self) -> torch.nn.Module: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def validate(self, model: torch.nn.Module) -> dict[str, float]: ...


class TrainConfig(Section):
    """Optimisation, schedule, early stopping and checkpoints for :func:`fit`.

    How long to train does not depend on the number of ranks or the size of the data: ``batch_size`` is the
    global batch (so 1 and 8 ranks run the same optimizer steps), validation falls after the epochs that
    complete another ``validate_every_steps`` steps, and ``patience`` counts validations, so patience is
    about ``patience * validate_every_steps`` optimizer steps whether an epoch holds 3 steps or 3,000.

    Learning rate at global step ``s`` of ``S = epochs * steps_per_epoch``: linear warm-up from
    ``lr / W`` to ``lr`` over the first ``W = warmup_fraction * S`` steps, then ``schedule``: ``cosine``
    (half a cosine from ``lr`` down to ``min_lr_fraction * lr`` at the last step), ``linear`` (a straight
    line to the same floor) or ``constant``. The schedule is a function of the step alone, so a resumed
    run continues it exactly.
    """

    epochs: int = Field(20, gt=0, description="passes over the data at most")
    batch_size: int = Field(1024, gt=0, description="rows per optimizer step, all ranks together (each rank "
                                                    "takes batch_size // ranks): the same steps on 1 or 8 ranks")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adam"] = "adamw"
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_fraction: float = Field(0.0, ge=0, lt=1, description="share of all steps spent warming up")
    min_lr_fraction: float = Field(0.0, ge=0, le=1, description="final lr as a share of lr")
    early_stopping_metric: str | None = Field(None, description="validation metric to maximise, e.g. ndcg@10")
    validate_every_steps: int = Field(
        1, ge=1, description="validate after the epochs that complete another this-many optimizer steps (and after "
                             "the last): with few steps per epoch, validation and patience span several epochs")
    patience: int = Field(3, ge=1, description="validations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="smallest gain that counts as an improvement")
    seed: int = Field(42, ge=0)
    checkpoint_dir: str | None = Field(None, description="written by rank 0; shared storage on a cluster")
    keep_checkpoints: int = Field(2, ge=0, description="epoch checkpoints kept; 0 keeps all")
    resume: bool = Field(False, description="continue from the last checkpoint in checkpoint_dir")
    bf16: bool = Field(True, description="bf16 autocast on CUDA; ignored on CPU")
    progress: bool = Field(True, description="tqdm progress bar on rank 0")

    @model_validator(mode="after")
    def _resume_needs_dir(self) -> TrainConfig:
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs checkpoint_dir")
        return self


@dataclass
class TrainResult:
    """What :func:`fit` returns. Only rank 0's carries weights (other ranks return an empty dict).

    ``state_dict``: CPU weights of the best epoch by ``early_stopping_metric``, or of the last epoch
    when no metric is set. ``history``: one row per completed epoch (including epochs before a resume):
    ``epoch`` (1-based), ``train_loss`` (mean over steps and ranks), ``lr``, ``seconds`` (the epoch's
    training), ``elapsed_s`` (since ``fit`` started, validation included) and, on the epochs that
    validated, the validation metrics. The same history is on every rank.
    """

    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    best_epoch: int | None
    stopped_early: bool = False
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    best_step: int | None = None  # optimizer steps to the returned weights
    seconds: float = 0.0  # wall time of the training loop on this rank


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate at 0-based global ``step`` as a share of ``config.lr`` (see TrainConfig)."""
    warmup = int(config.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup - 1))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress
    return config.min_lr_fraction + (1.0 - config.min_lr_fraction) * shape


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class _Progress:
    """Where the run stands; restored from a checkpoint on resume and broadcast from rank 0."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float | None = None


def validations(from_epoch: int, to_epoch: int, steps_per_epoch: int, config: TrainConfig) -> int:
    """How many validations fall after epochs ``from_epoch + 1 .. to_epoch``: one after each epoch that
    crosses another multiple of ``validate_every_steps`` optimizer steps (every epoch, when an epoch has at
    least that many steps). A function of the epochs alone, so a resumed run validates where an
    uninterrupted one would."""
    every = config.validate_every_steps
    if steps_per_epoch >= every:
        return to_epoch - from_epoch
    return (to_epoch * steps_per_epoch) // every - (from_epoch * steps_per_epoch) // every


def fit(task: TrainTask, ctx: DistContext, shard: ShardData, steps_per_epoch: int, config: TrainConfig) -> TrainResult:
    """Train ``task`` on this rank's ``shard`` for ``config.epochs`` epochs of ``steps_per_epoch`` steps.

    Every rank must pass the same ``steps_per_epoch`` (``loaders.steps_per_epoch`` on the driver) and
    draws ``batch_size // ranks`` rows per step. Rank 0 validates when due (see :func:`validations`),
    writes a checkpoint every epoch (when ``checkpoint_dir`` is set) and decides early stopping; the
    decision is broadcast, so all ranks stop after the same epoch.
    """
    if steps_per_epoch < 1:
        raise RecsysError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    fit_started = time.perf_counter()
    rank_batch = rank_batch_size(config.batch_size, ctx.size)
    torch.manual_seed(config.seed)  # the same initial weights everywhere; the broadcast below makes sure
    model = task.build_model().to(ctx.device)
    init_kwargs = json.loads(json.dumps(getattr(model, "init_kwargs", {})))  # as a checkpoint reads it back
    optimizer = make_optimizer(model, config)
    step_model, optimizer = ctx.prepare(model, optimizer, ddp_forward=getattr(task, "ddp_forward", True))

    progress, best_state, error = _Progress(), None, None
    if ctx.is_main and config.resume:
        try:
            progress, best_state = _restore(model, optimizer, config, init_kwargs)
        except Exception as exc:
            error = f"cannot resume from {config.checkpoint_dir}: {type(exc).__name__}: {exc}"
    progress, error = ctx.broadcast_object((progress, error))
    if error:
        raise RecsysError(error)
    ctx.broadcast_parameters(model, optimizer)

    shard = shard_to(shard, ctx.device)
    total_steps = config.epochs * steps_per_epoch
    autocast = config.bf16 and ctx.device.type == "cuda"
    # A resumed run that had already run out of patience stays stopped.
    stopped_early = config.early_stopping_metric is not None and progress.best_epoch is not None and (
        validations(progress.best_epoch, progress.epoch, steps_per_epoch, config) >= config.patience
    )
    last_epoch = progress.epoch if stopped_early else config.epochs
    bar = tqdm(
        total=total_steps,
        initial=progress.epoch * steps_per_epoch,
        disable=not (ctx.is_main and config.progress),
        desc="train",
        unit="step",
        mininterval=0.1 if sys.stderr.isatty() else 30.0,  # a rank's piped log gets a line every 30 s
    )
    with bar:
        for epoch in range(progress.epoch, last_epoch):
            started = time.perf_counter()
            seed_everything(rank_seed(config.seed, ctx.rank, epoch))
            generator = torch.Generator().manual_seed(rank_seed(config.seed, ctx.rank, epoch, 1))
            start_epoch = getattr(task, "start_epoch", None)
            if start_epoch is not None:
                start_epoch(model, epoch)
            loss_sum = torch.zeros((), device=ctx.device)
            for step, batch in enumerate(batches(shard, rank_batch, steps_per_epoch, generator)):
                lr = config.lr * lr_factor(epoch * steps_per_epoch + step, total_steps, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad()
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = task.loss(step_model, batch)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach().float()
                bar.update(1)
            train_loss = ctx.allreduce_mean(loss_sum.item() / steps_per_epoch)
            if not math.isfinite(train_loss):
                raise TrainingDivergedError(f"mean training loss is {train_loss} in epoch {epoch + 1}")

            decision = None
            if ctx.is_main:
                row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": lr,
                       "seconds": time.perf_counter() - started}
                due = validations(epoch, epoch + 1, steps_per_epoch, config) > 0 or epoch + 1 == config.epochs
                decision, best_state = _end_epoch(task, model, optimizer, config, progress, row, best_state,
                                                  init_kwargs, due, steps_per_epoch, fit_started)
                bar.set_postfix({k: round(v, 4) for k, v in row.items() if k not in ("epoch", "seconds")})
            progress, stop, error = ctx.broadcast_object(decision)
            if error:
                raise RecsysError(error)
            if stop:
                stopped_early = True
                break

    best_epoch = progress.best_epoch if config.early_stopping_metric else progress.epoch
    if not ctx.is_main:
        weights = {}
    elif config.early_stopping_metric and best_state is not None:
        weights = best_state
    else:
        weights = ckpt.cpu_state(model.state_dict())
    best_step = None if best_epoch is None else best_epoch * steps_per_epoch
    return TrainResult(weights, progress.history, best_epoch, stopped_early, init_kwargs, best_step,
                       time.perf_counter() - fit_started)


def _end_epoch(task, model, optimizer, config, progress, row, best_state, init_kwargs, due, steps_per_epoch,
               fit_started):
    """Rank 0 after an epoch: validate (when ``due``), update best and history, checkpoint, decide whether
    to stop. The row gets ``elapsed_s``, the wall time since this process's ``fit`` started, validation
    included: at the best epoch, the time to reach the best (a resumed run counts from its resume).

    Returns ``(progress, stop, error)`` for broadcasting, and the best weights so far. An exception becomes
    ``error``, so the other ranks raise too instead of waiting for a broadcast that never comes.
    """
    try:
        metrics = {}
        if due:
            model.eval()
            with torch.no_grad():
                metrics = {name: float(value) for name, value in task.validate(model).items()}
            model.train()
        row.update(metrics)
        row["elapsed_s"] = time.perf_counter() - fit_started
        progress.history.append(row)
        progress.epoch = row["epoch"]
        metric = config.early_stopping_metric if due else None
        improved = False
        if metric is not None:
            if metric not in metrics:
                raise RecsysError(f"early_stopping_metric {metric!r} not among validation metrics {sorted(metrics)}")
            score = metrics[metric]
            if progress.best_score is None or score > progress.best_score + config.min_delta:
                progress.best_epoch, progress.best_score, improved = row["epoch"], score, True
                best_state = ckpt.cpu_state(model.state_dict())
        stop = metric is not None and validations(progress.best_epoch, row["epoch"], steps_per_epoch,
                                                  config) >= config.patience
        if config.checkpoint_dir:
            _write_checkpoints(model, optimizer, config, progress, improved, init_kwargs)
        log.info("epoch %d: %s", row["epoch"], {k: round(v, 5) for k, v in row.items() if k != "epoch"})
        if stop:
            log.info("early stopping: %s has not improved for %d validations (best %.5f in epoch %d)",
                     metric, config.patience, progress.best_score, progress.best_epoch)
        return (progress, stop, None), best_state
    except Exception as exc:  # reported to every rank, then raised
        log.exception("rank 0 failed after an epoch")
        return (progress, False, f"{type(exc).__name__}: {exc}"), best_state


def _write_checkpoints(model, optimizer, config, progress, improved, init_kwargs) -> None:
    state = ckpt.Checkpoint(
        epoch=progress.epoch,
        model=ckpt.cpu_state(model.state_dict()),
        optimizer=optimizer.state_dict(),
        history=progress.history,
        best_epoch=progress.best_epoch,
        best_score=progress.best_score,
        init_kwargs=init_kwargs,
        config=config.model_dump(mode="json"),
    )
    ckpt.save(ckpt.epoch_path(config.checkpoint_dir, progress.epoch), state)
    if improved:
        ckpt.save(f"{config.checkpoint_dir}/{ckpt.BEST_NAME}", state)
    ckpt.prune(config.checkpoint_dir, config.keep_checkpoints)


def _restore(model, optimizer, config, init_kwargs) -> tuple[_Progress, dict[str, torch.Tensor] | None]:
    """Rank 0: load the last checkpoint (if any) into model and optimizer; return progress and best weights."""
    path = ckpt.latest(config.checkpoint_dir)
    if path is None:
        log.info("resume: no checkpoint in %s, starting from scratch", config.checkpoint_dir)
        return _Progress(), None
    saved = ckpt.load(path)
    if saved.init_kwargs != init_kwargs:
        raise RecsysError(f"{path} was written for a network built with {saved.init_kwargs}, not {init_kwargs}: "
                          "resume with the same hyper-parameters, or train without --resume")
    model.load_state_dict(saved.model)
    optimizer.load_state_dict(saved.optimizer)
    best_state = None
    best_path = f"{config.checkpoint_dir}/{ckpt.BEST_NAME}"
    if saved.best_epoch is not None:
        best_state = ckpt.load(best_path).model
    log.info("resumed from %s after epoch %d", path, saved.epoch)
    return _Progress(saved.epoch, list(saved.history), saved.best_epoch, saved.best_score), best_state


@dataclass
class TrainJob:
    """The function ``distributed.launch`` runs on every rank: read this rank's shard, then :func:`fit`.

    Picklable as long as the task is: it holds the task, the Petastorm converter and plain config.
    """

    task: TrainTask
    converter: Any
    steps_per_epoch: int
    config: TrainConfig

    def __call__(self, ctx: DistContext) -> TrainResult:
        shard = load_shard(self.converter, ctx.rank, ctx.size, list(self.task.columns))
        return fit(self.task, ctx, shard, self.steps_per_epoch, self.config)


@dataclass
class ShardJob:
    """A :class:`TrainJob` whose shard is already in memory: what ``TorchRecommender.export_training``
    writes, so that the network and this trainer run without Spark or Petastorm (a GPU machine, a
    profiler). ``shard`` holds every training row; ``steps_per_epoch`` is for one rank."""

    task: TrainTask
    shard: ShardData
    steps_per_epoch: int
    config: TrainConfig

    def __call__(self, ctx: DistContext) -> TrainResult:
        return fit(self.task, ctx, self.shard, self.steps_per_epoch, self.config)
