import pytest
import torch
import torch.nn as nn

pytest.importorskip("torch_pruning")

from dormant import find_sites
from dormant.data import load_dataset
from dormant.methods import DemP, StructuredPruning
from dormant.methods.demp import add_masked_noise, live_masks, regulariser_grad
from dormant.methods.structured import lowest_norm_units
from dormant.models import build_model
from dormant.schedules import one_cycle
from dormant.surgery import coupled_sites
from dormant.train import Callback, Trainer


def test_one_cycle_golden():
    peak, total = 2.0, 100
    assert one_cycle(0, total, peak) == pytest.approx(peak / 25)
    assert one_cycle(30, total, peak) == pytest.approx(peak)
    assert one_cycle(100, total, peak) == pytest.approx(peak / 25e4)
    assert one_cycle(101, total, peak) == 0.0
    assert one_cycle(15, total, peak) == pytest.approx(peak / 25 + (peak - peak / 25) / 2)
    assert one_cycle(15, total, peak) < one_cycle(20, total, peak) < peak


def test_regulariser_gradients():
    p = torch.tensor([-2.0, 0.0, 3.0])
    assert regulariser_grad(p, "lasso").tolist() == [-1, 0, 1]
    assert regulariser_grad(p, "l2").tolist() == [-2, 0, 3]
    assert regulariser_grad(p, "cdg_lasso").tolist() == [0, 0, 1]
    assert regulariser_grad(p, "cdg_l2").tolist() == [0, 0, 3]
    with pytest.raises(ValueError, match="regulariser"):
        regulariser_grad(p, "l3")


def _vgg():
    torch.manual_seed(0)
    data = load_dataset("synthetic", image=True, num_train=1024)
    return data, build_model("vgg-small", data.input_shape, data.num_classes, width=0.25,
                             hidden=16)


class Rows(Callback):
    def __init__(self):
        self.rows = []

    def on_epoch_end(self, trainer, epoch, metrics):
        self.rows.append(dict(metrics))


def test_demp_kills_and_removes_units_and_the_model_shrinks():
    data, model = _vgg()
    demp = DemP(reg_peak=1.0, noise_peak=1e-4, prune_every=20, span=1.0)
    rows = Rows()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    Trainer(model, data, opt, epochs=4, batch_size=64, callbacks=[demp, rows],
            show_progress=False).fit()
    first, last = rows.rows[0], rows.rows[-1]
    assert last["units"] < first["units"] or first["units_removed"] > 0
    assert last["units_removed"] > 0.2 and last["macs_ratio"] < 0.9
    assert last["params_ratio"] < 1
    widths = {s.name: s.num_units for s in find_sites(model, data.train.inputs[:2])}
    assert widths == last["width"]
    assert sum(p.numel() for p in model.parameters()) == last["params"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the optimizer follows the compacted parameters
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_noise_goes_to_live_units_only():
    data, model = _vgg()
    with torch.no_grad():   # unit 0 of the first conv site is dead: its BN offset is very negative
        model.features.bn1_1.bias[0] = -1e3
    demp = DemP(reg_peak=0.0, noise_peak=1e-2, prune_every=10 ** 9, span=1.0)
    before = model.features.conv1_1.weight.detach().clone()
    bn_before = model.features.bn1_1.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)     # only the noise moves parameters
    seen = {}

    class Snapshot(Callback):   # after the last step, before DemP's final death check
        def on_step_end(self, trainer, loss):
            seen["w"] = model.features.conv1_1.weight.detach().clone()
            seen["bn"] = model.features.bn1_1.weight.detach().clone()

    Trainer(model, data, opt, epochs=1, batch_size=64, callbacks=[demp, Snapshot()],
            show_progress=False).fit()
    w, bn = seen["w"], seen["bn"]
    assert torch.equal(w[0], before[0])                  # dead unit: untouched
    assert not torch.equal(w[1:], before[1:])            # live units: noised
    assert bn[0] == bn_before[0] and (bn[1:] != bn_before[1:]).all()
    assert model.features.conv1_1.out_channels == before.shape[0] - 1   # then removed


