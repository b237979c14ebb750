"""The contract of ``Recommender``, run against every registered model on one small synthetic warehouse.

A new model joins by adding one line to ``TINY``: its hyper-parameters, small enough to train in seconds,
given as raw YAML-like dicts (validated by the model's own ``params_class``, as the pipeline does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.errors import RecsysError
from recsys_spark.models import registry
from recsys_spark.recommend import recommend_with_fallback

pytestmark = [pytest.mark.spark, pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

TORCH = {"backend": "local", "num_proc": 1, "validation_users": 5,
         "train": {"epochs": 1, "batch_size": 64, "progress": False}}
TINY = {
    "popularity": {},
    "itemknn": {"neighbours": 20},
    "als": {"rank": 4, "max_iter": 5, "reg_param": 0.01, "num_blocks": 2, "seed": 1},
    "als_cg": {"rank": 4, "max_iter": 5, "reg_param": 0.1, "num_blocks": 2, "seed": 1},
    "svd": {"rank": 4, "power_iters": 3},
    "ease": {"reg": 10.0},
    "ncf": {**TORCH, "net": {"mf_dim": 4, "mlp_layers": [8, 4]}},
    "sasrec": {**TORCH, "net": {"max_len": 10, "d": 8, "blocks": 1}},
    "gru4rec": {**TORCH, "net": {"hidden": 8, "parallel": 8, "n_sample": 16, "max_length": 10}},
    "deepfm": {**TORCH, "net": {"dim": 4, "hidden": [8]}},
    "widedeep": {**TORCH, "net": {"dim": 4, "hidden": [8]}},
    "dcn": {**TORCH, "net": {"dim": 4, "hidden": [8], "cross_layers": 2}},
    "two_tower": {**TORCH, "net": {"dim": 4, "field_dim": 4, "hidden": [8], "history_len": 5}},
    "lightfm": {**TORCH, "net": {"dim": 4}},
    "item2vec": {"vector_size": 8, "window": 3, "min_count": 1, "max_iter": 2, "seed": 1},
    "multvae": {**TORCH, "net": {"hidden": 8, "latent": 4, "total_anneal_steps": 10}},
    "twostage": {"candidates": "popularity", "candidates_k": 30, "label_items": 2, "ranker": {"trees": 20}},
}
# Models that rank only a neighbourhood of the user's items, so a user may get fewer than k rows.
NEIGHBOURHOOD_ONLY = {"itemknn"}
K = 5
UNKNOWN_USER = 10**6  # in no index: every model's fallback serves it


def test_every_registered_model_is_in_the_suite():
    assert set(TINY) == set(registry.MODELS)


@pytest.fixture(scope="module")
def models(world, tmp_path_factory):
    """Each model fitted once on the world's train split, lazily, by name."""
    fitted = {}

    def get(name: str):
        if name not in fitted:
            cls = registry.model_class(name)
            model = cls(cls.params_class.model_validate(TINY[name]))
            model.workdir = str(tmp_path_factory.mktemp(name))
            model.warehouse, model.run_date, model.users_per_block = world.warehouse, world.run.run_date, 16
            fitted[name] = model.fit(world.train)
        return fitted[name]

    return get


@pytest.fixture(scope="module")
def facts(spark, world):
    """What the checks need from the world: its users, seen pairs, the catalogue, two popular items."""
    train = world.train
    popular = [r[0] for r in train.groupBy(tb.ITEM_IDX).count().orderBy(F.desc("count"), tb.ITEM_IDX).limit(2)
               .collect()]
    catalogue = sorted(r[0] for r in tb.read(spark, world.warehouse, tb.ITEM_INDEX).select(tb.ITEM_IDX).collect())
    return {
        "users": train.select(tb.USER_IDX).distinct(),
        "user_set": {r[0] for r in train.select(tb.USER_IDX).distinct().collect()},
        "seen": train.select(tb.USER_IDX, tb.ITEM_IDX),
        "seen_pairs": {(r[0], r[1]) for r in train.select(tb.USER_IDX, tb.ITEM_IDX).collect()},
        "train_items": sorted(r[0] for r in train.select(tb.ITEM_IDX).distinct().collect()),
        "catalogue": catalogue,
        "excluded": popular,
    }


def _sorted(recs) -> pd.DataFrame:
    return recs.toPandas().sort_values([tb.USER_IDX, tb.RANK]).reset_index(drop=True)


