"""The scripts in examples/ run (seconds each) and do what they say."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_own_loop_runs_every_method():
    from dormant.methods import METHODS
    out = _run("own_loop.py")
    for name in METHODS.names():
        if name != "none":
            assert f"{name}: done" in out, name
    stripped = re.findall(r"synaptic-stripping epoch 3: .*'ss/stripped_total': (\d+)", out)
    assert stripped and int(stripped[0]) > 0
    assert "new_round" in out and "restored" in out


@pytest.mark.slow
def test_dict_batches_revives_the_killed_units():
    out = _run("dict_batches.py")
    assert "before: 32 of 64 hidden units dead" in out
    assert "fc1 -> relu -> ['fc2']" in out
    dead_after = int(re.search(r"after: (\d+) of 64", out).group(1))
    assert dead_after < 32


@pytest.mark.slow
def test_physical_removal_shrinks_the_model_and_the_ema_follows():
    pytest.importorskip("torch_pruning")
    out = _run("physical_removal.py")
    first = int(re.search(r"epoch 1: .* params (\d+)", out).group(1))
    ema = int(re.search(r"EMA model: (\d+) parameters", out).group(1))
    final = int(re.findall(r"params (\d+)", out)[-1])
    assert ema == final < first


@pytest.mark.slow
def test_a_bad_method_name_is_refused():
    out = subprocess.run([sys.executable, str(EXAMPLES / "own_loop.py"), "gizmo"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "unknown method 'gizmo'" in out.stderr


@pytest.mark.slow
def test_fsdp_loop_runs_a_method_on_two_sharded_ranks():
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("no torch.distributed")
    from conftest import run_distributed
    out = run_distributed([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", str(EXAMPLES / "fsdp_loop.py"), "redo"], capture_output=True,
                          text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    epochs = re.findall(r"redo epoch \d: .*'redo/recycled_total': (\d+).*decided the same: (\w+)",
                        out.stdout)
    assert len(epochs) == 3 and int(epochs[-1][0]) > 0
    assert all(same == "True" for _, same in epochs)
    total, mine = map(int, re.search(r"done, (\d+) parameters, (\d+) of them", out.stdout).groups())
    assert mine < total
