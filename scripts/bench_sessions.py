"""Next-item benchmark on the Yoochoose (RecSys Challenge 2015) sample: popularity, session item-kNN,
GRU4Rec with each of its losses (cross-entropy, BPR-max, TOP1-max) and SASRec with each of its own
(full-softmax cross-entropy, BCE with one sampled negative).

Data: ``yoochoose/yoochoose-clicks-100k_train_full.txt`` (train) and ``..._test.txt`` (test, the next
day), TSV with a header ``SessionId ItemId Time``. Standard GRU4Rec preprocessing of the test side: clicks
on items absent from train are dropped, then sessions left with fewer than two clicks. Sessions are
ordered by their first click; items by their index in train.

Protocol (``recsys_spark.evaluate.sessions``): every click after the first of a test session is a query
ranked against the whole catalogue; Recall@20 and MRR@20; rank = 1 + #items scoring strictly higher
(the official code's rule; the baselines break their own ties by popularity).

Training: one process, the paper's schedule (``fit_session_parallel``: one Adagrad(-momentum) step per
session-parallel mini-batch). Hyper-parameters come from the official implementation's parameter files
for RSC15/Yoochoose (cross-entropy with 100 units) and its BPR-max files; TOP1-max takes BPR-max's.
Nothing is tuned on the test set. Events/s counts training (input, target) pairs per second.

The row ``gru4rec-bpr-max/trainer`` trains through the pipeline's own path instead: ``GRU4RecTask`` in
``trainer.fit`` (local context), whole sessions (last 50 items, padded) as rows, 64 sessions and one Adam
step per batch, lr 0.005 with a cosine schedule: settings chosen on a validation split of train (its
latest 2,000 sessions), where both schedules reached Recall@20 0.66.

The rows ``sasrec-ce`` and ``sasrec-bce`` train SASRec through the same path: ``SASRecTask`` in
``trainer.fit`` (local context), one row per training session of at least two clicks (its last
``max_len`` = 20 items, left-padded; 122 of 17,794 sessions are longer, 822 of 52,484 training pairs
fall outside), 128 sessions and one Adam step per batch, cosine schedule; evaluated with
``SASRecScorer`` (each row's last 20 items through the module, the last position's output dotted with
the item embeddings). Settings (``SASREC``) were chosen with ``--tune`` on a validation split of train:
its latest 2,000 sessions held out (items unseen in the rest dropped, then sessions shorter than two:
1,994 sessions, 6,318 queries), Recall@20 and MRR@20 after every epoch. Grid: lr {1e-3, 3e-3} x dropout
{0.2, 0.5} (d 64, two blocks, one head), then lr 1e-2, d 128 (CE) and 80 epochs (BCE). Best on
validation: CE lr 3e-3, dropout 0.5, 20 epochs (Recall@20 0.690, MRR@20 0.368; lr 1e-2 and d 128 were
within 0.006, d 128 at 3x the time); BCE lr 3e-3, dropout 0.5, 40 epochs (0.664 / 0.350; 80 epochs
0.670 / 0.351 at twice the time). Nothing is tuned on the test set. Events/s counts the real (input,
target) pairs trained on per second of the epochs' training time.

Usage: ``python scripts/bench_sessions.py [--data ../shared/data] [--models sasrec-ce sasrec-bce]
[--epochs 5] [--out .bench/sessions.json]``; ``--tune`` (with ``--models`` and optionally ``--grid`` '[{"lr":
0.01}]') runs the SASRec validation instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recsys_spark import tables as tb
from recsys_spark.data.session_batches import PAD, SessionData, sessions_from_events
from recsys_spark.evaluate.sessions import ItemKNNScorer, PopularityScorer, next_item_metrics
from recsys_spark.models.gru4rec import (
    GRU4RecNetParams,
    GRU4RecScorer,
    GRU4RecTask,
    PaperSchedule,
    fit_session_parallel,
)
from recsys_spark.models.sasrec import SASRecNetParams, SASRecScorer, SASRecTask
from recsys_spark.nn.gru4rec import GRU4Rec
from recsys_spark.nn.sasrec import SASRec
from recsys_spark.train.distributed import LocalContext
from recsys_spark.train.loaders import steps_per_epoch
from recsys_spark.train.trainer import TrainConfig, fit

log = logging.getLogger("bench_sessions")

KS = [20]
EVAL_BATCH = 512
TRAIN_FILE = "yoochoose/yoochoose-clicks-100k_train_full.txt"
TEST_FILE = "yoochoose/yoochoose-clicks-100k_test.txt"
VALIDATION_SESSIONS = 2000  # the latest sessions of train, for choosing settings (never the test set)

# The official implementation's parameter files (hidasib/GRU4Rec_PyTorch_Official, paramfiles/):
# rsc15_xe_shared_100_best for cross-entropy; the BPR-max files' ELU 0.5, score regularisation ~2,
# lr 0.05, momentum 0.4 for BPR-max, with RSC15's 100 units and batch 32.
GRU4REC = {
    "ce": dict(loss="ce", hidden=100, parallel=32, dropout_embed=0.0, dropout_hidden=0.4, lr=0.2, momentum=0.2,
               n_sample=2048, sample_alpha=0.5, logq=1.0),
    "bpr-max": dict(loss="bpr-max", hidden=100, parallel=32, dropout_embed=0.0, dropout_hidden=0.2, lr=0.05,
                    momentum=0.4, n_sample=2048, sample_alpha=0.5, bpreg=1.95, elu_param=0.5),
    "top1-max": dict(loss="top1-max", hidden=100, parallel=32, dropout_embed=0.0, dropout_hidden=0.2, lr=0.05,
                     momentum=0.4, n_sample=2048, sample_alpha=0.5),
}


# The trainer path's sessions per batch: 64 with Adam at lr 0.005 matched the paper's schedule on a
# Yoochoose validation split (conf/models/gru4rec.yaml's train.batch_size).
TRAINER_SESSIONS = 64


def net_params(settings: dict) -> dict:
    """The network's share of a GRU4REC entry (the rest is the paper's optimiser: PaperSchedule)."""
    return {k: v for k, v in settings.items() if k not in PaperSchedule.model_fields}


def schedule_params(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k in PaperSchedule.model_fields}


# SASRec through the trainer: the module's settings (SASRecNetParams) and the optimiser's (TrainConfig),
# chosen on the validation split (``--tune``; see the module docstring).
SASREC = {
    "ce": dict(net=dict(loss="ce", max_len=20, d=64, heads=1, blocks=2, dropout=0.5),
               train=dict(epochs=20, batch_size=128, lr=3e-3, optimizer="adam", schedule="cosine")),
    "bce": dict(net=dict(loss="bce", max_len=20, d=64, heads=1, blocks=2, dropout=0.5),
                train=dict(epochs=40, batch_size=128, lr=3e-3, optimizer="adam", schedule="cosine")),
}
# ``--tune`` (default grid): each SASRec loss's settings with these overrides, trained on train minus
# its latest VALIDATION_SESSIONS sessions and scored on those after every epoch.
SASREC_GRID = [
    {"lr": 1e-3, "dropout": 0.2},
    {"lr": 1e-3, "dropout": 0.5},
    {"lr": 3e-3, "dropout": 0.2},
    {"lr": 3e-3, "dropout": 0.5},
]

MODELS = ["popularity", "item-knn", *(f"gru4rec-{loss}" for loss in GRU4REC), "gru4rec-bpr-max/trainer",
          *(f"sasrec-{loss}" for loss in SASREC)]


def load(data_dir: Path) -> dict:
    """Train and test sessions as item-index lists (test filtered to train items), and the stats."""
    train = pd.read_csv(data_dir / TRAIN_FILE, sep="\t", dtype={"SessionId": np.int64, "ItemId": np.int64})
    test = pd.read_csv(data_dir / TEST_FILE, sep="\t", dtype={"SessionId": np.int64, "ItemId": np.int64})
    items = np.sort(train["ItemId"].unique())
    index = pd.Series(np.arange(len(items)), index=items)
    known = test["ItemId"].isin(index.index)
    dropped_clicks = int((~known).sum())
    test = test[known]
    train_sessions = sessions_from_events(train["SessionId"].to_numpy(), index[train["ItemId"]].to_numpy(),
                                          train["Time"].to_numpy())
    test_sessions = [s for s in sessions_from_events(test["SessionId"].to_numpy(), index[test["ItemId"]].to_numpy(),
                                                     test["Time"].to_numpy()) if len(s) >= 2]
    stats = {
        "train_clicks": len(train), "train_sessions": len(train_sessions), "items": len(items),
        "train_events": SessionData.from_lists(train_sessions).n_events,
        "test_clicks_dropped_unknown_item": dropped_clicks, "test_sessions": len(test_sessions),
        "test_queries": int(sum(len(s) - 1 for s in test_sessions)),
    }
    return {"train": train_sessions, "test": test_sessions, "n_items": len(items), "stats": stats}


def train_through_trainer(train: list[np.ndarray], n_items: int, epochs: int, seed: int,
                          device: str) -> tuple[GRU4Rec, float, float]:
    """GRU4Rec (BPR-max) through ``trainer.fit``: returns the model, seconds and training events/s."""
    params = GRU4RecNetParams(**net_params(GRU4REC["bpr-max"]), seed=seed)
    sessions = [s[-params.max_length:] for s in train if len(s) >= 2]
    padded = np.full((len(sessions), params.max_length), PAD, dtype=np.int64)
    for row, s in enumerate(sessions):
        padded[row, : len(s)] = s
    task = GRU4RecTask(params, n_items, item_counts=np.bincount(np.concatenate(train), minlength=n_items))
    steps = steps_per_epoch(len(padded), TRAINER_SESSIONS, 1)
    config = TrainConfig(epochs=epochs, batch_size=TRAINER_SESSIONS, lr=0.005, optimizer="adam",
                         schedule="cosine", progress=False, seed=seed)
    started = time.perf_counter()
    result = fit(task, LocalContext(), {tb.ITEMS: torch.from_numpy(padded)}, steps, config)
    seconds = time.perf_counter() - started
    model = GRU4Rec(**result.init_kwargs)
    model.load_state_dict(result.state_dict)
    events = epochs * steps * TRAINER_SESSIONS * SessionData.from_lists(sessions).n_events / len(sessions)
    return model.to(device), seconds, events / seconds


def validation_split(train: list[np.ndarray], n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Train minus its latest ``n`` sessions, and those sessions preprocessed as the test set is: items
    absent from the rest dropped, then sessions left with fewer than two clicks."""
    fit_part, held = train[:-n], train[-n:]
    known = np.zeros(max(int(np.concatenate(train).max()) + 1, 1), dtype=bool)
    known[np.concatenate(fit_part)] = True
    held = [s[known[s]] for s in held]
    return fit_part, [s for s in held if len(s) >= 2]


