"""The generic training step builder, the training state's creation, evaluation and the epoch loop.

Data flows one way::

    Dataset (host, uint8) -> DeviceData (device) -> gather + pad + crop/flip (in the step)
      -> method.step (FGSM / FGSM-RS / FGSM+ / APART / PGD-K) -> TrainState
      -> clean and PGD-20 accuracy every ``eval_every`` epochs -> metrics.jsonl, checkpoint

One step builder serves every method: :func:`make_train_step` wraps ``method.step`` with
the batch gathering and augmentation and jit-compiles it over the device mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm.auto import tqdm

from apart_jax.attacks import pgd
from apart_jax.augment import Augmentation, crop_and_flip, draw_augmentation, pad_images
from apart_jax.checkpoint import RunCheckpoints, checkpoint_dir
from apart_jax.config import (
    CONFIG_FILE,
    REFERENCE_PSI_STEPS,
    ConfigError,
    config_as_json,
    resume_conflicts,
    validate_config,
)
from apart_jax.data import DATASETS, Dataset, DeviceData, load_dataset, to_device, to_unit_range
from apart_jax.logbook import MetricsLog
from apart_jax.methods import OMEGA_DTYPES, Method, create_method, init_omega, init_psi
from apart_jax.models import PSI, create_model, init_variables
from apart_jax.optim import cyclic_sgd
from apart_jax.parallel import batch_sharded, data_mesh, padded_rows, replicated, shard_batch
from apart_jax.runguard import StopRequest, TrainingInterrupted, workdir_lock
from apart_jax.state import StepContext, StepInputs, TrainState

PyTree = Any
Metrics = dict[str, jax.Array]

_INIT_STREAM, _OMEGA_STREAM, _STEP_STREAM, _ORDER_STREAM, _EVAL_STREAM = range(5)


class Batch(NamedTuple):
    """Which examples a step trains on and how they are augmented.

    indices: (B,) int32 training-set indices; aug: their crop offsets and flip bits.
    """

    indices: jax.Array
    aug: Augmentation


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """Padding in pixels per side, the pad value in [0, 1], and whether to flip."""

    pad: int
    pad_value: float
    flip: bool


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the step ``state.step`` (augmentation and method noise derive from it)."""
    return jax.random.fold_in(state.rng, state.step)


def draw_batch(
    state: TrainState, order: jax.Array, start: jax.Array, batch_size: int, augment: AugmentSpec
) -> Batch:
    """The batch at position ``start`` of the epoch's ``order`` (N,), with a fresh augmentation."""
    indices = jax.lax.dynamic_slice(order, (start,), (batch_size,))
    aug_key = jax.random.fold_in(step_key(state), 0)
    return Batch(indices, draw_augmentation(aug_key, batch_size, augment.pad, augment.flip))


def gather_batch(
    data: DeviceData, batch: Batch, augment: AugmentSpec
) -> tuple[jax.Array, jax.Array]:
    """Gathers the batch's images and applies its augmentation: (B, H, W, C) in [0, 1], (B,)."""
    images = to_unit_range(data.images[batch.indices])
    frames = pad_images(images, augment.pad, augment.pad_value)
    return crop_and_flip(frames, batch.aug, images.shape[1:3]), data.labels[batch.indices]


class TrainStep(NamedTuple):
    """The jit-compiled training step of one method, in two call forms sharing one body.

    on_batch(state, data, batch) -> (state, metrics): trains on an explicit :class:`Batch`
      (indices, crop offsets, flip bits), to replay another implementation step for step.
    in_epoch(state, data, order, start, batch_size) -> (state, metrics): draws the batch at
      ``start`` of ``order`` and its augmentation inside the step; ``batch_size`` is static.

    Both donate the incoming state; ``in_epoch(s, d, o, i, b)`` equals
    ``on_batch(s, d, draw_batch(s, o, i, b, augment))``.
    """

    on_batch: Callable[..., tuple[TrainState, Metrics]]
    in_epoch: Callable[..., tuple[TrainState, Metrics]]


def state_shardings(mesh: Mesh, uses_omega: bool) -> TrainState:
    """Where a :class:`TrainState` lives: Omega split by rows over the mesh, the rest replicated.

    Returns a prefix tree of shardings (one per field) for ``jit``'s ``out_shardings``.
    """
    everywhere = replicated(mesh)
    fields = {f.name: everywhere for f in dataclasses.fields(TrainState)}
    return TrainState(**{**fields, "omega": batch_sharded(mesh) if uses_omega else None})


