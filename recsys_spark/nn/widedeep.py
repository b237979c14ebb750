"""Wide&Deep (Cheng et al. 2016, "Wide & Deep Learning for Recommender Systems").

Input: ``fields`` [B, F] int (+ ``numeric`` [B, N]), as every field network (``recsys_spark.nn.fields``).

The **wide** part is a generalised linear model over the sparse features, memorising which feature
values and which *combinations* of them go with a positive: for the active value of field f a weight
w_f[x_f], and for each chosen pair of fields (a, b) the cross-product transform φ_ab(x) = 1 exactly for
the observed pair of values (x_a, x_b) (the paper's AND(user_installed_app, impression_app)), whose weight
is looked up by hashing (a, b, x_a, x_b) into ``cross_buckets`` rows (:func:`cross_index`). A cross with
either value unknown (0) is inactive: row 0, a weight fixed at 0, so a cold user's id crosses add nothing.
The **deep** part is an MLP over the concatenated field embeddings [e_1; ...; e_m], generalising to value
combinations never seen together. Both are trained jointly on one logit:

    y_wide = b + Σ_f w_f[x_f] + Σ_j x_j w_j + Σ_(a,b) w_cross[h(a, b, x_a, x_b)]
    y_deep = MLP([e_1; ...; e_m])                     (ReLU layers, then a linear output)
    logit  = y_wide + y_deep,  ŷ = σ(logit)

The paper trains the wide part with FTRL + L1 and the deep part with AdaGrad; here one optimiser
(``train.optimizer``) updates both. Embeddings N(0, 0.01), wide weights and bias 0; ``init_kwargs`` holds
the constructor arguments (JSON), so a checkpoint is ``state_dict`` + ``init_kwargs``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recsys_spark.nn.fields import FieldNetwork, mlp

# The MINSTD Lehmer generator (Park & Miller): x -> 48271 x mod (2^31 - 1) permutes 1..2^31 - 2, which
# spreads the consecutive exact indices of a cross over the buckets; every product stays below 2^47.
_PRIME = (1 << 31) - 1
_MULTIPLIER = 48271


def cross_index(fields: Tensor, crosses: Tensor, right_sizes: Tensor, starts: Tensor, buckets: int) -> Tensor:
    """The wide part's row for each cross of each row: fields [B, F] (values already in range), crosses
    [C, 2] (field positions a, b), right_sizes [C] (cardinality of b), starts [C] (where cross c's exact
    indices begin) -> [B, C] in [0, buckets): 0 when x_a or x_b is unknown (0), else
    1 + minstd(start_c + x_a · card_b + x_b) mod (buckets - 1). Deterministic: a function of its inputs."""
    a, b = fields[:, crosses[:, 0]], fields[:, crosses[:, 1]]  # [B, C] each
    exact = starts + a * right_sizes + b  # [B, C]: a distinct number for each (cross, x_a, x_b)
    hashed = (exact % _PRIME) * _MULTIPLIER % _PRIME  # [B, C]
    return torch.where((a > 0) & (b > 0), 1 + hashed % (buckets - 1), 0)


class WideDeep(FieldNetwork):
    def __init__(self, cardinalities: Sequence[int], n_numeric: int = 0, dim: int = 32,
                 hidden: Sequence[int] = (200, 200, 200), dropout: float = 0.0,
                 crosses: Sequence[Sequence[int]] = (), cross_buckets: int = 1 << 17) -> None:
        super().__init__()
        cardinalities = self._build_fields(cardinalities, n_numeric, dim)  # V, w, v_j, w_j, b
        pairs = [[int(a), int(b)] for a, b in crosses]
        if any(not (0 <= i < len(cardinalities)) for pair in pairs for i in pair):
            raise ValueError(f"crosses name field positions 0..{len(cardinalities) - 1}, got {pairs}")
        if pairs and cross_buckets < 2:
            raise ValueError(f"cross_buckets must be >= 2 (row 0 is the inactive cross), got {cross_buckets}")
        self.init_kwargs = {"cardinalities": cardinalities, "n_numeric": n_numeric, "dim": dim,
                            "hidden": [int(h) for h in hidden], "dropout": dropout, "crosses": pairs,
                            "cross_buckets": int(cross_buckets)}
        self.cross_buckets = int(cross_buckets)
        pair_t = torch.tensor(pairs, dtype=torch.long).view(-1, 2)  # [C, 2]
        right = torch.tensor([cardinalities[b] for _, b in pairs], dtype=torch.long)  # [C]
        spans = torch.tensor([cardinalities[a] * cardinalities[b] for a, b in pairs], dtype=torch.long)  # [C]
        self.register_buffer("crosses", pair_t, persistent=False)
        self.register_buffer("right_sizes", right, persistent=False)
        self.register_buffer("starts", torch.cumsum(spans, 0) - spans, persistent=False)  # [C]
        if pairs:  # w_cross [buckets, 1]; row 0 (inactive) stays 0: padding_idx gets no gradient
            self.cross_weight = nn.Embedding(self.cross_buckets, 1, padding_idx=0)
            nn.init.zeros_(self.cross_weight.weight)
        self.mlp = mlp((self.n_fields + n_numeric) * dim, hidden, dropout)

    def wide(self, rows: Tensor, numeric: Tensor | None = None) -> Tensor:
        """y_wide [B]: bias, first-order weights and the crosses' weights (rows: ``self.rows(fields)``)."""
        y = self.bias + self.linear(rows, numeric)  # [B]
        if len(self.crosses):
            index = cross_index(rows - self.offsets, self.crosses, self.right_sizes, self.starts,
                                self.cross_buckets)  # [B, C]
            y = y + self.cross_weight(index).squeeze(-1).sum(-1)  # [B, C, 1] -> [B]
        return y

    def forward(self, fields: Tensor, numeric: Tensor | None = None) -> Tensor:
        """fields [B, F] (+ numeric [B, N]) -> logits [B] = y_wide + y_deep."""
        rows = self.rows(fields)  # [B, F], unseen values -> unknown
        y_deep = self.mlp(self.field_vectors(rows, numeric).flatten(1)).squeeze(-1)  # [B, m * k] -> [B]
        return self.wide(rows, numeric) + y_deep
