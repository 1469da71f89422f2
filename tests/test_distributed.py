"""Under torch.distributed (gloo, 2 processes) every rank gets the same, global decision."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dormant import ActivityMonitor, find_sites


def _model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    x = torch.randn(64, 4)
    with torch.no_grad():
        model[0].bias[3] = -1e4                     # dead everywhere
        model[0].weight[1] = torch.tensor([1.0, 0, 0, 0])
        model[0].bias[1] = -10.0                    # fires only on sample 0 (rank 0's shard)
        x[0, 0] = 20.0
    return model, x


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        model, x = _model_and_data()
        shard = x[rank::world]
        sites = find_sites(model, shard[:2])
        with ActivityMonitor(model, sites, every_steps=1) as mon, torch.no_grad():
            model(shard)
        mon._flush()                                # this rank's counters, not reduced
        local = {n: (c["active"] == 0) for n, c in mon._counters.items()}
        torch.save({"dead": mon.dead_units(), "local": local, "dnr": mon.dynamic_dnr(),
                    "samples": mon.stats()["1"].samples},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_all_reduce_gives_every_rank_the_global_decision(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    model, x = _model_and_data()
    with ActivityMonitor(model, example_input=x[:2]) as ref, torch.no_grad():
        model(x)
    expected = ref.dead_units()
    for r in ranks:
        assert r["samples"] == len(x)
        assert r["dnr"] == pytest.approx(ref.dynamic_dnr())
        for n, d in expected.items():
            assert torch.equal(r["dead"][n], d), n
    assert expected["1"].tolist() == [False, False, False, True, False, False]
    # rank 1 alone would call unit 1 dead: the reduction is what makes the ranks agree
    assert ranks[1]["local"]["1"][1] and not ranks[0]["local"]["1"][1]


def _empty_shard_worker(rank, world, init_file, out_dir):
    from dormant import diagnose
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model, x = _model_and_data()
        sites = find_sites(model, x[:2])
        shard = x if rank == 0 else x[:0]          # rank 1's probe shard is empty
        report = diagnose(model, [shard] if len(shard) else [], sites=sites)
        torch.save({"dead": report.dead, "samples": report.samples},
                   os.path.join(out_dir, f"empty{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_rank_with_an_empty_probe_shard_takes_the_same_decision(tmp_path):
    mp.spawn(_empty_shard_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"empty{r}.pt", weights_only=True) for r in range(2))
    assert a["samples"] == b["samples"] == 64
    assert all(torch.equal(a["dead"][n], b["dead"][n]) for n in a["dead"])
    assert a["dead"]["1"].tolist() == [False, False, False, True, False, False]


METHOD_ARGS = {"none": "", "synaptic-stripping": "factor=0.2", "redo": "tau=0.1",
               "imp": "rounds=2,epochs_per_round=1", "ap": "rounds=2,epochs_per_round=1",
               "nnrelief": "rounds=2,epochs_per_round=1,probe_samples=200",
               "demp": "reg_peak=0.5,target=all,prune_every=5",
               "structured": "sparsity=0.5,prune_every=4",
               "continual-backprop": "replacement_rate=0.05,maturity_threshold=3",
               "shrink-perturb": "shrink=0.8,perturb=0.05", "l2-init": "lam=0.01"}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_dormant_run_under_torchrun_writes_one_run_and_matches_one_process(method, tmp_path):
    """torchrun --nproc_per_node 2 -m dormant run: each rank trains its half of every global
    batch (gloo), every method decides on all-reduced statistics, rank 0 alone writes; the
    run directory has each epoch once and ends where a single process ends (float
    tolerance), physical removal (DemP, structured) included."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from dormant.cli import main
    args = ["run", "--dataset", "synthetic", "--model-args", "width=32", "--epochs", "3",
            "--lr", "0.1", "--method", method, "--no-progress"]
    args += ["--method-args", METHOD_ARGS[method]] if METHOD_ARGS[method] else []
    assert main(args + ["--root", str(tmp_path / "one")]) == 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "dormant", *args,
                           "--root", str(tmp_path / "two")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1          # rank 0 alone reports
    (one,), (two,) = (tmp_path / "one").iterdir(), (tmp_path / "two").iterdir()
    assert one.name == two.name
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    a = json.loads((one / "result.json").read_text())["final"]
    result = json.loads((two / "result.json").read_text())
    assert result["world_size"] == 2 and result["ranks_identical"]   # checked by all-gather
    b = result["final"]
    for key, value in a.items():
        if isinstance(value, (int, float)) and key != "train_time":
            assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
