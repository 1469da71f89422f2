"""FSDP2 (`fully_shard`), 2 gloo processes on CPU: the monitor's counts over each rank's
share of the probe data equal one process's counts over all of it, exactly, on an MLP, an
OPT-style and a gated (Llama-style) transformer built from config; the epoch-end measurement
of a Session is the same on every rank and equals one process's; every method that acts on
shards ends where one process ends; those that remove units refuse with a clear message."""
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
            session.start(model, None, probe=x, example=x[:2])        # the same probe data
            from dormant.sharding import resharded
            whole_again = all(type(p).__name__ == "DTensor"           # no forward left open
                              for p in resharded(model).parameters())
            _nudge(model)                                             # a distance to measure
            metrics = session.end_epoch()
            session.close()
            try:
                build("demp").prepare(model, None, probe=x, total_steps=10)
                refused = ""
            except ValueError as err:
                refused = str(err)
            try:
                dormant.compact(model, x)
                compact_refused = ""
            except ValueError as err:
                compact_refused = str(err)
            from dormant.sharding import gathered_state, sharded_like
            whole = gathered_state(resharded(model).state_dict())     # OPT's tied LM head too
            resharded(model).load_state_dict(sharded_like(model, whole))
            back = gathered_state(resharded(model).state_dict())
            results[kind] = {
                "round_trip": all(torch.equal(whole[k], back[k]) for k in whole),
                "active": {n: s.active for n, s in stats.items()},
                "positions": {n: s.positions for n, s in stats.items()},
                "dead": {n: d for n, d in mon.dead_units().items()},
                "metrics": metrics, "refused": refused, "compact": compact_refused,
                "resharded": whole_again,
                "sharded": any(type(p).__name__ == "DTensor" for p in model.parameters())}
        from dormant.batching import capture_inputs
        from dormant.models import build_model
        from dormant.sharding import resharded, shard
        net = shard(build_model("resnet20", (1, 28, 28), 10))   # the root holds BatchNorms
        capture_inputs(net, torch.randn(2, 1, 28, 28))          # a forward cut at its start
        results["captured"] = [type(p).__name__ for p in resharded(net).parameters()]
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()            # then close: gloo under FSDP2 may abort at exit otherwise
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
            assert got["sharded"] and got["resharded"] and got["round_trip"], kind
            assert set(got["active"]) == set(stats) and len(stats) >= 2, kind
            for n, s in stats.items():                 # exact: counts over both shares
                assert torch.equal(got["active"][n], s.active), (kind, n)
                assert got["positions"][n] == s.positions, (kind, n)
            assert got["metrics"].keys() == metrics.keys(), kind
            for k, v in metrics.items():
                assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-9), (kind, k)
            assert "sharded by FSDP2" in got["refused"] and "removes units" in got["refused"]
            assert "synaptic-stripping" in got["refused"] and "Session(None)" in got["refused"]
            assert "compact an unsharded copy" in got["compact"], kind
        for n in stats:
            assert torch.equal(ranks[0][kind]["dead"][n], ranks[1][kind]["dead"][n])
    assert ranks[0]["mlp"]["metrics"]["dead_units"] == 4
    assert set(ranks[0]["captured"]) == {"DTensor"}      # capturing inputs left none gathered
    assert ranks[0]["mlp"]["metrics"]["distance_from_init"] > 0.1


# Every method that acts on FSDP2 shards, with options that make it act in a few steps.
METHODS = {
    "redo": {"every_steps": 2},
    "synaptic-stripping": {"every_steps": 2},
    "continual-backprop": {"replacement_rate": 0.3, "maturity_threshold": 1},
    "shrink-perturb": {"every_steps": 2},
    "l2-init": {"lam": 0.5},
    "imp": {"rounds": 1, "epochs_per_round": 1, "rate": 0.2},
    "ap": {"rounds": 1, "epochs_per_round": 1, "rate": 0.2, "p_ap": 0.05},
    "nnrelief": {"rounds": 1, "epochs_per_round": 1, "keep_best": False},
}
ACTED = {"redo": "redo/recycled_total", "synaptic-stripping": "ss/stripped_total",
         "continual-backprop": "cbp/replaced_total", "shrink-perturb": "sp/applied",
         "l2-init": "l2init/distance", "imp": "pruned", "ap": "pruned", "nnrelief": "pruned"}


