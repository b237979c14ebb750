"""User, item and context features: bucket labels, vocabulary growth and stability, unseen values -> 0 at
inference, cold side-file users, the DeepFM input frame, and the MovieLens side-file readers."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.data import feature_spec as fs
from recsys_spark.data import features as ft
from recsys_spark.data import indexing, splits

pytestmark = pytest.mark.spark

T0 = dt.datetime(2024, 1, 1, 12, 0)  # a Monday


def _write_events(spark, warehouse, rows):
    """rows: (user, item, event_type, hours after T0, category, price) -> bronze/events + index tables."""
    data = [
        (f"e{n}", u, i, e, T0 + dt.timedelta(hours=h), None, None, c, p, "test", (T0 + dt.timedelta(hours=h)).date())
        for n, (u, i, e, h, c, p) in enumerate(rows)
    ]
    events = spark.createDataFrame(data, tb.EVENTS_SCHEMA)
    tb.overwrite(events, warehouse, tb.BRONZE_EVENTS)
    indexing.update_index(spark, events, warehouse, tb.USER_INDEX, tb.USER_ID, tb.USER_IDX)
    indexing.update_index(spark, events, warehouse, tb.ITEM_INDEX, tb.ITEM_ID, tb.ITEM_IDX)


EVENTS = [
    ("u1", "i1", "view", 0, "shoes", 15.0),
    ("u1", "i1", "view", 1, "shoes", 15.0),
    ("u1", "i1", "view", 2, "shoes", 17.0),
    ("u1", "i1", "cart", 3, "shoes", 15.0),
    ("u1", "i2", "view", 4, "books", 0.5),
    ("u2", "i2", "purchase", -72, "books", 0.5),  # three days before u1's last event
]


def _decoded(vocab: ft.Vocabulary, row, fields):
    inverse = {f: {i: v for v, i in vocab.index.get(f, {}).items()} for f in fields}
    return {f: inverse[f].get(row[f]) if row[f] else None for f in fields}


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    warehouse = str(tmp_path_factory.mktemp("features") / "warehouse")
    _write_events(spark, warehouse, EVENTS)
    side_users = spark.createDataFrame([("u1", "writer"), ("u3", "artist")], "user_id string, occupation string")
    counts = ft.build_features(spark, warehouse, side={"users": side_users})
    return warehouse, counts


def test_features_of_active_and_cold_users_and_items(spark, built):
    warehouse, counts = built
    assert counts[tb.USER_FEATURES] == 3 and counts[tb.ITEM_FEATURES] == 2  # u1, u2 + cold u3
    vocab = ft.Vocabulary.read(spark, warehouse)
    users = {r[tb.USER_ID]: r for r in tb.read(spark, warehouse, tb.USER_FEATURES).collect()}
    fields = [*ft.USER_EVENT_FIELDS, tb.OCCUPATION]
    u1 = _decoded(vocab, users["u1"], fields)
    assert u1[f"{tb.ACTIVITY_PREFIX}view"] == "4-7"  # 4 views
    assert u1[f"{tb.ACTIVITY_PREFIX}cart"] == "1"
    assert u1[f"{tb.ACTIVITY_PREFIX}purchase"] == "0"
    assert u1[tb.RECENCY] == "<1d" and u1[tb.FAVOURITE_CATEGORY] == "shoes" and u1[tb.OCCUPATION] == "writer"
    u2 = _decoded(vocab, users["u2"], fields)
    assert u2[tb.RECENCY] == "3d-7d" and u2[f"{tb.ACTIVITY_PREFIX}purchase"] == "1"
    assert u2[tb.OCCUPATION] is None and users["u2"][tb.OCCUPATION] == ft.UNKNOWN  # no side row: 0
    # A side-file user without events: indexed after the others (so every model recommends for it),
    # zero activity, "never" seen, side features kept.
    u3 = _decoded(vocab, users["u3"], fields)
    index = {r[tb.USER_ID]: r[tb.USER_IDX] for r in tb.read(spark, warehouse, tb.USER_INDEX).collect()}
    assert users["u3"][tb.USER_IDX] == index["u3"] == 2 and {index["u1"], index["u2"]} == {0, 1}
    assert u3[f"{tb.ACTIVITY_PREFIX}view"] == "0" and u3[tb.RECENCY] == ft.NEVER and u3[tb.OCCUPATION] == "artist"
    assert users["u3"][tb.FAVOURITE_CATEGORY] == ft.UNKNOWN

    items = {r[tb.ITEM_ID]: r for r in tb.read(spark, warehouse, tb.ITEM_FEATURES).collect()}
    i1 = _decoded(vocab, items["i1"], ft.ITEM_EVENT_FIELDS)
    assert i1 == {tb.CATEGORY: "shoes", tb.PRICE_BUCKET: "10-20", tb.POPULARITY_BUCKET: "1"}
    i2 = _decoded(vocab, items["i2"], ft.ITEM_EVENT_FIELDS)
    assert i2 == {tb.CATEGORY: "books", tb.PRICE_BUCKET: "<1", tb.POPULARITY_BUCKET: "2-3"}


def test_bucket_labels_follow_bucket_order_in_the_vocabulary(spark, built):
    warehouse, _ = built
    vocab = ft.Vocabulary.read(spark, warehouse)
    for name in (tb.RECENCY, tb.PRICE_BUCKET, tb.POPULARITY_BUCKET, tb.HOUR_OF_DAY, tb.DAY_OF_WEEK):
        assert [vocab.lookup(name, v) for v in ft.DOMAINS[name]] == list(range(1, len(ft.DOMAINS[name]) + 1))
    got = spark.range(1).select(*[ft.count_bucket(F.lit(n)).alias(str(n)) for n in (0, 1, 2, 3, 4, 7, 8, 511, 600)])
    assert list(got.first()) == ["0", "1", "2-3", "2-3", "4-7", "4-7", "8-15", "256-511", "512+"]


def test_unseen_values_map_to_zero_at_inference(spark, built):
    warehouse, _ = built
    vocab = ft.Vocabulary.read(spark, warehouse)
    before = tb.read(spark, warehouse, tb.FEATURE_VOCAB).count()
    # Inference-time build: a new occupation for u1 and a new user; the vocabulary is read, not grown.
    side_users = spark.createDataFrame([("u1", "astronaut"), ("u4", "writer")], "user_id string, occupation string")
    ft.build_features(spark, warehouse, side={"users": side_users}, update_vocab=False)
    users = {r[tb.USER_ID]: r for r in tb.read(spark, warehouse, tb.USER_FEATURES).collect()}
    assert users["u1"][tb.OCCUPATION] == ft.UNKNOWN
    assert users["u4"][tb.OCCUPATION] == vocab.lookup(tb.OCCUPATION, "writer") > 0
    assert tb.read(spark, warehouse, tb.FEATURE_VOCAB).count() == before
    # The same encoder on an events frame's context: a Saturday 23:00 purchase and an unknown event type.
    events = spark.createDataFrame(
        [(dt.datetime(2024, 1, 6, 23, 5), "purchase"), (dt.datetime(2024, 1, 1, 0, 0), "teleport")],
        "event_time timestamp, event_type string",
    )
    rows = ft.encode(ft.context_features(events), vocab, ft.CONTEXT_FIELDS).collect()
    assert [(r[tb.HOUR_OF_DAY], r[tb.DAY_OF_WEEK], r[tb.EVENT_TYPE]) for r in rows] == [
        (vocab.lookup(tb.HOUR_OF_DAY, "23"), vocab.lookup(tb.DAY_OF_WEEK, "Sat"),
         vocab.lookup(tb.EVENT_TYPE, "purchase")),
        (vocab.lookup(tb.HOUR_OF_DAY, "0"), vocab.lookup(tb.DAY_OF_WEEK, "Mon"), ft.UNKNOWN),
    ]
    assert vocab.lookup(tb.CATEGORY, "never seen") == ft.UNKNOWN and vocab.lookup("no such field", "x") == 0
    assert ft.Vocabulary.from_json(vocab.to_json()) == vocab


def test_vocabulary_is_stable_across_builds_and_append_only(spark, warehouse):
    _write_events(spark, warehouse, EVENTS)
    ft.build_features(spark, warehouse)
    path = tb.table_path(warehouse, tb.FEATURE_VOCAB)
    first = sorted(tuple(r) for r in tb.read(spark, warehouse, tb.FEATURE_VOCAB).collect())
    version = spark.sql(f"DESCRIBE HISTORY delta.`{path}`").agg(F.max("version")).first()[0]
    ft.build_features(spark, warehouse)  # nothing new: no commit, same rows
    assert sorted(tuple(r) for r in tb.read(spark, warehouse, tb.FEATURE_VOCAB).collect()) == first
    assert spark.sql(f"DESCRIBE HISTORY delta.`{path}`").agg(F.max("version")).first()[0] == version
    # New data with a new category: old rows untouched, the new value after the field's largest index.
    _write_events(spark, warehouse, [*EVENTS, ("u2", "i3", "view", 5, "toys", 3.0)])
    ft.build_features(spark, warehouse)
    second = {(r[0], r[1]): r[2] for r in tb.read(spark, warehouse, tb.FEATURE_VOCAB).collect()}
    assert all(second[(name, value)] == idx for name, value, idx in first)
    categories = {v for (f, _), v in second.items() if f == tb.CATEGORY}
    assert second[(tb.CATEGORY, "toys")] == max(categories) == len(categories)


def test_features_grow_only_from_the_training_period(spark, warehouse):
    """Test-period activity must not reach the features: leave-last-out cuts each user before the first
    event on their test item; the temporal split cuts every user at the latest train interaction."""
    _write_events(spark, warehouse, EVENTS)
    events = tb.read(spark, warehouse, tb.BRONZE_EVENTS)
    users = tb.read(spark, warehouse, tb.USER_INDEX)
    idx = {r[tb.USER_ID]: r[tb.USER_IDX] for r in users.collect()}
    items = {r[tb.ITEM_ID]: r[tb.ITEM_IDX] for r in tb.read(spark, warehouse, tb.ITEM_INDEX).collect()}
    schema = f"{tb.USER_IDX} int, {tb.ITEM_IDX} int, {tb.FIRST_TS} timestamp, {tb.LAST_TS} timestamp"
    at = lambda h: T0 + dt.timedelta(hours=h)  # noqa: E731
    # u1's test item is i2 (first seen at hour 4); u2 has no test item.
    train = spark.createDataFrame([(idx["u1"], items["i1"], at(0), at(3)), (idx["u2"], items["i2"], at(-72), at(-72))],
                                  schema)
    test = spark.createDataFrame([(idx["u1"], items["i2"], at(4), at(4))], schema)
    kept = splits.training_events(events, users, train, test, splits.LEAVE_LAST_OUT)
    assert sorted((r[tb.USER_ID], r[tb.ITEM_ID]) for r in kept.collect()) == [("u1", "i1")] * 4 + [("u2", "i2")]
    ft.build_features(spark, warehouse, events=kept)
    vocab = ft.Vocabulary.read(spark, warehouse)
    u1 = next(r for r in tb.read(spark, warehouse, tb.USER_FEATURES).collect() if r[tb.USER_ID] == "u1")
    assert _decoded(vocab, u1, [f"{tb.ACTIVITY_PREFIX}view"]) == {f"{tb.ACTIVITY_PREFIX}view": "2-3"}  # not 4-7
    i2 = next(r for r in tb.read(spark, warehouse, tb.ITEM_FEATURES).collect() if r[tb.ITEM_ID] == "i2")
    assert _decoded(vocab, i2, [tb.POPULARITY_BUCKET])[tb.POPULARITY_BUCKET] == "1"  # u1's view came later
    # Temporal: the cut is the latest train time (hour 2 here), the same for every user.
    early = spark.createDataFrame([(idx["u1"], items["i1"], at(0), at(2))], schema)
    kept = splits.training_events(events, users, early, test, splits.TEMPORAL)
    assert kept.count() == 4 and kept.agg(F.max(tb.EVENT_TIME)).first()[0] == at(2)


def test_field_frame_spec_and_item_matrix(spark, built):
    warehouse, _ = built
    spec = fs.load_feature_spec(spark, warehouse)
    assert spec.user_fields[0] == tb.USER_IDX and spec.item_fields[0] == tb.ITEM_IDX
    n_users = tb.read(spark, warehouse, tb.USER_INDEX).count()  # u1, u2, side-only u3 (and u4 if built)
    assert spec.cardinalities[tb.USER_IDX] == n_users + 1 and spec.cardinalities[tb.ITEM_IDX] == 3  # + unknown
    assert tb.OCCUPATION in spec.user_fields and spec.n_query == len(spec.user_fields)
    assert fs.FeatureSpec.from_dict(spec.to_dict()) == spec
    users, items = tb.read(spark, warehouse, tb.USER_FEATURES), tb.read(spark, warehouse, tb.ITEM_FEATURES)
    pairs = spark.createDataFrame([(0, 1), (1, 1), (9, 0)], "user_idx int, item_idx int")  # user 9: no features
    rows = sorted(fs.field_frame(pairs, users, items, spec).collect())
    assert [(r[tb.USER_IDX], r[tb.ITEM_IDX]) for r in rows] == [(0, 1), (1, 1)]
    matrix = fs.item_field_matrix(items, spec, n_items=3)  # item 2 has no feature row
    assert matrix.shape == (3, len(spec.item_fields))
    assert matrix[:, 0].tolist() == [1, 2, 3] and (matrix[2, 1:] == 0).all()
    for row in rows:  # the frame's item block is the item matrix's row; the user id is idx + 1
        assert list(row[tb.FIELDS][spec.n_query:]) == matrix[row[tb.ITEM_IDX]].tolist()
        assert row[tb.FIELDS][0] == row[tb.USER_IDX] + 1
        assert all(0 <= v < c for v, c in zip(row[tb.FIELDS], spec.sizes, strict=True))
    # A side-file user without activity (u3) is a query row of its own: its id, then "never" seen.
    queries = {r[tb.USER_ID]: r for r in fs.query_frame(users, spec).collect()}
    u3 = queries["u3"][tb.FIELDS]
    assert len(u3) == len(spec.user_fields) and u3[0] == queries["u3"][tb.USER_IDX] + 1
    never = ft.Vocabulary.read(spark, warehouse).lookup(tb.RECENCY, ft.NEVER)
    assert u3[spec.user_fields.index(tb.RECENCY)] == never != ft.UNKNOWN


@pytest.mark.shared_data
def test_movielens_side_files(spark, shared_data):
    users = ft.read_movielens_users(spark, str(shared_data / "ml-100k" / "u.user"))
    items = ft.read_movielens_items(spark, str(shared_data / "ml-100k" / "u.item"))
    assert users.count() == 943 and items.count() == 1682
    first = users.filter(F.col(tb.USER_ID) == "1").first()  # 1|24|M|technician|85711
    assert (first[tb.AGE_BUCKET], first[tb.GENDER], first[tb.OCCUPATION], first[tb.ZIP_REGION]) == (
        "18-24", "M", "technician", "8")
    assert {r[0] for r in users.select(tb.AGE_BUCKET).distinct().collect()} <= set(ft.AGE_LABELS)
    toy_story = items.filter(F.col(tb.ITEM_ID) == "1").first()  # Animation|Children's|Comedy, 1995
    genres = [g for g in ft.MOVIELENS_GENRES if toy_story[f"{tb.GENRE_PREFIX}{g}"] == "1"]
    assert genres == ["animation", "childrens", "comedy"] and toy_story[tb.RELEASE_DECADE] == "1990s"
    assert np.isin(items.select(f"{tb.GENRE_PREFIX}drama").distinct().toPandas().iloc[:, 0], ["0", "1"]).all()
