"""Model names -> their classes, and what each needs to run before it: the one list of models.

A model is a module under ``recsys_spark.models`` with a ``Recommender`` subclass; its line here names
the class (imported only when the model is used, as RecBole's ``get_model`` does) and declares what the
pipeline and the Airflow DAG must run first:

- ``features``: it reads ``silver/user_features`` and ``silver/item_features``, so the ``features`` step
  runs before it trains;
- ``reranks``: the name of its hyper-parameter that may name another model whose rows of
  ``gold/recommendations`` it re-ranks, so that model recommends first.

This module imports nothing heavier than the configuration: the DAG reads it in Airflow's own
environment, which has neither Spark nor torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recsys_spark.config import PipelineConfig, model_config
from recsys_spark.errors import RecsysError

if TYPE_CHECKING:
    from recsys_spark.models.base import Recommender


@dataclass(frozen=True)
class Entry:
    """One model: ``module:Class`` of its Recommender, and what must run before it."""

    target: str
    features: bool = False
    reranks: str | None = None


MODELS: dict[str, Entry] = {
    "popularity": Entry("recsys_spark.models.popularity:PopularityRecommender"),
    "itemknn": Entry("recsys_spark.models.itemknn:ItemKNNRecommender"),
    "als": Entry("recsys_spark.models.als:ALSRecommender"),
    "ncf": Entry("recsys_spark.models.ncf:NCFRecommender"),
    "sasrec": Entry("recsys_spark.models.sasrec:SASRecRecommender"),
    "gru4rec": Entry("recsys_spark.models.gru4rec:GRU4RecRecommender"),
    "deepfm": Entry("recsys_spark.models.deepfm:DeepFMRecommender", features=True, reranks="candidates"),
}


def entry(name: str) -> Entry:
    if name not in MODELS:
        raise RecsysError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]


def model_class(name: str) -> type[Recommender]:
    """The Recommender class of ``name`` (its module is imported now)."""
    module, _, cls = entry(name).target.partition(":")
    return getattr(importlib.import_module(module), cls)


def build(name: str, config: PipelineConfig) -> Recommender:
    """An unfitted model with its hyper-parameters from ``config.model_params[name]``, validated."""
    cls = model_class(name)
    return cls(model_config(config, name, cls.params_class))


def load(name: str, spark: Any, path: str) -> Recommender:
    """A fitted model saved by ``save(path)``."""
    return model_class(name).load(spark, path)


def need_features(models: Iterable[str]) -> list[str]:
    """The models among ``models`` that read the feature tables."""
    return [name for name in models if entry(name).features]


def upstream(name: str, params: Mapping[str, Any]) -> str | None:
    """The model whose recommendations ``name`` re-ranks with these (raw) hyper-parameters, or None."""
    key = entry(name).reranks
    value = params.get(key) if key else None
    return None if value is None else str(value)


def recommend_order(models: Iterable[str], model_params: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``models`` with every re-ranking model after the model it re-ranks (otherwise in the given order).
    A re-ranked model that is not among ``models`` is left to the run (it may have recommended earlier);
    a cycle is an error."""
    models = list(models)
    after = {m: upstream(m, model_params.get(m, {})) for m in models}
    ordered: list[str] = []

    def place(model: str, path: tuple[str, ...]) -> None:
        if model in ordered:
            return
        if model in path:
            raise RecsysError(f"models re-rank each other in a cycle: {' -> '.join((*path, model))}")
        first = after[model]
        if first in after:
            place(first, (*path, model))
        ordered.append(model)

    for model in models:
        place(model, ())
    return ordered
