"""A plain SASRec (Kang & McAuley 2018) outside the pipeline: the reference peer of ``bench_quality.py``.

Why it exists: the project's SASRec (``recsys_spark/models/sasrec.py``) trains through Spark, Petastorm,
a launcher and its own transformer blocks. This one is a single PyTorch loop over numpy arrays, built on
``torch.nn.TransformerEncoder`` (a library block, not ours), so a gap between the two on the same split,
with the same budget, is the pipeline's doing, and no gap means the pipeline loses nothing.

What it shares with ours, because the protocol fixes it: the training rows (each user's time-ordered
train history cut from the end into windows of ``max_len + 1`` items, every transition once), full-softmax
cross-entropy over the catalogue, Adam, the global batch, validation every ``validate_every_steps`` on each
user's latest train item (whole history filtered) with ``patience`` validations, and the input at
inference (the last ``max_len`` items). What differs on purpose: right padding with left-aligned
positions (RecBole's convention; ours pads on the left), the library's encoder layer, no Spark anywhere.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_spark import tables as tb

DEFAULTS = {"max_len": 50, "d": 64, "heads": 1, "blocks": 2, "dropout": 0.2, "lr": 0.001, "batch_size": 128,
            "validate_every_steps": 100, "patience": 5, "max_steps": 20000, "validation_users": 3000, "seed": 42}


class ReferenceSASRec(nn.Module):
    """Item + position embeddings -> causal pre-LN transformer -> LayerNorm; logits = hidden @ E_itemsᵀ.
    Tokens: 0 is padding (on the right), item i is token i + 1."""

    def __init__(self, n_items: int, max_len: int, d: int, heads: int, blocks: int, dropout: float) -> None:
        super().__init__()
        self.d = d
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, d)  # row p = the p-th item of the input
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=d, dropout=dropout, activation="relu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.item_emb.weight, std=d**-0.5)
        nn.init.normal_(self.pos_emb.weight, std=d**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, L] -> hidden [B, L, d]; row t sees tokens 0..t only, so right padding never reaches a
        real position and needs no key mask."""
        L = tokens.shape[1]
        x = self.item_emb(tokens) * math.sqrt(self.d) + self.pos_emb(torch.arange(L, device=tokens.device))  # [B, L, d]
        causal = nn.Transformer.generate_square_subsequent_mask(L, device=tokens.device)  # [L, L], -inf above diag
        return self.norm(self.encoder(self.dropout(x), mask=causal, is_causal=True))  # [B, L, d]

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden @ self.item_emb.weight[1:].T  # [*, n_items]


def histories(train: pd.DataFrame) -> dict[int, np.ndarray]:
    """Each user's train items in time order (ties by ``item_order`` when present, as the pipeline does)."""
    tie = tb.ITEM_ORDER if tb.ITEM_ORDER in train.columns else tb.ITEM_IDX
    ordered = train.sort_values([tb.USER_IDX, tb.FIRST_TS, tie], kind="stable")
    return {int(u): g[tb.ITEM_IDX].to_numpy(np.int64) for u, g in ordered.groupby(tb.USER_IDX, sort=False)}


