"""What guards a running training job: SIGTERM/SIGINT become a clean stop agreed by every
process, a dead process stops the others, and one run per workdir at a time.

* :class:`StopRequest` records the first SIGTERM (preemption) or SIGINT (Ctrl-C) instead of
  dying; the trainer asks it after every step (:meth:`StopRequest.reached`), writes a
  checkpoint and raises :class:`TrainingInterrupted`. In one process a second signal gets
  the default behaviour (stop at once). With several processes the signal may reach them
  at different steps (a preempted TPU slice signals every host, not at the same instant),
  so SIGTERM is left to JAX's preemption notifier, which agrees on one step for all
  processes (``multihost_utils.reached_preemption_sync_point``): every process stops after
  that step and they save one consistent checkpoint together.
* :class:`PeerWatch` ends a multi-process run's process, with one line and exit status 1,
  when another process of the run died (``kill -9``, a lost host) or failed, instead of
  letting it wait in the next collective until the job scheduler kills it.
* :func:`workdir_lock` holds an exclusive ``flock`` on ``WORKDIR/.lock`` while a run
  trains, so that a second run on the same directory is refused instead of interleaving
  checkpoints. The kernel drops the lock when the process dies, even by ``kill -9``.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils

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
    """A context manager that turns SIGTERM and SIGINT into a stop after an agreed step.

    Handlers are installed only in the main thread (elsewhere signals cannot be caught and
    no stop is requested). ``signum`` is the first signal this process received, or None.

    With several processes (``jax.process_count() > 1``), SIGTERM stays with JAX's
    preemption notifier (installed by ``jax.distributed.initialize``), which tells every
    process; SIGINT is handed to it as a SIGTERM. A second signal then changes nothing:
    ``kill -9`` stops a process at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.agreed = jax.process_count() > 1
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()  # a second signal acts at once
        if self.agreed:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier: the others stop too

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def reached(self, step: int) -> bool:
        """Whether to stop after ``step``; call once after every step, steps increasing.

        One process: a signal has arrived. Several: some process was signalled and all of
        them agreed to stop after this step (the same answer in every process).
        """
        if self.agreed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT,) if self.agreed else STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()


class PeerWatch:
    """A context manager that ends this process when another process of the run is lost.

    A background thread writes a heartbeat into JAX's coordination key-value store every
    ``timeout / 10`` seconds (at least 1 s) and reads every other process's. When one has
    not beaten for ``timeout`` seconds (killed, or its host lost) or reports that it left
    with an error, the thread prints one line to stderr and exits the process with status 1:
    its collectives would otherwise wait forever for the lost process. Leaving the ``with``
    block records how this process left (finished, stopped by a signal, failed), so that a
    process that finished first is not taken for dead. A process that ends the others'
    watch records itself as failed first, so that a third process stops too.

    A process that leaves with an error keeps watching until every other process has left
    as well, or for at most ``timeout`` plus two beats: a collective fails at once when the
    connection to a killed process is reset (gloo's "Connection reset by peer"), before
    that process has missed its heartbeats, and the watch then ends this process with the
    lost-process line instead of the collective's error.

    Does nothing in a single-process run. If process 0 itself dies, JAX's coordination
    service goes with it and JAX usually ends the other processes at once (its own ``F...
    Terminating process because the JAX distributed service detected fatal errors`` message,
    SIGABRT); a process whose watch or ``with`` exit reaches the service first ends with
    status 1 and the line ``error: lost JAX's coordination service (process 0): ...``.
    """

    _runs = itertools.count()  # one key prefix per watch: every process creates them in order

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.interval = max(1.0, timeout / 10)
        self._prefix = f"apart_jax/peers/{next(self._runs)}/"
        self._stopped = threading.Event()
        self._settling = threading.Event()  # this process failed: wait for the others
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeerWatch:
        if jax.process_count() > 1:
            from jax._src import distributed  # the client of JAX's coordination service

            self._client = distributed.global_state.client
            self._thread = threading.Thread(target=self._watch, name="PeerWatch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._thread is None:
            return
        failed = exc_type is not None and not issubclass(exc_type, TrainingInterrupted)
        if exc_type is None:
            left = "finished"
        elif not failed:
            left = "stopped"
        else:
            reason = (str(exc).strip().splitlines() or [""])[0][:150]
            left = f"failed ({exc_type.__name__}: {reason})"
        try:
            self._client.key_value_set(self._left_key(jax.process_index()), left)
        except Exception as error:  # process 0, and the service with it, died first
            self._lost(f"lost JAX's coordination service (process 0): {error}", tell=False)
        if failed:
            self._settling.set()
            self._thread.join(self.timeout + 2 * self.interval)
        self._stopped.set()
        self._thread.join()

    def _left_key(self, process: int) -> str:
        return self._prefix + f"left/{process}"

    def _watch(self) -> None:
        me, beat = jax.process_index(), 0
        others = [p for p in range(jax.process_count()) if p != me]
        last = {p: (None, time.monotonic()) for p in others}  # (beat seen, when it changed)
        while not self._stopped.wait(self.interval if beat else 0):
            beat += 1
            try:
                self._client.key_value_set(
                    self._prefix + f"beat/{me}", str(beat), allow_overwrite=True
                )
                entries = dict(self._client.key_value_dir_get(self._prefix))
            except Exception as error:  # the coordination service itself is gone
                self._lost(f"lost JAX's coordination service (process 0): {error}", tell=False)
            now, settling = time.monotonic(), self._settling.is_set()
            gone = {p: entries.get(self._left_key(p)) for p in others}
            if settling and None not in gone.values():
                return
            for p in others:
                left = gone[p]
                if left is not None and left.startswith("failed") and not settling:
                    self._lost(f"process {p} of this run {left}")
                if left is not None:
                    continue
                seen = entries.get(self._prefix + f"beat/{p}")
                if seen != last[p][0]:
                    last[p] = (seen, now)
                elif now - last[p][1] > self.timeout:
                    self._lost(
                        f"process {p} of this run has not responded for {now - last[p][1]:.0f} s "
                        "(killed, or its host lost)"
                    )

    def _lost(self, what: str, tell: bool = True) -> None:
        if tell:  # the others learn it (through the service, which ``tell=False`` lost)
            with contextlib.suppress(Exception):
                self._client.key_value_set(self._left_key(jax.process_index()), f"failed ({what})")
        print(
            f"error: {what}; stopping process {jax.process_index()} too. Start every process "
            "again with the same command to resume from the newest complete checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


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