def nonfinite_code(loss: jax.Array, state: TrainState) -> jax.Array:
    """0 if the step's loss and the new state are finite, else 1 + the index in
    :data:`NONFINITE_QUANTITIES` of the first quantity that is not (int32 scalar).

    Omega is not scanned (a pass over all of it per step would cost more than the check is
    worth); a non-finite Omega row makes the loss of the next step that reads it non-finite.
    """
    checks = [jnp.isfinite(loss)] + [
        jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))
        if jax.tree.leaves(tree)
        else jnp.bool_(True)
        for tree in (state.params, state.psi, state.batch_stats)
    ]
    failed = ~jnp.stack(checks)
    return jnp.where(jnp.any(failed), jnp.argmax(failed) + 1, 0).astype(jnp.int32)


def make_train_step(
    method: Method,
    ctx: StepContext,
    augment: AugmentSpec,
    mesh: Mesh,
    *,
    skip_nonfinite: bool = False,
) -> TrainStep:
    """Builds the data-parallel training step of ``method`` over ``mesh``.

    The state keeps its shardings (:func:`state_shardings`); the metrics are replicated and
    include ``nonfinite`` (:func:`nonfinite_code`). With ``skip_nonfinite`` a step whose
    code is not 0 is discarded: the state only counts the step, and its loss and accuracy
    are reported as 0.
    """

    def on_batch(state: TrainState, data: DeviceData, batch: Batch):
        x, y = shard_batch(gather_batch(data, batch, augment), mesh)
        key = jax.random.fold_in(step_key(state), 1)
        inputs = StepInputs(x, y, batch.indices, batch.aug, key)
        new_state, metrics = method.step(ctx, state, inputs)
        code = nonfinite_code(metrics["loss"], new_state)
        if skip_nonfinite:
            new_state = jax.lax.cond(
                code > 0, lambda: state.replace(step=state.step + 1), lambda: new_state
            )
            metrics = {k: jnp.where(code > 0, jnp.zeros_like(v), v) for k, v in metrics.items()}
        return new_state, {**metrics, "nonfinite": code}

    def in_epoch(state: TrainState, data: DeviceData, order, start, batch_size: int):
        return on_batch(state, data, draw_batch(state, order, start, batch_size, augment))

    jit = dict(
        donate_argnums=0,
        out_shardings=(state_shardings(mesh, method.uses_omega), replicated(mesh)),
    )
    return TrainStep(
        jax.jit(on_batch, **jit),
        jax.jit(in_epoch, static_argnames="batch_size", **jit),
    )


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
    model,
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
        variables = init_variables(model, jax.random.fold_in(seed_key, _INIT_STREAM), image_shape)
        if method.learns_psi:
            variables[PSI] = init_psi(
                variables[PSI],
                alpha=config.alpha_init,
                alpha_omega=config.alpha_omega_init,
                layer_alpha=config.layer_alpha_init,
            )
    psi = variables[PSI]
    learns_psi = method.learns_psi
    height, width, channels = image_shape
    omega = None
    if method.uses_omega:
        frame = (num_train, height + 2 * pad, width + 2 * pad, channels)
        omega = init_omega(
            jax.random.fold_in(seed_key, _OMEGA_STREAM),
            frame,
            config.omega_init_std,
            rows=omega_rows,
            dtype=OMEGA_DTYPES[config.omega_dtype],
        )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.fold_in(seed_key, _STEP_STREAM),
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


