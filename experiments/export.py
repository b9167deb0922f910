"""Export a training run's checkpoint as PyTorch weights, with a RobustBench model_info file.

    python -m experiments.export --workdir=DIR --out=FILE [--step=STEP] [--psi]

Reads checkpoint --step of DIR (default: the newest) with apart_jax.run.load_model and writes

* FILE.pt: ``torch.save`` of the state dict (torch tensors, CPU), RobustBench's key names;
* FILE.safetensors: the same tensors (readable without torch);
* FILE.json: a model_info record in RobustBench's format (``model_info/<dataset>/Linf/*.json``:
  name, dataset, architecture, eps as a fraction string, clean_acc, reported,
  autoattack_acc as percentage strings, ...), with ``threat_model`` and an ``apart_jax`` object
  holding what RobustBench has no field for: method, checkpoint step and epoch, training time
  (seconds, compilation excluded, from the checkpoint), forward+backward passes per training
  step, model, width, shortcut input, and whether RobustBench's class loads the file.

Accuracies come from the run's reports: clean and AutoAttack accuracy from experiments.evaluate
(DIR/eval_step{STEP}.json, or DIR/eval.json when it is of that step, L-inf only; our JAX
AutoAttack) and, when experiments.crosscheck ran the original AutoAttack on the same
checkpoint, eps and whole test split (DIR/crosscheck.json), ``autoattack_acc`` is the
original's and ``reported`` ours. Without an evaluate report the clean accuracy is the
metrics.jsonl row of that step, and the robust ones are empty strings. The footnote says
where each number comes from.

Only ``preact_resnet18`` and ``small_cnn`` have this layout (a WideResNet exits with status 2
and one line); RobustBench's ``PreActResNet(PreActBlock, [2, 2, 2, 2], bn_before_fc=True,
out_shortcut=False)`` loads the file for ``preact_resnet18`` at width 64 on 3-channel images
("preact" runs: ``out_shortcut=True``); other widths load into
:func:`apart_jax.interop.torch_model.torch_preact_resnet`. --psi adds the APART release's
psi keys (``alpha``, ``alpha_omega``, ``layer{s}.{b}.alpha``), as its ``preact20`` saves them;
RobustBench's class refuses those. Read the files back with
``apart_jax.interop.load_torch_state_dict(path)``.
"""

from __future__ import annotations

import fractions
import json
import math
import os
from typing import Any

import numpy as np
from absl import app, flags

from apart_jax.config import ConfigError
from apart_jax.interop import Architecture, export_state_dict, exported_architecture
from apart_jax.interop.torch_layout import robustbench_compatible
from apart_jax.restore import open_checkpoints
from experiments.cli import parse_flags_or_exit, quiet_logging, run_or_exit
from experiments.evaluate import epoch_of, load_run
from experiments.runs import find_attack_report, read_json, read_run

FLAGS = flags.FLAGS

CROSSCHECK_FILE = "crosscheck.json"  # experiments.crosscheck's report of a run's checkpoint
SUFFIXES = (".pt", ".safetensors", ".json")


def define_flags() -> None:
    """Defines this program's flags (once, before ``app.run``)."""
    flags.DEFINE_string("workdir", None, "A training run's directory (config.json, checkpoints/).")
    flags.DEFINE_string("out", None, "Output path without suffix: FILE.pt, .safetensors, .json.")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_bool("psi", False, "Also write psi as the APART release does (not RobustBench).")
    flags.mark_flags_as_required(["workdir", "out"])


def output_stem(out: str) -> str:
    """``out`` without a .pt / .safetensors / .json suffix (the three files share the stem)."""
    for suffix in SUFFIXES:
        if out.endswith(suffix):
            return out[: -len(suffix)]
    return out


def eps_fraction(eps: float) -> str:
    """eps as RobustBench writes it: "8/255" when eps is k/255, else the nearest small fraction."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    ratio = fractions.Fraction(eps).limit_denominator(10_000)
    return f"{ratio.numerator}/{ratio.denominator}"


def percent(value: float | None) -> str:
    """A fraction in [0, 1] as RobustBench's percentage string "52.48" ("" if None)."""
    return "" if value is None else f"{100 * value:.2f}"


def architecture_label(arch: Architecture) -> str:
    """The architecture's name: PreActResNet-18, PreActResNet-18 (width 32), PreAct small CNN
    (width 16)."""
    base = {"preact_resnet18": "PreActResNet-18", "small_cnn": "PreAct small CNN"}[arch.name]
    if arch.name == "preact_resnet18" and arch.width == 64:
        return base
    return f"{base} (width {arch.width})"


def robustbench_class(arch: Architecture) -> str:
    """The RobustBench constructor call that loads this layout (at width 64, 3 channels)."""
    out_shortcut = arch.shortcut_input == "preact"
    return (
        f"PreActResNet(PreActBlock, [2, 2, 2, 2], bn_before_fc=True, out_shortcut={out_shortcut})"
    )


def read_crosscheck(workdir: str) -> dict[str, Any] | None:
    """DIR/crosscheck.json (experiments.crosscheck's report), or None if there is none."""
    path = os.path.join(workdir, CROSSCHECK_FILE)
    if not os.path.isfile(path):
        return None
    report = read_json(path)
    if not isinstance(report, dict) or "original" not in report:
        raise ConfigError(f"{path}: not an experiments.crosscheck report (no original)")
    return report


