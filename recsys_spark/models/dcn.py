"""DCN (Wang et al. 2017): a cross network of explicit, bounded-degree feature crosses beside an MLP, over
the stacked field embeddings; DCN-V2's matrix cross layer (Wang et al. 2021) as ``net.cross: matrix``.

The network is ``recsys_spark.nn.dcn``. Its input, training task (sampled negatives by swapping the item
block, id dropout for cold users and items) and scoring (the whole catalogue, or re-ranking another
model's ``candidates``) are those of every field model: ``recsys_spark.models.field_base``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from recsys_spark.data.feature_spec import FeatureSpec
from recsys_spark.models.field_base import FieldNetParams, FieldParams, FieldRecommender, FieldTask
from recsys_spark.nn.dcn import DCN


class DCNNetParams(FieldNetParams):
    """DCN (Wang et al. 2017). The paper tunes 1-6 cross layers and 2-5 deep layers of 32-1024 units on
    Criteo; 3 cross layers (degree-4 polynomials of x_0) and DeepFM's tower are the defaults here."""

    dim: int = Field(32, gt=0, description="embedding size k of every field; x_0 is fields x k wide")
    cross_layers: int = Field(3, ge=0, description="cross layers L: x_L crosses x_0's features up to degree L + 1")
    cross: Literal["vector", "matrix"] = Field(
        "vector", description="vector: x_0 x_l^T w_l + b_l + x_l (DCN); matrix: x_0 * (W_l x_l + b_l) + x_l (DCN-V2)")

    def network_kwargs(self, spec: FeatureSpec) -> dict[str, Any]:
        return {**super().network_kwargs(spec), "cross_layers": self.cross_layers, "cross": self.cross}


class DCNTask(FieldTask):
    """DCN on (user_idx, item_idx, fields) positives, n sampled negatives per positive, BCE (or BPR)."""

    network = DCN


class DCNParams(FieldParams):
    """DCN over the feature tables; ``candidates``: re-rank that model's top ``candidates_k`` (see
    ``FieldParams``)."""

    net: DCNNetParams = DCNNetParams()


class DCNRecommender(FieldRecommender):
    """DCN (Wang et al. 2017) on user and item features, trained on the train pairs with sampled negatives
    (``DCNTask``); reading, cold users, candidates and persistence: ``FieldRecommender``."""

    name = "dcn"
    network = DCN
    params_class = DCNParams
    task_class = DCNTask