def epoch_order(seed: int, epoch: int, num_train: int) -> jax.Array:
    """The permutation (N,) int32 of training examples for ``epoch`` (1-based)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _ORDER_STREAM), epoch)
    return jax.random.permutation(key, num_train).astype(jnp.int32)


class EvalData(NamedTuple):
    """Test images (M', H, W, C) uint8, labels (M',) and a mask (M',) of real examples.

    M' is M rounded up to a whole number of evaluation batches; padding is masked out.
    """

    images: jax.Array
    labels: jax.Array
    mask: jax.Array


def make_eval_data(x: np.ndarray, y: np.ndarray, batch_size: int, sharding) -> EvalData:
    """Pads the test split to a multiple of ``batch_size`` and copies it to the device(s)."""
    total = math.ceil(len(y) / batch_size) * batch_size
    extra = total - len(y)
    mask = np.concatenate([np.ones(len(y), bool), np.zeros(extra, bool)])
    images = np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)])
    labels = np.concatenate([y, np.zeros(extra, y.dtype)])
    device = to_device(images, labels, sharding)
    return EvalData(device.images, device.labels, jax.device_put(mask, sharding))


def make_eval_step(
    apply_fn: Callable[..., Any],
    *,
    eps: float,
    step_size: float,
    steps: int,
    unroll: bool | None,
    mesh: Mesh,
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """A jitted ``(params, batch_stats, images, labels, mask, key) -> (clean, robust)`` counter.

    BN runs in inference mode. ``clean`` counts correct predictions on the masked batch;
    ``robust`` counts examples correct both clean and under PGD (one uniform random start).
    """

    def eval_batch(params, batch_stats, images, labels, mask, key):
        x, y, mask = shard_batch((to_unit_range(images), labels, mask), mesh)

        def logits_fn(x):
            return apply_fn({"params": params, "batch_stats": batch_stats}, x, train=False)

        clean = jnp.argmax(logits_fn(x), -1) == y
        x_adv = pgd(logits_fn, x, y, key, eps=eps, step_size=step_size, steps=steps, unroll=unroll)
        robust = clean & (jnp.argmax(logits_fn(x_adv), -1) == y)
        return jnp.sum(clean & mask), jnp.sum(robust & mask)

    return jax.jit(eval_batch)


def evaluate(
    eval_step, state: TrainState, test: EvalData, batch_size: int, key: jax.Array
) -> dict[str, float]:
    """Clean and PGD accuracy of ``state``'s model over the test split, in [0, 1]."""
    clean = robust = 0
    for i, start in enumerate(range(0, len(test.labels), batch_size)):
        part = (a[start : start + batch_size] for a in test)
        c, r = eval_step(state.params, state.batch_stats, *part, jax.random.fold_in(key, i))
        clean, robust = clean + c, robust + r
    total = int(jnp.sum(test.mask))
    return {"clean_acc": int(clean) / total, "pgd20_acc": int(robust) / total}


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
    model: Any
    method: Method
    ctx: StepContext
    batch_sizes: list[int]
    state: TrainState
    data: DeviceData
    train_step: TrainStep

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batch_sizes)


def setup_run(
    config: ml_collections.ConfigDict, dataset: Dataset | None = None, mesh: Mesh | None = None
) -> Run:
    """Validates ``config``, loads the data (unless given) and builds model, method and state.

    ``mesh`` defaults to all devices of all processes (:func:`apart_jax.parallel.data_mesh`).

    Raises:
      ConfigError, DatasetError: invalid configuration or data, in one line.
    """
    validate_config(config)
    if dataset is None:
        dataset = load_dataset(
            config.dataset,
            npz_path=config.npz_path,
            data_dir=config.data_dir or None,
            train_size=config.train_size,
            test_size=config.test_size,
            progress=config.progress and jax.process_index() == 0,
            num_classes=config.num_classes,
        )
    info = DATASETS[config.dataset]
    augment = AugmentSpec(
        pad=info.pad if config.pad is None else config.pad,
        pad_value=info.pad_value if config.pad_value is None else config.pad_value,
        flip=info.flip if config.flip is None else config.flip,
    )
    mesh = mesh if mesh is not None else data_mesh()
    num_train, batch_size = len(dataset.y_train), config.batch_size
    if batch_size > num_train:
        raise ConfigError(
            f"batch_size={batch_size} is larger than the {num_train} training examples"
        )
    if batch_size % mesh.size:
        raise ConfigError(f"batch_size={batch_size} must be a multiple of the {mesh.size} devices")
    batch_sizes = [batch_size] * (num_train // batch_size)
    if num_train % batch_size and not config.drop_remainder:
        batch_sizes.append(num_train % batch_size)

    model = create_model(
        config.model,
        num_classes=dataset.num_classes,
        width=config.width,
        shortcut_input=config.shortcut_input,
        dtype=config.dtype,
    )
    method = create_method(
        config.method,
        eps=config.eps,
        fgsm_rs_step_scale=config.fgsm_rs_step_scale,
        pgd_steps=config.pgd_steps,
        pgd_step_size=config.pgd_step_size,
    )
    ctx = build_context(config, model.apply, dataset.image_shape[:2], len(batch_sizes))
    everywhere = replicated(mesh)
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
        data=to_device(dataset.x_train, dataset.y_train, everywhere),
        train_step=make_train_step(
            method, ctx, augment, mesh, skip_nonfinite=config.skip_nonfinite
        ),
    )


