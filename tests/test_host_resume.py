"""Resuming through the integrations: a Hugging Face Trainer run resumed with
``train(resume_from_checkpoint=...)`` and a Lightning run resumed with
``fit(ckpt_path=...)`` end with the very weights and dormant metrics of the straight run, for
every method a host can drive (DemP and `structured` remove units and are refused there)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dormant.methods import build

METHOD_ARGS = {"synaptic-stripping": {"factor": 0.2}, "redo": {"tau": 0.5},
               "imp": {"rounds": 2, "epochs_per_round": 1},
               "ap": {"rounds": 2, "epochs_per_round": 1, "neuron_fraction": 0.5},
               "nnrelief": {"rounds": 2, "epochs_per_round": 1, "probe_samples": 32,
                            "keep_best": False},
               "continual-backprop": {"replacement_rate": 0.2, "maturity_threshold": 2},
               "shrink-perturb": {"shrink": 0.8, "perturb": 0.05}, "l2-init": {"lam": 0.01}}
EPOCHS, N, BATCH = 3, 64, 16


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 10, generator=g)
    return x, (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2 = nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)
        with torch.no_grad():
            self.fc1.bias[:6] = -0.5          # some units near death, for every method to act

    def forward(self, x, labels=None):
        logits = self.fc2(self.act(self.fc1(x)))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hf_run(name, out, resume=None):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from dormant.integrations.hf import DormantTrainerCallback
    model = Net()
    cb = DormantTrainerCallback(method=build(name, **METHOD_ARGS[name]), every_steps=1)
    args = tf.TrainingArguments(output_dir=str(out), num_train_epochs=EPOCHS,
                                per_device_train_batch_size=BATCH, learning_rate=0.05,
                                report_to=[], use_cpu=True, save_strategy="epoch",
                                logging_strategy="epoch", seed=0, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = tf.Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume)
    return _weights(model), cb.history


def _lightning_run(name, out, resume=None):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dormant.integrations.lightning import DormantCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x):
            return self.net(x, torch.zeros(len(x), dtype=torch.long))["logits"]

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    L.seed_everything(0, verbose=False)
    x, y = _data()
    module = Module()
    cb = DormantCallback(method=build(name, **METHOD_ARGS[name]), every_steps=1)
    ckpt = ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False,
                            callbacks=[cb, ckpt], enable_progress_bar=False,
                            enable_model_summary=False, deterministic=True)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                             batch_size=BATCH)
        trainer.fit(module, loader, ckpt_path=resume)
    return _weights(module), cb.history


def _same(a, b):
    wa, ha = a
    wb, hb = b
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert ha == hb


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHOD_ARGS))
def test_hf_trainer_resume_equals_the_straight_run(name, tmp_path):
    straight = _hf_run(name, tmp_path)
    steps = N // BATCH
    resumed = _hf_run(name, tmp_path, resume=str(tmp_path / f"checkpoint-{2 * steps}"))
    _same(straight, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHOD_ARGS))
def test_lightning_resume_equals_the_straight_run(name, tmp_path):
    straight = _lightning_run(name, tmp_path)
    (second,) = tmp_path.glob("epoch=1-*.ckpt")
    resumed = _lightning_run(name, tmp_path / "again", resume=str(second))
    _same(straight, resumed)


def test_hf_resume_without_the_dormant_state_is_refused(tmp_path):
    _hf_run("redo", tmp_path)
    folder = tmp_path / f"checkpoint-{2 * (N // BATCH)}"
    (folder / "dormant.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"dormant.pt does not exist, so the method's "
                                                r"state .* would be lost: pass .*resume_from="):
        _hf_run("redo", tmp_path, resume=str(folder))


def test_a_method_that_needs_validation_scores_is_refused_by_a_host_up_front():
    pytest.importorskip("transformers")
    from dormant.integrations.hf import DormantTrainerCallback
    with pytest.raises(ValueError, match=r"nnrelief: keep_best restores .* build it with "
                                         r"keep_best=False"):
        DormantTrainerCallback(method="nnrelief")

