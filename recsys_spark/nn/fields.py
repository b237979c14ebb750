"""What the feature-field networks (DeepFM, Wide&Deep, DCN) share: one embedding table over all fields,
the first-order weights of a linear model, and scoring a query block against item blocks.

Input of every such network: ``fields`` [B, F] int, the encoded value of each categorical field
(``recsys_spark.data.features``: index 0 = unknown/missing in every field; values at or past a field's
cardinality, a vocabulary grown after the model was built, read as 0), and optionally ``numeric`` [B, N]
floats. A row is the query block (user and context fields) followed by the item block
(``recsys_spark.data.feature_spec``), which is what :meth:`FieldNetwork.score_items` relies on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def mlp(width: int, hidden: Sequence[int], dropout: float, out: int | None = 1) -> nn.Sequential:
    """ReLU layers of ``hidden`` units from ``width`` inputs (dropout after each when > 0), then a linear
    layer to ``out`` units (none when ``out`` is None: the last hidden layer is the output)."""
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    if out is not None:
        layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class FieldNetwork(nn.Module):
    """Base of the field networks: subclasses call :meth:`_build_fields` first in their constructor and
    implement ``forward(fields [B, F], numeric [B, N] | None) -> logits [B]``."""

    def _build_fields(self, cardinalities: Sequence[int], n_numeric: int, dim: int,
                      first_order: bool = True) -> list[int]:
        """Field f's value x is row offsets[f] + x of one stacked table: ``embedding`` (V, [Σ card, k],
        N(0, 0.01) as FM initialisations are), with ``first_order`` also ``weight`` (w, [Σ card, 1], zeros)
        and ``bias``; a numeric field j has a vector ``numeric_embedding[j]`` and a weight ``numeric_weight[j]``.
        Returns the cardinalities as ints."""
        cardinalities = [int(c) for c in cardinalities]
        if not cardinalities or min(cardinalities) < 1:
            raise ValueError(f"need at least one field, each of cardinality >= 1, got {cardinalities}")
        self.n_fields, self.n_numeric, self.dim = len(cardinalities), n_numeric, dim
        offsets = torch.tensor([0, *cardinalities[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)  # [F]
        self.register_buffer("sizes", torch.tensor(cardinalities), persistent=False)  # [F]
        total = sum(cardinalities)
        self.embedding = nn.Embedding(total, dim)  # V: every field's latent vectors
        if first_order:
            self.weight = nn.Embedding(total, 1)  # w: first-order weights
        self.numeric_embedding = nn.Parameter(torch.empty(n_numeric, dim))  # v_j [N, k]
        if first_order:
            self.numeric_weight = nn.Parameter(torch.zeros(n_numeric))  # w_j [N]
            self.bias = nn.Parameter(torch.zeros(()))
        nn.init.normal_(self.embedding.weight, std=0.01)
        nn.init.normal_(self.numeric_embedding, std=0.01)
        if not n_numeric:  # empty [0, k] and [0]: kept for the state_dict's shape, but no gradient ever
            # reaches them, and DistributedDataParallel refuses parameters that get none
            for param in (self.numeric_embedding, getattr(self, "numeric_weight", None)):
                if param is not None:
                    param.requires_grad_(False)
        if first_order:
            nn.init.zeros_(self.weight.weight)
        return cardinalities

    def rows(self, fields: Tensor) -> Tensor:
        """fields [B, F] -> rows of the stacked table [B, F], unseen values read as unknown (0)."""
        if fields.shape[-1] != self.n_fields:
            raise ValueError(f"expected {self.n_fields} fields, got {fields.shape[-1]}")
        fields = fields.long()
        fields = torch.where((fields >= 0) & (fields < self.sizes), fields, 0)  # unseen -> unknown
        return fields + self.offsets  # [B, F]

    def _numeric(self, numeric: Tensor | None, like: Tensor) -> Tensor | None:
        if not self.n_numeric:
            return None
        if numeric is None or numeric.shape[-1] != self.n_numeric:
            raise ValueError(f"expected numeric [B, {self.n_numeric}]")
        return numeric.to(like.dtype)  # [B, N]

    def field_vectors(self, rows: Tensor, numeric: Tensor | None = None) -> Tensor:
        """rows [B, F] (+ numeric [B, N]) -> field vectors e [B, F + N, k]: V[x_f], and x_j · v_j."""
        vectors = self.embedding(rows)  # [B, F, k]
        x = self._numeric(numeric, vectors)
        if x is not None:
            vectors = torch.cat([vectors, x.unsqueeze(-1) * self.numeric_embedding], dim=1)  # [B, F + N, k]
        return vectors

    def linear(self, rows: Tensor, numeric: Tensor | None = None) -> Tensor:
        """The first-order sum Σ_f w_f[x_f] + Σ_j x_j w_j of each row: rows [B, F] -> [B] (no bias)."""
        first = self.weight(rows).squeeze(-1).sum(-1)  # [B]
        x = self._numeric(numeric, first)
        return first if x is None else first + x @ self.numeric_weight

    def score_items(self, query: Tensor, items: Tensor, numeric: Tensor | None = None) -> Tensor:
        """Logits of pairing each query row with items.

        query [U, Fq] (the fields before the item block), items [C, Fi] (the same C items for every query
        row) or [U, C, Fi] (per-row candidates), Fq + Fi = F; numeric [U, N] or None -> logits [U, C].
        """
        U, C = query.shape[0], items.shape[-2]
        if items.dim() == 2:
            items = items.unsqueeze(0).expand(U, C, items.shape[-1])  # [U, C, Fi]
        rows = torch.cat([query.unsqueeze(1).expand(U, C, query.shape[-1]), items], dim=-1)  # [U, C, F]
        num = None if numeric is None else numeric.unsqueeze(1).expand(U, C, numeric.shape[-1]).reshape(U * C, -1)
        return self(rows.reshape(U * C, -1), num).view(U, C)
