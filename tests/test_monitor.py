import pytest
import torch
import torch.nn as nn
from zoo import ZOO, activation_outputs, kill_some, reduce_dims

from dormant import CRITERIA, ActivityMonitor, diagnose, find_sites
from dormant.monitor import SiteStats
from dormant.sites import is_nonneg


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", list(ZOO))
def test_counts_are_exact_against_brute_force(name):
    ctor, shape = ZOO[name]
    torch.manual_seed(0)
    model = ctor().eval()
    kill_some(model)
    xs = [torch.randn(5, *shape) for _ in range(3)]
    sites = find_sites(model, xs[0][:2])
    mon, lean = ActivityMonitor(model, sites, track_max=True), ActivityMonitor(model, sites)
    with mon, lean, torch.no_grad():
        for x in xs:
            model(x)
    stats, dead = mon.stats(), mon.dead_units()
    for n, s in lean.stats().items():     # without track_max: the same counters, no max
        assert s.max is None and torch.equal(s.active, stats[n].active)
        assert torch.equal(s.zeros, stats[n].zeros) and torch.equal(s.silent, stats[n].silent)
    outs = [activation_outputs(model, x) for x in xs]
    for i, s in enumerate(sites):
        ys = [o[i] for o in outs]
        dims = reduce_dims(ys[0], s.unit_dim)
        active = sum((y > 0).sum(dims) for y in ys)
        zeros = sum((y == 0).sum(dims) for y in ys)
        st = stats[s.name]
        assert torch.equal(st.active, active), s.name
        assert torch.equal(st.zeros, zeros), s.name
        positions = sum(y.numel() // s.num_units for y in ys)
        # never active: no output > 0; where outputs can be negative, no output != 0
        want = active == 0 if is_nonneg(s.activation) else zeros == positions
        assert torch.equal(dead[s.name], want), s.name
        assert torch.allclose(st.sum, sum(y.sum(dims).double() for y in ys), atol=1e-3)
        assert torch.allclose(st.max, torch.stack([y.amax(dims) for y in ys]).amax(0))
        assert st.positions == sum(y.numel() // s.num_units for y in ys)
        assert st.samples == 15 and st.batches == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conv-bn-relu-flatten", "tanh-sigmoid-silu", "vit-tiny"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("grad", [False, True])
def test_pending_steps_sum_to_the_brute_force_counts(name, eps, grad):
    """Steps wait in a short list and are summed in every FLUSH_EVERY steps and when read:
    across several flushes and batch sizes, with autograd off and on (a backward after each
    forward), every counter is the brute-force one, and the list stays short."""
    from dormant.monitor import FLUSH_EVERY
    ctor, shape = ZOO[name]
    torch.manual_seed(1)
    model = ctor().eval()
    kill_some(model)
    n = 2 * FLUSH_EVERY + 3
    xs = [torch.randn(2 + i % 3, *shape) for i in range(n)]
    sites = find_sites(model, xs[0][:2])
    with ActivityMonitor(model, sites, eps=eps, track_max=True) as mon, torch.set_grad_enabled(grad):
        for x in xs:
            out = model(x)
            if grad:
                out.square().mean().backward()
            assert all(len(p["active"]) < FLUSH_EVERY for p in mon._pending.values())
    stats = mon.stats()
    with torch.no_grad():
        outs = [activation_outputs(model, x) for x in xs]
    for i, s in enumerate(sites):
        ys, st = [o[i] for o in outs], stats[s.name]
        dims = reduce_dims(ys[0], s.unit_dim)
        inner = tuple(k for k in dims if k != 0)
        act = [(y > eps).sum(dims) for y in ys]
        assert torch.equal(st.active, sum(act)), s.name
        assert torch.equal(st.zeros, sum((y == 0).sum(dims) for y in ys)), s.name
        assert torch.equal(st.active_batches, sum((a > 0).long() for a in act)), s.name
        silent = sum(((y > eps).sum(inner) == 0).sum(0) if inner else (y <= eps).sum(0)
                     for y in ys)
        assert torch.equal(st.silent, silent), s.name
        assert torch.allclose(st.sum, sum(y.sum(dims).double() for y in ys), atol=1e-3)
        assert torch.allclose(st.abs_sum, sum(y.abs().sum(dims).double() for y in ys),
                              atol=1e-3)
        assert torch.equal(st.max, torch.stack([y.amax(dims) for y in ys]).amax(0)), s.name
        assert st.batches == n and st.samples == sum(len(x) for x in xs)


def test_small_cpu_outputs_are_counted_on_one_thread(monkeypatch):
    """A small CPU output of one position per sample is counted on one thread (waking the
    OpenMP team costs more than it saves) and the caller's thread count comes back, also
    when the counting fails; larger outputs and outputs with positions keep every thread."""
    from dormant import monitor as M
    if not M._openmp():
        pytest.skip("the intra-op pool is not OpenMP")
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    before = torch.get_num_threads()
    real(2)
    try:
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        sites = find_sites(model, torch.randn(2, 4))
        with ActivityMonitor(model, sites) as mon, torch.no_grad():
            model(torch.randn(3, 4))
            assert calls == [1, 2]
        ctor, shape = ZOO["timm-mlp-tokens"]                 # outputs with positions
        tokens = ctor()
        with ActivityMonitor(tokens, find_sites(tokens, torch.randn(2, *shape))), torch.no_grad():
            tokens(torch.randn(3, *shape))
        assert calls == [1, 2]
        with ActivityMonitor(model, sites) as mon, torch.no_grad():
            count = M.ActivityMonitor._count
            monkeypatch.setattr(M.ActivityMonitor, "_count", lambda *a: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                model(torch.randn(3, 4))
            assert calls == [1, 2, 1, 2] and torch.get_num_threads() == 2
            monkeypatch.setattr(M.ActivityMonitor, "_count", count)
            monkeypatch.setattr(M, "SERIAL_NUMEL", 0)       # as if the output were large
            model(torch.randn(5, 4))                          # a new shape: a new plan
            assert calls == [1, 2, 1, 2]
        st = next(iter(mon.stats().values()))
        assert st.batches == 1 and st.samples == 5       # the failed forward counted nothing
    finally:
        real(before)


def test_fused_counting_gives_the_same_counters():
    """fused= compiles the non-negative sites' counting (here with torch.compile's eager
    backend: the same graph without inductor's minute of compiling); every counter equals
    the unfused monitor's, on dense, conv and token outputs and a batch of another size."""
    for name in ("sequential-mlp", "conv-bn-relu-flatten", "timm-mlp-tokens", "reused-relu-residual"):
        ctor, shape = ZOO[name]
        torch.manual_seed(0)
        model = ctor().eval()
        kill_some(model)
        xs = [torch.randn(n, *shape) for n in (5, 5, 3)]
        sites = find_sites(model, xs[0][:2])
        mons = [ActivityMonitor(model, sites, track_max=True),
                ActivityMonitor(model, sites, fused="eager", track_max=True)]
        for mon in mons:
            with mon, torch.no_grad():
                for x in xs:
                    model(x)
        plain, fused = (m.stats() for m in mons)
        for n in plain:
            for f in ("active", "zeros", "silent", "active_batches", "max"):
                assert torch.equal(getattr(plain[n], f), getattr(fused[n], f)), (name, n, f)
            assert torch.allclose(plain[n].sum, fused[n].sum, rtol=1e-6), (name, n)


def test_killed_units_are_found_dead():
    torch.manual_seed(0)
    model = ZOO["sequential-mlp"][0]()
    kill_some(model, every=4)
    report = diagnose(model, torch.randn(64, 3, 4))
    assert report.rows[0].dead >= 4 and report.dead["2"][::4].all()
    assert "dead %" in str(report) and "2" in str(report)


def test_teardown_leaves_no_hooks_or_buffers():
    model = ZOO["reused-relu-residual"][0]()
    x = torch.randn(2, 4, 6, 6)
    keys = set(model.state_dict())
    with ActivityMonitor(model, example_input=x) as mon:
        assert _hooks(model) > 0
        model(x)
    assert _hooks(model) == 0 and not mon.attached
    assert set(model.state_dict()) == keys


def test_hooks_removed_after_exception():
    model = ZOO["functional"][0]()
    with pytest.raises(RuntimeError, match="boom"):
        with ActivityMonitor(model, example_input=torch.randn(2, 8)):
            raise RuntimeError("boom")
    assert _hooks(model) == 0


def test_no_host_sync_inside_hooks(monkeypatch):
    model = ZOO["conv-bn-relu-flatten"][0]()
    x = torch.randn(4, 1, 8, 8)
    mon = ActivityMonitor(model, example_input=x[:2])

    def forbidden(*a, **k):
        raise AssertionError("host sync inside a hook")

    with mon:
        for attr in ("item", "tolist", "__bool__", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, attr, forbidden)
        model(x)
        monkeypatch.undo()
    assert mon.stats()["features.2"].batches == 1


def test_counters_do_not_grow():
    model = ZOO["sequential-mlp"][0]()
    x = torch.randn(8, 3, 4)
    with ActivityMonitor(model, example_input=x) as mon:
        model(x)
        ptrs = {n: [c[k].data_ptr() for k in ("active", "sum", "max")] for n, c in mon._counters.items()}
        for _ in range(20):
            model(x)
        assert ptrs == {n: [c[k].data_ptr() for k in ("active", "sum", "max")]
                        for n, c in mon._counters.items()}


def test_sampled_mode_watches_every_kth_step_only():
    torch.manual_seed(0)
    model = ZOO["sequential-mlp"][0]()
    batches = [torch.randn(6, 3, 4) for _ in range(9)]
    sites = find_sites(model, batches[0])
    with ActivityMonitor(model, sites, every_steps=3) as mon:
        attached = []
        for x in batches:
            attached.append(_hooks(model) > 0)
            model(x)
            mon.step()
    assert attached == [True, False, False] * 3
    with ActivityMonitor(model, sites) as exact:
        for x in batches[::3]:
            model(x)
    for n in mon.sites:
        assert torch.equal(mon.stats()[n].zeros, exact.stats()[n].zeros)
    assert mon.dynamic_dnr() == exact.dynamic_dnr()


def test_mode_train_ignores_eval_forwards():
    model = ZOO["sequential-mlp"][0]()
    x = torch.randn(4, 3, 4)
    with ActivityMonitor(model, example_input=x, mode="train") as mon:
        model.eval()
        model(x)
        assert not mon.observed
        model.train()
        model(x)
    assert mon.observed


def test_state_dict_round_trip(tmp_path):
    model = ZOO["reused-relu-residual"][0]()
    x = torch.randn(3, 4, 6, 6)
    with ActivityMonitor(model, example_input=x) as mon:
        model(x)
    torch.save(mon.state_dict(), tmp_path / "mon.pt")
    fresh = ActivityMonitor(model, list(mon.sites.values()))
    fresh.load_state_dict(torch.load(tmp_path / "mon.pt", weights_only=True))
    for n in mon.sites:
        assert torch.equal(fresh.stats()[n].active, mon.stats()[n].active)
        assert fresh.stats()[n].positions == mon.stats()[n].positions
    with pytest.raises(ValueError, match="eps"):
        ActivityMonitor(model, list(mon.sites.values()), eps=0.1).load_state_dict(mon.state_dict())


def test_reset_zeroes_counters():
    model = ZOO["sequential-mlp"][0]()
    x = torch.randn(4, 3, 4)
    with ActivityMonitor(model, example_input=x) as mon:
        model(x)
        mon.reset()
    assert not mon.observed
    with pytest.raises(RuntimeError, match="no activations"):
        mon.dead_units()


def _stats(abs_means, zeros=None, positions=10):
    u = len(abs_means)
    t = torch.tensor(abs_means, dtype=torch.float64) * positions
    z = torch.zeros(u, dtype=torch.int64)
    return SiteStats(None, z, torch.tensor(zeros or [0] * u), z, z, t, t,
                     torch.zeros(u), positions, positions, 1, 0.0, "any", 1)


def test_dormant_criterion_golden():
    s = _stats([0.0, 1.0, 2.0, 5.0])   # layer mean 2 -> scores 0, .5, 1, 2.5
    assert CRITERIA.get("dormant")(s, tau=0.5).tolist() == [True, True, False, False]
    assert CRITERIA.get("dormant")(s, tau=0.0).tolist() == [True, False, False, False]
    with pytest.raises(ValueError):
        CRITERIA.get("dormant")(s, tau=-1)


def test_dynamic_dnr_and_eps():
    model = nn.Sequential(nn.Linear(1, 3), nn.ReLU())
    with torch.no_grad():
        model[0].weight[:] = torch.tensor([[1.0], [1.0], [0.0]])
        model[0].bias[:] = torch.tensor([0.0, -0.5, 0.05])
    x = torch.tensor([[-1.0], [0.25], [1.0], [2.0]])
    # outputs: u0 = [0, .25, 1, 2], u1 = [0, 0, .5, 1.5], u2 = [.05]*4
    with ActivityMonitor(model, example_input=x, eps=0.1) as mon:
        model(x)
    assert mon.dynamic_dnr() == pytest.approx(3 / 12)
    assert mon.dead_units()["1"].tolist() == [False, False, True]   # 0.05 <= eps
    assert mon.dead_units("always_zero")["1"].tolist() == [False, False, False]
    assert mon.dead_fraction() == pytest.approx(1 / 3)


def test_invalid_arguments():
    model = ZOO["sequential-mlp"][0]()
    with pytest.raises(ValueError, match="every"):
        ActivityMonitor(model, example_input=torch.randn(2, 3, 4), every_steps=0)
    with pytest.raises(ValueError, match="example_input"):
        ActivityMonitor(model)
    with pytest.raises(KeyError, match="valid criteria"):
        with ActivityMonitor(model, example_input=torch.randn(2, 3, 4)) as mon:
            model(torch.randn(2, 3, 4))
        mon.dead_units("nope")
