"""Ingestion: presets, validation, quarantine, idempotence and the row accounting invariant."""

from __future__ import annotations

import datetime as dt

import pytest

from recsys_spark import tables as tb
from recsys_spark.config import IngestConfig, load_config
from recsys_spark.data import events as ev
from recsys_spark.errors import ConfigError, InputError

pytestmark = pytest.mark.spark


def _write(tmp_path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _ingest(spark, path, preset, warehouse, **kw) -> ev.IngestSummary:
    return ev.ingest(spark, path, preset, warehouse, IngestConfig(), **kw)


def _events(spark, warehouse):
    return tb.read(spark, warehouse, tb.BRONZE_EVENTS)


BROKEN = (
    b"user_id,item_id,event_type,event_time,price\n"
    b"u1,i1,view,2024-01-01 10:00:00,9.5\n"            # ok
    b"u1,i1,view,2024-01-01 10:00:00,9.5\n"            # duplicate of the row above
    b"u1,i2,purchase,1704103200,\n"                     # ok, epoch seconds
    b"u2,i2,cart,1704103200000,1.0\n"                   # ok, epoch milliseconds
    b"u2,i3,view,yesterday,1.0\n"                       # unparseable_event_time
    b"u2,i3,view,2300-01-01 00:00:00,1.0\n"             # event_time_out_of_range (future)
    b"u2,i3,view,1970-01-02 00:00:00,1.0\n"             # event_time_out_of_range (too old)
    b",i3,view,2024-01-01 10:00:00,1.0\n"               # missing_user_id
    b"u3,  ,view,2024-01-01 10:00:00,1.0\n"             # missing_item_id
    b"u3,i4,teleport,2024-01-01 10:00:00,1.0\n"         # unknown_event_type
    b"u3,i4,,2024-01-01 10:00:00,1.0\n"                 # missing_event_type
    b"u3,i\xff\xfe4,view,2024-01-01 10:00:00,1.0\n"     # invalid_utf8
    b"u3,i4,view,2024-01-01 10:00:00,1.0,extra\n"       # malformed_row (too many fields)
    b"u3,i5,view,2024-01-01 10:00:00,cheap\n"           # bad_price
    b"u3,i6,view,2024-01-01 10:00:00,-3\n"              # bad_price (negative)
    b"u3,i7,view,\n"                                    # missing_event_time
    b"u3,i7,view,\n"                                    # the same bad line again
)


def test_broken_file_every_row_accounted_for(spark, tmp_path, warehouse):
    path = _write(tmp_path, "broken.csv", BROKEN)
    s = _ingest(spark, path, "canonical", warehouse)
    assert s.rows_read == 17
    assert s.accepted == 3
    assert s.duplicates == 1
    assert s.rejected == {
        "unparseable_event_time": 1, "event_time_out_of_range": 2, "missing_user_id": 1,
        "missing_item_id": 1, "unknown_event_type": 1, "missing_event_type": 1, "invalid_utf8": 1,
        "malformed_row": 1, "bad_price": 2, "missing_event_time": 2,
    }
    assert s.rows_read == s.accepted + s.rejected_total + s.duplicates

    events = _events(spark, warehouse)
    assert events.count() == 3
    rows = {(r.user_id, r.item_id): r for r in events.collect()}
    assert rows[("u1", "i1")].event_time == dt.datetime(2024, 1, 1, 10, 0)
    assert rows[("u1", "i1")].price == 9.5
    assert rows[("u1", "i2")].event_type == "purchase"
    assert rows[("u2", "i2")].event_time == dt.datetime(2024, 1, 1, 10, 0)  # 1704103200000 ms
    assert rows[("u2", "i2")].event_date == dt.date(2024, 1, 1)

    rejected = tb.read(spark, warehouse, tb.BRONZE_REJECTED).collect()
    assert sum(r.n_rows for r in rejected) == s.rejected_total
    by_reason = {r.reason: r for r in rejected}
    assert by_reason["unknown_event_type"].raw == "u3,i4,teleport,2024-01-01 10:00:00,1.0"
    assert by_reason["missing_event_time"].n_rows == 2
    assert all(r.source == path for r in rejected)


def test_undecodable_bytes_reject_an_event_only_in_the_fields_it_keeps(spark, tmp_path, warehouse):
    # A column no preset field maps is not stored, so its bytes do not make the event invalid; the
    # rejected row keeps its raw text (undecodable bytes shown as U+FFFD).
    path = _write(tmp_path, "extra.csv", b"user_id,item_id,event_type,event_time,note\n"
                  b"u1,i1,view,2024-01-01 10:00:00,caf\xe9\n"
                  b"u\xe92,i1,view,2024-01-01 10:00:00,ok\n")
    s = _ingest(spark, path, "canonical", warehouse)
    assert (s.rows_read, s.accepted, s.rejected) == (2, 1, {"invalid_utf8": 1})
    (rejected,) = tb.read(spark, warehouse, tb.BRONZE_REJECTED).collect()
    assert rejected.raw == "u\ufffd2,i1,view,2024-01-01 10:00:00,ok"


def test_reingest_changes_nothing(spark, tmp_path, warehouse):
    path = _write(tmp_path, "broken.csv", BROKEN)
    first = _ingest(spark, path, "canonical", warehouse)
    events_before = sorted(_events(spark, warehouse).drop(tb.SOURCE).collect())
    rejected_before = sorted(tb.read(spark, warehouse, tb.BRONZE_REJECTED).drop("ingested_at").collect())

    second = _ingest(spark, path, "canonical", warehouse)
    assert second.accepted == 0
    assert second.duplicates == first.accepted + first.duplicates
    assert second.rejected == first.rejected
    assert sorted(_events(spark, warehouse).drop(tb.SOURCE).collect()) == events_before
    assert sorted(tb.read(spark, warehouse, tb.BRONZE_REJECTED).drop("ingested_at").collect()) == rejected_before


def test_overlapping_files_merge_without_duplicates(spark, tmp_path, warehouse):
    a = _write(tmp_path, "a.csv", "user_id,item_id,event_type,event_time\nu1,i1,view,2024-01-01 10:00:00\n"
               "u1,i2,view,2024-01-02 10:00:00\n")
    b = _write(tmp_path, "b.csv", "user_id,item_id,event_type,event_time\nu1,i2,view,2024-01-02 10:00:00\n"
               "u2,i2,cart,2024-01-03 10:00:00\n")
    assert _ingest(spark, a, "canonical", warehouse).accepted == 2
    s = _ingest(spark, b, "canonical", warehouse)
    assert (s.accepted, s.duplicates) == (1, 1)
    assert _events(spark, warehouse).count() == 3


PRESET_CASES = [
    ("movielens", "u.data", "196\t242\t3\t881250949\n", ("196", "242", "rating", 3.0, None)),
    ("movielens", "ratings.dat", "1::1193::5::978300760\n", ("1", "1193", "rating", 5.0, None)),
    ("movielens", "ratings.csv", "userId,movieId,rating,timestamp\n1,307,3.5,1256677221\n",
     ("1", "307", "rating", 3.5, None)),
    ("taobao", "UserBehavior.csv", "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,buy,1511561733\n",
     ("1", "2268318", "view", None, None)),
    ("rees46", "2019-Oct.csv",
     "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
     "2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,"
     "72d76fde-8bb3-4e00-8c23-a032dfed738c\n",
     ("541312140", "44600062", "view", None, "72d76fde-8bb3-4e00-8c23-a032dfed738c")),
    ("retailrocket", "events.csv", "timestamp,visitorid,event,itemid,transactionid\n"
     "1433221332117,257597,addtocart,355908,\n", ("257597", "355908", "cart", None, None)),
    ("yoochoose", "clicks_train.txt", "SessionId\tItemId\tTime\n1\t214536502\t1396839069.277\n",
     ("1", "214536502", "view", None, "1")),
    ("yoochoose-clicks", "yoochoose-clicks.dat", "1,2014-04-07T10:51:09.277Z,214536502,0\n",
     ("1", "214536502", "view", None, "1")),
    ("otto", "train.jsonl", '{"session": 12899779, "events": [{"aid": 59625, "ts": 1661724000278, '
     '"type": "clicks"}, {"aid": 59625, "ts": 1661724000300, "type": "orders"}]}\n',
     ("12899779", "59625", "view", None, "12899779")),
    ("diginetica", "train-item-views.csv", "session_id;user_id;item_id;timeframe;eventdate\n"
     "1;NA;81766;526309;2016-05-09\n", ("1", "81766", "view", None, "1")),
]


@pytest.mark.parametrize("preset,name,content,expected", PRESET_CASES, ids=[c[1] for c in PRESET_CASES])
def test_presets_map_to_canonical_events(spark, tmp_path, warehouse, preset, name, content, expected):
    path = _write(tmp_path, name, content)
    s = _ingest(spark, path, preset, warehouse)
    assert s.rejected == {} and s.accepted >= 1
    first = _events(spark, warehouse).orderBy(tb.EVENT_TIME).first()
    got = (first.user_id, first.item_id, first.event_type, first.value, first.session_id)
    assert got == expected


def test_time_units(spark, tmp_path, warehouse):
    yoo = _write(tmp_path, "y.txt", "SessionId\tItemId\tTime\n1\t2\t1396839069.277\n")
    _ingest(spark, yoo, "yoochoose", warehouse)
    assert _events(spark, warehouse).first().event_time == dt.datetime(2014, 4, 7, 2, 51, 9, 277000)
    otto_wh = warehouse + "-otto"
    otto = _write(tmp_path, "o.jsonl", '{"session": 1, "events": [{"aid": 5, "ts": 1661724000278, "type": "carts"}]}\n')
    _ingest(spark, otto, "otto", otto_wh)
    row = _events(spark, otto_wh).first()
    assert (row.event_type, row.event_time) == ("cart", dt.datetime(2022, 8, 28, 22, 0, 0, 278000))
    digi_wh = warehouse + "-digi"
    digi = _write(tmp_path, "d.csv", "session_id;user_id;item_id;timeframe;eventdate\n1;NA;9;3600000;2016-05-09\n")
    _ingest(spark, digi, "diginetica", digi_wh)
    assert _events(spark, digi_wh).first().event_time == dt.datetime(2016, 5, 9, 1, 0)


def test_otto_malformed_line_is_one_rejected_row(spark, tmp_path, warehouse):
    path = _write(tmp_path, "o.jsonl", '{"session": 1, "events": [{"aid": 5, "ts": 1661724000278, "type": "clicks"},'
                  ' {"aid": 6, "ts": 1661724000279, "type": "clicks"}]}\n{"session": 2, "events": [\n')
    s = _ingest(spark, path, "otto", warehouse)
    assert (s.rows_read, s.accepted, s.rejected) == (3, 2, {"malformed_json": 1})


# --- errors a user can act on: one clear message naming the problem ---------------------------

def test_missing_path(spark, tmp_path, warehouse):
    with pytest.raises(InputError, match="does not exist: .*nope.csv"):
        _ingest(spark, str(tmp_path / "nope.csv"), "taobao", warehouse)


def test_empty_file(spark, tmp_path, warehouse):
    with pytest.raises(InputError, match="empty"):
        _ingest(spark, _write(tmp_path, "empty.csv", ""), "taobao", warehouse)


def test_missing_column_names_column_and_preset(spark, tmp_path, warehouse):
    path = _write(tmp_path, "ev.csv", "user_id,item_id,event_time\nu1,i1,2024-01-01\n")
    with pytest.raises(InputError, match="missing column 'event_type' required by preset 'canonical'"):
        _ingest(spark, path, "canonical", warehouse)


def test_wrong_delimiter_is_named(spark, tmp_path, warehouse):
    path = _write(tmp_path, "UserBehavior.csv", "1;2268318;2520377;pv;1511544070\n")
    with pytest.raises(InputError, match="expects 5 fields separated by ','.*looks ';'-separated"):
        _ingest(spark, path, "taobao", warehouse)
    s = _ingest(spark, path, "taobao", warehouse, sep=";")
    assert s.accepted == 1


def test_unknown_preset_and_format(spark, tmp_path, warehouse):
    path = _write(tmp_path, "x.bin", "a")
    with pytest.raises(InputError, match="unknown preset 'nosuch'"):
        _ingest(spark, path, "nosuch", warehouse)
    with pytest.raises(InputError, match="cannot infer the format"):
        _ingest(spark, path, "canonical", warehouse)


def test_parquet_input_keeps_raw_row(spark, tmp_path, warehouse):
    df = spark.createDataFrame(
        [("u1", "i1", "view", "2024-01-01 10:00:00"), ("u2", None, "view", "2024-01-01 10:00:00")],
        "user_id string, item_id string, event_type string, event_time string",
    )
    path = str(tmp_path / "events.parquet")
    df.write.parquet(path)
    s = _ingest(spark, path, "canonical", warehouse)
    assert (s.accepted, s.rejected) == (1, {"missing_item_id": 1})
    raw = tb.read(spark, warehouse, tb.BRONZE_REJECTED).first().raw
    assert '"user_id":"u2"' in raw


def test_bad_config_values_are_named():
    with pytest.raises(ConfigError, match="interactions.min_user_interactions"):
        load_config(overrides=["interactions.min_user_interactions=0"])
    with pytest.raises(ConfigError, match="interactions.nonsense"):
        load_config(overrides=["interactions.nonsense=1"])
    with pytest.raises(ConfigError, match="unknown event types"):
        load_config(overrides=["interactions.event_weights={teleport: 1}"])


# --- the real data sets, when ../shared/data is present ----------------------------------------

@pytest.mark.shared_data
def test_taobao_event_counts_match_its_readme(spark, shared_data, warehouse):
    s = _ingest(spark, str(shared_data / "taobao" / "UserBehavior_head84475.csv"), "taobao", warehouse)
    assert (s.rows_read, s.accepted, s.rejected_total, s.duplicates) == (84475, 84475, 0, 0)
    counts = {r.event_type: r["count"] for r in _events(spark, warehouse).groupBy(tb.EVENT_TYPE).count().collect()}
    assert counts == {"view": 75872, "cart": 4497, "fav": 2356, "purchase": 1750}
