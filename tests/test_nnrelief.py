import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dormant.data import load_dataset
from dormant.methods import NNrelief
from dormant.methods.nnrelief import conv_scores, layer_inputs, linear_scores, relief_keep
from dormant.models import build_model
from dormant.train import Trainer


def test_relief_keep_golden():
    s = torch.tensor([[0.5, 0.3, 0.1, 0.1],
                      [0.1, 0.3, 0.5, 0.1]])
    # cumsum 0.5, 0.8, ...: alpha 0.7 is crossed at the 2nd entry; entries <= 0.1 go
    assert relief_keep(s, 0.7).tolist() == [[True, True, False, False], [False, True, True, False]]
    # 0.5 reaches alpha=0.5 at once: one entry kept
    assert relief_keep(s, 0.5)[0].tolist() == [True, False, False, False]
    # ties at the threshold are pruned with it (the code's rule): keeps 0.4 < 0.5 of the total
    assert relief_keep(torch.tensor([[0.4, 0.2, 0.2, 0.2]]), 0.5).tolist() == [[True, False, False, False]]
    # a dead unit (all-zero scores) loses everything
    assert not relief_keep(torch.zeros(1, 3), 0.9).any()


def test_each_unit_keeps_at_least_alpha_minimally():
    torch.manual_seed(0)
    s = torch.rand(200, 30) ** 3
    for alpha in (0.5, 0.9, 0.95):
        keep = relief_keep(s, alpha)
        kept = (s * keep).sum(1)
        total = s.sum(1)
        assert (kept >= alpha * total - 1e-6).all()
        smallest_kept = torch.where(keep, s, torch.inf).min(1).values
        assert (kept - smallest_kept < alpha * total).all()       # nothing superfluous


def test_linear_scores_golden():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    b = torch.tensor([0.5, -1.0])
    assert linear_scores(w, b, torch.tensor([2.0, 1.0])).tolist() == [[2, 2, 0.5], [6, 0, 1]]


@pytest.mark.parametrize("form", ["norm", "sum", "per-sample"])
def test_conv_scores_against_a_loop(form):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    x = torch.randn(5, 3, 7, 7).abs()
    stat = x if form == "per-sample" else x.mean(0)
    s = conv_scores(conv, stat, form)
    ref = torch.zeros(4, 4)
    for j in range(4):
        for i in range(3):
            k = conv.weight[j, i].detach().abs()[None, None]
            xs = x[:, i:i + 1] if form == "per-sample" else x.mean(0)[None, i:i + 1]
            y = F.conv2d(xs, k, stride=2, padding=1).flatten(1)
            ref[j, i] = (y.sum(1) if form == "sum" else y.norm(dim=1)).mean()
        npos = 16
        ref[j, 3] = conv.bias[j].abs() * (npos if form == "sum" else npos ** 0.5)
    assert torch.allclose(s, ref, atol=1e-5)


def test_layer_inputs_mean_abs_for_features_and_tokens():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(10, 6, 3)
    stats = layer_inputs(model, [x[:4], x[4:8], x[8:]], ["0", "2"], per_sample=False)
    assert torch.allclose(stats["0"], x.abs().mean((0, 1)), atol=1e-6)
    h = torch.relu(model[0](x)).detach()
    assert torch.allclose(stats["2"], h.abs().mean((0, 1)), atol=1e-6)


def _relief_round(model, data, **kw):
    method = NNrelief(rounds=1, epochs_per_round=1, rewind="none", probe_samples=256, **kw)
    Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.0), epochs=2, batch_size=64,
            callbacks=[method], show_progress=False).fit()
    return method


def test_dead_units_go_whole_and_the_backward_pass_removes_units_without_outputs():
    torch.manual_seed(0)
    data = load_dataset("synthetic")
    model = build_model("mlp", data.input_shape, data.num_classes, width=8, depth=2)
    with torch.no_grad():
        model.fc1.bias[2] = -1e3              # unit 2 of act1: dead
        model.fc2.weight[:, 5] = 0.0          # unit 5 of act1: no outgoing weight left
        model.fc2.weight[:, 6] = 1e-9         # unit 6: outgoing weights too small to survive
    method = _relief_round(model, data, alpha_fc=0.9)
    w1, b1 = method.masks.masks["fc1.weight"], method.masks.masks["fc1.bias"]
    for u in (2, 5, 6):
        assert not w1[u].any() and not b1[u], u
    assert (model.fc1.weight[[2, 5, 6]] == 0).all()


