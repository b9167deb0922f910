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


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """Parses the command line like ``app.run`` does, but a bad flag or an unknown
    ``--config.KEY`` ends the process with one line and status 2 instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = str(error)
    except (AttributeError, KeyError) as error:  # ml_collections: the override names no key
        key = str(error).strip("\"'")
        message = f"--config.{key}: no such config key (apart_jax/config.py lists them all)"
    print(f"error: {message.splitlines()[0]}", file=sys.stderr)
    sys.exit(2)


def run_or_exit(job: Callable[[], T]) -> T:
    """Runs ``job``; invalid configuration or data ends the process with one line and status 2."""
    try:
        return job()
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
