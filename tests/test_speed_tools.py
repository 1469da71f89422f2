"""Dead and sparse units become speed. `sparse_inference` computes each exactly-sparse
site's consumer over its active units (and a gated unit's up projection where its gate is
open): equal to dense to float rounding for 1, 4 and 64 tokens, fp32 and bf16, greedy
generations identical, smooth activations refused, the model restored by `remove()`.
`compact` removes exactly the units never active on the probe (planted), outputs unchanged;
a compacted Hugging Face model saves and loads back. No timing here (benchmarks/)."""

import pytest
import torch
import torch.nn as nn

import dormant
from dormant.activations import ClippedReLU, ClippedSoftThreshold, ShiftedReLU, SoftThreshold

pytestmark = pytest.mark.usefixtures("no_fx_warning")
D, F = 16, 64
ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "shifted_relu": lambda: ShiftedReLU(0.5),
        "soft_threshold": lambda: SoftThreshold(0.5), "crelu": lambda: ClippedReLU(0.5, 1.0),
        "cst": lambda: ClippedSoftThreshold(0.5, 1.0)}


class Gated(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, F, bias=False), nn.Linear(D, F, bias=False)
        self.down_proj, self.act_fn = nn.Linear(F, D, bias=False), act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _close(a, b, tol=1e-5):
    assert (a - b).abs().max() <= tol * max(1.0, float(b.abs().max())), (a - b).abs().max()


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kind", sorted(ACTS))
def test_sparse_inference_equals_dense_for_1_4_and_64_tokens(kind, gated):
    torch.manual_seed(0)
    model = (Gated(ACTS[kind]()) if gated else
             nn.Sequential(nn.Linear(D, F), ACTS[kind](), nn.Linear(F, D)))
    model.eval()
    xs = [torch.randn(n, 3, D) for n in (1, 4, 64)]          # 3, 12 and 192 tokens too
    with torch.no_grad():
        dense = [model(x) for x in xs]
        with dormant.sparse_inference(model, xs[0], max_active=1.0) as handle:
            sparse = [model(x) for x in xs]
            one = model(torch.randn(1, D))                 # a single token
        (calls,) = handle.calls().values()
    for s, d in zip(sparse, dense):
        _close(s, d)
    assert calls["sparse"] == 4 and calls["dense"] == 0 and one.shape == (1, D)
    for s, d in zip([model(x) for x in xs], dense):          # removed: dense again
        assert torch.equal(s, d)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kind", ["relu", "crelu"])
def test_one_token_on_wide_layers_takes_the_split_gather_and_in_place_rows(kind, gated,
                                                                          monkeypatch):
    """Decoding (one token, wide layers): the consumer's rows are gathered in several bags
    (one bag per thread pair) and a gated unit's up projection reads its open rows in place
    (sampled_addmm); both equal dense."""
    import types

    import dormant.sparse as sparse
    torch.manual_seed(0)
    d, f = 32, 1024
    act = ACTS[kind]()
    if gated:
        model = Gated(act)
        model.gate_proj, model.up_proj = nn.Linear(d, f), nn.Linear(d, f)
        model.down_proj = nn.Linear(f, d)
        if kind == "relu":                       # most gates shut: the up skip applies
            with torch.no_grad():
                model.gate_proj.bias -= 0.5
    else:
        model = nn.Sequential(nn.Linear(d, f), act, nn.Linear(f, d))
    model.eval()
    seen = {"offsets": [], "sampled": 0}
    bag, sampled = torch.nn.functional.embedding_bag, torch.sparse.sampled_addmm

    def spy_bag(idx, rows, offsets=None, **kw):
        seen["offsets"].append(None if offsets is None else offsets.numel())
        return bag(idx, rows, offsets, **kw)

    def spy_sampled(*a, **kw):
        seen["sampled"] += 1
        return sampled(*a, **kw)
    monkeypatch.setattr(sparse, "F", types.SimpleNamespace(embedding_bag=spy_bag,
                                                           linear=torch.nn.functional.linear))
    monkeypatch.setattr(torch.sparse, "sampled_addmm", spy_sampled)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        xs = [torch.randn(1, 1, d) for _ in range(5)]
        with torch.no_grad():
            want = [model(x) for x in xs]
            with dormant.sparse_inference(model, xs[0], max_active=1.0):
                got = [model(x) for x in xs]
    finally:
        torch.set_num_threads(threads)
    for g, w in zip(got, want):
        _close(g, w)
    assert seen["offsets"][-5:] == [4] * 5            # 2 threads: 4 bags, summed
    assert seen["sampled"] == (5 if gated else 0)


