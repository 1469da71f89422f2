"""Shared fixtures."""
import contextlib
import subprocess
import warnings

import pytest


@pytest.fixture
def no_fx_warning():
    """Hugging Face models are not traceable by torch.fx: silence dormant's note that sites
    come from the recorded data flow instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dormant: torch.fx could not trace")
        yield


@contextlib.contextmanager
def interrupting(name: str, epoch: int = 2):
    """Inside the block the registered method `name` raises KeyboardInterrupt at the end of
    `epoch` (after acting, before the epoch's checkpoint), as a killed run would stop; the
    registry is restored after it. Also for worker processes (``from conftest import ...``)."""
    from dormant.methods import METHODS
    original = METHODS.get(name)

    class Interrupted(original):
        def end_epoch(self, *args, **kwargs):
            out = super().end_epoch(*args, **kwargs)
            if self.epoch == epoch:
                raise KeyboardInterrupt
            return out

    with METHODS.scoped():
        METHODS._items[name] = Interrupted
        yield


@pytest.fixture
def interrupt_at_epoch():
    """``with interrupt_at_epoch("redo", 2):`` -- see `interrupting`."""
    return interrupting


TEARDOWN_ABORT = "terminate called without an active exception"


def run_distributed(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(argv)` of a command that starts several ranks (torchrun, Lightning's
    launcher); run once more when a rank aborted in torch's teardown after the work was done
    (gloo under FSDP2, torch 2.13: "terminate called without an active exception", a few runs
    in a hundred here even after a barrier and destroy_process_group). Any other failure is
    returned as it is."""
    proc = subprocess.run(argv, **kwargs)
    if proc.returncode != 0 and TEARDOWN_ABORT in (proc.stderr or ""):
        proc = subprocess.run(argv, **kwargs)
    return proc
