import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torch_pruning")

from dormant import find_sites
from dormant.models import build_model
from dormant.surgery import architecture, remove_units, resize
from dormant.units import incoming, tensor, unit_mask_for

SHAPE = (1, 16, 16)
MODELS = {
    "mlp": lambda: build_model("mlp", SHAPE, 5, width=12, depth=3),
    "lenet5": lambda: build_model("lenet5", SHAPE, 5),
    "vgg-small": lambda: build_model("vgg-small", SHAPE, 5, width=0.25, hidden=16),
    "resnet20": lambda: build_model("resnet20", SHAPE, 5, width=0.5, blocks=2),
}


class ZeroedUnits:
    """Reference semantics of removal: the removed units output 0 at their site (hooks on the
    activation modules, honouring modules called several times per forward)."""

    def __init__(self, model, sites, units):
        self.handles, self.calls = [], {}
        by_module = {}
        for s in sites:
            by_module.setdefault(s.tap.module, {})[s.tap.call_index] = (s, units[s.name])
        for name, per_call in by_module.items():
            def hook(mod, inp, out, name=name, per_call=per_call):
                i = self.calls.get(name, 0)
                self.calls[name] = i + 1
                site, flags = per_call[i % next(iter(per_call.values()))[0].tap.calls]
                shape = [1] * out.ndim
                shape[site.unit_dim] = -1
                return out * (~flags).to(out.dtype).view(shape)
            self.handles.append(model.get_submodule(name).register_forward_hook(hook))

    def __call__(self, model, x):
        self.calls.clear()
        return model(x)

    def remove(self):
        for h in self.handles:
            h.remove()


def _pick(sites, seed=0, frac=0.3):
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.rand(s.num_units, generator=g) < frac for s in sites}


@torch.no_grad()
def _mask_units(model, sites, units):
    """The masked equivalent: zero the incoming weights, bias and norm affine of the units."""
    for s in sites:
        if s.name in units and s.producer is not None:
            for sl in incoming(model, s, stats=False):
                tensor(model, sl.name).masked_fill_(unit_mask_for(model, sl, units[s.name],
                                                                  s.num_units), 0.0)


@pytest.mark.parametrize("name", list(MODELS))
def test_compacted_model_equals_masked_model(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(6, *SHAPE)
    sites = find_sites(model, x[:2])
    units = _pick(sites)
    compact = copy.deepcopy(model)
    removed = remove_units(compact, sites, units, x[:2])
    assert sum(int(r.sum()) for r in removed.values()) > 0
    for s in sites:
        assert not (removed[s.name] & ~units[s.name]).any()   # never an unflagged unit
    zeroed = ZeroedUnits(model, sites, removed)              # the same units output 0
    try:
        reference = zeroed(model, x)
    finally:
        zeroed.remove()
    assert torch.allclose(compact(x), reference, atol=1e-5)
    new_sites = {s.name: s.num_units for s in find_sites(compact, x[:2])}
    for s in sites:
        assert new_sites[s.name] == s.num_units - int(removed[s.name].sum())
    assert compact.state_dict().keys() == model.state_dict().keys()


def test_residual_stream_units_go_only_when_every_reader_agrees():
    torch.manual_seed(0)
    model = MODELS["resnet20"]().eval()
    x = torch.randn(4, *SHAPE)
    sites = find_sites(model, x[:2])
    stream = [s for s in sites if s.name == "relu" or (s.residual and s.producer.startswith("layer1"))]
    assert len(stream) == 3                      # stem + the two blocks of stage 1
    flags = {s.name: torch.zeros(s.num_units, dtype=torch.bool) for s in sites}
    flags["relu"][[0, 1]] = True                 # flagged at the stem only
    for s in stream[1:]:
        flags[s.name][1] = True                  # channel 1 flagged at every reader
    removed = remove_units(copy.deepcopy(model), sites, flags, x[:2])
    for s in stream:
        assert removed[s.name].nonzero().flatten().tolist() == [1], s.name


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_one_step_after_surgery_equals_the_masked_step(opt_name):
    torch.manual_seed(0)
    # float64: float32 summation order differs between the two shapes, and Adam's
    # normalisation would amplify that noise
    model = MODELS["vgg-small"]().double()
    x, y = torch.randn(8, *SHAPE, dtype=torch.float64), torch.randint(5, (8,))
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if opt_name == "sgd" else \
        (lambda p: torch.optim.Adam(p, lr=0.01))
    opt = make(model.parameters())
    for _ in range(3):                                  # build optimizer state
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    sites = find_sites(model, x[:2])
    units = {s.name: torch.zeros(s.num_units, dtype=torch.bool) for s in sites}
    units["features.act1_2"][[0, 3]] = True             # block-internal conv units
    units["act_fc"][[2, 5, 7]] = True                   # fc units (flatten consumer upstream)
    compact, masked = copy.deepcopy(model), copy.deepcopy(model)
    opt_c, opt_m = make(compact.parameters()), make(masked.parameters())
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))   # load_state_dict shares tensors
    opt_m.load_state_dict(copy.deepcopy(opt.state_dict()))
    remove_units(compact, find_sites(compact, x[:2]), units, x[:2], opt_c)
    _mask_units(masked, find_sites(masked, x[:2]), units)
    for m, o in ((compact, opt_c), (masked, opt_m)):
        o.zero_grad()
        F.cross_entropy(m.train()(x), y).backward()
        o.step()
    # the surviving parameters of the two models are identical after the step
    keep = ~units["features.act1_2"]
    assert torch.allclose(compact.features.conv1_2.weight,
                          masked.features.conv1_2.weight[keep], atol=1e-10)
    assert torch.allclose(compact.features.conv2_1.weight,
                          masked.features.conv2_1.weight[:, keep], atol=1e-10)
    keep_fc = ~units["act_fc"]
    assert torch.allclose(compact.head.weight, masked.head.weight[:, keep_fc], atol=1e-10)
    assert torch.allclose(compact.fc.bias, masked.fc.bias[keep_fc], atol=1e-10)
    state = opt_c.state[compact.features.conv1_2.weight]
    assert all(v.shape == compact.features.conv1_2.weight.shape
               for v in state.values() if torch.is_tensor(v) and v.ndim > 0)


def test_compacted_model_saves_and_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    model = MODELS["vgg-small"]().eval()
    x = torch.randn(3, *SHAPE)
    sites = find_sites(model, x[:2])
    remove_units(model, sites, _pick(sites, frac=0.4), x[:2])
    torch.save({"arch": architecture(model), "model": model.state_dict()}, tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    fresh = resize(MODELS["vgg-small"](), state["arch"])
    fresh.load_state_dict(state["model"])
    assert torch.allclose(fresh.eval()(x), model(x))
