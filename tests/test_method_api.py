"""The Method API in a hand-written loop with DataLoaders gives what the Trainer gives: every
registered method, on an MLP, a CNN with BatchNorm and a model called with dict batches, on
the same seed and batches -- masks bitwise, removals at the same steps, the same metrics and
the same final weights. Plus the options, the probe data forms and the layering."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data import Dataset as TorchDataset
from zoo import ConvBN

import dormant
from dormant.data.base import Dataset, Split
from dormant.methods import METHODS, OptionError, build, describe_options
from dormant.train import Trainer, evaluate

SEED, EPOCHS, BATCH = 0, 3, 64
ROUNDS = {"rounds": 2, "epochs_per_round": 1}
METHOD_ARGS = {"synaptic-stripping": {"factor": 0.2}, "redo": {"tau": 0.1}, "imp": ROUNDS,
               "ap": {**ROUNDS, "neuron_fraction": 0.5},
               "nnrelief": {**ROUNDS, "probe_samples": 200},
               "demp": {"reg_peak": 0.5, "target": "all", "prune_every": 5, "noise_peak": 1e-3},
               "structured": {"sparsity": 0.5, "prune_every": 4},
               "continual-backprop": {"replacement_rate": 0.05, "maturity_threshold": 3},
               "shrink-perturb": {"shrink": 0.8, "perturb": 0.05},
               "l2-init": {"lam": 0.01}}
NAMES = [n for n in METHODS.names() if n != "none"]


class KeywordMlp(nn.Module):
    """Called as ``model(features=..., mask=...)`` (Hugging Face style); the Trainer calls it
    as ``model(x)`` with the mask left out, which multiplies by one."""

    def __init__(self, d: int, classes: int):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(d, 24), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(24, 16), nn.ReLU()
        self.head = nn.Linear(16, classes)

    def forward(self, features, mask=None):
        if mask is not None:
            features = features * mask
        return self.head(self.act2(self.fc2(self.act1(self.fc1(features)))))


def _data(kind: str) -> Dataset:
    g = torch.Generator().manual_seed(1)
    shape = (1, 8, 8) if kind == "cnn" else (12,)
    x = torch.randn(768, *shape, generator=g)
    w = torch.randn(x[0].numel(), 3, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    split = lambda a, b: Split(x[a:b], y[a:b])
    return Dataset(kind, split(0, 512), split(512, 640), split(640, 768), 3)


def _model(kind: str, data: Dataset) -> nn.Module:
    torch.manual_seed(SEED)
    if kind == "cnn":
        return ConvBN()
    if kind == "dict":
        return KeywordMlp(12, 3)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                         nn.Linear(16, 3))


class _Dicts(TorchDataset):
    """Samples as dicts of model inputs plus labels, collated into dict batches."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        x = self.split.inputs[i]
        return {"features": x, "mask": torch.ones_like(x), "labels": self.split.targets[i]}


def _dataset(kind, split):
    return _Dicts(split) if kind == "dict" else TensorDataset(split.inputs, split.targets)


def _forward(model, batch):
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    return model(batch[0])


def _recording(method, log):
    """Record what the method returns from its calls (same wrapper on both paths)."""
    after_step, end_epoch = method.after_step, method.end_epoch

    def step():
        changed = after_step()
        if changed:
            log["changed_at"].append(method.step)
        return changed

    def epoch(*args, **kwargs):
        out = end_epoch(*args, **kwargs)
        log["results"].append(dict(out))
        log["masks"].append({n: m.clone() for n, m in (method.masks.masks.items()
                                                      if method.masks else [])})
        return out
    method.after_step, method.end_epoch = step, epoch
    return method


def _trainer_path(name, kind):
    data = _data(kind)
    model = _model(kind, data)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log = {"changed_at": [], "results": [], "masks": []}
    method = _recording(build(name, **METHOD_ARGS[name]), log)
    Trainer(model, data, opt, epochs=EPOCHS, batch_size=BATCH, seed=SEED, callbacks=[method],
            show_progress=False).fit()
    return model, log