class SessionValidatedSASRec(SASRecTask):
    """``SASRecTask`` whose ``validate`` is the next-item protocol (Recall/MRR@20) on held-out sessions."""

    def __init__(self, params: SASRecNetParams, n_items: int, item_counts: np.ndarray,
                 sessions: list[np.ndarray] | None = None) -> None:
        super().__init__(params, n_items, item_counts)
        self.sessions = sessions

    def validate(self, model) -> dict[str, float]:
        if not self.sessions:
            return {}
        scorer = SASRecScorer.from_model(getattr(model, "module", model), live=True)  # fit() set eval mode
        values = next_item_metrics(scorer.start(EVAL_BATCH), self.sessions, ks=KS, batch_size=EVAL_BATCH)
        return {key: value for key, value in values.items() if key.split("@")[0] in ("recall", "mrr")}


def sasrec_rows(sessions: list[np.ndarray], max_len: int) -> np.ndarray:
    """One row per session of at least two items: its last ``max_len`` items, left-padded with PAD."""
    kept = [s[-max_len:] for s in sessions if len(s) >= 2]
    rows = np.full((len(kept), max_len), PAD, dtype=np.int64)
    for row, s in enumerate(kept):
        rows[row, max_len - len(s):] = s
    return rows


def train_sasrec(train: list[np.ndarray], n_items: int, loss: str, seed: int, device: str,
                 validation: list[np.ndarray] | None = None, **overrides) -> tuple[SASRec, dict]:
    """SASRec with ``loss`` through ``trainer.fit`` (local context): ``SASREC[loss]``'s settings, with
    ``overrides`` (SASRecNetParams or TrainConfig fields). Returns the model and a summary: seconds (the
    whole fit), training events/s (real (input, target) pairs over the epochs' training seconds), the
    per-epoch history (validation metrics when ``validation`` is given) and the settings."""
    net = {**SASREC[loss]["net"], **{k: v for k, v in overrides.items() if k in SASRecNetParams.model_fields}}
    opt = {**SASREC[loss]["train"], **{k: v for k, v in overrides.items() if k in TrainConfig.model_fields}}
    params = SASRecNetParams(**net, seed=seed)
    rows = sasrec_rows(train, params.max_len)
    counts = np.bincount(np.concatenate(train), minlength=n_items)
    task = SessionValidatedSASRec(params, n_items, counts, validation)
    config = TrainConfig(**opt, progress=False, seed=seed)
    steps = steps_per_epoch(len(rows), config.batch_size, 1)
    started = time.perf_counter()
    result = fit(task, LocalContext(), {tb.ITEMS: torch.from_numpy(rows).to(device)}, steps, config)
    seconds = time.perf_counter() - started
    model = task.build_model()
    model.load_state_dict(result.state_dict)
    pairs_per_row = float((rows != PAD).sum(axis=1).mean() - 1)  # every row holds >= 2 items
    events = len(result.history) * steps * config.batch_size * pairs_per_row
    return model.to(device).eval(), {
        "train_s": seconds, "train_events_per_s": events / sum(h["seconds"] for h in result.history),
        "history": result.history, "params": {**params.model_dump(), **config.model_dump(include=set(opt))},
    }


