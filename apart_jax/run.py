"""What a run is built from its config: data, model, method, optimizers, the state before the
first step and the compiled step (:func:`setup_run`); and a trained model read back from a
run's checkpoint for inference alone (:func:`load_model`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from apart_jax.config import (
    REFERENCE_PSI_STEPS,
    ConfigError,
    omega_storage,
    read_run_config,
    validate_config,
)
from apart_jax.data import Dataset, DeviceData, load_dataset, load_test_split, to_device
from apart_jax.methods import OMEGA_DTYPES, Method, init_omega, init_psi, method_from_config
from apart_jax.models import PSI, cast_variables, create_model, init_variables, storage_dtype
from apart_jax.optim import cyclic_sgd
from apart_jax.parallel import data_mesh, padded_rows, replicated
from apart_jax.restore import open_checkpoints, restore_inference, saved_step
from apart_jax.state import StepContext, TrainState
from apart_jax.step import (
    INIT_STREAM,
    OMEGA_STREAM,
    STEP_STREAM,
    AugmentSpec,
    TrainStep,
    augment_spec,
    epoch_batch_sizes,
    make_train_step,
    state_shardings,
)

PyTree = Any


def build_context(
    config: ml_collections.ConfigDict,
    apply_fn: Callable[..., Any],
    image_size: tuple[int, int],
    steps_per_epoch: int,
) -> StepContext:
    """The step context of a run: optimizers and schedules from ``config``."""
    total_steps = config.epochs * steps_per_epoch
    cycle_steps = (config.schedule_epochs or config.epochs) * steps_per_epoch
    momentum = dict(momentum_max=config.momentum_max, momentum_min=config.momentum_min)
    return StepContext(
        apply_fn=apply_fn,
        weight_tx=cyclic_sgd(
            config.lr_max, cycle_steps, weight_decay=config.weight_decay, **momentum
        ),
        psi_tx=cyclic_sgd(
            config.psi_lr_max * psi_lr_scale(config, total_steps),
            cycle_steps,
            weight_decay=config.psi_weight_decay,
            **momentum,
        ),
        eps=config.eps,
        image_size=image_size,
        psi_in_weight_optimizer=config.psi_in_weight_optimizer,
        unroll=config.unroll,
    )


def psi_lr_scale(config: ml_collections.ConfigDict, total_steps: int) -> float:
    """The factor on psi's rate: ``psi_lr_scale``, times 11,730 / total steps if autoscaled."""
    auto = REFERENCE_PSI_STEPS / total_steps if config.psi_lr_autoscale else 1.0
    return config.psi_lr_scale * auto


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    method: Method,
    ctx: StepContext,
    *,
    image_shape: tuple[int, int, int],
    num_train: int,
    pad: int,
    omega_rows: int | None = None,
    variables: PyTree | None = None,
) -> TrainState:
    """The state before the first step, fully determined by ``config.seed``.

    ``omega_rows`` >= ``num_train`` pads Omega with unused rows (see
    :func:`apart_jax.parallel.padded_rows`). ``variables`` (``params``, ``batch_stats`` and
    ``perturb``, for example from :func:`apart_jax.models.load_variables`) replaces the
    random initialization; psi is then taken as given.
    """
    seed_key = jax.random.key(config.seed)
    if variables is None:
        variables = init_variables(model, jax.random.fold_in(seed_key, INIT_STREAM), image_shape)
        if method.learns_psi:
            variables[PSI] = init_psi(
                variables[PSI],
                alpha=config.alpha_init,
                alpha_omega=config.alpha_omega_init,
                layer_alpha=config.layer_alpha_init,
            )
    variables = cast_variables(variables, storage_dtype(config.dtype))
    psi = variables[PSI]
    learns_psi = method.learns_psi
    height, width, channels = image_shape
    omega = None
    if method.uses_omega:
        frame = (num_train, height + 2 * pad, width + 2 * pad, channels)
        omega = init_omega(
            jax.random.fold_in(seed_key, OMEGA_STREAM),
            frame,
            config.omega_init_std,
            rows=omega_rows,
            dtype=OMEGA_DTYPES[omega_storage(config.dtype, config.omega_dtype)],
        )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.fold_in(seed_key, STEP_STREAM),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        psi=psi,
        opt_state=ctx.weight_tx.init(variables["params"]),
        psi_opt_state=ctx.psi_tx.init(psi) if learns_psi else (),
        psi_decay_state=(
            ctx.weight_tx.init(psi) if learns_psi and ctx.psi_in_weight_optimizer else ()
        ),
        omega=omega,
    )


@dataclasses.dataclass
class Run:
    """Everything a run builds from its config before the first step.

    ``batch_sizes`` lists the batch size of each step of an epoch (the last one is smaller
    when the training set is not a multiple of the batch size, unless ``drop_remainder``).
    """

    config: ml_collections.ConfigDict
    dataset: Dataset
    augment: AugmentSpec
    mesh: Mesh
    model: nn.Module
    method: Method
    ctx: StepContext
    batch_sizes: list[int]
    state: TrainState
    data: DeviceData
    train_step: TrainStep

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batch_sizes)


