"""Model names -> (Recommender class, hyper-parameter schema): how the pipeline builds and loads models."""

from __future__ import annotations

from pyspark.sql import SparkSession

from recsys_spark.config import PipelineConfig, Section, model_config
from recsys_spark.errors import RecsysError
from recsys_spark.models.als import ALSParams, ALSRecommender
from recsys_spark.models.base import Recommender
from recsys_spark.models.deep import (
    DeepFMModelParams,
    DeepFMRecommender,
    GRU4RecModelParams,
    GRU4RecRecommender,
    NCFModelParams,
    NCFRecommender,
    SASRecModelParams,
    SASRecRecommender,
)
from recsys_spark.models.itemknn import ItemKNNParams, ItemKNNRecommender
from recsys_spark.models.popularity import PopularityParams, PopularityRecommender

MODELS: dict[str, tuple[type[Recommender], type[Section]]] = {
    ALSRecommender.name: (ALSRecommender, ALSParams),
    ItemKNNRecommender.name: (ItemKNNRecommender, ItemKNNParams),
    PopularityRecommender.name: (PopularityRecommender, PopularityParams),
    NCFRecommender.name: (NCFRecommender, NCFModelParams),
    SASRecRecommender.name: (SASRecRecommender, SASRecModelParams),
    GRU4RecRecommender.name: (GRU4RecRecommender, GRU4RecModelParams),
    DeepFMRecommender.name: (DeepFMRecommender, DeepFMModelParams),
}


def _entry(name: str) -> tuple[type[Recommender], type[Section]]:
    if name not in MODELS:
        raise RecsysError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]


def build(name: str, config: PipelineConfig) -> Recommender:
    """An unfitted model with its hyper-parameters from ``config.model_params[name]``, validated."""
    cls, schema = _entry(name)
    return cls(model_config(config, name, schema))


def load(name: str, spark: SparkSession, path: str) -> Recommender:
    """A fitted model saved by ``save(path)``."""
    cls, _ = _entry(name)
    return cls.load(spark, path)
