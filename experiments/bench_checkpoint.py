"""Checkpoint size and save/restore time of a full training state (Omega included).

    python -m experiments.bench_checkpoint [--method=apart --width=64 --num_train=50000]

Builds the state of a run on CIFAR-10-shaped data (N images of 32x32x3, Omega on the
40x40 padded frame) without loading any data, then times with the trainer's own
checkpointing, for each Omega storage dtype: the blocking part of an asynchronous save
(what a training step waits for), the whole save, a restore, and, within those, the
digests of every array (computed by each save and again by each restore to verify it;
:mod:`apart_jax.integrity`). Prints a table; the numbers in docs/benchmarks.md come from
here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from apart_jax.checkpoint import RunCheckpoints, checkpoint_meta
from apart_jax.config import default_config
from apart_jax.integrity import tree_digests
from apart_jax.run import setup_run
from apart_jax.state import zero_totals
from experiments.cli import parse_flags_or_exit, quiet_logging
from experiments.synthetic import synthetic_cifar

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", "apart", ["apart", "fgsm_plus", "fgsm", "pgd"], "Training method.")
flags.DEFINE_string("model", "preact_resnet18", "Model name.")
flags.DEFINE_integer("width", 64, "Model width (64: the paper's PreAct-ResNet-18).")
flags.DEFINE_integer("num_train", 50_000, "Training examples (rows of Omega).")
flags.DEFINE_list("omega_dtypes", ["float32", "bfloat16"], "Omega storage dtypes to time.")
flags.DEFINE_integer("repeats", 3, "Saves and restores timed per dtype (the median is shown).")
flags.DEFINE_string("workdir", None, "Where to write (default: a temporary directory).")


def directory_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def time_checkpoints(omega_dtype: str, workdir: str) -> dict[str, float]:
    """Median seconds of the save's blocking part, the whole save, a restore and the
    digests of the state and totals (part of each of them); bytes."""
    config = default_config()
    config.update(
        dict(method=FLAGS.method, model=FLAGS.model, width=FLAGS.width, omega_dtype=omega_dtype)
    )
    config.dataset = "cifar10"  # its augmentation: Omega on the 40x40 padded frame
    config.progress = False
    run = setup_run(config, synthetic_cifar(FLAGS.num_train, num_test=10))
    totals = zero_totals(run.mesh)
    meta = checkpoint_meta(config, run, 0.0)
    blocking, total, restore, digests = [], [], [], []
    with RunCheckpoints(workdir, max_to_keep=1) as checkpoints:
        for step in range(1, FLAGS.repeats + 1):
            start = time.perf_counter()
            path = checkpoints.save(step, run.state, totals, meta)
            blocking.append(time.perf_counter() - start)
            checkpoints.wait()
            total.append(time.perf_counter() - start)
            start = time.perf_counter()
            restored = checkpoints.restore(step, state=run.state, totals=totals)
            jax.block_until_ready(restored)
            restore.append(time.perf_counter() - start)
            start = time.perf_counter()
            tree_digests(restored)
            digests.append(time.perf_counter() - start)
        size = directory_bytes(path)
    omega = run.state.omega
    return {
        "omega_bytes": 0 if omega is None else omega.size * omega.dtype.itemsize,
        "checkpoint_bytes": size,
        "save_blocking_s": float(np.median(blocking)),
        "save_s": float(np.median(total)),
        "restore_s": float(np.median(restore)),
        "digest_s": float(np.median(digests)),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logging()
    root = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    print(
        f"{FLAGS.method}, {FLAGS.model} width {FLAGS.width}, {FLAGS.num_train} examples, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    )
    print(
        f"{'omega dtype':<12}{'Omega MB':>10}{'ckpt MB':>10}{'blocking s':>12}"
        f"{'save s':>9}{'restore s':>11}{'digests s':>11}"
    )
    try:
        for dtype in FLAGS.omega_dtypes:
            r = time_checkpoints(dtype, os.path.join(root, dtype))
            print(
                f"{dtype:<12}{r['omega_bytes'] / 1e6:>10.1f}{r['checkpoint_bytes'] / 1e6:>10.1f}"
                f"{r['save_blocking_s']:>12.2f}{r['save_s']:>9.2f}{r['restore_s']:>11.2f}"
                f"{r['digest_s']:>11.2f}"
            )
    finally:
        if FLAGS.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
