"""Run directories: the name of every file in one, the provenance line of results files, and
what keeps a directory whole (one writer at a time, files replaced atomically, damaged files
refused with what to do). Experiments write through it and `report` reads through it; it
imports nothing of dormant's.

    runs/<label>/           (`RunFiles`)
        config.json         the full config
        metrics.jsonl       one line of metrics per epoch
        checkpoint.pt       the last epoch's state (model, optimizer, callbacks, RNG)
        model.pt            final weights (state_dict)
        architecture.json   the widths of a model compacted during training (DemP)
        result.json         written last: the run is finished
        .lock               held by the process training it
    <out>/                  (`CompareFiles`, a `dormant compare`)
        compare.json        the spec, the table and the runs' directories
        compare.md, .csv    the table
        runs.jsonl.gz       every run's metrics (the report reads them when runs are gone)

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
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["CompareFiles", "CorruptRunError", "HISTORIES", "RunFiles", "code_version",
           "machine", "run_lock", "writable_dir", "write_json"]

HISTORIES = "runs.jsonl.gz"


@dataclass(frozen=True)
class _Folder:
    dir: Path

    def __post_init__(self):
        object.__setattr__(self, "dir", Path(self.dir))


class RunFiles(_Folder):
    """The files of one run directory."""

    config = property(lambda self: self.dir / "config.json")
    metrics = property(lambda self: self.dir / "metrics.jsonl")
    checkpoint = property(lambda self: self.dir / "checkpoint.pt")
    model = property(lambda self: self.dir / "model.pt")
    architecture = property(lambda self: self.dir / "architecture.json")
    result = property(lambda self: self.dir / "result.json")
    lock = property(lambda self: self.dir / ".lock")


class CompareFiles(_Folder):
    """The files a `dormant compare` writes into its output folder."""

    compare = property(lambda self: self.dir / "compare.json")
    markdown = property(lambda self: self.dir / "compare.md")
    csv = property(lambda self: self.dir / "compare.csv")
    histories = property(lambda self: self.dir / HISTORIES)


def _git_revision(cwd: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=cwd)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def code_version() -> str:
    """dormant's version, with the git revision of its source tree when it has one."""
    import sys
    from importlib.metadata import PackageNotFoundError, version
    try:
        base = version("dormant")
    except PackageNotFoundError:        # run from a source tree that was not installed
        base = getattr(sys.modules.get("dormant"), "__version__", "0+unknown")
    rev = _git_revision(Path(__file__).parent)
    return f"{base}+{rev}" if rev else base


def machine(threads: int | None = None) -> str:
    """One line naming the machine, torch, the threads each run had (default: this
    process's) and the code version, for results files."""
    import platform

    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    rev = _git_revision(Path(__file__).parent)
    threads = threads or torch.get_num_threads()
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
            f"{threads} thread{'s' if threads > 1 else ''}"
            + (f", code {rev}" if rev else ""))


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
    lock = RunFiles(rd).lock
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
