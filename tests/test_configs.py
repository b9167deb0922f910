"""Experiment configs: every preset validates, docstrings name their command, schedules.

No dataset is loaded: configs are only built, validated and parsed.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from apart_jax.config import default_config, validate_config
from apart_jax.data import DATASETS
from apart_jax.run import build_context
from tests.conftest import ROOT

CONFIG_DIR = os.path.join(ROOT, "experiments", "configs")
CONFIG_FILES = sorted(
    path
    for path in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
    if not os.path.basename(path).startswith("_")  # __init__.py
)
METHOD_PRESETS = {"fgsm", "fgsm_rs", "fgsm_plus", "apart", "pgd10", "nfgsm", "grad_align"}


def load(path: str):
    """Imports a config file by path, as ``--config=path`` does."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_path(name: str) -> str:
    return os.path.join(CONFIG_DIR, f"{name}.py")


def relative(path: str) -> str:
    return os.path.relpath(path, ROOT).replace(os.sep, "/")


# (file, preset): preset None for a module without PRESETS (one config, get_config()).
CASES = [
    (relative(path), preset)
    for path in CONFIG_FILES
    for preset in (sorted(getattr(load(path), "PRESETS", {})) or [None])
]


def test_every_config_file_is_found():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    expected = {"cifar10.py", "cifar10_200.py", "cifar100.py", "svhn.py", "cifar10_wrn.py"}
    assert expected | {"digits.py", "cifar10_subset.py"} <= names


@pytest.mark.parametrize("path,preset", CASES, ids=[f"{p}:{s}" for p, s in CASES])
def test_every_preset_validates_and_applies_its_keys(path, preset):
    module = load(os.path.join(ROOT, path))
    config = module.get_config() if preset is None else module.get_config(preset)
    validate_config(config)
    assert set(config.keys()) == set(default_config().keys())
    if preset is not None:
        for key, value in module.PRESETS[preset].items():
            assert config[key] == value, (preset, key)


@pytest.mark.parametrize("path", [relative(p) for p in CONFIG_FILES])
def test_default_config_is_one_of_the_presets(path):
    module = load(os.path.join(ROOT, path))
    config = module.get_config()
    validate_config(config)
    presets = getattr(module, "PRESETS", None)
    if presets is not None:
        assert any(config == module.get_config(p) for p in presets)


@pytest.mark.parametrize("path", [relative(p) for p in CONFIG_FILES])
def test_unknown_preset_names_the_choices(path):
    module = load(os.path.join(ROOT, path))
    if not hasattr(module, "PRESETS"):
        pytest.skip("a single config without presets")
    with pytest.raises(ValueError, match="no_such_preset") as error:
        module.get_config("no_such_preset")
    assert all(p in str(error.value) for p in module.PRESETS)


@pytest.mark.parametrize("path", [relative(p) for p in CONFIG_FILES])
def test_docstring_gives_command_runtime_and_result(path):
    module = load(os.path.join(ROOT, path))
    doc = module.__doc__ or ""
    headings = [r"Command", r"Expected runtime", r"Expected result"]
    found = [re.search(heading, doc) for heading in headings]
    assert all(found), [h for h, m in zip(headings, found, strict=True) if not m]
    assert [m.start() for m in found] == sorted(m.start() for m in found)
    assert f"--config={path}" in doc
    # Every config file and preset a command names exists; every overridden key too.
    for ref, preset in re.findall(r"--config=(experiments/configs/\w+\.py)(?::(\w+))?", doc):
        assert os.path.isfile(os.path.join(ROOT, ref)), ref
        if preset:
            assert preset in load(os.path.join(ROOT, ref)).PRESETS, (ref, preset)
    keys = set(default_config().keys())
    assert set(re.findall(r"--config\.(\w+)=", doc)) <= keys


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections'
def test_preset_and_overrides_parse_from_the_command_line():
    argv = ["train", f"--config={config_path('cifar10_200')}:pgd10", "--config.checkpoint_keep=5"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config file", flag_values=flag_values, sys_argv=argv
    )
    flag_values(argv)
    config = flag_values.config
    assert (config.method, config.pgd_steps, config.epochs) == ("pgd", 10, 200)
    assert config.checkpoint_keep == 5


