"""The synthetic generator: deterministic per seed, about the requested size, and shaped like shop data."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark import tables as tb
from recsys_spark.config import GenerateConfig
from recsys_spark.data.synthetic import build_catalogue, generate_events, sizes, write_events

CONFIG = GenerateConfig(events=20_000, seed=7)


@pytest.fixture(scope="module")
def events(spark):
    df = generate_events(spark, CONFIG).cache()
    yield df
    df.unpersist()


def _rows(df, event_type):
    return df.filter(F.col(tb.EVENT_TYPE) == event_type)


def test_default_sizes_follow_the_event_count():
    size = sizes(GenerateConfig(events=20_000))
    assert (size.users, size.items) == (500, 200)
    size = sizes(GenerateConfig(events=1_000_000, users=1_234))
    assert (size.users, size.items) == (1_234, 10_000)


def test_catalogue_samples_items_of_the_requested_category():
    catalogue = build_catalogue(CONFIG)
    counts = np.bincount(catalogue.item_category, minlength=CONFIG.categories)
    assert counts.sum() == 200 and counts.min() >= 1
    assert (catalogue.price > 0).all()
    rng = np.random.default_rng(0)
    categories = rng.integers(0, CONFIG.categories, 5_000)
    items = catalogue.sample(categories, rng.random(5_000))
    assert (catalogue.item_category[items] == categories).all()


@pytest.mark.spark
def test_same_seed_gives_the_same_rows_whatever_the_partitioning(spark):
    config = GenerateConfig(events=6_000, users=2_500, seed=3)  # three blocks of users
    one = generate_events(spark, config, partitions=1)
    three = generate_events(spark, config, partitions=3)
    assert one.rdd.getNumPartitions() == 1 and three.rdd.getNumPartitions() == 3
    assert one.exceptAll(three).count() == 0
    assert three.exceptAll(one).count() == 0
    other_seed = generate_events(spark, config.model_copy(update={"seed": 4}), partitions=3)
    assert other_seed.exceptAll(three).count() > 0


@pytest.mark.spark
def test_schema_size_and_event_types(events):
    assert events.schema == T.StructType(
        [
            T.StructField(tb.USER_ID, T.StringType(), False),
            T.StructField(tb.ITEM_ID, T.StringType(), False),
            T.StructField(tb.EVENT_TYPE, T.StringType(), False),
            T.StructField(tb.EVENT_TIME, T.TimestampType(), False),
            T.StructField(tb.SESSION_ID, T.StringType(), True),
            T.StructField(tb.CATEGORY, T.StringType(), True),
            T.StructField(tb.PRICE, T.DoubleType(), True),
        ]
    )
    assert abs(events.count() - CONFIG.events) <= 0.1 * CONFIG.events
    types = {row[0] for row in events.select(tb.EVENT_TYPE).distinct().collect()}
    assert types == {"view", "cart", "purchase"}
    assert events.select(tb.USER_ID).distinct().count() == 500
    assert events.filter(F.col(tb.PRICE) <= 0).count() == 0


@pytest.mark.spark
def test_every_purchase_follows_a_cart_in_its_session(events):
    keys = [tb.USER_ID, tb.ITEM_ID, tb.SESSION_ID]
    purchases = _rows(events, "purchase").select(*keys, F.col(tb.EVENT_TIME).alias("bought_at"))
    carts = _rows(events, "cart").select(*keys, F.col(tb.EVENT_TIME).alias("carted_at"))
    matched = purchases.join(carts, keys).filter(F.col("carted_at") <= F.col("bought_at"))
    assert purchases.count() > 0
    assert purchases.join(matched.select(*keys, "bought_at"), [*keys, "bought_at"], "left_anti").count() == 0


@pytest.mark.spark
def test_funnel_rates_are_near_the_config(events):
    counts = {row[0]: row[1] for row in events.groupBy(tb.EVENT_TYPE).count().collect()}
    assert counts["cart"] / counts["view"] == pytest.approx(CONFIG.cart_rate, rel=0.2)
    assert counts["purchase"] / counts["cart"] == pytest.approx(CONFIG.purchase_rate, rel=0.2)


@pytest.mark.spark
def test_item_popularity_is_skewed(events):
    per_item = [row[0] for row in _rows(events, "view").groupBy(tb.ITEM_ID).count().orderBy(F.desc("count"))
                .select("count").collect()]
    top = sizes(CONFIG).items // 10
    assert sum(per_item[:top]) / sum(per_item) > 0.4


@pytest.mark.spark
def test_users_concentrate_on_favourite_categories(events):
    per_category = _rows(events, "view").groupBy(tb.USER_ID, tb.CATEGORY).count()
    per_user = per_category.groupBy(tb.USER_ID).agg(F.max("count").alias("top"), F.sum("count").alias("total"))
    mean_share = per_user.filter(F.col("total") >= 10).select(F.avg(F.col("top") / F.col("total"))).first()[0]
    assert mean_share > 5 / CONFIG.categories


@pytest.mark.spark
def test_users_and_sessions_vary_in_activity(events):
    per_user = _rows(events, "view").groupBy(tb.USER_ID).count().select("count")
    stats = per_user.agg(F.max("count"), F.expr("percentile(count, 0.5)")).first()
    assert stats[0] > 10 * stats[1]  # heavy tail: the busiest user far above the median one
    sessions_per_user = events.groupBy(tb.USER_ID).agg(F.countDistinct(tb.SESSION_ID).alias("n"))
    assert sessions_per_user.agg(F.max("n")).first()[0] > 10


def _repeat_buys(df) -> int:
    """(user, item) pairs bought in two or more sessions."""
    bought = _rows(df, "purchase").groupBy(tb.USER_ID, tb.ITEM_ID).agg(F.countDistinct(tb.SESSION_ID).alias("n"))
    return bought.filter(F.col("n") >= 2).count()


@pytest.mark.spark
def test_repeat_purchases_follow_the_rate(spark, events):
    assert _repeat_buys(events) > 0
    none = generate_events(spark, CONFIG.model_copy(update={"repeat_purchase_rate": 0.0}))
    many = generate_events(spark, CONFIG.model_copy(update={"repeat_purchase_rate": 0.5}))
    assert _repeat_buys(many) > 2 * max(1, _repeat_buys(none))


@pytest.mark.spark
def test_times_lie_in_the_window_and_sessions_are_short(events):
    start = dt.datetime.combine(CONFIG.start_date, dt.time())
    end = start + dt.timedelta(days=CONFIG.days)
    bounds = events.agg(F.min(tb.EVENT_TIME), F.max(tb.EVENT_TIME)).first()
    assert start <= bounds[0] and bounds[1] < end
    spans = events.groupBy(tb.SESSION_ID).agg(
        (F.max(tb.EVENT_TIME).cast("double") - F.min(tb.EVENT_TIME).cast("double")).alias("span")
    )
    assert spans.agg(F.expr("percentile(span, 0.5)")).first()[0] < 3_600


@pytest.mark.spark
def test_write_events_replaces_the_output_and_counts_rows(spark, events, tmp_path):
    path = str(tmp_path / "events")
    small = events.limit(100)
    assert write_events(small, path) == 100
    assert write_events(small.limit(40), path) == 40
    assert spark.read.parquet(path).columns == list(events.columns)