@pytest.mark.parametrize("gated", [False, True])
def test_several_tokens_read_only_their_own_active_units(gated, monkeypatch):
    """Tokens with disjoint active units: one bag per token over its own units (the pairs,
    not every token times the union), and a gated up projection's dot products only at the
    open (unit, token) pairs; equal to dense."""
    import types

    import dormant.sparse as sparse
    torch.manual_seed(0)
    model = (Gated(nn.ReLU()) if gated else
             nn.Sequential(nn.Linear(D, F, bias=False), nn.ReLU(), nn.Linear(F, D))).eval()
    first = model.gate_proj if gated else model[0]
    with torch.no_grad():                  # token t (one-hot input t) opens units 8t..8t+7
        first.weight.fill_(-1.0)
        for t in range(4):
            first.weight[8 * t:8 * t + 8, t] = 1.0
    x = torch.eye(D)[:4] * 2.0                                # 4 tokens, 8 units each
    seen = {"bags": [], "pattern": []}
    bag, sampled = torch.nn.functional.embedding_bag, torch.sparse.sampled_addmm

    def spy_bag(idx, rows, offsets=None, **kw):
        seen["bags"].append((idx.numel(), None if offsets is None else offsets.tolist()))
        return bag(idx, rows, offsets, **kw)

    def spy_sampled(pattern, *a, **kw):
        seen["pattern"].append(pattern.to_sparse_coo().indices().t().tolist())
        return sampled(pattern, *a, **kw)
    monkeypatch.setattr(sparse, "F", types.SimpleNamespace(embedding_bag=spy_bag,
                                                           linear=torch.nn.functional.linear))
    monkeypatch.setattr(torch.sparse, "sampled_addmm", spy_sampled)
    with torch.no_grad():
        want = model(x)
        with dormant.sparse_inference(model, x, max_active=1.0):
            got = model(x)
    _close(got, want)
    assert seen["bags"] == [(32, [0, 8, 16, 24])]             # 4 x 8 pairs, not 4 x 32
    if gated:
        assert seen["pattern"] == [[[8 * t + j, t] for t in range(4) for j in range(8)]]


def test_the_crossover_grows_with_the_tokens_as_the_dense_product_costs_more():
    torch.manual_seed(0)             # wide enough that 2% of the rows beat the whole product
    model = nn.Sequential(nn.Linear(D, 4096), nn.ReLU(), nn.Linear(4096, 1024)).eval()
    handle = dormant.sparse_inference(model, torch.randn(2, D))
    try:
        site = handle.sites["1"]
        assert site.max_pairs > 0
        assert [n for n, _ in site.scale] == [1, 4, 16]
        assert all(f >= 1.0 for _, f in site.scale)
        site.max_pairs, site.scale = 10, ((1, 1.0), (4, 2.0), (16, 3.0))
        assert [site.limit(n) for n in (0, 1, 3, 4, 15, 16, 64)] == [10, 10, 10, 20, 20, 30, 30]
    finally:
        handle.remove()


