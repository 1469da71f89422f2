"""Fused 3-D experts (transformers' Mixtral family: ``gate_up_proj [E, 2F, D]``,
``down_proj [E, D, F]``): one site per expert, proven by running the module; each expert's
units counted over its routed tokens (equal to a unit-by-unit brute force); ReDo re-draws
exactly gate row i and up row i and zeroes down column i (and their Adam moments) of that
expert; Synaptic Stripping masks gate rows only; an unrouted expert is reported and left
alone; removal keeps the tensors rectangular (equal counts per expert) and the outputs equal
to the masked model's; a layout dormant does not know, and methods that do not act on fused
experts, are refused by name."""
import copy

import pytest
import torch
import torch.nn as nn

import dormant
from dormant import surgery
from dormant.methods import build

tf = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402

B, T, V, E, F, D = 4, 8, 100, 4, 48, 32
EXP = "model.layers.0.mlp.experts"

pytestmark = pytest.mark.usefixtures("no_fx_warning")


def mixtral():
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=E,
                           num_experts_per_tok=2, hidden_act="relu")
    g = torch.Generator().manual_seed(0)
    return tf.MixtralForCausalLM(cfg).eval(), {"input_ids": torch.randint(0, V, (B, T), generator=g)}


class TinyMoE(nn.Module):
    """Non-negative tokens -> top-2 router (with a bias) -> transformers' MixtralExperts."""

    def __init__(self):
        super().__init__()
        cfg = tf.MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                               hidden_act="relu")
        cfg._experts_implementation = "eager"
        self.router = nn.Linear(D, E)
        self.experts = MixtralExperts(cfg)
        nn.init.normal_(self.experts.gate_up_proj, std=0.2)
        nn.init.normal_(self.experts.down_proj, std=0.2)
        with torch.no_grad():                          # every gate open on x >= 0
            self.experts.gate_up_proj[:, :F].abs_()
        self.head = nn.Linear(D, 3)

    def _init_weights(self, module):                   # how ReDo re-draws an expert's rows
        if isinstance(module, MixtralExperts):
            nn.init.normal_(module.gate_up_proj, std=0.2)
            nn.init.normal_(module.down_proj, std=0.2)

    def forward(self, x):
        x = x.abs()
        w, idx = self.router(x).softmax(-1).topk(2, -1)
        return self.head(self.experts(x, idx, w))


def tiny():
    torch.manual_seed(0)
    return TinyMoE(), torch.randn(64, D)


def _inputs(model, batch, name):
    """What the experts module received: tokens (N, D) and their experts (N, k)."""
    got = {}
    h = model.get_submodule(name).register_forward_pre_hook(
        lambda m, a: got.update(x=a[0].detach().reshape(-1, D), idx=a[1].reshape(a[0].shape[0], -1)))
    try:
        with torch.no_grad():
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        h.remove()
    return got["x"], got["idx"]


def _brute(experts, x, idx):
    """Per expert: (routed token count, zero count per unit) by one dot product per token and
    unit."""
    out = {}
    for e in range(E):
        rows = [t for t in range(x.shape[0]) if e in idx[t].tolist()]
        zeros = torch.zeros(F, dtype=torch.long)
        for i in range(F):
            for t in rows:
                g = torch.dot(x[t], experts.gate_up_proj[e, i]).relu()
                u = g * torch.dot(x[t], experts.gate_up_proj[e, F + i])
                zeros[i] += int(u == 0)
        out[e] = (len(rows), zeros)
    return out


