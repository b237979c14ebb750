"""Two-tower (DSSM) retrieval network: Huang et al. 2013, as YouTube's candidate generator uses it
(Covington et al. 2016; Yi et al. 2019, "Sampling-bias-corrected neural modeling").

Inputs (index space, plain tensors):

- ``user_fields`` [B, Fu] int: the user's categorical fields (``recsys_spark.data.feature_spec``: the
  query block, its first field the user id as ``idx + 1``), 0 = unknown in every field;
- ``history`` [B, L] int: the user's most recent items (item_idx), oldest first, left-padded with
  ``PAD_IDX = -1``; a cold user's history is all padding;
- ``item_fields`` [N, Fi] int: the item block (its first field the item id as ``idx + 1``, 0 = a cold item).

Values at or past a field's cardinality (a vocabulary grown after training) read as 0, unknown; history
items at or past ``n_items`` read as padding.

The towers, with ``e_f(x) = E_f[x]`` one ``field_dim`` embedding per categorical value::

    h_u  = Σ_t w_t H[item_t] / Σ_t w_t,  w_t = decay^(age_t) on real items (decay = 1: the mean)  [B, dh]
    u    = normalise(MLP_u([e_1(x_1); ...; e_Fu(x_Fu); h_u]))                                    [B, d]
    v    = normalise(MLP_i([e_1(y_1); ...; e_Fi(y_Fi)]))                                          [N, d]
    s(u, i) = <u, v_i> / temperature  = cos(u, v_i) / temperature                                 [B, N]

Both towers end L2-normalised, so the score is a cosine over a temperature: the item tower's outputs are
the catalogue's embeddings and retrieval is a dot product with the user tower's output. An MLP is its
``hidden`` ReLU layers (dropout after each) then a linear layer to ``dim``. Embeddings start N(0, 0.05);
linear layers keep PyTorch's default. ``init_kwargs`` holds the constructor arguments (JSON), so a
checkpoint is ``state_dict`` + ``init_kwargs``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_spark.nn.fields import mlp

PAD_IDX = -1  # history padding (recsys_spark.tables.PAD_IDX; this module imports no Spark)


class FieldEmbedding(nn.Module):
    """One embedding table per categorical field, stacked: field f's value x is row ``offsets[f] + x``.
    fields [*, F] -> concatenated field vectors [*, F * dim]."""

    def __init__(self, cardinalities: Sequence[int], dim: int) -> None:
        super().__init__()
        if not cardinalities or min(cardinalities) < 1:
            raise ValueError(f"need at least one field, each of cardinality >= 1, got {list(cardinalities)}")
        self.n_fields = len(cardinalities)
        self.register_buffer("offsets", torch.tensor([0, *cardinalities[:-1]]).cumsum(0), persistent=False)
        self.register_buffer("sizes", torch.tensor(list(cardinalities)), persistent=False)
        self.table = nn.Embedding(sum(cardinalities), dim)
        nn.init.normal_(self.table.weight, std=0.05)

    def forward(self, fields: Tensor) -> Tensor:
        if fields.shape[-1] != self.n_fields:
            raise ValueError(f"expected {self.n_fields} fields, got {fields.shape[-1]}")
        fields = fields.long()
        fields = torch.where((fields >= 0) & (fields < self.sizes), fields, 0)  # unseen -> unknown
        return self.table(fields + self.offsets).flatten(-2)  # [*, F, dim] -> [*, F * dim]


class TwoTower(nn.Module):
    def __init__(self, user_cardinalities: Sequence[int], item_cardinalities: Sequence[int], n_items: int,
                 dim: int = 64, field_dim: int = 32, hidden: Sequence[int] = (256,), dropout: float = 0.0,
                 temperature: float = 0.05, history_decay: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0 or not 0 < history_decay <= 1:
            raise ValueError("temperature must be > 0 and history_decay in (0, 1]")
        user_cardinalities = [int(c) for c in user_cardinalities]
        item_cardinalities = [int(c) for c in item_cardinalities]
        self.init_kwargs = {"user_cardinalities": user_cardinalities, "item_cardinalities": item_cardinalities,
                            "n_items": int(n_items), "dim": dim, "field_dim": field_dim,
                            "hidden": [int(h) for h in hidden], "dropout": dropout, "temperature": temperature,
                            "history_decay": history_decay}
        self.n_items, self.dim, self.temperature, self.history_decay = int(n_items), dim, temperature, history_decay
        self.user_embedding = FieldEmbedding(user_cardinalities, field_dim)
        self.item_embedding = FieldEmbedding(item_cardinalities, field_dim)
        self.history = nn.Embedding(self.n_items + 1, field_dim, padding_idx=0)  # H: row item + 1, 0 = padding
        nn.init.normal_(self.history.weight, std=0.05)
        with torch.no_grad():
            self.history.weight[0].zero_()
        self.user_tower = mlp((len(user_cardinalities) + 1) * field_dim, hidden, dropout, out=dim)
        self.item_tower = mlp(len(item_cardinalities) * field_dim, hidden, dropout, out=dim)

    def pooled_history(self, history: Tensor) -> Tensor:
        """history [B, L] (left-padded, most recent last) -> h_u [B, field_dim]: the decay-weighted mean of
        the real items' embeddings (0 for an empty history)."""
        history = history.long()
        real = (history >= 0) & (history < self.n_items)  # [B, L]
        rows = torch.where(real, history + 1, 0)  # [B, L], 0 = padding row (zero vector)
        L = history.shape[-1]
        age = torch.arange(L - 1, -1, -1, device=history.device, dtype=torch.float32)  # [L], 0 = the latest
        weight = (self.history_decay ** age) * real.float()  # [B, L]
        total = (weight.unsqueeze(-1) * self.history(rows)).sum(-2)  # [B, field_dim]
        return total / weight.sum(-1, keepdim=True).clamp_min(1e-12)

    def user_vectors(self, user_fields: Tensor, history: Tensor) -> Tensor:
        """user_fields [B, Fu], history [B, L] -> u [B, dim], unit length."""
        x = torch.cat([self.user_embedding(user_fields), self.pooled_history(history)], dim=-1)  # [B, (Fu+1)*k]
        return F.normalize(self.user_tower(x), dim=-1)

    def item_vectors(self, item_fields: Tensor) -> Tensor:
        """item_fields [N, Fi] -> v [N, dim], unit length."""
        return F.normalize(self.item_tower(self.item_embedding(item_fields)), dim=-1)

    def forward(self, user_fields: Tensor, history: Tensor, item_fields: Tensor) -> Tensor:
        """Logits of every (user row, item row) pair: [B, Fu], [B, L], [N, Fi] -> cos / temperature [B, N]."""
        return self.user_vectors(user_fields, history) @ self.item_vectors(item_fields).T / self.temperature