@dataclasses.dataclass
class RunResult:
    """What a finished run reports: the last evaluation row and where its outputs went.

    ``resumed_from`` is the checkpoint step the run continued from (None: a fresh start).
    """

    method: str
    label: str
    passes_per_step: int
    last: dict[str, Any]
    metrics_path: str
    checkpoint_path: str | None
    compile_seconds: float
    resumed_from: int | None = None


class EpochTotals(NamedTuple):
    """Running sums over the current epoch: training loss and correct predictions (f32 scalars).

    Each step adds its batch mean times its batch size; dividing by the examples seen
    gives the epoch means logged as ``train_loss`` and ``train_acc``.
    """

    loss_sum: jax.Array
    correct_sum: jax.Array


NONFINITE_QUANTITIES = ("loss", "weights", "psi", "BN statistics")


class StepHealth(NamedTuple):
    """What went non-finite since the run (re)started; int32 scalars on the device.

    bad_step: the first step (1-based, as checkpoints count) whose loss or new state was
      not finite, -1 if none; bad_code: its :func:`nonfinite_code`; skipped: steps discarded
      under ``skip_nonfinite``. Not checkpointed: a checkpoint is never written after a
      non-finite step unless it was skipped.
    """

    bad_step: jax.Array
    bad_code: jax.Array
    skipped: jax.Array


def healthy(sharding: jax.sharding.Sharding) -> StepHealth:
    """A :class:`StepHealth` with nothing bad yet, placed with ``sharding``."""
    put = functools.partial(jax.device_put, device=sharding)
    return StepHealth(put(np.int32(-1)), put(np.int32(0)), put(np.int32(0)))


def record_health(health: StepHealth, code: jax.Array, step: jax.Array) -> StepHealth:
    """``health`` after a step numbered ``step`` (1-based) whose non-finite code is ``code``."""
    first = (health.bad_step < 0) & (code > 0)
    return StepHealth(
        jnp.where(first, step, health.bad_step),
        jnp.where(first, code, health.bad_code),
        health.skipped + (code > 0),
    )


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or state; the message names the step and quantity."""


def check_health(health: StepHealth, skip_nonfinite: bool, newest_checkpoint: str | None) -> None:
    """Raises :class:`NonFiniteError` if a step was not finite and was not skipped."""
    if skip_nonfinite:
        return
    bad_step, code = (int(v) for v in jax.device_get((health.bad_step, health.bad_code)))
    if bad_step < 0:
        return
    kept = (
        f"the newest checkpoint, {newest_checkpoint}, was saved before it"
        if newest_checkpoint
        else "no checkpoint was saved before it"
    )
    raise NonFiniteError(
        f"non-finite {NONFINITE_QUANTITIES[code - 1]} at step {bad_step}; stopped without "
        f"saving it ({kept}): lower lr_max, or rerun with --config.skip_nonfinite=True to "
        "skip such batches"
    )


def zero_totals(mesh: Mesh) -> EpochTotals:
    zero = jax.device_put(np.zeros((), np.float32), replicated(mesh))
    return EpochTotals(zero, zero)


def _host_psi(method: Method, psi: PyTree) -> dict[str, Any]:
    summary = jax.device_get(method.psi_summary(psi))
    return {k: np.asarray(v).tolist() for k, v in summary.items()}


def checkpoint_meta(config: ml_collections.ConfigDict, run: Run, train_seconds: float) -> dict:
    """The JSON stored with every checkpoint: the config and what restoring needs to know."""
    return {
        "config": config_as_json(config),
        "num_train": len(run.dataset.y_train),
        "omega_rows": None if run.state.omega is None else int(run.state.omega.shape[0]),
        "train_seconds": train_seconds,
    }


def restore_run_state(
    checkpoints: RunCheckpoints, step: int, run: Run, meta: dict[str, Any]
) -> tuple[TrainState, EpochTotals]:
    """Restores checkpoint ``step`` onto ``run``'s state shardings.

    Omega's rows are padded to a multiple of the device count; a checkpoint written on a
    different number of devices is restored with its own padding and re-padded here.
    """
    template, totals = run.state, zero_totals(run.mesh)
    saved_rows = meta["omega_rows"]
    if template.omega is None or saved_rows == template.omega.shape[0]:
        restored = checkpoints.restore(step, state=template, totals=totals)
        return restored["state"], restored["totals"]
    mesh, num_train = run.mesh, meta["num_train"]
    sharding = batch_sharded(mesh) if saved_rows % mesh.size == 0 else replicated(mesh)
    omega = jax.ShapeDtypeStruct(
        (saved_rows, *template.omega.shape[1:]), template.omega.dtype, sharding=sharding
    )
    restored = checkpoints.restore(step, state=template.replace(omega=omega), totals=totals)
    state = restored["state"]

    def repad(omega: jax.Array) -> jax.Array:
        rows = template.omega.shape[0] - num_train
        return jnp.pad(omega[:num_train], [(0, rows)] + [(0, 0)] * (omega.ndim - 1))

    omega = jax.jit(repad, out_shardings=batch_sharded(mesh))(state.omega)
    return state.replace(omega=omega), restored["totals"]


def restore_checkpoint(workdir: str, run: Run, step: int | None = None) -> TrainState:
    """The training state of ``workdir``'s checkpoint ``step`` (default: the newest).

    The state is placed on ``run``'s devices.

    Raises:
      FileNotFoundError: if ``workdir`` holds no checkpoint, or none at ``step`` (the
        message lists the steps it holds).
    """
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
    with RunCheckpoints(workdir) as checkpoints:
        steps = checkpoints.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(
                f"no checkpoint at step {step} in {checkpoint_dir(workdir)} (it holds {steps})"
            )
        state, _ = restore_run_state(checkpoints, step, run, checkpoints.read_meta(step))
    return state


def device_order(seed: int, epoch: int, num_train: int, mesh: Mesh) -> jax.Array:
    """:func:`epoch_order` placed on every device of ``mesh`` (one host round trip per epoch)."""
    return jax.device_put(np.asarray(epoch_order(seed, epoch, num_train)), replicated(mesh))


def compile_epoch_steps(run: Run, state: TrainState) -> dict[int, Callable]:
    """The run's ``in_epoch`` step compiled ahead of time for each batch size of an epoch."""
    order = device_order(run.config.seed, 1, len(run.dataset.y_train), run.mesh)
    return {
        size: run.train_step.in_epoch.lower(
            state, run.data, order, np.int32(0), batch_size=size
        ).compile()
        for size in sorted(set(run.batch_sizes))
    }


