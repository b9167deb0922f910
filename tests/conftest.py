"""Shared fixtures: the embedded digits and tiny configurations. CPU only, no network."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from apart_jax.config import default_config
from apart_jax.data import load_digits
from apart_jax.logbook import read_rows
from apart_jax.restore import restore_checkpoint
from apart_jax.run import setup_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Re-use compiled programs across test runs on the same machine, in subprocesses too.
JIT_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(os.path.expanduser("~"), ".cache", "apart_jax_jit"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1.0",
}
jax.config.update("jax_compilation_cache_dir", JIT_CACHE["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(JIT_CACHE["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


@pytest.fixture(scope="session")
def digits():
    return load_digits()


def tiny_config(**overrides):
    """A width-4 small CNN on the digits, batch 32, quiet; ``overrides`` set config keys."""
    config = default_config()
    config.model = "small_cnn"
    config.width = 4
    config.batch_size = 32
    config.epochs = 2
    config.eval_every = 1
    config.progress = False
    config.checkpoint = False
    for key, value in overrides.items():
        config[key] = value
    return config


LINEAR_FEATURES = 12


def linear_problem(seed: int, batch: int = 6, classes: int = 2):
    """A linear classifier x -> x W with inputs inside [0.25, 0.75] (room for eps <= 0.25).

    Returns (logits_fn, W (12, classes), x (batch, 12), y (batch,)).
    """
    k_w, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    w = jax.random.normal(k_w, (LINEAR_FEATURES, classes))
    x = jax.random.uniform(k_x, (batch, LINEAR_FEATURES), minval=0.25, maxval=0.75)
    y = jax.random.randint(k_y, (batch,), 0, classes)
    return (lambda x: x @ w), w, x, y


def write_npz(path, *, train=20, test=8, image_shape=(6, 6, 3), num_classes=4, **overrides):
    """Writes random uint8 images and int labels in the npz dataset layout and returns them;
    ``overrides`` replace arrays (None removes one)."""
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (train, *image_shape), dtype=np.uint8),
        y_train=rng.integers(0, num_classes, train),
        x_test=rng.integers(0, 256, (test, *image_shape), dtype=np.uint8),
        y_test=rng.integers(0, num_classes, test),
    )
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def module_env(devices: int | None = None) -> dict[str, str]:
    """The environment of a subprocess that imports this project, optionally with ``devices``
    simulated CPU devices."""
    env = {**os.environ, **JIT_CACHE, "PYTHONPATH": ROOT}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for a coordinator address)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs ``python -m module args`` from the repository root; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=module_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# 200 examples in batches of 64: steps of 64, 64, 64 and 8, so 4 steps per epoch.
RESUMABLE = dict(
    method="apart",
    epochs=3,
    train_size=200,
    test_size=64,
    batch_size=64,
    checkpoint=True,
    checkpoint_every=3,
    checkpoint_keep=10,
)


@pytest.fixture(scope="session")
def resumable_run(tmp_path_factory):
    """An uninterrupted RESUMABLE run (checkpoints 3, 6, 9, 12) and its RunResult, shared by
    the checkpoint and reliability tests. Tests copy the workdir before changing anything."""
    from apart_jax.trainer import train_and_evaluate

    workdir = tmp_path_factory.mktemp("resumable")
    return workdir, train_and_evaluate(tiny_config(**RESUMABLE), str(workdir))


def host_leaves(tree):
    """The leaves of a state as NumPy arrays (PRNG keys as their raw key data)."""

    def to_numpy(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return [to_numpy(x) for x in jax.tree.leaves(tree)]


def without_timings(rows):
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rows]


def checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def assert_same_run(a, b, config):
    """Bit-identical final states and metrics rows (timings aside)."""
    run = setup_run(config)
    for x, y in zip(
        host_leaves(restore_checkpoint(str(a), run)),
        host_leaves(restore_checkpoint(str(b), run)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    rows_a, rows_b = read_rows(str(a / "metrics.jsonl")), read_rows(str(b / "metrics.jsonl"))
    assert without_timings(rows_a) == without_timings(rows_b)
    return rows_a


TRAIN_COMMAND = [
    "-m",
    "experiments.train",
    "--config=experiments/configs/digits.py",
    "--config.width=4",
    "--config.epochs=3",
    "--config.train_size=1000",
    "--config.test_size=64",
    "--config.batch_size=32",
    "--config.checkpoint_every=2",
    "--config.eval_every=1",
    "--config.progress=False",
]


def start_two_processes(train: list[str], workdir) -> list[subprocess.Popen]:
    """The command ``python *train`` as process 0 and 1 of one run (2 CPU devices each)."""
    address = f"localhost:{free_port()}"
    return [
        subprocess.Popen(
            [
                sys.executable,
                *train,
                f"--workdir={workdir}",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=module_env(devices=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def finish_two_processes(train: list[str], workdir) -> list[str]:
    """Runs ``train`` as 2 processes to the end; asserts both succeeded, returns their stdouts."""
    processes = start_two_processes(train, workdir)
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def wait_for(condition, process, seconds=300):
    """Polls ``condition()`` every 10 ms while ``process`` runs; fails if it ends first."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)


# The files that took longest under pytest-xdist (`--durations` of the whole suite with 2
# workers on 2026-12-02, before the cuts of that day's change: the reliability tests about
# 9 min with their fixtures, the multi-process fault tests 9.4 min, test_parallel 7.8 min).
# They start first, so that no worker is left alone with one of them at the end.
LONGEST_FILES = ("test_reliability.py", "test_multihost_faults.py", "test_parallel.py")


def pytest_collection_modifyitems(items):
    """Orders the test files: LONGEST_FILES, then files with end-to-end (slow) tests, then
    the rest; the order within a file is kept (pytest-xdist's ``loadfile`` hands out whole
    files in this order)."""
    slow_files = {item.path.name for item in items if item.get_closest_marker("slow")}

    def rank(item):
        name = item.path.name
        if name in LONGEST_FILES:
            return LONGEST_FILES.index(name)
        return len(LONGEST_FILES) + (name not in slow_files)

    items.sort(key=rank)


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Records the XLA compilations (persistent-cache hits included) while registered:
    ``names`` the compiled programs' names in order, ``count`` how many."""

    def __init__(self):
        self.names = []

    @property
    def count(self):
        return len(self.names)

    def __call__(self, event, duration, fun_name="", **kwargs):
        if event == BACKEND_COMPILE:
            self.names.append(fun_name)

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc_info):
        jax.monitoring.unregister_event_duration_listener(self)
