"""Real ranks on the shared local[2] session: shards are disjoint and complete, and one optimizer step on
rank-dependent data leaves identical weights everywhere, equal to the step on the averaged gradient."""

from __future__ import annotations

import functools
import sys

import cloudpickle
import pytest
import torch
from pyspark import cloudpickle as spark_cloudpickle

from recsys_spark.errors import RecsysError
from recsys_spark.train import loaders
from recsys_spark.train.distributed import DistContext, host_cores, launch

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


def probe(converter, ctx: DistContext) -> dict:
    """Report the ids this rank loaded and the weights before and after one distributed step."""
    shard = loaders.load_shard(converter, ctx.rank, ctx.size, ["id"])
    torch.manual_seed(100 + ctx.rank)  # different on purpose: broadcast_parameters must fix it
    model = torch.nn.Linear(3, 1).to(ctx.device)
    own_init = torch.cat([p.detach().cpu().flatten() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    step_model, optimizer = ctx.prepare(model, optimizer)
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


@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_two_ranks_disjoint_shards_and_identical_weights(spark, converter, backend):
    results = launch(spark, functools.partial(probe, converter), backend=backend, num_proc=2)

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
