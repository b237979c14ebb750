"""Embedding probes (recsys_spark.evaluate.probe): a planted signal is found, random labels score chance,
the rows land in gold/metrics under their own keys, and every mistake stops in one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from pyspark.sql import functions as F

from recsys_spark import pipeline
from recsys_spark import tables as tb
from recsys_spark.cli import main
from recsys_spark.data.features import Vocabulary
from recsys_spark.errors import RecsysError
from recsys_spark.evaluate import probe as pr

pytestmark = pytest.mark.spark

MODEL = "als"  # any registered name: the probe reads only its rows of gold/user_embeddings
FIELD = "activity_view"  # a user field of the synthetic world with a few well-filled values


def _embeddings(spark, keys, vectors):
    rows = [(str(k), [float(x) for x in v]) for k, v in zip(keys, vectors, strict=True)]
    return spark.createDataFrame(rows, f"{tb.USER_ID} string, {tb.EMBEDDING} array<float>")


@pytest.fixture(scope="module")
def planted(spark, world, tmp_path_factory):
    """A warehouse with the world's user features and vocabulary, and user embeddings of MODEL for the
    world's run date whose first coordinate is 3 for the users with the most frequent FIELD value (the
    positive class) and 0 for the others, plus standard normal noise on every coordinate."""
    warehouse = str(tmp_path_factory.mktemp("probe") / "warehouse")
    for name in (tb.USER_FEATURES, tb.ITEM_FEATURES, tb.FEATURE_VOCAB, tb.USER_INDEX):
        tb.overwrite(tb.read(spark, world.warehouse, name), warehouse, name)
    features = tb.read(spark, warehouse, tb.USER_FEATURES).filter(F.col(tb.USER_IDX).isNotNull())
    rows = features.select(tb.USER_ID, tb.USER_IDX, FIELD).collect()
    top = max(set(r[FIELD] for r in rows), key=lambda v: (sum(r[FIELD] == v for r in rows), -v))
    positive = {i: v for v, i in Vocabulary.read(spark, warehouse).index[FIELD].items()}[top]
    noise = np.random.default_rng(3).normal(size=(len(rows), 4))
    vectors = noise + np.outer([3.0 * (r[FIELD] == top) for r in rows], [1, 0, 0, 0])
    emb = _embeddings(spark, [r[tb.USER_ID] for r in rows], vectors).join(
        features.select(tb.USER_ID, tb.USER_IDX), tb.USER_ID)
    tb.replace_where(pipeline._with_run(emb, world.run, MODEL), warehouse, tb.USER_EMBEDDINGS,
                     world.run.where(MODEL), pipeline.GOLD_PARTITIONS)
    config = world.config.model_copy(update={"warehouse": warehouse})
    return config, positive, sum(r[FIELD] == top for r in rows), len(rows)


def test_a_planted_signal_is_found_and_written_to_gold_metrics(spark, world, planted, capsys):
    config, positive, n_positive, n = planted
    argv = ["probe", "--warehouse", config.warehouse, "--run-date", world.run.run_date.isoformat(),
            "--model", MODEL, "--target", FIELD, "--positive", positive, "--folds", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["status"] == "ok" and summary["target"] == f"{FIELD}={positive}"
    assert summary["auc"] > 0.9 and summary["accuracy"] > summary["majority_accuracy"] + 0.1
    assert summary["n"] == n and summary["classes"] == 2 and summary["folds"] == 3
    assert summary["majority_accuracy"] == pytest.approx(max(n_positive, n - n_positive) / n, abs=0.03)

    def rows():
        metrics = tb.read(spark, config.warehouse, tb.METRICS).filter(F.col(tb.SPLIT) == pr.PROBE_SPLIT)
        return {r[tb.METRIC]: (r[tb.K], r[tb.VALUE], r[tb.MODEL], r[tb.RUN_ID], r[tb.RUN_DATE])
                for r in metrics.collect()}

    written = rows()
    auc = pr.metric_name(pr.AUC, "user", f"{FIELD}={positive}")
    assert written[auc] == (0, pytest.approx(summary["auc"]), MODEL, world.run.run_id, world.run.run_date)
    assert {pr.parse_metric(m)[0] for m in written} == set(pr.STATS)
    # The same probe again replaces its rows; a probe of another target adds its own beside them.
    assert main(argv) == 0
    assert rows() == written
    assert main([*argv[:-4], "--folds", "2", "--reg-param", "0.1"]) == 0  # FIELD's values, multi-class
    multi_summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The world has a value or two of FIELD held by a single user: left out (fewer rows than folds), named.
    assert multi_summary["dropped_classes"] and multi_summary["classes"] >= 2
    both = rows()
    assert {m: v for m, v in both.items() if m in written} == written
    multi = {pr.parse_metric(m)[0]: v[1] for m, v in both.items() if m not in written}
    assert set(multi) == set(pr.STATS) - {pr.AUC, pr.AUC_STD} and multi[pr.N_FOLDS] == 2


def test_random_labels_score_chance(spark):
    rng = np.random.default_rng(11)
    keys = [f"u{i}" for i in range(400)]
    emb = _embeddings(spark, keys, rng.normal(size=(400, 8)))
    labels = spark.createDataFrame([(k, float(y)) for k, y in zip(keys, rng.integers(0, 2, 400), strict=True)],
                                   f"{tb.USER_ID} string, _label double")
    result = pr.probe(emb, labels, tb.USER_ID, ("a", "b"), folds=3, seed=5)
    assert abs(result.auc - 0.5) < 0.1
    assert abs(result.accuracy - result.majority_accuracy) < 0.1
    assert result.n == 400 and result.auc_std >= 0


def test_a_multi_class_target_against_its_majority(spark):
    """Three classes of 150, 90 and 60 users, each one-hot in the embedding: labels are numbered by
    frequency (the majority class is 0), and the probe beats the 0.5 of always answering it."""
    sizes = {3: 90, 5: 150, 7: 60}  # vocabulary index -> users
    values = [v for v, n in sizes.items() for _ in range(n)]
    keys = [f"u{i}" for i in range(len(values))]
    hot = {3: [1, 0, 0], 5: [0, 1, 0], 7: [0, 0, 1]}
    rng = np.random.default_rng(2)
    emb = _embeddings(spark, keys, np.array([hot[v] for v in values]) * 2 + rng.normal(0, 0.5, (len(values), 3)))
    features = spark.createDataFrame([(k, i, v) for i, (k, v) in enumerate(zip(keys, values, strict=True))],
                                     f"{tb.USER_ID} string, {tb.USER_IDX} int, colour int")
    vocab = Vocabulary({"colour": {"red": 3, "green": 5, "blue": 7}})
    labels, classes, target = pr.target_labels(features, "user", "colour", vocab)
    assert classes == ("green", "red", "blue") and target == "colour"
    result = pr.probe(emb, labels, tb.USER_ID, classes, target=target, folds=3)
    assert result.auc is None and result.majority_accuracy == pytest.approx(0.5)
    assert result.accuracy > 0.9


@pytest.mark.parametrize("argv, message", [
    (["--target", "age"], r"user target 'age' is not a column of silver/user_features \(ages are bucketed .*"
                          r"age_bucket\); choose from .*activity_view"),
    (["--target", "favourite_category", "--entity", "item"], r"item target 'favourite_category' is not a column "
                                                              r"of silver/item_features; choose from .*category"),
    (["--target", FIELD, "--positive", "lots"], rf"'lots' is not a value of {FIELD}; its values: 0, 1, "),
    (["--target", FIELD, "--folds", "1"], r"--folds must be 2 or more, got 1"),
    (["--target", "user_idx"], r"user target 'user_idx' is not a column"),
    (["--target", "x'; DROP"], r"target column .* is not a plain name"),
    (["--target", FIELD, "--model", "itemknn"], r"no user embeddings of itemknn for run date 2026-01-02 in "
                                                r"gold/user_embeddings \(models with some that day: als\): run"),
    (["--target", FIELD, "--model", "alss"], r"unknown model 'alss'; choose from"),
    (["--target", "category", "--entity", "item"], r"table gold/item_embeddings not found under .*: run "
                                                    r"`recsys-spark train` first"),
])
def test_mistakes_stop_in_one_line(world, planted, capsys, argv, message):
    config, _, _, _ = planted
    base = {"--model": MODEL, "--warehouse": config.warehouse, "--run-date": world.run.run_date.isoformat()}
    given = dict(zip(argv[::2], argv[1::2], strict=True))
    full = ["probe", *[x for key, value in {**base, **given}.items() for x in (key, value)]]
    code = main(full)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and re.search(message, err[-1]), err


def test_targets_that_are_not_class_labels_are_refused(spark):
    vocab = Vocabulary({})
    ids = spark.createDataFrame([(f"u{i}", i, i + 1, i / 3.0, 1) for i in range(80)],
                                f"{tb.USER_ID} string, {tb.USER_IDX} int, zip int, age double, one int")
    with pytest.raises(RecsysError, match=r"user target 'zip' has more than 64 values: .*bucket it"):
        pr.target_labels(ids, "user", "zip", vocab)
    with pytest.raises(RecsysError, match=r"user target 'age' is a double column, not a categorical field"):
        pr.target_labels(ids, "user", "age", vocab)
    with pytest.raises(RecsysError, match=r"user target 'one' has 1 known value\(s\)"):
        pr.target_labels(ids, "user", "one", vocab)
    emb = _embeddings(spark, [f"u{i}" for i in range(6)], np.eye(6))
    thin = spark.createDataFrame([(f"u{i}", float(i == 0)) for i in range(6)], f"{tb.USER_ID} string, _label double")
    with pytest.raises(RecsysError, match=r"class\(es\) \[\('b', 1\)\] have fewer rows than the 3 folds, which "
                                          r"leaves fewer than two classes"):
        pr.probe(emb, thin, tb.USER_ID, ("a", "b"), folds=3)
    with pytest.raises(RecsysError, match="unknown entity 'session'"):
        pr.check_entity("session")
