"""The figures of ``experiments.robustness_drop``: the per-epoch curves of its CSV columns
and the FGSM perturbations at chosen epochs, each written to a PNG (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from experiments.figures import pyplot


def plot_columns(axis, rows: Sequence[dict], columns: dict[str, str]) -> None:
    """Draws each column of ``rows`` against the epoch on ``axis``, labelled by the key of
    ``columns`` ({label: column}); columns that are NaN throughout are left out."""
    epochs = [r["epoch"] for r in rows]
    for label, key in columns.items():
        values = [r[key] for r in rows]
        if not all(math.isnan(v) for v in values):
            axis.plot(epochs, values, marker="o", label=label)


def plot_curves(rows: Sequence[dict], path: str, title: str) -> None:
    """Accuracies (left) and both gap diagnostics (right) per epoch, into a PNG."""
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    curves = {
        "Acc(ref, random signs)": "ref_random_acc",
        "Acc(ref, FGSM(theta_FGSM@i))": "ref_fgsm_acc",
        "Acc(theta_FGSM@i, PGD-20)": "fgsm_pgd20_acc",
        "Acc(theta_FGSM+@i, PGD-20)": "fgsm_plus_pgd20_acc",
    }
    plot_columns(left, rows, curves)
    left.set(xlabel="epoch i", ylabel="accuracy", ylim=(0, 1), title="accuracies")
    left.legend(fontsize=8)
    gaps = {
        "(a) transfer: ref random - ref FGSM": "transfer_gap",
        "(b) white-box CE, FGSM model: PGD-20 - FGSM": "fgsm_whitebox_gap",
        "(b) white-box CE, FGSM+ model: PGD-20 - own generator": "fgsm_plus_whitebox_gap",
    }
    plot_columns(right, rows, gaps)
    right.axhline(0.0, color="grey", linewidth=0.8)
    right.set(xlabel="epoch i", ylabel="gap", title="perturbation strength gaps")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_perturbations(
    images: np.ndarray, perturbations: dict[int, np.ndarray], eps: float, path: str
) -> None:
    """Images (N, H, W, C) in [0, 1] in the top row; each epoch's perturbation below.

    Perturbations are shown as 0.5 + delta / (2 eps): grey is 0, black -eps, white +eps.
    """
    plt = pyplot()

    rows = 1 + len(perturbations)
    fig, axes = plt.subplots(rows, len(images), figsize=(1.6 * len(images), 1.7 * rows))
    axes = np.asarray(axes).reshape(rows, len(images))
    panels = [("image", images)] + [
        (f"FGSM delta, epoch {e}", 0.5 + d / (2 * eps)) for e, d in perturbations.items()
    ]
    for r, (label, pictures) in enumerate(panels):
        for c, picture in enumerate(pictures):
            axes[r, c].imshow(np.clip(picture, 0, 1).squeeze(), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
