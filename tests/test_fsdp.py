"""FSDP2 (`fully_shard`), 2 gloo processes on CPU: the monitor's counts over each rank's
share of the probe data equal one process's counts over all of it, exactly, on an MLP, an
OPT-style and a gated (Llama-style) transformer built from config; the epoch-end measurement
of a Session is the same on every rank and equals one process's; methods refuse sharded
parameters with a clear message."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")]
KINDS = ("mlp", "opt", "llama")


def _model(kind: str) -> tuple[nn.Module, torch.Tensor, list[nn.Module]]:
    """(model, probe inputs, the modules to shard before the root)."""
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                              nn.Linear(12, 3))
        with torch.no_grad():
            model[0].bias[:4] = -1e4                      # four dead units
        return model, torch.randn(40, 8), [m for m in model if isinstance(m, nn.Linear)]
    tf = pytest.importorskip("transformers")
    if kind == "opt":
        cfg = tf.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64,
                           word_embed_proj_dim=32, dropout=0.0)
        model = tf.OPTForCausalLM(cfg)
        layers = list(model.model.decoder.layers)
    else:
        cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, hidden_act="relu",
                             max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
        layers = list(model.model.layers)
    g = torch.Generator().manual_seed(1)
    return model.eval(), torch.randint(0, 64, (12, 10), generator=g), layers


@torch.no_grad()
def _nudge(model: nn.Module) -> None:
    """Every weight + 0.01 (a sharded one: this rank's rows)."""
    from dormant.sharding import local, resharded
    for p in resharded(model).parameters():
        local(p).add_(0.01)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        import warnings

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        import dormant
        from dormant.diagnose import probe
        from dormant.methods import build
        from dormant.session import Session
        torch.set_num_threads(1)
        warnings.simplefilter("ignore")
        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for kind in KINDS:
            model, x, inner = _model(kind)
            for m in inner:
                fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
            sites = dormant.find_sites(model, x[:2])
            mon = probe(model, x[rank::world], sites=sites)           # this rank's share
            stats = mon.stats()
            session = Session(None)
            session.start(model, None, probe=x)                       # the same probe data
            _nudge(model)                                             # a distance to measure
            metrics = session.end_epoch()
            session.close()
            try:
                build("synaptic-stripping").prepare(model, None, probe=x)
                refused = ""
            except ValueError as err:
                refused = str(err)
            try:
                dormant.compact(model, x)
                compact_refused = ""
            except ValueError as err:
                compact_refused = str(err)
            results[kind] = {
                "active": {n: s.active for n, s in stats.items()},
                "positions": {n: s.positions for n, s in stats.items()},
                "dead": {n: d for n, d in mon.dead_units().items()},
                "metrics": metrics, "refused": refused, "compact": compact_refused,
                "sharded": any(type(p).__name__ == "DTensor" for p in model.parameters())}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_the_monitor_and_the_epoch_metrics_under_fsdp2_equal_one_process(tmp_path):
    import warnings

    import dormant
    from dormant.diagnose import probe
    from dormant.session import Session
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for kind in KINDS:
        model, x, _ = _model(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sites = dormant.find_sites(model, x[:2])
            stats = probe(model, x, sites=sites).stats()
            session = Session(None)
            session.start(model, None, probe=x)
            _nudge(model)
            metrics = session.end_epoch()
        for r in ranks:
            got = r[kind]
            assert got["sharded"], kind
            assert set(got["active"]) == set(stats) and len(stats) >= 2, kind
            for n, s in stats.items():                 # exact: counts over both shares
                assert torch.equal(got["active"][n], s.active), (kind, n)
                assert got["positions"][n] == s.positions, (kind, n)
            assert got["metrics"].keys() == metrics.keys(), kind
            for k, v in metrics.items():
                assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-9), (kind, k)
            assert "sharded by FSDP2" in got["refused"] and "Session(None)" in got["refused"]
            assert "compact an unsharded copy" in got["compact"], kind
        for n in stats:
            assert torch.equal(ranks[0][kind]["dead"][n], ranks[1][kind]["dead"][n])
    assert ranks[0]["mlp"]["metrics"]["dead_units"] == 4
    assert ranks[0]["mlp"]["metrics"]["distance_from_init"] > 0.1


def _l2_run(model, x, y, steps=3):
    """A few SGD steps with L2 Init, then its distance metric."""
    import torch.nn.functional as F

    from dormant.methods import build
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = build("l2-init", lam=0.5).prepare(model, opt, probe=x)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        method.after_backward()
        opt.step()
        method.after_step()
    return method.end_epoch()["l2init/distance"]


def _l2_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from dormant.sharding import resharded
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world,))
        model, x, inner = _model("mlp")
        y = torch.arange(len(x)) % 3
        for m in inner:
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        distance = _l2_run(model, x[rank::world], y[rank::world])
        full = {n: p.full_tensor() for n, p in resharded(model).named_parameters()}
        torch.save({"params": full, "distance": distance}, os.path.join(out, f"l2{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_l2_init_under_fsdp2_ends_where_one_process_ends(tmp_path):
    mp.spawn(_l2_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"l2{r}.pt", weights_only=False) for r in range(2)]
    model, x, _ = _model("mlp")
    y = torch.arange(len(x)) % 3
    distance = _l2_run(model, x, y)
    assert distance > 0.01
    for r in ranks:
        assert r["distance"] == pytest.approx(distance, rel=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(r["params"][n], p.detach(), rtol=1e-5, atol=1e-6)
