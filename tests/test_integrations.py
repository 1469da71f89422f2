"""Where users train: the Hugging Face Trainer (a tiny BERT built from config, CPU) and
TensorBoard. The logged dead fractions equal a brute-force count; a method acts on the
weights through the callback."""
import warnings

import pytest
import torch

import dormant

tf = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 50, (n, 8), generator=g)
        self.labels = (self.ids == 7).any(1).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": self.labels[i]}


def _bert():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, hidden_act="relu", num_labels=2)
    return tf.BertForSequenceClassification(cfg)


def _brute_force_dead(model, module, batches):
    out = []
    h = model.get_submodule(module).register_forward_hook(lambda m, i, o: out.append(o))
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    return (~(torch.cat([o.flatten(0, -2) for o in out]) > 0).any(0)).float().mean().item()


def test_hf_trainer_callback_logs_dead_fractions_and_applies_redo(tmp_path):
    from dormant.integrations.hf import DormantTrainerCallback
    model = _bert()
    act = "bert.encoder.layer.0.intermediate.intermediate_act_fn"
    dense = model.get_submodule("bert.encoder.layer.0.intermediate.dense")
    out_dense = model.get_submodule("bert.encoder.layer.0.output.dense")
    with torch.no_grad():
        dense.bias[[1, 4, 9]] = -1e4                      # three units dead from the start
    callback = DormantTrainerCallback(method=dormant.methods.build("redo", tau=0.0), every_steps=1)
    args = tf.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2,
                                per_device_train_batch_size=16, per_device_eval_batch_size=32,
                                learning_rate=0.0, report_to=[], use_cpu=True, save_strategy="no",
                                logging_strategy="epoch", seed=0, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dormant: torch.fx could not trace")
        trainer = tf.Trainer(model=model, args=args, train_dataset=Tokens(64, 0),
                             eval_dataset=Tokens(64, 1), callbacks=[callback])
        trainer.train()
    rows = [r for r in trainer.state.log_history if "dormant/dead_fraction" in r]
    assert len(rows) == 2 and rows[0]["dormant/redo/recycled"] == 3
    assert rows[1]["dormant/redo/recycled"] == 0                 # revived: nothing dormant
    batches = list(trainer.get_train_dataloader())             # the default probe
    assert rows[-1][f"dormant/dead/{act}"] == pytest.approx(_brute_force_dead(model, act, batches))
    assert (out_dense.weight[:, [1, 4, 9]] == 0).all()           # ReDo's outgoing columns
    assert not (dense.bias[[1, 4, 9]] == -1e4).any()             # incoming re-drawn
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0   # nothing left behind


def test_hf_callback_refuses_physical_removal_up_front():
    from dormant.integrations.hf import DormantTrainerCallback
    with pytest.raises(ValueError, match="demp removes units physically; the Hugging Face Trainer"):
        DormantTrainerCallback(method="demp")


def test_tensorboard_logs_the_runs_metrics_and_unit_activity(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dormant.cli import main
    from dormant.jsonl import read_jsonl
    argv = ["run", "--dataset", "synthetic", "--model-args", "width=16", "--epochs", "2",
            "--root", str(tmp_path / "runs"), "--tensorboard", str(tmp_path / "tb"),
            "--no-progress"]
    assert main(argv) == 0
    (rd,) = (tmp_path / "runs").iterdir()
    (logdir,) = (tmp_path / "tb").iterdir()
    assert logdir.name == rd.name
    acc = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    rows = read_jsonl(rd / "metrics.jsonl")
    for key in ("dead_fraction", "dynamic_dnr", "dead/act1", "sparsity/act1", "test_acc"):
        logged = [(e.step, e.value) for e in acc.Scalars(key)]
        assert logged == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    hist = acc.Histograms("activity/act1")
    assert [h.step for h in hist] == [1, 2] and hist[-1].histogram_value.num == 16


def _lightning_script(out, devices: int, strategy: str) -> list[dict]:
    import json
    import sys
    from pathlib import Path

    from conftest import run_distributed
    script = Path(__file__).parent / "scripts" / "lightning_ddp.py"
    proc = run_distributed([sys.executable, str(script), str(out), str(devices), strategy],
                           capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(devices)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lightning_callback_under_ddp_and_fsdp_on_cpu(strategy, tmp_path):
    """Two gloo processes, DDP or FSDP2 (ModelParallelStrategy, fully_shard in
    configure_model): each rank logs the same dead fraction, equal to a brute-force count on
    the whole probe set, and takes the same stripping decisions (bitwise equal weights; under
    FSDP2 equal to one process's); stripping cut the dead units' rows only."""
    pytest.importorskip("lightning")
    ranks = _lightning_script(tmp_path / "rank", 2, strategy)
    assert ranks[0]["hash"] == ranks[1]["hash"]
    if strategy == "fsdp":
        (one,) = _lightning_script(tmp_path / "one", 1, "ddp")
        assert ranks[0]["hash"] == one["hash"]
    for r in ranks:
        assert [h["dormant/dead/act"] for h in r["history"]] == [r["brute"]] * 2
        assert r["brute"] == pytest.approx(6 / 32)
        assert r["history"][0]["dormant/ss/dead_units"] == 6
        assert all(z > 0 for z in r["zeros"][:6]) and not any(r["zeros"][6:])
        assert r["logged"]["dormant/dead/act"] == pytest.approx(6 / 32)


@pytest.mark.slow
def test_lightning_fsdp_run_resumes_from_its_checkpoint_to_the_straight_one(tmp_path):
    """FSDP2 under Lightning (2 gloo ranks, Adam, L2 Init whose state holds sharded initial
    weights): 3 epochs straight equal `fit(ckpt_path=<the straight run's epoch-2 checkpoint>)`
    to 3 -- bitwise weights and the same dormant metrics."""
    pytest.importorskip("lightning")
    import json
    import sys
    from pathlib import Path

    from conftest import run_distributed
    script = Path(__file__).parent / "scripts" / "lightning_fsdp_resume.py"

    def fit(ckpt_dir, epochs, *resume):
        proc = run_distributed([sys.executable, str(script), str(ckpt_dir), str(epochs),
                                "l2-init", *resume], capture_output=True, text=True,
                               timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])

    straight = fit(tmp_path / "a", 3)
    # after epoch 2 (of 0, 1, 2); a run repeated after a teardown abort adds a "-v1" twin
    second = sorted((tmp_path / "a").glob("epoch=1-*.ckpt"))[0]
    resumed = fit(tmp_path / "b", 3, str(second))
    assert resumed["hash"] == straight["hash"]
    assert resumed["last"] == straight["last"]
    assert straight["last"]["dormant/l2init/distance"] > 0
