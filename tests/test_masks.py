import copy

import pytest
import torch
import torch.nn as nn

from dormant import Masks


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))


def test_masks_compose_pruned_stays_pruned():
    model = _model()
    masks = Masks(model)
    masks.update("0.weight", torch.tensor([[1, 1, 0, 1]] * 5))
    masks.update("0.weight", torch.tensor([[1, 0, 1, 1]] * 5))   # tries to revive column 2
    assert masks.masks["0.weight"][0].tolist() == [True, False, False, True]
    assert masks.sparsity() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        masks.update("0.weight", torch.ones(3, 3))
    with pytest.raises(KeyError, match="no parameter"):
        masks.update("9.weight", torch.ones(1))


def test_attach_keeps_weights_and_adam_moments_zero():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    keep = torch.rand(5, 4) > 0.5
    masks = Masks(model, {"0.weight": keep}).attach(opt)
    assert (model[0].weight[~keep] == 0).all()
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
    assert (model[0].weight[~keep] == 0).all()
    assert (opt.state[model[0].weight]["exp_avg"][~keep] == 0).all()
    assert (model[0].weight[keep] != 0).all()
    masks.detach()
    opt.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    assert (model[0].weight[~keep] != 0).any(), "detached masks no longer act"


def test_deepcopy_copies_model_with_masks():
    model = _model()
    masks = Masks(model, {"0.weight": torch.rand(5, 4) > 0.5})
    dup = copy.deepcopy(masks)
    assert dup.model is not model
    with torch.no_grad():
        dup.model[0].weight.fill_(1.0)
    dup.apply()
    assert torch.equal(dup.model[0].weight != 0, masks.masks["0.weight"])
    assert (model[0].weight != 1.0).all(), "original untouched"
    plain = copy.deepcopy(model)
    masks.apply()
    assert torch.equal(masks.bind(plain).masks["0.weight"], masks.masks["0.weight"])


def test_state_dict_round_trip_weights_only(tmp_path):
    model = _model()
    masks = Masks(model, {"0.weight": torch.rand(5, 4) > 0.5, "2.weight": torch.rand(2, 5) > 0.5})
    masks.apply()
    torch.save({"model": model.state_dict(), "masks": masks.state_dict()}, tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    fresh = _model()
    fresh.load_state_dict(state["model"])
    restored = Masks(fresh)
    restored.load_state_dict(state["masks"])
    for n in masks.masks:
        assert torch.equal(restored.masks[n], masks.masks[n])
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_torch_prune_interop_round_trip():
    model = _model()
    keep = torch.rand(5, 4) > 0.5
    Masks(model, {"0.weight": keep}).to_torch_prune()
    assert hasattr(model[0], "weight_orig") and hasattr(model[0], "weight_mask")
    assert torch.equal(model[0].weight != 0, keep)
    imported = Masks.from_torch_prune(model)
    assert torch.equal(imported.masks["0.weight"], keep)
    assert not hasattr(model[0], "weight_orig"), "remove=True leaves a plain model"
    assert isinstance(model[0].weight, nn.Parameter)
    assert torch.equal(model[0].weight != 0, keep)
