"""The training loop on a matrix-factorisation task whose answer is known: users like the items on their
side of a random rank-2 pattern. Local backend for the loop itself, two Horovod ranks for the end-to-end
path (Petastorm shard -> fit -> broadcast early stopping)."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

import cloudpickle
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from pyspark import cloudpickle as spark_cloudpickle

from recsys_spark.errors import RecsysError
from recsys_spark.train import checkpoint as ckpt
from recsys_spark.train import loaders
from recsys_spark.train.distributed import DistContext, launch
from recsys_spark.train.trainer import TrainConfig, TrainJob, TrainResult, TrainTask, fit, lr_factor, validations

pytestmark = pytest.mark.torch

# Ranks cannot import this test module: its task travels by value (see test_distributed.py).
for _pickler in (cloudpickle, spark_cloudpickle):
    _pickler.register_pickle_by_value(sys.modules[__name__])

USERS, ITEMS = 24, 32


class MF(torch.nn.Module):
    def __init__(self, users: int, items: int, dim: int) -> None:
        super().__init__()
        self.init_kwargs = {"users": users, "items": items, "dim": dim}
        self.user = torch.nn.Embedding(users, dim)
        self.item = torch.nn.Embedding(items, dim)
        torch.nn.init.normal_(self.user.weight, std=0.1)
        torch.nn.init.normal_(self.item.weight, std=0.1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        # users (B,), items (B, K) -> logits (B, K)
        return (self.user(users).unsqueeze(1) * self.item(items)).sum(-1)


def pattern(seed: int = 0) -> np.ndarray:
    """labels[u, i] = 1 when user u and item i are on the same side of a random rank-2 pattern."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(USERS, 2)) @ rng.normal(size=(2, ITEMS)) > 0).astype(np.float32)


@dataclass
class MFTask:
    """Positives (user, item) rows; one sampled negative item per row; accuracy on all pairs."""

    labels: np.ndarray
    dim: int = 8
    scripted_scores: list[float] | None = None  # validate() returns these instead, one per epoch
    crash_at_call: int | None = None  # loss() raises on this call: a run killed mid-epoch
    calls: int = field(default=0, repr=False)
    columns: list[str] = field(default_factory=lambda: ["user", "item"])

    def build_model(self) -> torch.nn.Module:
        return MF(USERS, ITEMS, self.dim)

    def loss(self, model, batch):
        self.calls += 1
        if self.crash_at_call is not None and self.calls >= self.crash_at_call:
            raise RuntimeError("simulated crash")
        users = batch["user"].long()
        negatives = torch.randint(0, ITEMS, (len(users), 1), device=users.device)
        items = torch.cat([batch["item"].long().unsqueeze(1), negatives], dim=1)
        targets = torch.zeros(items.shape, device=users.device)
        targets[:, 0] = 1.0
        return torch.nn.functional.binary_cross_entropy_with_logits(model(users, items), targets)

    def validate(self, model):
        if self.scripted_scores is not None:
            epoch = len(getattr(self, "_seen", []))
            self._seen = [*getattr(self, "_seen", []), epoch]
            return {"score": self.scripted_scores[epoch]}
        users = torch.arange(USERS).repeat_interleave(ITEMS)
        items = torch.arange(ITEMS).repeat(USERS).unsqueeze(1)
        predicted = (model(users, items).squeeze(1) > 0).float().numpy()
        return {"accuracy": float((predicted == self.labels.reshape(-1)).mean())}


def positives(labels: np.ndarray) -> dict[str, torch.Tensor]:
    users, items = np.nonzero(labels)
    return {"user": torch.from_numpy(users.astype(np.int32)), "item": torch.from_numpy(items.astype(np.int32))}


def run_local(task: MFTask, config: TrainConfig) -> TrainResult:
    """fit on the local backend, as the pipeline calls it."""
    shard = positives(task.labels)
    steps = loaders.steps_per_epoch(len(shard["user"]), config.batch_size, 1)
    (result,) = launch(None, functools.partial(_fit_shard, task, shard, steps, config), backend="local")
    return result


def _fit_shard(task, shard, steps, config, ctx: DistContext) -> TrainResult:
    return fit(task, ctx, shard, steps, config)


def base_config(**overrides) -> TrainConfig:
    values = {"epochs": 6, "batch_size": 32, "lr": 0.05, "seed": 7, "progress": False, "schedule": "constant"}
    return TrainConfig(**{**values, **overrides})


