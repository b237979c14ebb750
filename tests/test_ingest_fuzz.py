"""Ingest fed broken files (Hypothesis): it never crashes, and every line it reads is accounted for.

Each example starts from a valid event file of one preset and damages it the ways real files arrive
damaged: truncated lines, random bytes, another encoding, huge fields, quotes and separators inside
fields, empty files, a header alone, mixed line endings, a byte-order mark, a ``.gz`` that is not gzip.
Ingest must then either stop with one line (an :class:`InputError` naming the file) or account for every
line: rows read equal the file's non-blank data lines, split as Hadoop's line reader splits them, and
equal accepted + rejected + duplicates, with the accepted rows in ``bronze/events`` and the rejected ones
in ``bronze/events_rejected``.

CI runs a fixed set of examples (profile ``ci``); ``HYPOTHESIS_PROFILE=explore`` draws new ones.
"""

from __future__ import annotations

import itertools
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.config import IngestConfig
from recsys_spark.data import events as ev
from recsys_spark.data.sources import PRESETS
from recsys_spark.errors import InputError

pytestmark = [pytest.mark.spark, pytest.mark.faults]

settings.register_profile("ci", max_examples=12, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A valid file per preset: (file name, header line or None, data lines).
VALID = {
    "canonical": ("events.csv", b"user_id,item_id,event_type,event_time,price",
                  [b"u1,i1,view,2024-01-01 10:00:00,9.5", b"u1,i2,purchase,1704103200,",
                   b"u2,i2,cart,1704103200000,1.0", b"u3,i1,view,2024-01-02T08:00:00,2",
                   b"u3,i3,fav,2024-01-03 09:30:00,"]),
    "taobao": ("UserBehavior.csv", None,
               [b"1,10,100,pv,1511544070", b"1,11,100,buy,1511544071", b"2,10,100,cart,1511544072",
                b"2,12,101,fav,1511544073", b"3,11,100,pv,1511544074"]),
}

NASTY_FIELDS = [b'"', b'"a,b"', b"a\tb", b"'; --", b"x' OR '1'='1", b'"quoted ""twice"""', b";", b"::",
                b"\\", b"\x00", b"<script>", "é€ü".encode(), "é".encode("latin-1"), b"\xff\xfe"]
LINE_ENDINGS = [b"\n", b"\r\n", b"\r"]
BOM = "\ufeff".encode()


@st.composite
def damaged_lines(draw, lines: list[bytes]) -> list[bytes]:
    """The data lines with some of them damaged, one way each."""
    out = []
    for line in lines:
        damage = draw(st.sampled_from(["none", "none", "truncate", "bytes", "nasty", "huge", "drop", "blank"]))
        if damage == "truncate":
            line = line[:draw(st.integers(0, len(line)))]
        elif damage == "bytes":
            at = draw(st.integers(0, len(line)))
            line = line[:at] + draw(st.binary(min_size=1, max_size=12)) + line[at:]
        elif damage == "nasty":
            fields = line.split(b",")
            fields[draw(st.integers(0, len(fields) - 1))] = draw(st.sampled_from(NASTY_FIELDS))
            line = b",".join(fields)
        elif damage == "huge":
            fields = line.split(b",")
            fields[draw(st.integers(0, len(fields) - 1))] = b"x" * draw(st.sampled_from([10_000, 300_000]))
            line = b",".join(fields)
        elif damage == "blank":
            line = b"   "
        if damage != "drop":
            out.append(line)
    return out


@st.composite
def damaged_files(draw) -> tuple[str, str, bytes]:
    """(preset, file name, content) of one damaged file."""
    preset = draw(st.sampled_from(sorted(VALID)))
    name, header, lines = VALID[preset]
    shape = draw(st.sampled_from(["lines", "lines", "lines", "empty", "header_only", "utf16", "not_gzip"]))
    if shape == "empty":
        return preset, name, draw(st.sampled_from([b"", b"\n", b"\r\n\r\n", b"   \n"]))
    body = [] if shape == "header_only" else draw(damaged_lines(lines))
    rows = ([header] if header is not None else []) + body
    endings = draw(st.lists(st.sampled_from(LINE_ENDINGS), min_size=len(rows), max_size=len(rows)))
    content = b"".join(row + end for row, end in zip(rows, endings, strict=True))
    if rows and draw(st.booleans()):
        content = content.removesuffix(endings[-1])  # no line break at the end
    if draw(st.booleans()):
        content = BOM + content
    if shape == "utf16":
        content = content.decode("utf-8", "replace").encode("utf-16")
    if shape == "not_gzip":
        name += ".gz"
    return preset, name, content


def data_lines(content: bytes, has_header: bool) -> int:
    """Lines ingest must account for: non-blank lines as Hadoop's LineRecordReader splits them (\\n, \\r,
    \\r\\n), without the header line (and repeats of it, which the CSV reader drops as headers)."""
    lines = [line.removeprefix(BOM) for line in re.split(rb"\r\n|\r|\n", content)]
    lines = [line for line in lines if line.strip(b" ")]
    if has_header and lines:
        lines = [line for line in lines if line != lines[0]]
    return len(lines)


_examples = itertools.count()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=damaged_files())
def test_ingest_of_a_damaged_file_stops_with_one_line_or_accounts_for_every_line(spark, tmp_path, case):
    preset, name, content = case
    folder = tmp_path / f"example-{next(_examples)}"
    folder.mkdir()
    path = folder / name
    path.write_bytes(content)
    warehouse = str(tmp_path / "warehouse")  # shared by the examples: each reads only its own rows
    try:
        summary = ev.ingest(spark, str(path), preset, warehouse, IngestConfig())
    except InputError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message, message
        return
    assert not name.endswith(".gz"), "a .gz that is not gzip must stop with one line"
    assert summary.rows_read == data_lines(content, PRESETS[preset].header)
    assert summary.balanced()
    source = F.col(tb.SOURCE) == str(path)
    if summary.accepted:
        assert tb.read(spark, warehouse, tb.BRONZE_EVENTS).filter(source).count() == summary.accepted
    if summary.rejected:
        rejected = tb.read(spark, warehouse, tb.BRONZE_REJECTED).filter(source)
        assert rejected.agg(F.sum(ev.N_ROWS)).first()[0] == summary.rejected_total
