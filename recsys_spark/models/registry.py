"""Model names -> their classes, and what each needs to run before it: the one list of models.

A model is a module under ``recsys_spark.models`` with a ``Recommender`` subclass; its line here names
the class (imported only when the model is used, as RecBole's ``get_model`` does) and declares what the
pipeline and the Airflow DAG must run first:

- ``features``: it reads ``silver/user_features`` and ``silver/item_features``, so the ``features`` step
  runs before it trains;
- ``reranks``: the name of its hyper-parameter that may name another model whose rows of
  ``gold/recommendations`` it re-ranks, so that model recommends first;
- ``fold_in``: it can give users its fit never saw factors without a refit (``fold_in_users``), so
  ``recommend --fold-in`` serves new users from the latest saved model, and the DAG may refit it only
  every ``refit_every_days`` days and fold in between.

This module imports nothing heavier than the configuration: the DAG reads it in Airflow's own
environment, which has neither Spark nor torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recsys_spark.config import PipelineConfig, model_config
from recsys_spark.errors import ConfigError, RecsysError

if TYPE_CHECKING:
    from recsys_spark.models.base import Recommender


@dataclass(frozen=True)
class Entry:
    """One model: ``module:Class`` of its Recommender, and what must run before it."""

    target: str
    features: bool = False
    reranks: str | None = None
    fold_in: bool = False


MODELS: dict[str, Entry] = {
    "popularity": Entry("recsys_spark.models.popularity:PopularityRecommender"),
    "itemknn": Entry("recsys_spark.models.itemknn:ItemKNNRecommender"),
    "als": Entry("recsys_spark.models.als:ALSRecommender", fold_in=True),
    "als_cg": Entry("recsys_spark.models.als:ALSCGRecommender", fold_in=True),
    "svd": Entry("recsys_spark.models.svd:SVDRecommender"),
    "ease": Entry("recsys_spark.models.ease:EASERecommender"),
    "item2vec": Entry("recsys_spark.models.item2vec:Item2VecRecommender"),
    "ncf": Entry("recsys_spark.models.ncf:NCFRecommender"),
    "sasrec": Entry("recsys_spark.models.sasrec:SASRecRecommender"),
    "gru4rec": Entry("recsys_spark.models.gru4rec:GRU4RecRecommender"),
    "deepfm": Entry("recsys_spark.models.deepfm:DeepFMRecommender", features=True, reranks="candidates"),
    "widedeep": Entry("recsys_spark.models.widedeep:WideDeepRecommender", features=True, reranks="candidates"),
    "dcn": Entry("recsys_spark.models.dcn:DCNRecommender", features=True, reranks="candidates"),
    "two_tower": Entry("recsys_spark.models.two_tower:TwoTowerRecommender", features=True),
    "multvae": Entry("recsys_spark.models.multvae:MultVAERecommender", fold_in=True),
    "twostage": Entry("recsys_spark.models.twostage:TwoStageRecommender", features=True),
    "lightfm": Entry("recsys_spark.models.lightfm:LightFMRecommender", features=True),
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


def check_config(config: PipelineConfig) -> None:
    """Validate the whole configuration's model side now: ``models`` and every ``model_params`` entry
    (each ``conf/models/*.yaml`` is one) against that model's own schema, and a re-ranker's input model.

    Why here: ``load_config`` validates pipeline.yaml but cannot validate a model's parameters, because
    their schemas live in the model modules and ``recsys_spark.config`` sits below them (the models
    import it; the Airflow DAG loads the configuration without Spark or torch installed). The registry
    is the one place that already maps a name to its module, so it looks the schemas up, importing
    downwards only. The CLI calls this right after ``load_config``, before any Spark session starts, so
    a bad key in conf/models/x.yaml stops every command at once, not when (or if) x is trained.
    Raises ``ConfigError`` with one line naming the dotted key.
    """
    unknown = [name for name in config.models if name not in MODELS]
    if unknown:
        raise ConfigError(f"invalid configuration: models: unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    for name in config.model_params:
        if name not in MODELS:
            raise ConfigError(f"invalid configuration: model_params.{name}: unknown model {name!r}; "
                              f"choose from {sorted(MODELS)}")
        model_config(config, name, model_class(name).params_class)
        other = upstream(name, config.model_params[name])
        if other is not None and other not in MODELS:
            raise ConfigError(f"invalid configuration: model_params.{name}.{entry(name).reranks}: unknown model "
                              f"{other!r}; choose from {sorted(MODELS)}")


def load(name: str, spark: Any, path: str) -> Recommender:
    """A fitted model saved by ``save(path)``."""
    return model_class(name).load(spark, path)


def need_features(models: Iterable[str]) -> list[str]:
    """The models among ``models`` that read the feature tables."""
    return [name for name in models if entry(name).features]


def can_fold_in(models: Iterable[str]) -> list[str]:
    """The models among ``models`` that fold in users their fit never saw."""
    return [name for name in models if entry(name).fold_in]


def require_fold_in(name: str, why: str = "--fold-in") -> None:
    """A one-line error unless ``name`` folds in new users (``why``: what asked for it)."""
    if not entry(name).fold_in:
        raise RecsysError(f"model {name} cannot fold in users it was not fitted on, which {why} needs; "
                          f"models that can: {can_fold_in(MODELS)}")


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
