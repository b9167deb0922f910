"""The quickstart: FGSM, APART and PGD-10 on the embedded digits, then a comparison table.

    python -m experiments.quickstart [--workdir=runs/quickstart] [--epochs=30]

Needs no network. Each method writes WORKDIR/METHOD/metrics.jsonl and a checkpoint.
"""

from __future__ import annotations

import time

from absl import app, flags

from apart_jax.trainer import RunResult, train_and_evaluate
from experiments.cli import parse_flags_or_exit, quiet_logging, run_or_exit
from experiments.configs import digits

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/quickstart", "Directory for the three runs' outputs.")
flags.DEFINE_integer("epochs", None, "Epochs per method (default: the digits config's).")
flags.DEFINE_list("methods", ["fgsm", "apart", "pgd"], "Methods to train, in order.")
flags.DEFINE_integer("width", None, "Model width (default: the digits config's).")

COLUMNS = ("method", "clean acc", "PGD-20 acc", "train s", "compile s", "passes/step")


def results_table(results: list[RunResult]) -> str:
    """A fixed-width table: clean and PGD-20 accuracy, training and compile time per method."""
    rows = [
        (
            r.label,
            f"{r.last['clean_acc']:.1%}",
            f"{r.last['pgd20_acc']:.1%}",
            f"{r.last['train_seconds']:.1f}",
            f"{r.compile_seconds:.1f}",
            str(r.passes_per_step),
        )
        for r in results
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]

    def line(cells):
        return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True))

    return "\n".join([line(COLUMNS), line("-" * w for w in widths), *map(line, rows)])


def run_quickstart(
    workdir: str, methods: list[str], epochs: int | None = None, width: int | None = None
) -> list[RunResult]:
    """Trains each method on the digits config into ``workdir/METHOD``; returns their results."""
    results = []
    for name in methods:
        config = digits.get_config()
        config.method = name
        if epochs is not None:
            config.epochs = epochs
        if width is not None:
            config.width = width
        results.append(train_and_evaluate(config, f"{workdir}/{name}"))
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    quiet_logging()
    results = run_or_exit(
        lambda: run_quickstart(FLAGS.workdir, FLAGS.methods, FLAGS.epochs, FLAGS.width)
    )
    config = digits.get_config()
    width = FLAGS.width or config.width
    print(
        f"\nDigits (scikit-learn 8x8, embedded), {config.model} width {width}, "
        f"eps {config.eps * 255:.0f}/255, PGD-{config.eval_pgd_steps} with step "
        f"{config.eval_pgd_step_size * 255:.0f}/255 and BN in inference mode:\n"
    )
    print(results_table(results))
    total = time.perf_counter() - start
    print(f"\nmetrics: {FLAGS.workdir}/<method>/metrics.jsonl  (total {total:.0f} s)")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
