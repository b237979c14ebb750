"""Deep models behind the common ``Recommender`` interface: Delta -> Petastorm -> N ranks -> Spark scoring.

``fit`` builds the training frame on Spark, materialises it once through Petastorm, and launches the
same training function on ``num_proc`` ranks (Horovod by default, TorchDistributor, or one local
process); rank 0 returns the weights. ``recommend`` scores on the executors with the weights broadcast,
by blocks of users, and shares the seen-item filter and top-k selection of ``recsys_spark.recommend``.

Checkpoints and the Petastorm cache go under ``workdir`` (the pipeline sets it to the model's run
directory; a temporary directory otherwise).

The models: NCF (user, item pairs), SASRec and GRU4Rec (each user's time-ordered train items as one
sequence, or for GRU4Rec one long session; ``GRU4RecRecommender.fit_sessions`` trains on real sessions
instead, for the next-item protocol of ``recsys_spark.evaluate_sessions``), and DeepFM (user and item
features from the warehouse; the full catalogue, or another model's top-N re-ranked: two stages).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark import recommend as rec
from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data import features
from recsys_spark.data.sequences import user_sequences
from recsys_spark.errors import RecsysError
from recsys_spark.models.base import Recommender, require_columns
from recsys_spark.train.tasks import NCFParams, SASRecParams
from recsys_spark.train.tasks_extra import DeepFMParams, GRU4RecParams
from recsys_spark.train.trainer import TrainConfig

log = logging.getLogger(__name__)

EMBEDDING = rec.EMBEDDING
_TARGET = "_target"
_SEEN = "_seen"
_KEY = "_key"  # a training row's key: user_idx (user histories) or session_id (sessions)
_CANDIDATES = "_candidates"
# DeepFM runs every (query, item) pair through its MLP: at most this many pairs per forward pass.
DEEPFM_MAX_ROWS = 1 << 16


class DeepParams(Section):
    """How a deep model trains: launcher, ranks, validation hold-out, optimisation (``train``)."""

    backend: Literal["horovod", "torch", "local"] = "horovod"
    num_proc: int = Field(2, ge=1, description="training ranks (Spark task slots for horovod/torch)")
    resume: bool = Field(False, description="continue from the last checkpoint of this run")
    validation_users: int = Field(500, ge=0, description="users whose last train item picks the best epoch")
    users_per_block: int = Field(1024, gt=0, description="users scored per forward pass when recommending")
    train: TrainConfig = TrainConfig()


class NCFModelParams(DeepParams):
    net: NCFParams = NCFParams()
    train: TrainConfig = TrainConfig(epochs=20, batch_size=256, early_stopping_metric="ndcg@10", patience=3)


class SASRecModelParams(DeepParams):
    net: SASRecParams = SASRecParams()
    train: TrainConfig = TrainConfig(epochs=200, batch_size=128, early_stopping_metric="ndcg@10", patience=10)


class GRU4RecModelParams(DeepParams):
    """GRU4Rec through the shared trainer: a batch is ``train.batch_size`` whole sequences (sessions), run
    session-parallel over ``net.parallel`` rows; 64 per batch with Adam at lr 0.005 matched the paper's
    schedule (``GRU4RecParams.batch_sessions``). ``net.optimizer``, ``net.lr`` and ``net.epochs`` belong to
    the one-process ``fit_session_parallel`` and are not used here. Validation: the whole sequences of
    ``validation_users`` users (sessions, for ``fit_sessions``), held out of training and scored with the
    next-item protocol (recall@20, mrr@20, ndcg@20). Every backend works: the GRU is stepped outside
    ``forward``, so under ``torch`` the model is not wrapped in DDP and the optimizer averages the
    gradients over the ranks before each step (``GRU4RecTask.ddp_forward``)."""

    net: GRU4RecParams = GRU4RecParams()
    train: TrainConfig = TrainConfig(epochs=10, batch_size=64, lr=0.005, optimizer="adam", schedule="constant",
                                     early_stopping_metric="recall@20", patience=3)


class DeepFMModelParams(DeepParams):
    """DeepFM over ``silver/user_features`` and ``silver/item_features`` (``recsys-spark features``).

    ``candidates``: re-rank the top ``candidates_k`` of that model's rows of gold/recommendations for the
    same run date instead of scoring the whole catalogue (the two-stage design: a cheap model retrieves,
    DeepFM ranks); the candidate model must recommend first. ``net.lr``, ``net.batch_size`` and
    ``net.epochs`` are not used here: ``train`` holds the optimisation."""

    net: DeepFMParams = DeepFMParams()
    train: TrainConfig = TrainConfig(epochs=20, batch_size=256, optimizer="adam", schedule="constant",
                                     early_stopping_metric="ndcg@10", patience=3)
    candidates: str | None = Field(None, description="model whose gold/recommendations rows are re-ranked")
    candidates_k: int = Field(100, gt=0, description="candidates per user: the candidate model's top ranks")
    fusion: Literal["none", "rrf"] = Field(
        "none", description="with candidates: none = DeepFM's order alone; rrf = reciprocal-rank fusion "
                            "(Cormack et al. 2009) of DeepFM's rank and the candidate model's rank")
    rrf_k: float = Field(60.0, gt=0, description="rrf: score = 1/(rrf_k + rank) summed over both rankings")
    max_catalogue: int = Field(50_000, gt=0, description="largest catalogue scored in full without candidates")


def _module_class(kind: str):
    from recsys_spark.models import deepfm, gru4rec, ncf, sasrec

    return {"gmf": ncf.GMF, "mlp": ncf.MLP, "neumf": ncf.NeuMF, "sasrec": sasrec.SASRec,
            "gru4rec": gru4rec.GRU4Rec, "deepfm": deepfm.DeepFM}[kind]


def build_module(kind: str, init_kwargs: dict[str, Any], state: dict[str, Any] | None = None):
    """A torch module of ``kind`` from its constructor arguments, with weights when given (eval mode)."""
    import torch

    module = _module_class(kind)(**init_kwargs)
    if state is not None:
        module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return module.eval()


class TorchRecommender(Recommender):
    """Shared training and persistence of the torch models; subclasses choose data, task and scoring."""

    kind: str

    def __init__(self, params: DeepParams | None = None) -> None:
        super().__init__(params or self.params_class())
        self.module = None
        self.history: list[dict[str, float]] = []
        self.ranks: list[dict[str, Any]] = []
        self.n_users = self.n_items = 0
        self._users: DataFrame | None = None

    params_class: ClassVar[type[DeepParams]] = DeepParams

    # -- training -------------------------------------------------------------------------------
    def _fit(self, train: DataFrame) -> None:
        from recsys_spark.train import distributed, loaders
        from recsys_spark.train.trainer import TrainJob

        spark = train.sparkSession
        p: DeepParams = self.params
        sizes = train.agg(F.max(tb.USER_IDX), F.max(tb.ITEM_IDX)).first()
        if sizes[0] is None:
            raise RecsysError(f"{self.name}: the training data is empty")
        self.n_users, self.n_items = self._sizes(sizes[0] + 1, sizes[1] + 1)
        counts = train.groupBy(tb.ITEM_IDX).count().toPandas()
        item_counts = np.zeros(self.n_items)
        item_counts[counts[tb.ITEM_IDX].to_numpy()] = counts["count"].to_numpy()
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
            job = LocatedJob(TrainJob(task, converter, steps, config))
            results = distributed.launch(spark, job, p.backend, ranks, seed=config.seed)
        finally:
            loaders.delete(converter)
        result = results[0][0]
        self.ranks = [where for _, where in results]
        module = task.build_model()
        module.load_state_dict(result.state_dict)
        self.module = module.eval()
        samples = steps * config.batch_size * ranks
        self.history = [{**row, "samples_per_s": samples / row["seconds"]} for row in result.history]

    def _sizes(self, n_users: int, n_items: int) -> tuple[int, int]:
        """(users, items) the module is built for, given the training data's (largest index + 1)."""
        return n_users, n_items

    def _training_data(self, train: DataFrame) -> tuple[DataFrame, Any]:
        raise NotImplementedError

    def _task(self, item_counts: np.ndarray, holdout):
        raise NotImplementedError

    def _validation_users(self, candidates: DataFrame) -> DataFrame:
        """A deterministic sample of ``validation_users`` users (by hash, not by Spark's partitioning)."""
        n = self.params.validation_users
        return candidates.orderBy(F.xxhash64(tb.USER_IDX, F.lit(self.params.train.seed)), tb.USER_IDX).limit(n)

    def _hold_out_last(self, train: DataFrame) -> tuple[DataFrame, pd.DataFrame | None]:
        """(train pairs less each validation user's most recent item, the held-out rows or None).

        Validation users are drawn among those with >= 2 items; the held-out rows, collected (one per
        validation user), hold user_idx, ``_target`` (ties on last_ts: the larger item_idx) and ``_seen``
        (the user's other train items)."""
        require_columns(train, [tb.LAST_TS], f"{self.name} training data")
        pairs = train.select(tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT, tb.LAST_TS)
        multi = pairs.groupBy(tb.USER_IDX).count().filter(F.col("count") >= 2).select(tb.USER_IDX)
        last = F.row_number().over(
            Window.partitionBy(tb.USER_IDX).orderBy(F.desc(tb.LAST_TS), F.desc(tb.ITEM_IDX))
        )
        val_users = self._validation_users(multi)
        ranked = pairs.join(val_users.withColumn("_val", F.lit(True)), tb.USER_IDX, "left").withColumn("_pos", last)
        held = (F.col("_val") == True) & (F.col("_pos") == 1)  # noqa: E712 - Spark column comparison
        fit_rows = ranked.filter(~held | F.col("_val").isNull()).select(tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT)
        if not self.params.validation_users:
            return fit_rows, None
        val = (
            ranked.filter(F.col("_val") == True)  # noqa: E712
            .groupBy(tb.USER_IDX)
            .agg(F.max(F.when(F.col("_pos") == 1, F.col(tb.ITEM_IDX))).alias(_TARGET),
                 F.collect_list(F.when(F.col("_pos") > 1, F.col(tb.ITEM_IDX))).alias(_SEEN))
            .orderBy(tb.USER_IDX)
            .toPandas()
        )
        log.info("%s: collected %d validation users to the driver", self.name, len(val))
        return fit_rows, (val if len(val) else None)

    # -- scoring ----------------------------------------------------------------------------------
    def known_users(self) -> DataFrame:
        return self._users

    def _weights(self) -> dict[str, np.ndarray]:
        if self.module is None:
            raise RecsysError(f"{self.name} is not fitted")
        return {k: v.detach().cpu().numpy() for k, v in self.module.state_dict().items()}

    def _broadcast_module(self, spark: SparkSession):
        return spark.sparkContext.broadcast((self.kind, self.module.init_kwargs, self._weights()))

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        import torch

        os.makedirs(path, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                   os.path.join(path, "weights.pt"))
        meta = {"model": self.name, "kind": self.kind, "init_kwargs": self.module.init_kwargs,
                "n_users": self.n_users, "n_items": self.n_items, "params": self.params.model_dump(mode="json"),
                "history": self.history, "ranks": self.ranks, **self._extra_meta()}
        with open(os.path.join(path, "model.json"), "w") as fh:
            json.dump(meta, fh, indent=2)
        self._users.write.mode("overwrite").parquet(os.path.join(path, "users"))

    def _extra_meta(self) -> dict[str, Any]:
        """What a subclass adds to model.json (plain JSON)."""
        return {}

    @staticmethod
    def _read_meta(path: str) -> dict[str, Any]:
        with open(os.path.join(path, "model.json")) as fh:
            return json.load(fh)

    @classmethod
    def load(cls, spark: SparkSession, path: str) -> TorchRecommender:
        import torch

        with open(os.path.join(path, "model.json")) as fh:
            meta = json.load(fh)
        model = cls(cls.params_class.model_validate(meta["params"]))
        state = torch.load(os.path.join(path, "weights.pt"), weights_only=True)
        model.module = build_module(meta["kind"], meta["init_kwargs"], state)
        model.n_users, model.n_items, model.history = meta["n_users"], meta["n_items"], meta["history"]
        model.ranks = meta.get("ranks", [])
        model._users = spark.read.parquet(os.path.join(path, "users"))
        return model