def _own_loop(name, kind):
    """What a user writes: DataLoaders, their own loss, the five calls."""
    data = _data(kind)
    model = _model(kind, data)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log = {"changed_at": [], "results": [], "masks": []}
    method = _recording(build(name, **METHOD_ARGS[name]), log)
    probe = DataLoader(_dataset(kind, data.split(method.opts.probe)), batch_size=256)
    per_epoch = -(-len(data.train) // BATCH)
    method.prepare(model, opt, probe=probe, total_steps=EPOCHS * per_epoch, epochs=EPOCHS,
                   seed=SEED, forward=_forward)
    train = _dataset(kind, data.train)
    for epoch in range(1, EPOCHS + 1):
        # the Trainer's shuffle, so that both paths see the same batches
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(
            SEED * 100_003 + epoch)).tolist()
        loader = DataLoader(train, batch_size=BATCH, sampler=order,
                            generator=torch.Generator())
        for batch in loader:
            y = batch["labels"] if isinstance(batch, dict) else batch[1]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(_forward(model, batch), y).backward()
            method.after_backward()
            opt.step()
            method.after_step()
        _, val_acc = evaluate(model, data.val)
        method.end_epoch(val_score=val_acc)
    assert method.finalize() is model
    return model, log


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "cnn", "dict"])
@pytest.mark.parametrize("name", NAMES)
def test_own_loop_matches_the_trainer(name, kind):
    ref_model, ref = _trainer_path(name, kind)
    model, own = _own_loop(name, kind)
    assert own["changed_at"] == ref["changed_at"]
    assert len(own["results"]) == EPOCHS
    for got, want in zip(own["results"], ref["results"]):
        want = {k: v for k, v in want.items() if k not in ("val_loss", "val_acc", "test_loss",
                                                             "test_acc")}
        assert {k: v for k, v in got.items() if k in want} == want
    for got, want in zip(own["masks"], ref["masks"]):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in got)
    ref_state, state = ref_model.state_dict(), model.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    if name in ("demp", "structured"):
        assert own["changed_at"], "expected at least one removal"


def test_methods_act_in_the_own_loop():
    """Not vacuous: stripping strips, structured removes, NNrelief prunes on dict batches."""
    _, ss = _own_loop("synaptic-stripping", "cnn")
    assert ss["results"][-1]["ss/stripped_total"] > 0
    model, st = _own_loop("structured", "mlp")
    assert model[0].out_features < 24 and st["results"][-1]["units_removed"] > 0
    _, nr = _own_loop("nnrelief", "dict")
    assert nr["results"][-1]["sparsity"] > 0


def test_end_epoch_reports_new_rounds_and_restores():
    data = _data("mlp")
    model = _model("mlp", data)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = build("nnrelief", rounds=1, epochs_per_round=1, probe_samples=100)
    method.prepare(model, opt, probe=data.train.inputs)
    with pytest.raises(ValueError, match=r"end_epoch\(val_score=\.\.\.\)"):
        method.end_epoch()
    method.epoch = 0
    seen = []
    result = method.end_epoch(val_score=0.5, evaluate=lambda m: seen.append(m) or {"x": 1.0})
    assert result.new_round and result.restored and not result.model_changed
    assert seen == [model] and result["x"] == 1.0 and result["round_end"]


