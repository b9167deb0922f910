"""The fast-adversarial-training study's report: tables and figures from its ledger.

The ledger (``docs/results/fast_at/``) holds one directory per finished run, with the
config.json, metrics.jsonl, AutoAttack reports and wall.json that
``experiments.fast_at_study`` copies there. :func:`write_report` turns it into the section of
docs/results.md between the fast-at markers and three figures in the ledger:

* ``curves.png``: PGD-20 accuracy per epoch, one line per run, one panel per eps;
* ``pareto.png``: best and final PGD-20 accuracy against training time, mean +- std over
  seeds, with each method's passes per step. The time is the run's steps x its method's step
  time in the ledger's ``bench_speed.json`` (one ``experiments.bench_speed`` run, every method
  side by side on one machine) where that file exists, since the runs themselves may train
  on machines of different speed; otherwise the runs' measured mean;
* ``psi.png``: APART's alpha, alpha_omega and layer alphas over training at each eps;

and, where the psi sweep's ledger holds runs (experiments/fast_at_psi.py), its table and
``psi_sweep.png`` in that ledger.
"""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Sequence
from typing import Any

from experiments.fast_at_psi import (
    in_sweep_order,
    plot_psi,
    plot_sweep,
    psi_rows,
    psi_table,
    sweep_base,
    sweep_section,
)
from experiments.figures import pyplot
from experiments.run_summary import COLLAPSE_MIN_BEST, COLLAPSE_RATIO, load_run_summary
from experiments.runs import read_json, read_json_if_present, read_metrics
from experiments.summarize import MISSING, format_duration

BEGIN, END = "<!-- fast-at -->", "<!-- /fast-at -->"
BENCH_FILE = "bench_speed.json"
COLLAPSE_CAPTION = (
    f"A run **collapsed** at the first epoch whose PGD-20 accuracy is below "
    f"{COLLAPSE_RATIO:g} x the best PGD-20 accuracy of the epochs before it, that best "
    f"being at least {COLLAPSE_MIN_BEST:.0%} (chance level: a run has no robustness to "
    "lose before it beats a constant classifier) (apart_jax/collapse.py, the trainer's "
    "`on_collapse` probe). A run **never robust** stayed below that floor at every epoch: "
    "it had nothing to collapse from, the other way FGSM fails."
)


def load_ledger(ledger: str) -> list[dict[str, Any]]:
    """Every finished run of the ledger: :func:`experiments.run_summary.load_run_summary`
    plus ``config`` (its config.json), ``seed``, ``radius`` (eps in 1/255), ``rows``
    (metrics), ``wall`` (seconds) and ``retrain`` (the accuracies' differences of a run
    trained again for its checkpoints, ``{"clean_acc", "pgd20_acc"}``; None when it was not
    or matched)."""
    runs = []
    for name in sorted(os.listdir(ledger)) if os.path.isdir(ledger) else []:
        workdir = os.path.join(ledger, name)
        if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
            continue
        summary = load_run_summary(workdir)
        config = read_json(os.path.join(workdir, "config.json"))
        summary["config"] = config
        summary["seed"] = config["seed"]
        summary["bench_name"] = bench_name(config)
        summary["radius"] = round(summary["eps"] * 255)
        summary["rows"] = read_metrics(workdir)
        summary["wall"] = read_wall(workdir)
        summary["retrain"] = read_json_if_present(os.path.join(workdir, "retrain.json"))
        runs.append(summary)
    return runs


def bench_name(config: dict[str, Any]) -> str:
    """The method's name in experiments.bench_speed: ``pgd10`` for PGD-10, else the method."""
    return f"pgd{config['pgd_steps']}" if config["method"] == "pgd" else config["method"]


def read_bench(ledger: str) -> dict[str, Any]:
    """The ledger's bench_speed.json (experiments.bench_speed's JSON); {} if absent."""
    return read_json_if_present(os.path.join(ledger, BENCH_FILE)) or {}


