import numpy as np
import pytest
import torch
import torch.nn as nn

from dormant.data import load_dataset
from dormant.methods import AP, IMP
from dormant.methods.ap import ap_decision
from dormant.models import build_model
from dormant.pruning import PRUNERS, alive, count_to_prune, prune_count, select_lowest
from dormant.train import Callback, Trainer


def _ones(**shapes):
    return {k: torch.ones(s, dtype=torch.bool) for k, s in shapes.items()}


def test_global_magnitude_golden():
    w = {"a": torch.tensor([1.0, -5.0, 3.0]), "b": torch.tensor([[0.5, 2.0], [-4.0, 6.0]])}
    keep = PRUNERS.get("global-magnitude")(w, _ones(a=3, b=(2, 2)), 3)
    assert keep["a"].tolist() == [False, True, True]
    assert keep["b"].tolist() == [[False, False], [True, True]]


def test_ties_are_broken_by_position_so_counts_are_exact():
    scores = {"a": torch.zeros(5), "b": torch.zeros(5)}
    keep = select_lowest(scores, _ones(a=5, b=5), 3)
    assert keep["a"].tolist() == [False, False, False, True, True] and keep["b"].all()


def test_pruned_stays_pruned_and_only_alive_weights_count():
    w = {"a": torch.tensor([0.1, 0.2, 9.0, 8.0])}
    masks = {"a": torch.tensor([False, True, True, True])}
    keep = PRUNERS.get("global-magnitude")(w, masks, 1)
    assert keep["a"].tolist() == [False, False, True, True]


@pytest.mark.parametrize("name", PRUNERS.names())
def test_every_pruner_removes_exactly_n_and_only_from_alive(name):
    torch.manual_seed(0)
    w = {"a": torch.randn(30, 20), "b": torch.randn(10, 30)}
    masks = {k: torch.rand(v.shape) > 0.3 for k, v in w.items()}
    n = 97
    keep = PRUNERS.get(name)(w, masks, n, generator=torch.Generator().manual_seed(0))
    assert alive(masks) - alive(keep) == n
    for k in w:
        assert not (keep[k] & ~masks[k]).any()


def test_layer_magnitude_prunes_each_layer_at_the_same_rate():
    torch.manual_seed(0)
    w = {"a": torch.randn(100), "b": torch.randn(300)}
    keep = PRUNERS.get("layer-magnitude")(w, _ones(a=100, b=300), 80)
    assert (~keep["a"]).sum() == 20 and (~keep["b"]).sum() == 60


def test_random_is_reproducible_with_a_generator():
    w = {"a": torch.randn(50)}
    run = lambda s: PRUNERS.get("random")(w, _ones(a=50), 10, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(1)["a"], run(1)["a"]) and not torch.equal(run(1)["a"], run(2)["a"])


def test_ap_decision_golden():
    # AP removes negative, surviving weights that moved least: |w_end - w_start|
    w_start = {"fc": torch.tensor([[-1.0, -1.0, 2.0], [-3.0, 0.5, -2.0]])}
    w_end = {"fc": torch.tensor([[-1.1, -0.2, 2.0], [-3.05, -0.4, -2.5]])}
    masks = {"fc": torch.tensor([[True, True, True], [False, True, True]])}
    eligible = {"fc": torch.ones(2, 3, dtype=torch.bool)}
    # candidates: (0,0) moved .1, (0,1) .8, (1,1) .9, (1,2) .5; (1,0) is already pruned
    keep, m = ap_decision(w_end, w_start, masks, eligible, 2)
    assert m == 2
    assert keep["fc"].tolist() == [[False, True, True], [False, True, False]]
    # only positive weights left: nothing to take
    _, m = ap_decision({"fc": w_end["fc"].abs()}, w_start, masks, eligible, 2)
    assert m == 0