def train_epoch(
    steps: dict[int, Callable],
    state: TrainState,
    totals: EpochTotals,
    data: DeviceData,
    order: jax.Array,
    batch_sizes: list[int],
    first: int = 0,
    after_step: Callable[[int, TrainState, EpochTotals, StepHealth], None] | None = None,
    health: StepHealth | None = None,
) -> tuple[TrainState, EpochTotals, StepHealth]:
    """Trains on the epoch's batches ``first``, ``first + 1``, ... in ``order``.

    ``steps`` maps each batch size to its compiled step (:func:`compile_epoch_steps`).
    Nothing is read back from the devices here: the steps are dispatched asynchronously and
    ``after_step(i, state, totals, health)`` (progress, checkpoints) decides what to wait
    for. ``health`` (default: none bad yet) accumulates non-finite steps.
    """
    starts = np.cumsum([0, *batch_sizes])
    if health is None:
        health = healthy(totals.loss_sum.sharding)
    for i in range(first, len(batch_sizes)):
        size = batch_sizes[i]
        state, metrics = steps[size](state, data, order, np.int32(starts[i]))
        totals = EpochTotals(
            totals.loss_sum + metrics["loss"] * size,
            totals.correct_sum + metrics["accuracy"] * size,
        )
        health = record_health(health, metrics["nonfinite"], state.step)
        if after_step is not None:
            after_step(i, state, totals, health)
    return state, totals, health


