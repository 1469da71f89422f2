"""One Session behind every host: one exact probe pass per epoch (counted), the method's
decision read from that pass, and the same metric keys from the built-in Trainer, Lightning
and the Hugging Face Trainer on the same model."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dormant.data import load_dataset
from dormant.diagnose import probe
from dormant.methods import build
from dormant.methods.base import _versions
from dormant.monitor import ActivityMonitor
from dormant.session import Session
from dormant.sites import find_sites
from dormant.taps import SiteTaps
from dormant.train import SessionCallback, Trainer

TRAINER_KEYS = {"epoch", "step", "train_loss", "diverged", "val_loss", "val_acc", "test_loss",
                "test_acc", "lr", "train_time"}


class Net(nn.Module):
    """An MLP every host can drive: ``net(x)`` gives logits, ``net(x, labels)`` a dict with
    the loss (what the HF Trainer wants)."""

    def __init__(self, dim=20, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act1 = nn.Linear(dim, 24), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(24, 16), nn.ReLU()
        self.head = nn.Linear(16, classes)
        with torch.no_grad():
            self.fc1.bias[:5] = -50.0          # dead from the start: stripping acts

    def forward(self, x, labels=None):
        logits = self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))
        if labels is None:
            return logits
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _data():
    return load_dataset("synthetic", num_train=256, num_test=96)


class Count:
    """Samples that went through the model without gradients (evaluation and probe passes),
    per epoch."""

    def __init__(self, model):
        self.per_epoch, self.now = [], 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if not torch.is_grad_enabled():
            self.now += args[0].shape[0]

    def end_epoch(self):
        self.per_epoch.append(self.now)
        self.now = 0


def test_one_probe_pass_per_epoch_feeds_metrics_plasticity_tensorboard_and_the_method(tmp_path):
    pytest.importorskip("tensorboard")
    from dormant.integrations.tensorboard import TensorBoardCallback
    from dormant.train.callbacks import Callback
    data, model = _data(), Net()
    count = Count(model)

    class Tick(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            count.end_epoch()

    session = Session(build("synaptic-stripping", factor=0.5), every_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = Trainer(model, data, opt, epochs=3, batch_size=32, show_progress=False,
                      callbacks=[SessionCallback(session),
                                 TensorBoardCallback(tmp_path / "tb", session=session), Tick()])
    rows = trainer.fit()
    val, test = len(data.val), len(data.test)
    # evaluation of val and test, then one probe pass over val; the test split's sparsity
    # once, after the last epoch
    assert count.per_epoch == [val + test + val] * 2 + [val + test + val + test]
    assert rows[0]["ss/stripped_total"] > 0 and "erank/act1" in rows[0]
    assert "test_sparsity" in rows[-1] and "test_sparsity" not in rows[0]


def test_the_methods_decision_from_the_sessions_pass_equals_its_own():
    data = _data()
    outcomes = []
    for offered in (False, True):
        model = Net()
        method = build("synaptic-stripping", factor=0.5)
        method.prepare(model, None, probe=data.val)
        mon = probe(model, data.val) if offered else None
        count = Count(model)
        method.end_epoch(observed=mon)
        outcomes.append(({k: v.clone() for k, v in model.state_dict().items()},
                         dict(method.metrics), count.now))
    (w0, m0, own), (w1, m1, none) = outcomes
    assert own == len(data.val) and none == 0       # no pass of its own when offered one
    assert m0 == m1 and m0["ss/stripped_total"] > 0
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_an_offered_pass_is_not_used_once_a_weight_changed_or_samples_differ():
    data = _data()
    model = Net()
    method = build("synaptic-stripping", factor=0.5).prepare(model, None, probe=data.val)
    mon = probe(model, data.val)
    method._offered = (mon, _versions(model))
    assert method._offered_pass() is not None
    with torch.no_grad():
        model.fc2.weight.mul_(1.0)            # an in-place edit: the pass is stale
    assert method._offered_pass() is None
    sampled = build("synaptic-stripping", probe_samples=10).prepare(model, None, probe=data.val)
    sampled._offered = (probe(model, data.val), _versions(model))
    assert sampled._offered_pass() is None


def test_taps_hand_outputs_to_every_listener_and_leave_no_hook():
    model = Net()
    x = torch.randn(8, 20)
    sites = find_sites(model, x[:2])
    seen_a, seen_b = [], []
    with SiteTaps(model, sites, lambda s, y: seen_a.append(s.name)) as taps:
        taps.listen(lambda s, y: seen_b.append(tuple(y.shape)))
        model(x)
    assert seen_a == ["act1", "act2"] and seen_b == [(8, 24), (8, 16)]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    mon = ActivityMonitor(model, sites).open()
    model(x)
    mon.close()
    assert mon.stats()["act1"].samples == 8 and not mon.attached
    with pytest.warns(FutureWarning, match="every_steps"):
        assert ActivityMonitor(model, sites, every=3).every_steps == 3


def _trainer_keys(data, method):
    model = Net()
    session = Session(method, every_steps=1)
    trainer = Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.05), epochs=2,
                      batch_size=32, show_progress=False, callbacks=[SessionCallback(session)])
    rows = trainer.fit()
    return [set(r) - TRAINER_KEYS for r in rows]


def _lightning_keys(data, method):
    L = pytest.importorskip("lightning")
    from dormant.integrations.lightning import DormantCallback

    class Module(Net, L.LightningModule):
        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    loader = lambda s: torch.utils.data.DataLoader(  # noqa: E731
        torch.utils.data.TensorDataset(s.inputs, s.targets), batch_size=32)
    cb = DormantCallback(method=method, every_steps=1, probe=loader(data.val),
                         test=loader(data.test))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[cb],
                  enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False).fit(Module(), loader(data.train))
    return [{k.removeprefix("dormant/") for k in r} - {"epoch"} for r in cb.history]


def _hf_keys(data, method):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from dormant.integrations.hf import DormantTrainerCallback

    class Rows(torch.utils.data.Dataset):
        def __init__(self, split):
            self.split = split

        def __len__(self):
            return len(self.split)

        def __getitem__(self, i):
            return {"x": self.split.inputs[i], "labels": self.split.targets[i]}

    loader = lambda s: torch.utils.data.DataLoader(Rows(s), batch_size=32)  # noqa: E731
    cb = DormantTrainerCallback(method=method, every_steps=1, probe=loader(data.val),
                                test=loader(data.test))
    args = tf.TrainingArguments(output_dir="unused", num_train_epochs=2,
                                per_device_train_batch_size=32, learning_rate=0.05,
                                report_to=[], use_cpu=True, save_strategy="no",
                                logging_strategy="epoch", seed=0, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf.Trainer(model=Net(), args=args, train_dataset=Rows(data.train),
                   callbacks=[cb]).train()
    return [{k.removeprefix("dormant/") for k in r} - {"epoch", "step"} for r in cb.history]


def test_the_three_hosts_log_the_same_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _data()
    method = lambda: build("synaptic-stripping", factor=0.5)  # noqa: E731
    ours = _trainer_keys(data, method())
    assert "erank/act1" in ours[0] and "grad_norm" in ours[0] and "ss/stripped_total" in ours[0]
    assert "distance_from_init" in ours[0] and "test_sparsity" in ours[1]
    for name, keys in (("lightning", _lightning_keys(data, method())),
                       ("hf", _hf_keys(data, method()))):
        for epoch, (mine, theirs) in enumerate(zip(ours, keys), 1):
            assert mine == theirs, (name, epoch, sorted(mine ^ theirs))
        assert len(keys) == len(ours), name


def test_a_session_without_a_monitor_drives_the_method_only():
    data = _data()
    model = Net()
    session = Session(build("synaptic-stripping", factor=0.5), monitor=False)
    session.start(model, None, probe=data.val)
    out = session.end_epoch()
    assert out["ss/stripped_total"] > 0
    assert not {"dead_fraction", "dynamic_dnr", "grad_norm", "sparsity"} & set(out)
    session.close()
    assert all(not m._forward_hooks for m in model.modules())
    copy.deepcopy(model)       # a plain model again


def test_a_run_resumes_with_tensorboard_added_and_from_an_old_positional_checkpoint(
        tmp_path, interrupt_at_epoch):
    """Callback states are keyed by class (TensorBoard on rank 0 only, or added on resume,
    shifts nothing); a checkpoint of the older layout (monitor and method as two positional
    states) still resumes."""
    pytest.importorskip("tensorboard")
    from dormant.experiments import ExperimentConfig, run_experiment
    from dormant.train.callbacks import (
        CheckpointCallback,
        JsonlLogger,
        SessionCallback,
        _keyed,
        _keyed_from_list,
        load_checkpoint,
    )
    quiet = dict(show_progress=False, log=lambda *a: None)
    cfg = ExperimentConfig(dataset="synthetic", model="mlp", model_args={"width": 16},
                           epochs=3, batch_size=64, lr=0.2, method="synaptic-stripping")
    straight = run_experiment(cfg, tmp_path / "a", **quiet)
    with interrupt_at_epoch("synaptic-stripping", 2), pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "b", **quiet)
    resumed = run_experiment(cfg, tmp_path / "b", tensorboard=tmp_path / "tb", **quiet)
    for key, value in straight["final"].items():
        if key != "train_time":
            assert resumed["final"][key] == pytest.approx(value, rel=1e-6), key
    # the old layout: [monitor {"initial"}, method state, history, checkpoint]
    state = load_checkpoint(tmp_path / "b" / cfg.label() / "checkpoint.pt")
    session = state["callbacks"]["SessionCallback#0"]
    old = [{"initial": session["initial"]}, session["method"],
           state["callbacks"]["JsonlLogger#0"], {}]
    cbs = [SessionCallback(Session(build("synaptic-stripping"))), JsonlLogger(tmp_path / "m"),
           CheckpointCallback(tmp_path / "c")]
    keyed = _keyed_from_list(cbs, old)
    assert set(keyed) == {k for k, _ in _keyed(cbs)}
    assert keyed["SessionCallback#0"]["method"] == session["method"]
    assert keyed["JsonlLogger#0"] == state["callbacks"]["JsonlLogger#0"]


def test_a_diverged_epoch_offers_the_method_no_older_pass_and_no_probe_means_no_pass():
    data = _data()
    model = Net()
    session = Session(build("synaptic-stripping", factor=0.5), every_steps=1)
    session.start(model, None, probe=data.val)
    count = Count(model)
    session.end_epoch()
    assert count.now == len(data.val)                   # one pass, the method read it
    count.now = 0
    session.end_epoch(diverged=True)
    assert session.last is None and count.now == len(data.val)   # the method's own pass
    session.close()
    quiet = Session(None)
    quiet.start(Net(), None, example=data.val.inputs[:2])
    assert "dead_fraction" not in quiet.end_epoch() and quiet.last is None


def test_a_session_refuses_bad_arguments_up_front_and_another_methods_state():
    with pytest.raises(ValueError, match="every_steps must be an integer >= 1, got 0"):
        Session(None, every_steps=0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        Session(None, eps=-1.0)
    with pytest.raises(KeyError, match="unknown criterion 'dead'; valid criteria: always_zero"):
        Session(None, criterion="dead")
    with pytest.raises(ValueError, match="every=5 and every_steps=7 disagree"):
        Session(None, every=5, every_steps=7)
    data = _data()
    first = Session(build("synaptic-stripping"))
    first.start(Net(), None, probe=data.val)
    first.end_epoch()
    state = first.state_dict()
    first.close()
    with pytest.raises(ValueError, match="holds the state of synaptic-stripping, this run's "
                                         "method is redo"):
        Session(build("redo")).load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"call session.start\(model"):
        Session(None).end_epoch()


def test_starting_twice_leaves_one_set_of_hooks_and_a_model_without_forward_says_what_to_do():
    data = _data()
    model = Net()
    session = Session(None, every_steps=1)
    session.start(model, None, probe=data.val)
    session.start(model, None, probe=data.val)
    session.close()
    assert all(not m._forward_hooks for m in model.modules())

    class NoForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

    with pytest.raises(TypeError, match=r"NoForward has no forward\(\), so a probe batch"):
        Session(None).start(NoForward(), None, probe=data.val)


def test_a_session_started_again_keeps_its_methods_masks_acting():
    data = _data()
    model = Net()
    session = Session(build("synaptic-stripping", factor=0.5), monitor=False)
    session.start(model, torch.optim.SGD(model.parameters(), lr=0.1), probe=data.val)
    session.end_epoch()
    masks = {n: m.clone() for n, m in session.method.masks.masks.items()}
    assert masks and any((~m).any() for m in masks.values())
    session.close()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session.start(model, opt, probe=data.val)            # a second fit, a new optimizer
    F.cross_entropy(model(data.train.inputs), data.train.targets).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.grad.add_(1.0)                              # every weight pushed
    opt.step()
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert (params[name][~m] == 0).all(), name       # pruned weights stay pruned
    session.close()