def evaluate(scorer, sessions) -> tuple[dict[str, float], float]:
    started = time.perf_counter()
    values = next_item_metrics(scorer.start(EVAL_BATCH), sessions, ks=KS, batch_size=EVAL_BATCH)
    return values, time.perf_counter() - started


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def tune_sasrec(train: list[np.ndarray], n_items: int, losses: list[str], seed: int, device: str,
                grid: list[dict]) -> list[dict]:
    """Every ``grid`` setting (overrides of SASREC's) of each loss, trained on train minus its latest
    sessions and scored on those after every epoch; returns one row per run with its validation curve."""
    fit_part, held = validation_split(train, VALIDATION_SESSIONS)
    log.info("validation: %d sessions for fitting, %d held out (%d queries)", len(fit_part), len(held),
             sum(len(s) - 1 for s in held))
    runs = []
    for loss in losses:
        for overrides in grid:
            _, summary = train_sasrec(fit_part, n_items, loss, seed, device, validation=held, **overrides)
            curve = [(h["epoch"], round(h["recall@20"], 4), round(h["mrr@20"], 4)) for h in summary["history"]]
            best = max(summary["history"], key=lambda h: h["recall@20"])
            runs.append({"model": f"sasrec-{loss}", "overrides": overrides, **summary,
                         "last": summary["history"][-1], "best_epoch": best["epoch"]})
            log.info("tune sasrec-%s %s: last %s, best epoch %d %s, %.0f events/s; curve %s", loss, overrides,
                     {k: round(summary["history"][-1][k], 4) for k in ("recall@20", "mrr@20")}, best["epoch"],
                     {k: round(best[k], 4) for k in ("recall@20", "mrr@20")}, summary["train_events_per_s"], curve)
    print(f"\nSASRec on the validation split ({len(held):,} latest train sessions), the last epoch's figures")
    header = f"{'model':<12}{'overrides':<52}{'Recall@20':>10}{'MRR@20':>9}{'best epoch':>11}{'events/s':>10}"
    print(header)
    print("-" * len(header))
    for run in runs:
        print(f"{run['model']:<12}{json.dumps(run['overrides']):<52}{run['last']['recall@20']:>10.4f}"
              f"{run['last']['mrr@20']:>9.4f}{run['best_epoch']:>11}{run['train_events_per_s']:>10,.0f}")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, help="rows to run (default: all)")
    parser.add_argument("--epochs", type=int, default=5, help="GRU4Rec rows; SASRec's come from SASREC")
    parser.add_argument("--tune", action="store_true",
                        help="instead of the benchmark: the selected SASRec rows' settings on the validation split")
    parser.add_argument("--grid", type=json.loads, default=SASREC_GRID,
                        help="with --tune: a JSON list of overrides, e.g. '[{\"lr\": 0.01, \"epochs\": 80}]'")
    parser.add_argument("--threads", type=int, default=1, help="small matrices: one thread is fastest on a busy host")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=".bench/sessions.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    data = load(Path(args.data))
    log.info("data: %s", data["stats"])
    n_items, train, test = data["n_items"], data["train"], data["test"]
    selected = [m for m in MODELS if m in args.models]
    meta = {"data": data["stats"], "ks": KS, "ties": "standard", "seed": args.seed, "threads": args.threads,
            "device": args.device, "commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg()}

    if args.tune:
        losses = [m.removeprefix("sasrec-") for m in selected if m.startswith("sasrec-")]
        runs = tune_sasrec(train, n_items, losses, args.seed, args.device, args.grid)
        write(args.out, {"benchmark": "sessions-sasrec-tuning", **meta, "validation_sessions": VALIDATION_SESSIONS,
                         "grid": args.grid, "runs": runs})
        return

    rows = []
    for name, build in [("popularity", lambda: PopularityScorer.fit(train, n_items)),
                        ("item-knn", lambda: ItemKNNScorer.fit(train, n_items, lam=20.0, alpha=0.5, neighbours=100))]:
        if name not in selected:
            continue
        started = time.perf_counter()
        scorer = build()
        fit_s = time.perf_counter() - started
        values, eval_s = evaluate(scorer, test)
        rows.append({"model": name, **values, "train_s": fit_s, "eval_s": eval_s})
        log.info("%s: %s", name, rows[-1])

    counts = np.bincount(np.concatenate(train), minlength=n_items)
    for loss in GRU4REC:
        if f"gru4rec-{loss}" not in selected:
            continue
        params = GRU4RecNetParams(**net_params(GRU4REC[loss]), seed=args.seed)
        schedule = PaperSchedule(**schedule_params(GRU4REC[loss]), epochs=args.epochs)
        torch.manual_seed(args.seed)
        task = GRU4RecTask(params, n_items, item_counts=counts)
        started = time.perf_counter()
        model, history = fit_session_parallel(task, train, schedule, device=args.device)
        train_s = time.perf_counter() - started
        values, eval_s = evaluate(GRU4RecScorer.from_model(model.eval()), test)
        events = sum(h["events_per_s"] * h["seconds"] for h in history)
        rows.append({"model": f"gru4rec-{loss}", **values, "train_s": train_s, "eval_s": eval_s,
                     "train_events_per_s": events / sum(h["seconds"] for h in history),
                     "epoch_loss": [h["loss"] for h in history],
                     "params": {**params.model_dump(), **schedule.model_dump()}})
        log.info("gru4rec-%s: %s", loss, {k: v for k, v in rows[-1].items() if k != "params"})

    if "gru4rec-bpr-max/trainer" in selected:
        model, train_s, rate = train_through_trainer(train, n_items, args.epochs, args.seed, args.device)
        values, eval_s = evaluate(GRU4RecScorer.from_model(model.eval()), test)
        rows.append({"model": "gru4rec-bpr-max/trainer", **values, "train_s": train_s, "eval_s": eval_s,
                     "train_events_per_s": rate})
        log.info("gru4rec-bpr-max/trainer: %s", rows[-1])

    for loss in SASREC:
        if f"sasrec-{loss}" not in selected:
            continue
        model, summary = train_sasrec(train, n_items, loss, args.seed, args.device)
        values, eval_s = evaluate(SASRecScorer.from_model(model), test)
        rows.append({"model": f"sasrec-{loss}", **values, "train_s": summary["train_s"], "eval_s": eval_s,
                     "train_events_per_s": summary["train_events_per_s"],
                     "epoch_loss": [h["train_loss"] for h in summary["history"]], "params": summary["params"]})
        log.info("sasrec-%s: %s", loss, {k: v for k, v in rows[-1].items() if k not in ("params", "epoch_loss")})

    header = f"{'model':<26}{'Recall@20':>10}{'MRR@20':>9}{'train s':>9}{'events/s':>10}{'eval s':>8}"
    print(f"\nYoochoose sample: {data['stats']['test_queries']:,} test queries over {n_items:,} items")
    print(header)
    print("-" * len(header))
    for row in rows:
        rate = f"{row['train_events_per_s']:>10,.0f}" if "train_events_per_s" in row else f"{'-':>10}"
        print(f"{row['model']:<26}{row['recall@20']:>10.4f}{row['mrr@20']:>9.4f}{row['train_s']:>9.1f}{rate}"
              f"{row['eval_s']:>8.1f}")
    meta["load_average_end"] = os.getloadavg()
    write(args.out, {"benchmark": "sessions", **meta, "epochs": args.epochs, "results": rows})


def write(path: str, payload: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=float))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
