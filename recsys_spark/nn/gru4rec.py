"""GRU4Rec: session-based recommendation with a recurrent network (Hidasi et al. 2016, "Session-based
Recommendations with Recurrent Neural Networks"; Hidasi & Karatzoglou 2018, "Recurrent Neural Networks
with Top-k Gains for Session-based Recommendations"), and its losses.

Network. At step t of a session the input item x_t is embedded, one or more GRU layers update the hidden
state, and the last layer's output h_t scores every item j as

    r_{t,j} = <h_t, W_j> + b_j                       W [n_items, H] output item embeddings, b [n_items]

Inputs are item indices 0..n_items-1, one per session row (``forward_step``). The input embedding is
either the output embedding itself (``constrained=True``, the 2018 paper's "constrained embedding": one
item matrix, input size H) or its own table of size ``embedding``, or, with ``embedding=0`` and
unconstrained, a table of size H (a one-hot input times an input matrix is a row lookup: the paper's
one-hot input without materialising one-hot vectors). Dropout on the input embedding and on each
layer's output, as in the official implementation.

Hidden state: [layers, B, H]. A row whose session starts at this step must start from zeros:
``forward_step(items, hidden, reset)`` zeroes the rows where ``reset`` is True before reading the input,
so a reset row is exactly a fresh start. Input items < 0 (PAD, idle rows of a session-parallel batch)
read item 0; their outputs are meaningless and must be masked by the caller.

Initialisation follows the paper's code: Glorot-uniform per weight matrix (each GRU gate's block on its
own), zero biases.

Losses (section 3 of the 2018 paper). ``scores`` [B, M] hold each row's scores of M candidates: column
``i`` of row ``i`` is its target (the mini-batch's targets come first, so each row's target is on the
diagonal and the other rows' targets are its negatives), then the additional sampled negatives shared by
the batch. ``mask`` [B, M] (True = usable) drops accidental hits: candidates equal to the row's target
other than the diagonal. With r_i the target score and s_j = softmax over the usable negatives r_j:

    cross-entropy   -log softmax(r - log_q)_i            (log_q optional: the sampling correction)
    BPR-max         -log Σ_j s_j σ(r_i - r_j)  +  λ Σ_j s_j r_j²
    TOP1-max        Σ_j s_j ( σ(r_j - r_i) + σ(r_j²) )

``scores`` may carry leading dimensions ([T, B, M]: T steps scored at once, each with its own candidates;
``mask`` and ``valid`` alike). Each returns the mean over rows with ``valid`` True (idle rows excluded)
that have at least one usable negative (a row with none has nothing to rank against), or their sum with
``reduction="sum"`` (what a caller that weights steps by their events adds up, without reading the row
count back from the device).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-24  # inside log(): keeps -log(0) finite, as the official code does
Reduction = Literal["mean", "sum"]


def _glorot_(weight: Tensor, blocks: int = 1) -> None:
    """Glorot-uniform on each of ``blocks`` equal row blocks of ``weight`` (a GRU's gates)."""
    with torch.no_grad():
        for part in weight.chunk(blocks, dim=0):
            bound = math.sqrt(6.0 / (part.shape[0] + part.shape[1]))
            part.uniform_(-bound, bound)


class GRU4Rec(nn.Module):
    """``init_kwargs`` holds the constructor arguments (JSON): ``GRU4Rec(**init_kwargs)`` rebuilds it."""

    def __init__(self, n_items: int, hidden: int = 100, layers: int = 1, embedding: int = 0,
                 constrained: bool = True, dropout_embed: float = 0.0, dropout_hidden: float = 0.0) -> None:
        super().__init__()
        if n_items < 1 or hidden < 1 or layers < 1 or embedding < 0:
            raise ValueError("n_items, hidden and layers must be >= 1 and embedding >= 0")
        self.init_kwargs = {"n_items": n_items, "hidden": hidden, "layers": layers, "embedding": embedding,
                            "constrained": constrained, "dropout_embed": dropout_embed,
                            "dropout_hidden": dropout_hidden}
        self.n_items, self.hidden, self.layers, self.constrained = n_items, hidden, layers, constrained
        self.out_emb = nn.Embedding(n_items, hidden)  # W: output item embeddings
        self.out_bias = nn.Embedding(n_items, 1)  # b
        if constrained:
            self.in_emb = None  # the input embedding is W itself
            d_in = hidden
        else:
            d_in = embedding or hidden
            self.in_emb = nn.Embedding(n_items, d_in)
        self.cells = nn.ModuleList([nn.GRUCell(d_in if i == 0 else hidden, hidden) for i in range(layers)])
        self.drop_embed = nn.Dropout(dropout_embed)
        self.drop_hidden = nn.Dropout(dropout_hidden)
        _glorot_(self.out_emb.weight)
        nn.init.zeros_(self.out_bias.weight)
        if self.in_emb is not None:
            _glorot_(self.in_emb.weight)
        for cell in self.cells:
            _glorot_(cell.weight_ih, blocks=3)
            _glorot_(cell.weight_hh, blocks=3)
            nn.init.zeros_(cell.bias_ih)
            nn.init.zeros_(cell.bias_hh)

    def init_hidden(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """A fresh hidden state: zeros [layers, B, H]."""
        return torch.zeros(self.layers, batch, self.hidden, device=device or self.out_emb.weight.device)

    def embed(self, items: Tensor) -> Tensor:
        """items [B] -> input embeddings [B, d_in]; PAD (< 0) reads item 0."""
        items = items.long().clamp(min=0)
        table = self.out_emb if self.in_emb is None else self.in_emb
        return self.drop_embed(table(items))

    def forward_step(self, items: Tensor, hidden: Tensor | None = None,
                     reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One step: items [B], hidden [layers, B, H] (None = fresh), reset [B] bool (rows to zero first)
        -> (output h_t [B, H], new hidden [layers, B, H])."""
        if hidden is None:
            hidden = self.init_hidden(items.shape[0], items.device)
        if reset is not None:
            hidden = hidden * (~reset.bool()).to(hidden.dtype).view(1, -1, 1)  # reset rows start from zeros
        x = self.embed(items)  # [B, d_in]
        new = []
        for layer, cell in enumerate(self.cells):
            x = cell(x, hidden[layer])  # [B, H]
            new.append(x)
            x = self.drop_hidden(x)
        return x, torch.stack(new)  # [B, H], [layers, B, H]

    def forward(self, seq: Tensor) -> Tensor:
        """A batch of sessions from a fresh state: seq [B, L] (left-aligned; PAD after the end is read as
        item 0 and its outputs are to be ignored) -> outputs [B, L, H] (row t scores item t + 1)."""
        hidden, outputs = None, []
        for t in range(seq.shape[1]):
            out, hidden = self.forward_step(seq[:, t], hidden)
            outputs.append(out)
        return torch.stack(outputs, dim=1)

    def user_embedding(self, seq: Tensor) -> Tensor:
        """The last output over each row's items read as one session from a fresh state: seq [B, L] with
        PAD (< 0) anywhere, e.g. left-padded ``silver/sequences`` -> h [B, H]; PAD positions leave the
        state unchanged, and a row of only PAD gives zeros. ``scores(h)`` ranks the next item."""
        hidden = self.init_hidden(seq.shape[0], seq.device)  # [layers, B, H]
        out = hidden[-1]  # [B, H]
        for t in range(seq.shape[1]):
            step_out, new = self.forward_step(seq[:, t], hidden)
            real = seq[:, t] >= 0  # [B]
            hidden = torch.where(real.view(1, -1, 1), new, hidden)
            out = torch.where(real.view(-1, 1), step_out, out)
        return out

    def scores(self, out: Tensor, items: Tensor | None = None) -> Tensor:
        """out [B, H] -> r [B, M] against ``items`` [M], or [B, n_items] against the catalogue; out [T, B, H]
        against items [T, M] -> [T, B, M] (each step its own candidates)."""
        if items is None:
            return out @ self.out_emb.weight.T + self.out_bias.weight.T  # [B, n_items]
        items = items.long()
        return out @ self.out_emb(items).transpose(-1, -2) + self.out_bias(items).transpose(-1, -2)  # [..., B, M]


# ----------------------------------------------------------------------------------------------- losses


def _reduce(per_row: Tensor, valid: Tensor | None, usable: Tensor, reduction: Reduction) -> Tensor:
    """Mean (or sum) over the rows that are valid and have at least one usable negative (0 if there are none)."""
    keep = usable.any(dim=-1) if valid is None else (valid.bool() & usable.any(dim=-1))
    per_row = torch.where(keep, per_row, torch.zeros_like(per_row))  # no NaN/inf from dropped rows
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / keep.sum().clamp_min(1).to(per_row.dtype)


def _target_columns(scores: Tensor) -> Tensor:
    """[B, M] bool, True at (i, i): each row's target column (broadcasts over leading step dimensions)."""
    B, M = scores.shape[-2:]
    eye = torch.zeros(B, M, dtype=torch.bool, device=scores.device)
    eye[:, :B] = torch.eye(B, dtype=torch.bool, device=scores.device)
    return eye


def _targets_and_negatives(scores: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(target scores r_i [..., B], usable-negative mask [..., B, M]): the diagonal is the target, never a
    negative."""
    eye = _target_columns(scores)
    usable = ~eye.expand(scores.shape) if mask is None else (mask.bool() & ~eye)
    return scores.diagonal(dim1=-2, dim2=-1), usable


def negative_softmax(scores: Tensor, usable: Tensor) -> Tensor:
    """s_j: softmax of each row's scores over its usable negatives only, [B, M] (0 elsewhere)."""
    masked = scores.masked_fill(~usable, float("-inf"))
    # A row without usable negatives would be softmax(all -inf) = NaN, whose backward poisons the batch
    # even with a zero upstream gradient: give it finite scores, then zero its weights.
    masked = torch.where(usable.any(dim=-1, keepdim=True), masked, torch.zeros_like(scores))
    return torch.softmax(masked, dim=-1) * usable


def cross_entropy(scores: Tensor, mask: Tensor | None = None, log_q: Tensor | None = None,
                  valid: Tensor | None = None, reduction: Reduction = "mean") -> Tensor:
    """-log softmax(r - log_q)_i over the target and the usable negatives; log_q [M] or [..., B, M] is the
    log-probability with which each candidate was drawn (subtracting it corrects for popular items being
    negatives more often); None for no correction."""
    logits = scores if log_q is None else scores - log_q  # [B, M]
    _, usable = _targets_and_negatives(scores, mask)
    logits = logits.masked_fill(~(usable | _target_columns(scores)), float("-inf"))
    per_row = torch.logsumexp(logits, dim=-1) - logits.diagonal(dim1=-2, dim2=-1)  # [B]
    return _reduce(per_row, valid, usable, reduction)


def bpr_max(scores: Tensor, mask: Tensor | None = None, reg: float = 1.0, valid: Tensor | None = None,
            reduction: Reduction = "mean") -> Tensor:
    """-log Σ_j s_j σ(r_i - r_j) + λ Σ_j s_j r_j² (BPR-max with score regularisation, λ = ``reg``)."""
    target, usable = _targets_and_negatives(scores, mask)
    s = negative_softmax(scores, usable)  # [B, M]
    ranking = (s * torch.sigmoid(target.unsqueeze(-1) - scores)).sum(-1)  # [B]
    per_row = -torch.log(ranking + EPS) + reg * (s * scores.pow(2)).sum(-1)
    return _reduce(per_row, valid, usable, reduction)


def top1_max(scores: Tensor, mask: Tensor | None = None, valid: Tensor | None = None,
             reduction: Reduction = "mean") -> Tensor:
    """Σ_j s_j (σ(r_j - r_i) + σ(r_j²)) (TOP1-max; the σ(r_j²) term pushes negative scores to 0)."""
    target, usable = _targets_and_negatives(scores, mask)
    s = negative_softmax(scores, usable)  # [B, M]
    per_row = (s * (torch.sigmoid(scores - target.unsqueeze(-1)) + torch.sigmoid(scores.pow(2)))).sum(-1)
    return _reduce(per_row, valid, usable, reduction)


def elu_scores(scores: Tensor, alpha: float) -> Tensor:
    """The official implementation's final activation for BPR-max: ELU(r, alpha); 0 = identity."""
    return F.elu(scores, alpha) if alpha > 0 else scores
