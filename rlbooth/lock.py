"""One writer per output folder: `rlbooth personalize`, `align` and `run` hold a lock on the folder they write.

The lock is an OS file lock (`flock`) on `<folder>/.rlbooth.lock`, which also holds the owner's pid, host,
command and start time for the message a second writer gets. The kernel drops the lock when its process
ends, however it ends, so a lock left by a killed process is free at once: the next writer takes it over
(and says whose it was) without guessing from pids whether the owner still lives. The file stays; only the
lock on it says "held". Under torchrun only the main process takes it (the other ranks write with it).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlbooth.errors import RlboothError

logger = logging.getLogger(__name__)
LOCK = ".rlbooth.lock"


class OutputLockedError(RlboothError, RuntimeError):
    """Another process is writing the output folder; the message names the folder and that process."""


@contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold `folder`'s lock for the block; refuse at once (no waiting) if another process holds it."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLockedError(f"{folder} is being written by another process ({_describe(path)}); "
                                    "wait for it to finish, or choose another --output") from None
        previous = _owner(path)
        if previous:
            logger.info("took over %s: its last owner (%s) has ended", path, _describe(path))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # released: the file stays, empty (removing it would race with a new writer)


def _owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(path: Path) -> str:
    owner = _owner(path)
    if not owner:
        return "unknown process"
    return (f"pid {owner.get('pid')} on {owner.get('host')}, `{owner.get('command')}`, "
            f"started {owner.get('started')}")
