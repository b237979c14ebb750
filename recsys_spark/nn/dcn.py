"""Deep & Cross Network (Wang et al. 2017, "Deep & Cross Network for Ad Click Predictions"), with the
matrix cross layer of DCN-V2 (Wang et al. 2021) as an option.

Input: ``fields`` [B, F] int (+ ``numeric`` [B, N]), as every field network (``recsys_spark.nn.fields``).
The embedding and stacking layer: x_0 = [e_1; ...; e_m] ∈ R^d, d = m·k, the field embeddings
concatenated (a numeric field enters as x_j · v_j, as in DeepFM). Then two towers in parallel:

    cross network (L layers, each explicit feature crossing of one more degree, with a residual):
        x_{l+1} = x_0 x_l^T w_l + b_l + x_l          x_l, w_l, b_l ∈ R^d; x_l^T w_l is a scalar per row
        (``cross="matrix"``, DCN-V2: x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l, W_l ∈ R^{d×d})
    deep network: h = MLP(x_0)                      (ReLU layers)
    combination:  logit = w_logit^T [x_L; h] + b_logit,  ŷ = σ(logit)

The vector layer adds only 2d parameters per layer: the cross network's degree-(l+1) polynomial of x_0
costs O(d) per row, which is the paper's point. Embeddings N(0, 0.01); w_l N(0, 1/d) so that x_l^T w_l
starts small; b_l 0. ``init_kwargs`` holds the constructor arguments (JSON).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recsys_spark.nn.fields import FieldNetwork, mlp

VECTOR, MATRIX = "vector", "matrix"


class DCN(FieldNetwork):
    def __init__(self, cardinalities: Sequence[int], n_numeric: int = 0, dim: int = 16,
                 hidden: Sequence[int] = (200, 200, 200), dropout: float = 0.0, cross_layers: int = 3,
                 cross: str = VECTOR) -> None:
        super().__init__()
        if cross not in (VECTOR, MATRIX):
            raise ValueError(f"cross must be {VECTOR!r} or {MATRIX!r}, got {cross!r}")
        if cross_layers < 0:
            raise ValueError(f"cross_layers must be >= 0, got {cross_layers}")
        cardinalities = self._build_fields(cardinalities, n_numeric, dim, first_order=False)  # V, v_j
        self.init_kwargs = {"cardinalities": cardinalities, "n_numeric": n_numeric, "dim": dim,
                            "hidden": [int(h) for h in hidden], "dropout": dropout,
                            "cross_layers": int(cross_layers), "cross": cross}
        self.cross = cross
        d = (self.n_fields + n_numeric) * dim
        shape = (cross_layers, d) if cross == VECTOR else (cross_layers, d, d)
        self.cross_weight = nn.Parameter(torch.randn(shape) / d ** 0.5)  # w_l [L, d] (or W_l [L, d, d])
        self.cross_bias = nn.Parameter(torch.zeros(cross_layers, d))  # b_l [L, d]
        # x_0 [B, d] -> h [B, hidden[-1]]; no hidden layers: the cross network alone (the paper's ablation)
        self.deep = mlp(d, hidden, dropout, out=None) if hidden else None
        self.logit = nn.Linear(d + (hidden[-1] if hidden else 0), 1)  # [x_L; h] -> logit

    def cross_network(self, x0: Tensor) -> Tensor:
        """x_0 [B, d] -> x_L [B, d] by the L cross layers."""
        x = x0  # x_l [B, d]
        for w, b in zip(self.cross_weight, self.cross_bias, strict=True):  # w [d] (or [d, d]), b [d]
            if self.cross == VECTOR:
                x = x0 * (x @ w).unsqueeze(-1) + b + x  # x_0 [B, d] · (x_l^T w_l) [B, 1] + b_l + x_l
            else:
                x = x0 * (x @ w.T + b) + x  # x_0 ⊙ (W_l x_l + b_l) + x_l, [B, d]
        return x

    def forward(self, fields: Tensor, numeric: Tensor | None = None) -> Tensor:
        """fields [B, F] (+ numeric [B, N]) -> logits [B] = w_logit^T [x_L; h] + b_logit."""
        x0 = self.field_vectors(self.rows(fields), numeric).flatten(1)  # [B, m, k] -> [B, d]
        towers = [self.cross_network(x0)] + ([self.deep(x0)] if self.deep is not None else [])  # [B, d], [B, h]
        return self.logit(torch.cat(towers, dim=-1)).squeeze(-1)
