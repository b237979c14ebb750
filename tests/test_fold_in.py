"""ALS fold-in (recsys_spark/models/als.py ``fold_in``): users the fit never saw get factors from their
interactions with the item factors fixed, by MLlib's own normal equation."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from recsys_spark import pipeline
from recsys_spark import tables as tb
from recsys_spark.cli import main
from recsys_spark.config import load_config
from recsys_spark.errors import RecsysError
from recsys_spark.models.als import ALSParams, ALSRecommender
from recsys_spark.models.base import META_FILE
from recsys_spark.models.popularity import PopularityRecommender
from recsys_spark.recommend import to_original_ids
from recsys_spark.tables import EMBEDDING

pytestmark = pytest.mark.spark


def factors_by_user(frame) -> dict[int, np.ndarray]:
    return {r[tb.USER_IDX]: np.asarray(r[EMBEDDING], dtype=np.float64) for r in frame.collect()}


def cosines(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> np.ndarray:
    users = sorted(a)
    x, y = np.stack([a[u] for u in users]), np.stack([b[u] for u in users])
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


@pytest.mark.parametrize("nonnegative", [False, True], ids=["cholesky", "nnls"])
def test_folding_in_known_users_gives_back_the_factors_mllib_learnt(world, nonnegative):
    """MLlib's last half-iteration computes every user's factor from the final item factors; folding the
    same users in again from the same rows must give that factor back. Some weights are negated and some
    zeroed, so MLlib's |rating| confidence, preference 0 for r <= 0 and its count of positive rows in the
    regularisation are all pinned (measured: every cosine above 0.99999 for Cholesky, 0.999 for NNLS)."""
    train = world.train.select(
        tb.USER_IDX, tb.ITEM_IDX,
        F.when(F.col(tb.ITEM_IDX) % 7 == 3, -F.col(tb.WEIGHT))
        .when(F.col(tb.ITEM_IDX) % 11 == 5, F.lit(0.0)).otherwise(F.col(tb.WEIGHT)).alias(tb.WEIGHT),
    ).persist()
    model = ALSRecommender(ALSParams(rank=8, max_iter=6, reg_param=0.05, alpha=2.0, num_blocks=2, seed=3,
                                     nonnegative=nonnegative)).fit(train)
    learnt = factors_by_user(model.learnt_user_factors())
    folded = factors_by_user(model.fold_in(train))
    # A user with no positive weight left has no row (MLlib learnt a zero vector for them).
    zero = {u for u, v in learnt.items() if not v.any()}
    assert set(folded) == set(learnt) - zero and len(folded) > 50
    cos = cosines(folded, learnt)
    assert cos.min() > (0.999 if nonnegative else 0.99999), np.sort(cos)[:5]
    norms = np.array([np.linalg.norm(folded[u]) / np.linalg.norm(learnt[u]) for u in sorted(folded)])
    assert np.abs(norms - 1).max() < (1e-2 if nonnegative else 1e-4), norms
    train.unpersist()


def test_fold_in_users_adds_only_unseen_users_and_they_are_recommended(world):
    """Users left out of the fit are folded in and recommended from their factors; known users keep the
    learnt ones; items the model never saw are ignored; a user with no known item gets no factor."""
    train = world.train.select(tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT).persist()
    held_out = F.col(tb.USER_IDX) % 5 == 0
    model = ALSRecommender(ALSParams(rank=8, max_iter=5, num_blocks=2)).fit(train.filter(~held_out))
    n_items = train.agg(F.max(tb.ITEM_IDX)).first()[0] + 1
    ghost = world.train.sparkSession.createDataFrame([(100_000, n_items + 5, 3.0)], train.schema)
    new = model.fold_in_users(train.unionByName(ghost))
    new_users = {r[0] for r in new.select(tb.USER_IDX).collect()}
    assert new_users == {r[0] for r in train.filter(held_out).select(tb.USER_IDX).distinct().collect()}
    assert model.user_factors().count() == model.learnt_user_factors().count() + len(new_users)
    recs = model.recommend(train.filter(held_out).select(tb.USER_IDX), 5, seen=train).toPandas()
    assert set(recs[tb.USER_IDX]) == new_users and (recs.groupby(tb.USER_IDX).size() == 5).all()
    train.unpersist()


def test_fold_in_of_an_unfitted_model_says_so(world):
    with pytest.raises(RecsysError, match="not fitted"):
        ALSRecommender().fold_in(world.train)


# --- the cadence: which saved model a run keeps ------------------------------------------------------

def save_stub(warehouse: str, model: str, day: str, complete: bool = True) -> None:
    """A saved model's directory as the pipeline leaves it: complete exactly when model.json is there."""
    path = Path(tb.model_dir(warehouse, model, dt.date.fromisoformat(day)))
    path.mkdir(parents=True)
    if complete:
        (path / META_FILE).write_text(json.dumps({"model": model}))


def test_a_model_is_kept_for_n_days_then_refitted(tmp_path):
    wh = str(tmp_path / "warehouse")
    config = load_config(overrides=[f"warehouse={wh}"])

    def kept(day: str, every: int = 7):
        return pipeline.kept_model_date(config, "als", pipeline.Run.of(config, dt.date.fromisoformat(day)), every)

    assert kept("2026-03-01") is None  # no model yet: the first day refits
    save_stub(wh, "als", "2026-03-01")
    save_stub(wh, "als", "2026-03-05", complete=False)  # a save killed half-way is no model
    save_stub(wh, "als", "2026-03-20")  # a later model: never used by an earlier day (backfill)
    assert kept("2026-03-02") == kept("2026-03-07") == dt.date(2026, 3, 1)
    assert kept("2026-03-08") is None  # 7 days old: refit
    assert kept("2026-03-01") is None  # the run date's own model is refitted, as a re-run always did
    assert kept("2026-03-02", every=1) is None  # every day: never kept
    assert pipeline.latest_model_date(wh, "als", dt.date(2026, 3, 19)) == dt.date(2026, 3, 1)
    assert pipeline.latest_model_date(wh, "als", dt.date(2026, 2, 28)) is None
    with pytest.raises(RecsysError, match="popularity cannot fold in"):
        pipeline.kept_model_date(config, "popularity", pipeline.Run.of(config, dt.date(2026, 3, 2)), 7)