def _planted(kind: str):
    """The model of `kind` with four dead units per site (a -1e4 bias), its inputs and
    targets, and the modules to shard."""
    if kind != "llama":
        model, x, inner = _model(kind)
    else:
        tf = pytest.importorskip("transformers")
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             hidden_act="relu", max_position_embeddings=64, mlp_bias=True)
        model = tf.LlamaForCausalLM(cfg).eval()
        x = torch.randint(0, 64, (12, 10), generator=torch.Generator().manual_seed(1))
        inner = list(model.model.layers)
    with torch.no_grad():
        for m in model.modules():
            for attr in ("fc1", "gate_proj"):
                if isinstance(getattr(m, attr, None), nn.Linear):
                    getattr(m, attr).bias[:4] = -1e4
    return model, x, (torch.arange(len(x)) % 3 if kind == "mlp" else x), inner


def _loss(kind, model, x, y):
    import torch.nn.functional as F
    return F.cross_entropy(model(x), y) if kind == "mlp" else model(input_ids=x, labels=y).loss


def _train(kind: str, name: str, model, x, y, probe, rank=0, world=1) -> list[dict]:
    """Two epochs of three optimizer steps (each rank on its share of the batch) with method
    `name` observing `probe`; the metrics of each epoch."""
    import warnings

    from dormant.methods import build
    model.train()
    # optimizer state reset on the shards: Adam's moments on the MLP, SGD momentum on the
    # transformers (Adam would amplify their near-zero gradients' float noise, summed in
    # another order by the shards, past 1e-5)
    opt = (torch.optim.Adam(model.parameters(), lr=0.01) if kind == "mlp"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = build(name, **METHODS[name]).prepare(model, opt, probe=probe, epochs=2)
        xs, ys = x[rank::world], y[rank::world]
        epochs = []
        for _ in range(2):
            for _ in range(3):
                opt.zero_grad()
                _loss(kind, model, xs, ys).backward()
                method.after_backward()
                opt.step()
                method.after_step()
            result = method.end_epoch()
            epochs.append({k: v for k, v in dict(result).items() if not isinstance(v, dict)})
        method.finalize()
    return epochs


def _mistakes(mesh) -> list[str]:
    """What a user gets for sharding at the wrong moment: the optimizer built before
    fully_shard; the model sharded after prepare."""
    from torch.distributed.fsdp import fully_shard

    from dormant.methods import build
    out = []
    model, x, _, inner = _planted("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)          # before sharding
    for m in inner:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        build("redo").prepare(model, opt, probe=x)
    except ValueError as err:
        out.append(str(err))
    model, x, _, inner = _planted("mlp")
    method = build("redo").prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), probe=x)
    for m in inner:                                             # sharded after prepare
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        method.end_epoch()
    except RuntimeError as err:
        out.append(str(err))
    return out


def _methods_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from dormant.sharding import resharded
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world,))
        results = {"mistakes": _mistakes(mesh)}
        for kind in KINDS:
            for name in METHODS:
                model, x, y, inner = _planted(kind)
                for m in inner:
                    fully_shard(m, mesh=mesh)
                fully_shard(model, mesh=mesh)
                metrics = _train(kind, name, model, x, y, x, rank, world)
                full = {n: p.full_tensor() for n, p in resharded(model).named_parameters()}
                results[kind, name] = {"params": full, "metrics": metrics}
        torch.save(results, os.path.join(out, f"methods{rank}.pt"))
        dist.barrier()            # then close: gloo under FSDP2 may abort at exit otherwise
    finally:
        dist.destroy_process_group()


def test_every_method_under_fsdp2_ends_where_one_process_ends(tmp_path):
    """Synaptic Stripping, ReDo, Continual Backprop, Shrink & Perturb, L2 Init, IMP, AP and
    NNrelief on sharded MLP, OPT and Llama models (gathered after training) equal one
    process's run within 1e-5, with the same decisions on both ranks and in one process."""
    mp.spawn(_methods_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"methods{r}.pt", weights_only=False) for r in range(2)]
    before, after = ranks[0]["mistakes"]
    assert "build the optimizer after fully_shard" in before
    assert "sharded with FSDP2 after prepare()/start()" in after and "Shard first" in after
    for kind in KINDS:
        for name in METHODS:
            model, x, y, _ = _planted(kind)
            metrics = _train(kind, name, model, x, y, x)
            acted = max(e.get(ACTED[name], 0) for e in metrics)
            assert acted > 0, (kind, name, metrics)          # the method did something
            for r in ranks:
                got = r[kind, name]
                for mine, one in zip(got["metrics"], metrics, strict=True):
                    assert mine == pytest.approx(one, rel=1e-5), (kind, name)
                for n, p in model.named_parameters():
                    where = f"{kind} {name} {n}"
                    torch.testing.assert_close(got["params"][n], p.detach(), rtol=1e-5,
                                               atol=1e-6, msg=lambda m, w=where: f"{w}: {m}")