def restore_resume_point(
    checkpoints: RunCheckpoints | None, run: Run
) -> tuple[int | None, dict[str, Any], TrainState, EpochTotals]:
    """The newest checkpoint of the workdir that restores: ``(step, meta, state, totals)``.

    A checkpoint that cannot be read (truncated or missing files, a partial write) is moved
    to ``checkpoints.unreadable/`` with a warning and the next newest is tried; with none
    left the run starts afresh: ``(None, {}, run.state, zero totals)``.

    Raises:
      ConfigError: if a readable checkpoint belongs to a run with a different configuration.
    """
    for step in reversed([] if checkpoints is None else checkpoints.steps()):
        try:
            meta = checkpoints.read_meta(step)
            saved_config = meta["config"]
        except Exception as error:  # any failure to read means this checkpoint is unusable
            _set_aside(checkpoints, step, error)
            continue
        conflicts = resume_conflicts(saved_config, run.config)
        if conflicts:
            raise ConfigError(
                f"{checkpoints.path(step)} was written by a different run "
                f"({'; '.join(conflicts)}): use another --workdir, or delete its checkpoints "
                "to start over"
            )
        try:
            state, totals = restore_run_state(checkpoints, step, run, meta)
        except Exception as error:  # as above
            _set_aside(checkpoints, step, error)
            continue
        return step, meta, state, totals
    return None, {}, run.state, zero_totals(run.mesh)


def _set_aside(checkpoints: RunCheckpoints, step: int, error: Exception) -> None:
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    path = checkpoints.path(step)
    moved = checkpoints.set_aside(step)
    logging.warning(
        "checkpoint %s cannot be restored (%s: %s); moved to %s, trying the next newest",
        path,
        type(error).__name__,
        reason,
        moved,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, dataset: Dataset | None = None
) -> RunResult:
    """Trains one method as configured, evaluating every ``eval_every`` epochs.

    Writes ``WORKDIR/config.json``, ``WORKDIR/metrics.jsonl`` (one JSON object per
    evaluation), TensorBoard events and, if ``config.checkpoint``, Orbax checkpoints every
    ``checkpoint_every`` steps (0: every epoch) and at the end. If ``WORKDIR`` already
    holds a checkpoint of the same configuration, the run resumes from the newest one and
    ends with the same weights and metrics as an uninterrupted run (timings aside).

    Args:
      config: see :func:`apart_jax.config.default_config`.
      workdir: output directory (created).
      dataset: use this dataset instead of loading ``config.dataset``.

    SIGTERM or SIGINT (preemption, Ctrl-C) ends the current step, writes a checkpoint and
    raises :class:`apart_jax.runguard.TrainingInterrupted`; rerunning resumes from it.

    Raises:
      ConfigError, DatasetError: invalid configuration or data, a workdir holding a
        different run, or a workdir in use by another run, before training starts.
      TrainingInterrupted: on SIGTERM or SIGINT, after the checkpoint is written.
    """
    run = setup_run(config, dataset)
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            stack.enter_context(workdir_lock(workdir))
        stop = stack.enter_context(StopRequest())
        checkpoints = None
        if run.config.checkpoint:
            checkpoints = RunCheckpoints(workdir, max_to_keep=run.config.checkpoint_keep)
            stack.enter_context(checkpoints)
        return _train_run(run, workdir, stop, checkpoints)