class Recorder(Callback):
    """Weights, masks and counts at every epoch boundary."""

    def __init__(self, method):
        self.method, self.rows = method, []

    def on_epoch_start(self, trainer, epoch):
        w = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        masks = {n: m.clone() for n, m in self.method.masks.masks.items()} if self.method.masks else {}
        self.rows.append((epoch, w, masks))

    def on_epoch_end(self, trainer, epoch, metrics):
        self.rows[-1] += (dict(metrics),)


def _train(method, epochs, seed=0):
    torch.manual_seed(seed)
    data = load_dataset("synthetic")
    model = build_model("mlp", data.input_shape, data.num_classes, width=32, depth=2)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = Recorder(method)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    Trainer(model, data, opt, epochs=epochs, batch_size=64, callbacks=[method, rec],
            show_progress=False, seed=seed).fit()
    return init, rec.rows, model


@pytest.mark.parametrize("method_cls,kwargs", [(IMP, {}), (AP, {"p_ap": 0.05})])
def test_rounds_hit_the_target_rewind_exactly_and_masks_only_shrink(method_cls, kwargs):
    method = method_cls(rate=0.3, rounds=3, epochs_per_round=1, **kwargs)
    init, rows, _ = _train(method, 4)
    total = sum(p.numel() for n, p in init.items() if n.endswith("weight"))
    prev = None
    for r, (_epoch, w, masks, metrics) in enumerate(rows):
        kept = alive({n: masks[n] for n in method.names}) if masks else total
        assert kept == prune_count(0.3, r, total)           # exact, weight for weight
        if r > 0:
            for n in init:   # survivors (and biases) are the init values, masked
                expected = init[n] * masks[n] if n in masks else init[n]
                assert torch.equal(w[n], expected), n
            if prev is not None:
                for n in masks:
                    assert not (masks[n] & ~prev[n]).any()
        prev = masks or None
        assert metrics["round"] == r and metrics["round_end"]


def test_ap_share_is_inside_the_round_budget():
    method = AP(rate=0.2, p_ap=0.05, rounds=2, epochs_per_round=1)
    _, rows, _ = _train(method, 3)
    for r in range(2):
        before = alive({n: rows[r][2][n] for n in method.names}) if rows[r][2] else \
            sum(rows[0][1][n].numel() for n in method.names)
        m = rows[r][3]
        assert m["pruned"] == count_to_prune(before, 0.2)
        assert m["ap/pruned"] == count_to_prune(before, 0.05)


def test_rewind_to_epoch_k():
    method = IMP(rate=0.5, rounds=1, epochs_per_round=2, rewind=1)
    _, rows, _ = _train(method, 4)
    after_epoch1 = rows[1][1]          # weights at the start of epoch 2 = end of epoch 1
    epoch3_start_w, masks = rows[2][1], rows[2][2]
    for n, w in epoch3_start_w.items():
        expected = after_epoch1[n] * masks[n] if n in masks else after_epoch1[n]
        assert torch.equal(w, expected), n


def test_classifier_excludable_and_ap_only_touches_relu_producers():
    imp = IMP(rounds=1, epochs_per_round=1, layers="hidden")
    _train(imp, 2)
    assert imp.names == ["fc1.weight", "fc2.weight"]
    ap = AP(rounds=1, epochs_per_round=1)
    _, _, model = _train(ap, 2)
    assert "head.weight" in ap.names                         # the base pruner may take it
    assert set(ap.eligible()) == {"fc1.weight", "fc2.weight"}   # AP may not


def test_bad_settings_are_refused_before_training():
    from dormant.experiments import ConfigError, ExperimentConfig
    with pytest.raises(ConfigError, match="need epochs = 12"):
        ExperimentConfig(method="imp", method_args={"rounds": 3, "epochs_per_round": 3},
                         epochs=10).validate()
    with pytest.raises(ConfigError, match=r"p_ap: expected a float in \(0, rate=0.2\)"):
        ExperimentConfig(method="ap", method_args={"p_ap": 0.3}).validate()
    with pytest.raises(ConfigError, match="no option"):
        ExperimentConfig(method="imp", method_args={"every": 2}).validate()
    with pytest.raises(ValueError, match=r"pruner: expected a str \(one of global-magnitude, "):
        IMP(pruner="smallest")


