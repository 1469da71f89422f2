"""Physical removal from dormant's own wiring on today's models: DemP and `structured` in a
hand-written loop on OPT, GPT-2 and Llama with the default KV cache (``use_cache=True``) and
on a ``torch.compile``d model; gated units removed whole; the compacted model computes what
the model computed before on the same inputs."""
import pytest
import torch

import dormant
from dormant.methods import build
from dormant.surgery import provable, remove_units

tf = pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")

import test_gated as G  # noqa: E402

B, T, V = 4, 8, 100


pytestmark = pytest.mark.usefixtures("no_fx_warning")


def opt():
    torch.manual_seed(0)
    return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64,
                                          num_hidden_layers=2, num_attention_heads=2,
                                          word_embed_proj_dim=32, max_position_embeddings=64))


def gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2,
                                            activation_function="relu", bos_token_id=0,
                                            eos_token_id=0))


def llama():
    return G.llama()[0]


MODELS = {"opt": opt, "gpt2": gpt2, "llama": llama}


def _run(model, method, batch, steps=6, compiled=None):
    """A hand-written loop; returns the losses before and after the step that follows each
    removal (same batch)."""
    net = model if compiled is None else compiled
    opt_ = torch.optim.Adam(model.parameters(), lr=1e-2)
    method.prepare(net, opt_, probe=batch, total_steps=steps)
    after_removal = []
    for _ in range(steps):
        opt_.zero_grad()
        out = net(**batch, labels=batch["input_ids"])
        assert out.past_key_values is not None           # the KV cache is on
        out.loss.backward()
        method.after_backward()
        opt_.step()
        if method.after_step():
            with torch.no_grad():
                before = float(net(**batch, labels=batch["input_ids"]).loss)
            opt_.zero_grad()
            net(**batch, labels=batch["input_ids"]).loss.backward()
            opt_.step()
            with torch.no_grad():
                after_removal.append((before, float(net(**batch, labels=batch["input_ids"]).loss)))
    for p in model.parameters():                            # optimizer state in step
        for v in opt_.state[p].values():
            assert not torch.is_tensor(v) or v.ndim == 0 or v.shape == p.shape
    return after_removal


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("meth", ["structured", "demp"])
def test_removal_runs_on_kv_cache_models_and_training_goes_on(name, meth):
    model = MODELS[name]()
    assert model.config.use_cache
    batch = G._ids()
    sites = dormant.find_sites(model, batch)
    assert all(provable(model, s) for s in sites)        # nothing to trace
    if meth == "structured":
        method = build("structured", sparsity=0.5, start=0.0, end=0.7, prune_every=2)
    else:   # DemP: units killed on purpose at the first MLP, found dead at the first check
        method = build("demp", prune_every=2, target="all", noise_peak=0.0)
        _kill(model, sites[0], [1, 5])
    steps = _run(model, method, batch)
    assert steps and all(after < before for before, after in steps)
    widths = method.report()["width"]
    if meth == "structured":
        assert set(widths.values()) == {sites[0].num_units // 2}
    else:
        assert widths[sites[0].name] <= sites[0].num_units - 2
    out = model(**batch, use_cache=True)                    # still runs, cache included
    assert out.logits.shape == (B, T, V)


def _kill(model, site, units):
    """Zero the producer rows (and biases) of `units`: ReLU(0) = 0 on every input."""
    with torch.no_grad():
        for sl in dormant.units.incoming(model, site):
            t = dormant.units.tensor(model, sl.name)
            flags = torch.zeros(site.num_units, dtype=torch.bool)
            flags[units] = True
            where = dormant.units.unit_mask_for(model, sl, flags, site.num_units)
            if sl.kind in ("weight", "bias") and sl.name.startswith(site.producer + "."):
                t.masked_fill_(where, -1.0 if sl.kind == "bias" else 0.0)


@pytest.mark.slow
def test_structured_runs_on_a_compiled_model():
    model = llama()
    compiled = torch.compile(model, backend="eager")
    batch = G._ids()
    method = build("structured", sparsity=0.5, start=0.0, end=0.7, prune_every=2)
    steps = _run(model, method, batch, compiled=compiled)
    assert steps and all(after < before for before, after in steps)
    assert {s.name for s in method.sites} == {s.name for s in dormant.find_sites(model, batch)}
    assert model.model.layers[0].mlp.gate_proj.out_features == 24


@pytest.mark.parametrize("name", ["llama", "phi3", "hand", "hand-fused"])
def test_gated_units_go_whole_and_the_model_computes_the_same(name):
    model, mlp, batch = G._planted(name)
    model.eval()
    call = (lambda m: m(**batch).logits) if isinstance(batch, dict) else (lambda m: m(batch))
    with torch.no_grad():
        ref = call(model)
    sites = dormant.find_sites(model, batch)
    dead = dormant.diagnose(model, batch, sites=sites).dead
    opt_ = torch.optim.Adam(model.parameters())
    removed = remove_units(model, sites, dead, None, opt_)
    assert removed[sites[0].name].nonzero().flatten().tolist() == G.DEAD
    m = model.get_submodule(mlp.format(0))
    left = G.F - len(G.DEAD)
    if hasattr(m, "gate_up_proj"):
        assert m.gate_up_proj.weight.shape == (2 * left, G.D)
        assert m.gate_up_proj.out_features == 2 * left
    else:
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (left, G.D)
    assert m.down_proj.weight.shape == (G.D, left) and m.down_proj.in_features == left
    assert {id(p) for p in opt_.param_groups[0]["params"]} == {id(p) for p in model.parameters()}
    with torch.no_grad():
        out = call(model)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    (site,) = [s for s in dormant.find_sites(model, batch) if s.name == sites[0].name]
    assert site.num_units == left and site.gated