def test_prepare_refuses_what_a_method_needs():
    model = _model("mlp", _data("mlp"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"demp: prepare\(\) needs total_steps="):
        build("demp").prepare(model, opt, probe=torch.randn(8, 12))
    with pytest.raises(ValueError, match="need epochs = 15"):
        build("imp", rounds=2, epochs_per_round=5).prepare(model, opt, probe=torch.randn(8, 12),
                                                           epochs=10)
    with pytest.raises(ValueError, match=r"prepare\(\) needs probe=\.\.\. or example="):
        build("redo").prepare(model, opt)
    with pytest.raises(RuntimeError, match="call prepare"):
        build("redo").after_step()
    method = build("redo").prepare(model, opt, example=torch.randn(2, 12))
    with pytest.raises(ValueError, match=r"redo observes units: prepare\(\.\.\., probe=\.\.\.\)"):
        method.end_epoch()


@pytest.mark.parametrize("name", NAMES)
def test_every_option_is_typed_documented_and_checked(name):
    rows = describe_options(name)
    assert rows and all(help_ for _, _, _, help_ in rows), "every option has a help line"
    with pytest.raises(OptionError, match=rf"{name} has no option\(s\) \['nope'\]; valid: "):
        build(name, nope=1)
    with pytest.raises(OptionError, match=rf"^{name}: probe_samples: expected an int or None "
                                          r">= 1, got 'abc'$"):
        build(name, probe_samples="abc")
    with pytest.raises(OptionError, match=rf"^{name}: eps: expected a float >= 0, got nan$"):
        build(name, eps=float("nan"))


@pytest.mark.parametrize("kwargs, message", [
    ({"factor": "abc"}, "synaptic-stripping: factor: expected a float in (0, 1), got 'abc'"),
    ({"factor": 1}, "synaptic-stripping: factor: expected a float in (0, 1), got 1"),
    ({"every": 2.5}, "synaptic-stripping: every: expected an int >= 1, got 2.5"),
    ({"every": True}, "synaptic-stripping: every: expected an int >= 1, got True"),
    ({"bias_fallback": 1}, "synaptic-stripping: bias_fallback: expected a bool, got 1"),
    ({"activations": "relu"}, "synaptic-stripping: activations: expected a list of str or "
                              "None, got 'relu'"),
])
def test_bad_values_name_the_option_type_and_range(kwargs, message):
    with pytest.raises(OptionError) as err:
        build("synaptic-stripping", **kwargs)
    assert str(err.value) == message


def test_good_values_are_converted():
    m = build("synaptic-stripping", factor=0.1, every=2, activations=["relu"], probe_samples=5)
    assert m.opts.activations == ("relu",) and m.opts.every == 2
    assert build("demp", span=2000).opts.span == 2000.0
    assert build("imp", rewind=2, epochs_per_round=3).rewind_epoch == 2
    with pytest.raises(OptionError, match="rewind: expected 'init', 'none' or an epoch"):
        build("imp", rewind="start")
    with pytest.raises(OptionError, match="must come before the first pruning"):
        build("imp", rewind=5, epochs_per_round=5)
    assert build("none") is None


def test_probe_data_forms_give_the_same_decision():
    """A tensor, an (inputs, targets) tuple, a list of batches, a DataLoader and dict batches
    with a forward function: one probe set, one answer."""
    torch.manual_seed(0)
    model = KeywordMlp(12, 3)
    with torch.no_grad():
        model.fc1.bias[:5] = -100.0
    x, y = torch.randn(300, 12), torch.randint(0, 3, (300,))
    kw = dict(sites=dormant.find_sites(model, x[:2]))
    forms = [(x, None), ((x, y), None), ([x[:100], x[100:]], None), ([x[:150], x[150:]], None),
             (DataLoader(TensorDataset(x, y), batch_size=64), None),
             ([{"features": x[:150]}, {"features": x[150:]}], None),
             ({"features": x}, None),
             (DataLoader(_Dicts(Split(x, y)), batch_size=50), _forward)]
    reports = [dormant.diagnose(model, data, forward=fwd, **kw) for data, fwd in forms]
    for r in reports:
        assert r.samples == 300
        assert all(torch.equal(r.dead[n], reports[0].dead[n]) for n in r.dead)
    assert int(reports[0].dead["act1"][:5].sum()) == 5
    assert dormant.diagnose(model, x, max_samples=70, **kw).samples == 70
    with pytest.raises(TypeError, match="re-iterable"):
        dormant.diagnose(model, (b for b in [x]), **kw)


def test_a_probe_pass_leaves_the_random_state_alone():
    model = _model("mlp", _data("mlp"))
    method = build("redo").prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                   probe=DataLoader(TensorDataset(torch.randn(64, 12)),
                                                    batch_size=16))
    state = torch.get_rng_state()
    method.observe()
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow
def test_layers_point_downward():
    """Methods never import the training loop; the report imports neither."""
    code = ("import sys, dormant.methods, dormant.report; "
            "print(sorted(m for m in sys.modules if m.startswith(('dormant.train', "
            "'dormant.experiments'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = ("import sys, dormant.report; print(sorted(m for m in sys.modules if m.startswith("
            "('dormant.methods', 'dormant.train', 'dormant.experiments'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # the session sits between the methods and the loops; experiments never read reports
    for module, below in (("dormant.session", ("dormant.train", "dormant.experiments",
                                               "dormant.integrations")),
                          ("dormant.experiments", ("dormant.report",))):
        code = (f"import sys, {module}; print(sorted(m for m in sys.modules "
                f"if m.startswith({below!r})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == "[]", module
    import dormant.rundir
    assert "from ." not in open(dormant.rundir.__file__).read()   # the bottom layer


def test_a_tuple_batch_for_a_model_with_more_inputs_warns_instead_of_dropping_silently():
    model = KeywordMlp(12, 3)
    x = torch.randn(8, 12)
    with pytest.warns(UserWarning, match=r"called as model\(batch\[0\]\).*takes more inputs"):
        dormant.diagnose(model, [(x, torch.ones_like(x))])
    report = dormant.diagnose(model, [(x, torch.ones_like(x))],
                              forward=lambda m, b: m(*b))           # both are inputs
    assert report.samples == 8


def test_bf16_autocast_and_channels_last_train_and_survive_a_removal():
    """Trainer(precision="bf16", memory_format="channels_last"): the training forward runs
    under bf16 autocast (loss in fp32), the 4-d weights stay NHWC after DemP removes units
    physically, and the losses stay finite; bad values name the option and the valid ones."""
    data = _data("cnn")
    model = _model("cnn", data)
    seen = []
    model.register_forward_hook(
        lambda m, i, o: seen.append((o.dtype, torch.is_autocast_enabled("cpu"))))
    demp = build("demp", **METHOD_ARGS["demp"])
    t = Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.05), epochs=EPOCHS,
                batch_size=BATCH, seed=SEED, callbacks=[demp], show_progress=False,
                precision="bf16", memory_format="channels_last")
    hist = t.fit()
    assert hist[-1]["units_removed"] > 0                    # a removal happened
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert (torch.bfloat16, True) in seen                   # training forwards: autocast
    assert seen[-1] == (torch.float32, False)               # evaluation: fp32
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in hist)
    for kw, msg in (({"precision": "fp16"}, "precision must be one of fp32, bf16"),
                    ({"memory_format": "nhwc"}, "memory_format must be one of contiguous")):
        with pytest.raises(ValueError, match=msg):
            Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.05), epochs=1,
                    batch_size=BATCH, **kw)


