"""Gated MLPs (``act(gate(x)) * up(x) -> down``) as sites: Llama, Qwen2 and Phi-3 (fused
``gate_up_proj``) built from config with ReLU, and hand-written separate and fused blocks
traced by fx. Units killed on purpose are found exactly (a brute-force count over every token),
ReDo rewrites exactly gate row i, up row i and down column i (and their optimizer moments),
Synaptic Stripping strips only gate rows."""
import pytest
import torch
import torch.nn as nn

import dormant
from dormant.methods import build
from dormant.units import fan_in_rows

tf = pytest.importorskip("transformers")

B, T, V, D, F = 4, 8, 100, 32, 48
DEAD = [3, 17, 40]


pytestmark = pytest.mark.usefixtures("no_fx_warning")


def _ids(seed=0):
    return {"input_ids": torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))}


def _cfg(cls, **kw):
    return cls(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=2, hidden_act="relu",
               bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)


def llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(_cfg(tf.LlamaConfig, mlp_bias=True)), "model.layers.{}.mlp"


def qwen2():
    torch.manual_seed(0)
    return tf.Qwen2ForCausalLM(_cfg(tf.Qwen2Config)), "model.layers.{}.mlp"


def phi3():
    torch.manual_seed(0)
    return tf.Phi3ForCausalLM(_cfg(tf.Phi3Config)), "model.layers.{}.mlp"


class Block(nn.Module):
    """A hand-written gated MLP with biases: separate gate/up, or one fused layer (gate
    first) split with chunk."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        if fused:
            self.gate_up_proj = nn.Linear(D, 2 * F)
        else:
            self.gate_proj, self.up_proj = nn.Linear(D, F), nn.Linear(D, F)
        self.down_proj, self.act = nn.Linear(F, D), nn.ReLU()

    def forward(self, x):
        if self.fused:
            g, u = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(g) * u)


class Net(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.layers = nn.ModuleList([Block(fused) for _ in range(2)])
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def handwritten(fused):
    def make():
        torch.manual_seed(0)
        return Net(fused), "layers.{}"
    return make


MODELS = {"llama": llama, "qwen2": qwen2, "phi3": phi3, "hand": handwritten(False),
          "hand-fused": handwritten(True)}


def _batch(name):
    if name.startswith("hand"):
        return torch.randn(B, T, D, generator=torch.Generator().manual_seed(0))
    return _ids()


def _plant(model, mlp):
    """Kill units DEAD: gate rows zero (a bias of -100 where there is one)."""
    m = model.get_submodule(mlp)
    with torch.no_grad():
        layer = getattr(m, "gate_up_proj", None) or m.gate_proj
        for i in DEAD:
            layer.weight[i] = 0     # the gate is the first half in Phi-3 and here
            if layer.bias is not None:
                layer.weight[i] = torch.randn(D)
                layer.bias[i] = -100.0


def _brute_dead(model, mlp, batch):
    """Per unit: act(gate) == 0 on every token, from the gate's own pre-activation."""
    m = model.get_submodule(mlp)
    layer = getattr(m, "gate_up_proj", None) or m.gate_proj
    seen = []
    h = layer.register_forward_hook(lambda mod, i, o: seen.append(o[..., :F].detach()))
    try:
        with torch.no_grad():
            model.eval()
            _call(model, batch)
    finally:
        h.remove()
    g = torch.cat([s.reshape(-1, F) for s in seen])
    return (torch.relu(g) == 0).all(0)


def _call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _planted(name):
    """The model with units DEAD of its first MLP killed, its MLP name pattern, a batch."""
    model, mlp = MODELS[name]()
    _plant(model, mlp.format(0))
    return model, mlp, _batch(name)


