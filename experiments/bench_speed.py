"""Training speed of every method against PGD-10 and plain training, measured side by side.

    python -m experiments.bench_speed [--width=16 --batch_size=128 --dtype=float32 \
        --steps=20 --reference=torch --release=PATH/TO/APART --json=bench.json]

For each of clean, fgsm, fgsm_rs, fgsm_plus, apart, nfgsm, grad_align and pgd10 (same model,
batch and dtype, one process): the compile time, then ``--steps`` training steps after
``--warmup``, each timed to completion on the device; median, minimum and maximum step
time, images per second, forward+backward passes per step, and the ratios to pgd10 and to
clean. Also:

* pass costs: ``t_train`` (one plain training step, the clean method's median) and ``t_in``
  (one input-gradient pass: forward and backward to the input only, BN in training mode),
  with the floors they imply: apart >= t_in + t_train, pgd10 >= 10 t_in + t_train;
* one whole training epoch of apart and pgd10 on an in-memory dataset of
  ``--epoch_examples`` images through the trainer's own epoch loop (batch gathering,
  augmentation and Omega's gather and scatter included), against the sum of the same
  epoch's steps timed one by one;
* one PGD-20 evaluation pass over ``--eval_points`` test points;
* the XLA-counted FLOPs of each step and, where the device's peak is known (or
  ``--peak_tflops`` is given), the model FLOP utilization;
* with ``--reference=torch`` (CPU only, float32, needs the ``torch`` extra): the same model,
  width and batch in PyTorch eager in the same process (:mod:`experiments.torch_reference`),
  its training step and input-gradient pass, and our ``t_train`` and ``t_in`` as ratios to them;
* with ``--release=PATH`` (CPU only, float32, needs the ``torch`` extra and a checkout of the
  authors' APART release): the release's own APART training step at the same width and batch
  in the same process (:mod:`experiments.release_reference`), and our apart step's ratio to it.

Images are random uint8 arrays of CIFAR-10's shape (:mod:`experiments.synthetic`).
``--json PATH`` writes every number (schema in docs/benchmarks.md).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags

from apart_jax.compiling import jit
from apart_jax.config import default_config
from apart_jax.data import to_unit_range
from apart_jax.epoch import compile_epoch_steps, train_epoch
from apart_jax.evaluation import evaluate, make_eval_data, make_eval_step
from apart_jax.interop.torch_layout import architecture_of
from apart_jax.methods.base import input_gradient
from apart_jax.models import COMPUTE_DTYPES, MODELS
from apart_jax.parallel import batch_sharded, data_mesh, replicated
from apart_jax.run import Run, setup_run
from apart_jax.state import zero_totals
from apart_jax.step import device_order
from experiments.bench_report import print_report, step_summary
from experiments.cli import parse_flags_or_exit, quiet_logging
from experiments.release_reference import release_step_times
from experiments.synthetic import synthetic_cifar

METHODS = ("clean", "fgsm", "fgsm_rs", "fgsm_plus", "apart", "nfgsm", "grad_align", "pgd10")
# Dense bf16 peak of one device in TFLOP/s, by jax's device_kind, for the MFU estimate.
PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H200": 989.0, "TPU v4": 275.0}

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", list(METHODS), "Methods to time (pgd10 is PGD with 10 steps).")
flags.DEFINE_enum("model", "preact_resnet18", sorted(MODELS), "Model.")
flags.DEFINE_integer("width", 16, "Model width (64: the paper's PreAct-ResNet-18).")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_enum("dtype", "float32", sorted(COMPUTE_DTYPES), "Computation dtype.")
flags.DEFINE_integer("devices", 0, "Devices to spread the batch over (0: all).")
flags.DEFINE_integer("steps", 20, "Timed steps per method.")
flags.DEFINE_integer("warmup", 3, "Untimed steps before timing (after compilation).")
flags.DEFINE_integer("epoch_examples", 2560, "Examples of the timed epoch (0: skip it).")
flags.DEFINE_integer("eval_points", 512, "Test points of the timed PGD-20 pass (0: skip it).")
flags.DEFINE_enum(
    "unroll", None, ["true", "false"], "Unroll attack loops (default: the backend's choice)."
)
flags.DEFINE_enum(
    "reference", "none", ["none", "torch"], "Also time PyTorch eager (CPU, float32) in this run."
)
flags.DEFINE_string(
    "release", None, "Checkout of LiyuanLucasLiu/APART: also time its APART step (CPU, float32)."
)
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device, for the MFU estimate.")
flags.DEFINE_string("json", None, "Write all results to this JSON file.")


def bench_config(method: str, num_train: int) -> ml_collections.ConfigDict:
    """The default config with the benchmark's model, batch and dtype; pgd10 is PGD-10."""
    config = default_config()
    config.dataset = "cifar10"  # its augmentation: 4 pixels of padding, flips
    config.method = "pgd" if method == "pgd10" else method
    config.pgd_steps = 10
    config.model, config.width = FLAGS.model, FLAGS.width
    config.batch_size, config.dtype = FLAGS.batch_size, FLAGS.dtype
    config.train_size, config.progress = num_train, False
    config.unroll = None if FLAGS.unroll is None else FLAGS.unroll == "true"
    return config


