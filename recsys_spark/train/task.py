"""What the training tasks share: negatives drawn inside the loop, and validation on a hold-out.

A model's training task (in its module under ``recsys_spark.models``) implements the trainer's
``TrainTask`` protocol; most derive from :class:`SampledTask`, which gives them per-device negative
generators, the popularity distribution and :meth:`SampledTask.validate`: HR@k and NDCG@k of a small
in-memory :class:`Holdout` ranked against the whole catalogue, seen items filtered. Tasks hold plain
data only (params, counts, numpy arrays), so they pickle to the ranks; the device is never chosen here:
``loss`` follows the batch, ``validate`` the model's parameters.

Negatives are drawn from a per-device ``torch.Generator``. Its seed comes from ``seed_negatives(seed)``
when the caller fixes it, else from the task's seed and ``torch.initial_seed()``, which the trainer sets
per rank and epoch: so ranks draw different negatives, a seeded run repeats, and a run resumed from a
checkpoint draws in each later epoch exactly the negatives the uninterrupted run drew (the generator
starts afresh when the global seed changes, rather than carrying one stream across epochs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from recsys_spark import metrics
from recsys_spark.train import negatives
from recsys_spark.train.distributed import unwrap


@dataclass(frozen=True)
class Holdout:
    """A small validation set kept in memory: one target per row, ranked against the whole catalogue.

    ``inputs``: what the model scores from, user_idx [U] for NCF or left-padded sequences [U, L] for
    SASRec. ``targets`` [U]: the held-out item. ``seen_indptr`` [U + 1], ``seen_items``: a CSR of the items
    filtered from each row's ranking (its train items); the target itself is never filtered.
    """

    inputs: np.ndarray
    targets: np.ndarray
    seen_indptr: np.ndarray
    seen_items: np.ndarray
    k: int = 10

    @classmethod
    def from_lists(cls, inputs: np.ndarray, targets: np.ndarray, seen: Sequence[Sequence[int]],
                   k: int = 10) -> Holdout:
        lengths = np.array([len(s) for s in seen], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        items = np.concatenate([np.asarray(s, dtype=np.int64) for s in seen]) if len(seen) else np.zeros(0, np.int64)
        return cls(np.asarray(inputs), np.asarray(targets, dtype=np.int64), indptr, items, k)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def rank_holdout(score: Callable[[Tensor], Tensor], holdout: Holdout, n_items: int,
                 device: torch.device) -> dict[str, float]:
    """HR@k and NDCG@k of ``holdout`` under ``score`` (inputs [b, ...] -> logits [b, n_items]).

    Seen items are filtered, the rest of the catalogue ranked; ties go to the smaller item_idx (a stable
    sort), as in ``Recommender.recommend``. The per-user formulas are ``recsys_spark.metrics``.
    """
    k, n = holdout.k, len(holdout.targets)
    users_per_block = max(1, (1 << 22) // max(1, n_items))
    hr, ndcg = np.zeros(n), np.zeros(n)
    for start in range(0, n, users_per_block):
        stop = min(start + users_per_block, n)
        scores = score(torch.as_tensor(holdout.inputs[start:stop], device=device)).float()  # [b, n_items]
        lo, hi = holdout.seen_indptr[start], holdout.seen_indptr[stop]
        rows = np.repeat(np.arange(stop - start), np.diff(holdout.seen_indptr[start : stop + 1]))
        cols = holdout.seen_items[lo:hi]
        keep = cols != holdout.targets[start:stop][rows]  # never filter the target itself
        scores[torch.as_tensor(rows[keep], device=device), torch.as_tensor(cols[keep], device=device)] = -torch.inf
        top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].cpu().numpy()  # [b, k]
        for row, (ranked, target) in enumerate(zip(top, holdout.targets[start:stop], strict=True)):
            values = metrics.user_metrics(ranked, [target], ks=[k])
            hr[start + row], ndcg[start + row] = values[metrics.HR][0], values[metrics.NDCG][0]
    return {f"{metrics.HR}@{k}": float(hr.mean()), f"{metrics.NDCG}@{k}": float(ndcg.mean())} if n else {}


class SampledTask:
    """The base of most training tasks: per-device negative generators, the popularity distribution
    (counts ** ``exponent``), and validation on ``holdout`` (None: no validation metrics)."""

    def __init__(self, seed: int, n_items: int, item_counts: np.ndarray | None, exponent: float,
                 holdout: Holdout | None) -> None:
        if item_counts is not None and len(item_counts) != n_items:
            raise ValueError(f"item_counts has {len(item_counts)} entries for {n_items} items")
        self.seed, self.n_items, self.holdout = seed, n_items, holdout
        self.item_counts = None if item_counts is None else np.asarray(item_counts, dtype=np.float64)
        self.exponent = exponent
        self._negative_seed: int | None = None
        self._generators: dict[torch.device, tuple[int, torch.Generator]] = {}  # device -> (seed, generator)
        self._probs: dict[torch.device, Tensor] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_generators"], state["_probs"] = {}, {}  # rebuilt on the rank's device
        return state

    def seed_negatives(self, seed: int) -> None:
        """Fix the negatives' stream (e.g. ``rank_seed(seed, rank)``); resets the generators."""
        self._negative_seed, self._generators = seed, {}

    def generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        seed = self._negative_seed
        if seed is None:
            seed = int(np.random.SeedSequence([self.seed, torch.initial_seed()]).generate_state(1)[0])
        if self._generators.get(device, (None,))[0] != seed:
            self._generators[device] = (seed, torch.Generator(device=device).manual_seed(seed))
        return self._generators[device][1]

    def probs(self, device: torch.device) -> Tensor:
        """Popularity sampling distribution [n_items] (``negatives.popularity_probs``) on ``device``."""
        if self.item_counts is None:
            raise ValueError("popularity negatives need item_counts (train interactions per item)")
        if device not in self._probs:
            self._probs[device] = negatives.popularity_probs(self.item_counts, self.exponent).to(device)
        return self._probs[device]

    def sample(self, kind: str, shape: tuple[int, ...], device: torch.device,
               positives: Tensor | None = None) -> negatives.Negatives:
        g = self.generator(device)
        if kind == "popularity":
            return negatives.popularity(self.probs(device), shape, g, positives=positives)
        return negatives.uniform(self.n_items, shape, g, positives=positives)

    def holdout_scores(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """Scores of the whole catalogue for hold-out inputs [U, ...] -> [U, n_items]; by default the
        network's ``score_all`` (of user indices, or of sequences). Override for other inputs."""
        return model.score_all(inputs.long())

    def validate(self, model: nn.Module) -> dict[str, float]:
        """HR/NDCG@k of the hold-out over the whole catalogue."""
        if self.holdout is None:
            return {}
        inner = unwrap(model)
        with evaluating(inner):
            return rank_holdout(lambda inputs: self.holdout_scores(inner, inputs), self.holdout, self.n_items,
                                model_device(inner))
