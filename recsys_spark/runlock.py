"""One ``pipeline`` per warehouse and run date at a time.

Two pipelines of one run date would each rewrite the same silver tables and gold partitions; Delta
keeps every table whole, but the day could end with one run's split beside the other's models. So the
second stops at once, before its SparkSession starts, naming the first.

The lock is a file, ``<warehouse>/_locks/pipeline-<run date>.json``, created with ``O_EXCL`` (atomic on
a local or NFS file system) and holding the owner's host, pid and start time. A lock whose process is
gone (same host, pid not alive; a SIGKILL leaves its lock behind) is taken over with a warning. On an
object store (``s3a://``, ``abfss://``, ...) there is no atomic create-if-absent, so no lock is taken:
there the scheduler must run one pipeline per date (the daily DAG has ``max_active_runs=1``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from recsys_spark.errors import RecsysError

log = logging.getLogger(__name__)

# A lock file still empty or half-written this long after its creation belongs to no live process.
UNWRITTEN_LOCK_SECONDS = 30.0


def lock_path(warehouse: str, run_date: dt.date) -> str:
    return os.path.join(warehouse.removeprefix("file://"), "_locks", f"pipeline-{run_date.isoformat()}.json")


def holder(path: str) -> dict | None:
    """The lock's owner, or None when the file is gone or not (yet) a whole JSON object."""
    try:
        with open(path) as fh:
            holder = json.load(fh)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _stale(path: str, owner: dict | None) -> bool:
    if owner is None:
        try:
            return time.time() - os.path.getmtime(path) > UNWRITTEN_LOCK_SECONDS
        except FileNotFoundError:
            return True
    return owner.get("host") == socket.gethostname() and not _process_alive(int(owner.get("pid", -1)))


@contextmanager
def pipeline_lock(warehouse: str, run_date: dt.date) -> Iterator[None]:
    """Hold the lock of ``run_date``'s pipeline in ``warehouse`` for the ``with`` block."""
    if "://" in warehouse and not warehouse.startswith("file://"):
        log.info("no pipeline lock on %s: object stores cannot create a file atomically", warehouse)
        yield
        return
    path = lock_path(warehouse, run_date)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": dt.datetime.now(dt.UTC).isoformat()}
    for _attempt in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = holder(path)
            if not _stale(path, owner):
                who = (f"pid {owner['pid']} on {owner['host']} since {owner['started']}" if owner
                       else "a process that is starting")
                raise RecsysError(f"the pipeline of {run_date} is already running in {warehouse}: {who} "
                                  f"(lock {path}); wait for it, or remove the lock if that process is gone") from None
            log.warning("taking over the lock %s of a pipeline that is gone (%s)", path, owner)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise RecsysError(f"could not take the lock {path}: other pipelines of {run_date} keep taking it")
    try:
        yield
    finally:
        if holder(path) == me:
            os.remove(path)
