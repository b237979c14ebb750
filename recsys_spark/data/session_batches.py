"""Session-parallel mini-batches (Hidasi et al. 2016, "Session-based Recommendations with Recurrent Neural
Networks", section 3.1.1), as their own iterator, tested on its own.

Each of the B rows of a mini-batch follows one session. At every step a row emits (input, target): the
session's item at its current position and the item after it. When a row's session has no next item
left, the row takes the next session in order, and that step's ``reset`` is True for it: the model must
zero the row's hidden state before reading the input (``GRU4Rec.forward_step(..., reset=...)``). The
first step of every row is a reset too. When sessions run out, rows fall idle: their input and target
are ``PAD`` (-1) and ``active`` is False; the iteration ends when every row is idle. (The official code
drops idle rows from the batch instead; keeping them with a mask keeps the batch shape fixed, which
keeps row identities stable for the hidden state.)

Sessions of length 1 have no (input, target) pair and are skipped. Sessions are taken in the order given
(the paper orders them by start time; :func:`sessions_from_events` does so), or shuffled with a seed.

A user's whole history can be fed as one long session: group events by user instead of session
(:func:`sessions_from_events` with ``keys = user_idx``).

Everything here is numpy; a step's arrays (or a whole pass's, ``stacked``) go to torch with
``torch.from_numpy``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

PAD = -1  # recsys_spark.tables.PAD_IDX (no Spark import here)


class Step(NamedTuple):
    inputs: np.ndarray  # [B] int64, the item each row reads (PAD on idle rows)
    targets: np.ndarray  # [B] int64, the next item, to be predicted (PAD on idle rows)
    reset: np.ndarray  # [B] bool, True where the row starts a new session at this step
    active: np.ndarray  # [B] bool, False on idle rows


class SessionData(NamedTuple):
    """Sessions concatenated: session s is ``items[offsets[s]:offsets[s + 1]]``."""

    items: np.ndarray  # [total] int64
    offsets: np.ndarray  # [S + 1] int64

    @classmethod
    def from_lists(cls, sessions: Sequence[Sequence[int] | np.ndarray], min_length: int = 2) -> SessionData:
        """Sessions as item lists; those shorter than ``min_length`` are left out."""
        kept = [np.asarray(s, dtype=np.int64) for s in sessions if len(s) >= min_length]
        lengths = np.array([len(s) for s in kept], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        items = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
        return cls(items, offsets)

    @property
    def n_sessions(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_events(self) -> int:
        """(input, target) pairs: each session contributes its length - 1."""
        return int(len(self.items) - self.n_sessions)

    def session(self, s: int) -> np.ndarray:
        return self.items[self.offsets[s]:self.offsets[s + 1]]


def sessions_from_padded(items: np.ndarray, pad: int = PAD) -> list[np.ndarray]:
    """Rows of a padded array [R, L] (``PAD`` anywhere, e.g. ``silver/sequences``) as item lists."""
    items = np.asarray(items)
    return [row[row != pad] for row in items]


def sessions_from_events(keys: np.ndarray, items: np.ndarray, times: np.ndarray) -> list[np.ndarray]:
    """Events grouped into item lists, in time order within a group and groups ordered by their first
    event (ties: by key). ``keys`` are session ids, or user ids to make each user's whole history one
    long session."""
    keys, items, times = np.asarray(keys), np.asarray(items, dtype=np.int64), np.asarray(times)
    if len(keys) == 0:
        return []
    order = np.lexsort((times, keys))  # by key, then time
    keys, items, times = keys[order], items[order], times[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    groups = np.split(items, starts[1:])
    first_times = times[starts]
    by_start = np.lexsort((keys[starts], first_times))
    return [groups[g] for g in by_start]


class SessionParallelBatches:
    """Iterates session-parallel :class:`Step` s over ``sessions`` with ``batch_size`` rows.

    >>> steps = list(SessionParallelBatches([[1, 2, 3], [4, 5], [6], [7, 8]], batch_size=2))
    >>> [(s.inputs.tolist(), s.targets.tolist(), s.reset.tolist()) for s in steps]
    [([1, 4], [2, 5], [True, True]), ([2, 7], [3, 8], [False, True])]
    """

    def __init__(self, sessions: SessionData | Sequence[Sequence[int] | np.ndarray], batch_size: int,
                 shuffle: bool = False, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = sessions if isinstance(sessions, SessionData) else SessionData.from_lists(sessions)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self._epoch = 0

    def __iter__(self) -> Iterator[Step]:
        data, B = self.data, self.batch_size
        order = np.arange(data.n_sessions)
        if self.shuffle:  # a new order each pass, reproducible from (seed, pass)
            order = np.random.default_rng([self.seed, self._epoch]).permutation(data.n_sessions)
            self._epoch += 1
        nxt = 0  # the next session of ``order`` to hand out
        pos = np.zeros(B, dtype=np.int64)  # index into data.items of each row's current input
        end = np.zeros(B, dtype=np.int64)  # one past the row's session's last item
        active = np.zeros(B, dtype=bool)
        reset = np.zeros(B, dtype=bool)

        def assign(rows: np.ndarray) -> None:
            nonlocal nxt
            take = min(len(rows), data.n_sessions - nxt)
            got, idle = rows[:take], rows[take:]
            sessions = order[nxt:nxt + take]
            pos[got], end[got] = data.offsets[sessions], data.offsets[sessions + 1]
            active[got], reset[got] = True, True
            active[idle] = False
            nxt += take

        assign(np.arange(B))
        while active.any():
            inputs = np.where(active, data.items[np.where(active, pos, 0)], PAD)
            targets = np.where(active, data.items[np.where(active, pos + 1, 0)], PAD)
            yield Step(inputs, targets, reset.copy(), active.copy())
            reset[:] = False
            pos[active] += 1
            finished = np.flatnonzero(active & (pos + 1 >= end))  # no target left after this input
            if len(finished):
                assign(finished)  # in row order, as the official implementation

    def stacked(self) -> Step:
        """One whole pass as arrays [T, B] (T steps; T = 0 when no session has two items): what a GPU
        takes in one host-to-device copy instead of four small ones per step."""
        steps = list(self)
        if not steps:
            empty = np.zeros((0, self.batch_size), dtype=np.int64)
            return Step(empty, empty, empty.astype(bool), empty.astype(bool))
        return Step(*(np.stack(column) for column in zip(*steps, strict=True)))
