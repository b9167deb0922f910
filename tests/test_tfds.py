"""TFDS datasets: reading prepared ArrayRecords, mocked datasets, one-line errors, the prepare
command. CPU only, no network: every dataset here is written by the test or mocked."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import sys
import time
import types

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from conftest import run_module, tiny_config
from tensorflow_datasets.testing import mocking

from apart_jax import data as data_lib
from apart_jax.data import DATASETS, DatasetError, load_dataset
from apart_jax.run import setup_run
from apart_jax.tfds_data import load_tfds
from apart_jax.trainer import train_and_evaluate

NUM_TRAIN, NUM_TEST = 30, 12


class FakeCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes a small 'cifar10' with CIFAR-10's features, without TensorFlow.

    Example i of a split has red channel ``i`` everywhere, random green and blue, and label
    ``i % 10``; preparation shuffles the stored order.
    """

    name = "cifar10"
    VERSION = tfds.core.Version("3.0.2")  # what TFDS's registered cifar10 builder reads

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(NUM_TRAIN, seed=0),
            "test": self._generate_examples(NUM_TEST, seed=1),
        }

    def _generate_examples(self, n, seed):
        rng = np.random.default_rng(seed)
        for i in range(n):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            image[..., 0] = i
            # A PIL image is stored as PNG as is; an array would need tf.image.encode_png.
            yield i, {"id": str(i), "image": PIL.Image.fromarray(image), "label": i % 10}


