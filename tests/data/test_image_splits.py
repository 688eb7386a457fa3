"""The recipes' one image loader: shapes, the three scalings, subsets (digits, offline)."""

import torch

from bilevel.data import load_dataset
from bilevel.data.image_splits import image_splits


def test_shapes_resize_and_order():
    out, info = image_splits("digits", splits=("train", "test"), side=12, scale="symmetric")
    assert list(out) == ["train", "test"]
    raw = load_dataset("digits")
    assert out["train"][0].shape == (len(raw.train.y), 1, 12, 12)
    assert torch.equal(out["test"][1], raw.test.y)
    assert info["num_classes"] == 10


def test_symmetric_is_two_x_minus_one_of_the_pixels():
    out, _ = image_splits("digits", splits=("val",), scale="symmetric")
    x = load_dataset("digits").val.x.view(-1, 1, 8, 8)
    assert torch.equal(out["val"][0], 2 * x - 1)
    # digits has no published constants, so "dataset" falls back to the same
    assert torch.equal(image_splits("digits", splits=("val",))[0]["val"][0], out["val"][0])


def test_standard_uses_train_statistics_for_every_split():
    out, _ = image_splits("digits", splits=("train", "test"), scale="standard")
    xtr, xte = out["train"][0], out["test"][0]
    assert abs(float(xtr.mean())) < 1e-5 and abs(float(xtr.std()) - 1) < 1e-5
    raw = load_dataset("digits")
    m, s = float(raw.train.x.mean()), float(raw.train.x.std())
    torch.testing.assert_close(xte, (raw.test.x.view(-1, 1, 8, 8) - m) / s)


def test_sizes_draw_reproducible_subsets_that_depend_on_the_seed():
    a, _ = image_splits("digits", sizes={"train": 50, "val": None}, splits=("train", "val"))
    b, _ = image_splits("digits", sizes={"train": 50, "val": None}, splits=("train", "val"))
    c, _ = image_splits("digits", sizes={"train": 50}, splits=("train",), split_seed=1)
    assert a["train"][0].shape[0] == 50 and torch.equal(a["train"][0], b["train"][0])
    assert a["val"][0].shape[0] == len(load_dataset("digits").val.y)
    assert not torch.equal(a["train"][1], c["train"][1])
