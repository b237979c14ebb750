"""Benchmark: generate N synthetic events, then time ingest + interactions on this machine.

Each size runs in a fresh process (one SparkSession, started before the clock), so figures are the
steps' own work; the process tree's peak resident memory (driver JVM + Python workers) is sampled.

    .venv/bin/python scripts/bench_ingest.py --events 1000000 10000000 --out .bench/ingest.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

STEP = r"""
import json, sys, time
from recsys_spark import pipeline
from recsys_spark.config import load_config
from recsys_spark.data import synthetic
from recsys_spark.session import get_spark

events, root = int(sys.argv[1]), sys.argv[2]
config = load_config(overrides=[f"warehouse={root}/warehouse", f"generate.events={events}"])
spark = get_spark("bench-ingest")
out = {}
t = time.perf_counter()
n = synthetic.write_events(synthetic.generate_events(spark, config.generate), f"{root}/events.parquet")
out["generate_s"] = time.perf_counter() - t
t = time.perf_counter()
summary = pipeline.run_ingest(spark, config, f"{root}/events.parquet", "canonical")
out["ingest_s"] = time.perf_counter() - t
t = time.perf_counter()
counts = pipeline.run_interactions(spark, config)
out["interactions_s"] = time.perf_counter() - t
out.update(events=n, accepted=summary.accepted, interactions=counts["silver/interactions"],
           users=counts["silver/user_index"], items=counts["silver/item_index"])
print("RESULT " + json.dumps(out))
"""


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_size(events: int) -> dict:
    root = tempfile.mkdtemp(prefix="bench-ingest-")
    try:
        proc = subprocess.Popen([sys.executable, "-c", STEP, str(events), root], stdout=subprocess.PIPE, text=True)
        ps, peak, done = psutil.Process(proc.pid), 0, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss(ps))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, _ = proc.communicate()
        done.set()
        sampler.join()
        if proc.returncode:
            raise SystemExit(f"benchmark step failed for {events} events")
        result = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = result["ingest_s"] + result["interactions_s"]
    result.update(ingest_plus_interactions_s=total, events_per_s=result["events"] / total,
                  peak_rss_gib=peak / 2**30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--out", default=".bench/ingest.json")
    args = parser.parse_args()
    machine = {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
               "platform": platform.platform(), "python": platform.python_version()}
    results = []
    print(f"{'events':>12} {'generate s':>11} {'ingest s':>9} {'interact. s':>11} {'total s':>8} "
          f"{'events/s':>10} {'peak GiB':>9}")
    for n in args.events:
        r = run_size(n)
        results.append(r)
        print(f"{r['events']:>12,} {r['generate_s']:>11.1f} {r['ingest_s']:>9.1f} {r['interactions_s']:>11.1f} "
              f"{r['ingest_plus_interactions_s']:>8.1f} {r['events_per_s']:>10,.0f} {r['peak_rss_gib']:>9.2f}",
              flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:  # after every size, so a long run keeps what it measured
            json.dump({"machine": machine, "load_average": os.getloadavg(), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
