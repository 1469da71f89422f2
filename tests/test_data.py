import gzip

import numpy as np
import pytest
import torch

from dormant.data import CorruptDataError, DataNotFoundError, batches, load_dataset
from dormant.data import fashion_mnist as fm
from dormant.registry import UnknownNameError


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_read_idx_plain_and_gzip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx(arr)))
    assert np.array_equal(fm.read_idx(tmp_path / "a"), arr)
    assert np.array_equal(fm.read_idx(tmp_path / "a.gz"), arr)


@pytest.mark.parametrize("damage,match", [
    (lambda b: b[:-5], "truncated"),
    (lambda b: b"\x01" + b[1:], "magic"),
    (lambda b: gzip.compress(b)[:-8], "decompress"),
])
def test_read_idx_refuses_corrupt_files(tmp_path, damage, match):
    raw = _idx(np.zeros((3, 4), dtype=np.uint8))
    bad = damage(raw)
    path = tmp_path / ("x.gz" if match == "decompress" else "x")
    path.write_bytes(bad)
    with pytest.raises(CorruptDataError, match=match):
        fm.read_idx(path)


def test_checksum_mismatch_is_refused(tmp_path):
    (tmp_path / "x").write_bytes(_idx(np.ones((2, 2), dtype=np.uint8)))
    with pytest.raises(CorruptDataError, match="checksum"):
        fm.read_idx(tmp_path / "x", sha256="0" * 64)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DORMANT_DATA", str(tmp_path))
    monkeypatch.setattr(fm, "search_dirs", lambda root=None: [tmp_path])
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fashion-mnist")
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "dormant download" in msg


def test_fashion_mnist_from_dormant_data_dir(tmp_path, monkeypatch):
    """A fake but well-formed copy is refused by checksum: nothing unverified gets in."""
    for stem in fm.FILES:
        shape = (10, 28, 28) if "images" in stem else (10,)
        (tmp_path / stem).write_bytes(_idx(np.zeros(shape, dtype=np.uint8)))
    monkeypatch.setenv("DORMANT_DATA", str(tmp_path))
    with pytest.raises(CorruptDataError, match="checksum"):
        load_dataset("fashion-mnist")


def test_search_order():
    dirs = fm.search_dirs("/some/root")
    assert dirs[0].as_posix() == "/some/root"
    assert dirs[-1].as_posix() == "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(fm._find("train-images-idx3-ubyte", fm.search_dirs()) is None,
                    reason="Fashion-MNIST not installed")
@pytest.mark.slow
def test_real_fashion_mnist():
    d = load_dataset("fashion-mnist")
    assert (len(d.train), len(d.val), len(d.test)) == (55000, 5000, 10000)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert abs(d.train.inputs.mean().item()) < 0.05
    assert torch.bincount(d.test.targets).tolist() == [1000] * 10
    unit = load_dataset("fashion-mnist", standardize=False)
    assert unit.train.inputs.min().item() == 0.0 and unit.train.inputs.max().item() == 1.0
    assert torch.allclose((unit.test.inputs - fm.MEAN) / fm.STD, d.test.inputs, atol=1e-5)
    with pytest.raises(ValueError, match="standardize"):
        load_dataset("fashion-mnist", standardize="no")


def test_mnist1d_is_deterministic_and_balanced():
    a, b = load_dataset("mnist1d"), load_dataset("mnist1d")
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert a.input_shape == (40,) and (len(a.train), len(a.val), len(a.test)) == (7000, 1000, 2000)
    counts = torch.bincount(a.train.targets, minlength=10)
    assert counts.min() > 500
    c = load_dataset("mnist1d", seed=1)
    assert not torch.equal(a.train.inputs, c.train.inputs)


def test_val_split_is_fixed_and_disjoint():
    d = load_dataset("synthetic", val_size=100)
    assert len(d.val) == 100 and len(d.train) == 2048 - 100
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("synthetic", val_size=5000)


def test_batches_cover_the_split_once():
    d = load_dataset("synthetic")
    seen = torch.cat([y for _, y in batches(d.train, 100, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))])
    assert torch.equal(seen.sort().values, d.train.targets.sort().values)


def test_unknown_dataset_lists_valid_ones():
    with pytest.raises(UnknownNameError, match="valid datasets: fashion-mnist, mnist1d"):
        load_dataset("cifar-1000")
