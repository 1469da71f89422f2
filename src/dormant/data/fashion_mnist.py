"""Fashion-MNIST from IDX files, found locally or downloaded only when the user asks.

Search order: an explicit `root`, ``$DORMANT_DATA`` (and its ``fashion-mnist/``), the user data
directory (``$XDG_DATA_HOME/dormant/fashion-mnist``, default ``~/.local/share/...``), and
Debian's ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``).
Checksums are SHA-256 of the *decompressed* IDX bytes, so re-compressed copies (Debian's)
and the official archives both verify.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .base import DATASETS, CorruptDataError, DataNotFoundError, Dataset, Split, carve_val

# the dataset's own repository serves the archives over https (the S3 website endpoint named
# in its README speaks plain http only); every file is checked against its SHA-256 anyway
URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
MAX_IDX_BYTES = 200_000_000    # cap for IDX files of unknown size (a gzip bomb stops here)
FILES = {  # name -> (sha256 of decompressed bytes, expected decompressed size)
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")


def user_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "dormant" / "fashion-mnist"


def search_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    dirs = []
    if root:
        dirs += [Path(root), Path(root) / "fashion-mnist"]
    env = os.environ.get("DORMANT_DATA")
    if env:
        dirs += [Path(env), Path(env) / "fashion-mnist"]
    dirs += [user_data_dir(), Path("/usr/share/datasets/fashion-mnist")]
    return dirs


def _find(stem: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for cand in (d / (stem + ".gz"), d / stem):
            if cand.is_file():
                return cand
    return None


def read_idx(path: Path, sha256: str | None = None, size: int | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzipped), refusing truncated, malformed or altered files.
    Decompression stops past `size` bytes (the expected size; MAX_IDX_BYTES if unknown)."""
    limit = size if size is not None else MAX_IDX_BYTES
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read(limit + 1)
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise CorruptDataError(f"{path}: cannot decompress ({err}); delete it and fetch it again") from err
    if len(raw) > limit:
        raise CorruptDataError(f"{path}: decompresses to more than the expected {limit} bytes; "
                               "it is not this dataset's file. Delete it and fetch it again")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CorruptDataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise CorruptDataError(f"{path}: truncated or padded: {len(raw)} bytes, expected "
                               f"{header + int(np.prod(dims))} for shape {dims}")
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise CorruptDataError(f"{path}: checksum mismatch; the file is corrupt or not "
                               "Fashion-MNIST. Delete it and fetch it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def download(dest: str | os.PathLike | None = None, *, quiet: bool = False) -> Path:
    """Fetch the four archives from the official source into `dest` (default: the user data
    directory), verifying each checksum before it is moved into place. Needs network."""
    dest = Path(dest) if dest else user_data_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for stem, (sha, size) in FILES.items():
        target = dest / (stem + ".gz")
        if target.is_file():
            read_idx(target, sha, size)
            continue
        if not quiet:
            print(f"downloading {URL}{stem}.gz -> {target}")
        try:
            with urllib.request.urlopen(URL + stem + ".gz", timeout=60) as resp:
                data = resp.read(size + 1)     # a .gz is never larger than its contents here
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise DataNotFoundError(
                f"could not download {URL}{stem}.gz ({reason}). Check the network, or get "
                "the files another way: Debian's `apt-get install dataset-fashion-mnist`, or "
                f"copy the four .gz files into {dest}") from None
        with tempfile.NamedTemporaryFile(dir=dest, suffix=".gz", delete=False) as tmp:
            tmp.write(data)
        try:
            read_idx(Path(tmp.name), sha, size)
        except CorruptDataError:
            os.unlink(tmp.name)
            raise
        os.replace(tmp.name, target)
    return dest


def _missing_message(stem: str, dirs: list[Path]) -> str:
    where = "\n  ".join(str(d) for d in dirs)
    return (f"Fashion-MNIST file {stem}(.gz) not found. Looked in:\n  {where}\n"
            "Get it in one of these ways:\n"
            "  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist\n"
            "  - online: dormant download fashion-mnist   (verifies checksums)\n"
            "  - copy the four IDX files into a folder and set DORMANT_DATA to it\n"
            "Or use the built-in offline dataset: --dataset mnist1d")


@DATASETS.register("fashion-mnist")
def fashion_mnist(val_size: int | None = None, *, root: str | None = None,
                  download_if_missing: bool = False, train_size: int | None = None,
                  standardize: bool = True) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 28x28 grey images, 10 classes, 60k/10k.
    `train_size` keeps a fixed subset of the training split (quick runs, pilots).
    Pixels are standardised with the training set's mean and std (signed, about 60% of them
    negative); `standardize=False` keeps them in [0, 1], non-negative."""
    if not isinstance(standardize, bool):
        raise ValueError(f"standardize must be true or false, got {standardize!r}")
    if root is not None and not Path(root).is_dir():
        raise DataNotFoundError(f"root: {root} is not a folder; give the folder that holds "
                                "the four Fashion-MNIST IDX files")
    dirs = search_dirs(root)
    arrays = {}
    for stem, (sha, _) in FILES.items():
        path = _find(stem, dirs)
        if path is None and download_if_missing:
            download()
            path = _find(stem, dirs)
        if path is None:
            raise DataNotFoundError(_missing_message(stem, dirs))
        arrays[stem] = read_idx(path, sha, FILES[stem][1])
    def images(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a.copy()).float() / 255.0
        return ((x - MEAN) / STD if standardize else x).unsqueeze(1)
    x, y = images(arrays["train-images-idx3-ubyte"]), torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64))
    train, val = carve_val(x, y, 5000 if val_size is None else val_size)
    if train_size is not None:
        if not 0 < train_size <= len(train):
            raise ValueError(f"train_size must be in [1, {len(train)}], got {train_size}")
        train = Split(train.inputs[:train_size], train.targets[:train_size])
    test = Split(images(arrays["t10k-images-idx3-ubyte"]),
                 torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)))
    return Dataset("fashion-mnist", train, val, test, 10)
