"""What keeps a run directory whole: one writer at a time, files replaced atomically, and
files that are damaged refused with what to do.

    lock      an exclusive lock file (``.lock``, the owner's pid and host); a second process
              waits until the first is done, a lock whose process is gone is taken over
    metrics   ``metrics.jsonl`` (`dormant.jsonl`): a torn last line (killed mid-write) is
              dropped, a damaged line before it is refused; rewritten by write-then-rename
    config    ``config.json``: refused when it holds another config; rewritten when damaged
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["CorruptRunError", "run_lock", "write_json"]


class CorruptRunError(ValueError):
    """A file of a run directory is damaged or foreign; the message says what to do."""


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a temporary file, then a rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by someone else
        return True
    return True


def _owner(lock: Path) -> tuple[int, str] | None:
    try:
        pid, host = lock.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_lock(rd: Path, *, poll: float = 0.5, log: Callable[[str], None] = print
             ) -> Iterator[None]:
    """Hold the run directory's lock for the block. Another live process holding it is
    waited for (with one message); a lock left by a process that died is taken over."""
    lock = rd / ".lock"
    me = f"{os.getpid()} {socket.gethostname()}\n"
    said = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(lock)
            if owner is None:           # being written right now, or damaged: look again
                time.sleep(poll)
                owner = _owner(lock)
            stale = owner is None or (owner[1] == socket.gethostname() and not _alive(owner[0]))
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            if not said:
                log(f"[wait] {rd} is being trained by process {owner[0]} on {owner[1]}; "
                    "waiting for it to finish")
                said = True
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if lock.read_text() == me:
                lock.unlink()