@pytest.mark.parametrize("gated", [False, True])
def test_no_tokens_gradients_and_autocast_behave_as_dense(gated):
    """An empty batch (an expert no token was routed to) passes through; with autograd every
    parameter gets the dense gradient (the consumer's own weight is read, not a copy); under
    CPU bf16 autocast the output has the dense dtype and values."""
    torch.manual_seed(0)
    model = (Gated(nn.ReLU()) if gated else
             nn.Sequential(nn.Linear(D, F), nn.ReLU(), nn.Linear(F, D)))
    x = torch.randn(5, D)
    model(x).square().sum().backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dense_bf16 = model(x)
    with dormant.sparse_inference(model, x, max_active=1.0):
        assert model(torch.randn(0, D)).shape == (0, D)
        model(x).square().sum().backward()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got_bf16 = model(x)
    for k, p in model.named_parameters():
        _close(p.grad, want[k])
    assert got_bf16.dtype == dense_bf16.dtype == torch.bfloat16
    _close(got_bf16.float(), dense_bf16.float(), 2e-2)


def test_the_up_projection_is_computed_only_where_the_gate_is_open():
    torch.manual_seed(0)
    model = Gated(nn.ReLU()).eval()
    with torch.no_grad():
        model.gate_proj.weight[8:] = -model.gate_proj.weight[8:].abs()   # closed on x >= 0
    x = torch.rand(5, D)
    rows = []
    hook = torch.nn.Linear.forward
    with dormant.sparse_inference(model, x, max_active=1.0):
        model.up_proj.weight.register_hook(lambda g: rows.append(g))
        model.up_proj.weight.requires_grad_(True)
        model(x).sum().backward()
        model(x[:1]).sum().backward()                # one token, with autograd: rows copied
    for grad in rows:
        assert (grad[8:] == 0).all() and (grad[:8] != 0).any()      # up rows 8.. never read
    assert len(rows) == 2
    assert torch.nn.Linear.forward is hook


def test_gated_blocks_sharing_one_activation_module_stay_exact():
    torch.manual_seed(0)
    act = nn.ReLU()
    model = nn.Sequential(Gated(act), Gated(act)).eval()     # one ReLU instance, two sites
    x = torch.randn(4, 3, D)
    with torch.no_grad():
        want = model(x)
        with dormant.sparse_inference(model, x, max_active=1.0) as h:
            _close(model(x), want)
    assert all(s.up is None for s in h.sites.values())        # the up skip is off for them


def test_the_dense_fallback_and_the_measured_crossover():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, F), nn.ReLU(), nn.Linear(F, D)).eval()
    x = torch.randn(64, D)
    with torch.no_grad():
        want = model(x)
        with dormant.sparse_inference(model, x, max_active=0.0) as h:   # never sparse:
            _close(model(x), want)                 # the layer keeps its forward and layout
            assert h.calls()["1"] == {"sparse": 0, "dense": 0}
            assert model[2].weight.is_contiguous() and "forward" not in vars(model[2])
        with dormant.sparse_inference(model, x, max_active=0.05) as h:  # 3 units x 64 tokens
            _close(model(x), want)
            assert h.calls()["1"] == {"sparse": 0, "dense": 1}
        with dormant.sparse_inference(model, x) as h:          # "auto": measured at setup
            _close(model(x), want)
            assert 0 <= h.sites["1"].max_pairs <= F
    assert model[2].weight.is_contiguous()


def test_sparse_inference_refuses_smooth_activations_and_bad_options():
    model = nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D))
    with pytest.raises(ValueError, match=r"no site can skip inactive units: 1 \(gelu has no "
                                         r"exact zeros\)"):
        dormant.sparse_inference(model, torch.randn(2, D))
    with pytest.raises(ValueError, match="max_active must be 'auto' or a share in"):
        dormant.sparse_inference(model, torch.randn(2, D), max_active=2)


def _llama(act="relu"):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         hidden_act=act, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg).eval(), cfg


def _opt():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64)
    return tf.OPTForCausalLM(cfg).eval(), cfg


