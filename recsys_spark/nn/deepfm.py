"""DeepFM (Guo et al. 2017, "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction").

Input: ``fields`` [B, F] int, the encoded value of each categorical field (``recsys_spark.data.features``:
index 0 = unknown/missing in every field), and optionally ``numeric`` [B, N] floats. Values at or past
a field's cardinality (a vocabulary grown after the model was built) are read as 0, unknown.

Each categorical field f has its own embedding table; all fields share one dimension k, so the FM and
the deep part read the *same* embeddings (the paper's shared input, section 2.1). For the active value
of field f, e_f = V_f[x_f] ∈ R^k and first-order weight w_f[x_f]; a numeric field j contributes
e_j = x_j · v_j and x_j · w_j (the FM's real-valued feature, one "scaled embedding" per numeric field).
With e_1..e_m the m = F + N field vectors of a row:

    y_FM  = b + Σ_f w_f + Σ_{i<j} <e_i, e_j>
          = b + Σ_f w_f + ½ Σ_d [ (Σ_i e_{i,d})² - Σ_i e_{i,d}² ]          (Rendle's O(mk) identity)
    y_DNN = MLP([e_1; ...; e_m])                                          (ReLU layers, then a linear output)
    logit = y_FM + y_DNN,  ŷ = σ(logit)

The embeddings are N(0, 0.01) (small, as FM initialisations are: the pairwise term starts near 0); the
first-order weights and the bias start at 0; linear layers keep PyTorch's default. ``init_kwargs`` holds
the constructor arguments (JSON), so a checkpoint is ``state_dict`` + ``init_kwargs``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class DeepFM(nn.Module):
    def __init__(self, cardinalities: Sequence[int], n_numeric: int = 0, dim: int = 10,
                 hidden: Sequence[int] = (200, 200, 200), dropout: float = 0.0) -> None:
        super().__init__()
        cardinalities = [int(c) for c in cardinalities]
        if not cardinalities or min(cardinalities) < 1:
            raise ValueError(f"need at least one field, each of cardinality >= 1, got {cardinalities}")
        self.init_kwargs = {"cardinalities": cardinalities, "n_numeric": n_numeric, "dim": dim,
                            "hidden": [int(h) for h in hidden], "dropout": dropout}
        self.n_fields, self.n_numeric, self.dim = len(cardinalities), n_numeric, dim
        # All fields' tables stacked in one: field f's value x is row offsets[f] + x.
        offsets = torch.tensor([0, *cardinalities[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)  # [F]
        self.register_buffer("sizes", torch.tensor(cardinalities), persistent=False)  # [F]
        total = sum(cardinalities)
        self.embedding = nn.Embedding(total, dim)  # V: every field's latent vectors
        self.weight = nn.Embedding(total, 1)  # w: first-order weights
        self.numeric_embedding = nn.Parameter(torch.empty(n_numeric, dim))  # v_j [N, k]
        self.numeric_weight = nn.Parameter(torch.zeros(n_numeric))  # w_j [N]
        self.bias = nn.Parameter(torch.zeros(()))
        nn.init.normal_(self.embedding.weight, std=0.01)
        nn.init.normal_(self.numeric_embedding, std=0.01)
        nn.init.zeros_(self.weight.weight)

        layers: list[nn.Module] = []
        width = (self.n_fields + n_numeric) * dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def embed(self, fields: Tensor, numeric: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """fields [B, F] (+ numeric [B, N]) -> (first-order sum Σ w [B], field vectors e [B, F + N, k])."""
        if fields.shape[-1] != self.n_fields:
            raise ValueError(f"expected {self.n_fields} fields, got {fields.shape[-1]}")
        fields = fields.long()
        fields = torch.where((fields >= 0) & (fields < self.sizes), fields, 0)  # unseen -> unknown
        rows = fields + self.offsets  # [B, F]
        first = self.weight(rows).squeeze(-1).sum(-1)  # [B]
        vectors = self.embedding(rows)  # [B, F, k]
        if self.n_numeric:
            if numeric is None or numeric.shape[-1] != self.n_numeric:
                raise ValueError(f"expected numeric [B, {self.n_numeric}]")
            x = numeric.to(vectors.dtype)  # [B, N]
            first = first + x @ self.numeric_weight  # [B]
            vectors = torch.cat([vectors, x.unsqueeze(-1) * self.numeric_embedding], dim=1)  # [B, F + N, k]
        return first, vectors

    @staticmethod
    def fm_second_order(vectors: Tensor) -> Tensor:
        """Σ_{i<j} <e_i, e_j> of each row: vectors [B, m, k] -> [B], by ½ Σ_d ((Σ_i e_id)² - Σ_i e_id²)."""
        square_of_sum = vectors.sum(dim=1).pow(2)  # [B, k]
        sum_of_squares = vectors.pow(2).sum(dim=1)  # [B, k]
        return 0.5 * (square_of_sum - sum_of_squares).sum(-1)  # [B]

    def forward(self, fields: Tensor, numeric: Tensor | None = None) -> Tensor:
        """fields [B, F] (+ numeric [B, N]) -> logits [B] = y_FM + y_DNN."""
        first, vectors = self.embed(fields, numeric)  # [B], [B, m, k]
        y_fm = self.bias + first + self.fm_second_order(vectors)  # [B]
        y_dnn = self.mlp(vectors.flatten(1)).squeeze(-1)  # [B, m * k] -> [B]
        return y_fm + y_dnn

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
