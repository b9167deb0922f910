"""APART's psi in the fast-at study: how large it grows, and whether psi's rate or its decay
keeps the layer-wise part small.

:func:`psi_rows` and :func:`plot_psi` report the study's APART runs at the end of training
and over it (``psi.png``). At the study's scale the largest layer alpha ends at about a third
of the input alpha (docs/results.md), so the **sweep** trains one study run again
(``--psi_base`` of experiments/fast_at_study.py, by default APART at 16/255 with seed 0) once
per changed psi setting (``--psi_sweep``: ``psi_lr_scale=4`` multiplies psi's peak rate by 4,
``psi_weight_decay=100`` sets its decay) into a ledger of its own
(``docs/results/fast_at_psi/``, run ``apart16_s0_psi_lr_scale4``); :func:`sweep_section` sets
each run's final psi and accuracies beside the unchanged run's, with ``psi_sweep.png``.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

from experiments.figures import pyplot

SWEEP = ("psi_lr_scale=2", "psi_lr_scale=4", "psi_lr_scale=8", "psi_weight_decay=100")
SWEEP_KEYS = ("psi_lr_scale", "psi_weight_decay")


def parse_setting(setting: str) -> tuple[str, float]:
    """``"psi_lr_scale=4"`` -> ``("psi_lr_scale", 4.0)``.

    Raises:
      ValueError: the key is not one of SWEEP_KEYS or the value is not a positive number.
    """
    key, _, value = setting.partition("=")
    if key not in SWEEP_KEYS:
        raise ValueError(f"psi setting {setting!r}: the key must be one of {', '.join(SWEEP_KEYS)}")
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise ValueError(f"psi setting {setting!r}: the value must be a positive number")
    return key, number


def sweep_label(base: str, setting: str) -> str:
    """The sweep run's label: ``("apart16_s0", "psi_lr_scale=4")`` ->
    ``"apart16_s0_psi_lr_scale4"``."""
    key, value = parse_setting(setting)
    return f"{base}_{key}{value:g}"


def final_psi(run: dict[str, Any]) -> dict[str, float]:
    """A run's psi after its last epoch: ``alpha`` and ``alpha_omega`` (in [0, 1] pixel
    units) and ``max_layer_alpha``, the largest ``|alpha_i|`` of its residual blocks."""
    psi = run["rows"][-1]["psi"]
    return {
        "alpha": psi["alpha"],
        "alpha_omega": psi["alpha_omega"],
        "max_layer_alpha": max(abs(a) for a in psi["layer_alphas"]),
    }


def psi_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """APART's psi at the end of training per radius of the study's ledger ``runs``
    (fast_at_report.load_ledger): ``radius``, ``seeds`` and the mean over seeds of each
    :func:`final_psi` value."""
    rows = []
    for radius in sorted({r["radius"] for r in runs if r["method"] == "apart"}):
        finals = [final_psi(r) for r in runs if r["method"] == "apart" and r["radius"] == radius]
        rows.append(
            {
                "radius": radius,
                "seeds": len(finals),
                **{key: statistics.fmean(f[key] for f in finals) for key in finals[0]},
            }
        )
    return rows


def psi_table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of :func:`psi_rows`."""
    lines = [
        "| train eps | seeds | alpha (x255) | alpha_omega (x255) | alpha / alpha_omega "
        "| largest layer alpha | largest layer alpha / alpha |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['radius']}/255 | {r['seeds']} | {255 * r['alpha']:.2f} "
            f"| {255 * r['alpha_omega']:.2f} | {r['alpha'] / r['alpha_omega']:.2f} "
            f"| {r['max_layer_alpha']:.2e} | {r['max_layer_alpha'] / r['alpha']:.2f} |"
        )
    return "\n".join(lines)


def plot_psi(runs: Sequence[dict[str, Any]], out: str) -> None:
    """Writes ``psi.png`` into ``out``: alpha, alpha_omega and the largest layer alpha per
    epoch of every APART run in ``runs``, dashed above the smallest radius; nothing without
    APART runs."""
    apart = [r for r in runs if r["method"] == "apart"]
    if not apart:
        return
    plt = pyplot()
    smallest = min(r["radius"] for r in apart)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for r in apart:
        epochs = [row["epoch"] for row in r["rows"]]
        style = "-" if r["radius"] == smallest else "--"
        psi = [row["psi"] for row in r["rows"]]
        axes[0].plot(epochs, [255 * p["alpha"] for p in psi], "C0" + style)
        axes[0].plot(epochs, [255 * p["alpha_omega"] for p in psi], "C1" + style)
        axes[1].plot(epochs, [max(abs(a) for a in p["layer_alphas"]) for p in psi], "C2" + style)
    axes[0].plot([], [], "C0", label="alpha")
    axes[0].plot([], [], "C1", label="alpha_omega")
    axes[0].set(title="APART: alpha and alpha_omega (x255); dashed: larger eps", xlabel="epoch")
    axes[0].legend()
    axes[1].set(title="APART: largest |layer alpha|", xlabel="epoch", yscale="log")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "psi.png"), dpi=110)
    plt.close(fig)


