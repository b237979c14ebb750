"""One training function, three ways to run it: Horovod on Spark, torch DDP on Spark, or in this process.

``launch(spark, train_fn, backend, num_proc)`` runs ``train_fn(ctx)`` on every rank and returns the ranks'
results, rank 0's first. ``ctx`` (a :class:`DistContext`) hides the backend: rank and size, the device
(chosen in :func:`pick_device` only), ``prepare`` (Horovod wraps the optimizer, DDP wraps the model),
``broadcast_parameters``, ``broadcast_object`` and ``allreduce_mean``.

Gradient averaging under ``torch``: DistributedDataParallel reduces gradients only for outputs computed
through its ``forward``. A training step that calls other methods of the model (GRU4Rec steps its GRU
through ``forward_step``, many times per backward) asks ``prepare(..., ddp_forward=False)`` instead: the
model stays bare and the optimizer averages every gradient over the ranks (one ``all_reduce`` per
parameter) right before each ``step``, as Horovod's ``DistributedOptimizer`` does for every model.

``train_fn`` and what it closes over are pickled and shipped to the ranks: close over the Petastorm
converter and plain configs, never the SparkSession or a DataFrame. A function defined
in a module the ranks cannot import (a script, a test file) must be registered with cloudpickle's
``register_pickle_by_value``.

Each rank sets ``torch.set_num_threads(cores // ranks on its host)`` (two ranks on two cores otherwise run
slower than one) and seeds random, numpy and torch from ``seed`` and its rank, so negative sampling differs
between ranks; identical model weights come from ``broadcast_parameters``, not from the seed.

torch and horovod are imported inside the functions: the driver side of ``launch`` is Spark code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pyspark.sql import SparkSession

from recsys_spark.errors import RecsysError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Backend = Literal["horovod", "torch", "local"]
BACKENDS: tuple[str, ...] = ("horovod", "torch", "local")
R = TypeVar("R")


def pick_device(local_rank: int, local_size: int) -> torch.device:
    """The one place the device is chosen: GPU ``local_rank`` when every rank on this host gets its own
    GPU, the CPU otherwise (two ranks cannot share one GPU under NCCL)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= local_size:
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a DistributedDataParallel wrapper (or the module itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def host_cores() -> int:
    """CPU cores this process may run on (the affinity mask, which containers and Spark may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def rank_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed derived from ``seed`` and ``keys`` (rank, epoch): distinct streams, reproducible."""
    import numpy as np

    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch's covers CUDA too)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class DistContext(ABC):
    """What a training function needs to know about its rank, whatever the backend.

    Collectives (``broadcast_*``, ``allreduce_mean``) must be called by every rank in the same order.
    """

    backend: ClassVar[str]

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int) -> None:
        self.rank = rank
        self.size = size
        self.local_rank = local_rank
        self.local_size = local_size
        self.device = pick_device(local_rank, local_size)

    @property
    def is_main(self) -> bool:
        """Rank 0 validates, writes checkpoints and returns the weights."""
        return self.rank == 0

    def threads(self) -> int:
        """Intra-op threads for this rank: the host's cores shared by the ranks on the host."""
        return max(1, host_cores() // self.local_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, device={self.device})"

    @abstractmethod
    def prepare(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ddp_forward: bool = True
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Make ``model`` (already on ``self.device``) and its optimizer average gradients across ranks.

        Returns the module to call in the training step and the optimizer to step. Keep a reference to
        the unwrapped ``model`` for validation and checkpoints (DDP prefixes its state_dict keys).
        ``ddp_forward=False``: the step computes outputs outside ``model.forward`` (or calls it several
        times per backward), so the module must not be wrapped in DDP; gradients are averaged in the
        optimizer's ``step`` instead (only the ``torch`` backend tells the two apart).
        """

    @abstractmethod
    def broadcast_parameters(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Overwrite every rank's weights and buffers (and optimizer state, when given) with rank 0's."""

    @abstractmethod
    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled: keep it small)."""

    @abstractmethod
    def allreduce_mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks."""


class LocalContext(DistContext):
    """A single rank in this process: every collective is the identity."""

    backend = "local"

    def __init__(self) -> None:
        super().__init__(rank=0, size=1, local_rank=0, local_size=1)

    def prepare(self, model, optimizer, ddp_forward=True):
        return model, optimizer

    def broadcast_parameters(self, model, optimizer=None) -> None:
        return None

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def allreduce_mean(self, value: float) -> float:
        return float(value)


class HorovodContext(DistContext):
    """A Horovod rank (Gloo on CPU, NCCL for CUDA tensors when Horovod was built with it)."""

    backend = "horovod"

    def __init__(self) -> None:
        import horovod.torch as hvd

        hvd.init()
        self._hvd = hvd
        super().__init__(rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(), local_size=hvd.local_size())

    def prepare(self, model, optimizer, ddp_forward=True):
        # DistributedOptimizer averages in step() whatever the step called: no DDP-style restriction.
        wrapped = self._hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
        return model, wrapped

    def broadcast_parameters(self, model, optimizer=None) -> None:
        self._hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        if optimizer is not None:
            # Not hvd.broadcast_optimizer_state: on an empty state it takes a zero-gradient step first,
            # which applies AdamW's weight decay and advances Adam's step count on every rank.
            state = self.broadcast_object(optimizer.state_dict())
            if not self.is_main:
                optimizer.load_state_dict(state)

    def broadcast_object(self, obj: Any) -> Any:
        # Horovod matches collectives by name and names this one after type(obj) by default, which
        # differs when other ranks pass a placeholder (None): a fixed name, since the call is blocking.
        return self._hvd.broadcast_object(obj, root_rank=0, name="recsys.broadcast_object")

    def allreduce_mean(self, value: float) -> float:
        import torch

        tensor = torch.tensor([float(value)], dtype=torch.float64)
        return float(self._hvd.allreduce(tensor, op=self._hvd.Average).item())


class TorchContext(DistContext):
    """A torch.distributed rank started by torchrun (TorchDistributor): NCCL on GPU, Gloo on CPU."""

    backend = "torch"

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        super().__init__(rank=rank, size=size, local_rank=local_rank, local_size=local_size)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        self._dist = dist
        # TorchDistributor outside local mode starts one torchrun per Spark task, so LOCAL_WORLD_SIZE is 1
        # even when several tasks share a host; count the ranks per host for the thread budget instead.
        hosts = [None] * size
        dist.all_gather_object(hosts, socket.gethostname())
        self._ranks_on_host = max(1, hosts.count(socket.gethostname()))

    def threads(self) -> int:
        return max(1, host_cores() // self._ranks_on_host)

    def prepare(self, model, optimizer, ddp_forward=True):
        if not ddp_forward:  # the bare model; the optimizer averages the gradients before every step
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer.register_step_pre_hook(lambda *_: self.average_gradients(params))
            return model, optimizer
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids), optimizer

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its mean over the ranks (every rank, same order).

        A missing gradient counts as zeros, so every rank joins every ``all_reduce`` and steps the same
        parameters: ranks that start equal stay equal.
        """
        import torch

        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            self._dist.all_reduce(param.grad)
            param.grad.div_(self.size)

    def broadcast_parameters(self, model, optimizer=None) -> None:
        for tensor in model.state_dict().values():
            self._dist.broadcast(tensor, src=0)
        if optimizer is not None:
            state = self.broadcast_object(optimizer.state_dict())
            if not self.is_main:
                optimizer.load_state_dict(state)

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def allreduce_mean(self, value: float) -> float:
        import torch

        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self._dist.all_reduce(tensor)
        return float(tensor.item()) / self.size

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        out = [None] * self.size
        self._dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        self._dist.destroy_process_group()


def _run_rank(ctx: DistContext, train_fn: Callable[[DistContext], R], seed: int) -> R:
    """Thread budget, per-rank seeds, then the user's function."""
    import torch

    torch.set_num_threads(ctx.threads())
    seed_everything(rank_seed(seed, ctx.rank))
    log.info("%r: %d threads", ctx, torch.get_num_threads())
    return train_fn(ctx)


def _horovod_main(train_fn: Callable[[DistContext], R], seed: int) -> R:
    """Entry point of a Horovod rank (shipped by horovod.spark.run, so module level)."""
    return _run_rank(HorovodContext(), train_fn, seed)


def _torch_main(train_fn: Callable[[DistContext], R], seed: int) -> bytes:
    """Entry point of a torchrun rank: every rank's result, pickled once by rank 0.

    TorchDistributor in local mode has every rank write its return value to the same output file, so all
    ranks return the very same bytes (rank 0's pickle of the gathered list), whatever order they write in.
    """
    from pyspark import cloudpickle

    ctx = TorchContext()
    try:
        results = ctx.gather_objects(_run_rank(ctx, train_fn, seed))
        return ctx.broadcast_object(cloudpickle.dumps(results) if ctx.is_main else None)
    finally:
        ctx.close()


def _check_slots(spark: SparkSession, num_proc: int, backend: str) -> None:
    """Fail now rather than wait: every rank holds one Spark task slot for the whole run."""
    slots = spark.sparkContext.defaultParallelism
    if slots < num_proc:
        raise RecsysError(
            f"backend {backend!r} needs {num_proc} free Spark task slots but this session has {slots} "
            f"(spark.default.parallelism / executor cores): lower num_proc or give Spark more cores"
        )


def _spark_has_gpus(spark: SparkSession, local_mode: bool) -> bool:
    """Whether Spark schedules GPUs: driver GPU resources in local mode, task GPUs otherwise."""
    if local_mode:
        return "gpu" in spark.sparkContext.resources
    return float(spark.conf.get("spark.task.resource.gpu.amount", "0")) >= 1


def launch(
    spark: SparkSession | None,
    train_fn: Callable[[DistContext], R],
    backend: Backend = "horovod",
    num_proc: int = 1,
    seed: int = 0,
    start_timeout: int = 120,
) -> list[R]:
    """Run ``train_fn(ctx)`` on ``num_proc`` ranks and return their results, rank 0's first.

    - ``horovod``: ``horovod.spark.run`` (Gloo controller; NCCL for CUDA tensors when built with it); each
      rank is a Spark task, so the session needs ``num_proc`` free task slots.
    - ``torch``: ``TorchDistributor`` (torchrun; DDP, or averaging in the optimizer for ``ddp_forward=False``):
      on the driver for a ``local[...]`` master, as a Spark barrier job on a cluster. GPUs are used when
      Spark schedules them.
    - ``local``: ``train_fn`` in this process with a single-rank context (``num_proc`` must be 1).

    ``start_timeout`` bounds how long Horovod waits for its tasks to start.
    """
    if backend not in BACKENDS:
        raise RecsysError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if num_proc < 1:
        raise RecsysError(f"num_proc must be >= 1, got {num_proc}")
    if backend == "local":
        if num_proc != 1:
            raise RecsysError(f"backend 'local' runs one process; got num_proc={num_proc}")
        return [_launch_local(train_fn, seed)]
    if spark is None:
        raise RecsysError(f"backend {backend!r} needs a SparkSession")
    log.info("launching %d %s ranks", num_proc, backend)
    if backend == "horovod":
        return _launch_horovod(spark, train_fn, num_proc, seed, start_timeout)
    return _launch_torch(spark, train_fn, num_proc, seed)


def run_one_rank(train_fn: Callable[[DistContext], R], backend: Literal["torch", "local"] = "torch",
                 seed: int = 0) -> R:
    """``train_fn`` as the only rank of a job in this process, without Spark: ``torch`` is a one-rank
    torch.distributed group (NCCL on a GPU, Gloo on the CPU: the collectives a ``torch`` rank runs),
    ``local`` the plain :class:`LocalContext`. For timing or debugging a job exported with
    ``TorchRecommender.export_training`` where Spark is not (``scripts/bench_training.py``)."""
    if backend == "local":
        return _launch_local(train_fn, seed)
    if backend != "torch":
        raise RecsysError(f"run_one_rank runs 'torch' or 'local', not {backend!r}")
    import torch

    with socket.socket() as probe:  # a free port for the group's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    threads = torch.get_num_threads()
    ctx = TorchContext()
    try:
        return _run_rank(ctx, train_fn, seed)
    finally:
        ctx.close()
        torch.set_num_threads(threads)


def _launch_local(train_fn: Callable[[DistContext], R], seed: int) -> R:
    import torch

    threads = torch.get_num_threads()
    try:
        return _run_rank(LocalContext(), train_fn, seed)
    finally:
        torch.set_num_threads(threads)


def _launch_horovod(
    spark: SparkSession, train_fn: Callable[[DistContext], R], num_proc: int, seed: int, start_timeout: int
) -> list[R]:
    import horovod.spark

    _check_slots(spark, num_proc, "horovod")
    return horovod.spark.run(
        _horovod_main, args=(train_fn, seed), num_proc=num_proc, use_gloo=True, start_timeout=start_timeout
    )


def _launch_torch(spark: SparkSession, train_fn: Callable[[DistContext], R], num_proc: int, seed: int) -> list[R]:
    from pyspark.ml.torch.distributor import TorchDistributor

    local_mode = spark.sparkContext.master.startswith("local")
    if not local_mode:
        _check_slots(spark, num_proc, "torch")
    distributor = TorchDistributor(
        num_processes=num_proc, local_mode=local_mode, use_gpu=_spark_has_gpus(spark, local_mode)
    )
    from pyspark import cloudpickle

    payload = distributor.run(_torch_main, train_fn, seed)
    if not isinstance(payload, bytes):
        raise RecsysError(f"TorchDistributor returned {type(payload).__name__}, not the ranks' results")
    return cloudpickle.loads(payload)


@dataclass
class Located:
    """Runs a rank function and reports where it ran: ``(result, rank_location(rank))`` per rank, so a
    run can show (and a test assert) that its ranks were separate processes on separate executors."""

    train_fn: Callable[[DistContext], Any]

    def __call__(self, ctx: DistContext) -> tuple[Any, dict[str, Any]]:
        return self.train_fn(ctx), rank_location(ctx.rank)


def rank_location(rank: int) -> dict[str, Any]:
    """This process's id and host, and the pid of the Spark executor JVM it descends from (None on a
    local master, where tasks run inside the driver)."""
    import psutil

    executor = None
    for parent in psutil.Process().parents():
        with contextlib.suppress(psutil.Error):
            if "CoarseGrainedExecutorBackend" in " ".join(parent.cmdline()):
                executor = parent.pid
                break
    return {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "executor_pid": executor}
