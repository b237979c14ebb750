"""Benchmark: the pipeline's steps at scale, one fresh process per size, on generated events.

generate -> ingest -> interactions, and with ``--models`` also train -> recommend for each model and
one evaluate. The SparkSession starts before the clock, so figures are the steps' own work. The whole
process tree (driver JVM + Python workers) is sampled every 0.2 s; each step gets its own peak
resident memory (the child says when a step starts).

    .venv/bin/python scripts/bench_pipeline.py --events 1000000 10000000 --out .bench/ingest.json
    .venv/bin/python scripts/bench_pipeline.py --events 10000000 --models als \\
        --set generate.users=200000 --set generate.items=20000 --set model_params.als.rank=64 \\
        --out .bench/end_to_end.json
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
import datetime as dt, json, sys, time
from recsys_spark import pipeline
from recsys_spark.config import load_config
from recsys_spark.data import synthetic
from recsys_spark.session import get_spark

events, root, models, overrides = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
config = load_config(overrides=[f"warehouse={root}/warehouse", f"generate.events={events}", "tracking.enabled=false",
                                f"models=[{','.join(models)}]", *overrides])
spark = get_spark("bench-pipeline")
run = pipeline.Run.of(config, dt.date(2024, 2, 1))
out = {"seconds": {}}

def step(name, fn):
    print("STEP " + name, flush=True)
    t = time.perf_counter()
    value = fn()
    out["seconds"][name] = time.perf_counter() - t
    return value

n = step("generate", lambda: synthetic.write_events(synthetic.generate_events(spark, config.generate),
                                                      f"{root}/events.parquet"))
summary = step("ingest", lambda: pipeline.run_ingest(spark, config, f"{root}/events.parquet", "canonical"))
counts = step("interactions", lambda: pipeline.run_interactions(spark, config))
for model in models:
    step(f"train_{model}", lambda: pipeline.run_train(spark, config, model, run))
    out[f"recommendations_{model}"] = step(f"recommend_{model}",
                                           lambda: pipeline.run_recommend(spark, config, model, run))["rows_out"]
if models:
    metrics = step("evaluate", lambda: pipeline.run_evaluate(spark, config, run, models))
    out["ndcg@10"] = {r["model"]: r["value"] for r in metrics.to_dict("records")
                      if r["metric"] == "ndcg" and r["k"] == 10}
print("STEP done", flush=True)
out.update(events=n, accepted=summary.accepted, interactions=counts["silver/interactions"],
           train=counts["silver/train"], users=counts["silver/user_index"], items=counts["silver/item_index"])
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


def run_size(events: int, models: list[str], overrides: list[str]) -> dict:
    root = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        proc = subprocess.Popen([sys.executable, "-c", STEP, str(events), root, json.dumps(models),
                                 json.dumps(overrides)], stdout=subprocess.PIPE, text=True)
        ps, done = psutil.Process(proc.pid), threading.Event()
        current, peaks = "session", {}

        def sample() -> None:
            while not done.is_set():
                peaks[current] = max(peaks.get(current, 0), _tree_rss(ps))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = None
        for line in proc.stdout:
            if line.startswith("STEP "):
                current = line[5:].strip()
                print(f"  {time.strftime('%H:%M:%S')} {current}", flush=True)
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        proc.wait()
        done.set()
        sampler.join()
        if proc.returncode or result is None:
            raise SystemExit(f"benchmark step failed for {events} events")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    seconds = result["seconds"]
    seconds["ingest_plus_interactions"] = seconds["ingest"] + seconds["interactions"]
    result.update(events_per_s=result["events"] / seconds["ingest_plus_interactions"],
                  peak_rss_gib={step: round(rss / 2**30, 2) for step, rss in peaks.items() if step != "done"},
                  load_average=os.getloadavg())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--models", default="", help="comma-separated models to train, recommend and evaluate")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=".bench/ingest.json")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    machine = {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
               "platform": platform.platform(), "python": platform.python_version()}
    results = []
    for n in args.events:
        r = run_size(n, models, args.set)
        results.append(r)
        timings = {step: round(t, 1) for step, t in r["seconds"].items()}
        print(f"{r['events']:,} events ({r['users']:,} users, {r['items']:,} items, {r['interactions']:,} "
              f"interactions): seconds {timings}; {r['events_per_s']:,.0f} events/s through ingest + "
              f"interactions; peak GiB {r['peak_rss_gib']}", flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:  # after every size, so a long run keeps what it measured
            json.dump({"machine": machine, "models": models, "overrides": args.set, "results": results}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
