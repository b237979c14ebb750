"""Mult-VAE and Mult-DAE (Liang et al. 2018, "Variational Autoencoders for Collaborative Filtering").

A user is the binary vector ``x_u`` [n_items] of their train items. The encoder reads it L2-normalised
(with dropout on the input while training), the decoder returns logits over the whole catalogue whose
softmax ``π(z_u)`` is a multinomial over items::

    x̃_u        = dropout(x_u / ||x_u||_2)                        [B, n_items]
    h          = tanh(x̃_u W_1 + b_1)                              [B, hidden]
    μ, log σ²  = h W_μ + b_μ,  h W_σ + b_σ                        [B, latent] each
    z_u        = μ + ε ⊙ σ,  ε ~ N(0, I)   (training; μ at eval)   [B, latent]
    logits     = tanh(z_u W_2 + b_2) W_3 + b_3                    [B, n_items]
    loss       = -Σ_i x_ui log softmax(logits)_i  +  β · KL(N(μ, σ²) ‖ N(0, I))

with ``KL = -½ Σ_k (1 + log σ²_k - μ_k² - σ²_k)`` and β annealed (see :func:`kl_weight`). The DAE
variant (``variant="dae"``) has no sampling and no KL: ``z_u = h W_μ + b_μ``.

Input format. ``x_u`` is never materialised: a user arrives as the padded list of their item indices
``items`` [B, L] (``PAD_IDX = -1`` pads; at most one entry per item), and ``x̃_u W_1`` is an
``EmbeddingBag`` sum of W_1's rows weighted by dropout-mask / ||x_u||_2. Same numbers as the dense
product, but the cost grows with L, not with the catalogue, and a batch needs no [B, n_items] input.
The softmax over the catalogue is still [B, n_items]: the multinomial likelihood is the whole point.

``init_kwargs`` keeps the constructor arguments, so ``state_dict`` + ``init_kwargs`` rebuild the module.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD_IDX = -1  # = recsys_spark.tables.PAD_IDX (this module imports no Spark)


def kl_weight(step: int | Tensor, total_anneal_steps: int, anneal_cap: float) -> float:
    """β at optimizer step ``step``: ``min(anneal_cap, step / total_anneal_steps)``, the paper's linear
    annealing from 0 (total_anneal_steps 0: β = anneal_cap from the start)."""
    if total_anneal_steps <= 0:
        return float(anneal_cap)
    return float(min(anneal_cap, float(step) / total_anneal_steps))


class MultVAE(nn.Module):
    """The encoder [n_items -> hidden -> 2·latent] and decoder [latent -> hidden -> n_items] of the paper
    (600 and 200 there), tanh between layers; ``variant`` "vae" or "dae".

    ``anneal_steps`` is a buffer counting the training steps seen, so that the KL annealing of a run
    resumed from a checkpoint continues where it stopped (the trainer checkpoints the state_dict)."""

    def __init__(self, n_items: int, hidden: int = 600, latent: int = 200, dropout: float = 0.5,
                 variant: Literal["vae", "dae"] = "vae") -> None:
        super().__init__()
        if variant not in ("vae", "dae"):
            raise ValueError(f"variant must be vae or dae, got {variant!r}")
        if n_items < 1 or hidden < 1 or latent < 1 or not 0 <= dropout < 1:
            raise ValueError(f"bad Mult-VAE shape: n_items={n_items}, hidden={hidden}, latent={latent}, "
                             f"dropout={dropout}")
        self.init_kwargs = {"n_items": n_items, "hidden": hidden, "latent": latent, "dropout": dropout,
                            "variant": variant}
        self.n_items, self.latent, self.dropout, self.variant = n_items, latent, dropout, variant
        self.item_in = nn.EmbeddingBag(n_items, hidden, mode="sum")  # W_1 [n_items, hidden]
        self.in_bias = nn.Parameter(torch.zeros(hidden))  # b_1
        self.to_latent = nn.Linear(hidden, 2 * latent if variant == "vae" else latent)  # [W_μ W_σ]
        self.from_latent = nn.Linear(latent, hidden)  # W_2, b_2
        self.item_out = nn.Linear(hidden, n_items)  # W_3 [n_items, hidden] (torch stores out x in), b_3
        for layer in (self.to_latent, self.from_latent, self.item_out):  # Xavier, as the paper's code
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=0.001)
        nn.init.xavier_uniform_(self.item_in.weight)
        self.register_buffer("anneal_steps", torch.zeros((), dtype=torch.long))

    def encode(self, items: Tensor) -> tuple[Tensor, Tensor | None]:
        """items [B, L] (PAD_IDX padded) -> (μ [B, latent], log σ² [B, latent] or None for the DAE)."""
        real = (items != PAD_IDX).to(self.in_bias.dtype)  # [B, L], x_u's non-zeros
        norm = real.sum(-1, keepdim=True).clamp_min(1.0).sqrt()  # [B, 1], ||x_u||_2 of a binary x_u
        weights = real / norm  # [B, L], x_u / ||x_u||
        if self.training and self.dropout > 0:  # dropout on the normalised input, as F.dropout scales it
            keep = torch.rand_like(weights) >= self.dropout
            weights = weights * keep / (1.0 - self.dropout)
        h = torch.tanh(self.item_in(items.clamp(min=0), per_sample_weights=weights) + self.in_bias)  # [B, hidden]
        out = self.to_latent(h)  # [B, 2·latent] (vae) or [B, latent] (dae)
        if self.variant == "dae":
            return out, None
        return out[:, : self.latent], out[:, self.latent:]

    def decode(self, z: Tensor) -> Tensor:
        """z [B, latent] -> logits [B, n_items]."""
        return self.item_out(torch.tanh(self.from_latent(z)))

    def forward(self, items: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """items [B, L] -> (logits [B, n_items], μ [B, latent], log σ² [B, latent] or None).

        Training draws ``z = μ + ε σ`` (the reparameterisation trick); eval decodes ``μ``."""
        mu, logvar = self.encode(items)
        z = mu
        if logvar is not None and self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # [B, latent]
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def score_all(self, items: Tensor) -> Tensor:
        """Logits of the whole catalogue from the users' items [B, L] -> [B, n_items] (call eval() first)."""
        return self(items.long())[0]

    @torch.no_grad()
    def user_embedding(self, items: Tensor) -> Tensor:
        """μ, the user's latent vector: items [B, L] -> [B, latent] (the user factors)."""
        return self.encode(items.long())[0]

    def item_embeddings(self) -> Tensor:
        """The decoder's output weights W_3 [n_items, hidden]: item i's logit is ``<tanh(z W_2 + b_2), W_3[i]>
        + b_3[i]``, so row i is item i's vector in the decoder's last hidden space (not the latent space)."""
        return self.item_out.weight


def multinomial_nll(logits: Tensor, items: Tensor) -> Tensor:
    """``-Σ_i x_ui log softmax(logits_u)_i`` per user: logits [B, n_items], items [B, L] -> [B].

    Gathers the log-probabilities of the user's items instead of multiplying by a dense x_u."""
    log_p = F.log_softmax(logits.float(), dim=-1)  # [B, n_items]
    real = items != PAD_IDX  # [B, L]
    picked = log_p.gather(1, items.clamp(min=0).long())  # [B, L]
    return -(picked * real).sum(-1)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per user: ``-½ Σ_k (1 + log σ²_k - μ_k² - σ²_k)``; [B, latent] -> [B]."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
