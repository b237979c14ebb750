"""Embedding probes: how much of a user (or item) attribute a model's embeddings carry.

The question a probe answers is the one of the SASRec user-embedding slide: given only a model's learned
vector of a user, can a *linear* classifier tell the user's gender, age group or favourite category? A
probe is Spark MLlib's ``LogisticRegression`` (multinomial when the target has more than two classes,
features standardised by MLlib, L2 penalty ``reg_param``) fitted on ``gold/user_embeddings`` (or
``gold/item_embeddings``) joined to one column of ``silver/user_features`` (or ``silver/item_features``).

Protocol, stated once:

- **Target.** A column of the feature table. Every feature there is categorical (the vocabulary index of
  a string value, ``recsys_spark.data.features``); numeric quantities are already bucketed with fixed
  edges when the table is built (MovieLens ages into MovieLens-1M's groups ``<18``, ``18-24``, ``25-34``,
  ``35-44``, ``45-49``, ``50-55``, ``56+``: the column ``age_bucket``). Rows whose value is unknown or
  missing (index 0) are left out. Classes are numbered by frequency, so class 0 is the majority class.
  ``positive`` turns the target into one value against all the others (a binary probe, with AUC).
  A target with more than ``MAX_CLASSES`` values is refused: it is an id or an unbucketed number.
- **Folds.** ``folds``-fold cross-validation, stratified by class and seeded: within each class, rows
  are ordered by ``xxhash64(key, seed)`` and dealt to the folds in turn, so the split depends on the ids
  and the seed only (not on partitioning), and every fold holds every class. A class with fewer rows
  than folds cannot, and is left out (named in the result and by the CLI).
- **Scores**, each the mean over the folds of the held-out fold's value (with its standard deviation
  over folds): accuracy; AUC (area under ROC) for binary targets only; and the **majority-class
  baseline's accuracy** (predict the training folds' most frequent class), the number a probe has to
  beat to show the embedding knows anything.

In ``gold/metrics`` a probe's rows have split ``probe``, ``k`` 0 (no cut-off) and metric
``probe_<stat>.<entity>.<target>`` (``<target>=<value>`` for a binary ``positive`` probe), e.g.
``probe_auc.user.gender``, ``probe_majority_accuracy.user.age_bucket``; :func:`metric_name` builds and
:func:`parse_metric` reads them. Stats: ``auc``, ``auc_std`` (binary only), ``accuracy``, ``accuracy_std``,
``majority_accuracy``, ``n`` (rows probed), ``classes``, ``folds``.

Examples
--------
>>> labels, classes = target_labels(features, tb.USER_ID, "gender", vocab)   # doctest: +SKIP
>>> probe(embeddings, labels, tb.USER_ID, classes, folds=5).accuracy          # doctest: +SKIP
0.74
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.evaluation import BinaryClassificationEvaluator, MulticlassClassificationEvaluator
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark import tables as tb
from recsys_spark.data.features import UNKNOWN, Vocabulary
from recsys_spark.errors import RecsysError

log = logging.getLogger(__name__)

PROBE_SPLIT = "probe"  # the split column of a probe's rows in gold/metrics: its own protocol
MAX_CLASSES = 64       # more values than this: an id or an unbucketed number, not a class label

# What each entity is probed from and against: (embeddings table, feature table, id column, index column).
ENTITIES: dict[str, tuple[str, str, str, str]] = {
    "user": (tb.USER_EMBEDDINGS, tb.USER_FEATURES, tb.USER_ID, tb.USER_IDX),
    "item": (tb.ITEM_EMBEDDINGS, tb.ITEM_FEATURES, tb.ITEM_ID, tb.ITEM_IDX),
}

AUC, AUC_STD = "auc", "auc_std"
ACCURACY, ACCURACY_STD = "accuracy", "accuracy_std"
MAJORITY_ACCURACY = "majority_accuracy"
N_ROWS, N_CLASSES, N_FOLDS = "n", "classes", "folds"
STATS = (AUC, AUC_STD, ACCURACY, ACCURACY_STD, MAJORITY_ACCURACY, N_ROWS, N_CLASSES, N_FOLDS)
_PREFIX = "probe_"

# Hints for targets that are not columns of the feature tables but close to one.
_HINTS = {"age": "ages are bucketed when the features are built: use age_bucket"}

# Working columns, private to this module.
_LABEL = "_label"
_FEATURES = "_features"
_FOLD = "_fold"
_N = "_n"


def metric_name(stat: str, entity: str, target: str) -> str:
    """The gold/metrics name of one probe statistic, e.g. ``probe_auc.user.gender``."""
    return f"{_PREFIX}{stat}.{entity}.{target}"


def parse_metric(name: str) -> tuple[str, str, str] | None:
    """(stat, entity, target) of a probe's metric name; None for any other metric."""
    if not name.startswith(_PREFIX):
        return None
    parts = name[len(_PREFIX):].split(".", 2)
    if len(parts) != 3 or parts[0] not in STATS or parts[1] not in ENTITIES:
        return None
    return parts[0], parts[1], parts[2]