@pytest.mark.parametrize("make", [_opt, _llama])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_generation_is_identical_under_sparse_inference(make, dtype):
    model, _ = make()
    model = model.to(dtype)
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=12, do_sample=False)
        logits = model(ids).logits
        with dormant.sparse_inference(model, {"input_ids": ids}, max_active=1.0) as h:
            got = model.generate(ids, max_new_tokens=12, do_sample=False)
            _close(model(ids).logits.float(), logits.float(),
                   1e-5 if dtype == torch.float32 else 2e-2)
    assert torch.equal(got, want)
    assert all(c["sparse"] > 12 for c in h.calls().values())     # every decode step


# -- compact ------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3))
    with torch.no_grad():
        model[0].bias[[1, 5, 9]] = -1e3
        model[2].bias[[0, 2]] = -1e3
    return model, torch.randn(256, 8), {"1": [1, 5, 9], "3": [0, 2]}


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    with torch.no_grad():
        model[1].bias[[3, 7]] = -1e3
    return model.eval(), torch.randn(64, 3, 8, 8), {"2": [3, 7]}


def _planted_llama():
    model, _ = _llama()
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[[2, 11, 40]] = 0
    return model, {"input_ids": torch.randint(0, 100, (8, 12))}, \
        {"model.layers.0.mlp.act_fn": [2, 11, 40]}


def _planted_opt():
    model, _ = _opt()
    with torch.no_grad():
        model.model.decoder.layers[1].fc1.bias[[4, 6]] = -1e3
    return model, {"input_ids": torch.randint(0, 100, (8, 12))}, \
        {"model.decoder.layers.1.activation_fn": [4, 6]}


def _planted_switch():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.SwitchTransformersConfig(vocab_size=100, d_model=32, d_ff=48, d_kv=8, num_heads=2,
                                      num_layers=1, num_decoder_layers=1, num_experts=4,
                                      encoder_sparse_step=1, decoder_sparse_step=1,
                                      decoder_start_token_id=0, pad_token_id=0)
    model = tf.SwitchTransformersForConditionalGeneration(cfg).eval()
    name = "encoder.block.0.layer.1.mlp.experts.expert_1"
    with torch.no_grad():
        model.get_submodule(f"{name}.wi").weight[[3, 30]] = 0
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 100, (8, 12), generator=g),
             "decoder_input_ids": torch.randint(1, 100, (8, 12), generator=g)}
    return model, batch, {f"{name}.act": [3, 30]}


@pytest.mark.parametrize("make", [_mlp, _cnn, _planted_opt, _planted_llama, _planted_switch])
def test_compact_removes_exactly_the_dead_units_and_keeps_the_outputs(make):
    model, data, planted = make()
    dead = dormant.probe(model, data).dead_units()
    expected = {n: d.nonzero().flatten().tolist() for n, d in dead.items() if d.any()}
    assert all(set(v) <= set(expected[n]) for n, v in planted.items())   # planted: dead
    report = dormant.compact(model, data, held_out=data)
    got = {s.site: s.removed for s in report.sites if s.removed}
    assert got == {n: len(v) for n, v in expected.items()}
    assert report.max_diff_probe <= 1e-4 and report.max_diff_held_out <= 1e-4
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    for s in report.sites:
        assert s.bound == pytest.approx(1 - 0.05 ** (1 / s.samples))
    assert "removed" in str(report) and dormant.probe(model, data).dead_fraction() == 0.0


def test_a_compacted_hugging_face_model_saves_and_loads_back(tmp_path):
    model, batch, _ = _planted_llama()
    dormant.compact(model, batch)
    assert model.model.layers[0].mlp.down_proj.in_features == 45
    path = dormant.save_compacted(model, tmp_path / "llama.pt")
    fresh, cfg = _llama()
    import transformers as tf
    again = dormant.load_compacted(tf.LlamaForCausalLM(cfg).eval(), path)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)
    with pytest.raises(ValueError, match="was not written by dormant.save_compacted"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        dormant.load_compacted(fresh, tmp_path / "other.pt")