def test_method_presets():
    for name in ("cifar10", "cifar100", "svhn", "cifar10_wrn"):
        assert set(load(config_path(name)).PRESETS) == METHOD_PRESETS, name
    assert set(load(config_path("cifar10_200")).PRESETS) == {"apart", "pgd10"}
    for name in ("cifar10", "cifar100", "svhn", "cifar10_wrn", "cifar10_200"):
        module = load(config_path(name))
        assert module.get_config().method == "apart"
        pgd = module.get_config("pgd10")
        assert (pgd.method, pgd.pgd_steps, pgd.pgd_step_size) == ("pgd", 10, 2 / 255)


def test_dataset_model_and_optimizer_choices():
    cifar10 = load(config_path("cifar10")).get_config()
    reference = default_config()
    assert cifar10.dataset == "npz" and cifar10.model == "preact_resnet18"
    assert (cifar10.epochs, cifar10.batch_size, cifar10.lr_max, cifar10.width) == (
        30,
        128,
        reference.lr_max,
        64,
    )
    assert load(config_path("cifar100")).get_config().dataset == "cifar100"
    assert DATASETS["cifar100"].num_classes == 100
    svhn = load(config_path("svhn")).get_config()
    assert svhn.dataset == "svhn_cropped" and svhn.lr_max == 0.05
    assert svhn.flip is False and DATASETS["svhn_cropped"].flip is False
    wrn = load(config_path("cifar10_wrn")).get_config("pgd10")
    assert (wrn.model, wrn.width) == ("wide_resnet34_10", 160)
    long = load(config_path("cifar10_200")).get_config()
    assert (long.epochs, long.schedule_epochs) == (200, 30)
    assert (long.checkpoint_every, long.checkpoint_keep) == (0, 200)


def rate_at(tx, count: int) -> float:
    """The learning rate an ``apart_jax.optim.cyclic_sgd`` applies at update ``count``."""
    params = {"w": jnp.zeros(())}
    # Every int32 leaf of the state is a step counter (of the chain and of each schedule).
    state = jax.tree.map(
        lambda x: jnp.full_like(x, count) if x.dtype == jnp.int32 else x, tx.init(params)
    )
    _, new_state = tx.update({"w": jnp.zeros(())}, state, params)
    return float(new_state[1].hyperparams["learning_rate"])


def test_200_epoch_schedule_repeats_the_30_epoch_triangle():
    config = load(config_path("cifar10_200")).get_config("apart")
    steps_per_epoch = math.ceil(50_000 / config.batch_size)  # 391, drop_remainder False
    ctx = build_context(config, None, (32, 32), steps_per_epoch)
    lr = lambda epoch: rate_at(ctx.weight_tx, round(epoch * steps_per_epoch))  # noqa: E731
    for epoch in (0, 30, 60, 90, 120, 150, 180):
        assert lr(epoch) == pytest.approx(0.0, abs=1e-6), epoch
    for epoch in (15, 45, 75, 195):
        assert lr(epoch) == pytest.approx(config.lr_max, rel=1e-5), epoch
    np.testing.assert_allclose(lr(7.5), config.lr_max / 2, rtol=1e-3)  # step 2932.5 rounded
    np.testing.assert_allclose(lr(37.5), config.lr_max / 2, rtol=1e-3)
    # 200 = 6 x 30 + 20: the run stops two thirds into a seventh cycle, on the way down.
    np.testing.assert_allclose(lr(200), config.lr_max * 2 / 3, rtol=1e-4)
    # psi's rate follows the same repeated triangle.
    psi = lambda epoch: rate_at(ctx.psi_tx, round(epoch * steps_per_epoch))  # noqa: E731
    assert psi(60) == pytest.approx(0.0, abs=1e-15)
    assert psi(45) == pytest.approx(config.psi_lr_max, rel=1e-5)
