"""What every torch model shares: Delta -> Petastorm -> N ranks -> weights, a validation hold-out, persistence.

``fit`` builds the training frame on Spark (the subclass's :meth:`TorchRecommender._training_data`),
materialises it once through Petastorm, and launches the subclass's training task
(:meth:`TorchRecommender._task`, a ``recsys_spark.train.trainer.TrainTask``) on ``num_proc`` ranks:
Horovod by default, TorchDistributor, or one local process. Rank 0 returns the weights of the best epoch
on the hold-out. Checkpoints and the Petastorm cache go under ``workdir`` (the pipeline sets it to the
model's run directory; a temporary directory otherwise).

Recommending is the subclass's: it scores on the executors through ``recsys_spark.scoring``, with the
network shipped as a broadcast :class:`~recsys_spark.scoring.ModuleSnapshot` (:meth:`snapshot`).

A saved model is ``weights.pt`` (a state_dict of tensors: ``torch.load(weights_only=True)``), ``model.json``
(hyper-parameters, the network's constructor arguments, the training history and where each rank ran)
and ``users/`` (the users it trained on, Parquet); subclasses add their own files.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.errors import RecsysError
from recsys_spark.models.base import Recommender, read_json
from recsys_spark.scoring import ModuleSnapshot, build_module
from recsys_spark.tables import require_columns
from recsys_spark.train import distributed, loaders
from recsys_spark.train.task import Holdout
from recsys_spark.train.trainer import ShardJob, TrainConfig, TrainJob

log = logging.getLogger(__name__)


def _seconds_to(history: list[dict[str, float]], epoch: int | None) -> float | None:
    """Wall seconds from the start of training to the end of ``epoch`` (its validation included)."""
    rows = [row for row in history if row["epoch"] == epoch and "elapsed_s" in row]
    return round(rows[0]["elapsed_s"], 3) if rows else None


class _Exported(Exception):  # noqa: N818 - not an error: export_training's way out of fit
    """Raised inside ``_fit`` once ``export_training`` has written its job."""


WEIGHTS_FILE = "weights.pt"
USERS_DIR = "users"
# Columns of the collected hold-out rows (see TorchRecommender._hold_out_last).
TARGET = "_target"
SEEN = "_seen"


class TorchParams(Section):
    """How a torch model trains: launcher, ranks, validation hold-out, optimisation (``train``), and its
    network (``net``, in the subclass).

    A partial ``train:`` or ``net:`` section keeps this model's own defaults for the keys it leaves out,
    not the generic ones of ``TrainConfig``."""

    backend: Literal["horovod", "torch", "local"] = "horovod"
    num_proc: int = Field(2, ge=1, description="training ranks (Spark task slots for horovod/torch)")
    resume: bool = Field(False, description="continue from the last checkpoint of this run")
    validation_users: int = Field(3000, ge=0, description="users whose last train item is held out to pick the "
                                                         "best epoch (all users, up to this many)")
    train: TrainConfig = TrainConfig()

    removed_keys: ClassVar[dict[str, str]] = {
        "users_per_block": "set recommend.users_per_block in pipeline.yaml (one setting for every model)"}

    @model_validator(mode="before")
    @classmethod
    def _sections_over_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name in ("train", "net"):
            given, field = data.get(name), cls.model_fields.get(name)
            if isinstance(given, dict) and field is not None:
                default = field.get_default(call_default_factory=True).model_dump()
                merged[name] = {**default, **given}
        return merged


class TorchRecommender(Recommender):
    """Training, hold-out and persistence of the torch models; subclasses choose data, task and scoring.

    Subclasses set ``network`` (the ``recsys_spark.nn`` class they train; or override
    :meth:`network_class`) and implement ``_training_data``, ``_task`` and ``_recommend``.
    """

    network: ClassVar[type]
    params_class: ClassVar[type[TorchParams]] = TorchParams

    def __init__(self, params: TorchParams | None = None) -> None:
        super().__init__(params)
        self.module = None
        self.history: list[dict[str, float]] = []
        self.training: dict[str, Any] = {}  # how training went: best epoch, steps to best, wall time
        self.ranks: list[dict[str, Any]] = []
        self._export_path: str | None = None  # set by export_training only
        self.n_users = self.n_items = 0
        self.item_counts: np.ndarray | None = None  # [n_items] train rows per item, as the fit counted them
        self._users: DataFrame | None = None

    def network_class(self) -> type:
        """The torch module class this model trains and serves."""
        return self.network

    # -- training -------------------------------------------------------------------------------
    def export_training(self, train: DataFrame, path: str) -> str:
        """Prepare everything ``fit`` would, then write the job of a single rank (a
        :class:`~recsys_spark.train.trainer.ShardJob`: task, validation data, every training row, steps
        per epoch at the global batch, config) to ``path`` with ``torch.save`` instead of training.

        Why: to time or debug the network and the trainer where Spark is not, e.g. on a lent GPU machine
        (``scripts/bench_training.py``): there ``torch.load(path, weights_only=False)(ctx)`` runs what rank 0
        of a one-rank ``fit`` would. Nothing of the model is fitted; returns ``path``.
        """
        self._export_path = path
        try:
            self.fit(train)
        except _Exported:
            return path
        finally:
            self._export_path = None
        raise RecsysError(f"{self.name}: fit finished without reaching the training step to export")

    def _fit(self, train: DataFrame) -> None:
        spark = train.sparkSession
        p: TorchParams = self.params
        sizes = train.agg(F.max(tb.USER_IDX), F.max(tb.ITEM_IDX)).first()
        if sizes[0] is None:
            raise RecsysError(f"{self.name}: the training data is empty")
        self.n_users, self.n_items = self._sizes(sizes[0] + 1, sizes[1] + 1)
        counts = train.groupBy(tb.ITEM_IDX).count().toPandas()
        item_counts = np.zeros(self.n_items)
        item_counts[counts[tb.ITEM_IDX].to_numpy()] = counts["count"].to_numpy()
        self.item_counts = item_counts
        self._users = train.select(tb.USER_IDX).distinct()

        ranks = 1 if p.backend == "local" else p.num_proc
        data, holdout = self._training_data(train)
        task = self._task(item_counts, holdout)
        workdir = self.workdir or tempfile.mkdtemp(prefix=f"recsys-{self.name}-")
        config = p.train.model_copy(update={"checkpoint_dir": os.path.join(workdir, "checkpoints"),
                                            "resume": p.resume})
        if holdout is None and config.early_stopping_metric:
            log.warning("%s: no validation data (validation_users=%d), so no early stopping on %s",
                        self.name, p.validation_users, config.early_stopping_metric)
            config = config.model_copy(update={"early_stopping_metric": None})
        converter = loaders.materialize(spark, data.select(*task.columns), os.path.join(workdir, "petastorm"),
                                        ranks=ranks)
        try:
            rows = len(converter)
            steps = loaders.steps_per_epoch(rows, config.batch_size, ranks)
            log.info("%s: %d training rows, %d ranks (%s), %d steps per epoch", self.name, rows, ranks,
                     p.backend, steps)
            if self._export_path is not None:  # export_training: one rank's job, every row in its shard
                import torch

                shard = loaders.load_shard(converter, 0, 1, list(task.columns))
                one_rank = loaders.steps_per_epoch(rows, config.batch_size, 1)
                torch.save(ShardJob(task, shard, one_rank, config), self._export_path)
                raise _Exported
            job = distributed.Located(TrainJob(task, converter, steps, config))
            results = distributed.launch(spark, job, p.backend, ranks, seed=config.seed)
        finally:
            loaders.delete(converter)
        result = results[0][0]
        self.ranks = [where for _, where in results]
        self.module = build_module(self.network_class(), result.init_kwargs, result.state_dict)
        samples = steps * loaders.rank_batch_size(config.batch_size, ranks) * ranks
        self.history = [{**row, "samples_per_s": samples / row["seconds"]} for row in result.history]
        self.training = {"best_epoch": result.best_epoch, "steps_to_best": result.best_step,
                         "steps_per_epoch": steps, "epochs_run": len(result.history),
                         "stopped_early": result.stopped_early, "train_seconds": round(result.seconds, 3),
                         "seconds_to_best": _seconds_to(result.history, result.best_epoch)}

    def _sizes(self, n_users: int, n_items: int) -> tuple[int, int]:
        """(users, items) the network is built for, given the training data's (largest index + 1)."""
        return n_users, n_items

    def _training_data(self, train: DataFrame) -> tuple[DataFrame, Any]:
        """(the frame the loader streams, with the task's ``columns``; the validation data or None)."""
        raise NotImplementedError

    def _task(self, item_counts: np.ndarray, holdout):
        """The ``TrainTask`` for this model's network, ``item_counts`` [n_items] train rows per item."""
        raise NotImplementedError

    # -- the validation hold-out ------------------------------------------------------------------
    def _validation_users(self, candidates: DataFrame, key: str = tb.USER_IDX) -> DataFrame:
        """A deterministic sample of ``validation_users`` rows of ``candidates`` by ``key`` (a hash of the
        key and the seed, not Spark's partitioning, so the same users whatever the cluster)."""
        n = self.params.validation_users
        return candidates.orderBy(F.xxhash64(key, F.lit(self.params.train.seed)), key).limit(n)

    def _hold_out_last(self, train: DataFrame, order: str = tb.LAST_TS) -> tuple[DataFrame, pd.DataFrame | None]:
        """(train rows less each validation user's latest item, the held-out rows or None).

        The one hold-out of the models that validate on next items. Validation users are drawn among those
        with >= 2 items; a user's latest item is the one with the largest ``order`` (ties: the last in id
        order, ``tables.item_tie``, as the splits break them). The held-out rows are collected to the
        driver, one per validation user, with ``user_idx``, ``_target`` and ``_seen`` (the user's other
        train items, filtered from the ranking).
        """
        require_columns(train, [order], f"{self.name} training data")
        multi = train.groupBy(tb.USER_IDX).count().filter(F.col("count") >= 2).select(tb.USER_IDX)
        by_user = Window.partitionBy(tb.USER_IDX).orderBy(F.desc(order), tb.item_tie(train).desc())
        latest = F.row_number().over(by_user)
        val_users = self._validation_users(multi).withColumn("_val", F.lit(True))
        ranked = train.join(val_users, tb.USER_IDX, "left").withColumn("_pos", latest)
        is_val = F.col("_val").isNotNull()
        fit_rows = ranked.filter(~(is_val & (F.col("_pos") == 1))).drop("_val", "_pos")
        if not self.params.validation_users:
            return fit_rows, None
        val = (
            ranked.filter(is_val)
            .groupBy(tb.USER_IDX)
            .agg(F.max(F.when(F.col("_pos") == 1, F.col(tb.ITEM_IDX))).alias(TARGET),
                 F.collect_list(F.when(F.col("_pos") > 1, F.col(tb.ITEM_IDX))).alias(SEEN))
            .orderBy(tb.USER_IDX)
            .toPandas()
        )
        log.info("%s: collected %d validation users to the driver", self.name, len(val))
        return fit_rows, (val if len(val) else None)

    @staticmethod
    def _holdout(inputs: np.ndarray, held: pd.DataFrame) -> Holdout:
        """The in-memory hold-out of ``held`` rows (see ``_hold_out_last``) with the network's ``inputs``."""
        return Holdout.from_lists(inputs, held[TARGET].to_numpy(), [list(s) for s in held[SEEN]])

    # -- scoring ----------------------------------------------------------------------------------
    def known_users(self) -> DataFrame:
        return self._users

    def snapshot(self) -> ModuleSnapshot:
        """The trained network as plain data, for a broadcast (see ``recsys_spark.scoring``)."""
        if self.module is None:
            raise RecsysError(f"{self.name} is not fitted: call fit() or load() first")
        return ModuleSnapshot.of(self.module)

    def _broadcast_network(self, spark: SparkSession):
        return spark.sparkContext.broadcast(self.snapshot())

    # -- persistence ------------------------------------------------------------------------------
    def _save_state(self, path: str) -> dict:
        import torch

        snapshot = self.snapshot()
        torch.save({k: torch.from_numpy(v) for k, v in snapshot.weights.items()}, os.path.join(path, WEIGHTS_FILE))
        self._users.write.mode("overwrite").parquet(os.path.join(path, USERS_DIR))
        self._save_extra(path)
        return {"init_kwargs": snapshot.init_kwargs, "n_users": self.n_users, "n_items": self.n_items,
                "params": self.params.model_dump(mode="json"), "history": self.history, "training": self.training,
                "ranks": self.ranks, **self._extra_meta()}

    def _extra_meta(self) -> dict[str, Any]:
        """What a subclass adds to model.json (plain JSON)."""
        return {}

    def _save_extra(self, path: str) -> None:
        """Files a subclass keeps beside the weights."""

    def _load_extra(self, spark: SparkSession, path: str, meta: dict[str, Any]) -> None:
        """Read back what ``_save_extra`` and ``_extra_meta`` wrote."""

    @classmethod
    def load(cls, spark: SparkSession, path: str) -> TorchRecommender:
        import torch

        meta = read_json(path)
        model = cls(cls.params_class.model_validate(meta["params"]))
        state = torch.load(os.path.join(path, WEIGHTS_FILE), weights_only=True)
        model.module = build_module(model.network_class(), meta["init_kwargs"], state)
        model.n_users, model.n_items, model.history = meta["n_users"], meta["n_items"], meta["history"]
        model.ranks, model.training = meta.get("ranks", []), meta.get("training", {})
        model._users = spark.read.parquet(os.path.join(path, USERS_DIR))
        model._load_extra(spark, path, meta)
        return model
