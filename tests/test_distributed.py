"""Real ranks on the shared local[2] session: shards are disjoint and complete, and one optimizer step on
rank-dependent data leaves identical weights everywhere, equal to the step on the averaged gradient (also
without DDP's wrapper, for a task that steps its model outside ``forward``); GRU4Rec, which does, trains
with TorchDistributor and ends with the same weights on both ranks."""

from __future__ import annotations

import functools
import sys

import cloudpickle
import numpy as np
import pytest
import torch
from pyspark import cloudpickle as spark_cloudpickle
from pyspark.sql import types as T

from recsys_spark import tables as tb
from recsys_spark.data.session_batches import PAD
from recsys_spark.errors import RecsysError
from recsys_spark.models.gru4rec import GRU4RecNetParams, GRU4RecTask
from recsys_spark.train import checkpoint as ckpt
from recsys_spark.train import loaders
from recsys_spark.train.distributed import DistContext, host_cores, launch
from recsys_spark.train.trainer import TrainConfig, fit

pytestmark = [pytest.mark.spark, pytest.mark.horovod]

# The ranks cannot import this test module (pytest put tests/ on sys.path only in this process), so the
# functions below travel by value, both through Horovod's cloudpickle and through pyspark's copy of it.
for _pickler in (cloudpickle, spark_cloudpickle):
    _pickler.register_pickle_by_value(sys.modules[__name__])

N_IDS = 200
LR = 0.1


def _inputs(rank: int) -> torch.Tensor:
    return torch.full((4, 3), float(rank + 1))


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).mean()


