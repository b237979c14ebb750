"""Synthetic e-commerce event log: views, carts and purchases with the shape of real shop data.

Why synthetic: the pipeline needs an input of any size with known properties (skewed popularity,
users with tastes, a purchase funnel, repeat buyers) to test and benchmark every step without a
download. The model of behaviour:

- A catalogue of items in categories, derived from the seed alone: categories differ in popularity
  and size, items are Zipf-popular within their category and priced from a lognormal around their
  category's median price.
- Each user has 1-3 favourite categories (picked by category popularity) with personal weights;
  ``taste_strength`` of the views fall there, the rest anywhere by global popularity.
- Activity is heavy-tailed: a user's share of views is lognormal. Views are cut into sessions of
  geometric length; a session has a main category that most of its views stay in.
- Sessions start on a day of the window (weekends a little busier) at an hour drawn from a daily
  curve (quiet nights, evening peak); views within a session are seconds to minutes apart.
- ``cart_rate`` of views are carted shortly after the view; ``purchase_rate`` of carts are bought
  at the end of the session. ``repeat_purchase_rate`` of purchases are bought again (view, cart,
  purchase) in a later session of the same user.

Generation runs on Spark, one task per group of user blocks: each block of ``USERS_PER_BLOCK`` users
draws from its own generator seeded with ``(seed, block)``, so the rows depend on the config alone,
never on how Spark partitions the work, and no more than one block is ever in memory at a time.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from recsys_spark import tables as tb
from recsys_spark.config import GenerateConfig

log = logging.getLogger(__name__)

USERS_PER_BLOCK = 1_000
COLUMNS = (tb.USER_ID, tb.ITEM_ID, tb.EVENT_TYPE, tb.EVENT_TIME, tb.SESSION_ID, tb.CATEGORY, tb.PRICE)
# The same field types and nullability as the bronze events contract.
SCHEMA = T.StructType([tb.EVENTS_SCHEMA[name] for name in COLUMNS])

VIEW, CART, PURCHASE = 0, 1, 2
EVENT_NAMES = np.array(["view", "cart", "purchase"], dtype=object)

# Distinct random streams: the catalogue, and one per block of users.
_CATALOGUE_STREAM = 0
_BLOCK_STREAM = 1

ACTIVITY_SIGMA = 1.2  # lognormal spread of views per user: a few users make many of the events
MEAN_SESSION_VIEWS = 5.0
SESSION_FOCUS = 0.7  # share of a session's views in its main category
FAVOURITE_COUNTS = (1, 2, 3)
FAVOURITE_COUNT_PROBS = (0.4, 0.35, 0.25)
CATEGORY_EXPONENT = 0.8  # Zipf exponent of category popularity
WEEKEND_FACTOR = 1.15
# Relative traffic per hour of the day: quiet at night, a lunch bump, an evening peak.
HOURLY = np.array([3, 2, 1.5, 1, 1, 1.5, 3, 5, 7, 8, 8, 9, 10, 9, 8, 8, 9, 10, 12, 14, 15, 13, 9, 5], dtype=float)
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Sizes:
    users: int
    items: int
    categories: int
    views_per_user: float

    @property
    def blocks(self) -> int:
        return -(-self.users // USERS_PER_BLOCK)


def sizes(config: GenerateConfig) -> Sizes:
    """Users, items and the views each user needs on average for the total to come out near ``events``."""
    users = config.users or max(1, config.events // 40)
    items = config.items or max(200, config.events // 100)
    categories = min(config.categories, items)
    c, p = config.cart_rate, config.purchase_rate
    # Expected events per organic view: itself, its cart, its purchase, and the purchase's repeat
    # (a view, a cart and a purchase).
    events_per_view = 1 + c + c * p + 3 * config.repeat_purchase_rate * c * p
    return Sizes(users, items, categories, config.events / users / events_per_view)


@dataclass(frozen=True)
class Catalogue:
    """Items sorted by (category, popularity rank), with what sampling an item of a category needs."""

    item_category: np.ndarray  # (items,) category index of each item
    price: np.ndarray  # (items,)
    category_weight: np.ndarray  # (categories,) global popularity, sums to 1
    order: np.ndarray  # (items,) item indices sorted by category, most popular first
    keys: np.ndarray  # (items,) category + cumulative popularity within it, along ``order``
    category_start: np.ndarray  # (categories,) first position of each category in ``order``
    category_end: np.ndarray  # (categories,) one past its last position
    item_ids: np.ndarray  # (items,) object array of id strings
    category_names: np.ndarray  # (categories,) object array

    def sample(self, categories: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """Items drawn Zipf-wise within the given categories, by inverting each category's CDF."""
        pos = np.searchsorted(self.keys, categories + uniform, side="right")
        pos = np.clip(pos, self.category_start[categories], self.category_end[categories] - 1)
        return self.order[pos]


