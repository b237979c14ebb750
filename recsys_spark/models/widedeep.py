"""Wide&Deep (Cheng et al. 2016): a linear model over the sparse fields and chosen cross-products of them
(memorisation), trained jointly with an MLP over the field embeddings (generalisation).

The network is ``recsys_spark.nn.widedeep``. Its input, training task (sampled negatives by swapping the
item block, id dropout for cold users and items) and scoring (the whole catalogue, or re-ranking another
model's ``candidates``) are those of every field model: ``recsys_spark.models.field_base``.

The crosses are named by field, ``[query field, item field]`` pairs, each side a name or a glob
(``genre_*``: every MovieLens genre flag). The defaults are for MovieLens-100K's side features and why:

- ``user_idx x genre_*``: each user's own taste per genre, the memorisation the paper's
  AND(user_installed_app, impression_app) stands for, at a grain the train data fills (943 users x 19
  flags); user x item itself would only memorise pairs that are already seen and filtered out;
- ``occupation x genre_*``, ``age_bucket x genre_*``, ``gender x genre_*``: the demographic tastes that a
  cold user (id unknown, so its id crosses are inactive) is ranked by;
- ``favourite_category x category``: the same taste on event data with item categories (the synthetic
  log, Taobao).

A pattern that matches no field of the feature tables (no side files, another data set) is skipped, and
the skipped ones are logged when the model trains.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

from pydantic import Field, field_validator

from recsys_spark import tables as tb
from recsys_spark.data.feature_spec import FeatureSpec
from recsys_spark.models.field_base import FieldNetParams, FieldParams, FieldRecommender, FieldTask
from recsys_spark.nn.widedeep import WideDeep

log = logging.getLogger(__name__)

GENRES = f"{tb.GENRE_PREFIX}*"
DEFAULT_CROSSES = [[tb.USER_IDX, GENRES], [tb.OCCUPATION, GENRES], [tb.AGE_BUCKET, GENRES], [tb.GENDER, GENRES],
                   [tb.FAVOURITE_CATEGORY, tb.CATEGORY]]


def resolve_crosses(patterns: list[list[str]], spec: FeatureSpec) -> tuple[list[list[int]], list[list[str]]]:
    """(field positions [a, b] of every (query field, item field) pair the patterns match, in pattern
    order without repeats; the patterns that match none)."""
    positions = {name: i for i, name in enumerate(spec.fields)}
    pairs: list[list[int]] = []
    unmatched: list[list[str]] = []
    for left, right in patterns:
        found = [[positions[a], positions[b]] for a in fnmatch.filter(spec.query_fields, left)
                 for b in fnmatch.filter(spec.item_fields, right)]
        if not found:
            unmatched.append([left, right])
        pairs += [p for p in found if p not in pairs]
    return pairs, unmatched


class WideDeepNetParams(FieldNetParams):
    """Wide&Deep (Cheng et al. 2016). The paper: 32-dimensional embeddings, ReLU layers 1024-512-256; the
    smaller tower of DeepFM's defaults fits data the size of MovieLens-100K."""

    dim: int = Field(32, gt=0, description="embedding size k of every field (the deep part's input)")
    crosses: list[list[str]] = Field(
        default_factory=lambda: [list(c) for c in DEFAULT_CROSSES],
        description="[query field, item field] pairs (names or globs) whose value pairs get a wide weight")
    cross_buckets: int = Field(1 << 17, ge=2, description="hashed rows of the crosses' weights (row 0: inactive)")

    @field_validator("crosses")
    @classmethod
    def _pairs(cls, crosses: list[list[str]]) -> list[list[str]]:
        if any(len(pair) != 2 for pair in crosses):
            raise ValueError("each cross is a [query field, item field] pair")
        return crosses

    def network_kwargs(self, spec: FeatureSpec) -> dict[str, Any]:
        pairs, _ = resolve_crosses(self.crosses, spec)
        return {**super().network_kwargs(spec), "crosses": pairs, "cross_buckets": self.cross_buckets}


class WideDeepTask(FieldTask):
    """Wide&Deep on (user_idx, item_idx, fields) positives, n sampled negatives per positive, BCE (or BPR)."""

    network = WideDeep


class WideDeepParams(FieldParams):
    """Wide&Deep over the feature tables; ``candidates``: re-rank that model's top ``candidates_k`` (see
    ``FieldParams``)."""

    net: WideDeepNetParams = WideDeepNetParams()


class WideDeepRecommender(FieldRecommender):
    """Wide&Deep (Cheng et al. 2016) on user and item features, trained on the train pairs with sampled
    negatives (``WideDeepTask``); reading, cold users, candidates and persistence: ``FieldRecommender``."""

    name = "widedeep"
    network = WideDeep
    params_class = WideDeepParams
    task_class = WideDeepTask

    def _task(self, item_counts, holdout):
        pairs, unmatched = resolve_crosses(self.params.net.crosses, self.spec)
        if unmatched:
            log.warning("widedeep: crosses %s match no (query field, item field) of the feature tables: skipped",
                        unmatched)
        log.info("widedeep: %d crosses in the wide part: %s", len(pairs),
                 [(self.spec.fields[a], self.spec.fields[b]) for a, b in pairs])
        return super()._task(item_counts, holdout)