def use_run_precision(config: ml_collections.ConfigDict) -> None:
    """Enables ``jax_enable_x64`` for this process when ``config.dtype`` is "float64" (before
    any array of the run exists); other dtypes leave JAX's setting as it is."""
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def run_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The model ``config`` names, with ``num_classes`` outputs."""
    return create_model(
        config.model,
        num_classes=num_classes,
        width=config.width,
        shortcut_input=config.shortcut_input,
        dtype=config.dtype,
    )


def run_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The dataset ``config`` names, in host memory (a bar per TFDS split if ``progress``)."""
    return load_dataset(
        config.dataset,
        npz_path=config.npz_path,
        data_dir=config.data_dir or None,
        train_size=config.train_size,
        test_size=config.test_size,
        progress=config.progress and jax.process_index() == 0,
        num_classes=config.num_classes,
    )


def run_test_split(
    config: ml_collections.ConfigDict, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The test split of the dataset ``config`` names, without its training split: images
    (M, H, W, C) uint8 and labels (M,) int32 in [0, ``num_classes``)."""
    return load_test_split(
        config.dataset,
        num_classes=num_classes,
        npz_path=config.npz_path,
        data_dir=config.data_dir or None,
        test_size=config.test_size,
        progress=config.progress and jax.process_index() == 0,
    )


def setup_run(
    config: ml_collections.ConfigDict, dataset: Dataset | None = None, mesh: Mesh | None = None
) -> Run:
    """Validates ``config``, loads the data (unless given) and builds model, method and state.

    ``mesh`` defaults to all devices of all processes (:func:`apart_jax.parallel.data_mesh`).

    Raises:
      ConfigError, DatasetError: invalid configuration or data, in one line.
    """
    validate_config(config)
    use_run_precision(config)
    if dataset is None:
        dataset = run_dataset(config)
    augment = augment_spec(config)
    mesh = mesh if mesh is not None else data_mesh()
    num_train, batch_size = len(dataset.y_train), config.batch_size
    if batch_size > num_train:
        raise ConfigError(
            f"batch_size={batch_size} is larger than the {num_train} training examples"
        )
    if batch_size % mesh.size:
        raise ConfigError(f"batch_size={batch_size} must be a multiple of the {mesh.size} devices")
    batch_sizes = epoch_batch_sizes(num_train, batch_size, config.drop_remainder)

    model = run_model(config, dataset.num_classes)
    method = method_from_config(config)
    ctx = build_context(config, model.apply, dataset.image_shape[:2], len(batch_sizes))
    create_state = functools.partial(
        create_train_state,
        config,
        model,
        method,
        ctx,
        image_shape=dataset.image_shape,
        num_train=num_train,
        pad=augment.pad,
        omega_rows=padded_rows(num_train, mesh),
    )
    # Built under jit so that every process of a multi-host run places its shards directly.
    state = jax.jit(create_state, out_shardings=state_shardings(mesh, method.uses_omega))()
    return Run(
        config=config,
        dataset=dataset,
        augment=augment,
        mesh=mesh,
        model=model,
        method=method,
        ctx=ctx,
        batch_sizes=batch_sizes,
        state=state,
        data=to_device(dataset.x_train, dataset.y_train, replicated(mesh)),
        train_step=make_train_step(
            method, ctx, augment, mesh, skip_nonfinite=config.skip_nonfinite
        ),
    )


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A run's model at one checkpoint, for inference.

    config: the run's config (its ``config.json``); model: the Flax module;
    variables: ``{"params", "batch_stats"}``, to apply with ``train=False``;
    psi: the ``perturb`` collection (alpha, alpha_omega, the block alphas);
    step: the checkpoint's step; num_train: the run's training examples;
    omega: Omega (N', Hp, Wp, C) as saved, rows N and beyond padding, if it was asked for
      and the method keeps one, else None.
    """

    config: ml_collections.ConfigDict
    model: nn.Module
    variables: dict[str, PyTree]
    psi: PyTree
    step: int
    num_train: int
    omega: jax.Array | None = None

    @property
    def steps_per_epoch(self) -> int:
        """The run's steps per epoch: ceil(N / batch), or floor with ``drop_remainder``."""
        c = self.config
        return len(epoch_batch_sizes(self.num_train, c.batch_size, c.drop_remainder))


def load_model(workdir: str, step: int | None = None, *, omega: bool = False) -> TrainedModel:
    """The model of the run in ``workdir`` at checkpoint ``step`` (default: the newest).

    Reads only the weights, BN statistics and psi (and Omega if ``omega``) from the
    checkpoint, onto the default device: no optimizer state, no training data.

    Raises:
      ConfigError: if ``workdir`` holds no config.json, or an invalid one.
      FileNotFoundError: if ``workdir`` holds no checkpoint, or none at ``step`` (the
        message lists the steps it holds).
    """
    config = read_run_config(workdir)
    validate_config(config)
    use_run_precision(config)
    with open_checkpoints(workdir) as checkpoints:
        step = saved_step(checkpoints, step)
        meta = checkpoints.read_meta(step)
        saved = restore_inference(checkpoints, step, omega=omega)
    num_classes = saved["params"]["head"]["bias"].shape[0]  # every model ends in "head"
    return TrainedModel(
        config=config,
        model=run_model(config, num_classes),
        variables={"params": saved["params"], "batch_stats": saved["batch_stats"]},
        psi=saved["psi"],
        step=step,
        num_train=meta["num_train"],
        omega=saved.get("omega"),
    )
