import pytest
import torch
import torch.nn as nn

from dormant.data import Dataset, Split
from dormant.methods import SynapticStripping, build
from dormant.methods.synaptic_stripping import beyond_reach, strip_decision
from dormant.train import Trainer


def test_golden_rows():
    rows = torch.tensor([[-4., -3, -2, -1, 0, 1, 2, 3],
                         [-9., -9, -9, -9, -9, -9, -9, 5],    # live: never touched
                         [0., 0, 0, 0, 0, 0, 0, 0],           # dead but empty: skipped
                         [-1., -1, -1, 2, 0, 0, 0, 0]])       # ties at the quantile
    dead = torch.tensor([True, False, True, True])
    keep = strip_decision(rows, dead, 0.25)
    # non-zero of row 0: [-4,-3,-2,-1,1,2,3]; 25% quantile at position 1.5 -> -2.5
    assert keep[0].tolist() == [False, False, True, True, True, True, True, True]
    assert keep[1].all() and keep[2].all()
    # quantile of [-1,-1,-1,2] at 25% is -1: strict '<' prunes nothing (as the official code)
    assert keep[3].all()
    # default factor 0.05: position 0.3 -> -3.7: only -4 goes
    assert strip_decision(rows, dead, 0.05)[0].tolist() == [False] + [True] * 7


def test_rule_runs_out_without_negative_weights():
    """No negative weight left: the rule strips the smallest positive one (lowering the
    pre-activation on x >= 0); one weight left: it strips nothing. Such dead units are
    counted as beyond reach; live ones and dead ones with a negative weight are not."""
    rows = torch.tensor([[0., 0.5, 0.2, 0.9, 0.0],      # dead, all positive
                         [0., 0.0, 0.3, 0.0, 0.0],      # dead, one weight left
                         [-1., 0.5, 0.2, 0.0, 0.0],     # dead, a negative weight left
                         [0., 0.5, 0.2, 0.9, 0.0]])     # live
    dead = torch.tensor([True, True, True, False])
    keep = strip_decision(rows, dead, 0.05)
    nz = rows != 0                                # zeros are already pruned either way
    assert keep[0][nz[0]].tolist() == [True, False, True]     # 0.2 goes: a positive weight
    assert keep[1][nz[1]].tolist() == [True]                  # one left: a fixed point
    assert beyond_reach(rows, dead).tolist() == [True, True, False, False]


def test_bias_untouched_and_nonnegative_inputs_raise_the_preactivation():
    torch.manual_seed(0)
    layer = nn.Linear(50, 8)
    x = torch.rand(100, 50)                      # inputs >= 0, e.g. a previous ReLU's output
    before = layer(x)
    dead = torch.ones(8, dtype=torch.bool)
    keep = strip_decision(layer.weight.detach(), dead, 0.05)
    bias = layer.bias.detach().clone()
    with torch.no_grad():
        layer.weight.mul_(keep)
    after = layer(x)
    assert torch.equal(layer.bias, bias)
    assert (~keep).sum(1).min() >= 1                        # every row lost something
    assert (layer.weight.detach()[~keep] == 0).all()
    assert (after > before).all()                           # removed weights were negative


def _positive_data(n=512, d=20, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g)
    y = (x[:, :classes].argmax(1))
    return Dataset("pos", Split(x[:400], y[:400]), Split(x[400:], y[400:]), Split(x[400:], y[400:]),
                   classes)


