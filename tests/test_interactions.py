"""Interaction building on tiny hand-made frames with exact expected results."""

from __future__ import annotations

import datetime as dt
import math
import random

import pytest

from recsys_spark import tables as tb
from recsys_spark.config import InteractionsConfig
from recsys_spark.data import indexing, interactions, sequences, splits

pytestmark = pytest.mark.spark

T0 = dt.datetime(2024, 1, 1)


def _t(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


def _events(spark, rows):
    return spark.createDataFrame(
        [(u, i, e, _t(h), s) for u, i, e, h, s in rows],
        "user_id string, item_id string, event_type string, event_time timestamp, session_id string",
    )


def test_weights_and_aggregation(spark):
    events = _events(spark, [
        ("u1", "i1", "view", 0, None), ("u1", "i1", "cart", 1, None), ("u1", "i1", "purchase", 2, None),
        ("u1", "i2", "view", 3, None), ("u2", "i1", "remove", 4, None),
    ])
    w = interactions.weighted_events(events, InteractionsConfig())
    rows = {(r.user_id, r.item_id): r for r in interactions.aggregate(w).collect()}
    assert set(rows) == {("u1", "i1"), ("u1", "i2")}  # "remove" weighs 0 and is dropped
    assert rows[("u1", "i1")].weight == 1 + 4 + 5
    assert rows[("u1", "i1")].n_events == 3
    assert (rows[("u1", "i1")].first_ts, rows[("u1", "i1")].last_ts) == (_t(0), _t(2))


def test_time_decay_halves_per_half_life(spark):
    events = _events(spark, [("u1", "i1", "view", 0, None), ("u1", "i2", "view", 48, None)])
    w = interactions.weighted_events(events, InteractionsConfig(half_life_days=2))
    got = {r.item_id: r.weight for r in w.collect()}
    assert got["i2"] == pytest.approx(1.0)
    assert got["i1"] == pytest.approx(0.5)  # two days older than the newest event


def test_activity_filter_iterates_until_stable(spark):
    # min 2 per user and item. Round 1 drops u3 (1 item) -> i3 falls to 1 user -> round 2 drops i3
    # -> u2 falls to 1 item -> round 3 drops u2 -> i2 falls to 1 user ... down to the 2x2 core.
    pairs = spark.createDataFrame(
        [("u1", "i1"), ("u1", "i2"), ("u4", "i1"), ("u4", "i2"), ("u2", "i2"), ("u2", "i3"), ("u3", "i3")],
        "user_id string, item_id string",
    )
    kept = interactions.filter_min_activity(pairs, 2, 2, max_rounds=10)
    assert sorted((r.user_id, r.item_id) for r in kept.collect()) == [
        ("u1", "i1"), ("u1", "i2"), ("u4", "i1"), ("u4", "i2")
    ]


def test_index_is_append_only(spark, warehouse):
    ids = spark.createDataFrame([("b",), ("a",), ("b",)], "user_id string")
    first = {r.user_id: r.user_idx for r in
             indexing.update_index(spark, ids, warehouse, tb.USER_INDEX, tb.USER_ID, tb.USER_IDX).collect()}
    assert first == {"a": 0, "b": 1}
    more = spark.createDataFrame([("c",), ("0",), ("a",)], "user_id string")
    second = {r.user_id: r.user_idx for r in
              indexing.update_index(spark, more, warehouse, tb.USER_INDEX, tb.USER_ID, tb.USER_IDX).collect()}
    assert second == {"a": 0, "b": 1, "0": 2, "c": 3}


def _indexed(spark, rows):
    return spark.createDataFrame(
        [(u, i, 1.0, 1, _t(h), _t(h)) for u, i, h in rows],
        "user_idx int, item_idx int, weight double, n_events long, first_ts timestamp, last_ts timestamp",
    )


def test_leave_last_out(spark):
    inter = _indexed(spark, [(0, 5, 1), (0, 6, 3), (0, 7, 3), (1, 5, 2), (2, 9, 0), (2, 8, 1)])
    train, test = splits.leave_last_out(inter)
    # user 0: items 6 and 7 tie on time -> larger item idx (7) is held out; user 1 has one item: kept
    assert sorted((r.user_idx, r.item_idx) for r in test.collect()) == [(0, 7), (2, 8)]
    assert sorted((r.user_idx, r.item_idx) for r in train.collect()) == [(0, 5), (0, 6), (1, 5), (2, 9)]


def test_temporal_split(spark):
    events = spark.createDataFrame(
        [(u, i, 1.0, _t(h), None) for u, i, h in [
            (0, 1, 0), (0, 2, 1), (1, 1, 2), (1, 3, 3), (0, 3, 10), (0, 1, 11), (1, 4, 12), (2, 1, 13),
        ]],
        "user_idx int, item_idx int, weight double, event_time timestamp, session_id string",
    )
    train, test = splits.temporal(events, test_fraction=0.5)
    assert sorted((r.user_idx, r.item_idx) for r in train.collect()) == [(0, 1), (0, 2), (1, 1), (1, 3)]
    # (0,3) is new for user 0; (0,1) was seen before the cut; item 4 and user 2 are unknown before it
    assert sorted((r.user_idx, r.item_idx) for r in test.collect()) == [(0, 3)]


def test_temporal_cut_is_exact_and_the_same_however_the_events_are_partitioned(spark):
    rng = random.Random(7)
    seconds = [rng.randrange(0, 20 * 86_400) for _ in range(2_000)]
    events = spark.createDataFrame([(dt.datetime.fromtimestamp(s, dt.UTC),) for s in seconds],
                                   "event_time timestamp")
    for fraction in (0.2, 0.5, 0.999):
        # the smallest second with at least (1 - fraction) of the events at or before it
        want = sorted(seconds)[math.ceil((1 - fraction) * len(seconds)) - 1]
        cuts = {splits.temporal_cutoff(events.repartition(n, "event_time"), fraction) for n in (1, 3, 8)}
        assert cuts == {want}, fraction


def test_sequences_are_time_ordered_truncated_and_left_padded(spark):
    train = _indexed(spark, [(0, 4, 2), (0, 3, 1), (0, 9, 0), (1, 7, 0)])
    got = {r.user_idx: (r.items, r.length) for r in sequences.user_sequences(train, max_length=2).collect()}
    assert got == {0: ([3, 4], 2), 1: ([tb.PAD_IDX, 7], 1)}
    got = {r.user_idx: r.items for r in sequences.user_sequences(train, max_length=4).collect()}
    assert got[0] == [tb.PAD_IDX, 9, 3, 4]


def test_sessions_cut_by_inactivity_gap_and_source_session(spark):
    events = spark.createDataFrame(
        [(0, 1, _t(0), None), (0, 2, _t(0.25), None), (0, 3, _t(2), None), (1, 1, _t(0), "a"), (1, 2, _t(0.1), "b")],
        "user_idx int, item_idx int, event_time timestamp, session_id string",
    )
    rows = sequences.sessions(events, gap_minutes=30).collect()
    by_session: dict[str, list[int]] = {}
    for r in sorted(rows, key=lambda r: (r.session_id, r.position)):
        by_session.setdefault(r.session_id, []).append(r.item_idx)
    assert sorted(by_session.values()) == [[1], [1, 2], [2], [3]]
    positions = {s: sorted(r.position for r in rows if r.session_id == s) for s in by_session}
    assert all(p == list(range(len(by_session[s]))) for s, p in positions.items())  # 0-based, in time order
    assert {r.session_id for r in rows if r.user_idx == 0} == {"0-1", "0-2"}


def test_ties_at_the_last_timestamp_follow_the_numeric_ids(spark, tmp_path, warehouse):
    """Items "9" and "10" share u1's last timestamp. The index numbers ids in string order ("10" before
    "9"), so breaking the tie by index would hold out "9"; in id order "10" comes last and is held out,
    and the sequences end with it."""
    from recsys_spark import pipeline
    from recsys_spark.config import load_config

    path = tmp_path / "events.csv"
    rows = [("u1", "1", 0), ("u1", "9", 5), ("u1", "10", 5), ("u2", "10", 1), ("u2", "9", 1), ("u2", "1", 2)]
    path.write_text("user_id,item_id,event_type,event_time\n"
                    + "".join(f"{u},{i},view,2024-01-01T0{h}:00:00\n" for u, i, h in rows))
    config = load_config(overrides=[f"warehouse={warehouse}", "interactions.min_user_interactions=1",
                                    "interactions.min_item_interactions=1"])
    pipeline.run_ingest(spark, config, str(path), "canonical")
    pipeline.run_interactions(spark, config)
    ids = {r.item_idx: r.item_id for r in tb.read(spark, warehouse, tb.ITEM_INDEX).collect()}
    assert [ids[idx] for idx in sorted(ids)] == ["1", "10", "9"]  # the index is in string order
    users = {r.user_idx: r.user_id for r in tb.read(spark, warehouse, tb.USER_INDEX).collect()}
    test = tb.read(spark, warehouse, tb.TEST).filter(f"{tb.SPLIT} = '{splits.LEAVE_LAST_OUT}'").collect()
    assert {users[r.user_idx]: ids[r.item_idx] for r in test} == {"u1": "10", "u2": "1"}
    seqs = tb.read(spark, warehouse, tb.SEQUENCES).filter(f"{tb.SPLIT} = '{splits.LEAVE_LAST_OUT}'").collect()
    held_in = {users[r.user_idx]: [ids[i] for i in r.items if i != tb.PAD_IDX] for r in seqs}
    assert held_in == {"u1": ["1", "9"], "u2": ["9", "10"]}  # u2's tie at hour 1: "9" before "10"


def test_windows_cover_every_transition(spark):
    """A 10-item history in windows of 4 (3 transitions each): every (item, next) pair exactly once."""
    rows = [(0, i, _t(i)) for i in range(10)] + [(1, 5, _t(0))] + [(2, 3, _t(0)), (2, 4, _t(1))]
    train = spark.createDataFrame(rows, f"{tb.USER_IDX} int, {tb.ITEM_IDX} int, {tb.FIRST_TS} timestamp")
    windows = {}
    for r in sequences.user_windows(train, 4).collect():
        assert len(r[tb.ITEMS]) == 4 and r[tb.LENGTH] == sum(i != tb.PAD_IDX for i in r[tb.ITEMS])
        windows.setdefault(r[tb.USER_IDX], []).append([i for i in r[tb.ITEMS] if i != tb.PAD_IDX])
    assert sorted(windows[0]) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    pairs = [(w[k], w[k + 1]) for w in windows[0] for k in range(len(w) - 1)]
    assert sorted(pairs) == [(i, i + 1) for i in range(9)]
    assert windows[1] == [[5]] and windows[2] == [[3, 4]]