def probe(converter, ctx: DistContext, ddp_forward: bool = True) -> dict:
    """Report the ids this rank loaded and the weights before and after one distributed step."""
    shard = loaders.load_shard(converter, ctx.rank, ctx.size, ["id"])
    torch.manual_seed(100 + ctx.rank)  # different on purpose: broadcast_parameters must fix it
    model = torch.nn.Linear(3, 1).to(ctx.device)
    own_init = torch.cat([p.detach().cpu().flatten() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    step_model, optimizer = ctx.prepare(model, optimizer, ddp_forward=ddp_forward)
    ctx.broadcast_parameters(model, optimizer)
    initial = torch.cat([p.detach().cpu().flatten() for p in model.parameters()])
    optimizer.zero_grad()
    _loss(step_model, _inputs(ctx.rank).to(ctx.device)).backward()
    optimizer.step()
    return {
        "rank": ctx.rank,
        "size": ctx.size,
        "ids": sorted(shard["id"].tolist()),
        "own_init": own_init,
        "initial": initial,
        "after": torch.cat([p.detach().cpu().flatten() for p in model.parameters()]),
        "mean_rank": ctx.allreduce_mean(ctx.rank),
        "from_main": ctx.broadcast_object({"rank": ctx.rank})["rank"],
        "threads": torch.get_num_threads(),
        "wrapped": step_model is not model,
    }


def expected_step(initial: torch.Tensor, size: int) -> torch.Tensor:
    """One SGD step on the gradient averaged over the ranks' inputs, computed in this process."""
    model = torch.nn.Linear(3, 1)
    torch.nn.utils.vector_to_parameters(initial, model.parameters())
    grads = []
    for rank in range(size):
        model.zero_grad()
        _loss(model, _inputs(rank)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return initial - LR * torch.stack(grads).mean(0)


@pytest.fixture(scope="module", autouse=True)
def workers_run_this_python(spark):
    """Horovod's ranks start inside Spark Python workers, which run PYSPARK_PYTHON (else ``python3`` on the
    PATH, which lacks horovod here) as read when the session started; on a local master, use ours."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spark.sparkContext, "pythonExec", sys.executable)
        yield


@pytest.fixture(scope="module")
def converter(spark, tmp_path_factory):
    conv = loaders.materialize(spark, spark.range(N_IDS), str(tmp_path_factory.mktemp("petastorm")), ranks=2)
    yield conv
    loaders.delete(conv)


@pytest.mark.parametrize(("backend", "ddp_forward"), [("horovod", True), ("torch", True), ("torch", False)])
def test_two_ranks_disjoint_shards_and_identical_weights(spark, converter, backend, ddp_forward):
    results = launch(spark, functools.partial(probe, converter, ddp_forward=ddp_forward), backend=backend,
                     num_proc=2)

    # DDP wraps the model only when the step goes through its forward; Horovod wraps the optimizer.
    assert [r["wrapped"] for r in results] == [backend == "torch" and ddp_forward] * 2

    assert [r["rank"] for r in results] == [0, 1]
    assert {r["size"] for r in results} == {2}
    ids0, ids1 = set(results[0]["ids"]), set(results[1]["ids"])
    assert ids0 and ids1
    assert not ids0 & ids1
    assert ids0 | ids1 == set(range(N_IDS))
    assert not torch.equal(results[0]["own_init"], results[1]["own_init"])
    assert torch.equal(results[0]["initial"], results[0]["own_init"])  # rank 0's weights won
    assert torch.equal(results[0]["initial"], results[1]["initial"])
    assert torch.equal(results[0]["after"], results[1]["after"])
    assert not torch.allclose(results[0]["after"], results[0]["initial"])
    torch.testing.assert_close(results[0]["after"], expected_step(results[0]["initial"], 2))
    assert [r["mean_rank"] for r in results] == [0.5, 0.5]
    assert [r["from_main"] for r in results] == [0, 0]
    assert [r["threads"] for r in results] == [max(1, host_cores() // 2)] * 2


def test_local_backend_one_rank_reads_everything(converter):
    (result,) = launch(None, functools.partial(probe, converter), backend="local", num_proc=1)

    assert result["rank"] == 0 and result["size"] == 1
    assert result["ids"] == list(range(N_IDS))
    torch.testing.assert_close(result["after"], expected_step(result["initial"], 1))
    assert result["mean_rank"] == 0.0


def test_more_ranks_than_task_slots_fails_fast(spark):
    slots = spark.sparkContext.defaultParallelism
    with pytest.raises(RecsysError, match="task slots"):
        launch(spark, probe, backend="horovod", num_proc=slots + 1)


def test_unknown_backend_and_local_with_many_ranks_are_refused(spark):
    with pytest.raises(RecsysError, match="unknown backend"):
        launch(spark, probe, backend="mpi", num_proc=1)
    with pytest.raises(RecsysError, match="one process"):
        launch(spark, probe, backend="local", num_proc=2)


# ------------------------------------------------------------------------- GRU4Rec under TorchDistributor

N_ITEMS = 12
SESSION_LENGTH = 6


def _pattern_sessions(n: int, seed: int = 0) -> list[list[int]]:
    """Sessions that walk the catalogue: the item after i is always (i + 1) mod N_ITEMS."""
    rng = np.random.default_rng(seed)
    return [[(int(start) + t) % N_ITEMS for t in range(int(length))]
            for start, length in zip(rng.integers(N_ITEMS, size=n), rng.integers(2, SESSION_LENGTH + 1, size=n),
                                     strict=True)]


class KeepsModel(GRU4RecTask):
    """GRU4RecTask that keeps the module it builds, so that every rank can report its own weights
    (the trainer returns weights from rank 0 only)."""

    def build_model(self) -> torch.nn.Module:
        self.built = super().build_model()
        return self.built


def train_gru4rec(converter, task: KeepsModel, steps: int, config: TrainConfig, ctx: DistContext) -> dict:
    shard = loaders.load_shard(converter, ctx.rank, ctx.size, list(task.columns))
    result = fit(task, ctx, shard, steps, config)
    return {"history": result.history, "weights": ckpt.cpu_state(task.built.state_dict()),
            "rows": len(shard[tb.ITEMS]), "returned": result.state_dict}


@pytest.mark.torch
def test_gru4rec_trains_with_torch_distributor_and_ranks_stay_identical(spark, tmp_path):
    sessions = _pattern_sessions(128)
    padded = [s + [PAD] * (SESSION_LENGTH - len(s)) for s in sessions]
    schema = T.StructType([T.StructField(tb.ITEMS, T.ArrayType(T.LongType()), False)])
    conv = loaders.materialize(spark, spark.createDataFrame([(row,) for row in padded], schema),
                               str(tmp_path / "petastorm"), ranks=2)
    counts = np.bincount(np.concatenate(sessions), minlength=N_ITEMS)
    params = GRU4RecNetParams(hidden=16, parallel=8, n_sample=6, dropout_hidden=0.0, loss="bpr-max", bpreg=0.5,
                           elu_param=0.5, seed=0)
    task = KeepsModel(params, N_ITEMS, item_counts=counts)
    config = TrainConfig(epochs=4, batch_size=16, lr=0.01, optimizer="adam", schedule="constant", progress=False)
    steps = loaders.steps_per_epoch(len(sessions), config.batch_size, 2)
    try:
        results = launch(spark, functools.partial(train_gru4rec, conv, task, steps, config), backend="torch",
                         num_proc=2)
    finally:
        loaders.delete(conv)

    assert sum(r["rows"] for r in results) == len(sessions) and min(r["rows"] for r in results) > 0
    history = results[0]["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert results[1]["history"] == history  # the mean loss over ranks, the same everywhere
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # Different shards on each rank, yet the same weights after every step: the gradients were averaged.
    w0, w1 = results[0]["weights"], results[1]["weights"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(torch.equal(w0[k], results[0]["returned"][k]) for k in w0) and results[1]["returned"] == {}
    initial = task.build_model().state_dict()
    assert not torch.allclose(w0["out_emb.weight"], initial["out_emb.weight"])