def test_task_meets_the_protocol_and_pickles():
    task = MFTask(pattern())
    assert isinstance(task, TrainTask)
    assert cloudpickle.loads(cloudpickle.dumps(task)).dim == task.dim


def test_loss_decreases_and_a_checkpoint_is_written_every_epoch(tmp_path):
    task = MFTask(pattern())
    config = base_config(checkpoint_dir=str(tmp_path), keep_checkpoints=0)

    result = run_local(task, config)

    losses = [row["train_loss"] for row in result.history]
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5, 6]
    # A sampled negative is a positive half the time here, so the loss floor is well above 0.
    assert losses[-1] < 0.88 * losses[0]
    assert result.history[-1]["accuracy"] > 0.9 > result.history[0]["accuracy"]
    assert ckpt.epochs_saved(str(tmp_path)) == [1, 2, 3, 4, 5, 6]
    for epoch in range(1, 7):
        raw = torch.load(ckpt.epoch_path(str(tmp_path), epoch), weights_only=True)
        assert raw["epoch"] == epoch
        assert len(raw["history"]) == epoch
        assert raw["optimizer"]["state"]  # AdamW moments travel with the weights
    last = ckpt.load(ckpt.epoch_path(str(tmp_path), 6))
    assert last.init_kwargs == task.build_model().init_kwargs == {"users": USERS, "items": ITEMS, "dim": 8}
    assert last.config["batch_size"] == 32
    model = task.build_model()
    model.load_state_dict(last.model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, result.state_dict[name])


def test_only_the_most_recent_checkpoints_are_kept(tmp_path):
    run_local(MFTask(pattern()), base_config(epochs=4, checkpoint_dir=str(tmp_path), keep_checkpoints=2))
    assert ckpt.epochs_saved(str(tmp_path)) == [3, 4]


def test_resume_after_a_crash_ends_with_the_uninterrupted_weights(tmp_path):
    config = base_config(epochs=5, schedule="cosine", warmup_fraction=0.1, keep_checkpoints=0)
    steps = loaders.steps_per_epoch(int(pattern().sum()), config.batch_size, 1)
    straight = run_local(MFTask(pattern()), config.model_copy(update={"checkpoint_dir": str(tmp_path / "a")}))

    resumed_config = config.model_copy(update={"checkpoint_dir": str(tmp_path / "b"), "resume": True})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_local(MFTask(pattern(), crash_at_call=2 * steps + steps // 2), resumed_config)  # dies in epoch 3
    assert ckpt.epochs_saved(str(tmp_path / "b")) == [1, 2]
    resumed = run_local(MFTask(pattern()), resumed_config)

    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4, 5]
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    for name, tensor in straight.state_dict.items():
        assert torch.equal(tensor, resumed.state_dict[name]), name


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path):
    config = base_config(epochs=1, checkpoint_dir=str(tmp_path))
    run_local(MFTask(pattern(), dim=8), config)
    with pytest.raises(RecsysError, match=r"written for a network built with .*'dim': 8.*'dim': 4"):
        run_local(MFTask(pattern(), dim=4), config.model_copy(update={"resume": True}))


def test_early_stopping_stops_when_the_metric_stalls_and_returns_the_best_epoch(tmp_path):
    scores = [0.1, 0.3, 0.35, 0.34, 0.35, 0.5, 0.6, 0.7]
    config = base_config(epochs=8, early_stopping_metric="score", patience=2, checkpoint_dir=str(tmp_path),
                         keep_checkpoints=0)

    result = run_local(MFTask(pattern(), scripted_scores=scores), config)

    assert [row["score"] for row in result.history] == scores[:5]
    assert result.stopped_early and result.best_epoch == 3
    best = ckpt.load(str(tmp_path / ckpt.BEST_NAME))
    assert best.epoch == 3
    epoch3 = ckpt.load(ckpt.epoch_path(str(tmp_path), 3))
    for name, tensor in result.state_dict.items():
        assert torch.equal(tensor, best.model[name]) and torch.equal(tensor, epoch3.model[name])