def test_a_method_registers_beside_its_class_and_a_scoped_registry_forgets_it():
    from dormant.methods import METHODS, Method, build, from_options, parse_options

    with METHODS.scoped():
        @METHODS.register
        class Halve(Method):
            """Halves every weight at each epoch's end (a test method)."""
            name = "halve"
            uses_sites = False

            def update(self, act=True):
                if act:
                    with torch.no_grad():
                        for p in self.model.parameters():
                            p.mul_(0.5)

        assert "halve" in METHODS and METHODS.describe()["halve"].startswith("Halves")
        method = build("halve", every=2)
        assert from_options("halve", parse_options("halve", every=2)).opts == method.opts
        with pytest.raises(ValueError, match="already registered"):
            METHODS.register(Halve)
    assert "halve" not in METHODS
    with pytest.raises(KeyError, match="unknown method 'halve'; valid methods: ap, "):
        build("halve")
    with pytest.raises(TypeError, match="has no `name`"):
        METHODS.register(lambda: None)


def test_the_adding_a_method_example_runs_as_written():
    """docs/adding-a-method.md's example, imports made absolute, registered in a scoped
    registry and driven by the Trainer."""
    import re
    from pathlib import Path

    from dormant.methods import METHODS
    text = (Path(__file__).parents[1] / "docs" / "adding-a-method.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.replace("from ..", "from dormant.").replace("from .base", "from dormant.methods.base")
    with METHODS.scoped():
        exec(compile(code, "adding-a-method.md", "exec"), {"__name__": "example"})
        data, model = _data("mlp"), _model("mlp", _data("mlp"))
        with torch.no_grad():
            model.get_submodule(_first_producer(model)).bias[:3] = -1e4   # three dead units
        before = {k: v.clone() for k, v in model.state_dict().items()}
        t = Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.0), epochs=1,
                    batch_size=BATCH, callbacks=[build("halve-dead", factor=0.5)],
                    show_progress=False)
        rows = t.fit()
    assert rows[-1]["halve/units"] >= 3
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "halve-dead" not in METHODS


def _first_producer(model):
    return next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