# --- `recsys-spark recommend --fold-in` ----------------------------------------------------------------

D1, D2 = "2026-02-01", "2026-02-03"
K = 5


def recs_of(spark, warehouse: str, day: str, model: str) -> dict[str, list[str]]:
    rows = (spark.read.format("delta").load(f"{warehouse}/gold/recommendations")
            .filter((F.col(tb.RUN_DATE) == day) & (F.col(tb.MODEL) == model)).toPandas())
    return {u: g.sort_values(tb.RANK)[[tb.ITEM_ID, tb.SCORE]] for u, g in rows.groupby(tb.USER_ID)}


def same_list(a, b) -> bool:
    """The same items with the same scores (float32 factors: two near-equal scores may swap ranks)."""
    return set(a[tb.ITEM_ID]) == set(b[tb.ITEM_ID]) and np.allclose(a[tb.SCORE], b[tb.SCORE], rtol=1e-3)


def test_fold_in_serves_the_new_users_of_a_later_ingest(spark, tmp_path, capsys):
    """Day 1: events, a fitted ALS. Day 3: a later ingest adds new users, each a copy of a day-1 user's
    events (on the items that passed day 1's activity filter, so the original's train rows stay as they
    were) under a new id. `recommend --fold-in` on day 3 uses the day-1 model, and each copy gets its
    original's list: the original's learnt factor is the solve of the same rows that the fold-in repeats,
    while the popularity fallback would give them other lists."""
    wh = str(tmp_path / "warehouse")
    settings = ["generate.events=1500", "generate.seed=11", "generate.days=10", f"recommend.k={K}",
                "model_params.als.rank=8", "model_params.als.max_iter=5", "model_params.als.num_blocks=2"]
    args = ["--warehouse", wh, *[x for s in settings for x in ("--set", s)]]
    config = load_config(overrides=[f"warehouse={wh}", *settings])
    events = pipeline.synthetic_input(spark, config)

    def cli(*argv: str) -> int:
        return main([*argv, *args])

    assert cli("ingest", "--input", events, "--run-date", D1) == 0
    assert cli("interactions", "--run-date", D1) == 0
    # No saved model yet: one line, before any work.
    assert cli("recommend", "--model", "als", "--fold-in", "--run-date", D1) == 2
    assert "no saved als model on or before 2026-02-01" in capsys.readouterr().err
    assert cli("recommend", "--model", "popularity", "--fold-in", "--run-date", D1) == 2
    assert "popularity cannot fold in" in capsys.readouterr().err
    assert cli("train", "--model", "als", "--run-date", D1) == 0

    trained = tb.read(spark, wh, tb.TRAIN).select(tb.USER_IDX).distinct().join(tb.read(spark, wh, tb.USER_INDEX),
                                                                                tb.USER_IDX)
    originals = [r[0] for r in trained.select(tb.USER_ID).orderBy(tb.USER_ID).collect()][::4]
    later = tmp_path / "later.parquet"
    raw = spark.read.parquet(events)
    kept_items = tb.read(spark, wh, tb.ITEM_INDEX).select(tb.ITEM_ID)  # so no filtered-out item comes back
    (raw.filter(F.col(tb.USER_ID).isin(originals)).join(kept_items, tb.ITEM_ID, "left_semi")
     .withColumn(tb.USER_ID, F.concat(F.lit("new-"), tb.USER_ID))
     .withColumn(tb.SESSION_ID, F.concat(F.lit("new-"), tb.SESSION_ID))
     .write.parquet(str(later)))
    assert cli("ingest", "--input", str(later), "--run-date", D2) == 0
    assert cli("interactions", "--run-date", D2) == 0
    capsys.readouterr()
    assert cli("recommend", "--model", "als", "--fold-in", "--run-date", D2) == 0
    out = capsys.readouterr().out
    assert f"folded {len(originals)} new users into the als model of {D1}" in out, out

    recs = recs_of(spark, wh, D2, "als")
    users = {r[0] for r in tb.read(spark, wh, tb.USER_INDEX).select(tb.USER_ID).collect()}
    assert set(recs) == users and all(len(top) == K for top in recs.values())  # every user, k rows
    clones = {f"new-{u}": u for u in originals}
    differ = {new: (recs[new], recs[old]) for new, old in clones.items() if not same_list(recs[new], recs[old])}
    assert not differ, differ
    # ... and those lists are not the fallback's.
    train = tb.read(spark, wh, tb.TRAIN).filter(F.col(tb.SPLIT) == config.split)
    users, items = tb.read(spark, wh, tb.USER_INDEX), tb.read(spark, wh, tb.ITEM_INDEX)
    popular = PopularityRecommender().fit(train).recommend(users.filter(F.col(tb.USER_ID).isin(list(clones))), K,
                                                           seen=train)
    popular = to_original_ids(popular, users, items).toPandas()
    popular = {u: set(g[tb.ITEM_ID]) for u, g in popular.groupby(tb.USER_ID)}
    assert sum(set(recs[new][tb.ITEM_ID]) != popular[new] for new in clones) >= 0.8 * len(clones), (recs, popular)