def read_wall(workdir: str) -> dict[str, float]:
    """A ledger run's wall.json: seconds per stage ("train", "retrain", "attack"); {} if
    absent."""
    return read_json_if_present(os.path.join(workdir, "wall.json")) or {}


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values; both None if empty)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def format_mean_std(values: Sequence[float]) -> str:
    """ "27.3 +- 1.2" (percent) for several values, "27.3" for one, "-" for none."""
    mean, std = mean_std([100 * v for v in values])
    if mean is None:
        return MISSING
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def format_some_seeds(values: Sequence[float], seeds: int) -> str:
    """:func:`format_mean_std` of the ``values`` measured on some of a group's ``seeds``
    runs, naming how many when not all: "21.6 (1 of 2 seeds)"."""
    partial = f" ({len(values)} of {seeds} seeds)" if 0 < len(values) < seeds else ""
    return format_mean_std(values) + partial


def autoattack_accuracy(epoch: dict[str, Any]) -> float | None:
    """The AutoAttack robust accuracy of a summary's best or last epoch, if evaluated."""
    attacks = epoch.get("attacks") or {}
    return attacks.get("autoattack")


def group_runs(
    runs: Sequence[dict[str, Any]], bench: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Runs grouped by (method, radius), in first-appearance order, with their statistics.

    ``bench`` (:func:`read_bench`) gives each group's ``bench_seconds``: its runs' steps x
    its method's median step time there (None without it, or without the method)."""
    step_seconds = {name: r["step_s"] for name, r in (bench or {}).get("results", {}).items()}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["method_label"], run["radius"]), []).append(run)
    table = []
    for (label, radius), members in sorted(groups.items(), key=lambda kv: kv[0][1]):
        best_aa = [a for r in members if (a := autoattack_accuracy(r["best"])) is not None]
        last_aa = [a for r in members if (a := autoattack_accuracy(r["last"])) is not None]
        table.append(
            {
                "method": label,
                "radius": radius,
                "passes": members[0]["passes_per_step"],
                "seeds": sorted(r["seed"] for r in members),
                "collapsed": sum(r["collapsed_epoch"] is not None for r in members),
                "collapse_epochs": [r["collapsed_epoch"] for r in members],
                "never_robust": sum(r["best"]["pgd20_acc"] < COLLAPSE_MIN_BEST for r in members),
                "train_seconds": mean_std([r["train_seconds"] for r in members])[0],
                "bench_seconds": (
                    members[0]["rows"][-1]["step"] * step_seconds[members[0]["bench_name"]]
                    if members[0]["bench_name"] in step_seconds
                    else None
                ),
                "final_pgd": [r["last"]["pgd20_acc"] for r in members],
                "best_pgd": [r["best"]["pgd20_acc"] for r in members],
                "final_clean": [r["last"]["clean_acc"] for r in members],
                "best_aa": best_aa,
                "last_aa": last_aa,
                "aa_points": next(
                    (r["best"]["attacks"]["num_points"] for r in members if r["best"]["attacks"]),
                    None,
                ),
            }
        )
    return table