def _train_run(
    run: Run, workdir: str, stop: StopRequest, checkpoints: RunCheckpoints | None
) -> RunResult:
    """The body of :func:`train_and_evaluate` once the run is built and the workdir locked."""
    config = run.config
    method, mesh, dataset, batch_sizes = run.method, run.mesh, run.dataset, run.batch_sizes
    data, num_train = run.data, len(run.dataset.y_train)
    lead = jax.process_index() == 0
    everywhere = replicated(mesh)
    resume_step, meta, state, totals = restore_resume_point(checkpoints, run)
    health = healthy(everywhere)
    train_seconds = meta.get("train_seconds", 0.0)

    eval_batch_size = math.ceil(min(config.eval_batch_size, len(dataset.y_test)) / mesh.size)
    eval_batch_size *= mesh.size
    test = make_eval_data(dataset.x_test, dataset.y_test, eval_batch_size, everywhere)
    eval_step = make_eval_step(
        run.model.apply,
        eps=config.eval_eps,
        step_size=config.eval_pgd_step_size,
        steps=config.eval_pgd_steps,
        unroll=config.unroll,
        mesh=mesh,
    )
    eval_key = jax.random.fold_in(jax.random.key(config.seed), _EVAL_STREAM)

    if lead:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    compile_start = time.perf_counter()
    compiled = compile_epoch_steps(run, state)
    compile_seconds = time.perf_counter() - compile_start

    steps_per_epoch = run.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    starts = np.cumsum([0, *batch_sizes])
    step = resume_step or 0
    checkpoint_path = None if resume_step is None else checkpoints.path(resume_step)

    def save(
        step: int, state: TrainState, totals: EpochTotals, health: StepHealth, seconds: float
    ) -> None:
        nonlocal checkpoint_path
        check_health(health, config.skip_nonfinite, checkpoint_path)
        if checkpoints is not None and step != resume_step:
            meta = checkpoint_meta(config, run, seconds)
            checkpoint_path = checkpoints.save(step, state, totals, meta)

    def raise_interrupted(step: int) -> None:
        if checkpoints is not None:
            checkpoints.wait()
        raise TrainingInterrupted(stop.signum, step, checkpoint_path)

    def due(step: int) -> bool:
        every = config.checkpoint_every
        return step == total_steps or (every > 0 and step % every == 0)

    def report_step(
        bar: tqdm,
        epoch: int,
        i: int,
        state: TrainState,
        totals: EpochTotals,
        health: StepHealth,
        *,
        clock_origin,
    ) -> None:
        """After step ``i`` of ``epoch``: the progress bar, and a checkpoint when one is due."""
        bar.update(1)
        if (i + 1) % config.log_every == 0 or i + 1 == steps_per_epoch:
            check_health(health, config.skip_nonfinite, checkpoint_path)
            seen = starts[i + 1]
            bar.set_postfix(
                loss=f"{float(totals.loss_sum) / seen:.3f}",
                acc=f"{float(totals.correct_sum) / seen:.3f}",
            )
        step = (epoch - 1) * steps_per_epoch + i + 1
        if (due(step) or stop.signum is not None) and i + 1 < steps_per_epoch:
            save(step, state, totals, health, time.perf_counter() - clock_origin)
        if stop.signum is not None:
            raise_interrupted(step)

    log = MetricsLog(workdir, resume_step=resume_step, tensorboard=config.tensorboard, enabled=lead)
    with log:
        for epoch in range(step // steps_per_epoch + 1, config.epochs + 1):
            first = step - (epoch - 1) * steps_per_epoch
            if first == 0:
                totals = zero_totals(mesh)
            epoch_start = time.perf_counter()
            order = device_order(config.seed, epoch, num_train, mesh)
            bar = tqdm(
                total=steps_per_epoch,
                initial=first,
                desc=f"{method.label} {epoch}/{config.epochs}",
                unit="step",
                disable=not (config.progress and lead),
            )
            with bar:
                after_step = functools.partial(
                    report_step, bar, epoch, clock_origin=epoch_start - train_seconds
                )
                state, totals, health = train_epoch(
                    compiled, state, totals, data, order, batch_sizes, first, after_step, health
                )
                check_health(health, config.skip_nonfinite, checkpoint_path)
                step = epoch * steps_per_epoch
                jax.block_until_ready(state)
                train_seconds += time.perf_counter() - epoch_start
                if epoch % config.eval_every == 0 or epoch == config.epochs:
                    eval_start = time.perf_counter()
                    accuracies = evaluate(eval_step, state, test, eval_batch_size, eval_key)
                    row = {
                        "epoch": epoch,
                        "step": step,
                        "method": method.name,
                        "train_loss": float(totals.loss_sum) / int(starts[-1]),
                        "train_acc": float(totals.correct_sum) / int(starts[-1]),
                        **accuracies,
                        "train_seconds": train_seconds,
                        "eval_seconds": time.perf_counter() - eval_start,
                        "eval_examples": len(dataset.y_test),
                    }
                    if method.learns_psi:
                        row["psi"] = _host_psi(method, state.psi)
                    if config.skip_nonfinite:
                        row["skipped_steps"] = int(health.skipped)
                    log.write(row)
                    bar.set_postfix(
                        clean=f"{row['clean_acc']:.3f}", pgd20=f"{row['pgd20_acc']:.3f}"
                    )
                if config.checkpoint_every == 0 or due(step) or stop.signum is not None:
                    save(step, state, totals, health, train_seconds)
                if stop.signum is not None:
                    raise_interrupted(step)
    if checkpoints is not None:
        checkpoints.wait()
    return RunResult(
        method=method.name,
        label=method.label,
        passes_per_step=method.passes_per_step,
        last=log.rows[-1] if log.rows else {},
        metrics_path=log.path,
        checkpoint_path=checkpoint_path,
        compile_seconds=compile_seconds,
        resumed_from=resume_step,
    )
