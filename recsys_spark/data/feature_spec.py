"""How the feature tables become a feature model's input: the field layout (:class:`FeatureSpec`), the
training rows (:func:`field_frame`), the query blocks of users (:func:`query_frame`) and the item block of
every item (:func:`item_field_matrix`).

One row of a model's ``fields`` input (array<int>) is the **query** block (the user's fields, then the
context fields) followed by the **item** block. Scoring one user against many items keeps the query
block and swaps the item block, so the catalogue's item blocks are computed once and kept in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.data.features import UNKNOWN, USER_EVENT_FIELDS, Vocabulary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSpec:
    """The fields a feature model is built from, in the order of its ``fields`` input.

    Layout of one row of ``fields`` (array<int>): the **query** block, ``user_fields`` then
    ``context_fields``, then the **item** block, ``item_fields``. Scoring a user against many items keeps
    the query block and swaps the item block. With ``include_ids``, the first user field is ``user_idx``
    and the first item field ``item_idx``, encoded as ``idx + 1`` (0 = an id the model has not seen: a
    cold user or item). ``cardinalities[f]`` is field f's embedding rows (largest index + 1).
    ``numeric`` names float inputs (none are built here: numeric quantities are bucketed; the model
    accepts them for callers that have some).
    """

    user_fields: tuple[str, ...]
    item_fields: tuple[str, ...]
    context_fields: tuple[str, ...] = ()
    cardinalities: dict[str, int] = field(default_factory=dict)
    numeric: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = self.fields
        if len(set(names)) != len(names):
            raise ValueError(f"field names must be distinct, got {names}")
        missing = [f for f in names if f not in self.cardinalities]
        if missing:
            raise ValueError(f"no cardinality for fields {missing}")
        if not self.item_fields:
            raise ValueError("a feature spec needs at least one item field")

    @property
    def query_fields(self) -> tuple[str, ...]:
        return (*self.user_fields, *self.context_fields)

    @property
    def fields(self) -> tuple[str, ...]:
        return (*self.query_fields, *self.item_fields)

    @property
    def n_query(self) -> int:
        return len(self.query_fields)

    @property
    def sizes(self) -> list[int]:
        """Cardinalities in ``fields`` order: the feature network's constructor argument."""
        return [self.cardinalities[f] for f in self.fields]

    @property
    def history_fields(self) -> tuple[str, ...]:
        """The user fields a user the model never trained on reads as unknown: the id and the fields
        that grow with use. Id dropout blanks the same ones, so cold users are what training saw."""
        return tuple(f for f in self.user_fields if f == tb.USER_IDX or f in USER_EVENT_FIELDS)

    def positions(self, names: Sequence[str]) -> list[int]:
        """Positions of ``names`` (those present) in ``fields``."""
        wanted = set(names)
        return [i for i, f in enumerate(self.fields) if f in wanted]

    def to_dict(self) -> dict[str, Any]:
        return {"user_fields": list(self.user_fields), "item_fields": list(self.item_fields),
                "context_fields": list(self.context_fields), "cardinalities": dict(self.cardinalities),
                "numeric": list(self.numeric)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        return cls(tuple(data["user_fields"]), tuple(data["item_fields"]), tuple(data.get("context_fields", ())),
                   {k: int(v) for k, v in data["cardinalities"].items()}, tuple(data.get("numeric", ())))

    @classmethod
    def build(cls, vocab: Vocabulary, user_fields: Sequence[str], item_fields: Sequence[str],
              context_fields: Sequence[str] = (), n_users: int | None = None,
              n_items: int | None = None) -> FeatureSpec:
        """A spec from the vocabulary; ``n_users``/``n_items`` add the id fields (``idx + 1``, 0 = unseen)."""
        users = ([tb.USER_IDX] if n_users is not None else []) + list(user_fields)
        items = ([tb.ITEM_IDX] if n_items is not None else []) + list(item_fields)
        cards = {f: vocab.cardinality(f) for f in [*user_fields, *item_fields, *context_fields]}
        if n_users is not None:
            cards[tb.USER_IDX] = n_users + 1
        if n_items is not None:
            cards[tb.ITEM_IDX] = n_items + 1
        return cls(tuple(users), tuple(items), tuple(context_fields), cards)


def load_feature_spec(spark: SparkSession, warehouse: str, include_ids: bool = True,
                      context_fields: Sequence[str] = ()) -> FeatureSpec:
    """The spec of the feature tables in ``warehouse``: every field column of ``silver/user_features`` and
    ``silver/item_features``, plus the id fields sized from the index tables when ``include_ids``."""
    vocab = Vocabulary.read(spark, warehouse)
    user_cols = tb.read(spark, warehouse, tb.USER_FEATURES).columns
    item_cols = tb.read(spark, warehouse, tb.ITEM_FEATURES).columns
    n_users = n_items = None
    if include_ids:
        n_users = _index_size(spark, warehouse, tb.USER_INDEX, tb.USER_IDX)
        n_items = _index_size(spark, warehouse, tb.ITEM_INDEX, tb.ITEM_IDX)
    return FeatureSpec.build(
        vocab,
        [c for c in user_cols if c not in (tb.USER_ID, tb.USER_IDX)],
        [c for c in item_cols if c not in (tb.ITEM_ID, tb.ITEM_IDX)],
        context_fields, n_users, n_items,
    )


def _index_size(spark: SparkSession, warehouse: str, table: str, idx_col: str) -> int:
    top = tb.read(spark, warehouse, table).agg(F.max(idx_col)).first()[0]
    return 0 if top is None else int(top) + 1


def _field_value(name: str) -> Column:
    """A field's encoded value in a joined frame: ids become ``idx + 1`` (0 when null)."""
    if name in (tb.USER_IDX, tb.ITEM_IDX):
        return F.coalesce(F.col(name) + 1, F.lit(UNKNOWN)).cast("int")
    return F.coalesce(F.col(name), F.lit(UNKNOWN)).cast("int")


def assemble(names: Sequence[str]) -> Column:
    """The ``fields`` array<int> of ``names`` from a frame holding those encoded columns."""
    return F.array(*[_field_value(n) for n in names]).alias(tb.FIELDS)


def field_frame(pairs: DataFrame, user_features: DataFrame, item_features: DataFrame,
                 spec: FeatureSpec) -> DataFrame:
    """Training rows of a feature model: (user_idx, item_idx, fields array<int> in ``spec.fields`` order).

    ``pairs`` holds (user_idx, item_idx) positives, e.g. ``silver/train``, plus the encoded context
    fields when the spec has any. Pairs whose user or item has no feature row are dropped.
    """
    users = user_features.filter(F.col(tb.USER_IDX).isNotNull()).drop(tb.USER_ID)
    items = item_features.filter(F.col(tb.ITEM_IDX).isNotNull()).drop(tb.ITEM_ID)
    keep = [tb.USER_IDX, tb.ITEM_IDX, *spec.context_fields]
    joined = pairs.select(*keep).join(users, tb.USER_IDX).join(items, tb.ITEM_IDX)
    return joined.select(tb.USER_IDX, tb.ITEM_IDX, assemble(spec.fields))


def query_frame(user_features: DataFrame, spec: FeatureSpec) -> DataFrame:
    """Per user (cold ones included): (user_id, user_idx, fields) with the user block of ``spec`` (no
    context): the query block a feature model ranks items for."""
    return user_features.select(tb.USER_ID, tb.USER_IDX, assemble(spec.user_fields))


def item_field_matrix(item_features: DataFrame, spec: FeatureSpec, n_items: int) -> np.ndarray:
    """The item block of every indexed item: int64 [n_items, len(item_fields)], row ``item_idx``, collected
    to the driver (small: a few ints per item) for a feature model's negatives and scoring."""
    rows = (
        item_features.filter(F.col(tb.ITEM_IDX).isNotNull())
        .select(tb.ITEM_IDX, assemble(spec.item_fields))
        .collect()
    )
    log.info("collected the item feature matrix to the driver: %d items x %d fields", len(rows),
             len(spec.item_fields))
    matrix = np.full((n_items, len(spec.item_fields)), UNKNOWN, dtype=np.int64)
    for row in rows:
        if 0 <= row[0] < n_items:
            matrix[row[0]] = row[1]
    if tb.ITEM_IDX in spec.item_fields:  # items without a feature row still know their own id
        matrix[:, spec.item_fields.index(tb.ITEM_IDX)] = np.arange(1, n_items + 1)
    return matrix
