"""The signal handling of StopRequest, in this process (the end-to-end faults are in
test_reliability.py and test_multihost_faults.py)."""

from __future__ import annotations

import os
import signal
import time

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