def timed_calls(call: Callable[[], object], count: int) -> list[float]:
    """Seconds of ``count`` calls of ``call``, each waited for on the device."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return times


def median_seconds(call: Callable[[], object]) -> float:
    """Median seconds of ``--steps`` calls of ``call`` after ``--warmup`` untimed ones."""
    return statistics.median(timed_calls(call, FLAGS.warmup + FLAGS.steps)[FLAGS.warmup :])


def step_flops(compiled) -> float | None:
    """XLA's FLOP count of one call of a compiled function, if the backend reports it."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def time_method(run: Run) -> dict:
    """Compile time, step times and FLOPs of ``run``'s training step on full batches."""
    batch, num_train = FLAGS.batch_size, len(run.dataset.y_train)
    order = device_order(0, 1, num_train, run.mesh)
    start = time.perf_counter()
    compiled = run.train_step.in_epoch.lower(
        run.state, run.data, order, np.int32(0), batch_size=batch
    ).compile()
    compile_s = time.perf_counter() - start
    state, position = run.state, 0

    def step():
        nonlocal state, position
        state, metrics = compiled(state, run.data, order, np.int32(position))
        position = (position + batch) % (num_train - batch + 1)
        return state, metrics

    timed_calls(step, FLAGS.warmup)
    times = timed_calls(step, FLAGS.steps)
    run.state = state  # the steps donated the state they were given
    return {
        "compile_s": compile_s,
        "times": times,
        "passes": run.method.passes_per_step,
        "flops": step_flops(compiled),
    }


def time_input_gradient(run: Run) -> float:
    """Median seconds of one input-gradient pass: forward and backward to x, BN training mode."""
    mesh, ctx = run.mesh, run.ctx
    images = run.data.images[: FLAGS.batch_size]
    labels = run.data.labels[: FLAGS.batch_size]

    def gradient(params, batch_stats, images, labels):
        x = jax.lax.with_sharding_constraint(to_unit_range(images), batch_sharded(mesh))
        return input_gradient(ctx, params, batch_stats, x, labels)

    args = (run.state.params, run.state.batch_stats, images, labels)
    compiled = jit(gradient, out_shardings=replicated(mesh)).lower(*args).compile()
    return median_seconds(lambda: compiled(*args))


def time_epoch(run: Run) -> dict:
    """One whole epoch through the trainer's loop, against the sum of its steps' times.

    After an untimed epoch, one epoch runs with every step waited for and timed (their sum
    is the floor), then one runs freely, as in training, timed as a whole.
    """
    steps = compile_epoch_steps(run, run.state)
    state, num_train = run.state, len(run.dataset.y_train)
    step_times: list[float] = []
    clock = [time.perf_counter()]

    def timed_step(i: int, state, totals, health) -> None:
        jax.block_until_ready(state)
        now = time.perf_counter()
        step_times.append(now - clock[0])
        clock[0] = now

    epoch_s = 0.0
    for epoch, after_step in ((1, None), (2, timed_step), (3, None)):
        order = device_order(0, epoch, num_train, run.mesh)
        start = clock[0] = time.perf_counter()
        state, totals, _ = train_epoch(
            steps, state, zero_totals(run.mesh), run.data, order, run.batch_sizes, 0, after_step
        )
        jax.block_until_ready((state, totals))
        epoch_s = time.perf_counter() - start
    return {
        "epoch_s": epoch_s,
        "sum_of_steps_s": sum(step_times),
        "ratio_to_steps": epoch_s / sum(step_times),
        "steps": len(run.batch_sizes),
        "examples": num_train,
    }


def time_evaluation(run: Run) -> dict:
    """One PGD-20 pass (step 2/255, eps 8/255, BN in inference mode) over the test points."""
    config, mesh = run.config, run.mesh
    points = FLAGS.eval_points
    batch = min(config.eval_batch_size, points)
    test = make_eval_data(
        run.dataset.x_test[:points], run.dataset.y_test[:points], batch, replicated(mesh)
    )
    eval_step = make_eval_step(
        run.model.apply, eps=8 / 255, step_size=2 / 255, steps=20, unroll=config.unroll, mesh=mesh
    )
    first, seconds = timed_calls(
        lambda: evaluate(eval_step, run.state, test, batch, jax.random.key(0)), 2
    )
    return {"points": points, "seconds": seconds, "first_call_s": first}


