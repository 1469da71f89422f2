"""Mixtures of experts: every expert of a Switch Transformers model is a site whatever the
example routes, each expert's units are counted over its routed tokens (equal to a brute-force
count), an expert no token reaches is reported and left alone, never counted dead, never a
crash (fused 3-D experts, Mixtral's: test_fused_experts.py)."""
import pytest
import torch

import dormant
from dormant.methods import build

tf = pytest.importorskip("transformers")

B, T, V, E, F = 4, 8, 100, 8, 48
MIX = "encoder.block.0.layer.1.mlp.experts"


pytestmark = pytest.mark.usefixtures("no_fx_warning")


def switch():
    torch.manual_seed(0)
    cfg = tf.SwitchTransformersConfig(vocab_size=V, d_model=32, d_ff=F, d_kv=8, num_heads=2,
                                      num_layers=2, num_decoder_layers=2, num_experts=E,
                                      encoder_sparse_step=1, decoder_sparse_step=1,
                                      decoder_start_token_id=0, pad_token_id=0, router_bias=True)
    model = tf.SwitchTransformersForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, V, (B, T), generator=g),
             "decoder_input_ids": torch.randint(1, V, (B, T), generator=g)}
    return model.eval(), batch


def _never_route(model, expert: int):
    """The encoder's first router never picks `expert` (its logit far below the others)."""
    router = model.get_submodule(MIX.rpartition(".")[0] + ".router.classifier")
    with torch.no_grad():
        router.weight[expert] = 0
        router.bias[expert] = -1e4


def _routed_acts(model, batch):
    """Per expert of MIX: the ReLU outputs of its units over the tokens it received."""
    seen = {e: [] for e in range(E)}
    hooks = [model.get_submodule(f"{MIX}.expert_{e}.act").register_forward_hook(
        lambda m, i, o, e=e: seen[e].append(o.detach().reshape(-1, F))) for e in range(E)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return {e: torch.cat(v) if v else None for e, v in seen.items()}


def test_every_expert_is_a_site_whatever_the_example_routes():
    model, batch = switch()
    _never_route(model, 5)
    acts = _routed_acts(model, batch)
    sites = {s.name: s for s in dormant.find_sites(model, batch)}
    for e in range(E):
        s = sites[f"{MIX}.expert_{e}.act"]
        assert s.expert == f"{MIX}.expert_{e}" and s.producer == f"{MIX}.expert_{e}.wi"
        assert s.consumers == (f"{MIX}.expert_{e}.wo",) and s.num_units == F
        assert s.proof == ("dataflow" if acts[e] is not None else "dataflow+structure")
    assert acts[5] is None                     # the example routes nothing to expert 5


def test_dead_counts_per_expert_equal_brute_force_over_routed_tokens():
    model, batch = switch()
    _never_route(model, 5)
    with torch.no_grad():
        model.get_submodule(f"{MIX}.expert_1.wi").weight[[2, 9]] = 0    # killed on purpose
    acts = _routed_acts(model, batch)
    diag = dormant.diagnose(model, batch)
    for e in range(E):
        name = f"{MIX}.expert_{e}.act"
        if acts[e] is None:
            assert not diag.dead[name].any() and f"{MIX}.expert_{e}" in diag.unrouted_experts
            continue
        assert torch.equal(diag.dead[name], (acts[e] == 0).all(0))
    assert {2, 9} <= set(diag.dead[f"{MIX}.expert_1.act"].nonzero().flatten().tolist())
    rows = {r.expert: r for r in diag.experts}
    for e in range(E):
        n = 0 if acts[e] is None else acts[e].shape[0]
        assert rows[f"{MIX}.expert_{e}"].tokens == n
    assert "unrouted (units unobserved, not counted dead)" in str(diag)
    assert diag.metrics()["experts/unrouted"] == len(diag.unrouted_experts) > 0


def test_an_unrouted_expert_is_left_alone_by_every_method():
    model, batch = switch()
    _never_route(model, 3)
    acts = _routed_acts(model, batch)
    assert acts[3] is None
    before = {k: v.clone() for k, v in model.state_dict().items() if f"{MIX}.expert_3." in k}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for name, kw in [("redo", {"tau": 0.1}), ("synaptic-stripping", {})]:
        method = build(name, **kw).prepare(model, opt, probe=batch)
        assert f"{MIX}.expert_3.act" in {s.name for s in method.sites}
        method.end_epoch()                                      # no crash
        method.finalize()
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v)
    diag = dormant.diagnose(model, batch)
    assert f"{MIX}.expert_3" in diag.unrouted_experts and f"{MIX}.expert_3" in diag.dead_experts