@pytest.mark.parametrize("name", list(TINY))
def test_recommendations_keep_the_contract(name, models, facts):
    model = models(name)
    recs = _sorted(model.recommend(facts["users"], K, seen=facts["seen"], exclude_items=facts["excluded"]))
    assert list(recs.columns) == [tb.USER_IDX, tb.ITEM_IDX, tb.SCORE, tb.RANK]
    assert not any(pair in facts["seen_pairs"] for pair in zip(recs[tb.USER_IDX], recs[tb.ITEM_IDX], strict=True))
    assert not recs[tb.ITEM_IDX].isin(facts["excluded"]).any()
    for _, rows in recs.groupby(tb.USER_IDX):
        assert rows[tb.RANK].tolist() == list(range(1, len(rows) + 1))  # rank 1 first, no gaps
        assert len(rows) <= K and rows[tb.ITEM_IDX].is_unique
        scores, items = rows[tb.SCORE].to_numpy(), rows[tb.ITEM_IDX].to_numpy()
        assert (np.diff(scores) <= 0).all()
        assert all(items[r] < items[r + 1] for r in range(len(rows) - 1) if scores[r] == scores[r + 1])
    known = model.known_users()
    scorable = facts["user_set"] if known is None else facts["user_set"] & {r[0] for r in known.collect()}
    assert set(recs[tb.USER_IDX]) <= facts["user_set"]
    if name not in NEIGHBOURHOOD_ONLY:  # the catalogue is far from exhausted: k rows for every user it scores
        counts = recs.groupby(tb.USER_IDX).size()
        assert set(counts.index) == scorable and (counts == K).all()


@pytest.mark.parametrize("name", list(TINY))
def test_fewer_rows_when_the_catalogue_runs_out(name, spark, models, facts):
    model = models(name)
    user = min(facts["user_set"])
    left = facts["train_items"][-2:]  # every other item of the catalogue counts as seen
    seen = spark.createDataFrame([(user, i) for i in facts["catalogue"] if i not in left],
                                 f"{tb.USER_IDX} int, {tb.ITEM_IDX} int")
    recs = _sorted(model.recommend(spark.createDataFrame([(user,)], f"{tb.USER_IDX} int"), K, seen=seen))
    if name in NEIGHBOURHOOD_ONLY:
        assert set(recs[tb.ITEM_IDX]) <= set(left)
    else:
        assert sorted(recs[tb.ITEM_IDX]) == left and recs[tb.RANK].tolist() == [1, 2]


@pytest.mark.parametrize("name", list(TINY))
def test_unknown_users_get_the_popularity_fallback(name, spark, models, facts):
    model, popularity = models(name), models("popularity")
    users = spark.createDataFrame([(min(facts["user_set"]),), (UNKNOWN_USER,)], f"{tb.USER_IDX} int")
    recs = _sorted(recommend_with_fallback(model, users, K, facts["seen"], (), popularity))
    fallback = _sorted(popularity.recommend(users.filter(F.col(tb.USER_IDX) == UNKNOWN_USER), K, facts["seen"]))
    assert len(fallback) == K
    pd.testing.assert_frame_equal(recs[recs[tb.USER_IDX] == UNKNOWN_USER].reset_index(drop=True), fallback)
    assert min(facts["user_set"]) in set(recs[tb.USER_IDX])


@pytest.mark.parametrize("name", list(TINY))
def test_similar_items_where_offered(name, models):
    try:
        similar = models(name).similar_items(3).toPandas()
    except RecsysError as exc:
        assert "does not provide similar items" in str(exc)
        pytest.skip(f"{name} offers no similar items")
    assert len(similar) > 0 and (similar[tb.ITEM_IDX] != similar[tb.SIMILAR_ITEM_IDX]).all()
    for _, rows in similar.sort_values([tb.ITEM_IDX, tb.RANK]).groupby(tb.ITEM_IDX):
        assert rows[tb.RANK].tolist() == list(range(1, len(rows) + 1)) and len(rows) <= 3
        assert (np.diff(rows[tb.SCORE].to_numpy()) <= 0).all() and rows[tb.SIMILAR_ITEM_IDX].is_unique


@pytest.mark.parametrize("name", list(TINY))
def test_save_load_gives_the_same_recommendations(name, spark, models, facts, world, tmp_path):
    model = models(name)
    users = facts["users"].orderBy(tb.USER_IDX).limit(12)
    before = _sorted(model.recommend(users, K, seen=facts["seen"]))
    model.save(str(tmp_path / name))
    loaded = registry.load(name, spark, str(tmp_path / name))
    loaded.warehouse, loaded.run_date, loaded.users_per_block = world.warehouse, world.run.run_date, 16
    assert type(loaded) is type(model) and loaded.params == model.params
    pd.testing.assert_frame_equal(_sorted(loaded.recommend(users, K, seen=facts["seen"])), before)


@pytest.mark.parametrize("name", list(TINY))
def test_code_defaults_equal_the_yaml(name):
    """conf/models/<name>.yaml and the params class agree: a model built in code trains as the pipeline's."""
    cls = registry.model_class(name)
    path = Path(__file__).resolve().parents[1] / "conf" / "models" / f"{name}.yaml"
    from_yaml = cls.params_class.model_validate(yaml.safe_load(path.read_text()) or {})
    assert from_yaml == cls.params_class()