def test_every_fused_expert_is_a_site_counted_over_its_routed_tokens():
    model, batch = mixtral()
    experts = model.get_submodule(EXP)
    with torch.no_grad():
        experts.gate_up_proj[1, :5] = 0                 # gate rows: never active
        experts.gate_up_proj[2, F + 10:F + 13] = 0      # up rows: the product is always 0
    sites = {s.name: s for s in dormant.find_sites(model, batch)}
    assert [n for n in sites if n.startswith(EXP)] == [f"{EXP}.{e}" for e in range(E)]
    assert all(s.slab == e and s.gated and s.num_units == F
               for e, s in enumerate(sites[f"{EXP}.{e}"] for e in range(E)))
    assert "gate_up_proj[1] -> relu" in dormant.format_sites(list(sites.values()))
    monitor = dormant.ActivityMonitor(model, list(sites.values()))
    with monitor, torch.no_grad():
        model(**batch)
    stats, dead = monitor.stats(), monitor.dead_units()
    x, idx = _inputs(model, batch, EXP)
    with torch.no_grad():
        brute = _brute(experts, x, idx)
    for e, (tokens, zeros) in brute.items():
        s = stats[f"{EXP}.{e}"]
        assert s.positions == tokens > 0
        assert torch.equal(s.zeros.cpu(), zeros)
        assert torch.equal(dead[f"{EXP}.{e}"].cpu(), zeros == tokens)
    assert dead[f"{EXP}.1"].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert dead[f"{EXP}.2"].nonzero().flatten().tolist() == [10, 11, 12]


def test_redo_redraws_exactly_the_dead_units_of_one_expert():
    model, batch = mixtral()
    experts = model.get_submodule(EXP)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    with torch.no_grad():
        experts.gate_up_proj[1, :5] = 0
    gu, down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    method = build("redo", tau=0.0).prepare(model, opt, probe=batch)
    method.end_epoch()
    assert method.metrics["redo/recycled"] == 5
    rows = torch.zeros(E, 2 * F, dtype=torch.bool)
    rows[1, :5] = rows[1, F:F + 5] = True
    changed = (experts.gate_up_proj.detach() != gu).any(-1)
    assert torch.equal(changed, rows)                       # gate rows 0-4 and up rows 0-4
    cols = torch.zeros(E, F, dtype=torch.bool)
    cols[1, :5] = True
    assert torch.equal((experts.down_proj.detach() != down).any(1), cols)
    assert experts.down_proj[1, :, :5].abs().sum() == 0
    state = opt.state[experts.gate_up_proj]
    assert (state["exp_avg"][rows] == 0).all() and (state["exp_avg"][~rows] != 0).any()
    assert (opt.state[experts.down_proj]["exp_avg_sq"][1, :, :5] == 0).all()


def test_stripping_masks_gate_rows_only_and_unrouted_experts_are_left_alone():
    model, x = tiny()
    experts = model.experts
    with torch.no_grad():
        model.router.bias[3] = -1e4                    # expert 3: no token routed
        experts.gate_up_proj[0, :4] = -experts.gate_up_proj[0, :4].abs()   # dead on x >= 0
        experts.gate_up_proj[3, :4] = -experts.gate_up_proj[3, :4].abs()   # would be, unseen
    before = copy.deepcopy(experts.state_dict())
    diag = dormant.diagnose(model, x)
    assert "experts.3" in diag.unrouted_experts
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = build("synaptic-stripping").prepare(model, opt, probe=x)
    method.end_epoch()
    assert method.metrics["ss/dead_units"] == 4
    mask = method.masks.masks["experts.gate_up_proj"]
    assert not mask[0, F:].logical_not().any() and mask[1:].all()    # up rows, other experts
    assert (~mask[0, :4]).any(1).all() and mask[0, 4:F].all()         # dead units' gate rows
    gu = experts.gate_up_proj.detach()
    assert torch.equal(gu[3], before["gate_up_proj"][3]) and torch.equal(
        experts.down_proj.detach(), before["down_proj"])
    redo = build("redo", tau=0.0).prepare(model, opt, probe=x)
    redo.end_epoch()
    assert torch.equal(experts.gate_up_proj.detach()[3], before["gate_up_proj"][3])