def build_catalogue(config: GenerateConfig) -> Catalogue:
    """The item catalogue, a function of the config alone: cheap enough to rebuild in every task."""
    size = sizes(config)
    n_items, n_cats = size.items, size.categories
    rng = np.random.default_rng([config.seed, _CATALOGUE_STREAM])

    category_weight = rng.permutation(np.arange(1, n_cats + 1, dtype=float) ** -CATEGORY_EXPONENT)
    category_weight /= category_weight.sum()
    # Every category gets one item; popular categories get more of the rest (sub-linearly).
    share = np.sqrt(category_weight) / np.sqrt(category_weight).sum()
    counts = 1 + rng.multinomial(n_items - n_cats, share)
    item_category = rng.permutation(np.repeat(np.arange(n_cats), counts))

    # Popularity rank of each item within its category, in random order.
    order = np.lexsort((rng.random(n_items), item_category))
    category_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    category_end = np.cumsum(counts)
    sorted_category = item_category[order]
    rank = np.arange(n_items) - category_start[sorted_category] + 1
    weight = rank.astype(float) ** -config.zipf_exponent
    cum = np.cumsum(weight)
    before = np.concatenate([[0.0], cum])[category_start]  # cumulative weight before each category
    totals = cum[category_end - 1] - before
    keys = sorted_category + (cum - before[sorted_category]) / totals[sorted_category]

    median_price = np.exp(rng.normal(3.3, 0.9, n_cats))
    price = np.round(np.maximum(0.49, median_price[item_category] * np.exp(rng.normal(0.0, 0.4, n_items))), 2)

    item_width = max(5, len(str(n_items - 1)))
    cat_width = max(2, len(str(n_cats - 1)))
    return Catalogue(
        item_category=item_category,
        price=price,
        category_weight=category_weight,
        order=order,
        keys=keys,
        category_start=category_start,
        category_end=category_end,
        item_ids=np.array([f"i{i:0{item_width}d}" for i in range(n_items)], dtype=object),
        category_names=np.array([f"c{c:0{cat_width}d}" for c in range(n_cats)], dtype=object),
    )


@dataclass(frozen=True)
class _Tastes:
    favourites: np.ndarray  # (users, k) category indices, best first
    weights: np.ndarray  # (users, k) cumulative weights over favourites; unused slots beyond 1

    def categories(self, rng: np.random.Generator, users: np.ndarray, strength: float,
                   catalogue: Catalogue) -> np.ndarray:
        """A category per row: a favourite of its user with probability ``strength``, else by popularity."""
        n = len(users)
        slot = (rng.random(n)[:, None] >= self.weights[users]).sum(axis=1)
        favourite = self.favourites[users, np.minimum(slot, self.favourites.shape[1] - 1)]
        anywhere = np.searchsorted(np.cumsum(catalogue.category_weight), rng.random(n), side="right")
        anywhere = np.minimum(anywhere, len(catalogue.category_weight) - 1)
        return np.where(rng.random(n) < strength, favourite, anywhere)


def _tastes(rng: np.random.Generator, n_users: int, catalogue: Catalogue) -> _Tastes:
    n_cats = len(catalogue.category_weight)
    k = min(max(FAVOURITE_COUNTS), n_cats)
    # Weighted sampling without replacement (Gumbel top-k): users favour popular categories more often.
    noisy = np.log(catalogue.category_weight) + rng.gumbel(size=(n_users, n_cats))
    favourites = np.argsort(-noisy, axis=1)[:, :k]
    count = np.minimum(rng.choice(FAVOURITE_COUNTS, size=n_users, p=FAVOURITE_COUNT_PROBS), k)
    raw = rng.gamma(1.0, size=(n_users, k)) * (np.arange(k) < count[:, None])
    weights = np.cumsum(raw / raw.sum(axis=1, keepdims=True), axis=1)
    weights[np.arange(k) >= count[:, None] - 1] = 1.0  # the last used slot takes any rounding left over
    return _Tastes(favourites, weights)


