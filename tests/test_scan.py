"""`dormant scan`: tiny OPT, Llama (gated ReLU) and Switch models built from config, saved with
save_pretrained beside a tokenizer built offline, scanned from disk: planted dead units and a
never-routed expert found exactly and no live unit called dead; the bound is 1 - 0.05**(1/N)
for N sequences; the same verdicts from a token-id file and from the text file; the removal
plan is what `compact` removes; bad inputs are refused clearly; the HTML renders."""
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import dormant
from dormant.cli import main
from dormant.scanning import load_model, scan

tf = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.usefixtures("no_fx_warning")
V, WORDS = 100, 2000


def _tokenizer():
    vocab = {f"w{i}": i for i in range(V)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def _opt():
    cfg = tf.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=80)
    model = tf.OPTForCausalLM(cfg)
    with torch.no_grad():
        model.model.decoder.layers[1].fc1.bias[[4, 6, 50]] = -1e3
    return model, {"model.decoder.layers.1.activation_fn": [4, 6, 50]}


def _llama():
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, hidden_act="relu",
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[[2, 11]] = 0
    return model, {"model.layers.0.mlp.act_fn": [2, 11]}


def _switch():
    cfg = tf.SwitchTransformersConfig(vocab_size=V, d_model=32, d_ff=48, d_kv=8, num_heads=2,
                                      num_layers=1, num_decoder_layers=1, num_experts=4,
                                      encoder_sparse_step=1, decoder_sparse_step=1,
                                      decoder_start_token_id=0, pad_token_id=0, router_bias=True)
    model = tf.SwitchTransformersForConditionalGeneration(cfg)
    mix = "encoder.block.0.layer.1.mlp"
    with torch.no_grad():
        model.get_submodule(f"{mix}.router.classifier").weight[2] = 0
        model.get_submodule(f"{mix}.router.classifier").bias[2] = -1e4
    return model, {}


def _saved(tmp_path, make):
    torch.manual_seed(0)
    model, planted = make()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (WORDS,), generator=g)
    (tmp_path / "text.txt").write_text(" ".join(f"w{i}" for i in ids.tolist()))
    np.save(tmp_path / "ids.npy", ids.numpy())
    return folder, planted, ids


@pytest.mark.parametrize("make", [_opt, _llama])
def test_scan_finds_exactly_the_planted_dead_units_from_disk(make, tmp_path):
    folder, planted, ids = _saved(tmp_path, make)
    by_ids = scan(folder, tmp_path / "ids.npy", seq_len=32)
    by_text = dormant.scan(folder, tmp_path / "text.txt", seq_len=32)
    assert by_ids.sites == by_text.sites                     # the same verdicts
    dead = {s.site: s.dead for s in by_ids.sites if s.dead}
    assert dead == planted
    n = WORDS // 32
    for s in by_ids.sites:
        assert sum(s.histogram) == s.units and s.histogram[0] == len(s.dead)
        assert s.sequences == n and s.tokens == n * 32      # tokens: per unit
        assert s.bound == pytest.approx(1 - 0.05 ** (1 / n))
    model, _ = load_model(folder)
    with torch.no_grad():                                    # no live unit called dead
        truth = dormant.probe(model, {"input_ids": ids[:n * 32].view(n, 32)}).dead_units()
    assert {k: v.nonzero().flatten().tolist() for k, v in truth.items() if v.any()} == planted


def test_a_never_routed_expert_is_reported_not_dead(tmp_path):
    folder, _, _ = _saved(tmp_path, _switch)
    report = scan(folder, tmp_path / "ids.npy", seq_len=32)
    unrouted = [e["expert"] for e in report.experts if e["tokens"] == 0]
    assert unrouted == ["encoder.block.0.layer.1.mlp.experts.expert_2"]
    assert not any(s.dead for s in report.sites if s.expert in unrouted)
    assert [e["expert"] for e in report.experts if e["dead"]] == unrouted
    assert "unrouted (units unobserved, not dead): encoder.block.0.layer.1.mlp.experts.expert_2" \
        in str(report)


def test_scan_then_compact_removes_the_plan(tmp_path, capsys):
    folder, planted, ids = _saved(tmp_path, _opt)
    assert main(["scan", str(folder), "--data", str(tmp_path / "ids.npy"), "--seq-len", "32",
                 "--out", str(tmp_path / "scan")]) == 0
    out = capsys.readouterr().out
    assert "never active: 3 units" in out and "removal plan" in out
    saved = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert saved["plan"]["sites"] == planted
    model = tf.OPTForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    probe = {"input_ids": ids[:256].view(8, 32)}
    report = dormant.compact(model, probe, plan=tmp_path / "scan" / "scan.json")
    assert {s.site: s.removed for s in report.sites if s.removed} == {
        n: len(u) for n, u in planted.items()}
    assert report.max_diff_probe <= 1e-4


@pytest.mark.parametrize("setup, message", [
    (lambda p, f: ["scan", str(p), "--data", str(f / "ids.npy")], "is not a model directory"),
    (lambda p, f: ["scan", str(f / "model"), "--data", str(f / "empty.npy")],
     "fewer than one sequence"),
    (lambda p, f: ["scan", str(f / "model"), "--data", str(f / "big.npy")],
     "token ids must be in [0, 100)"),
    (lambda p, f: ["scan", str(f / "bare"), "--data", str(f / "text.txt")],
     "has no tokenizer to read"),
    (lambda p, f: ["scan", str(f / "model"), "--data", str(f / "ids.npy"), "--seq-len", "0"],
     "--seq-len must be >= 1"),
])
def test_bad_scan_inputs_are_refused_clearly(setup, message, tmp_path, capsys):
    folder, _, _ = _saved(tmp_path, _opt)
    np.save(tmp_path / "empty.npy", np.zeros(0, dtype=np.int64))
    np.save(tmp_path / "big.npy", np.full(256, 500, dtype=np.int64))
    shutil.copytree(folder, tmp_path / "bare", ignore=shutil.ignore_patterns("tok*", "special*"))
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    assert main(setup(notmodel, tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_scan_page_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    folder, _, _ = _saved(tmp_path, _switch)
    scan(folder, tmp_path / "ids.npy", seq_len=32).save(tmp_path / "scan")
    page = tmp_path / "scan" / "scan.html"
    assert not re.search(r"https?://", page.read_text())
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                           "--no-first-run", "--enable-logging=stderr", "--v=1", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "<h2>Experts</h2>" in proc.stdout and proc.stdout.count("class=\"bar\"") >= 4
    assert "Units by firing rate" in proc.stdout
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "error" in line.lower()], console