def results_table(groups: Sequence[dict[str, Any]]) -> str:
    """The markdown table of :func:`group_runs`' rows."""
    header = (
        "| method | train eps | passes/step | seeds | collapsed | train time | one-machine time "
        "| final clean | final PGD-20 | best PGD-20 | final AA | best AA |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for g in groups:
        epochs = ", ".join(str(e) for e in g["collapse_epochs"] if e is not None)
        collapsed = f"{g['collapsed']}/{len(g['seeds'])}" + (f" (ep. {epochs})" if epochs else "")
        if g["never_robust"]:
            collapsed += f"; {g['never_robust']} never robust"
        lines.append(
            f"| {g['method']} | {g['radius']}/255 | {g['passes']} | {len(g['seeds'])} "
            f"| {collapsed} | {format_duration(g['train_seconds'])} "
            f"| {format_duration(g['bench_seconds'])} "
            f"| {format_mean_std(g['final_clean'])} | {format_mean_std(g['final_pgd'])} "
            f"| {format_mean_std(g['best_pgd'])} "
            f"| {format_some_seeds(g['last_aa'], len(g['seeds']))} "
            f"| {format_some_seeds(g['best_aa'], len(g['seeds']))} |"
        )
    return "\n".join(lines)


def runtime_line(runs: Sequence[dict[str, Any]]) -> str:
    """The study's total wall time so far, split into training, training again (runs whose
    checkpoints were gone before their AutoAttack) and AutoAttack."""
    train, retrain, attack = (
        sum(r["wall"].get(key, 0.0) for r in runs) for key in ("train", "retrain", "attack")
    )
    again = f"{format_duration(retrain)} training again for checkpoints, " if retrain else ""
    return (
        f"Wall time of the {len(runs)} runs so far: "
        f"{format_duration(train + retrain + attack)} ({format_duration(train)} training "
        f"with its per-epoch evaluation, {again}{format_duration(attack)} AutoAttack), on the "
        "machine each ran on."
    )


def retrain_note(runs: Sequence[dict[str, Any]]) -> str:
    """A sentence naming the runs whose AutoAttack is of a model trained again that did not
    repeat the ledger's accuracies, and by how much; "" when there are none."""
    differing = [r for r in runs if r["retrain"]]
    if not differing:
        return ""
    worst = max(100 * r["retrain"]["pgd20_acc"] for r in differing)
    return (
        f"The AutoAttack accuracies of {', '.join(r['label'] for r in differing)} are of a "
        "model trained again for its checkpoints whose per-epoch accuracies differ from the "
        f"table's record by up to {worst:.1f} points of PGD-20 (retrain.json in the ledger)."
    )


def plot_figures(
    runs: Sequence[dict[str, Any]], groups: Sequence[dict[str, Any]], out: str
) -> None:
    """Writes curves.png, pareto.png and psi.png into ``out``."""
    plt = pyplot()
    radii = sorted({r["radius"] for r in runs})
    methods = list(dict.fromkeys(r["method_label"] for r in runs))
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}

    fig, axes = plt.subplots(1, len(radii), figsize=(6 * len(radii), 4), squeeze=False)
    for ax, radius in zip(axes[0], radii, strict=True):
        for r in (r for r in runs if r["radius"] == radius):
            epochs = [row["epoch"] for row in r["rows"]]
            pgd = [100 * row["pgd20_acc"] for row in r["rows"]]
            ax.plot(epochs, pgd, color=colors[r["method_label"]], alpha=0.8, lw=1.2)
        for m in methods:
            ax.plot([], [], color=colors[m], label=m)
        ax.set(title=f"trained and attacked at eps {radius}/255", xlabel="epoch",
               ylabel="PGD-20 accuracy (%)")  # fmt: skip
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(fig)

    one_machine = all(g["bench_seconds"] is not None for g in groups)
    xlabel = "training time (min): " + (
        "steps x bench_speed's step time, one machine" if one_machine else "measured mean"
    )
    fig, axes = plt.subplots(1, len(radii), figsize=(6 * len(radii), 4), squeeze=False)
    for ax, radius in zip(axes[0], radii, strict=True):
        for g in (g for g in groups if g["radius"] == radius):
            minutes = (g["bench_seconds"] if one_machine else g["train_seconds"] or 0) / 60
            for key, marker in (("best_pgd", "o"), ("final_pgd", "x")):
                mean, std = mean_std([100 * v for v in g[key]])
                ax.errorbar(minutes, mean, yerr=std or 0, fmt=marker, color=colors[g["method"]],
                            capsize=3)  # fmt: skip
            ax.annotate(f"{g['method']} ({g['passes']})", (minutes, mean), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
        ax.set(title=f"eps {radius}/255: best (o) and final (x) PGD-20",
               xlabel=xlabel, ylabel="PGD-20 accuracy (%)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pareto.png"), dpi=110)
    plt.close(fig)

    plot_psi(runs, out)


