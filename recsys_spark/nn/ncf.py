"""Neural collaborative filtering (He et al. 2017, "Neural Collaborative Filtering"): GMF, MLP and NeuMF.

Inputs are index-space ids: users in 0..n_users-1, items in 0..n_items-1 (no padding here). ``forward``
takes ``users`` and ``items`` of the same (or broadcastable) shape [*] and returns logits [*] (apply a
sigmoid for the paper's ŷ), so one call scores a positive and its negatives: users [B, 1] with items
[B, 1 + n]. Each class keeps its constructor arguments in ``init_kwargs`` (JSON-serialisable), so a
checkpoint is ``state_dict`` + ``init_kwargs`` and ``cls(**init_kwargs)`` rebuilds the module.

Initialisation. GMF embeddings are N(0, 0.01) as in the paper. The MLP's embeddings keep PyTorch's
N(0, 1): with N(0, 0.01) inputs the first layer's pre-activations are its biases, the ReLU tower is
linear in the embeddings, hence additive in user and item, and training sits at that saddle without
learning any user-item interaction (observed on the test suite's three-group task: MLP stays at the
base-rate loss for hundreds of steps, NeuMF is carried by its GMF half). Linear layers keep PyTorch's
default (Kaiming-uniform).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _tower(layers: Sequence[int], dropout: float) -> nn.Sequential:
    """The MLP tower: layers[0] -> layers[1] -> ... -> layers[-1], ReLU (and dropout) after each."""
    modules: list[nn.Module] = []
    for d_in, d_out in zip(layers[:-1], layers[1:], strict=True):
        modules += [nn.Linear(d_in, d_out), nn.ReLU()]
        if dropout > 0:
            modules.append(nn.Dropout(dropout))
    return nn.Sequential(*modules)


def _check_layers(layers: Sequence[int]) -> list[int]:
    layers = [int(x) for x in layers]
    if len(layers) < 1 or any(x <= 0 for x in layers) or layers[0] % 2:
        raise ValueError(f"mlp layers must be positive sizes with an even first one (user + item), got {layers}")
    return layers


class _NCF(nn.Module):
    """Shared by the three models: full-catalogue scoring and the embedding export."""

    n_users: int
    n_items: int

    @torch.no_grad()
    def score_all(self, users: Tensor, max_pairs: int = 1 << 20) -> Tensor:
        """Logits of every item for each user: users [B] -> [B, n_items].

        Scores item blocks of ``max_pairs // B`` items at a time, so memory stays bounded whatever the
        catalogue size. Call ``eval()`` first (dropout).
        """
        device = users.device
        block = max(1, max_pairs // max(1, users.shape[0]))
        out = []
        for start in range(0, self.n_items, block):
            items = torch.arange(start, min(start + block, self.n_items), device=device)  # [b]
            out.append(self(users.unsqueeze(1), items.unsqueeze(0)))  # [B, 1] x [1, b] -> [B, b]
        return torch.cat(out, dim=1)  # [B, n_items]

    def user_item_embeddings(self) -> tuple[Tensor, Tensor] | None:
        """(users [n_users, d], items [n_items, d]) whose dot product is the model's bilinear part of the
        logit, for the embedding tables and dot-product serving; None when the model has none."""
        return None


class GMF(_NCF):
    """Generalised matrix factorisation: ``logit = hᵀ(p_u ⊙ q_i) + b``.

    ``metric="distance"`` scores by ``logit = -||p_u - q_i||²`` instead (collaborative metric learning,
    Hsieh et al. 2017): what a model trained with the triplet loss on distances must rank by; h and b
    are then unused."""

    def __init__(self, n_users: int, n_items: int, dim: int = 16, metric: str = "dot") -> None:
        super().__init__()
        if metric not in ("dot", "distance"):
            raise ValueError(f"metric must be dot or distance, got {metric!r}")
        self.init_kwargs = {"n_users": n_users, "n_items": n_items, "dim": dim}
        if metric != "dot":  # kept out of the dot model's init_kwargs, so its checkpoints stay as they were
            self.init_kwargs["metric"] = metric
        self.n_users, self.n_items, self.metric = n_users, n_items, metric
        self.user_emb = nn.Embedding(n_users, dim)  # p_u
        self.item_emb = nn.Embedding(n_items, dim)  # q_i
        self.out = nn.Linear(dim, 1)  # h, b
        nn.init.normal_(self.user_emb.weight, std=0.01)  # N(0, 0.01) as in the paper
        nn.init.normal_(self.item_emb.weight, std=0.01)

    def features(self, users: Tensor, items: Tensor) -> Tensor:
        """users, items [*] -> p_u ⊙ q_i [*, dim]."""
        return self.user_emb(users) * self.item_emb(items)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        if self.metric == "distance":
            p, q = torch.broadcast_tensors(self.user_emb(users), self.item_emb(items))  # [*, dim] each
            return -(p - q).pow(2).sum(-1)  # [*]: -||p_u - q_i||²
        return self.out(self.features(users, items)).squeeze(-1)  # [*, dim] -> [*]

    @torch.no_grad()
    def score_all(self, users: Tensor, max_pairs: int = 1 << 20) -> Tensor:
        """Exact shortcut for GMF: (p_u ⊙ h) @ Qᵀ + b, users [B] -> [B, n_items] (for the distance
        metric: -(||p_u||² - 2 p_u·q_i + ||q_i||²))."""
        if self.metric == "distance":
            p, q = self.user_emb(users), self.item_emb.weight  # [B, dim], [n_items, dim]
            return -(p.pow(2).sum(-1, keepdim=True) - 2 * p @ q.T + q.pow(2).sum(-1))  # [B, n_items]
        u = self.user_emb(users) * self.out.weight[0]  # [B, dim]
        return u @ self.item_emb.weight.T + self.out.bias  # [B, n_items]

    def user_item_embeddings(self) -> tuple[Tensor, Tensor] | None:
        """(p_u ⊙ h [n_users, dim], q_i [n_items, dim]): their dot product is the logit minus the bias.
        None for the distance metric, whose score is no dot product."""
        if self.metric == "distance":
            return None
        with torch.no_grad():
            return self.user_emb.weight * self.out.weight[0], self.item_emb.weight.clone()


class MLP(_NCF):
    """Multi-layer perceptron over the concatenated embeddings: ``logit = hᵀ tower([p_u; q_i]) + b``.

    ``layers[0]`` is the concatenated embedding size (each embedding is ``layers[0] // 2``);
    ``layers[-1]`` the predictive factors, e.g. (64, 32, 16, 8) as in the paper.
    """

    def __init__(self, n_users: int, n_items: int, layers: Sequence[int] = (64, 32, 16),
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers = _check_layers(layers)
        self.init_kwargs = {"n_users": n_users, "n_items": n_items, "layers": layers, "dropout": dropout}
        self.n_users, self.n_items = n_users, n_items
        self.user_emb = nn.Embedding(n_users, layers[0] // 2)
        self.item_emb = nn.Embedding(n_items, layers[0] // 2)
        self.tower = _tower(layers, dropout)
        self.out = nn.Linear(layers[-1], 1)
        # Embeddings keep PyTorch's N(0, 1): see the module docstring on initialisation.

    def features(self, users: Tensor, items: Tensor) -> Tensor:
        """users, items [*] -> tower output [*, layers[-1]]."""
        u, i = torch.broadcast_tensors(self.user_emb(users), self.item_emb(items))  # [*, layers[0] // 2] each
        return self.tower(torch.cat([u, i], dim=-1))  # [*, layers[0]] -> [*, layers[-1]]

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        return self.out(self.features(users, items)).squeeze(-1)  # [*]


class NeuMF(_NCF):
    """GMF and MLP with separate embeddings, fused in the last layer:
    ``logit = hᵀ [p_u^G ⊙ q_i^G ; tower([p_u^M; q_i^M])] + b``."""

    def __init__(self, n_users: int, n_items: int, mf_dim: int = 16, layers: Sequence[int] = (64, 32, 16),
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers = _check_layers(layers)
        self.init_kwargs = {"n_users": n_users, "n_items": n_items, "mf_dim": mf_dim, "layers": layers,
                            "dropout": dropout}
        self.n_users, self.n_items, self.mf_dim = n_users, n_items, mf_dim
        self.mf_user_emb = nn.Embedding(n_users, mf_dim)
        self.mf_item_emb = nn.Embedding(n_items, mf_dim)
        self.mlp_user_emb = nn.Embedding(n_users, layers[0] // 2)
        self.mlp_item_emb = nn.Embedding(n_items, layers[0] // 2)
        self.tower = _tower(layers, dropout)
        self.out = nn.Linear(mf_dim + layers[-1], 1)  # h = [h_GMF ; h_MLP]
        nn.init.normal_(self.mf_user_emb.weight, std=0.01)  # as GMF; the MLP embeddings keep N(0, 1)
        nn.init.normal_(self.mf_item_emb.weight, std=0.01)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        mf = self.mf_user_emb(users) * self.mf_item_emb(items)  # [*, mf_dim]
        u, i = torch.broadcast_tensors(self.mlp_user_emb(users), self.mlp_item_emb(items))
        mlp = self.tower(torch.cat([u, i], dim=-1))  # [*, layers[-1]]
        return self.out(torch.cat([mf, mlp], dim=-1)).squeeze(-1)  # [*, mf_dim + layers[-1]] -> [*]

    @classmethod
    def from_pretrained(cls, gmf: GMF, mlp: MLP, alpha: float = 0.5) -> NeuMF:
        """NeuMF initialised from trained GMF and MLP (the paper's pre-training, section 3.4.1).

        Embeddings and tower are copied; the output layer is ``h = [α·h_GMF ; (1-α)·h_MLP]`` and the bias
        ``α·b_GMF + (1-α)·b_MLP``, so the new model's logit is exactly ``α·GMF + (1-α)·MLP`` at the start.
        """
        if (gmf.n_users, gmf.n_items) != (mlp.n_users, mlp.n_items):
            raise ValueError("GMF and MLP were trained on different user/item counts")
        mlp_kwargs = mlp.init_kwargs
        model = cls(gmf.n_users, gmf.n_items, mf_dim=gmf.init_kwargs["dim"], layers=mlp_kwargs["layers"],
                    dropout=mlp_kwargs["dropout"])
        with torch.no_grad():
            model.mf_user_emb.weight.copy_(gmf.user_emb.weight)
            model.mf_item_emb.weight.copy_(gmf.item_emb.weight)
            model.mlp_user_emb.weight.copy_(mlp.user_emb.weight)
            model.mlp_item_emb.weight.copy_(mlp.item_emb.weight)
            model.tower.load_state_dict(mlp.tower.state_dict())
            model.out.weight.copy_(torch.cat([alpha * gmf.out.weight, (1 - alpha) * mlp.out.weight], dim=1))
            model.out.bias.copy_(alpha * gmf.out.bias + (1 - alpha) * mlp.out.bias)
        return model

    def user_item_embeddings(self) -> tuple[Tensor, Tensor]:
        """The GMF half only: (p_u^G ⊙ h_GMF [n_users, mf_dim], q_i^G [n_items, mf_dim]). Their dot product
        is the GMF share of the logit, not the whole score (the MLP half has no dot-product form): use it
        for the embedding tables and item similarity, and ``score_all`` for exact top-N."""
        with torch.no_grad():
            return self.mf_user_emb.weight * self.out.weight[0, : self.mf_dim], self.mf_item_emb.weight.clone()
