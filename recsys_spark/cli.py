"""`recsys-spark <command>`: parses arguments, gets the session, calls the pipeline, reports.

Every command ends with one JSON line on stdout (job, run date, inputs, rows in, rows out, duration).
A failure exits non-zero with its cause on the last line of stderr: a one-line message for the
user's mistakes (RecsysError), the first line of Spark's message for analysis errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from recsys_spark.config import PipelineConfig, load_config
from recsys_spark.errors import RecsysError
from recsys_spark.models import registry

log = logging.getLogger("recsys_spark")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline YAML (default: conf/pipeline.yaml when present)")
    parser.add_argument("--warehouse", help="warehouse root for the Delta tables (default: ./warehouse)")
    parser.add_argument("--run-date", type=dt.date.fromisoformat, default=None,
                        help="logical date of the run, YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set interactions.min_user_interactions=5")
    parser.add_argument("--run-id", help="id stamped on gold rows (default: the run date)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys-spark", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        return p

    p = add("generate", "write a synthetic e-commerce event log (canonical Parquet)")
    p.add_argument("--output", required=True, help="output path (Parquet directory)")
    p.add_argument("--events", type=int, help="approximate number of events")
    p.add_argument("--seed", type=int)
    p.add_argument("--days", type=int)

    p = add("ingest", "validate raw events into bronze/events; bad rows to bronze/events_rejected")
    p.add_argument("--input", required=True, help="file, directory or glob (local, hdfs://, s3a://, ...)")
    p.add_argument("--preset", default="canonical", help="input format preset (see `recsys-spark presets`)")
    p.add_argument("--format", dest="fmt", choices=["csv", "json", "parquet", "delta"],
                   help="file format, when it cannot be inferred from the path")
    p.add_argument("--sep", help="field separator for CSV, overriding the preset's")

    add("interactions", "bronze/events -> index tables, interactions, splits, sequences, sessions")

    p = add("features", "bronze/events (+ side files) -> silver/user_features, item_features, feature_vocab")
    p.add_argument("--users-file", help="side user features, e.g. MovieLens u.user (default: features.users_file)")
    p.add_argument("--items-file", help="side item features, e.g. MovieLens u.item (default: features.items_file)")
    add("presets", "list the input presets")

    p = add("train", "fit a model on the run's train split; save it; export embeddings to gold")
    p.add_argument("--model", required=True,
                   help=f"model name ({', '.join(registry.MODELS)})")
    p.add_argument("--backend", choices=["horovod", "torch", "local"], help="torch models: how ranks launch")
    p.add_argument("--num-proc", type=int, help="torch models: number of training ranks")
    p.add_argument("--resume", action="store_true", help="torch models: continue from the last checkpoint")
    p.add_argument("--refit-every-days", type=int, metavar="N",
                   help="models that fold in new users (registry fold_in): keep a saved model of the N-1 days "
                        "before the run date instead of refitting; `recommend --fold-in` serves new users meanwhile")

    p = add("recommend", "top-k per user into gold/recommendations (train items filtered out)")
    p.add_argument("--model", required=True)
    p.add_argument("--k", type=int, help="recommendations per user (default: recommend.k)")
    p.add_argument("--users", help="comma-separated user ids (default: every user)")
    p.add_argument("--users-file", help="file with one user id per line")
    p.add_argument("--exclude-items", help="comma-separated item ids never to recommend")
    p.add_argument("--fold-in", action="store_true",
                   help="models that fold in new users (registry fold_in): use the latest saved model on or before "
                        "the run date and fold in the users of the run's silver/train it never saw")

    p = add("similar-items", "item-to-item top-k into gold/similar_items")
    p.add_argument("--model", required=True)
    p.add_argument("--k", type=int, default=20)

    p = add("evaluate", "score the run's recommendations on the test split into gold/metrics")
    p.add_argument("--models", help="comma-separated model names (default: every model with recommendations "
                                    "for the run date)")

    p = add("probe", "how much a feature a model's embeddings carry: cross-validated logistic regression "
                     "from gold/<entity>_embeddings to a column of silver/<entity>_features, into gold/metrics")
    p.add_argument("--model", required=True, help="the model whose embeddings of the run date are probed")
    p.add_argument("--target", required=True, help="a column of the feature table, e.g. gender, age_bucket, "
                                                   "occupation (users), category, genre_drama (items)")
    p.add_argument("--entity", choices=["user", "item"], default="user",
                   help="probe user embeddings against silver/user_features (default) or item embeddings "
                        "against silver/item_features")
    p.add_argument("--positive", help="probe this value of the target against all the others (binary, with "
                                      "AUC), e.g. --target age_bucket --positive 25-34")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds, stratified (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default: 0)")
    p.add_argument("--reg-param", type=float, default=0.01,
                   help="L2 penalty of the logistic regression, on standardised embeddings (default: 0.01)")

    p = add("report", "one self-contained HTML page (plus PNGs) of a run: metrics, training, data profile")
    p.add_argument("--out", default="report", help="output directory (default: ./report)")

    p = add("maintain", "compact (OPTIMIZE) and VACUUM the warehouse's Delta tables")
    p.add_argument("--tables", help="comma-separated table names, e.g. bronze/events,gold/recommendations "
                                    "(default: every table in the warehouse)")

    p = add("pipeline", "ingest -> interactions -> train -> recommend -> evaluate for the configured models")
    p.add_argument("--input", help="raw events to ingest (default: a generated synthetic log)")
    p.add_argument("--preset", default="canonical")
    p.add_argument("--format", dest="fmt", choices=["csv", "json", "parquet", "delta"])
    p.add_argument("--sep")
    p.add_argument("--models", help="comma-separated model names, overriding conf/pipeline.yaml")
    p.add_argument("--force", action="store_true", help="rerun every step, even those whose outputs are current")
    return parser


def _config(args: argparse.Namespace) -> PipelineConfig:
    """The validated configuration, models included, and the arguments that reach table predicates and
    paths checked (``--model``, ``--models``, ``--run-id``): all before any Spark session starts, so a
    mistake costs one line, not a JVM start."""
    if args.run_id is not None:
        from recsys_spark.tables import check_run_id

        check_run_id(args.run_id)
    if getattr(args, "model", None) is not None:
        registry.entry(args.model)  # an unknown name (or a path) stops here, listing the known ones
    overrides = list(args.overrides)
    if args.warehouse:
        overrides.append(f"warehouse={json.dumps(args.warehouse)}")  # a JSON string is YAML: kept verbatim
    if getattr(args, "models", None):
        overrides.append(f"models={json.dumps(_id_list(args.models))}")  # JSON is YAML: names stay values
    for option in ("backend", "num_proc", "resume"):
        value = getattr(args, option, None)
        if value:
            overrides.append(f"model_params.{args.model}.{option}={str(value).lower()}")
    config = load_config(args.config, overrides)
    registry.check_config(config)
    return config


def _run(args: argparse.Namespace, config: PipelineConfig):
    from recsys_spark.pipeline import Run

    return Run.of(config, args.run_date, args.run_id)


def _id_list(inline: str | None, path: str | None = None) -> list[str] | None:
    ids = [x.strip() for x in (inline or "").split(",") if x.strip()]
    if path:
        try:
            with open(path) as fh:
                ids += [line.strip() for line in fh if line.strip()]
        except OSError as exc:
            raise RecsysError(f"cannot read {path}: {exc.strerror}") from None
    return ids or None


def _spark(app: str):
    from recsys_spark.session import get_spark

    return get_spark(f"recsys-spark-{app}")


def cmd_presets(args, config) -> dict[str, Any]:
    from recsys_spark.data.sources import PRESETS

    for preset in PRESETS.values():
        print(f"{preset.name:<18} {preset.description}")
    return {"rows_out": len(PRESETS)}


def cmd_generate(args, config) -> dict[str, Any]:
    from recsys_spark.data import synthetic

    updates = {k: v for k, v in {"events": args.events, "seed": args.seed, "days": args.days}.items() if v}
    gen = config.generate.model_copy(update=updates)
    gen = type(gen).model_validate(gen.model_dump())
    n = synthetic.write_events(synthetic.generate_events(_spark("generate"), gen), args.output)
    print(f"wrote {n:,} events to {args.output}")
    return {"inputs": [], "rows_out": n, "outputs": [args.output]}


def cmd_ingest(args, config) -> dict[str, Any]:
    from recsys_spark import pipeline

    summary = pipeline.run_ingest(_spark("ingest"), config, args.input, args.preset, fmt=args.fmt, sep=args.sep)
    print("\n".join(summary.lines()))
    return {"inputs": [args.input], "rows_in": summary.rows_read, "rows_out": summary.accepted,
            "rejected": summary.rejected_total, "duplicates": summary.duplicates}


def _print_tables(counts: dict[str, int], warehouse: str) -> None:
    print(f"tables under {warehouse}:")
    for name, n in counts.items():
        print(f"  {name:<28}{n:>12,} rows")


def cmd_interactions(args, config) -> dict[str, Any]:
    from recsys_spark import pipeline

    counts = pipeline.run_interactions(_spark("interactions"), config)
    _print_tables(counts, config.warehouse)
    return {"inputs": ["bronze/events"], "rows_out": counts}


def cmd_features(args, config) -> dict[str, Any]:
    from recsys_spark import pipeline

    counts = pipeline.run_features(_spark("features"), config, args.users_file, args.items_file)
    _print_tables(counts, config.warehouse)
    inputs = [p for p in (args.users_file or config.features.users_file,
                          args.items_file or config.features.items_file) if p]
    return {"inputs": ["bronze/events", *inputs], "rows_out": counts}


def cmd_train(args, config) -> dict[str, Any]:
    from recsys_spark import pipeline
    from recsys_spark import tables as tb

    if args.refit_every_days is not None:  # decided before Spark starts: a day that keeps its model is cheap
        run = _run(args, config)
        kept = pipeline.kept_model_date(config, args.model, run, args.refit_every_days)
        if kept is not None:
            print(f"kept the {args.model} model of {kept} (refit every {args.refit_every_days} days); not refitted")
            return {"model": args.model, "kept": kept.isoformat(),
                    "path": tb.model_dir(config.warehouse, args.model, kept)}
    result = pipeline.run_train(_spark("train"), config, args.model, _run(args, config))
    print(f"trained {args.model}; saved to {result['path']}")
    return result


def cmd_recommend(args, config) -> dict[str, Any]:
    from recsys_spark import pipeline

    if args.fold_in:
        registry.require_fold_in(args.model)  # before Spark starts
    result = pipeline.run_recommend(
        _spark("recommend"), config, args.model, _run(args, config), k=args.k,
        user_ids=_id_list(args.users, args.users_file), exclude_item_ids=_id_list(args.exclude_items),
        fold_in=args.fold_in,
    )
    if args.fold_in:
        print(f"folded {result['folded_in']:,} new users into the {args.model} model of {result['model_date']}")
    print(f"wrote {result['rows_out']:,} recommendations of {args.model} to gold/recommendations")
    return result


def cmd_similar_items(args, config) -> dict[str, Any]:
    from recsys_spark import pipeline

    result = pipeline.run_similar_items(_spark("similar-items"), config, args.model, _run(args, config), args.k)
    print(f"wrote {result['rows_out']:,} rows of {args.model} to gold/similar_items")
    return result


def cmd_evaluate(args, config) -> dict[str, Any]:
    from recsys_spark import pipeline
    from recsys_spark import tables as tb
    from recsys_spark.evaluate.ranking import format_table, summary_columns

    run = _run(args, config)
    # --models: exactly those; otherwise every model with recommendations for the run date.
    models = config.models if args.models else None
    metrics = pipeline.run_evaluate(_spark("evaluate"), config, run, models, echo=print)
    models = list(dict.fromkeys(metrics[tb.MODEL]))
    print(f"metrics on the {run.split} split (run {run.run_id}):")
    print(format_table(metrics, summary_columns(metrics) or None))
    rows = len(metrics)
    if config.evaluate.sessions:
        sessions = pipeline.run_evaluate_sessions(_spark("evaluate"), config, run, models)
        print(f"next-item metrics on the sessions after the temporal cut (run {run.run_id}):")
        print(format_table(sessions))
        rows += len(sessions)
    return {"models": models, "rows_out": rows}


def cmd_probe(args, config) -> dict[str, Any]:
    from recsys_spark import pipeline
    from recsys_spark.evaluate import probe as pr
    from recsys_spark.tables import check_name

    check_name(args.target, "target column")  # before Spark starts: a typo in the name costs nothing
    if args.folds < 2:
        raise RecsysError(f"--folds must be 2 or more, got {args.folds}")
    run = _run(args, config)
    result = pipeline.run_probe(_spark("probe"), config, run, args.model, args.target, entity=args.entity,
                                positive=args.positive, folds=args.folds, seed=args.seed, reg_param=args.reg_param)
    auc = "" if result.auc is None else f"AUC {result.auc:.4f} (+/- {result.auc_std:.4f}), "
    print(f"probe of {args.model}'s {result.entity} embeddings for {result.target} ({len(result.classes)} classes, "
          f"{result.n:,} {result.entity}s, {result.folds} folds): {auc}accuracy {result.accuracy:.4f} "
          f"(+/- {result.accuracy_std:.4f}) vs {result.majority_accuracy:.4f} for the majority class "
          f"({result.classes[0]}); rows in gold/metrics with split {pr.PROBE_SPLIT}"
          + (f"; left out, fewer {result.entity}s than folds: {', '.join(result.dropped)}" if result.dropped else ""))
    return {"inputs": [f"gold/{args.entity}_embeddings", f"silver/{args.entity}_features"], "model": args.model,
            "target": result.target, "rows_out": len(result.rows()), "dropped_classes": list(result.dropped),
            **{pr.parse_metric(metric)[0]: value for metric, _, value in result.rows()}}


def cmd_maintain(args, config) -> dict[str, Any]:
    from recsys_spark import pipeline
    from recsys_spark import tables as tb

    names = _id_list(args.tables)
    if names is not None:
        tb.check_table_names(names)  # before Spark starts: a typo costs nothing
    result = pipeline.run_maintain(_spark("maintain"), config, names)
    hours = config.maintenance.vacuum_retention_hours
    if not result["tables"]:
        print(f"no Delta tables to maintain under {config.warehouse}")
    for name, files in result["tables"].items():
        vacuumed = "?" if files["files_vacuumed"] is None else f"{files['files_vacuumed']:,}"
        print(f"  {name:<28}{files['files_before']:>8,} -> {files['files_after']:,} files; "
              f"{vacuumed} replaced more than {hours} h ago vacuumed")
    return {"inputs": list(result["tables"]), "vacuum_retention_hours": hours, **result}


def cmd_pipeline(args, config) -> dict[str, Any]:
    from recsys_spark import pipeline
    from recsys_spark.runlock import pipeline_lock

    run = _run(args, config)
    with pipeline_lock(config.warehouse, run.run_date):  # before the session starts: a second run stops at once
        return pipeline.run_pipeline(_spark("pipeline"), config, args.input, args.preset, fmt=args.fmt,
                                     sep=args.sep, run=run, echo=print, force=args.force)


def cmd_report(args, config) -> dict[str, Any]:
    from recsys_spark.report import write_report

    path = write_report(_spark("report"), config.warehouse, args.out, run_id=args.run_id)
    print(f"wrote the report of {'run ' + args.run_id if args.run_id else 'the latest run'} to {path}")
    return {"inputs": [config.warehouse], "outputs": [path]}


COMMANDS: dict[str, Callable[[argparse.Namespace, PipelineConfig], dict[str, Any]]] = {
    "presets": cmd_presets,
    "generate": cmd_generate,
    "ingest": cmd_ingest,
    "interactions": cmd_interactions,
    "features": cmd_features,
    "train": cmd_train,
    "recommend": cmd_recommend,
    "similar-items": cmd_similar_items,
    "evaluate": cmd_evaluate,
    "probe": cmd_probe,
    "report": cmd_report,
    "maintain": cmd_maintain,
    "pipeline": cmd_pipeline,
}


def _spark_message(exc: BaseException) -> str | None:
    """The first line of a Spark/Py4J error, or None when ``exc`` is not one."""
    try:
        from py4j.protocol import Py4JJavaError
        from pyspark.errors import PySparkException
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, PySparkException):
        return str(exc).strip().splitlines()[0]
    if isinstance(exc, Py4JJavaError):
        return str(exc.java_exception).strip().splitlines()[0]
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.run_date is None:
        args.run_date = dt.datetime.now(dt.UTC).date()
    started = time.monotonic()
    summary: dict[str, Any] = {"job": args.command, "run_date": args.run_date.isoformat()}
    try:
        config = _config(args)
        summary["warehouse"] = config.warehouse
        summary.update(COMMANDS[args.command](args, config))
        status = 0
    except RecsysError as exc:
        summary["error"], status = str(exc), 2
    except Exception as exc:  # noqa: BLE001 - the cause goes to the last line, the trace to the log
        message = _spark_message(exc)
        if message is None:
            log.exception("%s failed", args.command)
            message = f"{type(exc).__name__}: {exc}"
        summary["error"], status = message, 1
    summary["duration_s"] = round(time.monotonic() - started, 2)
    summary["status"] = "ok" if status == 0 else "failed"
    print(json.dumps(summary, default=str))
    if status:
        print(f"recsys-spark {args.command}: error: {summary['error']}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