def test_removing_equal_counts_per_expert_equals_masking_and_keeps_training():
    model, batch = mixtral()
    experts = model.get_submodule(EXP)
    sites = dormant.find_sites(model, batch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    g = torch.Generator().manual_seed(1)
    units = {f"{EXP}.{e}": torch.zeros(F, dtype=torch.bool) for e in range(E)}
    for e in range(E):
        units[f"{EXP}.{e}"][torch.randperm(F, generator=g)[:8]] = True
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for e in range(E):
            masked.get_submodule(EXP).down_proj[e][:, units[f"{EXP}.{e}"]] = 0
        want = masked(**batch).logits
    with pytest.raises(ValueError, match=r"same number of units.*\[8, 0, 8, 8\]"):
        surgery.remove_units(model, sites, {**units, f"{EXP}.1": torch.zeros(F, dtype=torch.bool)},
                             optimizer=opt)
    assert experts.gate_up_proj.shape == (E, 2 * F, D)         # refused: nothing changed
    removed = surgery.remove_units(model, sites, units, optimizer=opt)
    assert all(torch.equal(removed[n], u) for n, u in units.items())
    assert experts.gate_up_proj.shape == (E, 2 * (F - 8), D) and experts.down_proj.shape == (E, D, F - 8)
    assert opt.state[experts.gate_up_proj]["exp_avg"].shape == experts.gate_up_proj.shape
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want, rtol=1e-5, atol=1e-5)
    model.train()
    loss0 = model(**batch, labels=batch["input_ids"]).loss
    opt.zero_grad()
    loss0.backward()
    opt.step()
    assert model(**batch, labels=batch["input_ids"]).loss < loss0


def test_methods_that_do_not_act_on_fused_experts_refuse_them_by_name():
    model, batch = mixtral()
    for name in ("demp", "continual-backprop", "structured"):
        with pytest.raises(ValueError, match=rf"{name} does not act on fused 3-D experts yet "
                                             rf"\({EXP}"):
            build(name).prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), probe=batch,
                                total_steps=10, epochs=10)


class Transposed(nn.Module):
    """Fused experts stored [E, D, 2F] (another layout): not a site, named in refusals."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, D, 2 * F))
        self.down_proj = nn.Parameter(torch.randn(E, F, D))
        self.act_fn = nn.ReLU()

    def forward(self, x, idx, w):
        out = torch.zeros_like(x)
        for e in range(E):
            g, u = (x @ self.gate_up_proj[e]).chunk(2, -1)
            out = out + ((idx == e) * w).sum(-1, keepdim=True) * (self.act_fn(g) * u) @ self.down_proj[e]
        return out


def test_an_unknown_fused_layout_is_refused_by_name():
    model, x = tiny()
    model.experts = Transposed()
    with pytest.raises(dormant.NoSitesError, match=r"experts hold their experts in 3-D expert "
                                                   r"parameters in a layout dormant does not know"):
        build("redo").prepare(model, None, probe=x)
    model.head = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 3))
    with pytest.warns(UserWarning, match=r"layout dormant does not know.*units are not sites"):
        sites = dormant.find_sites(model, x)
    assert [s.name for s in sites] == ["head.1"]


@pytest.mark.parametrize("family", ["Qwen2Moe", "Olmoe"])
def test_qwen_moe_and_olmoe_experts_are_sites_with_every_routed_token_counted(family):
    torch.manual_seed(0)
    cfg = getattr(tf, f"{family}Config")(
        vocab_size=V, hidden_size=D, intermediate_size=F, moe_intermediate_size=F,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_experts=E,
        num_experts_per_tok=2, hidden_act="relu", pad_token_id=0, eos_token_id=0)
    model = getattr(tf, f"{family}ForCausalLM")(cfg).eval()
    batch = {"input_ids": torch.randint(1, V, (B, T))}
    sites = [s for s in dormant.find_sites(model, batch) if s.slab is not None]
    assert [s.name for s in sites] == [f"{EXP}.{e}" for e in range(E)]
    monitor = dormant.ActivityMonitor(model, sites)
    with monitor, torch.no_grad():
        model(**batch)
    assert sum(s.positions for s in monitor.stats().values()) == B * T * 2   # top-2 routing
    method = build("redo", tau=0.1, activations=["relu"]).prepare(model, None, probe=batch)
    assert {s.name for s in sites} <= {s.name for s in method.sites}
    method.end_epoch()
    assert method.metrics["redo/recycled"] == method.metrics["redo/dormant_units"]
