"""Plot clean and PGD-20 test accuracy per epoch of one or more training runs.

    python -m experiments.plot --workdir=DIR [--workdir=DIR2 ...] [--out=FILE.png] [--title=...]

Reads each DIR/metrics.jsonl (written by experiments.train) and draws clean accuracy
(dashed) and PGD-20 accuracy (solid) per evaluated epoch, one colour per run, labelled
"basename (method)", into a PNG: --out, or DIR/accuracy.png of the first --workdir.
A missing directory or an absent, empty or malformed metrics.jsonl exits with one line on
stderr and status 2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from absl import app, flags

from experiments.cli import parse_flags_or_exit, quiet_logging, run_or_exit
from experiments.runs import distinct_labels, read_metrics

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "A training run's directory (metrics.jsonl); repeat.")
flags.DEFINE_string("out", None, "PNG to write (default: accuracy.png in the first --workdir).")
flags.DEFINE_string("title", "Clean (dashed) and PGD-20 (solid) test accuracy", "Plot title.")
flags.mark_flags_as_required(["workdir"])

CURVE_KEYS = ("epoch", "clean_acc", "pgd20_acc", "method")
FIGURE_INCHES = (8.0, 5.0)
DPI = 100  # The PNG is 800 x 500 pixels.


def load_curves(workdir: str) -> dict[str, list]:
    """The accuracy curves of a training run, one entry per row of its metrics.jsonl.

    Returns:
      ``{"epoch": [int], "clean_acc": [float], "pgd20_acc": [float], "method": [str]}``, lists
      of equal length >= 1 in file order (accuracies as written, fractions in [0, 1]).

    Raises:
      ConfigError: :func:`experiments.runs.read_metrics` refuses the directory.
    """
    rows = read_metrics(workdir)
    return {key: [row[key] for row in rows] for key in CURVE_KEYS}


def run_labels(workdirs: Sequence[str], methods: Sequence[str]) -> list[str]:
    """``"basename (method)"`` per run; the paths as given where two basenames coincide.

    Raises:
      ConfigError: the same run is given twice.
    """
    names = distinct_labels(
        workdirs,
        [
            [os.path.basename(os.path.abspath(w)) for w in workdirs],
            [os.path.normpath(w) for w in workdirs],
        ],
    )
    return [f"{name} ({method})" for name, method in zip(names, methods, strict=True)]


def plot_curves(runs: Mapping[str, Mapping[str, Sequence]], out_path: str, title: str) -> None:
    """Draws each run's clean (dashed) and PGD-20 (solid) accuracy per epoch into a PNG.

    Args:
      runs: ``{label: curves}``, curves as returned by :func:`load_curves` (the "epoch",
        "clean_acc" and "pgd20_acc" lists are used); one colour per run, in order.
      out_path: the PNG to write (800 x 500 pixels); its directory is created if missing.
      title: the figure title.
    """
    # Lazy: matplotlib is only needed here. A bare Figure on an Agg canvas leaves pyplot's
    # global backend and figure list alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, (label, curves) in enumerate(runs.items()):
        color = f"C{i % 10}"
        style = dict(color=color, marker="o", markersize=3)
        axes.plot(curves["epoch"], curves["clean_acc"], "--", label=f"{label} clean", **style)
        axes.plot(curves["epoch"], curves["pgd20_acc"], "-", label=f"{label} PGD-20", **style)
    axes.set(title=title, xlabel="epoch", ylabel="test accuracy")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    figure.savefig(out_path, format="png")


def plot_workdirs() -> str:
    """Loads every --workdir, draws them and returns the PNG's path."""
    workdirs = FLAGS.workdir
    curves = [load_curves(w) for w in workdirs]
    labels = run_labels(workdirs, [c["method"][-1] for c in curves])
    out_path = FLAGS.out or os.path.join(workdirs[0], "accuracy.png")
    plot_curves(dict(zip(labels, curves, strict=True)), out_path, FLAGS.title)
    return out_path


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logging()
    print(f"written: {run_or_exit(plot_workdirs)}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
