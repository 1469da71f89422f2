"""Data that must never be lost, and bad input that must never reach the user as a traceback:
one test per item of the hardening issue."""
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import dormant
from dormant.cli import main
from dormant.data.base import CorruptDataError, DataNotFoundError
from dormant.experiments import ExperimentConfig, run_experiment
from dormant.jsonl import read_jsonl
from dormant.methods import build
from dormant.rundir import CorruptRunError, run_lock
from dormant.train.callbacks import CorruptCheckpointError, load_checkpoint

QUIET = dict(show_progress=False, log=lambda *a: None)
TINY = ExperimentConfig(dataset="synthetic", model="mlp", model_args={"width": 16}, epochs=3,
                        batch_size=64)


def _epochs(rd: Path) -> list[int]:
    return [r["epoch"] for r in read_jsonl(rd / "metrics.jsonl")]


# -- one writer per run directory --------------------------------------------------------------
@pytest.mark.slow
def test_two_dormant_runs_of_one_config_write_each_epoch_once(tmp_path):
    argv = [sys.executable, "-m", "dormant.cli", "run", "--dataset", "synthetic",
            "--model-args", "width=256,depth=4", "--epochs", "6", "--root", str(tmp_path),
            "--no-progress"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    (rd,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert _epochs(rd) == [1, 2, 3, 4, 5, 6]
    with run_lock(rd, log=pytest.fail):       # released: taken at once, nobody waited for
        pass
    results = [json.loads(o[o.index("{"):o.index("}") + 1]) for o, _ in outs]
    assert results[0] == results[1]


@pytest.mark.slow
def test_a_held_lock_is_waited_for_and_a_dead_owners_lock_is_taken_over(tmp_path):
    rd = tmp_path / TINY.label()
    rd.mkdir()
    said, released = [], []

    def hold():
        with run_lock(rd, log=said.append):
            time.sleep(1.0)
            released.append(time.perf_counter())
    t = threading.Thread(target=hold)
    t.start()
    time.sleep(0.2)
    run_experiment(TINY, tmp_path, show_progress=False, log=said.append)
    started_after = time.perf_counter()
    t.join()
    assert released and released[0] <= started_after
    assert any("[wait]" in s and "being trained by process" in s for s in said)
    # a lock file left by a process that is gone, or naming a live unrelated process (pid
    # reuse): the OS lock died with its holder, so the run starts at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for seed, pid in [(1, dead.pid), (2, alive.pid)]:
            cfg = TINY.override(seed=seed)
            rd = tmp_path / cfg.label()
            rd.mkdir()
            (rd / ".lock").write_text(f"{pid} {os.uname().nodename}\n")
            said.clear()
            assert run_experiment(cfg, tmp_path, show_progress=False,
                                  log=said.append)["final"]["epoch"] == 3
            assert not any("[wait]" in s for s in said)
    finally:
        alive.kill()
        alive.wait()


def _racer(rd, barrier, inside, broken, trials):
    import random
    for _ in range(trials):
        if barrier.wait() == 0:             # one racer leaves a stale or garbage lock file
            (rd / ".lock").write_text(random.choice(["", "garbage", "99999999 elsewhere\n",
                                                     f"{os.getpid()} {os.uname().nodename}"]))
        barrier.wait()
        with run_lock(rd, poll=0.0005, log=lambda *a: None):
            with inside.get_lock():
                inside.value += 1
                if inside.value > 1:
                    broken.value += 1
            time.sleep(0.0002)
            with inside.get_lock():
                inside.value -= 1


def test_three_processes_racing_for_a_stale_lock_never_hold_it_together(tmp_path):
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    barrier, inside, broken = ctx.Barrier(3), ctx.Value("i", 0), ctx.Value("i", 0)
    procs = [ctx.Process(target=_racer, args=(tmp_path, barrier, inside, broken, 300))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert broken.value == 0


# -- files written so that a kill loses nothing ---------------------------------------------
def _interrupted(tmp_path, cfg=TINY):
    """A run killed after epoch 2's checkpoint (its metrics line for epoch 3 half written)."""
    res = run_experiment(cfg, tmp_path, **QUIET)
    rd = Path(res["run_dir"])
    (rd / "result.json").unlink()
    return rd, res


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    rd, straight = _interrupted(tmp_path)
    rows = read_jsonl(rd / "metrics.jsonl")
    with (rd / "metrics.jsonl").open("w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 4, "train_lo')
    assert _epochs(rd) == [1, 2, 3]
    again = run_experiment(TINY, tmp_path, **QUIET)
    assert _epochs(rd) == [1, 2, 3] and again["final"] == straight["final"]


def test_a_damaged_metrics_line_before_the_end_is_refused(tmp_path):
    rd, _ = _interrupted(tmp_path)
    lines = (rd / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (rd / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON; .* delete the run"):
        read_jsonl(rd / "metrics.jsonl")


def test_a_diverged_run_stays_stopped_on_resume(tmp_path):
    cfg = TINY.override(lr=1e9, epochs=5)
    rd, first = _interrupted(tmp_path, cfg)
    assert first["final"]["diverged"] and _epochs(rd) == [1]
    assert load_checkpoint(rd / "checkpoint.pt")["stop"] is True
    run_experiment(cfg, tmp_path, **QUIET)
    assert _epochs(rd) == [1]


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "text"])
def test_a_damaged_or_foreign_checkpoint_is_refused_with_what_to_do(tmp_path, damage, capsys):
    rd, _ = _interrupted(tmp_path)
    path = rd / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(bytes(raw[:len(raw) // 3]))
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_text("not a checkpoint")
    with pytest.raises(CorruptCheckpointError, match=rf"{path}.*delete"):
        run_experiment(TINY, tmp_path, **QUIET)
    argv = ["run", "--dataset", "synthetic", "--model-args", "width=16", "--epochs", "3",
            "--batch-size", "64", "--root", str(tmp_path), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "Traceback" not in err
    path.unlink()                       # what the message says to do: the run trains again
    assert run_experiment(TINY, tmp_path, **QUIET)["final"]["epoch"] == 3


def test_a_damaged_config_json_is_rewritten_and_another_config_refused(tmp_path):
    rd, _ = _interrupted(tmp_path)
    (rd / "config.json").write_text("{ damaged")
    said = []
    run_experiment(TINY, tmp_path, show_progress=False, log=said.append)
    assert any("[repair]" in s for s in said)
    assert ExperimentConfig.from_dict(json.loads((rd / "config.json").read_text())) == TINY
    (rd / "result.json").unlink()
    (rd / "config.json").write_text(json.dumps(TINY.override(lr=0.3).to_dict()))
    with pytest.raises(CorruptRunError, match="holds another config"):
        run_experiment(TINY, tmp_path, **QUIET)


@pytest.mark.parametrize("text", ["{", "[1, 2]", '{"config": 3}', '{"config": {"lr": "x"}}'])
def test_a_damaged_result_json_is_refused_with_what_to_do(tmp_path, text):
    res = run_experiment(TINY, tmp_path, **QUIET)
    Path(res["run_dir"], "result.json").write_text(text)
    with pytest.raises(CorruptRunError, match="result.json is damaged .* delete it"):
        run_experiment(TINY, tmp_path, **QUIET)


# -- files that belong to another run ----------------------------------------------------------
def test_checkpoints_and_results_of_another_config_are_refused(tmp_path):
    small, wide = TINY.override(model_args={"width": 8}), TINY
    rd_small, _ = _interrupted(tmp_path, small)
    rd_wide = tmp_path / wide.label()
    rd_wide.mkdir()
    os.link(rd_small / "checkpoint.pt", rd_wide / "checkpoint.pt")     # copied in by hand
    with pytest.raises(CorruptCheckpointError, match=rf"belongs to run {small.label()}, not to "
                                                     rf"{wide.label()}.*move it back"):
        run_experiment(wide, tmp_path, **QUIET)
    assert not (rd_wide / "model.pt").exists()
    done = run_experiment(small, tmp_path, **QUIET)                 # a finished run, linked
    other = TINY.override(lr=0.3)
    (tmp_path / other.label()).symlink_to(done["run_dir"])
    with pytest.raises(CorruptRunError, match=rf"holds the result of run {small.label()}, not "
                                              rf"of {other.label()}"):
        run_experiment(other, tmp_path, **QUIET)


@pytest.mark.parametrize("damage", ["deleted", "truncated", "epoch missing"])
def test_a_lost_metrics_history_is_rebuilt_from_the_checkpoint(tmp_path, damage):
    rd, straight = _interrupted(tmp_path)
    path = rd / "metrics.jsonl"
    rows = read_jsonl(path)
    if damage == "deleted":
        path.unlink()
    elif damage == "truncated":
        path.write_text(json.dumps(rows[0]) + "\n")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["epoch"] != 2))
    again = run_experiment(TINY, tmp_path, **QUIET)
    assert read_jsonl(path) == rows and again["final"] == straight["final"]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the workers")
def test_killing_compare_ends_its_workers(tmp_path):
    code = textwrap.dedent(f"""
        from dormant.experiments import CompareSpec, ExperimentConfig, run_compare
        base = ExperimentConfig(dataset="synthetic", model_args={{"width": 512, "depth": 6}},
                                epochs=200)
        spec = CompareSpec(base, {{"a": {{}}, "b": {{"lr": 0.01}}}}, seeds=[0])
        run_compare(spec, {str(tmp_path)!r}, jobs=2, show_progress=False)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 120
        workers: list[int] = []
        while len(workers) < 2 and time.time() < deadline:
            time.sleep(0.5)
            workers = [c for c in _children(parent.pid)
                       if b"spawn" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) >= 2, "the workers did not start"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 15
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()
             and "Z" not in Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    assert alive == []


def test_gzip_input_is_decompressed_only_up_to_its_expected_size(tmp_path):
    from dormant.data.fashion_mnist import read_idx
    path = tmp_path / "bomb-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (10 ** 6).to_bytes(4, "big")
                                   + bytes(10 ** 6)))
    with pytest.raises(CorruptDataError, match="more than the expected 1000 bytes"):
        read_idx(path, size=1000)


def test_download_without_network_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    from dormant.data import fashion_mnist
    assert fashion_mnist.URL.startswith("https://")

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataNotFoundError, match="could not download .* Check the network"):
        fashion_mnist.download(tmp_path, quiet=True)
    assert main(["download", "fashion-mnist", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "dataset-fashion-mnist" in err and "Traceback" not in err


# -- bad input: refused before training, naming the option ---------------------------------
def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["run", "--dataset-args", "train_size=1000"],
     "dataset 'mnist1d' has no option(s) ['train_size']; valid: ['num_train'"),
    (["run", "--dataset-args", "num_train=abc"], "dataset 'mnist1d': num_train: expected an int"),
    (["run", "--dataset", "fashion-mnist", "--dataset-args", "root=/does/not/exist"],
     "root: /does/not/exist is not a folder"),
    (["run", "--model-args", "depth=abc"], "model 'mlp': depth: expected an int, got 'abc'"),
    (["run", "--method", "synaptic-stripping", "--method-args", "factor=abc"],
     "synaptic-stripping: factor: expected a float in (0, 1), got 'abc'"),
    (["run", "--lr", "inf"], "lr, momentum, weight_decay and eps must be finite"),
    (["run", "--weight-decay", "inf"], "must be finite"),
    (["run", "--val-size", "0"], "val_size must be >= 1"),
    (["run", "--activation", "shifted_relu", "--activation-args", "tau=nan"],
     "activation 'shifted_relu': tau: expected a float, got 'nan'"),
    (["run", "--method", "ap", "--method-args", "rounds=1,epochs_per_round=1", "--epochs", "2",
      "--activation", "tanh", "--dataset", "synthetic"],
     "ap: the model has no site with activations ['relu'] (it has ['tanh'])"),
    (["run", "--device", "mps"], "device 'mps': this PyTorch has no usable mps"),
    (["run", "--device", "cuda:0"], "device 'cuda:0': CUDA is not available"),
    (["run", "--root", "/etc/passwd"], "root: /etc/passwd is a file, not a folder"),
    (["run", "--tensorboard", "/proc/dormant-tb"], "tensorboard: cannot write to /proc/dormant-tb"),
    (["run", "--seed", str(10 ** 20)], "seed must be an integer in [0, 2**63), got 1000000"),
    (["run", "--dataset", "synthetic", "--model-args", "width=100000000000"],
     "does not fit in memory"),
    (["run", "--dataset-args", "num_train=-1"], "dataset 'mnist1d': num_train must be >= 1, got -1"),
    (["run", "--dataset", "synthetic", "--dataset-args", "dim=0"], "dim must be >= 1, got 0"),
    (["run", "--dataset", "synthetic", "--method", "structured", "--method-args",
      "widths={'act1':0}"], "widths: every final width must be an integer >= 1"),
    (["compare", "--preset", "dying-relu", "--seeds", "a,b"],
     "--seeds: expected comma-separated integers, e.g. 0,1,2; got 'a,b'"),
    (["doctor", "runs/x", "--tau", "0.1"], "--tau applies to --criterion dormant only"),
    (["doctor", "runs/x", "--criterion", "dead"], "unknown criterion 'dead'; valid criteria"),
])
def test_bad_input_is_refused_without_a_traceback(argv, message, capsys, tmp_path):
    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if argv[0] in ("run", "compare") and "--root" not in argv:
        argv = argv + ["--root", str(tmp_path)]
    if argv[0] == "run" and "--epochs" not in argv:
        argv = argv + ["--epochs", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(read_jsonl(p) for p in tmp_path.glob("*/metrics.jsonl")), "nothing trains"


@pytest.mark.parametrize("text, message", [
    ("base: {epochs: 2\nvariants: [a, b]\n", "not valid YAML at line"),
    ("variants: [relu, tanh]\n", "variants: expected a mapping of variant name"),
    ("variants: {a: {}}\nseeds: [0, 0]\n", "seeds: each seed once, got [0, 0]"),
    ("base: {epochs: true}\nvariants: {a: {}}\n", "epochs: expected int, got True"),
    ("base: {activation: shifted_relu, activation_args: {tau: .nan}}\nvariants: {a: {}}\n",
     "tau: expected a float, got nan"),
    ("title: [1, 2]\nvariants: {a: {}}\n", "title: expected a string, got [1, 2]"),
    ("variants: {1: {}, b: {}}\n", "variants: every variant needs a name (a non-empty string"),
    ("variants: {null: {}}\n", "variants: every variant needs a name"),
    ("columns: test_acc\nvariants: {a: {}}\n", "columns: expected a list of metric keys"),
    ("base: {dataset: synthetic, dataset_args: {num_test: 0}}\nvariants: {a: {}}\n",
     "dataset 'synthetic': num_test must be >= 1, got 0"),
])
def test_bad_comparison_files_are_refused(text, message, tmp_path, capsys):
    assert main(["compare", "--config", _yaml(tmp_path, text), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_report_reads_a_comparison_from_another_directory(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    spec = _yaml(tmp_path, """
        base: {dataset: synthetic, epochs: 2, model_args: {width: 8}}
        variants: {a: {}}
        seeds: [0]
    """)
    assert main(["compare", "--config", spec, "--out", "out", "--no-progress"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["report", str(tmp_path / "out"), "--metrics", "test_acc"]) == 0
    assert (tmp_path / "out" / "curves.png").exists()


@pytest.mark.parametrize("criterion, params, words", [
    ("never_active", {}, "output <= 0 on every one of 64 probe samples, eval mode"),
    ("always_zero", {}, "output exactly 0 on every one of 64 probe samples, eval mode"),
    ("dormant", {"tau": 0.1},
     "E|a| / layer mean of E|a| <= 0.1 over 64 probe samples, eval mode"),
])
def test_the_diagnosis_header_states_the_criterion_used(criterion, params, words):
    from dormant import diagnose
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    report = diagnose(model, torch.randn(64, 4), criterion=criterion, **params)
    assert str(report).splitlines()[0] == f"dead = {criterion}: {words}" + (
        " (exactly 0 for activations that can be negative)" if criterion == "never_active"
        else " (ReDo's score)" if criterion == "dormant" else "")


# -- files: refused naming the file, nothing half written ---------------------------------------
def test_an_existing_file_as_compare_out_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    spec = _yaml(tmp_path, "base: {dataset: synthetic, epochs: 1}\nvariants: {a: {}}\nseeds: [0]\n")
    argv = ["compare", "--config", spec, "--root", str(tmp_path / "runs"), "--out",
            str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    assert "out: " in capsys.readouterr().err
    assert not list((tmp_path / "runs").glob("*/metrics.jsonl")), "nothing trains"
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.parametrize("damage", ["empty", "list", "no model", "wrong model"])
def test_empty_or_wrong_typed_checkpoints_are_refused(tmp_path, damage):
    from dormant.train.callbacks import save_checkpoint
    rd, _ = _interrupted(tmp_path)
    path = rd / "checkpoint.pt"
    state = load_checkpoint(path)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "list":
        torch.save([1, 2, 3], path)
    elif damage == "no model":
        torch.save({"epoch": 1, "step": 3}, path)
    else:
        save_checkpoint({**state, "model": {"fc.weight": torch.zeros(2)}}, path)
    with pytest.raises(CorruptCheckpointError, match=r"(?s)checkpoint.pt .*(delete|cannot)"):
        run_experiment(TINY, tmp_path, **QUIET)


def _comparison(tmp_path):
    from dormant.experiments.compare import CompareSpec, run_compare
    spec = CompareSpec.from_dict({"base": {"dataset": "synthetic", "epochs": 1},
                                  "variants": {"a|b <i>": {}, r"x$\q^$": {"lr": 0.1}},
                                  "seeds": [0], "title": "t"})
    run_compare(spec, tmp_path / "runs", tmp_path / "cmp", show_progress=False,
                log=lambda *a: None)
    return tmp_path / "cmp"


def test_variant_names_are_escaped_in_compare_md_and_plotted_as_text(tmp_path):
    pytest.importorskip("matplotlib")
    from dormant.report import load_comparison, plot_curves
    from dormant.report.html import write_report
    out = _comparison(tmp_path)
    md = (out / "compare.md").read_text()
    assert "| a\\|b &lt;i&gt; |" in md and "<i>" not in md
    cmp = load_comparison(out)
    assert cmp.variants == ["a|b <i>", r"x$\q^$"]
    write_report(out)                         # "$\q^$" is not read as (broken) mathtext
    plot_curves(cmp, ["test_acc"], out / "curves.png")
    assert (out / "report.html").exists() and (out / "curves.png").exists()


@pytest.mark.parametrize("damage, message", [
    ("json:{", "compare.json is damaged (JSONDecodeError"),
    ("json:[1, 2]", "compare.json is damaged or not a comparison (expected an object, got list)"),
    ('json:{"spec": {}, "rows": [], "runs": 3}', "'runs' should be a list"),
    ('json:{"spec": {}, "rows": [], "runs": [{"variant": 1}]}', "lacks its variant or run_dir"),
    ("gz:flip", "runs.jsonl.gz is damaged"),
    ("gz:truncate", "runs.jsonl.gz is damaged"),
    ("gz:not-runs", "runs.jsonl.gz is damaged (an entry lacks its run_dir or metrics)"),
])
@pytest.mark.slow
def test_damaged_comparison_files_are_refused_naming_the_file(tmp_path, damage, message, capsys):
    out = _comparison(tmp_path)
    kind, _, how = damage.partition(":")
    if kind == "json":
        (out / "compare.json").write_text(how)
    else:
        import shutil
        shutil.rmtree(tmp_path / "runs")             # read from the archive
        path = out / "runs.jsonl.gz"
        raw = bytearray(path.read_bytes())
        if how == "flip":
            raw[len(raw) // 2] ^= 0xFF
        elif how == "truncate":
            raw = raw[:len(raw) // 2]
        else:
            raw = bytearray(gzip.compress(b'{"a": 1}\n'))
        path.write_bytes(bytes(raw))
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_full_disk_leaves_no_half_checkpoint_and_says_what_to_do(tmp_path, monkeypatch):
    import dormant.train.callbacks as cb
    real = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith(".tmp"):
            Path(f).write_bytes(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter "
                               "failed writing file data/0: file write failed")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(cb.torch, "save", full)
    with pytest.raises(OSError, match=r"checkpoint.pt: could not write the checkpoint .* free "
                                      r"some space and run the same command again"):
        run_experiment(TINY, tmp_path, **QUIET)
    assert not list(tmp_path.glob("*/*.tmp"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the workers")
def test_a_killed_compare_worker_is_a_clear_error_and_the_rerun_resumes(tmp_path):
    spec = _yaml(tmp_path, "base: {dataset: synthetic, epochs: 40, model_args: {width: 512}}\n"
                           "variants: {a: {}, b: {lr: 0.1}}\nseeds: [0]\n")
    argv = [sys.executable, "-m", "dormant.cli", "compare", "--config", spec, "--root",
            str(tmp_path / "runs"), "--jobs", "2", "--no-progress"]
    parent = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, workers = time.time() + 120, []
    while len(workers) < 2 and time.time() < deadline:
        time.sleep(0.3)
        workers = [c for c in _children(parent.pid)
                   if b"spawn" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(workers) >= 2, "the workers did not start"
    os.kill(workers[0], signal.SIGKILL)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 2, err[-2000:]
    assert "a worker process of the comparison died" in err and "Traceback" not in err



@pytest.mark.parametrize("call, message", [
    (lambda m, x: dormant.ActivityMonitor(m, example_input=x, eps=float("nan")),
     "eps must be a finite number >= 0, got nan"),
    (lambda m, x: dormant.diagnose(m, x, eps=float("nan")), "eps must be a finite number"),
    (lambda m, x: build("demp", target="all").prepare(m, None, probe=x, total_steps=0),
     "demp: prepare(): total_steps must be an integer >= 1"),
    (lambda m, x: build("redo").prepare(m, None, probe=x, epochs=0),
     "redo: prepare(): epochs must be an integer >= 1"),
    (lambda m, x: build("structured", widths={"1": 0}), "widths: every final width must be"),
])
def test_bad_values_given_to_the_api_are_refused_naming_the_option(call, message):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError) as err:
        call(model, torch.rand(16, 4))
    assert message in str(err.value)