def _gaps(rng: np.random.Generator, n: int, median_s: float, low: float, high: float) -> np.ndarray:
    """Seconds between two actions: lognormal around a median, clipped to a plausible range."""
    return np.clip(rng.lognormal(np.log(median_s), 0.9, n), low, high)


def _session_starts(rng: np.random.Generator, n: int, config: GenerateConfig) -> np.ndarray:
    """Seconds from the window start: a day (weekends busier), then an hour from the daily curve."""
    weekday = (config.start_date.weekday() + np.arange(config.days)) % 7
    day_weight = np.where(weekday >= 5, WEEKEND_FACTOR, 1.0)
    day = rng.choice(config.days, size=n, p=day_weight / day_weight.sum())
    hour = rng.choice(24, size=n, p=HOURLY / HOURLY.sum())
    return day * SECONDS_PER_DAY + hour * 3600.0 + rng.random(n) * 3600.0


def block_events(config: GenerateConfig, catalogue: Catalogue, block: int) -> pd.DataFrame:
    """All events of one block of users, from a generator seeded by (seed, block) alone."""
    size = sizes(config)
    rng = np.random.default_rng([config.seed, _BLOCK_STREAM, block])
    first_user = block * USERS_PER_BLOCK
    n_users = min(USERS_PER_BLOCK, size.users - first_user)
    tastes = _tastes(rng, n_users, catalogue)

    # Views per user: a heavy-tailed share of the block's budget, at least one each.
    activity = rng.lognormal(0.0, ACTIVITY_SIGMA, n_users)
    expected = size.views_per_user * n_users * activity / activity.sum()
    views = np.maximum(1, np.floor(expected + rng.random(n_users))).astype(np.int64)

    # The views of each user in order; each starts a new session with probability 1 / MEAN_SESSION_VIEWS.
    v_user = np.repeat(np.arange(n_users), views)
    n_views = len(v_user)
    new_session = rng.random(n_views) < 1.0 / MEAN_SESSION_VIEWS
    new_session[np.concatenate([[0], np.cumsum(views)[:-1]])] = True
    v_session = np.cumsum(new_session) - 1
    session_first_view = np.flatnonzero(new_session)
    s_user = v_user[session_first_view]
    n_sessions = len(s_user)
    user_first_session = np.searchsorted(s_user, np.arange(n_users))
    s_rank = np.arange(n_sessions) - user_first_session[s_user]  # chronological number within the user
    s_count = np.bincount(s_user, minlength=n_users)
    start = _session_starts(rng, n_sessions, config)
    start = start[np.lexsort((start, s_user))]  # sessions are grouped by user: make them chronological

    # What is viewed: mostly the session's main category, otherwise a fresh draw from the user's tastes.
    s_category = tastes.categories(rng, s_user, config.taste_strength, catalogue)
    fresh = tastes.categories(rng, v_user, config.taste_strength, catalogue)
    v_category = np.where(rng.random(n_views) < SESSION_FOCUS, s_category[v_session], fresh)
    v_item = catalogue.sample(v_category, rng.random(n_views))

    # When, in seconds after the session start.
    steps = _gaps(rng, n_views, 40.0, 2.0, 900.0)
    steps[session_first_view] = 0.0
    elapsed = np.cumsum(steps)
    v_offset = elapsed - elapsed[session_first_view][v_session]
    last_view_offset = v_offset[np.append(session_first_view[1:], n_views) - 1]

    # The funnel: a cart shortly after the view, a purchase at the end of the session.
    c_view = np.flatnonzero(rng.random(n_views) < config.cart_rate)
    c_offset = v_offset[c_view] + _gaps(rng, len(c_view), 15.0, 1.0, 300.0)
    bought = rng.random(len(c_view)) < config.purchase_rate
    p_view = c_view[bought]
    p_offset = np.maximum(c_offset[bought], last_view_offset[v_session[p_view]]) + _gaps(
        rng, len(p_view), 60.0, 5.0, 1200.0
    )

    # Repeat purchases: view, cart and buy the same item again in a later session of the same user.
    p_user, p_session = v_user[p_view], v_session[p_view]
    later = s_count[p_user] - 1 - s_rank[p_session]
    repeat = (later > 0) & (rng.random(len(p_view)) < config.repeat_purchase_rate)
    r_user, r_item = p_user[repeat], v_item[p_view[repeat]]
    r_session = p_session[repeat] + 1 + np.floor(rng.random(len(r_user)) * later[repeat]).astype(np.int64)
    r_view = last_view_offset[r_session] + _gaps(rng, len(r_user), 40.0, 2.0, 900.0)
    r_cart = r_view + _gaps(rng, len(r_user), 15.0, 1.0, 300.0)
    r_buy = r_cart + _gaps(rng, len(r_user), 60.0, 5.0, 1200.0)

    user = np.concatenate([v_user, v_user[c_view], p_user, r_user, r_user, r_user])
    session = np.concatenate([v_session, v_session[c_view], p_session, r_session, r_session, r_session])
    item = np.concatenate([v_item, v_item[c_view], v_item[p_view], r_item, r_item, r_item])
    offset = np.concatenate([v_offset, c_offset, p_offset, r_view, r_cart, r_buy])
    kind = np.repeat(
        [VIEW, CART, PURCHASE, VIEW, CART, PURCHASE],
        [n_views, len(c_view), len(p_view), len(r_user), len(r_user), len(r_user)],
    )

    # A session running past the window's end is moved back so that it ends inside it.
    duration = np.zeros(n_sessions)
    np.maximum.at(duration, session, offset)
    window = config.days * SECONDS_PER_DAY
    start = np.maximum(0.0, np.minimum(start, window - 1.0 - duration))
    millis = np.floor((start[session] + offset) * 1000.0).astype(np.int64)
    millis = np.minimum(millis, window * 1000 - 1)  # only a session longer than the whole window needs this

    keep = np.lexsort((millis, user))
    user, session, item, kind, millis = user[keep], session[keep], item[keep], kind[keep], millis[keep]
    user_width = max(6, len(str(size.users - 1)))
    user_ids = np.array([f"u{first_user + u:0{user_width}d}" for u in range(n_users)], dtype=object)
    session_ids = np.array(
        [f"{user_ids[u]}-{r:04d}" for u, r in zip(s_user.tolist(), s_rank.tolist(), strict=True)], dtype=object
    )
    base = np.datetime64(dt.datetime.combine(config.start_date, dt.time()), "ms")
    return pd.DataFrame(
        {
            tb.USER_ID: user_ids[user],
            tb.ITEM_ID: catalogue.item_ids[item],
            tb.EVENT_TYPE: EVENT_NAMES[kind],
            tb.EVENT_TIME: (base + millis.astype("timedelta64[ms]")).astype("datetime64[ns]"),
            tb.SESSION_ID: session_ids[session],
            tb.CATEGORY: catalogue.category_names[catalogue.item_category[item]],
            tb.PRICE: catalogue.price[item],
        }
    )


def generate_events(spark: SparkSession, config: GenerateConfig, partitions: int | None = None) -> DataFrame:
    """The synthetic event log as a lazy DataFrame; the same config always gives the same rows.

    ``partitions`` only changes how the blocks of users are spread over tasks, never the rows.
    """
    size = sizes(config)
    if partitions is None:
        partitions = 4 * spark.sparkContext.defaultParallelism
    partitions = max(1, min(partitions, size.blocks))
    log.info("generating ~%d events: %d users in %d blocks, %d items, %d categories, %d partitions",
             config.events, size.users, size.blocks, size.items, size.categories, partitions)

    def generate(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        catalogue = build_catalogue(config)
        for batch in batches:
            for block in batch["id"].tolist():
                yield block_events(config, catalogue, block)

    return spark.range(size.blocks, numPartitions=partitions).mapInPandas(generate, SCHEMA)


def write_events(df: DataFrame, path: str) -> int:
    """Write the events as Parquet at ``path`` (replacing it) and return how many rows were written."""
    df.write.mode("overwrite").parquet(path)
    # Counting the written files reads only their footers; counting ``df`` would generate it again.
    rows = df.sparkSession.read.parquet(path).count()
    log.info("wrote %d events to %s", rows, path)
    return rows