def model_info(
    *,
    arch: Architecture,
    config: dict[str, Any],
    method: Any,
    step: int,
    epoch: int,
    train_seconds: float | None,
    evaluation: dict[str, Any] | None,
    metrics_row: dict[str, Any] | None,
    crosscheck: dict[str, Any] | None,
    psi: bool,
) -> dict[str, Any]:
    """The model_info record (RobustBench's fields first, then ``threat_model``, ``apart_jax``).

    evaluation: :func:`experiments.runs.read_attack_report` of the checkpoint (L-inf) or None;
    metrics_row: the metrics.jsonl row of ``step`` or None; crosscheck: an
    experiments.crosscheck report or None (used if it is of ``step``, the evaluation's eps and
    the whole test split).
    """
    eps = evaluation["eps"] if evaluation else config.get("eval_eps", 8 / 255)
    notes = []
    clean = ours = original = None
    if evaluation:
        clean, ours = evaluation["clean_accuracy"], evaluation.get("autoattack")
        notes.append(
            f"clean and reported (apart-jax's JAX AutoAttack) from {evaluation['file']}, "
            f"{evaluation['num_points']} test points"
        )
    elif metrics_row:
        clean = metrics_row["clean_acc"]
        notes.append(f"clean from metrics.jsonl at step {step}; no experiments.evaluate report")
    if (
        crosscheck
        and crosscheck.get("checkpoint_step") == step
        and math.isclose(crosscheck.get("eps", -1), eps, rel_tol=1e-9)
        and crosscheck.get("num_points") == crosscheck.get("test_points")
    ):
        original = crosscheck["original"]["robust_accuracy"]
        notes.append(
            f"autoattack_acc: the original AutoAttack (pyautoattack, standard) on the exported "
            f"PyTorch copy, {crosscheck['num_points']} points ({CROSSCHECK_FILE})"
        )
    elif ours is not None:
        notes.append("autoattack_acc: apart-jax's JAX AutoAttack (no whole-split crosscheck)")
    reason = None if psi else robustbench_compatible(arch)
    if psi:
        reason = "the file holds psi keys (--psi), which RobustBench's class refuses"
    return {
        "link": "",
        "name": f"apart-jax {method.label}, {architecture_label(arch)}",
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": config.get("dataset", ""),
        "venue": "",
        "architecture": architecture_label(arch),
        "eps": eps_fraction(eps),
        "clean_acc": percent(clean),
        "reported": percent(ours),
        "autoattack_acc": percent(original if original is not None else ours),
        "footnote": "; ".join(notes),
        "threat_model": "Linf",
        "apart_jax": {
            "method": method.name,
            "checkpoint_step": step,
            "epoch": epoch,
            "train_seconds": train_seconds,
            "passes_per_step": method.passes_per_step,
            "model": arch.name,
            "width": arch.width,
            "in_channels": arch.in_channels,
            "num_classes": arch.num_classes,
            "shortcut_input": arch.shortcut_input,
            "psi_keys": psi,
            "robustbench_class": robustbench_class(arch),
            "robustbench_loadable": reason is None,
            "robustbench_note": reason
            or "loads with strict=True into RobustBench's class named above",
            "torch_class": "apart_jax.interop.torch_model.torch_preact_resnet (any width)",
        },
    }


def write_files(state_dict: dict[str, np.ndarray], stem: str, info: dict[str, Any]) -> list[str]:
    """Writes STEM.pt (torch.save), STEM.safetensors and STEM.json; returns the three paths."""
    import torch
    from safetensors.numpy import save_file

    from apart_jax.interop.torch_model import torch_state_dict

    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    paths = [stem + suffix for suffix in SUFFIXES]
    torch.save(torch_state_dict(state_dict), paths[0])
    save_file(state_dict, paths[1], metadata={"format": "pt", "source": "apart-jax"})
    with open(paths[2], "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return paths


def export_run(workdir: str, out: str, step: int | None = None, psi: bool = False) -> list[str]:
    """Exports checkpoint ``step`` of ``workdir``; returns the paths written.

    Raises:
      ConfigError: not a run, no such checkpoint, or a model without a PyTorch layout (one line).
    """
    trained, _ = load_run(workdir, step)
    config, method, rows = read_run(workdir)
    try:
        arch = exported_architecture(trained.model, trained.variables)
        state_dict = export_state_dict(
            trained.model, trained.variables, trained.psi if psi else None, step=trained.step
        )
    except ValueError as error:
        raise ConfigError(f"{workdir}: {error}") from None
    with open_checkpoints(workdir) as checkpoints:
        train_seconds = checkpoints.read_meta(trained.step).get("train_seconds")
    evaluation = find_attack_report(workdir, trained.step, ["autoattack"])
    if evaluation is not None and evaluation["norm"] != "linf":
        evaluation = None
    info = model_info(
        arch=arch,
        config=config,
        method=method,
        step=trained.step,
        epoch=epoch_of(trained.step, trained.steps_per_epoch),
        train_seconds=train_seconds,
        evaluation=evaluation,
        metrics_row=next((r for r in rows if r["step"] == trained.step), None),
        crosscheck=read_crosscheck(workdir),
        psi=psi,
    )
    return write_files(state_dict, output_stem(out), info)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logging()
    paths = run_or_exit(lambda: export_run(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.psi))
    with open(paths[-1]) as f:
        info = json.load(f)
    extra = info["apart_jax"]
    print(
        f"{info['name']}, step {extra['checkpoint_step']} (epoch {extra['epoch']}): "
        f"clean {info['clean_acc'] or '-'}%, AutoAttack {info['autoattack_acc'] or '-'}% "
        f"at eps {info['eps']}"
    )
    print(f"RobustBench: {extra['robustbench_note']}")
    for path in paths:
        print(f"written: {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
