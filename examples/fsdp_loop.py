"""A hand-written FSDP2 loop (`fully_shard`) with a dormant method and its metrics.

    torchrun --nproc_per_node 2 examples/fsdp_loop.py                      # ReDo, gloo on CPU
    torchrun --nproc_per_node 2 examples/fsdp_loop.py synaptic-stripping   # another method

Every Linear layer of an MLP, then the MLP itself, is wrapped with `fully_shard`: each rank
holds half the rows of every weight. Each rank trains on its share of every batch; a
`dormant.session.Session` drives the method and measures every epoch (the statistics are
all-reduced, so every rank takes the same decision: the script compares every rank's metrics
each epoch and prints the result). The method edits each rank's shards in place. For GPUs,
change three things: ``init_process_group("nccl")``, the mesh's device type ("cuda") and the
model and batches on ``cuda:<LOCAL_RANK>``; nothing of dormant changes (not run here: no GPU).
"""
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dormant.methods import METHODS, build
from dormant.session import Session
from dormant.sharding import close_group

EPOCHS, BATCH = 3, 64
OPTIONS = {  # small budgets so that every method acts within 3 short epochs
    "synaptic-stripping": {"factor": 0.2},
    "redo": {"tau": 0.1},
    "continual-backprop": {"replacement_rate": 0.01, "maturity_threshold": 20},
    "shrink-perturb": {"shrink": 0.8, "perturb": 0.05},
    "l2-init": {"lam": 1e-3},
    "imp": {"rounds": 2, "epochs_per_round": 1},
    "ap": {"rounds": 2, "epochs_per_round": 1},
    "nnrelief": {"rounds": 2, "epochs_per_round": 1, "probe_samples": 256, "keep_best": False},
}
SHOWN = ("dead_fraction", "redo", "ss", "cbp", "sp", "l2init", "pruned", "compression")


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    return x, (x[:, :3] * torch.tensor([1.0, -1.0, 0.5])).argmax(1)


def same_on_every_rank(metrics: dict, world: int) -> bool:
    """True when every rank reports the same numbers (the method's decisions included)."""
    mine = torch.tensor([float(v) for v in metrics.values() if isinstance(v, (int, float))],
                        dtype=torch.float64)
    theirs = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(theirs, mine)
    return all(torch.equal(t, mine) for t in theirs)


def main(name: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)                  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 3))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)         # shard first, then build the optimizer
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    x, y = data(2048, 0)
    val = data(512, 1)                    # every rank observes the same probe data
    steps = EPOCHS * (len(x) // BATCH)

    session = Session(build(name, **OPTIONS[name]), every_steps=10)
    session.start(model, opt, probe=[val], total_steps=steps, epochs=EPOCHS)
    for epoch in range(1, EPOCHS + 1):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x) - BATCH + 1, BATCH):
            idx = order[i:i + BATCH][rank::world]         # this rank's share of the batch
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            session.after_backward()
            opt.step()
            session.after_step()
        result = session.end_epoch()
        agree = same_on_every_rank(result, world)
        if rank == 0:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()
                     if k in SHOWN or k.split("/")[0] in SHOWN}
            print(f"{name} epoch {epoch}: {shown} (every rank decided the same: {agree})",
                  flush=True)
    session.close()
    model.reshard()                       # the root keeps its own parameters after a forward
    params = sum(p.numel() for p in model.parameters())           # DTensors: whole shapes
    mine = sum(p.to_local().numel() for p in model.parameters())
    if rank == 0:
        print(f"{name}: done, {params} parameters, {mine} of them on rank 0", flush=True)
    close_group()          # barrier, then destroy (gloo under FSDP2 may abort at exit otherwise)


if __name__ == "__main__":
    method = sys.argv[1] if len(sys.argv) > 1 else "redo"
    if method not in OPTIONS:
        why = ("removes units physically, which FSDP2 shards cannot follow"
               if method in METHODS and method != "none" else "is not a dormant method here")
        sys.exit(f"{method!r} {why}; choose from {', '.join(sorted(OPTIONS))}")
    main(method)