def test_resuming_a_run_that_stopped_early_trains_no_further(tmp_path):
    scores = [0.3, 0.2, 0.1, 0.9]
    config = base_config(epochs=4, early_stopping_metric="score", patience=2, checkpoint_dir=str(tmp_path))
    first = run_local(MFTask(pattern(), scripted_scores=scores), config)
    again = run_local(MFTask(pattern(), scripted_scores=scores), config.model_copy(update={"resume": True}))

    assert len(first.history) == len(again.history) == 3
    assert again.stopped_early and again.best_epoch == 1
    for name, tensor in first.state_dict.items():
        assert torch.equal(tensor, again.state_dict[name])


def test_validation_and_patience_count_steps_not_epochs():
    """Few steps per epoch: validation falls after the epochs that complete another validate_every_steps
    steps and patience counts validations, so a small data set trains as many steps as a large one."""
    rows = len(positives(pattern())["user"])
    config = base_config(epochs=30, batch_size=rows // 2, validate_every_steps=5, early_stopping_metric="score",
                         patience=2)
    assert loaders.steps_per_epoch(rows, config.batch_size, 1) == 2
    assert [e for e in range(1, 14) if validations(e - 1, e, 2, config)] == [3, 5, 8, 10, 13]
    assert validations(0, 7, 10, config) == 7  # an epoch of at least 5 steps validates every time
    scores = [0.1, 0.5, 0.4, 0.3, 0.2]  # one per validation: the best is the second, after epoch 5
    result = run_local(MFTask(pattern(), scripted_scores=scores), config)
    assert [row["epoch"] for row in result.history if "score" in row] == [3, 5, 8, 10]
    assert result.stopped_early and result.best_epoch == 5 and result.best_step == 10
    assert len(result.history) == 10 and result.seconds > 0


def test_the_batch_is_global_so_ranks_run_the_same_steps():
    assert loaders.rank_batch_size(256, 2) == 128 and loaders.rank_batch_size(256, 1) == 256
    assert loaders.steps_per_epoch(10_000, 256, 1) == loaders.steps_per_epoch(10_000, 256, 2) == 39
    assert loaders.steps_per_epoch(10_000, 256, 3) == 10_000 // 255


def test_missing_early_stopping_metric_is_an_error():
    config = base_config(epochs=2, early_stopping_metric="ndcg@10")
    with pytest.raises(Exception, match="ndcg@10"):
        run_local(MFTask(pattern()), config)


def test_lr_warms_up_then_decays_to_the_floor():
    config = TrainConfig(lr=1.0, warmup_fraction=0.1, schedule="cosine", min_lr_fraction=0.1)
    factors = [lr_factor(step, 100, config) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert factors[-1] == pytest.approx(0.1)
    linear = config.model_copy(update={"schedule": "linear"})
    assert lr_factor(54, 100, linear) == pytest.approx(0.1 + 0.9 * (1 - 44 / 89))


def test_config_rejects_resume_without_a_directory_and_unknown_keys():
    with pytest.raises(ValidationError, match="checkpoint_dir"):
        TrainConfig(resume=True)
    with pytest.raises(ValidationError, match="epoch"):
        TrainConfig(epoch=3)


@pytest.mark.spark
@pytest.mark.horovod
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_two_ranks_train_and_stop_together(spark, tmp_path, backend):
    """Rank 0 alone validates; its early-stopping decision ends the run on both ranks after epoch 3."""
    labels = pattern()
    shard = positives(labels)
    frame = spark.createDataFrame([(int(u), int(i)) for u, i in zip(shard["user"], shard["item"], strict=True)],
                                  "user int, item int")
    converter = loaders.materialize(spark, frame, str(tmp_path / "petastorm"), ranks=2)
    task = MFTask(labels, scripted_scores=[0.5, 0.4, 0.3, 0.9, 0.9])
    config = base_config(epochs=5, early_stopping_metric="score", patience=2)
    steps = loaders.steps_per_epoch(frame.count(), config.batch_size, 2)
    with pytest.MonkeyPatch.context() as patch:  # Spark's workers must run this interpreter (see test_distributed)
        patch.setattr(spark.sparkContext, "pythonExec", sys.executable)
        results = launch(spark, TrainJob(task, converter, steps, config), backend=backend, num_proc=2)
    loaders.delete(converter)

    assert [len(r.history) for r in results] == [3, 3]
    assert results[0].history == results[1].history
    assert all(r.stopped_early and r.best_epoch == 1 for r in results)
    assert set(results[0].state_dict) == {"user.weight", "item.weight"} and results[1].state_dict == {}
