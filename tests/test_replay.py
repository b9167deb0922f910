"""Replays steps of the APART authors' released code through our own jitted training step.

``tests/data/apart_release_steps.npz`` was recorded by ``experiments/record_release.py`` from
the release's unmodified ``train()`` (PyTorch, float64, PreAct-ResNet-18 at width 8): its
initial state, the examples and augmentation of every step, and its state after them. Our
step (``make_train_step``'s explicit-batch path, float64) must arrive at the same state.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from apart_jax.augment import Augmentation
from apart_jax.config import default_config
from apart_jax.data import to_device
from apart_jax.interop.torch_layout import from_state_dict, infer_architecture
from apart_jax.methods import apart, fgsm_plus
from apart_jax.models import create_model
from apart_jax.optim import cyclic_sgd
from apart_jax.parallel import data_mesh, replicated
from apart_jax.run import create_train_state
from apart_jax.state import StepContext
from apart_jax.step import AugmentSpec, Batch, make_train_step

RECORDING = os.path.join(os.path.dirname(__file__), "data", "apart_release_steps.npz")


@pytest.fixture(scope="module")
def recording():
    with np.load(RECORDING) as npz:
        arrays = dict(npz)
    arrays["meta"] = json.loads(str(arrays["meta"]))
    return arrays


def release_state(recording, prefix: str) -> dict[str, np.ndarray]:
    """The release's ``state_dict`` at ``prefix`` ("init" or "final") as our flat variables,
    in the recorded dtypes (float64 weights and statistics, float32 psi)."""
    state_dict = {
        k[len(prefix) + 1 :]: v for k, v in recording.items() if k.startswith(prefix + "/")
    }
    return from_state_dict(state_dict, infer_architecture(state_dict))


def replay(recording, dtype: str):
    """Our state after the recorded steps, every float in ``dtype`` ("float64" under x64)."""
    meta = recording["meta"]
    model = create_model("preact_resnet18", num_classes=10, width=meta["width"], dtype=dtype)
    cycle = meta["cycle_steps"]
    ctx = StepContext(
        apply_fn=model.apply,
        weight_tx=cyclic_sgd(meta["lr_max"], cycle, weight_decay=meta["weight_decay"]),
        psi_tx=cyclic_sgd(meta["psi_lr_max"], cycle, weight_decay=meta["psi_weight_decay"]),
        eps=meta["epsilon"],
        image_size=(32, 32),
        psi_in_weight_optimizer=True,
    )
    method = apart() if meta["layerwise"] else fgsm_plus()
    config = default_config()
    config.dtype = dtype
    variables = traverse_util.unflatten_dict(release_state(recording, "init"), sep="/")
    num_train, pad = meta["num_train"], meta["pad"]
    state = create_train_state(
        config,
        model,
        method,
        ctx,
        image_shape=(32, 32, 3),
        num_train=num_train,
        pad=pad,
        variables=variables,
    )
    rows = recording["omega_rows"]
    omega = state.omega.at[rows].set(jnp.asarray(recording["omega_init"], state.omega.dtype))
    state = state.replace(omega=omega)
    mesh = data_mesh()
    step = make_train_step(method, ctx, AugmentSpec(pad, meta["pad_value"], True), mesh)
    data = to_device(recording["images"], recording["labels"], replicated(mesh))
    for k in range(meta["steps"]):
        aug = Augmentation(jnp.asarray(recording["offsets"][k]), jnp.asarray(recording["flips"][k]))
        state, _ = step.on_batch(state, data, Batch(jnp.asarray(recording["indices"][k]), aug))
    ours = {
        "params": state.params,
        "batch_stats": state.batch_stats,
        "perturb": state.psi,
    }
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(ours, sep="/").items()}
    return flat, np.asarray(state.omega[rows])


def absolute_errors(ours: dict, theirs: dict, keys) -> dict[str, float]:
    """max |ours - theirs| per variable."""
    return {k: float(np.max(np.abs(ours[k] - theirs[k]))) for k in keys}


def relative_errors(ours: dict, theirs: dict, keys) -> dict[str, float]:
    """max |ours - theirs| / max |theirs| per variable."""
    absolute = absolute_errors(ours, theirs, keys)
    return {k: absolute[k] / max(float(np.max(np.abs(theirs[k]))), 1e-300) for k in keys}


@pytest.fixture(scope="module")
def float64_replay(recording):
    with jax.enable_x64(True):
        return replay(recording, "float64")


def test_the_recording_moved_every_weight(recording):
    before, after = release_state(recording, "init"), release_state(recording, "final")
    moved = relative_errors(before, after, [k for k in after if k.startswith("params/")])
    assert min(moved.values()) > 1e-4, moved  # the replay has something to agree on
    assert recording["omega_init"].dtype == np.float16
    assert not np.array_equal(recording["omega_final"], recording["omega_init"])


def test_float64_replay_agrees_with_the_release_to_1e_10(recording, float64_replay):
    ours, omega = float64_replay
    theirs = release_state(recording, "final")
    assert {v.dtype for k, v in ours.items()} == {np.dtype(np.float64)}
    tensors = [k for k in theirs if not k.startswith("perturb/")]
    # Measured (jax 0.10.2, torch 2.13.0, CPU) with 1 and 4 devices and 1 and 2 cores:
    # weights and BN statistics within 5.6309e-12 absolute (the runs differ from each other
    # by 5e-18); relative to each tensor's largest entry within 5.928e-10, the worst being
    # BN biases, which start at zero; Omega equal in all of them. All of it comes from the
    # release's float32 psi: recorded with psi in float64 too, the release agrees with this
    # step to 3e-14 relative. The bounds below leave a margin of about 17x.
    absolute = absolute_errors(ours, theirs, tensors)
    assert max(absolute.values()) < 1e-10, sorted(absolute.items(), key=lambda e: -e[1])[:3]
    relative = relative_errors(ours, theirs, tensors)
    assert max(relative.values()) < 1e-8, sorted(relative.items(), key=lambda e: -e[1])[:3]
    np.testing.assert_array_equal(omega, recording["omega_final"])  # measured: exact, always
    # psi: the release stores it in float32 (torch.FloatTensor), so each of its updates is
    # rounded to float32; ours stays float64. Three roundings of 2**-24 relative at most
    # (measured: 8.6e-8).
    psi = [k for k in theirs if k.startswith("perturb/")]
    assert {theirs[k].dtype for k in psi} == {np.dtype(np.float32)}
    psi_errors = relative_errors(ours, {k: theirs[k].astype(np.float64) for k in psi}, psi)
    assert max(psi_errors.values()) < recording["meta"]["steps"] * 2.0**-24, psi_errors


def test_float32_replay_is_measurably_further_from_the_release(recording, float64_replay):
    """The bounds above are not loose: the same replay in float32 misses them by far (measured:
    weights 5.2e-4 absolute, 3.0e-2 relative, 0.11% of Omega's entries a full sign step off)."""
    ours32, omega32 = replay(recording, "float32")
    theirs = release_state(recording, "final")
    tensors = [k for k in theirs if not k.startswith("perturb/")]
    assert max(absolute_errors(ours32, theirs, tensors).values()) > 1e-5
    assert max(relative_errors(ours32, theirs, tensors).values()) > 1e-3
    assert np.max(np.abs(omega32 - recording["omega_final"])) > 1.0
