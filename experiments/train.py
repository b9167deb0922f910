"""Train one method and evaluate it; rerunning the same command resumes from its checkpoint.

    python -m experiments.train --config=experiments/configs/digits.py --workdir=runs/digits_apart \
        [--config.method=pgd --config.epochs=10 ...]

Writes WORKDIR/config.json, WORKDIR/metrics.jsonl, TensorBoard events and checkpoints under
WORKDIR/checkpoints. Exit status and stderr:
* 0: trained (or already finished);
* 1, one line: a non-finite loss or state (nothing saved after it), a checkpoint that could
  not be written (the newest complete one is named), a checkpoint that could not be restored
  although its files look intact (nothing moved), or, with several processes, another
  process of the run that died or failed;
* 2, one line: invalid settings, flags or data, an unwritable workdir, a workdir in use by
  another run or holding another run's checkpoints; nothing is written;
* 128 + N: stopped by signal N (SIGTERM, Ctrl-C) after finishing the step and saving a
  checkpoint; the line says how to resume. With several processes a SIGTERM to any of them
  stops all of them after the same step, with one checkpoint.
Docs: docs/reliability.md.

Several processes (hosts, or processes on one machine) form one run when each is started
with the same --coordinator_address and --num_processes and its own --process_id; on a
Cloud TPU VM pod slice pass --distributed alone and JAX finds the rest. A process that dies
ends the others within --config.peer_timeout seconds (JAX's own heartbeat timeout is set to
twice that, so that the one-line message comes first).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import traceback
from typing import NoReturn

from absl import app, flags
from ml_collections import config_flags

from apart_jax.parallel import initialize_distributed
from experiments.cli import parse_flags_or_exit, quiet_logging, run_or_exit

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
flags.DEFINE_bool("distributed", False, "Join JAX's multi-process runtime before training.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logging()
    if FLAGS.distributed or FLAGS.coordinator_address:
        initialize_distributed(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            heartbeat_timeout_seconds=round(2 * FLAGS.config.peer_timeout),
        )
    # Imported after joining the runtime: nothing may touch a JAX backend before that.
    import jax

    try:
        train_and_report()
    except SystemExit as stop:
        if jax.process_count() > 1 and stop.code in (1, 2):
            leave_at_once(stop.code)
        raise
    except Exception:
        if jax.process_count() > 1:
            traceback.print_exc()
            leave_at_once(1)
        raise


def leave_at_once(code: int) -> NoReturn:
    """Ends a failed process of a multi-process run with exit status ``code``, skipping the
    exit handlers: JAX's would wait at its shutdown barrier for the processes that
    ``PeerWatch`` has already ended, then abort with a stack trace once their heartbeats
    time out. Everything the run wrote is closed by then (its ``with`` blocks have left)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train_and_report() -> None:
    """Trains the run of the flags, ending failures with one line (the module docstring's
    exit statuses); process 0 prints the result."""
    import jax

    from apart_jax.checkpoint import CheckpointRestoreError, CheckpointSaveError
    from apart_jax.health import NonFiniteError
    from apart_jax.runguard import TrainingInterrupted
    from apart_jax.trainer import train_and_evaluate

    try:
        result = run_or_exit(lambda: train_and_evaluate(FLAGS.config, FLAGS.workdir))
    except TrainingInterrupted as stop:
        print(f"{stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except CheckpointSaveError as error:
        # Orbax's abandoned write tasks report the same failure again when they are garbage
        # collected, through asyncio's log, from their thread, or at interpreter exit as
        # "Exception ignored" ("RuntimeError: Event loop is closed", seen once in CI);
        # silence all three so that the one-line error is the last line printed.
        logging.getLogger("asyncio").disabled = True
        sys.unraisablehook = threading.excepthook = lambda _: None
        gc.collect()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except (NonFiniteError, CheckpointRestoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() != 0:
        return
    last = result.last
    resumed = "" if result.resumed_from is None else f", resumed from step {result.resumed_from}"
    print(
        f"{result.label}: clean {last['clean_acc']:.2%}, PGD-20 {last['pgd20_acc']:.2%} "
        f"after {last['epoch']} epochs ({last['train_seconds']:.1f} s training{resumed})\n"
        f"metrics: {result.metrics_path}\ncheckpoint: {result.checkpoint_path}"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