class NCFRecommender(TorchRecommender):
    """NCF (GMF, MLP or NeuMF) trained on (user, item) pairs with sampled negatives."""

    name = "ncf"
    params_class = NCFModelParams

    @property
    def kind(self) -> str:
        return self.params.net.model

    def _training_data(self, train: DataFrame):
        from recsys_spark.train.tasks import Holdout

        fit_rows, val = self._hold_out_last(train)
        holdout = None
        if val is not None:
            holdout = Holdout.from_lists(val[tb.USER_IDX].to_numpy(), val[_TARGET].to_numpy(),
                                         [list(s) for s in val[_SEEN]])
        return fit_rows.select(tb.USER_IDX, tb.ITEM_IDX, F.col(tb.WEIGHT).cast("float").alias(tb.WEIGHT)), holdout

    def _task(self, item_counts, holdout):
        from recsys_spark.train.tasks import NCFTask

        return NCFTask(self.params.net, self.n_users, self.n_items, item_counts, holdout)

    def user_factors(self) -> DataFrame | None:
        return self._factor_frame(0, tb.USER_IDX)

    def item_factors(self) -> DataFrame | None:
        return self._factor_frame(1, tb.ITEM_IDX)

    def _factor_frame(self, side: int, idx_col: str) -> DataFrame | None:
        pair = self.module.user_item_embeddings()
        if pair is None:  # the MLP variant has no dot-product embeddings
            return None
        return matrix_frame(pair[side].detach().cpu().numpy(), idx_col)

    def _recommend(self, users, k, seen, exclude_items):
        spark = users.sparkSession
        model = self._broadcast_module(spark)
        n_items = self.n_items

        def scores(part: pd.DataFrame) -> np.ndarray:
            import torch

            module = _cached_module(model)
            with torch.no_grad():
                user_ids = torch.as_tensor(part[tb.USER_IDX].to_numpy(), dtype=torch.long)
                return module.score_all(user_ids).float().numpy()

        known = users.join(self._users, tb.USER_IDX, "left_semi")
        return rec.top_k_from_scores(known, scores, np.arange(n_items, dtype=np.int32), k, seen, exclude_items,
                                     self.params.users_per_block)


