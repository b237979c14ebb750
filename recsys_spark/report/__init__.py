"""A one-page HTML report of a pipeline run, drawn from the warehouse's Delta tables.

``write_report`` writes, into ``out_dir``: ``report.html``, one self-contained page (CSS inline, every
plot embedded as a base64 PNG); one PNG per plot, the same images; and ``report.json``, the numbers behind
every plot and table. The work is split by responsibility: ``data`` aggregates on Spark and collects only
the aggregates, ``plots`` draws them with matplotlib's Agg canvas, ``page`` writes the HTML; this module
only ties the three together and writes the files.

Examples
--------
>>> path = write_report(spark, "warehouse", "report")          # doctest: +SKIP
>>> path
'report/report.html'
"""

from __future__ import annotations

import json
import logging
import os

from pyspark.sql import SparkSession

from recsys_spark.errors import RecsysError
from recsys_spark.report.data import collect
from recsys_spark.report.page import to_html
from recsys_spark.report.plots import render

log = logging.getLogger(__name__)

HTML_NAME = "report.html"
JSON_NAME = "report.json"


def write_report(spark: SparkSession, warehouse: str, out_dir: str, run_id: str | None = None) -> str:
    """Write the report of run ``run_id`` (default: the latest run in gold/metrics) into ``out_dir``.

    Parameters
    ----------
    spark : the session; the tables are read from ``warehouse``.
    warehouse : the warehouse root. ``gold/metrics`` must exist; the other sections say so on the page
        when their tables (gold/recommendations, bronze/events, silver/interactions) are missing.
    out_dir : a local directory, created when missing; files of an earlier report there are replaced.
    run_id : the run to report; None picks the latest (greatest run date, then run id).

    Returns
    -------
    The path of ``report.html``.
    """
    if "://" in out_dir and not out_dir.startswith("file:"):
        raise RecsysError(f"the report is written to a local directory, not {out_dir}")
    out_dir = out_dir.removeprefix("file://")
    data = collect(spark, warehouse, run_id)
    os.makedirs(out_dir, exist_ok=True)
    images = render(data)
    for name, png in images.items():
        with open(os.path.join(out_dir, name), "wb") as fh:
            fh.write(png)
    with open(os.path.join(out_dir, JSON_NAME), "w") as fh:
        json.dump(data.to_json(), fh, indent=1, default=str)
    path = os.path.join(out_dir, HTML_NAME)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(to_html(data, images))
    log.info("report of run %s written to %s (%d plots)", data.run_id, path, len(images))
    return path