def write_fake_cifar10(data_dir) -> str:
    FakeCifar10(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return str(data_dir)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def no_network(monkeypatch):
    """Makes every connection and DNS lookup fail; returns the list of attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_prepared_array_records_are_read_as_uint8_nhwc(prepared_dir, no_network):
    data = load_tfds("cifar10", prepared_dir, progress=False)
    assert data.x_train.shape == (NUM_TRAIN, 32, 32, 3)
    assert data.x_test.shape == (NUM_TEST, 32, 32, 3)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int32
    assert data.num_classes == 10 and data.image_shape == (32, 32, 3)
    for x, y, n in ((data.x_train, data.y_train, NUM_TRAIN), (data.x_test, data.y_test, NUM_TEST)):
        index = x[:, 0, 0, 0].astype(int)
        assert sorted(index) == list(range(n))  # every example once, each image intact
        assert (x[..., 0] == index[:, None, None]).all()
        np.testing.assert_array_equal(y, index % 10)  # labels stay with their images
    assert data.x_train[..., 1:].std() > 50  # decoded pixels, not zeros
    assert not no_network


def test_tfds_sizes_read_a_prefix(prepared_dir):
    whole = load_dataset("cifar10", data_dir=prepared_dir, progress=False)
    small = load_dataset(
        "cifar10", data_dir=prepared_dir, train_size=7, test_size=3, progress=False
    )
    np.testing.assert_array_equal(small.x_train, whole.x_train[:7])
    np.testing.assert_array_equal(small.y_test, whole.y_test[:3])
    assert small.x_test.shape == (3, 32, 32, 3)
    with pytest.raises(DatasetError, match=f"train_size={NUM_TRAIN + 1} but cifar10 has 30"):
        load_dataset("cifar10", data_dir=prepared_dir, train_size=NUM_TRAIN + 1, progress=False)


def test_progress_bar_counts_the_images(prepared_dir, capsys):
    load_tfds("cifar10", prepared_dir, progress=True)
    err = capsys.readouterr().err
    assert f"cifar10 train:   0%|          | 0/{NUM_TRAIN}" in err
    assert f"cifar10 test:   0%|          | 0/{NUM_TEST}" in err
    load_tfds("cifar10", prepared_dir, progress=False)
    assert "img" not in capsys.readouterr().err


@pytest.fixture
def mock_tfds(monkeypatch):
    """``tfds.testing.mock_data`` with a working batched read.

    In tfds 4.9.10 the mock's ``ds[i]`` works but ``ds.__getitems__`` calls the unbound
    ``mocking._getitems`` without its ``self`` (TypeError); this serves the same examples.
    """

    def getitems(record_keys, generator, serialized=False):
        assert not serialized
        return [generator[k] for k in record_keys]

    monkeypatch.setattr(mocking, "_getitems", getitems)
    return tfds.testing.mock_data


@pytest.mark.parametrize(
    "name, shape",
    [
        ("cifar10", (32, 32, 3)),
        ("cifar100", (32, 32, 3)),
        ("svhn_cropped", (32, 32, 3)),
        ("mnist", (28, 28, 1)),
    ],
)
def test_mocked_tfds_datasets_load_with_their_shapes(mock_tfds, tmp_path, no_network, name, shape):
    with mock_tfds(num_examples=1500):  # more than one read chunk of 1024
        data = load_dataset(name, data_dir=str(tmp_path), progress=False)
        single = tfds.data_source(name, split="train", data_dir=str(tmp_path), download=False)
        first = single[0]
    info = DATASETS[name]
    assert data.x_train.shape == (1500, *shape) and data.x_test.shape == (1500, *shape)
    assert data.image_shape == info.image_shape == shape
    assert data.x_train.dtype == np.uint8 and data.y_test.dtype == np.int32
    assert data.num_classes == info.num_classes
    for y in (data.y_train, data.y_test):
        assert y.min() >= 0 and y.max() < info.num_classes
        assert len(np.unique(y)) > 1
    assert data.x_train.std() > 10 and not (data.x_train[0] == data.x_train[1]).all()
    # The batched read returns what ds[i] serves.
    np.testing.assert_array_equal(data.x_train[0], first["image"])
    assert data.y_train[0] == first["label"]
    assert not no_network


def test_mocked_sizes_crop(mock_tfds, tmp_path):
    with mock_tfds(num_examples=20):
        data = load_dataset(
            "mnist", data_dir=str(tmp_path), train_size=5, test_size=2, progress=False
        )
        with pytest.raises(DatasetError, match="test_size=21 but mnist has 20 test examples"):
            load_dataset("mnist", data_dir=str(tmp_path), test_size=21, progress=False)
    assert data.x_train.shape == (5, 28, 28, 1) and data.y_test.shape == (2,)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn_cropped", "mnist"])
def test_unprepared_dataset_fails_fast_without_network(tmp_path, no_network, name):
    empty = tmp_path / "empty"
    start = time.perf_counter()
    with pytest.raises(DatasetError) as info:
        load_dataset(name, data_dir=str(empty), progress=False)
    assert time.perf_counter() - start < 10.0
    message = str(info.value)
    assert f"python -m apart_jax.data prepare {name} --data_dir={empty}" in message
    assert "apart-jax[prepare]" in message and "\n" not in message
    assert not no_network
    assert not empty.exists()  # nothing written


def test_unprepared_in_the_default_dir_names_it(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", data_dir="", progress=False)
    message = str(info.value)
    assert f"not prepared in {tmp_path};" in message
    assert message.endswith(
        "prepare it once with: python -m apart_jax.data prepare cifar10 "
        "(needs pip install 'apart-jax[prepare]')"
    )


def test_records_that_are_not_array_record_say_so(prepared_dir, tmp_path):
    copy = shutil.copytree(prepared_dir, tmp_path / "tfrecord")
    info_path = copy / "cifar10" / "3.0.2" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"  # as `tfds build` writes by default
    info_path.write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="cannot be read as ArrayRecord") as error:
        load_tfds("cifar10", str(copy), progress=False)
    assert "--data_dir=NEW_DIR" in str(error.value) and "\n" not in str(error.value)


def test_gcs_without_gcsfs_says_what_to_install(monkeypatch, no_network):
    if importlib.util.find_spec("tensorflow"):
        pytest.skip("with TensorFlow, gs:// paths are read through tf.io.gfile, not gcsfs")
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` raises
    with pytest.raises(DatasetError, match="needs gcsfs: pip install gcsfs"):
        load_tfds("cifar10", "gs://no-such-bucket/tfds", progress=False)


def test_tfds_defaults_never_mirror_digits():
    for name, classes, shape in (
        ("cifar10", 10, (32, 32, 3)),
        ("cifar100", 100, (32, 32, 3)),
        ("svhn_cropped", 10, (32, 32, 3)),
        ("mnist", 10, (28, 28, 1)),
    ):
        info = DATASETS[name]
        assert (info.tfds_name, info.num_classes, info.image_shape) == (name, classes, shape)
        assert info.flip == name.startswith("cifar")
    assert DATASETS["cifar10"].pad == DATASETS["svhn_cropped"].pad == 4
    assert DATASETS["digits"].tfds_name is None and DATASETS["npz"].tfds_name is None


def test_non_tfds_names_are_refused():
    with pytest.raises(DatasetError, match=r"'digits' is not a TFDS dataset.*'svhn_cropped'"):
        load_tfds("digits", None)


def run_cli(*args):
    return run_module("apart_jax.data", *args, timeout=120)


def test_prepare_unknown_name_exits_2_with_one_line():
    result = run_cli("prepare", "nonsense")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: 'nonsense' is not a TFDS dataset; "
        "choose one of ['cifar10', 'cifar100', 'mnist', 'svhn_cropped']"
    ]
    assert result.stdout == ""


def test_prepare_without_tensorflow_exits_2_before_any_download(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` raises

    def no_builder(*args, **kwargs):
        raise AssertionError("tfds.builder must not be reached without TensorFlow")

    monkeypatch.setattr(tfds, "builder", no_builder)
    status = data_lib.main(["prepare", "cifar10", f"--data_dir={tmp_path}"])
    out = capsys.readouterr()
    assert status == 2 and out.out == ""
    assert out.err.splitlines() == [
        "error: preparing TFDS datasets needs TensorFlow: pip install 'apart-jax[prepare]'"
    ]


def test_prepare_writes_array_records_that_load(monkeypatch, tmp_path, capsys):
    # `import tensorflow` finds a stand-in, which leaves before anything is written (TFDS
    # would try to use it); the fake builder writes without TensorFlow.
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    calls = []

    class RecordingBuilder(FakeCifar10, skip_registration=True):
        name = "cifar10"

        def download_and_prepare(self, **kwargs):
            calls.append(kwargs)
            del sys.modules["tensorflow"]
            super().download_and_prepare(**kwargs)

    def builder(name, data_dir=None):
        calls.append((name, data_dir))
        return RecordingBuilder(data_dir=data_dir)

    monkeypatch.setattr(tfds, "builder", builder)
    manual = tmp_path / "manual"
    status = data_lib.main(
        ["prepare", "cifar10", f"--data_dir={tmp_path / 'd'}", f"--manual_dir={manual}"]
    )
    out = capsys.readouterr()
    assert status == 0, out.err
    assert calls[0] == ("cifar10", str(tmp_path / "d"))
    assert calls[1]["file_format"] == "array_record"
    assert str(calls[1]["download_config"].manual_dir) == str(manual)
    last = out.out.strip().splitlines()[-1]  # after TFDS's own progress lines
    assert last == f"prepared cifar10 in {tmp_path / 'd' / 'cifar10' / '3.0.2'}"
    monkeypatch.undo()
    assert len(load_tfds("cifar10", str(tmp_path / "d"), progress=False).y_train) == NUM_TRAIN


def test_training_reads_a_prepared_tfds_dataset(prepared_dir, no_network, tmp_path):
    config = tiny_config(
        dataset="cifar10", data_dir=prepared_dir, method="apart", batch_size=10, epochs=1
    )
    result = train_and_evaluate(config, str(tmp_path))
    assert result.last["step"] == NUM_TRAIN // 10 and result.last["eval_examples"] == NUM_TEST
    state = setup_run(config).state
    assert state.omega.shape == (NUM_TRAIN, 40, 40, 3)  # CIFAR-10's padding of 4
    assert not no_network