def check_entity(entity: str) -> tuple[str, str, str, str]:
    if entity not in ENTITIES:
        raise RecsysError(f"unknown entity {entity!r}; choose from {sorted(ENTITIES)}")
    return ENTITIES[entity]


@dataclass(frozen=True)
class ProbeResult:
    """A probe's cross-validated scores (means over the held-out folds) and what it was run on."""

    entity: str
    target: str             # the column, or ``column=value`` for a one-against-the-rest probe
    classes: tuple[str, ...]  # class names, majority first
    n: int                  # rows probed: entities with an embedding and a known target value
    folds: int
    accuracy: float
    accuracy_std: float
    majority_accuracy: float
    auc: float | None = None      # binary targets only
    auc_std: float | None = None
    dropped: tuple[str, ...] = ()  # classes left out: fewer rows than folds

    def rows(self) -> list[tuple[str, int, float]]:
        """(metric, k, value) rows for gold/metrics (k = 0: a probe has no cut-off)."""
        values = {ACCURACY: self.accuracy, ACCURACY_STD: self.accuracy_std,
                  MAJORITY_ACCURACY: self.majority_accuracy, N_ROWS: self.n, N_CLASSES: len(self.classes),
                  N_FOLDS: self.folds, AUC: self.auc, AUC_STD: self.auc_std}
        return [(metric_name(s, self.entity, self.target), 0, float(values[s])) for s in STATS
                if values[s] is not None]


def feature_fields(features: DataFrame, entity: str) -> list[str]:
    """The columns of a feature table that can be a probe's target (all but the id and the index)."""
    _, _, key, idx = check_entity(entity)
    return [c for c in features.columns if c not in (key, idx)]


def target_labels(features: DataFrame, entity: str, target: str, vocab: Vocabulary,
                  positive: str | None = None) -> tuple[DataFrame, tuple[str, ...], str]:
    """The probe's labels from a feature table: ``(frame of (key, _label double), class names, target name)``.

    ``features`` is ``silver/user_features`` or ``silver/item_features`` (vocabulary indices, 0 unknown);
    ``target`` one of its fields; ``positive`` a value of it to probe against the rest. Classes are
    numbered by frequency (ties: vocabulary order), so label 0 is the majority class. Collects one count
    per value of the field (at most its vocabulary's size), logged.
    """
    _, table, key, _ = check_entity(entity)
    fields = feature_fields(features, entity)
    if target not in fields:
        hint = f" ({_HINTS[target]})" if target in _HINTS else ""
        raise RecsysError(f"{entity} target {target!r} is not a column of {table}{hint}; choose from "
                          f"{', '.join(fields)}")
    dtype = features.schema[target].dataType
    if not isinstance(dtype, T.IntegralType):
        raise RecsysError(f"{entity} target {target!r} is a {dtype.simpleString()} column, not a categorical "
                          f"field: bucket it into classes first (as features.AGE_EDGES does for ages)")
    names = {i: v for v, i in vocab.index.get(target, {}).items()}
    known = features.select(key, F.col(target).alias(_LABEL)).filter(
        F.col(_LABEL).isNotNull() & (F.col(_LABEL) != UNKNOWN))
    if positive is not None:
        index = vocab.lookup(target, positive)
        if index == UNKNOWN:
            raise RecsysError(f"{positive!r} is not a value of {target}; its values: "
                              f"{', '.join(names[i] for i in sorted(names))}")
        binary = known.select(key, (F.col(_LABEL) == index).cast("int").alias(_LABEL))
        return _by_frequency(binary, key, {0: f"not {positive}", 1: positive}, f"{target}={positive}", entity)
    return _by_frequency(known, key, names, target, entity)


def _by_frequency(known: DataFrame, key: str, names: dict[int, str], target: str,
                  entity: str) -> tuple[DataFrame, tuple[str, ...], str]:
    counts = known.groupBy(_LABEL).count().orderBy(F.desc("count"), F.asc(_LABEL)).limit(MAX_CLASSES + 1).collect()
    log.info("collected the class counts of %s %s to the driver: %d classes", entity, target, len(counts))
    if len(counts) > MAX_CLASSES:
        raise RecsysError(f"{entity} target {target!r} has more than {MAX_CLASSES} values: it looks like an id or "
                          "an unbucketed number; bucket it into classes first")
    if len(counts) < 2:
        raise RecsysError(f"{entity} target {target!r} has {len(counts)} known value(s): a probe needs two "
                          "classes at least")
    order = [int(r[_LABEL]) for r in counts]
    relabel = F.create_map(*[F.lit(x) for i, value in enumerate(order) for x in (value, float(i))])
    labels = known.select(key, relabel[F.col(_LABEL)].alias(_LABEL))
    return labels, tuple(names.get(v, str(v)) for v in order), target