class SASRecRecommender(TorchRecommender):
    """SASRec over each user's train sequence; recommends from the representation of the last position."""

    name = "sasrec"
    kind = "sasrec"
    params_class = SASRecModelParams

    def _fit(self, train: DataFrame) -> None:
        require_columns(train, [tb.FIRST_TS], "sasrec training data")
        self._sequences = user_sequences(train, self.params.net.max_len).localCheckpoint()
        super()._fit(train)

    def _training_data(self, train: DataFrame):
        from recsys_spark.train.tasks import Holdout

        seqs = self._sequences
        long_enough = seqs.filter(F.col(tb.LENGTH) >= 3).select(tb.USER_IDX)
        val = self._validation_users(long_enough).withColumn("_val", F.lit(True))
        shifted = F.concat(F.array(F.lit(tb.PAD_IDX)), F.slice(tb.ITEMS, 1, self.params.net.max_len - 1))
        marked = seqs.join(val, tb.USER_IDX, "left")
        is_val = F.col("_val").isNotNull()
        fit_rows = marked.select(F.when(is_val, shifted).otherwise(F.col(tb.ITEMS)).alias(tb.ITEMS))
        holdout = None
        if self.params.validation_users:
            pdf = (
                marked.filter(is_val)
                .select(tb.USER_IDX, shifted.alias("_input"), F.element_at(tb.ITEMS, -1).alias(_TARGET))
                .orderBy(tb.USER_IDX).toPandas()
            )
            inputs = np.stack(pdf["_input"].to_numpy()).astype(np.int64) if len(pdf) else np.zeros((0, 1), np.int64)
            seen = [[i for i in row if i != tb.PAD_IDX] for row in inputs]
            holdout = Holdout.from_lists(inputs, pdf[_TARGET].to_numpy(), seen)
        return fit_rows, holdout

    def _task(self, item_counts, holdout):
        from recsys_spark.train.tasks import SASRecTask

        return SASRecTask(self.params.net, self.n_items, item_counts, holdout)

    def _user_vectors(self, users: DataFrame) -> DataFrame:
        """(user_idx, embedding): the last position's hidden state over each user's sequence."""
        return sequence_vectors(self._sequences, users, self._broadcast_module(users.sparkSession),
                                self.params.users_per_block)

    def user_factors(self) -> DataFrame:
        return self._user_vectors(self._users)

    def item_factors(self) -> DataFrame:
        return matrix_frame(self.module.item_embeddings().detach().cpu().numpy(), tb.ITEM_IDX)

    def _recommend(self, users, k, seen, exclude_items):
        return rec.top_k_from_factors(self._user_vectors(users), self.item_factors(), k, seen, exclude_items,
                                      self.params.users_per_block)

    def save(self, path: str) -> None:
        super().save(path)
        self._sequences.write.mode("overwrite").parquet(os.path.join(path, "sequences"))

    @classmethod
    def load(cls, spark: SparkSession, path: str) -> SASRecRecommender:
        model = super().load(spark, path)
        model._sequences = spark.read.parquet(os.path.join(path, "sequences"))
        return model


