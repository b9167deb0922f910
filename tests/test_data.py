"""Dataset sources: the embedded digits, npz files, and their one-line errors (TFDS: test_tfds)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_npz

from apart_jax.data import DATASETS, DatasetError, load_dataset, load_npz


def test_digits_are_real_uint8_images_split_per_class(digits):
    assert digits.x_train.shape == (1438, 8, 8, 1) and digits.x_test.shape == (359, 8, 8, 1)
    assert digits.x_train.dtype == np.uint8 and digits.y_train.dtype == np.int32
    assert digits.x_train.max() == 255 and digits.x_train.min() == 0
    assert digits.num_classes == 10
    counts = np.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.x_train, digits.x_train)


def test_dataset_sizes_keep_a_prefix(digits):
    small = load_dataset("digits", train_size=100, test_size=20)
    np.testing.assert_array_equal(small.x_train, digits.x_train[:100])
    assert len(small.y_test) == 20
    with pytest.raises(DatasetError, match="train_size=5000"):
        load_dataset("digits", train_size=5000)


def test_npz_round_trip(tmp_path):
    arrays = write_npz(tmp_path / "d.npz", y_train=np.arange(20) % 4, y_test=np.arange(8) % 4)
    data = load_dataset("npz", npz_path=str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(data.x_train, arrays["x_train"])
    assert data.y_train.dtype == np.int32 and data.num_classes == 4
    assert data.image_shape == (6, 6, 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(x_train=np.zeros((20, 6, 6, 3), np.float32)), "uint8"),
        (dict(y_test=-np.ones(8, int)), "outside"),
        (dict(x_test=np.zeros((8, 5, 5, 3), np.uint8)), "differ"),
        (dict(y_train=np.zeros(19, int)), "shape"),
        (dict(y_test=None), "lacks"),
    ],
)
def test_malformed_npz_gives_one_line_errors(tmp_path, overrides, message):
    write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DatasetError, match=message) as info:
        load_npz(str(tmp_path / "bad.npz"))
    assert "\n" not in str(info.value)


def test_unavailable_datasets_say_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    assert "\n" not in str(info.value)
    for name in DATASETS:  # every name, TFDS ones included
        assert repr(name) in str(info.value)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("npz", npz_path=str(tmp_path / "missing.npz"))
    with pytest.raises(DatasetError, match="npz_path"):
        load_dataset("npz")