def _model_with_dying_units(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():   # units 0..7 dead on x >= 0: mostly negative rows, a little positive
        model[0].weight[:8] = -torch.rand(8, 20) * 0.5
        model[0].weight[:8, :4] = 0.05
        model[0].bias[:8] = 0.0
    return model


def test_stripping_revives_units_and_never_touches_live_rows():
    data = _positive_data()
    model = _model_with_dying_units()
    ss = SynapticStripping(factor=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)   # tiny lr: stripping does the work
    trainer = Trainer(model, data, opt, epochs=12, batch_size=64, callbacks=[ss],
                      show_progress=False)
    history, masks_seen = [], []

    class Spy:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def on_epoch_end(self, trainer, epoch, metrics):
            history.append(dict(metrics))
            masks_seen.append(ss.masks.masks["0.weight"].clone() if ss.masks else None)

    trainer.callbacks.append(Spy())
    trainer.fit()
    first, last = history[0], history[-1]
    assert first["ss/dead_units"] == 8
    assert last["ss/dead_units"] == 0
    assert sum(h["ss/revived"] for h in history) == 8
    # live units (8..15) keep every incoming weight through the whole run
    assert all(m[8:].all() for m in masks_seen if m is not None)
    # masks only shrink
    for a, b in zip(masks_seen, masks_seen[1:]):
        if a is not None:
            assert not (b & ~a).any()
    assert last["ss/stripped_total"] == sum(h["ss/stripped"] for h in history)
    assert last["weight_sparsity"] > 0


def test_active_params_counts_unstripped_weights_of_live_units():
    data = _positive_data()
    model = _model_with_dying_units()
    ss = SynapticStripping(factor=0.5)
    trainer = Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.0), epochs=1,
                      batch_size=64, callbacks=[ss], show_progress=False)
    trainer.fit()
    # before stripping: 8 live rows x 20 weights are active
    assert ss.metrics["ss/active_params"] == 8 * 20


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match=r"factor: expected a float in \(0, 1\), got 1.5"):
        build("synaptic-stripping", factor=1.5)
    with pytest.raises(ValueError, match=r"probe: expected a str \(one of train, val\), got 'test'"):
        build("synaptic-stripping", probe="test")
    with pytest.raises(ValueError, match="no option"):
        build("synaptic-stripping", fraction=0.1)


def _beyond_reach_model(seed=0):
    """Units 0..3: positive weights on x >= 0, held dead by a negative bias (beyond the
    paper's rule); units 4..7: a negative weight left (within reach); 8..15 live."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].weight[:8] = 0.0
        model[0].weight[:4, :2] = torch.tensor([0.1, 0.2])
        model[0].bias[:4] = -5.0
        model[0].weight[4:8, :2] = torch.tensor([-1.0, -0.5])
        model[0].weight[4:8, 2:4] = 0.5
        model[0].bias[4:8] = -1.5       # dead too, and their bias is negative
        model[0].weight[8:] = model[0].weight[8:].abs()
        model[0].bias[8:] = 0.1
    return model


@pytest.mark.parametrize("fallback", [False, True])
def test_bias_fallback_strips_only_negative_biases_of_units_beyond_reach(fallback):
    data = _positive_data()
    model = _beyond_reach_model()
    bias0 = model[0].bias.detach().clone()
    ss = SynapticStripping(factor=0.05, bias_fallback=fallback)
    trainer = Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.0), epochs=1,
                      batch_size=64, callbacks=[ss], show_progress=False)
    trainer.fit()
    bias = model[0].bias.detach()
    assert ss.metrics["ss/beyond_reach"] == 4
    if not fallback:       # the paper's rule: biases untouched, positive weights stripped
        assert torch.equal(bias, bias0) and "ss/bias_stripped" not in ss.metrics
        assert (model[0].weight[:4, 0] == 0).all()     # the smaller positive weight went
        return
    assert ss.metrics["ss/bias_stripped"] == 4
    assert (bias[:4] == 0).all() and torch.equal(bias[4:], bias0[4:])
    assert (model[0].weight[:4, :2] == torch.tensor([0.1, 0.2])).all()   # kept this time
    assert (model[0].weight[4:8, 0] == 0).all()      # within reach: the paper's rule
    assert not ss.masks.masks["0.bias"][4:].logical_not().any()
    assert (model[0](data.val.inputs)[:, :4] > 0).any(0).all()   # they fire again


def test_bias_fallback_must_be_a_bool():
    with pytest.raises(ValueError, match="bias_fallback: expected a bool, got 'yes'"):
        build("synaptic-stripping", bias_fallback="yes")
