"""What the command-line entry points share: quiet logs and one-line errors for bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from absl import flags, logging

from apart_jax.config import ConfigError
from apart_jax.data import DatasetError

T = TypeVar("T")


def quiet_logging() -> None:
    """Shows warnings and errors only (Orbax logs every save at INFO), unless --verbosity is set."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run_or_exit(job: Callable[[], T]) -> T:
    """Runs ``job``; invalid configuration or data ends the process with one line and status 2."""
    try:
        return job()
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
