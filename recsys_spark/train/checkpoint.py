"""Training checkpoints that load with ``torch.load(path, weights_only=True)``: no pickled classes.

A checkpoint holds tensors, dicts, lists, numbers and strings only: the model's state_dict, the
optimizer's state_dict, the number of epochs completed, the per-epoch history, the best epoch so far, and
the network's constructor arguments (``init_kwargs``) and the training config as JSON strings: artifacts are
not pickles. Files are written to a temporary name and renamed, so a crash never leaves half a checkpoint.

Layout of a checkpoint directory: ``epoch-0001.pt``, ``epoch-0002.pt``, ... (one per completed epoch, the
oldest pruned) and ``best.pt`` (a checkpoint of the best epoch by the validation metric).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

FORMAT_VERSION = 1
BEST_NAME = "best.pt"
_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.pt$")


@dataclass
class Checkpoint:
    """The state of a run after ``epoch`` completed epochs (1-based: epoch 1 is the first)."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float | None = None
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def cpu_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state_dict (a snapshot: later training steps do not change it)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state_dict.items()}


def epoch_path(directory: str, epoch: int) -> str:
    return os.path.join(directory, f"epoch-{epoch:04d}.pt")


def save(path: str, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, then rename)."""
    payload = {
        "format": FORMAT_VERSION,
        "epoch": int(checkpoint.epoch),
        "model": checkpoint.model,
        "optimizer": checkpoint.optimizer,
        "history": checkpoint.history,
        "best_epoch": checkpoint.best_epoch,
        "best_score": checkpoint.best_score,
        "init_kwargs": json.dumps(checkpoint.init_kwargs, sort_keys=True),
        "config": json.dumps(checkpoint.config, sort_keys=True),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint with ``weights_only=True`` (no code runs while loading)."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {payload.get('format')!r}, expected {FORMAT_VERSION}")
    return Checkpoint(
        epoch=payload["epoch"],
        model=payload["model"],
        optimizer=payload["optimizer"],
        history=payload["history"],
        best_epoch=payload["best_epoch"],
        best_score=payload["best_score"],
        init_kwargs=json.loads(payload["init_kwargs"]),
        config=json.loads(payload["config"]),
    )


def epochs_saved(directory: str) -> list[int]:
    """Completed epochs that have a checkpoint in ``directory``, ascending."""
    if not os.path.isdir(directory):
        return []
    found = (_EPOCH_FILE.match(name) for name in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found if m)


def latest(directory: str) -> str | None:
    """The checkpoint of the last completed epoch in ``directory``, or None."""
    epochs = epochs_saved(directory)
    return epoch_path(directory, epochs[-1]) if epochs else None


def prune(directory: str, keep: int) -> None:
    """Delete all but the ``keep`` most recent epoch checkpoints (``keep`` = 0 keeps them all)."""
    if keep <= 0:
        return
    for epoch in epochs_saved(directory)[:-keep]:
        os.remove(epoch_path(directory, epoch))
