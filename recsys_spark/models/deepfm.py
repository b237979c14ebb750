"""DeepFM (Guo et al. 2017): an FM and an MLP over shared field embeddings, on user and item features.

The network is ``recsys_spark.nn.deepfm``. Its input, training task (sampled negatives by swapping the
item block, id dropout for cold users and items) and scoring (the whole catalogue, or re-ranking another
model's ``candidates``) are those of every field model: ``recsys_spark.models.field_base``.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from recsys_spark.models.field_base import (
    CANDIDATES,
    ITEM_FIELDS_FILE,
    MAX_PAIRS,
    FieldNetParams,
    FieldParams,
    FieldRecommender,
    FieldTask,
    score_candidates,
    score_catalogue,
)
from recsys_spark.nn.deepfm import DeepFM

# Re-exported: the scoring helpers and file names were defined here before field_base existed.
__all__ = ["CANDIDATES", "ITEM_FIELDS_FILE", "MAX_PAIRS", "DeepFMNetParams", "DeepFMParams", "DeepFMRecommender",
           "DeepFMTask", "score_candidates", "score_catalogue"]


class DeepFMNetParams(FieldNetParams):
    """DeepFM (Guo et al. 2017). The paper's network: 3 ReLU layers of 200-400 units, embedding size 10,
    dropout 0.5 on Criteo; on data the size of MovieLens-100K a smaller tower overfits less."""

    dim: int = Field(64, gt=0, description="embedding size k, shared by FM and the deep part")

    removed_keys: ClassVar[dict[str, str]] = {
        key: f"DeepFM trains with train.{key}" for key in ("lr", "weight_decay", "batch_size", "epochs")}


class DeepFMTask(FieldTask):
    """DeepFM on (user_idx, item_idx, fields) positives, n sampled negatives per positive, BCE (or BPR)."""

    network = DeepFM


class DeepFMParams(FieldParams):
    """DeepFM over the feature tables; ``candidates``: re-rank that model's top ``candidates_k`` (see
    ``FieldParams``)."""

    net: DeepFMNetParams = DeepFMNetParams()


class DeepFMRecommender(FieldRecommender):
    """DeepFM (Guo et al. 2017) on user and item features, trained on the train pairs with sampled
    negatives (``DeepFMTask``); reading, cold users, candidates and persistence: ``FieldRecommender``."""

    name = "deepfm"
    network = DeepFM
    params_class = DeepFMParams
    task_class = DeepFMTask