@pytest.mark.parametrize("name", MODELS)
def test_gated_sites_are_wired_gate_up_down(name):
    model, mlp = MODELS[name]()
    sites = dormant.find_sites(model, _batch(name))
    assert len(sites) == 2
    for i, s in enumerate(sites):
        pre = mlp.format(i)
        assert s.gated and s.num_units == F and s.consumers_complete
        assert s.consumers == (f"{pre}.down_proj",)
        if name in ("phi3", "hand-fused"):
            assert s.fused and s.producer == s.up == f"{pre}.gate_up_proj" and s.gate_half == 0
        else:
            assert (s.producer, s.up) == (f"{pre}.gate_proj", f"{pre}.up_proj") and not s.fused
        assert s.tap.kind == "input" and s.tap.module == f"{pre}.down_proj"
    table = dormant.format_sites(sites)
    assert " * " in table and "down_proj" in table


@pytest.mark.parametrize("name", MODELS)
def test_dead_gated_units_equal_a_brute_force_count(name):
    model, mlp, batch = _planted(name)
    sites = dormant.find_sites(model, batch)
    dead = dormant.diagnose(model, batch, sites=sites).dead
    for i, s in enumerate(sites):
        brute = _brute_dead(model, mlp.format(i), batch)
        assert torch.equal(dead[s.name], brute)
    assert dead[sites[0].name].nonzero().flatten().tolist() == DEAD


def _adam_step(model, batch):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = _call(model, batch)
    (out.logits if hasattr(out, "logits") else out).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return opt


@pytest.mark.parametrize("name", MODELS)
def test_redo_rewrites_gate_row_up_row_and_down_column_of_exactly_the_dead(name):
    model, mlp, batch = _planted(name)
    opt = _adam_step(model, batch)
    _plant(model, mlp.format(0))              # the step moved the planted rows a little
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    method = build("redo", tau=0.0).prepare(model, opt, probe=batch)
    method.end_epoch()
    assert method.metrics["redo/recycled"] == len(DEAD)
    pre = mlp.format(0)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[DEAD] = True
    m = model.get_submodule(pre)
    fused = hasattr(m, "gate_up_proj")
    rows = {f"{pre}.gate_up_proj.weight": torch.cat([dead, dead])} if fused else {
        f"{pre}.gate_proj.weight": dead, f"{pre}.up_proj.weight": dead}
    for pname, flags in rows.items():
        w, w0 = model.get_parameter(pname).detach(), before[pname]
        assert (w[flags] != w0[flags]).any(1).all()           # every dead row re-drawn
        assert torch.equal(w[~flags], w0[~flags])             # no live row touched
        for key in ("exp_avg", "exp_avg_sq"):
            assert (opt.state[model.get_parameter(pname)][key][flags] == 0).all()
    down = model.get_parameter(f"{pre}.down_proj.weight").detach()
    assert (down[:, dead] == 0).all() and torch.equal(down[:, ~dead], before[f"{pre}.down_proj.weight"][:, ~dead])
    assert (opt.state[model.get_parameter(f"{pre}.down_proj.weight")]["exp_avg"][:, dead] == 0).all()
    other = mlp.format(1)                                     # nothing dead there
    for k in before:
        if k.startswith(other + "."):
            assert torch.equal(model.state_dict()[k], before[k])


@pytest.mark.parametrize("name", ["llama", "hand", "hand-fused"])
def test_synaptic_stripping_strips_only_gate_rows(name):
    model, mlp, batch = _planted(name)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    method = build("synaptic-stripping", factor=0.2).prepare(model, None, probe=batch)
    method.end_epoch()
    method.finalize()
    pre = mlp.format(0)
    m = model.get_submodule(pre)
    fused = hasattr(m, "gate_up_proj")
    gate = f"{pre}.gate_up_proj.weight" if fused else f"{pre}.gate_proj.weight"
    changed = {k for k in before if not torch.equal(model.state_dict()[k], before[k])}
    assert changed == {gate}
    w, w0 = model.get_parameter(gate).detach(), before[gate]
    diff = (w != w0).any(1)
    assert diff.nonzero().flatten().tolist() == DEAD        # the gate rows of the dead only
    assert method.metrics["ss/stripped"] == int((w0[DEAD] != w[DEAD]).sum()) > 0
    assert (w[DEAD][w0[DEAD] != w[DEAD]] == 0).all()
    assert fan_in_rows(model, method.sites[0]).shape == (F, D)
