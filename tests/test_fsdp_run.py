"""`dormant run --fsdp` (2 gloo processes): the run ends where one process ends, and an
interrupted sharded run resumes to the straight sharded run, method state included."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")]

# (L2 Init: in-process in test_fsdp.py, resumed through Lightning in test_integrations.py)
ARGS = {"redo": "tau=0.1", "imp": "rounds=2,epochs_per_round=1"}


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    from conftest import run_distributed
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return run_distributed([torchrun, "--nproc_per_node", "2", "-m", "dormant", *args],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("method", list(ARGS))
def test_dormant_run_fsdp_ends_where_one_process_ends(method, tmp_path):
    from dormant.cli import main
    args = ["run", "--dataset", "synthetic", "--model-args", "width=32", "--epochs", "3",
            "--lr", "0.1", "--method", method, "--method-args", ARGS[method], "--no-progress"]
    assert main(args + ["--root", str(tmp_path / "one")]) == 0
    proc = _torchrun(args + ["--fsdp", "--root", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1          # rank 0 alone reports
    (one,), (two,) = (tmp_path / "one").iterdir(), (tmp_path / "two").iterdir()
    assert one.name == two.name                               # the same run, spread otherwise
    result = json.loads((two / "result.json").read_text())
    assert result["sharding"] == "fsdp" and result["world_size"] == 2
    a, b = json.loads((one / "result.json").read_text())["final"], result["final"]
    for key, value in a.items():
        if isinstance(value, (int, float)) and key != "train_time":
            assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    w1 = torch.load(one / "model.pt", weights_only=True)      # whole tensors, plain
    w2 = torch.load(two / "model.pt", weights_only=True)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_dormant_run_fsdp_refuses_what_cannot_be_sharded(tmp_path, capsys):
    from dormant.cli import main
    args = ["run", "--dataset", "synthetic", "--epochs", "1", "--no-progress",
            "--root", str(tmp_path)]
    assert main(args + ["--method", "demp", "--fsdp"]) == 2
    err = capsys.readouterr().err
    assert "--fsdp: demp does not act on FSDP2-sharded parameters" in err
    assert "synaptic-stripping" in err
    assert main(args + ["--fsdp"]) == 2                      # one process: nothing to shard
    assert "torchrun --nproc_per_node N" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


RESUMED = {"imp": {"rounds": 2, "epochs_per_round": 1}}


def _resume_worker(rank: int, world: int, init: str, root: str, method: str, stop: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        from conftest import interrupting

        from dormant.experiments import ExperimentConfig, run_experiment
        torch.set_num_threads(1)
        cfg = ExperimentConfig(dataset="synthetic", model="mlp", model_args={"width": 16},
                               epochs=3, batch_size=64, lr=0.1, method=method,
                               method_args=RESUMED[method])
        with interrupting(method, stop) if stop else contextlib.nullcontext():
            try:
                with open(os.path.join(root, f"log{rank}.txt"), "a") as log:
                    run_experiment(cfg, root, show_progress=False, fsdp=True,
                                   log=lambda line: print(line, file=log))
            except KeyboardInterrupt:
                pass
        dist.barrier()            # then close: gloo under FSDP2 may abort at exit otherwise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", list(RESUMED))
def test_an_interrupted_fsdp_run_resumes_to_the_straight_one(method, tmp_path):
    """The checkpoint holds whole tensors (model, optimizer, IMP's masks and rewind point,
    the session's initial weights); a resumed sharded run equals the straight one."""
    from dormant.jsonl import read_jsonl

    def spawn(root, stop, tag):
        mp.spawn(_resume_worker, args=(2, str(tmp_path / f"init{tag}"), str(root), method, stop),
                 nprocs=2)

    for root in ("straight", "cut"):
        (tmp_path / root).mkdir()
    spawn(tmp_path / "straight", 0, "a")
    spawn(tmp_path / "cut", 2, "b")                           # stops in epoch 2
    (cut,) = [p for p in (tmp_path / "cut").iterdir() if p.is_dir()]
    assert not (cut / "result.json").exists()
    assert [r["epoch"] for r in read_jsonl(cut / "metrics.jsonl")] == [1]
    spawn(tmp_path / "cut", 0, "c")                           # resumes from epoch 1
    assert "[resume]" in (tmp_path / "cut" / "log0.txt").read_text()
    (straight,) = [p for p in (tmp_path / "straight").iterdir() if p.is_dir()]
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key, value in x.items():
            if isinstance(value, (int, float)) and "time" not in key:
                assert y[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    w1 = torch.load(straight / "model.pt", weights_only=True)
    w2 = torch.load(cut / "model.pt", weights_only=True)
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
