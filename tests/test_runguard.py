"""The signal handling of StopRequest, in this process, and PeerWatch's ending when JAX's
coordination service is gone, in a subprocess (the end-to-end faults are in
test_reliability.py and test_multihost_faults.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from conftest import ROOT, module_env

from apart_jax.runguard import StopRequest


def wait_for_signal() -> None:
    time.sleep(0.05)  # Python runs handlers between bytecodes of the main thread


def test_one_process_stops_after_the_step_on_which_a_signal_arrived():
    with StopRequest() as stop:
        assert not stop.agreed and not stop.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_signal()
        assert stop.signum == signal.SIGTERM and stop.reached(2)
        # The first signal restored the previous handlers: a second acts at once.
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_with_several_processes_sigint_is_handed_to_jax_as_sigterm():
    """SIGTERM is left to JAX's preemption notifier (here a stand-in handler), and SIGINT is
    forwarded to it, so that every process learns of it."""
    notices = []

    def notifier(signum, frame):
        notices.append(signum)

    previous = signal.signal(signal.SIGTERM, notifier)
    try:
        stop = StopRequest()
        stop.agreed = True  # as with jax.process_count() > 1
        with stop:
            assert signal.getsignal(signal.SIGTERM) is notifier
            os.kill(os.getpid(), signal.SIGINT)
            wait_for_signal()
            assert stop.signum == signal.SIGINT and notices == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


# A process of a 2-process run, its coordination service replaced by a stand-in that dies
# (as when process 0 is killed) after the watch's first heartbeat, just before the process
# leaves its ``with`` block.
SERVICE_DIES_AS_THE_PROCESS_LEAVES = textwrap.dedent(
    """
    import threading
    import jax
    from jax._src import distributed
    from apart_jax.runguard import PeerWatch

    class Service:
        dead, beaten = False, threading.Event()

        def key_value_set(self, key, value, allow_overwrite=False):
            if self.dead:
                raise RuntimeError("UNAVAILABLE: Socket closed")
            self.beaten.set()

        def key_value_dir_get(self, prefix):
            if self.dead:
                raise RuntimeError("UNAVAILABLE: Socket closed")
            return []

    jax.devices()  # the backend starts before the stand-in (it would ask it for collectives)
    service = distributed.global_state.client = Service()
    jax.process_count = lambda: 2
    with PeerWatch(timeout=100.0):  # the next heartbeat is 10 s away
        assert service.beaten.wait(timeout=60)
        service.dead = True
    print("left the watch")
    """
)


def test_peer_watch_ends_the_process_with_one_line_when_the_service_is_gone():
    """Recording how the process left fails when process 0 (and the service with it) died
    first: the process ends at once with status 1 and the lost-service line, not with the
    service's error raised past the watch (a stack trace)."""
    done = subprocess.run(
        [sys.executable, "-c", SERVICE_DIES_AS_THE_PROCESS_LEAVES],
        cwd=ROOT,
        env=module_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert done.stderr.strip() == (
        "error: lost JAX's coordination service (process 0): UNAVAILABLE: Socket closed; "
        "stopping process 0 too. Start every process again with the same command to resume "
        "from the newest complete checkpoint."
    )
