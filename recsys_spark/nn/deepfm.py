"""DeepFM (Guo et al. 2017, "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction").

Input: ``fields`` [B, F] int, the encoded value of each categorical field (``recsys_spark.data.features``:
index 0 = unknown/missing in every field), and optionally ``numeric`` [B, N] floats. Values at or past
a field's cardinality (a vocabulary grown after the model was built) are read as 0, unknown. The field
embeddings and first-order weights are ``recsys_spark.nn.fields`` (shared with Wide&Deep and DCN).

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

from torch import Tensor

from recsys_spark.nn.fields import FieldNetwork, mlp


class DeepFM(FieldNetwork):
    def __init__(self, cardinalities: Sequence[int], n_numeric: int = 0, dim: int = 10,
                 hidden: Sequence[int] = (200, 200, 200), dropout: float = 0.0) -> None:
        super().__init__()
        cardinalities = self._build_fields(cardinalities, n_numeric, dim)  # V, w, v_j, w_j, b
        self.init_kwargs = {"cardinalities": cardinalities, "n_numeric": n_numeric, "dim": dim,
                            "hidden": [int(h) for h in hidden], "dropout": dropout}
        self.mlp = mlp((self.n_fields + n_numeric) * dim, hidden, dropout)

    def embed(self, fields: Tensor, numeric: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """fields [B, F] (+ numeric [B, N]) -> (first-order sum Σ w [B], field vectors e [B, F + N, k])."""
        rows = self.rows(fields)  # [B, F]
        return self.linear(rows, numeric), self.field_vectors(rows, numeric)

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