def test_live_masks_and_masked_noise_match_their_definition():
    data, model = _vgg()
    with torch.no_grad():
        model.features.bn1_1.bias[0] = -1e3     # unit 0 of the first site: dead, no gradient
    torch.nn.functional.cross_entropy(model(data.train.inputs[:64]), data.train.targets[:64]).backward()
    sites = [s for s in find_sites(model, data.train.inputs[:2]) if s.producer is not None]
    params, masks = live_masks(model, sites)
    named = dict(model.named_parameters())
    norms = {f"{s.norm}.{a}": s.producer for s in sites if s.norm for a in ("weight", "bias")}
    with_grad = [(n, p) for n, p in named.items() if p.grad is not None]
    assert [id(p) for _, p in with_grad] == [id(p) for p in params]
    for (n, p), m in zip(with_grad, masks):
        want = (named[f"{norms[n]}.weight"].grad.flatten(1) != 0).any(1) if n in norms \
            else p.grad != 0
        assert torch.equal(m, want.to(m.dtype)), n
    assert masks[list(named).index("features.bn1_1.weight")][0] == 0
    before = [p.detach().clone() for p in params]
    torch.manual_seed(0)
    add_masked_noise(params, masks, 0.5)
    moved = torch.cat([(p != b).flatten() for p, b in zip(params, before)])
    live = torch.cat([m.flatten() for m in masks]).bool()
    assert torch.equal(moved, live)                  # exactly the live entries move
    step = torch.cat([(p - b).flatten() for p, b in zip(params, before)])[live]
    assert step.std().item() == pytest.approx(0.5, rel=0.05)


def test_structured_follows_the_cubic_schedule_to_its_targets():
    data, model = _vgg()
    st = StructuredPruning(sparsity=0.5, widths={"act_fc": 5}, start=0.0, end=0.5,
                           prune_every=8)
    rows = Rows()
    Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.01), epochs=2, batch_size=64,
            callbacks=[st, rows], show_progress=False).fit()
    final = rows.rows[-1]["width"]
    initial = st.initial["width"]
    assert final["act_fc"] == 5
    for name, w0 in initial.items():
        if name != "act_fc":
            assert final[name] == round(0.5 * w0), name
    half = st.total_steps * 0.25                          # halfway through the pruning window
    w = st.width_at("act_fc", half)
    assert w == 5 + -(-(initial["act_fc"] - 5) * 0.125 // 1)


def test_structured_leaves_residual_streams_alone():
    torch.manual_seed(0)
    data = load_dataset("synthetic", image=True, num_train=512)
    model = build_model("resnet20", data.input_shape, data.num_classes, width=0.5, blocks=2)
    coupled = coupled_sites(model, find_sites(model, data.train.inputs[:2]), data.train.inputs[:2])
    assert len(coupled["relu"]) == 3 and len(coupled["layer1.0.relu"]) == 1
    st = StructuredPruning(sparsity=0.5, start=0.0, end=0.5, prune_every=4)
    Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.01), epochs=1, batch_size=64,
            callbacks=[st], show_progress=False).fit()
    widths = {s.name: s.num_units for s in find_sites(model, data.train.inputs[:2])}
    for name, w0 in st.initial["width"].items():
        shared = len(coupled[name]) > 1
        assert widths[name] == (w0 if shared else round(w0 / 2)), name


def test_lowest_norm_units():
    assert lowest_norm_units(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2).tolist() == [False, True, False, True]


def test_bad_options():
    with pytest.raises(ValueError, match="target"):
        DemP(target="weights")
    with pytest.raises(ValueError, match="start < end"):
        StructuredPruning(start=0.5, end=0.2)
    with pytest.raises(ValueError, match=r"has no option\(s\) \[.every.\]"):
        DemP(every=2)


def test_a_layer_whose_every_unit_died_keeps_one_and_training_goes_on():
    """Every unit of the first layer dead (BatchNorm scale 0, offset < 0): DemP keeps the one
    with the largest incoming row instead of making BatchNorm1d(0), and says so."""
    torch.manual_seed(0)
    data = load_dataset("synthetic")
    model = nn.Sequential(nn.Linear(data.input_shape[0], 8), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, data.num_classes))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.fill_(-1.0)
    keep = model[0].weight.detach().abs().sum(1).argmax()
    kept_row = model[0].weight.detach()[keep].clone()
    demp = DemP(reg_peak=0.0, noise_peak=0.0, prune_every=2)
    rows = []

    class Rows(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            rows.append(dict(metrics))
    Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.0), epochs=2, batch_size=64,
            callbacks=[demp, Rows()], show_progress=False).fit()
    assert model[0].out_features == 1 and model[1].num_features == 1
    assert torch.equal(model[0].weight.detach()[0], kept_row)
    assert rows[-1]["demp/kept_last_unit"] == 1 and rows[-1]["width"]["2"] == 1