def bench_caption(bench: dict[str, Any]) -> str:
    """The table caption's sentence on the one-machine time."""
    if not bench:
        return "One-machine time: not measured (no bench_speed.json in the ledger)."
    machine, config = bench["machine"], bench["config"]
    return (
        "One-machine time: the run's steps x its method's median step time in one "
        f"`experiments.bench_speed` run ({config['model']} width {config['width']}, batch "
        f"{config['batch_size']}, {config['dtype']}; {machine['host_cpus']} CPUs, "
        f"{machine['platform']}, jax {machine['jax']}, {machine['date']}), every method side "
        "by side: the runs trained on VMs of different speed, so only this column compares "
        "methods' costs, and the Pareto figure uses it."
    )


def section(
    runs: Sequence[dict[str, Any]],
    groups: Sequence[dict[str, Any]],
    bench: dict,
    figures: str,
    psi_sweep: str = "",
    sweep: Sequence[dict[str, Any]] = (),
) -> str:
    """The markdown between the markers; ``figures`` is the figures' path from the .md file,
    ``psi_sweep`` the sweep's part (experiments.fast_at_psi.sweep_section), if any, and
    ``sweep`` its ledger's runs, whose wall time counts in the study's."""
    aa_points = next((g["aa_points"] for g in groups if g["aa_points"]), None)
    parts = [
        results_table(groups),
        "",
        "Accuracies in %, mean ± sample std over the seeds (one value: one seed). "
        "PGD-20: 20 steps of eps/4, one random start, at the training eps, on the first "
        "1,000 test images after every epoch; best = the epoch of highest PGD-20 accuracy; "
        f"AA: AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on the first {aa_points or '-'} "
        'test images at the best and the final epoch ("-": not run yet). '
        f"{COLLAPSE_CAPTION} Train time: mean measured training time per run (evaluation "
        f"excluded) on the 2-core CPU VMs. {bench_caption(bench)} Passes/step: forward + "
        "backward passes per training step.",
        "",
        f"![PGD-20 per epoch]({figures}/curves.png)",
        "",
        f"![robust accuracy against training time]({figures}/pareto.png)",
    ]
    psi = psi_rows(runs)
    if psi:
        parts += ["", "APART's psi at the end of training (mean over seeds):", "", psi_table(psi)]
        parts += ["", f"![APART's psi over training]({figures}/psi.png)"]
    if psi_sweep:
        parts += ["", psi_sweep]
    parts += ["", runtime_line([*runs, *sweep])]
    if retrain_note(runs):
        parts += ["", retrain_note(runs)]
    return "\n".join(parts)


def write_report(ledger: str, results_md: str, psi_ledger: str | None = None) -> str:
    """Regenerates the figures and ``results_md``'s section from the ledger (and the psi
    sweep's, ``psi_ledger``, where it holds runs); returns the section.

    Raises:
      ValueError: ``results_md`` lacks the markers, or the ledger holds no finished run.
    """
    runs = load_ledger(ledger)
    if not runs:
        raise ValueError(f"{ledger} holds no finished run: run the train stage first")
    bench = read_bench(ledger)
    groups = group_runs(runs, bench)
    plot_figures(runs, groups, ledger)
    md_dir = os.path.dirname(os.path.abspath(results_md)) or "."
    sweep = load_ledger(psi_ledger) if psi_ledger else []
    psi_sweep = ""
    if sweep:
        ordered = in_sweep_order(sweep_base(runs, sweep), sweep)
        plot_sweep(ordered, psi_ledger)
        psi_sweep = sweep_section(ordered, os.path.relpath(psi_ledger, md_dir))
    block = section(runs, groups, bench, os.path.relpath(ledger, md_dir), psi_sweep, sweep)
    with open(results_md) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{results_md} lacks the {BEGIN} ... {END} markers")
    pattern = re.escape(BEGIN) + ".*?" + re.escape(END)
    text = re.sub(pattern, lambda _: f"{BEGIN}\n{block}\n{END}", text, flags=re.S)
    with open(results_md, "w") as f:
        f.write(text)
    return block
