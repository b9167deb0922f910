"""Dataset sources: the embedded digits, any local ``npz`` file, TFDS datasets, and defaults.

Every source yields a :class:`Dataset` of uint8 images (N, H, W, C) and int32 labels,
validated once on the host. Training copies it to the devices (:func:`to_device`) and
augments on the device (:mod:`apart_jax.augment`).

TFDS datasets (CIFAR-10/100, SVHN, MNIST) are read from ArrayRecord files without
TensorFlow; they are prepared once, with TensorFlow, by::

    python -m apart_jax.data prepare cifar10 [--data_dir=DIR] [--manual_dir=DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


class DatasetError(ValueError):
    """A dataset is unavailable or malformed; the message says what to do, in one line."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Per-dataset defaults.

    num_classes: number of labels (None: inferred from the labels, for ``npz``).
    pad: padding in pixels on each side before the random crop (4 for 32x32 CIFAR).
    flip: whether random horizontal flips are used.
    pad_value: the value in [0, 1] that pads the frame (0.5, grey, as in the release).
    tfds_name: the TensorFlow Datasets name the data is read from (None: not from TFDS).
    image_shape: (H, W, C) of every image (None: whatever the source holds).
    """

    num_classes: int | None
    pad: int
    flip: bool
    pad_value: float = 0.5
    tfds_name: str | None = None
    image_shape: tuple[int, int, int] | None = None


DATASETS: dict[str, DatasetInfo] = {
    # scikit-learn's 8x8 handwritten digits, shipped with the package: no network needed.
    # Mirroring changes what a digit is, so no flips; one pixel of padding (offsets 0..2).
    "digits": DatasetInfo(num_classes=10, pad=1, flip=False),
    # Any local file with x_train, y_train, x_test, y_test; CIFAR-style augmentation.
    "npz": DatasetInfo(num_classes=None, pad=4, flip=True),
    # The release's setting for 32x32 natural images: 4 pixels of grey padding, flips.
    "cifar10": DatasetInfo(
        num_classes=10, pad=4, flip=True, tfds_name="cifar10", image_shape=(32, 32, 3)
    ),
    "cifar100": DatasetInfo(
        num_classes=100, pad=4, flip=True, tfds_name="cifar100", image_shape=(32, 32, 3)
    ),
    # House-number digits: crops as for CIFAR, but mirroring changes what a digit is.
    "svhn_cropped": DatasetInfo(
        num_classes=10, pad=4, flip=False, tfds_name="svhn_cropped", image_shape=(32, 32, 3)
    ),
    # MNIST digits are size-normalised into a 20x20 box centred in the 28x28 frame, so shifts
    # of up to 2 pixels (offsets 0..4) never cut a stroke; the padding is black, like the
    # background (grey would draw a frame never seen at test time); no flips. The MNIST
    # recipes of Madry et al. and Wong et al. train without augmentation: --config.pad=0.
    "mnist": DatasetInfo(
        num_classes=10,
        pad=2,
        flip=False,
        pad_value=0.0,
        tfds_name="mnist",
        image_shape=(28, 28, 1),
    ),
}

# Records per ``__getitems__`` call: batched ArrayRecord reads (decoded with PIL) are about
# 1.7x faster than one ``source[i]`` each (11,000 vs 6,400 32x32 images/s on 2 CPU cores).
_READ_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset in host memory.

    x_train: (N, H, W, C) uint8; y_train: (N,) int32 in [0, num_classes);
    x_test: (M, H, W, C) uint8; y_test: (M,) int32.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


class DeviceData(NamedTuple):
    """Training arrays on the device(s): images (N, H, W, C) uint8 and labels (N,) int32."""

    images: jax.Array
    labels: jax.Array


def _validate_split(name: str, split: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    if x.dtype != np.uint8:
        raise DatasetError(f"{name}: x_{split} must be uint8 images in [0, 255], got {x.dtype}")
    if x.ndim != 4:
        raise DatasetError(f"{name}: x_{split} must have shape (N, H, W, C), got {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DatasetError(f"{name}: y_{split} must have shape ({len(x)},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{name}: y_{split} must hold integer labels, got {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(
            f"{name}: y_{split} has labels in [{y.min()}, {y.max()}], outside [0, {num_classes})"
        )


def make_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int | None = None,
) -> Dataset:
    """Validates arrays and builds a :class:`Dataset` (labels cast to int32).

    ``num_classes`` defaults to ``max label + 1`` over both splits.

    Raises:
      DatasetError: on wrong dtypes, shapes or label ranges, in one line.
    """
    if num_classes is None:
        num_classes = int(max(np.max(y_train), np.max(y_test))) + 1
    _validate_split(name, "train", x_train, y_train, num_classes)
    _validate_split(name, "test", x_test, y_test, num_classes)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(
            f"{name}: train images {x_train.shape[1:]} and test images {x_test.shape[1:]} differ"
        )
    return Dataset(
        name,
        x_train,
        y_train.astype(np.int32),
        x_test,
        y_test.astype(np.int32),
        num_classes,
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 real 8x8 grey-scale digits, split train/test per class.

    Pixel values 0..16 are mapped to uint8 0..255; images have shape (8, 8, 1). The split
    is stratified and fixed by ``seed`` (1,437 train and 360 test images by default).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: int(round(test_fraction * len(members)))]] = True
    train_order = rng.permutation(np.flatnonzero(~test))
    test_order = rng.permutation(np.flatnonzero(test))
    return make_dataset(
        "digits",
        images[train_order],
        labels[train_order],
        images[test_order],
        labels[test_order],
        num_classes=10,
    )


def load_npz(path: str, num_classes: int | None = None) -> Dataset:
    """Loads ``x_train, y_train, x_test, y_test`` (uint8 NHWC, integer labels) from an npz."""
    if not path:
        raise DatasetError("dataset 'npz' needs a file: pass --config.npz_path=FILE.npz")
    if not os.path.isfile(path):
        raise DatasetError(f"npz file not found: {path}")
    with np.load(path) as f:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
        if missing:
            raise DatasetError(f"{path} lacks {missing}; it needs x_train, y_train, x_test, y_test")
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    return make_dataset(os.path.basename(path), **arrays, num_classes=num_classes)


def tfds_datasets() -> list[str]:
    """The names in :data:`DATASETS` that are read from TFDS, sorted."""
    return sorted(name for name, info in DATASETS.items() if info.tfds_name is not None)


def _tfds_info(name: str) -> DatasetInfo:
    info = DATASETS.get(name)
    if info is None or info.tfds_name is None:
        raise DatasetError(f"{name!r} is not a TFDS dataset; choose one of {tfds_datasets()}")
    return info


def _prepare_command(name: str, data_dir: str | None) -> str:
    flag = f" --data_dir={data_dir}" if data_dir else ""
    return f"python -m apart_jax.data prepare {name}{flag}"


def _check_size(name: str, split: str, size: int, total: int) -> None:
    if size < 0 or size > total:
        raise DatasetError(f"{split}_size={size} but {name} has {total} {split} examples")


def _open_error(tfds: Any, name: str, data_dir: str | None, error: Exception) -> DatasetError:
    """Turns what ``tfds.data_source`` raised (KeyError, NotImplementedError, ...) into one line.

    tfds raises ``NotImplementedError`` ("... file format FileFormat.TFRECORD is not
    supported") for a dataset missing from an explicit ``data_dir``, ``KeyError`` ("splits
    is empty") for one missing from the default directory, and ``ImportError`` for gs://
    paths without gcsfs. Whether the dataset is prepared tells the first two causes apart.
    """
    if isinstance(error, ImportError) and "gcsfs" in str(error):
        return DatasetError(f"reading {data_dir} without TensorFlow needs gcsfs: pip install gcsfs")
    try:
        builder = tfds.builder(_tfds_info(name).tfds_name, data_dir=data_dir)
        prepared, where = builder.is_prepared(), os.fspath(builder.data_dir_root)
    except Exception:  # any failure here means "not readable as prepared"
        prepared, where = False, data_dir or "the default TFDS data directory"
    if not prepared:
        return DatasetError(
            f"dataset {name!r} is not prepared in {where}; prepare it once with: "
            f"{_prepare_command(name, data_dir)} (needs pip install 'apart-jax[prepare]')"
        )
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return DatasetError(
        f"dataset {name!r} in {builder.data_dir} cannot be read as ArrayRecord ({lines[0]}); "
        f"prepare it into an empty directory with: {_prepare_command(name, 'NEW_DIR')}"
    )


def _open_tfds(name: str, data_dir: str | None) -> tuple[Any, Any]:
    """Opens the prepared train and test splits of ``name`` as random-access data sources.

    Never downloads: a missing dataset fails in well under a second, without network.
    """
    import tensorflow_datasets as tfds

    try:
        train, test = tfds.data_source(
            _tfds_info(name).tfds_name, split=["train", "test"], data_dir=data_dir, download=False
        )
    except Exception as error:  # tfds raises many types; see _open_error
        raise _open_error(tfds, name, data_dir, error) from error
    return train, test


def _read_split(source: Any, count: int, desc: str, progress: bool) -> tuple[np.ndarray, ...]:
    """Reads the first ``count`` records {'image': (H, W, C) uint8, 'label': int} of a source.

    Returns images (count, H, W, C) uint8 and labels (count,) int32, reading ``_READ_CHUNK``
    records per ``source.__getitems__`` call.
    """
    shape = tuple(source.dataset_info.features["image"].shape)
    images = np.empty((count, *shape), np.uint8)
    labels = np.empty(count, np.int32)
    with tqdm(total=count, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, count, _READ_CHUNK):
            keys = list(range(start, min(count, start + _READ_CHUNK)))
            records = source.__getitems__(keys)
            for i, record in zip(keys, records, strict=True):
                images[i] = record["image"]
                labels[i] = record["label"]
            bar.update(len(keys))
    return images, labels


def load_tfds(
    name: str,
    data_dir: str | None = None,
    *,
    progress: bool = True,
    train_size: int = 0,
    test_size: int = 0,
) -> Dataset:
    """Reads a prepared TFDS dataset (ArrayRecord, no TensorFlow) into host memory.

    ``name`` is a key of :data:`DATASETS` with a ``tfds_name``; ``data_dir`` is a local
    path or a bucket (gs://...; reading one needs gcsfs), or None for TFDS's default
    (``$TFDS_DATA_DIR`` or ~/tensorflow_datasets). Only the first ``train_size`` /
    ``test_size`` records are read (0: the whole split). Images come back as uint8
    (N, H, W, C) in [0, 255], labels as int32 in [0, num_classes). ``progress`` shows a
    bar per split (CIFAR-10's 60,000 images take seconds to decode).

    Raises:
      DatasetError: in one line, within a second and without network, if the dataset is
        not prepared in ``data_dir`` (naming ``python -m apart_jax.data prepare NAME``),
        cannot be read, or is smaller than a requested size.
    """
    info = _tfds_info(name)
    train, test = _open_tfds(name, data_dir)
    arrays = []
    for split, source, size in (("train", train, train_size), ("test", test, test_size)):
        _check_size(name, split, size, len(source))
        shape = tuple(source.dataset_info.features["image"].shape)
        if info.image_shape is not None and shape != info.image_shape:
            raise DatasetError(f"{name}: {split} images have shape {shape}, not {info.image_shape}")
        arrays += _read_split(source, size or len(source), f"{name} {split}", progress)
    return make_dataset(name, *arrays, num_classes=info.num_classes)


def load_dataset(
    name: str,
    *,
    npz_path: str = "",
    data_dir: str | None = None,
    train_size: int = 0,
    test_size: int = 0,
    progress: bool = True,
    num_classes: int | None = None,
) -> Dataset:
    """Loads a dataset by name, keeping its first ``train_size`` / ``test_size`` examples.

    A size of 0 keeps the whole split. ``num_classes`` is the label count of an ``npz``
    (None: its largest label + 1); the other datasets know theirs. TFDS datasets are read
    from ``data_dir`` (see :func:`load_tfds`; "" or None is TFDS's default) with a progress
    bar unless ``progress`` is False.

    Raises:
      DatasetError: for an unknown name, a missing file or unprepared dataset, malformed
        arrays or a size larger than the split.
    """
    info = DATASETS.get(name)
    if name == "digits":
        data = load_digits()
    elif name == "npz":
        data = load_npz(npz_path, num_classes)
    elif info is not None and info.tfds_name is not None:
        return load_tfds(
            name, data_dir or None, progress=progress, train_size=train_size, test_size=test_size
        )
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    _check_size(name, "train", train_size, len(data.y_train))
    _check_size(name, "test", test_size, len(data.y_test))
    if train_size or test_size:
        data = dataclasses.replace(
            data,
            x_train=data.x_train[: train_size or None],
            y_train=data.y_train[: train_size or None],
            x_test=data.x_test[: test_size or None],
            y_test=data.y_test[: test_size or None],
        )
    return data


def prepare_tfds(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> str:
    """Writes ``name`` as ArrayRecord under ``data_dir``, downloading it or reading ``manual_dir``.

    ``manual_dir`` holds the official archives (e.g. cifar-10-binary.tar.gz) for offline
    machines; ``data_dir`` None is TFDS's default. Returns the prepared dataset's folder.
    Needs TensorFlow (``pip install 'apart-jax[prepare]'``); a dataset already prepared
    there is reused. The result is opened once to check that :func:`load_tfds` can read it.

    Raises:
      DatasetError: in one line, for a name without a TFDS source, missing TensorFlow
        (before any download) or a result that cannot be read.
    """
    info = _tfds_info(name)
    try:
        import tensorflow  # noqa: F401 - TFDS's CIFAR, SVHN and MNIST builders read with tf.io
    except ImportError:
        raise DatasetError(
            "preparing TFDS datasets needs TensorFlow: pip install 'apart-jax[prepare]'"
        ) from None
    import tensorflow_datasets as tfds

    builder = tfds.builder(info.tfds_name, data_dir=data_dir)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
    )
    _open_tfds(name, data_dir)
    return os.fspath(builder.data_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m apart_jax.data prepare NAME [--data_dir=DIR] [--manual_dir=DIR]``.

    Returns the exit status: 0, or 2 after one line on stderr for a DatasetError.
    """
    parser = argparse.ArgumentParser(
        prog="python -m apart_jax.data", description="Prepare TFDS datasets for apart-jax."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare",
        help="download (or read from --manual_dir) and write a dataset as ArrayRecord",
    )
    prepare.add_argument("name", help=f"one of {tfds_datasets()}")
    prepare.add_argument("--data_dir", default=None, help="TFDS data directory or gs:// bucket")
    prepare.add_argument(
        "--manual_dir", default=None, help="folder holding the official archives (offline)"
    )
    args = parser.parse_args(argv)
    try:
        path = prepare_tfds(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"prepared {args.name} in {path}")
    return 0


def to_device(images: np.ndarray, labels: np.ndarray, sharding=None) -> DeviceData:
    """Copies uint8 images and int32 labels to the device(s) (replicated under ``sharding``)."""
    return DeviceData(
        jax.device_put(np.asarray(images, np.uint8), sharding),
        jax.device_put(np.asarray(labels, np.int32), sharding),
    )


def to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 images in [0, 255] -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


if __name__ == "__main__":
    sys.exit(main())
