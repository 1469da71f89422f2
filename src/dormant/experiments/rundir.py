"""What keeps a run directory whole: one writer at a time, files replaced atomically, and
files that are damaged refused with what to do.

    lock      an OS lock (``flock``) on ``.lock``, which records the owner's pid and host for
              messages only: a second process waits until the first is done; the lock dies
              with its process (a kill, a crash), so there is no stale lock to take over and
              no pid to be fooled by (pid reuse); the file itself is never removed (removing
              it would let a waiter and a newcomer lock two different files)
    metrics   ``metrics.jsonl`` (`dormant.jsonl`): a torn last line (killed mid-write) is
              dropped, a damaged line before it is refused; rewritten by write-then-rename
    config    ``config.json``: refused when it holds another config; rewritten when damaged
"""
from __future__ import annotations

import contextlib
import json
import os
try:
    import fcntl
except ImportError:                     # Windows
    fcntl = None
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["CorruptRunError", "run_lock", "writable_dir", "write_json"]


class CorruptRunError(ValueError):
    """A file of a run directory is damaged or foreign; the message says what to do."""


def writable_dir(path: str | os.PathLike, option: str) -> Path:
    """`path` as a folder this process can write (created if missing), checked before any
    training: a file in its place, or a folder that cannot be written, is refused naming
    `option`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option}: {path} is a file, not a folder: give a folder (it is "
                         "created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".dormant-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{option}: cannot write to {path} ({err.strerror or err}): give a "
                         "folder you can write") from None
    return path


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a temporary file, then a rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except OSError:             # disk full: no half file left behind
        tmp.unlink(missing_ok=True)
        raise


def _owner(lock: Path) -> str:
    try:
        pid, host = lock.read_text().split()[:2]
        return f"process {int(pid)} on {host}"
    except (OSError, ValueError):
        return "another process"


@contextlib.contextmanager
def run_lock(rd: Path, *, poll: float = 0.5, log: Callable[[str], None] = print
             ) -> Iterator[None]:
    """Hold the run directory's lock for the block. A live process holding it is waited
    for (with one message); the OS releases it when its holder exits, however it exits."""
    if fcntl is None:
        raise OSError("run directories need fcntl.flock (Linux, macOS): this platform has none")
    lock = rd / ".lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    log(f"[wait] {rd} is being trained by {_owner(lock)}; waiting for it to "
                        "finish")
                    said = True
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)                    # releases the lock
