"""Progress bars that suit both a terminal and a log file.

On a terminal a bar redraws in place, at most ten times a second. Written anywhere else (a
log file, a pipe, a batch system's capture), every redraw would be kept, so a bar is drawn
only when it opens and when it closes: one line per bar.
"""

from __future__ import annotations

import math
import sys

from tqdm.auto import tqdm


def progress_bar(*, enabled: bool, **kwargs) -> tqdm:
    """A tqdm bar on stderr, shown only if ``enabled``; ``kwargs`` go to ``tqdm``.

    Set postfixes with ``refresh=False``: the next redraw (or the closing one) shows them.
    """
    interactive = sys.stderr.isatty()
    return tqdm(disable=not enabled, mininterval=0.1 if interactive else math.inf, **kwargs)
