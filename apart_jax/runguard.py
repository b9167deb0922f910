"""What guards a running training job: SIGTERM/SIGINT become a clean stop, and one run per
workdir at a time.

* :class:`StopRequest` records the first SIGTERM (preemption) or SIGINT (Ctrl-C) instead of
  dying; the trainer polls it after every step, writes a checkpoint and raises
  :class:`TrainingInterrupted`. A second signal gets the default behaviour (stop at once).
* :func:`workdir_lock` holds an exclusive ``flock`` on ``WORKDIR/.lock`` while a run
  trains, so that a second run on the same directory is refused instead of interleaving
  checkpoints. The kernel drops the lock when the process dies, even by ``kill -9``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
from collections.abc import Iterator

from apart_jax.config import ConfigError

LOCK_FILE = ".lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint (or with none, if disabled).

    Attributes: ``signal_name`` ("SIGTERM"), ``step`` (the last completed step),
    ``checkpoint_path`` (None when checkpoints are off), ``exit_code`` (128 + signal number).
    """

    def __init__(self, signum: int, step: int, checkpoint_path: str | None):
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.checkpoint_path = checkpoint_path
        self.exit_code = 128 + signum
        saved = (
            f"checkpoint {checkpoint_path} saved; run the same command again to resume"
            if checkpoint_path
            else "no checkpoint was written (checkpoint=False): the progress is lost"
        )
        super().__init__(f"stopped by {self.signal_name} after step {step}: {saved}")


class StopRequest:
    """A context manager that turns SIGTERM and SIGINT into a polled flag.

    Handlers are installed only in the main thread (elsewhere signals cannot be caught and
    the flag stays unset). ``signum`` is the first signal received, or None.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()  # a second signal acts at once

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds the exclusive lock of ``workdir`` (created if missing) for the ``with`` body.

    Raises:
      ConfigError: if another process holds it, or ``workdir`` cannot be created or written
        (a path through a file, no permission, a read-only file system), in one line.
    """
    path = os.path.join(workdir, LOCK_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        lock = open(path, "a+")  # noqa: SIM115 - closed by the with block below
    except OSError as error:
        raise ConfigError(
            f"workdir {workdir} is not writable ({error.strerror or error}): choose another "
            "--workdir"
        ) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{workdir} is in use by another training run (lock {path}); wait for it to "
                "finish or use another --workdir"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
