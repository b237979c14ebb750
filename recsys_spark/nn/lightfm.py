"""LightFM (Kula 2015, "Metadata Embeddings for User and Item Cold-start Recommendations"): users and
items as the sums of their features' embeddings.

Input: a user block ``user_fields`` [B, Fu] and an item block ``item_fields`` [B, Fi] of encoded
categorical fields (``recsys_spark.data.features``: index 0 = unknown or missing in every field; the
identity feature, when present, is one more field: ``idx + 1``, 0 = an id the model never trained on).
Values at or past a field's cardinality (a vocabulary grown after the model was built) read as 0.

Each field f has its own rows in one stacked table: value x of field f is row ``offsets[f] + x``, with an
embedding e ∈ R^d and a bias b. A user's *active* features are its fields with a known value (x ≠ 0);
unknown values contribute nothing, as an absent column of LightFM's feature matrix does. With F_u and
F_i the active features of user u and item i (the paper's eq. 1-3)::

    p_u = Σ_{j ∈ F_u} e^U_j      q_i = Σ_{j ∈ F_i} e^I_j          (latent vectors, R^d)
    b_u = Σ_{j ∈ F_u} b^U_j      b_i = Σ_{j ∈ F_i} b^I_j          (biases)
    f(u, i) = <p_u, q_i> + b_u + b_i

so a user or item the model never trained on (identity unknown) is scored from its other features
alone: cold start is the same formula, not a special case. With only the identity features this is
matrix factorisation with biases.

For dot-product serving (``recsys_spark.scoring.top_k_from_factors``) the biases fold into two extra
dimensions: ``user_vectors`` gives ``[p_u, b_u, 1]`` and ``item_vectors`` gives ``[q_i, 1, b_i]`` (R^{d+2}),
whose dot product is exactly f(u, i).

Initialisation as LightFM's: embeddings uniform in [-0.5/d, 0.5/d), biases 0. ``init_kwargs`` holds the
constructor arguments (JSON), so a checkpoint is ``state_dict`` + ``init_kwargs``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class _FeatureSum(nn.Module):
    """One side (users or items): fields [*, F] -> (Σ active embeddings [*, d], Σ active biases [*])."""

    def __init__(self, cardinalities: Sequence[int], dim: int) -> None:
        super().__init__()
        if not cardinalities or min(cardinalities) < 1:
            raise ValueError(f"need at least one field, each of cardinality >= 1, got {list(cardinalities)}")
        offsets = torch.tensor([0, *cardinalities[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)  # [F]
        self.register_buffer("sizes", torch.tensor(list(cardinalities)), persistent=False)  # [F]
        self.n_fields = len(cardinalities)
        total = sum(cardinalities)
        self.embedding = nn.Embedding(total, dim)  # e_j, every feature of every field
        self.bias = nn.Embedding(total, 1)  # b_j
        nn.init.uniform_(self.embedding.weight, -0.5 / dim, 0.5 / dim)
        nn.init.zeros_(self.bias.weight)

    def forward(self, fields: Tensor) -> tuple[Tensor, Tensor]:
        if fields.shape[-1] != self.n_fields:
            raise ValueError(f"expected {self.n_fields} fields, got {fields.shape[-1]}")
        fields = fields.long()
        known = (fields > 0) & (fields < self.sizes)  # [*, F]: active features (0 and unseen values: none)
        rows = torch.where(known, fields, 0) + self.offsets  # [*, F]
        active = known.unsqueeze(-1).to(self.embedding.weight.dtype)  # [*, F, 1]
        vector = (self.embedding(rows) * active).sum(-2)  # [*, F, d] -> [*, d]
        bias = (self.bias(rows) * active).sum((-2, -1))  # [*, F, 1] -> [*]
        return vector, bias


class LightFM(nn.Module):
    """f(u, i) = <p_u, q_i> + b_u + b_i over user and item feature fields (see the module docstring)."""

    def __init__(self, user_cardinalities: Sequence[int], item_cardinalities: Sequence[int], dim: int = 64) -> None:
        super().__init__()
        self.init_kwargs = {"user_cardinalities": [int(c) for c in user_cardinalities],
                            "item_cardinalities": [int(c) for c in item_cardinalities], "dim": int(dim)}
        self.dim = int(dim)
        self.users = _FeatureSum(self.init_kwargs["user_cardinalities"], self.dim)
        self.items = _FeatureSum(self.init_kwargs["item_cardinalities"], self.dim)

    def forward(self, user_fields: Tensor, item_fields: Tensor, candidates: Tensor | None = None) -> Tensor:
        """user_fields [*, Fu], item_fields [*, Fi] (broadcastable leading dims) -> f(u, i) [*].

        With ``candidates`` [B, K] (rows of ``item_fields``, then a table [C, Fi]) and user_fields [B, Fu]:
        f of each user and its K candidates [B, K], embedding each distinct candidate once (a training
        batch repeats items: about 5x fewer embedding rows than embedding every [B, K] pair's fields)."""
        p, b_u = self.users(user_fields)  # [*, d], [*]
        if candidates is None:
            q, b_i = self.items(item_fields)  # [*, d], [*]
            return (p * q).sum(-1) + b_u + b_i
        distinct, at = candidates.unique(return_inverse=True)  # [c], [B, K]
        q, b_i = self.items(item_fields[distinct])  # [c, d], [c]
        return (p.unsqueeze(1) * q[at]).sum(-1) + b_u.unsqueeze(1) + b_i[at]  # [B, K]

    def user_vectors(self, user_fields: Tensor) -> Tensor:
        """user_fields [U, Fu] -> [p_u, b_u, 1] [U, d + 2]."""
        p, b_u = self.users(user_fields)
        return torch.cat([p, b_u.unsqueeze(-1), torch.ones_like(b_u).unsqueeze(-1)], dim=-1)

    def item_vectors(self, item_fields: Tensor) -> Tensor:
        """item_fields [C, Fi] -> [q_i, 1, b_i] [C, d + 2]: user_vectors @ item_vectors.T = f(u, i)."""
        q, b_i = self.items(item_fields)
        return torch.cat([q, torch.ones_like(b_i).unsqueeze(-1), b_i.unsqueeze(-1)], dim=-1)

    def score_items(self, user_fields: Tensor, item_fields: Tensor) -> Tensor:
        """Every item of item_fields [C, Fi] for each user of user_fields [U, Fu] -> f [U, C]."""
        return self.user_vectors(user_fields) @ self.item_vectors(item_fields).T