def sweep_base(
    runs: Sequence[dict[str, Any]], sweep: Sequence[dict[str, Any]]
) -> dict[str, Any] | None:
    """The study run (of ``runs``) that the ``sweep``'s runs change: APART at their radius
    and seed; None if the study has not trained it."""
    key = ("apart", sweep[0]["radius"], sweep[0]["seed"])
    return next((r for r in runs if (r["method"], r["radius"], r["seed"]) == key), None)


def in_sweep_order(
    base: dict[str, Any] | None, runs: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The unchanged ``base`` run (a fast_at_report ledger run; None if not trained) first,
    then the sweep's ``runs`` by decay, largest first, then by rate."""
    ordered = sorted(
        runs, key=lambda r: (-r["config"]["psi_weight_decay"], r["config"]["psi_lr_scale"])
    )
    return ([base] if base else []) + ordered


def sweep_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ledger run: its ``label``, ``psi_lr_scale`` and ``psi_weight_decay``,
    :func:`final_psi`, and its final clean, final PGD-20 and best PGD-20 accuracy (in
    [0, 1])."""
    return [
        {
            "label": r["label"],
            **{key: r["config"][key] for key in SWEEP_KEYS},
            **final_psi(r),
            "final_clean": r["last"]["clean_acc"],
            "final_pgd": r["last"]["pgd20_acc"],
            "best_pgd": r["best"]["pgd20_acc"],
        }
        for r in runs
    ]


def sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of :func:`sweep_rows`."""
    lines = [
        "| run | psi rate x | psi decay | alpha (x255) | alpha_omega (x255) "
        "| largest layer alpha | largest layer alpha / alpha | final clean | final PGD-20 "
        "| best PGD-20 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['psi_lr_scale']:g} | {r['psi_weight_decay']:g} "
            f"| {255 * r['alpha']:.2f} | {255 * r['alpha_omega']:.2f} "
            f"| {r['max_layer_alpha']:.2e} | {r['max_layer_alpha'] / r['alpha']:.2f} "
            f"| {100 * r['final_clean']:.1f} | {100 * r['final_pgd']:.1f} "
            f"| {100 * r['best_pgd']:.1f} |"
        )
    return "\n".join(lines)


def plot_sweep(runs: Sequence[dict[str, Any]], out: str) -> None:
    """Writes ``psi_sweep.png`` into ``out``: alpha and the largest layer alpha per epoch,
    one line per ledger run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, run in enumerate(runs):
        epochs = [row["epoch"] for row in run["rows"]]
        psi = [row["psi"] for row in run["rows"]]
        axes[0].plot(epochs, [255 * p["alpha"] for p in psi], color=f"C{i}", label=run["label"])
        layer = [max(abs(a) for a in p["layer_alphas"]) for p in psi]
        axes[1].plot(epochs, layer, color=f"C{i}")
    axes[0].set(title="APART: alpha (x255) per psi setting", xlabel="epoch")
    axes[0].legend(fontsize=8)
    axes[1].set(title="APART: largest |layer alpha|", xlabel="epoch", yscale="log")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "psi_sweep.png"), dpi=110)
    plt.close(fig)


def sweep_section(runs: Sequence[dict[str, Any]], figures: str) -> str:
    """The report's part on the sweep, the runs in :func:`in_sweep_order`: caption, table
    and figure (``figures``: the sweep ledger's path from the markdown file)."""
    last = runs[-1]
    return "\n".join(
        [
            f"APART at {last['radius']}/255, seed {last['seed']}, with one psi setting changed "
            "per run (`--psi_sweep` of experiments/fast_at_study.py, one run each; psi rate "
            "x: `psi_lr_scale`, on top of the study's auto-scaled rate; psi decay: "
            "`psi_weight_decay`), the study's run unchanged first:",
            "",
            sweep_table(sweep_rows(runs)),
            "",
            f"![APART's psi per psi setting]({figures}/psi_sweep.png)",
        ]
    )