class GRU4RecRecommender(TorchRecommender):
    """GRU4Rec (Hidasi et al. 2016) at the user level: each user's train items in time order (first
    interaction; the last ``net.max_length``, as SASRec's ``user_sequences``) are one long session.

    ``recommend`` runs the GRU over each user's sequence on the executors; the final output h scores item
    j as ``<h, W_j> + b_j``, expressed as user factors ``[h, 1]`` and item factors ``[W_j, b_j]`` so the
    shared dot-product top-k applies (and gold/*_embeddings get those vectors). :meth:`fit_sessions`
    trains the same model on real sessions (``silver/sessions``) for the next-item protocol; such a model
    scores sessions (:meth:`scorer`), not users.
    """

    name = "gru4rec"
    kind = "gru4rec"
    params_class = GRU4RecModelParams

    def __init__(self, params: GRU4RecModelParams | None = None) -> None:
        super().__init__(params)
        self._sequences: DataFrame | None = None  # (user_idx, items, length): what recommend encodes
        self._rows: DataFrame | None = None  # training rows (_key, items, length)
        self._min_items = 0

    def _fit(self, train: DataFrame) -> None:
        require_columns(train, [tb.FIRST_TS], "gru4rec training data")
        self._sequences = user_sequences(train, self.params.net.max_length).localCheckpoint()
        self._rows = self._sequences.withColumnRenamed(tb.USER_IDX, _KEY)
        self._min_items = 0
        super()._fit(train)

    def fit_sessions(self, sessions: DataFrame, n_items: int | None = None) -> GRU4RecRecommender:
        """Train on sessions (``silver/sessions`` rows: session_id, user_idx, item_idx, position), each
        session one sequence (its last ``net.max_length`` items). ``n_items``: the catalogue the scores
        cover (default: the largest item_idx of ``sessions`` + 1); items of later sessions must be in it."""
        from recsys_spark.evaluate_sessions import session_item_arrays

        require_columns(sessions, [tb.SESSION_ID, tb.USER_IDX, tb.ITEM_IDX, tb.POSITION], "gru4rec sessions")
        arrays = session_item_arrays(sessions, min_length=2, max_length=self.params.net.max_length)
        self._rows = arrays.withColumnRenamed(tb.SESSION_ID, _KEY).localCheckpoint()
        self._sequences = None
        self._min_items = n_items or 0
        super()._fit(sessions.select(tb.USER_IDX, tb.ITEM_IDX))
        return self

    def _sizes(self, n_users: int, n_items: int) -> tuple[int, int]:
        return n_users, max(n_items, self._min_items)

    def _training_data(self, train: DataFrame):
        rows = self._rows.filter(F.col(tb.LENGTH) >= 2)  # one item: no (input, target) pair
        n_val = self.params.validation_users
        holdout = None
        if n_val:
            n_rows = rows.count()
            if n_val > n_rows // 5:
                log.warning("%s: %d sequences; holding out %d instead of validation_users=%d", self.name,
                            n_rows, n_rows // 5, n_val)
                n_val = n_rows // 5
            val = (rows.orderBy(F.xxhash64(_KEY, F.lit(self.params.train.seed)), _KEY).limit(n_val)
                   .select(_KEY, F.lit(True).alias("_val")))
            marked = rows.join(val, _KEY, "left")
            held = marked.filter(F.col("_val").isNotNull()).orderBy(_KEY).select(tb.ITEMS).collect()
            log.info("%s: collected %d validation sequences to the driver", self.name, len(held))
            holdout = [[i for i in row[0] if i != tb.PAD_IDX] for row in held] or None
            rows = marked.filter(F.col("_val").isNull())
        return rows.select(tb.ITEMS), holdout

    def _task(self, item_counts, holdout):
        from recsys_spark.train.tasks_extra import GRU4RecTask

        return GRU4RecTask(self.params.net, self.n_items, item_counts, holdout_sessions=holdout, k=20)

    def scorer(self):
        """The trained model as an ``evaluate_sessions`` scorer (weights as numpy, broadcastable)."""
        from recsys_spark.evaluate_sessions import GRU4RecScorer

        if self.module is None:
            raise RecsysError(f"{self.name} is not fitted")
        return GRU4RecScorer.from_model(self.module, device="cpu")

    def _user_vectors(self, users: DataFrame) -> DataFrame:
        """(user_idx, embedding [h, 1]): the GRU's final output over each user's sequence."""
        if self._sequences is None:
            raise RecsysError("this gru4rec model was trained on sessions (fit_sessions): it scores sessions "
                              "(scorer()), not users")
        return sequence_vectors(self._sequences, users, self._broadcast_module(users.sparkSession),
                                self.params.users_per_block, append_one=True)

    def user_factors(self) -> DataFrame | None:
        return None if self._sequences is None else self._user_vectors(self._users)

    def item_factors(self) -> DataFrame:
        """(item_idx, [W_j, b_j]): output embedding and bias, so that ``[h, 1] . [W_j, b_j]`` is the score."""
        w = self.module.out_emb.weight.detach().cpu().numpy()  # [n_items, H]
        b = self.module.out_bias.weight.detach().cpu().numpy()  # [n_items, 1]
        return matrix_frame(np.concatenate([w, b], axis=1), tb.ITEM_IDX)

    def _recommend(self, users, k, seen, exclude_items):
        return rec.top_k_from_factors(self._user_vectors(users), self.item_factors(), k, seen, exclude_items,
                                      self.params.users_per_block)

    def _extra_meta(self) -> dict[str, Any]:
        return {"level": "users" if self._sequences is not None else "sessions"}

    def save(self, path: str) -> None:
        super().save(path)
        if self._sequences is not None:
            self._sequences.write.mode("overwrite").parquet(os.path.join(path, "sequences"))

    @classmethod
    def load(cls, spark: SparkSession, path: str) -> GRU4RecRecommender:
        model = super().load(spark, path)
        if cls._read_meta(path).get("level", "users") == "users":
            model._sequences = spark.read.parquet(os.path.join(path, "sequences"))
        return model


class DeepFMRecommender(TorchRecommender):
    """DeepFM (Guo et al. 2017) on user and item features, trained on the train pairs with sampled
    negatives (``DeepFMTask``).

    Reads ``silver/user_features``, ``silver/item_features`` and ``silver/feature_vocab`` under
    ``warehouse`` (the pipeline sets it; ``recsys-spark features`` builds them). The field layout
    (``FeatureSpec``, with the user and item ids as fields) and the item block of every item are saved
    with the model; the user block is read from the warehouse when recommending, so users indexed after
    training, and users without train interactions (side-file users), are cold: their id and activity
    fields read as unknown (0), which id dropout trained the model for, and their side features rank.
    ``known_users`` are the users with a feature row (and, with ``candidates``, candidates); the
    pipeline's popularity fallback serves the rest.

    Recommending ranks the whole catalogue (up to ``max_catalogue`` items: every pair goes through the
    network) or, with ``candidates``, only that model's top ``candidates_k`` for the user.
    """

    name = "deepfm"
    kind = "deepfm"
    params_class = DeepFMModelParams

    def __init__(self, params: DeepFMModelParams | None = None) -> None:
        super().__init__(params)
        self.spec: features.FeatureSpec | None = None
        self.item_fields: np.ndarray | None = None  # [n_items, len(spec.item_fields)], row item_idx

    def _need_warehouse(self) -> str:
        if not self.warehouse:
            raise RecsysError("deepfm reads the feature tables (and candidates) under the warehouse: set "
                              "model.warehouse (the pipeline does) and run `recsys-spark features` first")
        return self.warehouse

    def _user_features(self, spark: SparkSession) -> DataFrame:
        return tb.read(spark, self._need_warehouse(), tb.USER_FEATURES)

    def _fit(self, train: DataFrame) -> None:
        spark = train.sparkSession
        warehouse = self._need_warehouse()
        self.spec = features.load_feature_spec(spark, warehouse, include_ids=True)
        n_catalogue = self.spec.cardinalities[tb.ITEM_IDX] - 1
        self.item_fields = features.item_field_matrix(tb.read(spark, warehouse, tb.ITEM_FEATURES), self.spec,
                                                      n_catalogue)
        super()._fit(train)

    def _sizes(self, n_users: int, n_items: int) -> tuple[int, int]:
        if n_items > len(self.item_fields):
            raise RecsysError(f"the train split has item_idx {n_items - 1}, past silver/item_features' "
                              f"{len(self.item_fields)} items: rebuild the features (`recsys-spark features`)")
        return max(n_users, self.spec.cardinalities[tb.USER_IDX] - 1), len(self.item_fields)

    def _training_data(self, train: DataFrame):
        from recsys_spark.train.tasks import Holdout

        spark = train.sparkSession
        fit_rows, val = self._hold_out_last(train)
        item_features = tb.read(spark, self.warehouse, tb.ITEM_FEATURES)
        frame = features.deepfm_frame(fit_rows, self._user_features(spark), item_features, self.spec)
        holdout = None
        if val is not None:
            # Validation users have other train rows: their query block keeps their id.
            queries = self._queries(spark.createDataFrame(val[[tb.USER_IDX]].astype("int32")), trained=None)
            by_user = {r[tb.USER_IDX]: list(r[tb.FIELDS]) for r in queries.collect()}
            val = val[val[tb.USER_IDX].isin(list(by_user))]
            if len(val):
                inputs = np.array([by_user[u] for u in val[tb.USER_IDX]], dtype=np.int64)  # [U, Fq]
                holdout = Holdout.from_lists(inputs, val[_TARGET].to_numpy(), [list(s) for s in val[_SEEN]])
        return frame, holdout

    def _task(self, item_counts, holdout):
        from recsys_spark.train.tasks_extra import DeepFMTask

        return DeepFMTask(self.params.net, self.spec, self.item_fields, item_counts, holdout)

    def _queries(self, users: DataFrame, trained: DataFrame | None) -> DataFrame:
        """(user_idx, fields): the query block of each of ``users`` that has a feature row. Users not in
        ``trained`` (None: all are) are cold: their id and activity fields read as unknown (0), so they
        are scored from their side features, as the id-dropout rows of training were."""
        spark = users.sparkSession
        rows = (self._user_features(spark).filter(F.col(tb.USER_IDX).isNotNull())
                .join(users.select(tb.USER_IDX), tb.USER_IDX, "left_semi"))
        missing = [f for f in self.spec.user_fields if f not in rows.columns]
        if missing:
            raise RecsysError(f"silver/user_features lacks the fields {missing} this deepfm model was trained "
                              "with: rebuild the features with the same side files")
        if trained is None:
            rows = rows.withColumn("_trained", F.lit(True))
        else:
            rows = rows.join(trained.select(tb.USER_IDX).withColumn("_trained", F.lit(True)), tb.USER_IDX, "left")
        rows = rows.withColumn("_user", F.col(tb.USER_IDX))
        for name in self.spec.history_fields:  # as id dropout trained: id and activity unknown (null -> 0)
            rows = rows.withColumn(name, F.when(F.col("_trained"), F.col(name)))
        return rows.select(F.col("_user").alias(tb.USER_IDX), features.assemble(self.spec.user_fields))

    def _candidate_lists(self, spark: SparkSession) -> DataFrame:
        """(user_idx, _candidates array<int>, best first): the candidate model's top ``candidates_k`` of ``run_date``
        (the latest run date of that model when unset) from gold/recommendations."""
        p: DeepFMModelParams = self.params
        warehouse = self._need_warehouse()
        recs = tb.read(spark, warehouse, tb.RECOMMENDATIONS).filter(F.col(tb.MODEL) == p.candidates)
        day = self.run_date or recs.agg(F.max(tb.RUN_DATE)).first()[0]
        recs = recs.filter((F.col(tb.RUN_DATE) == F.lit(day)) & (F.col(tb.RANK) <= p.candidates_k))
        if day is None or recs.limit(1).count() == 0:
            raise RecsysError(f"deepfm re-ranks the recommendations of {p.candidates!r}, but "
                              f"{tb.RECOMMENDATIONS} has none for run date {day}: recommend with "
                              f"{p.candidates} first (list it before deepfm in models)")
        users, items = tb.read(spark, warehouse, tb.USER_INDEX), tb.read(spark, warehouse, tb.ITEM_INDEX)
        pairs = recs.join(users, tb.USER_ID).join(items, tb.ITEM_ID).filter(F.col(tb.ITEM_IDX) < self.n_items)
        ranked = F.sort_array(F.collect_list(F.struct(tb.RANK, tb.ITEM_IDX)))  # the candidate model's order
        return pairs.groupBy(tb.USER_IDX).agg(ranked[tb.ITEM_IDX].alias(_CANDIDATES))

    def known_users(self) -> DataFrame:
        if not self.warehouse:
            return self._users
        spark = self._users.sparkSession
        known = self._user_features(spark).filter(F.col(tb.USER_IDX).isNotNull()).select(tb.USER_IDX).distinct()
        if self.params.candidates:
            known = known.join(self._candidate_lists(spark), tb.USER_IDX, "left_semi")
        return known

    def _recommend(self, users, k, seen, exclude_items):
        spark = users.sparkSession
        p: DeepFMModelParams = self.params
        model = self._broadcast_module(spark)
        table = spark.sparkContext.broadcast(self.item_fields)
        n_items = self.n_items
        queries = self._queries(users, trained=self._users)
        if p.candidates:
            queries = queries.join(self._candidate_lists(spark), tb.USER_IDX)  # others: no rows
        elif n_items > p.max_catalogue:
            raise RecsysError(f"deepfm would score all {n_items} items per user (max_catalogue="
                              f"{p.max_catalogue}): re-rank another model's top-N with candidates=<model>")
        with_candidates = bool(p.candidates)
        rrf_k = p.rrf_k if p.fusion == "rrf" else None

        def scores(part: pd.DataFrame) -> np.ndarray:
            import torch

            module = _cached_module(model)
            items = _cached_tensor(table)  # [n_items, Fi]
            query = torch.as_tensor(np.stack(part[tb.FIELDS].to_numpy()).astype(np.int64))  # [U, Fq]
            with torch.no_grad():
                if not with_candidates:
                    return _deepfm_score_all(module, query, items).float().numpy()  # [U, n_items]
                return _deepfm_score_candidates(module, query, items, part[_CANDIDATES].to_numpy(), n_items,
                                                rrf_k=rrf_k)

        return rec.top_k_from_scores(queries, scores, np.arange(n_items, dtype=np.int32), k, seen, exclude_items,
                                     p.users_per_block)

    def _extra_meta(self) -> dict[str, Any]:
        return {"feature_spec": self.spec.to_dict(), "warehouse": self.warehouse}

    def save(self, path: str) -> None:
        super().save(path)
        np.save(os.path.join(path, "item_fields.npy"), self.item_fields, allow_pickle=False)

    @classmethod
    def load(cls, spark: SparkSession, path: str) -> DeepFMRecommender:
        model = super().load(spark, path)
        meta = cls._read_meta(path)
        model.spec = features.FeatureSpec.from_dict(meta["feature_spec"])
        model.warehouse = meta.get("warehouse")  # the pipeline sets its own after loading
        model.item_fields = np.load(os.path.join(path, "item_fields.npy"), allow_pickle=False)
        return model


def _deepfm_score_all(module, query, items, max_rows: int = DEEPFM_MAX_ROWS):
    """Logits of every item for each query row: query [U, Fq], items [n_items, Fi] -> [U, n_items], by
    blocks of items so that at most ``max_rows`` pairs run through the network at once."""
    import torch

    block = max(1, max_rows // max(1, query.shape[0]))
    return torch.cat([module.score_items(query, items[start:start + block])
                      for start in range(0, items.shape[0], block)], dim=1)


def _deepfm_score_candidates(module, query, items, candidates, n_items: int, rrf_k: float | None = None,
                             max_rows: int = DEEPFM_MAX_ROWS) -> np.ndarray:
    """Scores [U, n_items] that are -inf except at each row's candidates (item_idx lists of any length,
    the candidate model's best first), scored by the network: the shared top-k then picks among the
    candidates only. With ``rrf_k``, a candidate's score is ``1/(rrf_k + its DeepFM rank) + 1/(rrf_k +
    its rank in the list)`` (ranks from 1) instead of the logit."""
    import torch

    lists = [np.asarray(c, dtype=np.int64) for c in candidates]
    width = max((len(c) for c in lists), default=0)
    out = np.full((len(lists), n_items), -np.inf, dtype=np.float32)
    if width == 0:
        return out
    padded = np.full((len(lists), width), -1, dtype=np.int64)  # [U, C], -1 = no candidate
    for row, c in enumerate(lists):
        padded[row, :len(c)] = c
    cand = torch.as_tensor(padded)
    block = max(1, max_rows // width)
    parts = [module.score_items(query[s:s + block], items[cand[s:s + block].clamp(min=0)])  # [b, C]
             for s in range(0, len(lists), block)]
    scores = torch.cat(parts).float().numpy()  # [U, C]
    valid = padded >= 0
    if rrf_k is not None:
        order = np.argsort(np.where(valid, -scores, np.inf), axis=1, kind="stable")  # best logit first
        own_rank = np.empty_like(order)
        np.put_along_axis(own_rank, order, np.arange(1, width + 1)[None, :].repeat(len(lists), 0), axis=1)
        list_rank = np.arange(1, width + 1)[None, :]
        scores = (1.0 / (rrf_k + own_rank) + 1.0 / (rrf_k + list_rank)).astype(np.float32)  # [U, C]
    rows, cols = np.nonzero(valid)
    out[rows, padded[rows, cols]] = scores[rows, cols]
    return out


@dataclass
class LocatedJob:
    """Runs a training job on a rank and reports where it ran: process, host and Spark executor."""

    job: Any

    def __call__(self, ctx) -> tuple[Any, dict[str, Any]]:
        return self.job(ctx), rank_location(ctx.rank)


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


def matrix_frame(matrix: np.ndarray, idx_col: str) -> DataFrame:
    """(idx_col, embedding array<float>) with row i of ``matrix`` as index i (a small, driver-side matrix)."""
    rows = [(i, row.tolist()) for i, row in enumerate(matrix.astype(np.float32))]
    return SparkSession.getActiveSession().createDataFrame(rows, f"{idx_col} int, {EMBEDDING} array<float>")


def sequence_vectors(sequences: DataFrame, users: DataFrame, model, block: int,
                     append_one: bool = False) -> DataFrame:
    """(user_idx, embedding): a sequence model's ``user_embedding`` over each user's left-padded
    sequence, computed on the executors by blocks. ``append_one`` adds a constant 1, for item factors
    that carry a bias as their last column."""

    def encode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch

        module = _cached_module(model)
        for batch in batches:
            for start in range(0, len(batch), block):
                part = batch.iloc[start:start + block]
                seq = torch.as_tensor(np.stack(part[tb.ITEMS].to_numpy()).astype(np.int64))  # [B, L]
                with torch.no_grad():
                    vectors = module.user_embedding(seq).float().numpy()  # [B, d]
                if append_one:
                    vectors = np.concatenate([vectors, np.ones((len(vectors), 1), np.float32)], axis=1)
                yield pd.DataFrame({tb.USER_IDX: part[tb.USER_IDX].to_numpy(), EMBEDDING: list(vectors)})

    schema = T.StructType([T.StructField(tb.USER_IDX, T.IntegerType()),
                           T.StructField(EMBEDDING, T.ArrayType(T.FloatType()))])
    return sequences.join(users, tb.USER_IDX, "left_semi").mapInPandas(encode, schema)


_MODULES: dict[int, Any] = {}


def _broadcast_key(broadcast) -> int:
    """The id Spark gave ``broadcast``, and forget what was built from broadcasts this worker has dropped.

    Not ``id(broadcast)``: an executor frees a broadcast's object when the driver unpersists it (or
    garbage-collects it), and a later broadcast's object may then take the same address, which would
    hand the new broadcast an old model (seen: a DeepFM module returned for an item table).
    """
    from pyspark.broadcast import _broadcastRegistry

    for bid, registered in list(_broadcastRegistry.items()):
        if registered is broadcast:
            for stale in [key for key in _MODULES if key not in _broadcastRegistry]:
                del _MODULES[stale]
            return bid
    jbroadcast = getattr(broadcast, "_jbroadcast", None)  # on the driver
    return jbroadcast.id() if jbroadcast is not None else id(broadcast)


def _cached_module(broadcast):
    """The broadcast model, rebuilt once per Python worker (one thread: Spark runs a task per core)."""
    import torch

    key = _broadcast_key(broadcast)
    if key not in _MODULES:
        torch.set_num_threads(1)
        kind, init_kwargs, state = broadcast.value
        _MODULES[key] = build_module(kind, init_kwargs, state)
    return _MODULES[key]


def _cached_tensor(broadcast):
    """A broadcast numpy array as a torch tensor, made once per Python worker."""
    import torch

    key = _broadcast_key(broadcast)
    if key not in _MODULES:
        _MODULES[key] = torch.as_tensor(broadcast.value)
    return _MODULES[key]
