"""Train one method and evaluate it.

    python -m experiments.train --config=experiments/configs/digits.py --workdir=runs/digits_apart \
        [--config.method=pgd --config.epochs=10 ...]

Writes WORKDIR/config.json, WORKDIR/metrics.jsonl and a checkpoint under WORKDIR/checkpoints.
Invalid settings or data exit with one line on stderr and status 2.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from apart_jax.train import train_and_evaluate
from experiments.cli import quiet_logging, run_or_exit

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logging()
    result = run_or_exit(lambda: train_and_evaluate(FLAGS.config, FLAGS.workdir))
    last = result.last
    print(
        f"{result.label}: clean {last['clean_acc']:.2%}, PGD-20 {last['pgd20_acc']:.2%} "
        f"after {last['epoch']} epochs ({last['train_seconds']:.1f} s training)\n"
        f"metrics: {result.metrics_path}\ncheckpoint: {result.checkpoint_path}"
    )


if __name__ == "__main__":
    app.run(main)