def windows(seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """Token windows [N, max_len + 1], right-padded: each sequence cut from its end into slices of
    ``max_len + 1`` items overlapping by one, so every (item, next item) pair is a training pair once."""
    rows = []
    for seq in seqs:
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            row = np.zeros(max_len + 1, np.int64)
            row[: end - start] = seq[start:end] + 1
            rows.append(row)
            end = start + 1
    return np.stack(rows)


def last_inputs(seqs: list[np.ndarray], max_len: int) -> tuple[Tensor, Tensor]:
    """(tokens [B, max_len] of each sequence's last ``max_len`` items, right-padded; index of the last one)."""
    tokens = np.zeros((len(seqs), max_len), np.int64)
    for row, seq in enumerate(seqs):
        tail = seq[-max_len:]
        tokens[row, : len(tail)] = tail + 1
    return torch.from_numpy(tokens), torch.tensor([min(len(s), max_len) - 1 for s in seqs])


@torch.no_grad()
def scores_after(model: ReferenceSASRec, seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """Scores of every item after each sequence [B, n_items], the sequence's own items set to -inf."""
    model.eval()
    device = model.item_emb.weight.device
    out = []
    for lo in range(0, len(seqs), 256):
        part = seqs[lo:lo + 256]
        tokens, last = last_inputs(part, max_len)
        hidden = model(tokens.to(device))[torch.arange(len(part), device=device), last.to(device)]  # [b, d]
        scores = model.logits(hidden).float().cpu().numpy()
        for row, seq in enumerate(part):
            scores[row, seq] = -np.inf
        out.append(scores)
    model.train()
    return np.concatenate(out)


def ndcg_at_10(scores: np.ndarray, targets: np.ndarray) -> float:
    rank = (scores > scores[np.arange(len(targets)), targets][:, None]).sum(axis=1)  # 0 = first
    return float(np.where(rank < 10, 1.0 / np.log2(rank + 2), 0.0).mean())


def fit(train: pd.DataFrame, n_items: int, setting: dict,
        device: str | torch.device = "cpu") -> tuple[ReferenceSASRec, dict[int, np.ndarray], dict]:
    """Train on ``train`` (a pandas frame of silver/train rows); returns the best-on-validation network, the
    users' full histories (the inputs at inference) and a training summary. On CUDA the steps run under
    bf16 autocast, as the project's trainer does (``train.bf16``)."""
    p = {**DEFAULTS, **setting}
    torch.manual_seed(p["seed"])
    rng = np.random.default_rng(p["seed"])
    started = time.perf_counter()
    full = histories(train)
    users = np.array([u for u, s in full.items() if len(s) >= 2])
    val_users = set(rng.permutation(users)[: p["validation_users"]].tolist())
    fit_seqs = [s[:-1] if u in val_users else s for u, s in full.items()]
    val = sorted(val_users)
    val_inputs, val_targets = [full[u][:-1] for u in val], np.array([full[u][-1] for u in val])
    device = torch.device(device)
    rows = torch.from_numpy(windows(fit_seqs, p["max_len"])).to(device)
    model = ReferenceSASRec(n_items, p["max_len"], p["d"], p["heads"], p["blocks"], p["dropout"]).to(device)
    bf16 = device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=p["lr"])
    best, best_state, best_step, best_s, since, step, curve = -1.0, None, 0, 0.0, 0, 0, []
    while step < p["max_steps"] and since < p["patience"]:  # patience: validations without improvement
        for batch in rows[torch.randperm(len(rows)).to(device)].split(p["batch_size"]):
            inputs, targets = batch[:, :-1], batch[:, 1:] - 1  # next item of each position; -1 = padding
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                hidden = model(inputs)[targets >= 0]  # [N, d], the real (input, target) pairs
                loss = F.cross_entropy(model.logits(hidden), targets[targets >= 0])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if not val:  # no hold-out: exactly max_steps steps (a refit for the step count validation chose)
                if step >= p["max_steps"]:
                    break
                continue
            if step % p["validate_every_steps"] == 0:
                value = ndcg_at_10(scores_after(model, val_inputs, p["max_len"]), val_targets)
                curve.append((step, round(value, 5)))
                if value > best:
                    best, best_state, best_step, since = value, copy.deepcopy(model.state_dict()), step, 0
                    best_s = time.perf_counter() - started
                else:
                    since += 1
                if since >= p["patience"] or step >= p["max_steps"]:
                    break
    if val:
        model.load_state_dict(best_state)
    else:
        best_step = step
    summary = {"steps_to_best": best_step, "steps_per_epoch": math.ceil(len(rows) / p["batch_size"]),
               "validation_ndcg@10": round(best, 5), "curve": curve,
               "train_s": round(time.perf_counter() - started, 1), "seconds_to_best": round(best_s, 1)}
    return model, full, summary


def recommend(model: ReferenceSASRec, full: dict[int, np.ndarray], max_len: int, k: int) -> pd.DataFrame:
    """Top-``k`` of every user after their whole history (train items filtered) as (user_idx, item_idx,
    score, rank) rows."""
    users = list(full)
    scores = scores_after(model, [full[u] for u in users], max_len)
    top = np.argsort(-scores, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    frame = pd.DataFrame({tb.USER_IDX: np.repeat(users, k).astype(np.int32), tb.ITEM_IDX: top.ravel().astype(np.int32),
                          tb.SCORE: top_scores.ravel().astype(np.float64),
                          tb.RANK: np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))})
    return frame[np.isfinite(frame[tb.SCORE])]
