"""SASRec: self-attentive sequential recommendation (Kang & McAuley 2018), in one file.

Input: ``seq`` [B, L] item indices as stored in ``silver/sequences``: items 0..n_items-1, left-padded
with ``PAD_IDX = -1``, the most recent item last, L <= max_len.

Padding. The embedding table has ``n_items + 1`` rows and ``token = item_idx + 1``, so ``PAD_IDX`` maps
to token 0, the ``padding_idx`` row (the mapping is done once, at the top of ``forward``). Padded
positions are zeroed after the embedding and after every block, and are masked out as attention keys,
so what sits in padded positions, and how many there are, does not change the output at real positions.

Positions. Learned embeddings, right-aligned: the last position of any input is ``max_len - 1``, the one
before ``max_len - 2``, and so on, so a position embedding means "k steps before the end" whether the
model sees the training input ``seq[:, :-1]`` or the full sequence at inference.

Blocks. Pre-LN, as in the paper (section 3.3, ``g(x) = x + Dropout(g(LayerNorm(x)))``): causal
multi-head self-attention then a position-wise two-layer ReLU feed-forward of width d, each a residual
branch, and a final LayerNorm. Attention is ``F.scaled_dot_product_attention`` with a boolean mask built
in ``forward`` (causal and key-padding).

Output. The item embedding is shared with the output layer: ``logits = hidden @ E_itemsᵀ`` over the real
items (rows 1..n_items), column j = item j.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD_IDX = -1  # padding in silver/sequences; equal to recsys_spark.tables.PAD_IDX (no Spark import here)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} must be divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """x [B, L, d], allowed [B, 1, L, L] (True = query may attend key) -> [B, L, d]."""
        B, L, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # [B, L, d] each
        q, k, v = (t.view(B, L, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))  # [B, h, L, d/h]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)  # [B, h, L, d/h]
        return self.proj(y.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    """Pre-LN transformer block: x + Dropout(SA(LN(x))), then x + Dropout(FFN(LN(x)))."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, dropout)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), allowed))  # [B, L, d]
        return x + self.dropout(self.ffn(self.ffn_norm(x)))  # [B, L, d]


class SASRec(nn.Module):
    """Self-attentive sequential recommender. ``init_kwargs`` holds the constructor arguments (JSON)."""

    def __init__(self, n_items: int, max_len: int = 50, d: int = 64, heads: int = 1, blocks: int = 2,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.init_kwargs = {"n_items": n_items, "max_len": max_len, "d": d, "heads": heads, "blocks": blocks,
                            "dropout": dropout}
        self.n_items, self.max_len, self.d = n_items, max_len, d
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)  # row 0 = padding, row i + 1 = item i
        self.pos_emb = nn.Embedding(max_len, d)  # row max_len - 1 = the last position
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(d, heads, dropout) for _ in range(blocks)])
        self.final_norm = nn.LayerNorm(d)
        nn.init.normal_(self.item_emb.weight, std=d**-0.5)  # x sqrt(d) in forward: unit-scale inputs
        nn.init.normal_(self.pos_emb.weight, std=d**-0.5)  # not scaled: positions start as a small offset
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: Tensor) -> Tensor:
        """seq [B, L] item indices, PAD_IDX on the left -> hidden [B, L, d] (row t predicts item t + 1)."""
        B, L = seq.shape
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.max_len}")
        tokens = seq.long() - PAD_IDX  # PAD_IDX (-1) -> token 0, the padding row; item i -> token i + 1
        real = (tokens > 0).unsqueeze(-1)  # [B, L, 1]
        positions = torch.arange(self.max_len - L, self.max_len, device=seq.device)  # [L], right-aligned
        x = self.item_emb(tokens) * math.sqrt(self.d) + self.pos_emb(positions)  # [B, L, d]
        x = self.emb_dropout(x) * real
        # Attention mask [B, 1, L, L], True = may attend: the key is not later than the query (causal) and
        # is a real item. Each position may also see itself, so a padded query's row is never empty (no
        # NaN); padded outputs are zeroed below and never used.
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()  # [L, L]
        eye = torch.eye(L, dtype=torch.bool, device=seq.device)
        allowed = ((causal.unsqueeze(0) & real.transpose(1, 2)) | eye).unsqueeze(1)  # [B, 1, L(query), L(key)]
        for block in self.blocks:
            x = block(x, allowed) * real  # [B, L, d]
        return self.final_norm(x)  # [B, L, d]

    def item_embeddings(self) -> Tensor:
        """The output embeddings of the real items, E_items [n_items, d] (row j = item j)."""
        return self.item_emb.weight[1:]

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [*, d] -> scores of every item [*, n_items]."""
        return hidden @ self.item_embeddings().T

    def user_embedding(self, seq: Tensor) -> Tensor:
        """seq [B, L] (the last max_len items are used) -> hidden state at the last position [B, d];
        ``user_embedding(seq) @ item_embeddings().T`` scores the next item."""
        return self(seq[:, -self.max_len:])[:, -1]

    @torch.no_grad()
    def score_all(self, seq: Tensor) -> Tensor:
        """seq [B, L] -> next-item logits over the catalogue [B, n_items]. Call ``eval()`` first."""
        return self.logits(self.user_embedding(seq))