def probe(embeddings: DataFrame, labels: DataFrame, key: str, classes: tuple[str, ...], entity: str = "user",
          target: str = "target", folds: int = 5, seed: int = 0, reg_param: float = 0.01,
          max_iter: int = 100) -> ProbeResult:
    """Cross-validated logistic regression from ``embeddings`` (key, embedding array<float>) to ``labels``
    (key, _label double in 0..len(classes)-1, from :func:`target_labels`). See the module's protocol.

    Classes with fewer rows (among the entities with an embedding) than ``folds`` are left out and named
    in ``ProbeResult.dropped``; a one-line RecsysError when fewer than two classes are left.
    """
    if folds < 2:
        raise RecsysError(f"a probe needs 2 folds at least, got {folds}")
    tb.require_columns(embeddings, [key, tb.EMBEDDING], "the embeddings")
    joined = embeddings.select(key, array_to_vector(tb.EMBEDDING).alias(_FEATURES)).join(labels, key)
    sizes = dict(joined.groupBy(_LABEL).agg(F.count(F.lit(1)).alias(_N)).collect())
    if not sizes:
        raise RecsysError(f"no {entity} has both an embedding and a known {target}: nothing to probe")
    # Classes with fewer rows than folds cannot be in every fold: left out, and said so.
    kept = sorted((c for c in range(len(classes)) if sizes.get(float(c), 0) >= folds),
                  key=lambda c: (-sizes[float(c)], c))
    thin = [(classes[c], sizes.get(float(c), 0)) for c in range(len(classes)) if c not in kept]
    if len(kept) < 2:
        raise RecsysError(f"{entity} target {target!r}: class(es) {thin} have fewer rows than the {folds} folds, "
                          "which leaves fewer than two classes; probe with fewer folds or another --positive")
    if thin:
        log.warning("probe %s %s: classes %s left out, fewer rows than the %d folds", entity, target, thin, folds)
        relabel = F.create_map(*[F.lit(x) for i, c in enumerate(kept) for x in (float(c), float(i))])
        joined = joined.withColumn(_LABEL, relabel[F.col(_LABEL)]).filter(F.col(_LABEL).isNotNull())
    dropped = tuple(name for name, _ in thin)
    classes = tuple(classes[c] for c in kept)
    deal = Window.partitionBy(_LABEL).orderBy(F.xxhash64(F.col(key), F.lit(seed)), F.col(key))
    data = joined.withColumn(_FOLD, (F.row_number().over(deal) - 1) % folds).persist()
    try:
        # counts[fold, class]: the folds' class balance, for the majority baseline.
        counts = np.zeros((folds, len(classes)), dtype=np.int64)
        for row in data.groupBy(_FOLD, _LABEL).agg(F.count(F.lit(1)).alias(_N)).collect():
            counts[int(row[_FOLD]), int(row[_LABEL])] = row[_N]
        per_class = counts.sum(axis=0)
        binary = len(classes) == 2
        lr = LogisticRegression(featuresCol=_FEATURES, labelCol=_LABEL, regParam=reg_param, maxIter=max_iter,
                                family="binomial" if binary else "multinomial")
        accuracy_of = MulticlassClassificationEvaluator(labelCol=_LABEL, metricName="accuracy")
        auc_of = BinaryClassificationEvaluator(labelCol=_LABEL, rawPredictionCol="rawPrediction",
                                               metricName="areaUnderROC")
        accuracy, auc, majority = [], [], []
        for fold in range(folds):
            fitted = lr.fit(data.filter(F.col(_FOLD) != fold))
            held_out = fitted.transform(data.filter(F.col(_FOLD) == fold))
            accuracy.append(accuracy_of.evaluate(held_out))
            if binary:
                auc.append(auc_of.evaluate(held_out))
            train_counts = per_class - counts[fold]
            majority.append(counts[fold, int(np.argmax(train_counts))] / counts[fold].sum())
    finally:
        data.unpersist()

    def spread(values: list[float]) -> float:
        return float(np.std(values, ddof=1))

    result = ProbeResult(
        entity=entity, target=target, classes=classes, n=int(per_class.sum()), folds=folds, dropped=dropped,
        accuracy=float(np.mean(accuracy)), accuracy_std=spread(accuracy), majority_accuracy=float(np.mean(majority)),
        auc=float(np.mean(auc)) if binary else None, auc_std=spread(auc) if binary else None,
    )
    log.info("probe %s %s: accuracy %.4f (majority %.4f), auc %s over %d rows, %d folds", entity, target,
             result.accuracy, result.majority_accuracy, result.auc, result.n, folds)
    return result
