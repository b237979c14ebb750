"""A two-stage recommender trained the way production two-stage systems are: a candidate model retrieves,
a gradient-boosted ranker (LightGBM, LambdaMART: Burges 2010) orders its candidates.

Why not DeepFM re-ranking ALS's list (``deepfm`` with ``candidates: als``): DeepFM is trained on the
whole catalogue against random negatives, so it never sees the question the second stage is asked,
"which of *these* hundred good items will the user take next?", nor the candidate model's own score;
on MovieLens 100K that re-ranking lowers ALS's NDCG@10 (docs/BENCHMARKS.md). Here the ranker learns
exactly that question:

1. **Label period.** Each user's last ``label_items`` train interactions (by time; at least one earlier
   item stays) are the label period, the rest the early part (:func:`split_label_period`). A per-user
   "last n" window mirrors the project's leave-last-out test split, which holds out each user's last
   item: the ranker learns to predict what comes *next* for each user, at that user's own time (a
   global date cut would give many users no labels and others nothing before it).
2. **Candidates before labels.** The candidate model (``candidates``, any registered model) is fitted
   on the early part only, and its top ``candidates_k`` per user (early items filtered) are the
   training candidates; a candidate is labelled 1 when the user interacted with it in the label
   period (:func:`labelled_candidates`). Every feature is computed from the early part too, so nothing
   of the label period leaks into the inputs.
3. **Features** of a (user, candidate) pair (:func:`pair_features`): the candidate model's score, its
   rank and the score's gap to the user's best; the item's popularity overall and over the
   ``popularity_days`` before the user's latest interaction, its age at that time; the user's
   activity (items, span, the mean popularity of the user's items against the candidate's); the
   user's and the item's side features (categorical: ``silver/user_features``, ``silver/item_features``
   without the fields that grow with use); per item side field, the share of the user's items
   sharing the candidate's value (genre and decade affinity on MovieLens); and how the candidate goes
   with what the user took *last*: its cosine co-occurrence with the user's whole history, last
   ``RECENT`` items and last item, and how often it followed those items within ``FOLLOW_WINDOW``
   steps in other users' histories (co-visitation, as the candidate features of production rankers).
   The candidate model sees a bag of items; the next item depends on the latest ones, and the ranker
   is where that order enters.
4. **Ranker**: LightGBM ``lambdarank`` (listwise, optimises NDCG over each user's candidates) or
   ``binary`` (BCE), early-stopped on a share of the label users' groups.
5. **Serving**: the candidate model is refitted on *all* train rows inside this model's ``fit`` (not
   read from another model's gold rows: the benchmark and the tests call ``fit``/``recommend`` with no
   pipeline run behind them, and the refit is the same model the pipeline's own row would train), its
   top ``candidates_k`` per user are featurised from all train rows and ordered by the ranker.

Cold users (a feature row, no train rows) get the early part's most popular items as candidates, with
no candidate score and no activity, ordered by the ranker from their side features; training sees such
rows too: a ``cold_share`` of the label users is presented that way (their early items hidden from the
features). ``cold_share: 0`` leaves cold users to the pipeline's popularity fallback. The ranker alone
ordered them worse than popularity (its cold rows learn the label period's recent items), so their
order is the popularity prior moved by ``cold_user_weight`` x the ranker's standardised scores
(``scoring.with_popularity_prior``; 0.1, the best on the next item of ``bench_cold.py``'s validation
seed).

Driver-side work, logged: the train rows (user, item, time) and the candidate lists (users x
``candidates_k`` rows) are collected to build the features; at MovieLens or Taobao-sample size this is
a few MB. The ranker is a LightGBM text model, the history a Parquet file: no pickles.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from recsys_spark import metrics as M
from recsys_spark import tables as tb
from recsys_spark.config import Section
from recsys_spark.data.features import ITEM_EVENT_FIELDS, USER_EVENT_FIELDS
from recsys_spark.errors import RecsysError
from recsys_spark.models.base import Recommender, read_json
from recsys_spark.models.registry import MODELS, model_class
from recsys_spark.models.registry import load as load_model
from recsys_spark.scoring import RECS_SCHEMA, top_k_of_scores, with_popularity_prior

log = logging.getLogger(__name__)

DAY = 86_400.0
RECENT = 3  # the user's latest items that the recent co-occurrence features compare the candidate with
FOLLOW_WINDOW = 3  # item b "follows" item a when it comes at most this many steps after a in a history
PAIRS_PER_CHUNK = 200_000  # (user, candidate) pairs whose co-occurrence products are computed at once
T = "_t"  # interaction time, epoch seconds
LABEL = "_label"
COLD = "_cold"
CANDIDATE_DIR = "candidates"
RANKER_FILE = "ranker.txt"
HISTORY_FILE = "history.parquet"
USER_SIDE_FILE = "user_side.npy"
ITEM_SIDE_FILE = "item_side.npy"


class RankerParams(Section):
    """LightGBM's parameters that matter on data of this size (its other defaults stand)."""

    objective: Literal["lambdarank", "binary"] = Field(
        "lambdarank", description="lambdarank: listwise NDCG over each user's candidates; binary: BCE per pair")
    trees: int = Field(500, gt=0, description="boosting rounds at most; early stopping ends sooner")
    learning_rate: float = Field(0.05, gt=0)
    num_leaves: int = Field(31, gt=1)
    min_child_samples: int = Field(50, gt=0, description="rows per leaf at least")
    feature_fraction: float = Field(0.8, gt=0, le=1)
    early_stopping: int = Field(30, gt=0, description="rounds without a better validation NDCG@10")
    valid_share: float = Field(0.1, gt=0, lt=1, description="label users held out for early stopping")
    seed: int = 42