def torch_reference(run: Run, pass_costs: dict) -> dict:
    """PyTorch eager's step times for ``run``'s model, and our ``t_train``, ``t_in`` over them."""
    from experiments.torch_reference import torch_steps

    arch = architecture_of(run.model, run.dataset.x_train.shape[-1])
    framework, threads, train_step, input_gradient = torch_steps(arch, FLAGS.batch_size)
    train_step_s, input_gradient_s = median_seconds(train_step), median_seconds(input_gradient)
    return {
        "framework": framework,
        "threads": threads,
        "train_step_s": train_step_s,
        "input_gradient_s": input_gradient_s,
        "t_train_over_torch": pass_costs["t_train"] / train_step_s,
        "t_in_over_torch": pass_costs["t_in"] / input_gradient_s,
    }


def release_reference(apart_step_s: float) -> dict:
    """The authors' released APART step at this width and batch, and our apart step over it."""
    release = release_step_times(
        FLAGS.release, FLAGS.width, FLAGS.batch_size, FLAGS.warmup, FLAGS.steps
    )
    return {**release, "apart_over_release": apart_step_s / release["step_s"]}


def machine_info(mesh) -> dict:
    device = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": mesh.size,
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logging()
    unknown = sorted(set(FLAGS.methods) - set(METHODS))
    if unknown:
        raise app.UsageError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if FLAGS.reference == "torch" and (
        "clean" not in FLAGS.methods or FLAGS.dtype != "float32" or jax.default_backend() != "cpu"
    ):
        raise app.UsageError(
            "--reference=torch compares CPU float32 steps: it needs the clean method, "
            f"--dtype=float32 and a CPU backend (got {FLAGS.dtype} on {jax.default_backend()})"
        )
    if FLAGS.release and (
        "apart" not in FLAGS.methods
        or FLAGS.model != "preact_resnet18"
        or FLAGS.dtype != "float32"
        or jax.default_backend() != "cpu"
    ):
        raise app.UsageError(
            "--release compares CPU float32 APART steps of PreAct-ResNet-18: it needs the apart "
            f"method, --model=preact_resnet18, --dtype=float32 and a CPU backend (got "
            f"{FLAGS.model}, {FLAGS.dtype} on {jax.default_backend()})"
        )
    devices = jax.devices()[: FLAGS.devices or None]
    mesh = data_mesh(devices)
    num_train = max(FLAGS.epoch_examples, 2 * FLAGS.batch_size)
    dataset = synthetic_cifar(num_train, max(FLAGS.eval_points, 1))
    config_info = {
        "model": FLAGS.model,
        "width": FLAGS.width,
        "batch_size": FLAGS.batch_size,
        "dtype": FLAGS.dtype,
        "devices": mesh.size,
        "steps": FLAGS.steps,
        "warmup": FLAGS.warmup,
        "epoch_examples": FLAGS.epoch_examples,
        "eval_points": FLAGS.eval_points,
        "unroll": FLAGS.unroll or "backend default",
        "reference": FLAGS.reference,
        "release": FLAGS.release,
    }
    machine = machine_info(mesh)
    print(
        f"{machine['devices']} x {machine['device_kind']} ({machine['platform']}), "
        f"jax {machine['jax']}; {FLAGS.model} width {FLAGS.width}, batch {FLAGS.batch_size}, "
        f"{FLAGS.dtype}"
    )

    runs, raw, t_in = {}, {}, None
    for name in FLAGS.methods:
        runs[name] = setup_run(bench_config(name, num_train), dataset, mesh)
        raw[name] = time_method(runs[name])
        print(f"  {name}: {statistics.median(raw[name]['times']) * 1e3:.1f} ms/step")
    if "clean" in runs:
        t_in = time_input_gradient(runs["clean"])
    summary = {
        "machine": machine,
        "config": config_info,
        **step_summary(raw, t_in, FLAGS.batch_size),
    }
    if FLAGS.reference == "torch":
        summary["reference"] = torch_reference(runs["clean"], summary["pass_costs"])
    if FLAGS.release:
        summary["release"] = release_reference(summary["results"]["apart"]["step_s"])

    if FLAGS.epoch_examples:
        summary["epochs"] = {}
        for name in ("apart", "pgd10"):
            if name in runs:
                epoch = time_epoch(
                    setup_run(bench_config(name, FLAGS.epoch_examples), dataset, mesh)
                )
                steps_s = epoch["steps"] * summary["results"][name]["step_s"]
                epoch.update(sum_of_steps_s=steps_s, ratio_to_steps=epoch["epoch_s"] / steps_s)
                summary["epochs"][name] = epoch
    if FLAGS.eval_points:  # any model will do: the cost does not depend on the weights
        summary["evaluation"] = time_evaluation(runs.get("apart") or next(iter(runs.values())))

    peak = FLAGS.peak_tflops or PEAK_TFLOPS.get(machine["device_kind"])
    for r in summary["results"].values():
        flops = r.pop("flops_per_step")
        r["tflops_per_s"] = None if flops is None else flops / r["step_s"] / 1e12
        r["mfu"] = None if flops is None or peak is None else r["tflops_per_s"] / (peak * mesh.size)

    print_report(summary)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"written: {FLAGS.json}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