def test_demp_leaves_a_transformer_residual_stream_at_its_width():
    """Tiny ViT: the post-MLP activation feeds the residual stream that attention reads; its
    channels stay (a width of 62 of 64 breaks multi-head attention), block-internal ones go."""
    torch.manual_seed(0)
    model = build_model("vit-tiny", (1, 8, 8), 3, patch=4, dim=16, depth=1, heads=2, mlp_ratio=2)
    data = load_dataset("synthetic")
    x = torch.randn(256, 1, 8, 8)
    split = type(data.train)(x, torch.randint(0, 3, (256,)))
    data = type(data)("img", split, split, split, 3)
    demp = DemP(reg_peak=2.0, target="all", prune_every=3, noise_peak=0.0)
    Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.5), epochs=2, batch_size=64,
            callbacks=[demp], show_progress=False).fit()
    widths = {s.name: s.num_units for s in demp.sites}
    assert widths["blocks.0.mlp.act2"] == 16
    assert widths["blocks.0.mlp.act"] < 32
    model(x[:4])                                  # attention still runs


@pytest.mark.parametrize("method", ["demp", "structured"])
def test_round_to_keeps_widths_at_multiples(method):
    """round_to=4: every site ends at a multiple of 4 units (or its full width), the extra
    units kept back being those with the largest incoming rows."""
    from dormant.methods import build
    torch.manual_seed(0)
    data = load_dataset("synthetic")
    model = build_model("mlp", data.input_shape, data.num_classes, width=30, depth=2)
    args = ({"reg_peak": 0.5, "target": "all", "prune_every": 10, "noise_peak": 0.0}
            if method == "demp" else {"sparsity": 0.55, "prune_every": 10})
    m = build(method, round_to=4, **args)
    Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.2), epochs=3, batch_size=64,
            callbacks=[m], show_progress=False).fit()
    widths = [s.num_units for s in m.sites]
    assert all(w % 4 == 0 or w == 30 for w in widths), widths
    assert any(w < 30 for w in widths)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_compiles_again_after_each_removal(monkeypatch):
    """Trainer(compile=...): the training forward goes through torch.compile (here its eager
    backend: dynamo's capture, guards and recompiles without inductor's compile time), with
    the monitor's hooks inside it; each physical removal compiles the new model afresh, and
    the run is the eager run."""
    from dormant.train import MonitorCallback
    compiled = []
    real = torch.compile

    def eager_compile(model, mode=None):
        compiled.append(mode)
        return real(model, backend="eager")
    monkeypatch.setattr(torch, "compile", eager_compile)
    runs = {}
    for mode in ("off", "reduce-overhead"):
        data, model = _vgg()
        rows, mon = Rows(), MonitorCallback(every_steps=2)
        demp = DemP(reg_peak=1.0, noise_peak=0.0, prune_every=20, span=1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        trainer = Trainer(model, data, opt, epochs=2, batch_size=64, show_progress=False,
                          callbacks=[mon, demp, rows], compile=mode)
        changes = []
        monkeypatch.setattr(trainer, "model_changed",
                            lambda c=changes, f=trainer.model_changed: (c.append(1), f()))
        trainer.fit()
        runs[mode] = (rows.rows, len(changes))
    (eager, n_eager), (comp, n_comp) = runs["off"], runs["reduce-overhead"]
    # compiled at the start and again after removals (one may come after the last step)
    assert n_eager == n_comp > 0 and set(compiled) == {"reduce-overhead"}
    assert 2 <= len(compiled) <= 1 + n_comp
    for a, b in zip(eager, comp):
        assert a["width"] == b["width"] and a["dead_fraction"] == b["dead_fraction"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    with pytest.raises(ValueError, match="compile must be one of off, default"):
        Trainer(model, data, opt, epochs=1, batch_size=8, compile="fast")


@pytest.mark.slow
def test_a_compiled_model_stays_compiled_through_many_removals(monkeypatch):
    """Twelve removals, one unit each: the model is compiled once per width and stays
    compiled past dynamo's recompile limit (8 graphs per function), which would otherwise
    send it back to eager."""
    from torch._dynamo.utils import counters

    from dormant.surgery import remove_units
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: real(m, backend="eager"))
    torch.manual_seed(0)
    data = load_dataset("synthetic", num_train=256)
    model = build_model("mlp", data.input_shape, data.num_classes, depth=2, width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = Trainer(model, data, opt, epochs=1, batch_size=32, show_progress=False,
                      compile="default")
    x, y = data.train.inputs[:32], data.train.targets[:32]
    counters.clear()
    for _ in range(12):
        trainer.train_step(x, y)
        site = find_sites(model, x[:2])[0]
        drop = torch.zeros(site.num_units, dtype=torch.bool)
        drop[0] = True
        remove_units(model, [site], {site.name: drop}, x[:2], opt)
        trainer.model_changed()
    trainer.train_step(x, y)
    assert find_sites(model, x[:2])[0].num_units == 32 - 12
    assert counters["frames"]["total"] == counters["frames"]["ok"] > 0   # none left eager
    assert counters["stats"]["unique_graphs"] == 13    # one per width, no more