class TwoStageParams(Section):
    """Two stages: ``candidates`` retrieves ``candidates_k`` items per user, a LightGBM ranker orders them."""

    candidates: str = Field("als", description="registered model that retrieves the candidates")
    candidate_params: dict[str, Any] = Field(default_factory=dict,
                                             description="its hyper-parameters over its own defaults")
    candidates_k: int = Field(100, gt=0, description="candidates per user")
    label_items: int = Field(5, gt=0, description="each user's last train items that form the label period")
    popularity_days: float = Field(30.0, gt=0, description="window of the recent-popularity feature")
    cold_share: float = Field(0.1, ge=0, lt=1, description="label users trained as cold (popular candidates, "
                                                           "no history); 0: cold users get no rows")
    cold_user_weight: float | None = Field(
        0.1, gt=0, description="a cold user's candidates ordered by log(1 + item train rows) + this x the ranker's "
                               "scores standardised over them; null: the ranker's scores alone")
    ranker: RankerParams = RankerParams()

    removed_keys: ClassVar[dict[str, str]] = {}

    @field_validator("candidates")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in MODELS or name == TwoStageRecommender.name:
            raise ValueError(f"unknown candidate model {name!r}; choose from "
                             f"{sorted(set(MODELS) - {TwoStageRecommender.name})}")
        return name

    @field_validator("candidate_params")
    @classmethod
    def _candidate_schema(cls, raw: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Checked now against the candidate model's own schema, so a bad key stops the run at start.
        name = info.data.get("candidates")
        if name is not None:
            try:
                model_class(name).params_class.model_validate(raw)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ValueError(f"{name}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        return raw


# -- the label period ------------------------------------------------------------------------------------

def split_label_period(train: DataFrame, label_items: int) -> tuple[DataFrame, DataFrame]:
    """(early, label): each user's last ``label_items`` rows by time (ties as ``leave_last_out``: the larger
    ``item_tie`` is later) are the label period, always keeping at least one row in the early part."""
    tb.require_columns(train, [tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT, tb.LAST_TS], "two-stage training data")
    latest = Window.partitionBy(tb.USER_IDX).orderBy(F.desc(tb.LAST_TS), tb.item_tie(train).desc())
    ranked = (train.withColumn("_n", F.count(F.lit(1)).over(Window.partitionBy(tb.USER_IDX)))
              .withColumn("_pos", F.row_number().over(latest)))
    in_label = F.col("_pos") <= F.least(F.lit(label_items), F.col("_n") - 1)
    return ranked.filter(~in_label).drop("_n", "_pos"), ranked.filter(in_label).drop("_n", "_pos")


def collect_history(rows: DataFrame, what: str) -> pd.DataFrame:
    """(user_idx, item_idx, _t seconds) of ``rows`` on the driver (logged: the features are built there)."""
    pdf = rows.select(F.col(tb.USER_IDX).cast("int"), F.col(tb.ITEM_IDX).cast("int"),
                      F.unix_timestamp(tb.LAST_TS).cast("long").alias(T)).toPandas()
    log.info("collected %d %s rows to the driver for the ranker's features", len(pdf), what)
    return pdf


# -- features --------------------------------------------------------------------------------------------

@dataclass
class History:
    """What the features are computed from: interactions (user_idx, item_idx, _t) and side fields
    ([users, Fu], [items, Fi] int codes, row = idx, 0 = unknown), with per-user and per-item summaries."""

    rows: pd.DataFrame
    user_side: np.ndarray
    item_side: np.ndarray

    def __post_init__(self) -> None:
        r = self.rows
        n_items = max(len(self.item_side), int(r[tb.ITEM_IDX].max()) + 1 if len(r) else 0)
        items = r[tb.ITEM_IDX].to_numpy(np.int64)
        self.item_users = np.bincount(items, minlength=n_items).astype(np.float64)  # [n_items]
        self.item_first = np.full(n_items, np.nan)
        first = r.groupby(tb.ITEM_IDX)[T].min()
        self.item_first[first.index.to_numpy()] = first.to_numpy()
        # Item-time keys, sorted: interactions of item i in (a, b] by two binary searches.
        self.keys = np.sort(items * (1 << 32) + r[T].to_numpy(np.int64))
        by_user = r.groupby(tb.USER_IDX)
        log_pop = np.log1p(self.item_users)[items]
        self.users = pd.DataFrame({"n": by_user.size(), "last": by_user[T].max(), "first": by_user[T].min(),
                                   "pop": pd.Series(log_pop, index=r.index).groupby(r[tb.USER_IDX]).mean()})
        self.now = float(r[T].max()) if len(r) else 0.0
        order = np.lexsort((np.arange(n_items), -self.item_users))
        self.popular = order[self.item_users[order] > 0]  # items by users, most first
        self._co_occurrence(n_items)

    def _co_occurrence(self, n_items: int) -> None:
        """Item-item matrices and user profiles for the co-occurrence features (scipy.sparse CSR):

        cosine [items, items] = X^T X / sqrt(n_i n_j), diagonal 0, X the binary [users, items] history;
        follows [items, items]: entry (a, b) counts histories where b comes 1..FOLLOW_WINDOW steps after a;
        profiles [users, items]: 1 for the items of the user's whole history, last RECENT items, last item.
        """
        from scipy import sparse

        r = self.rows.sort_values([tb.USER_IDX, T, tb.ITEM_IDX], kind="stable")  # time order; ties by idx
        users, items = r[tb.USER_IDX].to_numpy(np.int64), r[tb.ITEM_IDX].to_numpy(np.int64)
        n_users = int(users.max()) + 1 if len(users) else 1
        x = sparse.csr_matrix((np.ones(len(users)), (users, items)), shape=(n_users, n_items))
        x.data[:] = 1.0  # a repeated (user, item) counts once
        co = (x.T @ x).tocsr()
        norm = 1.0 / np.sqrt(np.maximum(co.diagonal(), 1.0))  # the diagonal: users of each item
        co.setdiag(0)
        co.eliminate_zeros()
        self.cosine = sparse.diags(norm) @ co @ sparse.diags(norm)
        a, b = [], []
        for step in range(1, FOLLOW_WINDOW + 1):
            same = users[:-step] == users[step:]
            a.append(items[:-step][same])
            b.append(items[step:][same])
        a, b = np.concatenate(a), np.concatenate(b)
        self.follows = sparse.csr_matrix((np.ones(len(a)), (a, b)), shape=(n_items, n_items))
        from_end = pd.Series(users[::-1]).groupby(users[::-1]).cumcount().to_numpy()[::-1]  # 0: the last item

        def profile(keep: np.ndarray) -> sparse.csr_matrix:
            return sparse.csr_matrix((np.ones(keep.sum()), (users[keep], items[keep])), shape=(n_users, n_items))

        self.profiles = {"all": x, "recent": profile(from_end < RECENT), "last": profile(from_end == 0)}
        log.info("co-occurrence features: %d cosine and %d follow pairs over %d items", self.cosine.nnz,
                 self.follows.nnz, n_items)

    def co_occurrence(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """[N, 5]: per (user, candidate) pair, the mean cosine of the candidate with the user's history,
        last RECENT items and last item, and log(1 + how often it followed) the last RECENT items and the
        last item. Rows of users without history are nan."""
        out = np.full((len(users), 5), np.nan)
        n_users, n_items = self.profiles["all"].shape
        ok = (users < n_users) & (items < n_items)
        ok[ok] = self.profiles["all"].getnnz(axis=1)[users[ok]] > 0
        columns = [("all", self.cosine), ("recent", self.cosine), ("last", self.cosine),
                   ("recent", self.follows), ("last", self.follows)]
        rows = np.flatnonzero(ok)
        for start in range(0, len(rows), PAIRS_PER_CHUNK):  # bounded products: [chunk users, items]
            chunk = rows[start:start + PAIRS_PER_CHUNK]
            u, inverse = np.unique(users[chunk], return_inverse=True)
            profiles = {name: p[u] for name, p in self.profiles.items()}  # [chunk users, items], 1 = taken
            for c, (name, matrix) in enumerate(columns):
                value = np.asarray((profiles[name] @ matrix).tocsr()[inverse, items[chunk]]).ravel()
                if matrix is self.cosine:  # the mean over the profile's items
                    out[chunk, c] = value / profiles[name].getnnz(axis=1)[inverse]
                else:
                    out[chunk, c] = np.log1p(value)
        return out

    def count_between(self, items: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Interactions with ``items`` at times in (start, end], element-wise."""
        base = items.astype(np.int64) * (1 << 32)
        return (np.searchsorted(self.keys, base + end.astype(np.int64), "right")
                - np.searchsorted(self.keys, base + start.astype(np.int64), "right")).astype(np.float64)

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """[N, Fi]: per item side field, the share of the user's history items whose value equals the
        candidate's (nan for a user without history)."""
        r, side = self.rows, self.item_side
        out = np.full((len(users), side.shape[1]), np.nan)
        if not len(r) or not side.shape[1]:
            return out
        h_users, h_items = r[tb.USER_IDX].to_numpy(np.int64), r[tb.ITEM_IDX].to_numpy(np.int64)
        known = h_items < len(side)
        n_users = int(max(h_users.max(), users.max(initial=0))) + 1
        n_per_user = np.bincount(h_users, minlength=n_users).astype(np.float64)
        cand_side = side[np.minimum(items, len(side) - 1)] * (items < len(side))[:, None]  # [N, Fi]
        for f in range(side.shape[1]):
            width = int(side[:, f].max()) + 1
            counts = np.bincount(h_users[known] * width + side[h_items[known], f],
                                 minlength=n_users * width).reshape(n_users, width)  # [users, values]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[:, f] = counts[users, cand_side[:, f]] / n_per_user[users]
        return out


def pair_features(history: History, cands: pd.DataFrame, popularity_days: float) -> np.ndarray:
    """The ranker's input [N, n_features] for candidate rows (user_idx, item_idx, score, rank, _cold):
    see ``feature_names`` for the columns. A cold row has no score and no user history (nan)."""
    users = cands[tb.USER_IDX].to_numpy(np.int64)
    items = cands[tb.ITEM_IDX].to_numpy(np.int64)
    cold = cands[COLD].to_numpy(bool)
    score = np.where(cold, np.nan, cands[tb.SCORE].to_numpy(np.float64))
    best = pd.Series(score).groupby(users).transform("max").to_numpy()
    stats = history.users.reindex(users).reset_index(drop=True)
    stats.loc[cold] = np.nan
    at = np.where(np.isnan(stats["last"].to_numpy()), history.now, stats["last"].to_numpy())  # the user's "now"
    item_pop = np.log1p(history.item_users[np.minimum(items, len(history.item_users) - 1)])
    recent = np.log1p(history.count_between(items, at - popularity_days * DAY, at))
    age = (at - history.item_first[np.minimum(items, len(history.item_first) - 1)]) / DAY
    history_users = np.where(cold, -1, users)  # a cold row's user has no history to match
    affinity = history.affinity(np.maximum(history_users, 0), items)
    affinity[cold] = np.nan
    co_occurrence = history.co_occurrence(users, items)
    co_occurrence[cold] = np.nan
    user_side = history.user_side[np.minimum(users, len(history.user_side) - 1)] * (
        users < len(history.user_side))[:, None]
    item_side = history.item_side[np.minimum(items, len(history.item_side) - 1)] * (
        items < len(history.item_side))[:, None]
    columns = [score, cands[tb.RANK].to_numpy(np.float64), score - best, item_pop, recent, age,
               np.log1p(stats["n"].to_numpy()), (stats["last"] - stats["first"]).to_numpy() / DAY,
               item_pop - stats["pop"].to_numpy()]
    return np.column_stack([*columns, co_occurrence, affinity, user_side, item_side]).astype(np.float32)


def feature_names(history: History) -> tuple[list[str], list[int]]:
    """Column names of ``pair_features`` and the positions of the categorical ones (the side fields)."""
    fi, fu = history.item_side.shape[1], history.user_side.shape[1]
    names = ["candidate_score", "candidate_rank", "score_gap_to_best", "item_log_users", "item_log_recent",
             "item_age_days", "user_log_items", "user_span_days", "item_vs_user_popularity",
             "cosine_history", "cosine_recent", "cosine_last", "log_follows_recent", "log_follows_last",
             *[f"affinity_{i}" for i in range(fi)], *[f"user_side_{i}" for i in range(fu)],
             *[f"item_side_{i}" for i in range(fi)]]
    return names, list(range(len(names) - fu - fi, len(names)))


def popular_candidates(history: History, users: np.ndarray, k: int, seen: dict[int, set],
                       excluded: set[int]) -> pd.DataFrame:
    """Cold rows: the ``k`` most popular items of ``history`` per user, minus its seen and excluded items."""
    frames = []
    for user in users:
        skip = seen.get(int(user), set()) | excluded
        items = [int(i) for i in history.popular if int(i) not in skip][:k]
        frames.append(pd.DataFrame({tb.USER_IDX: int(user), tb.ITEM_IDX: items, tb.SCORE: np.nan,
                                    tb.RANK: np.arange(1, len(items) + 1), COLD: True}))
    columns = [tb.USER_IDX, tb.ITEM_IDX, tb.SCORE, tb.RANK, COLD]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def labelled_candidates(candidates: pd.DataFrame, label: pd.DataFrame) -> pd.DataFrame:
    """``candidates`` with ``_label`` 1 where (user, item) is among the label period's rows, else 0."""
    pairs = label[[tb.USER_IDX, tb.ITEM_IDX]].drop_duplicates().assign(**{LABEL: 1})
    out = candidates.merge(pairs, on=[tb.USER_IDX, tb.ITEM_IDX], how="left")
    out[LABEL] = out[LABEL].fillna(0).astype(np.int32)
    return out


# -- side fields -----------------------------------------------------------------------------------------

def side_matrix(table: DataFrame, idx: str, exclude: list[str]) -> np.ndarray:
    """[max idx + 1, fields] int codes of the side fields of a feature table (not ids, not ``exclude``:
    the fields that grow with use, which were built from every train event, label period included)."""
    fields = [c for c in table.columns if c not in (tb.USER_ID, tb.ITEM_ID, tb.USER_IDX, tb.ITEM_IDX, *exclude)]
    pdf = table.filter(F.col(idx).isNotNull()).select(idx, *fields).toPandas()
    size = int(pdf[idx].max()) + 1 if len(pdf) else 1  # at least one row: index 0 reads as unknown
    out = np.zeros((size, len(fields)), dtype=np.int64)
    if len(pdf):
        out[pdf[idx].to_numpy(np.int64)] = pdf[fields].fillna(0).to_numpy(np.int64)
    return out


class TwoStageRecommender(Recommender):
    """A candidate model and a LightGBM ranker trained on the label period (module docstring).

    Reads ``silver/user_features`` and ``silver/item_features`` under ``warehouse`` (the registry asks the
    pipeline for the features step). ``known_users``: the candidate model's users, plus every user with a
    feature row when ``cold_share`` > 0 (cold users are ranked from popular candidates).
    """

    name = "twostage"
    params_class = TwoStageParams

    def __init__(self, params: TwoStageParams | None = None) -> None:
        super().__init__(params)
        self.candidate_model: Recommender | None = None
        self.booster = None
        self.history: History | None = None
        self.training: dict[str, Any] = {}

    # -- fit ----------------------------------------------------------------------------------------------

    def _new_candidate_model(self) -> Recommender:
        p: TwoStageParams = self.params
        cls = model_class(p.candidates)
        model = cls(cls.params_class.model_validate(p.candidate_params))
        model.workdir, model.warehouse = self.workdir, self.warehouse
        model.run_date, model.users_per_block = self.run_date, self.users_per_block
        return model

    def _side(self, spark: SparkSession) -> tuple[np.ndarray, np.ndarray]:
        """The side fields of users and items; none without a warehouse (the pipeline always sets one)."""
        if not self.warehouse:
            log.warning("twostage has no warehouse: the ranker learns without side features")
            return np.zeros((1, 0), dtype=np.int64), np.zeros((1, 0), dtype=np.int64)
        users = side_matrix(tb.read(spark, self.warehouse, tb.USER_FEATURES), tb.USER_IDX, USER_EVENT_FIELDS)
        items = side_matrix(tb.read(spark, self.warehouse, tb.ITEM_FEATURES), tb.ITEM_IDX, ITEM_EVENT_FIELDS)
        return users, items

    def training_examples(self, train: DataFrame) -> tuple[pd.DataFrame, np.ndarray, History]:
        """The ranker's training set: (labelled candidate rows, their features, the early History).

        The candidate model is fitted on the early part only; its candidates and every feature come from
        the early part; labels from the label period only. A ``cold_share`` of the label users gets the
        early part's popular items as candidates, marked cold."""
        p: TwoStageParams = self.params
        spark = train.sparkSession
        early, label = split_label_period(train, p.label_items)
        early = early.persist()
        first = self._new_candidate_model().fit(early)
        label_users = label.select(tb.USER_IDX).distinct()
        cands = first.recommend(label_users, p.candidates_k, seen=early).toPandas()
        log.info("collected %d candidates of %s (fitted before the label period)", len(cands), p.candidates)
        history = History(collect_history(early, "early-part"), *self._side(spark))
        label_pdf = collect_history(label, "label-period")
        cands[COLD] = False
        if p.cold_share > 0:
            users = np.sort(label_pdf[tb.USER_IDX].unique())
            rng = np.random.default_rng(p.ranker.seed)
            cold = users[rng.random(len(users)) < p.cold_share]
            seen = history.rows[history.rows[tb.USER_IDX].isin(cold)].groupby(tb.USER_IDX)[tb.ITEM_IDX].agg(set)
            cands = pd.concat([cands[~cands[tb.USER_IDX].isin(cold)],
                               popular_candidates(history, cold, p.candidates_k, seen.to_dict(), set())],
                              ignore_index=True)
        early.unpersist()
        rows = labelled_candidates(cands, label_pdf).sort_values([tb.USER_IDX, tb.RANK], kind="stable")
        rows = rows.reset_index(drop=True)
        return rows, pair_features(history, rows, p.popularity_days), history

    def _fit(self, train: DataFrame) -> None:
        import lightgbm as lgb

        p: TwoStageParams = self.params
        rows, x, history = self.training_examples(train)
        names, categorical = feature_names(history)
        users = rows[tb.USER_IDX].to_numpy()
        positive = rows.groupby(tb.USER_IDX)[LABEL].transform("max").to_numpy() > 0  # groups with a label
        rng = np.random.default_rng(p.ranker.seed)
        unique = np.unique(users[positive])
        if len(unique) < 2:
            raise RecsysError(f"twostage: {len(unique)} user(s) took a candidate of {p.candidates} in the label "
                              "period; the ranker needs more (more data, or larger candidates_k/label_items)")
        valid_users = unique[rng.random(len(unique)) < p.ranker.valid_share]
        if len(valid_users) == 0:
            valid_users = unique[-1:]
        is_valid = np.isin(users, valid_users)
        fit_rows, valid_rows = positive & ~is_valid, positive & is_valid

        def dataset(mask, reference=None):
            group = pd.Series(users[mask]).value_counts(sort=False).sort_index().to_numpy()  # rows are by user
            return lgb.Dataset(x[mask], rows[LABEL].to_numpy()[mask], group=group, feature_name=names,
                               categorical_feature=categorical, reference=reference, free_raw_data=False)

        r = p.ranker
        params = {"objective": r.objective, "learning_rate": r.learning_rate, "num_leaves": r.num_leaves,
                  "min_child_samples": r.min_child_samples, "feature_fraction": r.feature_fraction,
                  "metric": "ndcg", "eval_at": [10], "seed": r.seed, "deterministic": True,
                  "num_threads": 1, "verbose": -1}
        fit_set = dataset(fit_rows)
        valid_set = dataset(valid_rows, fit_set)
        self.booster = lgb.train(params, fit_set, r.trees, valid_sets=[valid_set],
                                 callbacks=[lgb.early_stopping(r.early_stopping, verbose=False)])
        ranked = self.booster.predict(x[valid_rows], num_iteration=self.booster.best_iteration)
        self.training = {"best_iteration": int(self.booster.best_iteration), "label_rows": int(len(rows)),
                         "label_users_with_a_hit": int(len(unique)),
                         **_validation_lift(rows[valid_rows], ranked)}
        log.info("twostage ranker: %s", self.training)
        # Serving: the candidate model refitted on every train row, the features from every train row.
        self.candidate_model = self._new_candidate_model().fit(train)
        self.history = History(collect_history(train, "train"), history.user_side, history.item_side)

    # -- recommend ----------------------------------------------------------------------------------------

    def _cold_users(self, spark: SparkSession) -> DataFrame | None:
        if self.params.cold_share <= 0 or not self.warehouse:
            return None
        return (tb.read(spark, self.warehouse, tb.USER_FEATURES).filter(F.col(tb.USER_IDX).isNotNull())
                .select(tb.USER_IDX))

    def _warm_users(self, spark: SparkSession) -> DataFrame:
        """Users with train rows that the candidate model scores: the ranker's features need a history."""
        ids = [(int(u),) for u in self.history.users.index]
        warm = spark.createDataFrame(ids, f"{tb.USER_IDX} int")
        known = self.candidate_model.known_users()
        return warm if known is None else warm.join(known, tb.USER_IDX, "left_semi")

    def known_users(self) -> DataFrame:
        spark = SparkSession.getActiveSession()
        warm, cold = self._warm_users(spark), self._cold_users(spark)
        return warm if cold is None else warm.unionByName(cold).distinct()

    def _recommend(self, users: DataFrame, k: int, seen: DataFrame | None, exclude_items: list[int]) -> DataFrame:
        p: TwoStageParams = self.params
        spark = users.sparkSession
        warm = users.join(self._warm_users(spark), tb.USER_IDX, "left_semi")
        cands = self.candidate_model.recommend(warm, p.candidates_k, seen, exclude_items).toPandas()
        cands[COLD] = False
        cold_users = self._cold_users(spark)
        if cold_users is not None:
            cold = users.join(cold_users, tb.USER_IDX, "left_semi").join(warm, tb.USER_IDX, "left_anti")
            cold_ids = np.array(sorted(r[0] for r in cold.collect()), dtype=np.int64)
            if len(cold_ids):
                seen_of = {} if seen is None else (
                    seen.filter(F.col(tb.USER_IDX).isin(cold_ids.tolist())).toPandas()
                    .groupby(tb.USER_IDX)[tb.ITEM_IDX].agg(set).to_dict())
                cands = pd.concat([cands, popular_candidates(self.history, cold_ids, p.candidates_k, seen_of,
                                                             set(exclude_items))], ignore_index=True)
        log.info("collected %d candidates to rank on the driver", len(cands))
        if not len(cands):
            return spark.createDataFrame([], RECS_SCHEMA)
        scores = self.booster.predict(pair_features(self.history, cands, p.popularity_days))
        scores = cold_rows_with_prior(cands, scores, self.history.item_users, p.cold_user_weight)
        return spark.createDataFrame(top_k_candidates(cands, scores, k), RECS_SCHEMA)

    # -- save / load --------------------------------------------------------------------------------------

    def _save_state(self, path: str) -> dict[str, Any]:
        self.candidate_model.save(os.path.join(path, CANDIDATE_DIR))
        with open(os.path.join(path, RANKER_FILE), "w") as fh:
            fh.write(self.booster.model_to_string())
        self.history.rows.to_parquet(os.path.join(path, HISTORY_FILE), index=False)
        np.save(os.path.join(path, USER_SIDE_FILE), self.history.user_side, allow_pickle=False)
        np.save(os.path.join(path, ITEM_SIDE_FILE), self.history.item_side, allow_pickle=False)
        return {"params": self.params.model_dump(), "warehouse": self.warehouse,
                "training": json.loads(json.dumps(self.training))}

    @classmethod
    def load(cls, spark, path: str) -> TwoStageRecommender:
        import lightgbm as lgb

        meta = read_json(path)
        model = cls(TwoStageParams.model_validate(meta["params"]))
        model.warehouse, model.training = meta.get("warehouse"), meta.get("training", {})
        model.candidate_model = load_model(model.params.candidates, spark, os.path.join(path, CANDIDATE_DIR))
        with open(os.path.join(path, RANKER_FILE)) as fh:
            model.booster = lgb.Booster(model_str=fh.read())
        model.history = History(pd.read_parquet(os.path.join(path, HISTORY_FILE)),
                                np.load(os.path.join(path, USER_SIDE_FILE), allow_pickle=False),
                                np.load(os.path.join(path, ITEM_SIDE_FILE), allow_pickle=False))
        return model

    def first_stage(self) -> Recommender:
        """The fitted candidate model (the benchmark scores its list beside this model's, same fit)."""
        if self.candidate_model is None:
            raise RecsysError("the two-stage model is not fitted: call fit() or load() first")
        return self.candidate_model


def cold_rows_with_prior(cands: pd.DataFrame, scores: np.ndarray, item_counts: np.ndarray,
                         weight: float | None) -> np.ndarray:
    """``scores`` [N] of candidate rows (user_idx, item_idx, _cold) with each cold user's rows re-scored by
    ``scoring.with_popularity_prior`` over that user's candidates (``item_counts`` [n_items]: train rows)."""
    cold = np.flatnonzero(cands[COLD].to_numpy(bool))
    if weight is None or not len(cold):
        return scores
    out = np.asarray(scores, dtype=np.float64).copy()
    items = cands[tb.ITEM_IDX].to_numpy(np.int64)
    for at in pd.Series(cold).groupby(cands[tb.USER_IDX].to_numpy()[cold]).agg(list):  # one cold user's rows
        counts = item_counts[items[at]]  # [C], the user's candidates
        out[at] = with_popularity_prior(out[at][None, :], np.ones(1, bool), counts, weight)[0]
    return out


def top_k_candidates(cands: pd.DataFrame, scores: np.ndarray, k: int) -> pd.DataFrame:
    """The top ``k`` of each user's candidates by the ranker's score (the shared tie rule: smaller item_idx
    first), through ``scoring.top_k_of_scores`` on a [users, candidate items] matrix, -inf elsewhere."""
    users, u_pos = np.unique(cands[tb.USER_IDX].to_numpy(np.int64), return_inverse=True)
    items, i_pos = np.unique(cands[tb.ITEM_IDX].to_numpy(np.int64), return_inverse=True)
    block = max(1, (32 << 20) // max(1, len(items)))
    out = []
    for start in range(0, len(users), block):
        rows = (u_pos >= start) & (u_pos < start + block)
        matrix = np.full((min(block, len(users) - start), len(items)), -np.inf, dtype=np.float64)
        matrix[u_pos[rows] - start, i_pos[rows]] = scores[rows]
        out.append(top_k_of_scores(users[start:start + block], matrix, None, items, k))
    return pd.concat(out, ignore_index=True)


def _validation_lift(rows: pd.DataFrame, ranked: np.ndarray) -> dict[str, float]:
    """NDCG@10 over the ranker's early-stopping users (label items relevant): the candidate model's order
    against the ranker's: the second stage must win here to be worth serving."""
    frame = rows.assign(_score=ranked)
    before, after = [], []
    for _, group in frame.groupby(tb.USER_IDX):
        relevant = group.loc[group[LABEL] == 1, tb.ITEM_IDX].to_numpy()
        before.append(M.ndcg(group.sort_values(tb.RANK)[tb.ITEM_IDX].to_numpy(), relevant, 10))
        after.append(M.ndcg(group.sort_values("_score", ascending=False, kind="stable")[tb.ITEM_IDX].to_numpy(),
                            relevant, 10))
    return {"valid_candidate_ndcg@10": float(np.mean(before)), "valid_ranker_ndcg@10": float(np.mean(after))}