def test_ap_official_round_golden():
    """The released resnet_20.py rule by hand: A = 9 non-zero weights (the exact zero counts
    as pruned), n_AP = floor(9 x 0.2) = 1, base threshold = 20th percentile of |A| = 0.1 +
    0.6 x (0.2 - 0.1) = 0.16 (0.05 and 0.1 go); AP: surviving negatives moved 0.3, 0.01, 0.02,
    t = the 1st (0-indexed) smallest = 0.02, so the two with d <= 0.02 go."""
    from dormant.methods.ap import official_round
    w_end = {"a": torch.tensor([-0.1, 0.5, -0.9, 0.0, 0.3]),
             "b.weight": torch.tensor([-0.2, 0.8, 0.05, -0.6, 0.4])}
    moved = {"a": torch.tensor([0.5, 0.5, 0.3, 0.0, 0.5]),
             "b.weight": torch.tensor([0.01, 0.5, 0.5, 0.02, 0.5])}
    w_start = {k: w_end[k] + moved[k] for k in w_end}
    masks = {k: torch.ones(5, dtype=torch.bool) for k in w_end}
    new, by_ap = official_round(w_end, w_start, masks, rate=0.4, p_ap=0.2)
    assert new["a"].tolist() == [False, True, True, False, True]
    assert new["b.weight"].tolist() == [False, True, False, False, True]
    assert by_ap == 2


def test_ap_official_scope_prunes_every_weight_tensor_norm_scales_included():
    torch.manual_seed(0)
    data = load_dataset("synthetic")
    model = nn.Sequential(nn.Linear(data.input_shape[0], 16), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Linear(16, data.num_classes))
    method = AP(rounds=1, epochs_per_round=1, scope="official", rate=0.3, p_ap=0.05)
    Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, batch_size=64,
            callbacks=[method], show_progress=False).fit()
    assert set(method.names) == {"0.weight", "1.weight", "3.weight"}
    assert method.masks.masks["1.weight"].shape == (16,)       # BatchNorm scales are pruned too
    total = sum(method.masks.masks[n].numel() for n in method.names)
    assert 0.25 < 1 - alive(method.pruning_masks()) / total < 0.35
    with pytest.raises(ValueError, match="scope: 'official' is the released code's rule"):
        AP(scope="official", pruner="random")


def _released_ap_round(w_end, w_start, p=20, p_ap=2):
    """A transcription of the released resnet_20.py round (integer percents, numpy), on one
    flat tensor: n_AP = floor(|A| p_AP / 100); |w| < percentile(|A|, p - p_AP) pruned; of the
    surviving negatives, those with |w_end - w_start| <= sort(d)[n_AP] pruned."""
    w, d_all = w_end.numpy(), (w_end - w_start).abs().numpy()
    a = np.abs(w[w != 0])
    n_ap = int(len(a) * p_ap / 100)
    keep = (w != 0) & ~(np.abs(w) < np.percentile(a, p - p_ap))
    cand = keep & (w < 0)
    t = np.sort(d_all[cand])[n_ap]
    return torch.from_numpy(keep & ~(cand & (d_all <= t)))


@pytest.mark.parametrize("n", [51, 101, 40, 7])
def test_ap_official_round_equals_the_released_code(n):
    """n = 51, 101: (n - 1) x 0.18 is an integer, where a float percentile (18.000000000000004)
    prunes one weight more; n = 40, 7: n_AP = 0, where the released code still prunes the
    least moved negative weight."""
    from dormant.methods.ap import official_round
    g = torch.Generator().manual_seed(n)
    w_end = torch.randn(n, generator=g, dtype=torch.float64)
    w_start = w_end + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    new, _ = official_round({"w": w_end}, {"w": w_start}, {"w": torch.ones(n, dtype=torch.bool)},
                            rate=0.2, p_ap=0.02)
    assert torch.equal(new["w"], _released_ap_round(w_end, w_start))