def test_reported_architecture_and_flops():
    torch.manual_seed(0)
    data = load_dataset("synthetic")
    model = build_model("mlp", data.input_shape, data.num_classes, width=8, depth=1)
    method = _relief_round(model, data, alpha_fc=0.8)
    rep = method.report()
    w1, w2 = model.fc1.weight, model.head.weight
    assert rep["arch"] == {"act1": int((w1 != 0).any(1).sum())}
    nz = int((w1 != 0).sum() + (w2 != 0).sum())
    assert rep["flops_nonzero_ratio"] == pytest.approx(nz / (w1.numel() + w2.numel()))
    assert rep["compression"] == pytest.approx((w1.numel() + w2.numel()) /
                                               sum(int(method.masks.masks[n].sum())
                                                   for n in ("fc1.weight", "head.weight")))
    rows, cols = int((w1 != 0).any(1).sum()), int((w1 != 0).any(0).sum())
    rows2, cols2 = int((w2 != 0).any(1).sum()), int((w2 != 0).any(0).sum())
    assert rep["flops_structured_ratio"] == pytest.approx(
        (rows * cols + rows2 * cols2) / (w1.numel() + w2.numel()))


def test_conv_model_round_runs_and_prunes_whole_kernels():
    torch.manual_seed(0)
    data = load_dataset("synthetic", image=True)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, data.num_classes))
    method = _relief_round(model, data, alpha_conv=0.7)
    m = method.masks.masks["2.weight"]
    per_kernel = m.flatten(2)
    assert (per_kernel.all(2) | ~per_kernel.any(2)).all()     # kernels kept or pruned whole
    assert (~m).any()


def test_invalid_options():
    with pytest.raises(ValueError, match="alpha_fc"):
        NNrelief(alpha_fc=0)
    with pytest.raises(ValueError, match="conv_score"):
        NNrelief(conv_score="mean")


def test_fc_layers_are_scored_on_features_after_this_iterations_conv_pruning():
    """The official lenet/vgg pruning recompute the conv features after pruning the convs and
    score the fully connected layers on them: so does decide()."""
    import copy

    from dormant.methods import build
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 6),
                          nn.ReLU(), nn.Linear(6, 6))
    with torch.no_grad():
        model[3].bias.fill_(0.5)            # every hidden unit alive on the probe
    x = torch.rand(64, 1, 6, 6)
    method = build("nnrelief", rounds=1, epochs_per_round=1, keep_best=False, rewind="none",
                   alpha_conv=0.5, alpha_fc=0.9, conv_score="sum", probe_samples=64)
    method.prepare(model, None, probe=x)
    method._backward_pass = lambda model, new: None    # compare the scores themselves
    new = method.decide(0)

    def fc_keep(conv_masks: bool) -> torch.Tensor:
        ref = copy.deepcopy(model)
        if conv_masks:
            with torch.no_grad():
                ref[0].weight.mul_(new["0.weight"])
                ref[0].bias.mul_(new["0.bias"])
        feats = torch.flatten(torch.relu(ref[0](x)), 1)
        s = linear_scores(model[3].weight, model[3].bias, feats.abs().mean(0))
        return relief_keep(s, 0.9)[:, :-1]

    rows = new["3.weight"].any(1)          # rows not dropped whole (dead units)
    assert rows.sum() >= 3
    assert torch.equal(new["3.weight"][rows], fc_keep(True)[rows])
    assert not torch.equal(new["3.weight"][rows], fc_keep(False)[rows])
    assert torch.equal(model[3].weight, model[3].weight.detach())   # weights put back
    assert (model[0].weight != 0).all(), "the temporary conv masks were undone"


def test_nnrelief_on_the_tiny_vit_leaves_attention_out_proj_unpruned():
    """nn.MultiheadAttention applies out_proj functionally: the probe never sees its input,
    so it is left unpruned (it was a KeyError); every other layer is pruned."""
    torch.manual_seed(0)
    model = build_model("vit-tiny", (1, 8, 8), 3, patch=4, dim=16, depth=1, heads=2,
                        mlp_ratio=2)
    data = load_dataset("synthetic")
    x = torch.randn(128, 1, 8, 8)
    split = type(data.train)(x, torch.randint(0, 3, (128,)))
    data = type(data)("img", split, split, split, 3)
    method = NNrelief(rounds=1, epochs_per_round=1, rewind="none", probe_samples=64)
    Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.0), epochs=2, batch_size=64,
            callbacks=[method], show_progress=False).fit()
    masks = method.masks.masks
    assert masks["blocks.0.attn.out_proj.weight"].all()
    assert not masks["blocks.0.mlp.fc1.weight"].all() and not masks["head.weight"].all()
