"""experiments.summarize on hand-written run directories, and experiments.evaluate's --step."""

from __future__ import annotations

import csv
import json

import pytest

from apart_jax.config import ConfigError
from experiments.evaluate import epoch_of, report_path, resolve_step
from experiments.run_summary import load_run_summary
from experiments.summarize import format_duration, format_eps, format_table, unique_labels
from tests.conftest import run_module

STEPS_PER_EPOCH = 40


def write_run(directory, config, accuracies, train_seconds, eval_examples=256):
    """A run directory: config.json and one metrics.jsonl row per (clean, pgd20) pair."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    rows = [
        {
            "epoch": epoch,
            "step": epoch * STEPS_PER_EPOCH,
            "method": config["method"],
            "train_loss": 1.0,
            "train_acc": 0.5,
            "clean_acc": clean,
            "pgd20_acc": pgd20,
            "train_seconds": train_seconds * epoch / len(accuracies),
            "eval_seconds": 3.0,
            "eval_examples": eval_examples,
        }
        for epoch, (clean, pgd20) in enumerate(accuracies, start=1)
    ]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def write_eval(directory, name, step, clean, attacks, num_points=1000, eps=8 / 255):
    """An experiments.evaluate report with ``attacks`` = {suite entry: robust accuracy}."""
    report = {
        "workdir": str(directory),
        "checkpoint_step": step,
        "epoch": epoch_of(step, STEPS_PER_EPOCH),
        "method": "x",
        "num_points": num_points,
        "eps": eps,
        "norm": "linf",
        "bn_mode": "inference",
        "clean_accuracy": clean,
        "results": {
            entry: {"robust_accuracy": acc, "seconds": 1.0, "stages": []}
            for entry, acc in attacks.items()
        },
    }
    (directory / name).write_text(json.dumps(report))


def config(method, epochs, **overrides):
    return {
        "method": method,
        "eps": 8 / 255,
        "pgd_steps": 10,
        "pgd_step_size": 2 / 255,
        "fgsm_rs_step_scale": 1.25,
        "epochs": epochs,
        "eval_eps": 8 / 255,
        "eval_pgd_steps": 20,
        "eval_pgd_step_size": 2 / 255,
        **overrides,
    }


@pytest.fixture
def runs(tmp_path):
    """Two runs: a finished APART with its last epoch evaluated and its best not; an
    unfinished PGD-10 whose best epoch ties (taken: the later) and has a C&W-only report,
    next to a stale eval.json of an earlier step (ignored)."""
    apart = write_run(
        tmp_path / "apart_run",
        config("apart", 3),
        [(0.50, 0.30), (0.60, 0.42), (0.65, 0.40)],
        train_seconds=390.0,
    )
    write_eval(apart, "eval.json", 3 * STEPS_PER_EPOCH, 0.661, {"cw": 0.381, "autoattack": 0.3705})
    pgd = write_run(
        tmp_path / "pgd_run",
        config("pgd", 5),
        [(0.40, 0.30), (0.55, 0.45), (0.55, 0.45), (0.58, 0.41)],
        train_seconds=42.0,
    )
    write_eval(pgd, "eval_step120.json", 120, 0.549, {"pgd20": 0.46, "cw": 0.4325})
    write_eval(pgd, "eval.json", 80, 0.5, {"cw": 0.1, "autoattack": 0.1})  # not best, not last
    return apart, pgd


def parse_table(text):
    """{run label: {column: cell}} of a markdown table (the first block of "|" lines)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, body = split[0], split[2:]
    assert set(lines[1]) <= set("|-")
    return {row[0]: dict(zip(header, row, strict=True)) for row in body}


def test_the_table_shows_best_and_last_epochs_and_what_was_evaluated(runs):
    apart, pgd = runs
    summaries = [load_run_summary(str(apart)), load_run_summary(str(pgd))]
    text = format_table(summaries, title="Subset study")
    assert text.startswith("## Subset study\n")
    table = parse_table(text)
    assert list(table) == ["apart_run", "pgd_run"]

    a = table["apart_run"]
    assert (a["method"], a["train eps"], a["passes/step"]) == ("APART", "8/255", "2")
    assert (a["epochs"], a["train time"]) == ("3", "6.5 min")
    assert (a["best epoch"], a["best clean"], a["best PGD-20"]) == ("2", "60.00%", "42.00%")
    for column in ("best C&W", "best AA", "best clean (attack pts)"):
        assert a[column] == "-"
    assert (a["last epoch"], a["last clean"], a["last PGD-20"]) == ("3", "65.00%", "40.00%")
    assert (a["last C&W"], a["last AA"]) == ("38.10%", "37.05%")
    assert a["last clean (attack pts)"] == "66.10%"

    p = table["pgd_run"]
    assert (p["method"], p["passes/step"]) == ("PGD-10", "11")
    assert (p["epochs"], p["train time"]) == ("4/5", "42 s")
    # Epochs 2 and 3 tie on PGD-20 and clean accuracy: the later one is the best.
    assert (p["best epoch"], p["best clean"], p["best PGD-20"]) == ("3", "55.00%", "45.00%")
    assert (p["best C&W"], p["best AA"], p["best clean (attack pts)"]) == ("43.25%", "-", "54.90%")
    # eval.json is of step 80, neither the best (120) nor the last (160) epoch.
    assert (p["last epoch"], p["last C&W"], p["last AA"]) == ("4", "-", "-")
    assert p["last clean (attack pts)"] == "-"

    protocol = text.strip().splitlines()[-1]
    assert protocol.startswith("Protocol: clean and PGD-20 accuracy from metrics.jsonl on 256 ")
    assert "PGD 20 steps of 2/255 at L-inf eps 8/255" in protocol
    assert "on the first 1000 test points at L-inf eps 8/255" in protocol


def test_the_protocol_line_names_the_runs_where_they_differ(tmp_path):
    a = write_run(tmp_path / "a", config("fgsm", 1), [(0.5, 0.2)], 10.0, eval_examples=256)
    b = write_run(tmp_path / "b", config("fgsm_rs", 1), [(0.5, 0.2)], 10.0, eval_examples=1000)
    write_eval(a, "eval.json", STEPS_PER_EPOCH, 0.5, {"cw": 0.2}, num_points=500)
    text = format_table([load_run_summary(str(a)), load_run_summary(str(b))])
    assert "on 256 (a), 1000 (b) test examples" in text
    assert "on the first 500 test points" in text
    table = parse_table(text)
    assert table["a"]["best C&W"] == table["a"]["last C&W"] == "20.00%"
    assert table["b"]["passes/step"] == "2"


def test_clean_training_and_no_evaluation_at_all(tmp_path):
    run = write_run(tmp_path / "c", config("clean", 2), [(0.95, 0.0), (0.9, 0.0)], 7200.0)
    text = format_table([load_run_summary(str(run))])
    row = parse_table(text)["c"]
    assert (row["method"], row["train eps"], row["passes/step"]) == ("Clean", "-", "1")
    assert row["train time"] == "2.0 h"
    assert row["best epoch"] == "1"  # PGD-20 ties at 0: the higher clean accuracy wins
    assert "C&W and AA not evaluated" in text


def test_formats():
    assert format_duration(390) == "6.5 min"
    assert format_duration(59.4) == "59 s"
    assert format_duration(5400) == "1.5 h"
    assert format_eps(8 / 255) == "8/255"
    assert format_eps(16 / 255) == "16/255"
    assert format_eps(0.5 / 255) == "0.5/255"


def test_labels_fall_back_to_method_and_eps_where_basenames_coincide():
    def summary(workdir, method, eps):
        return {"workdir": workdir, "label": "run", "method": method, "eps": eps}

    labels = unique_labels([summary("x/run", "apart", 8 / 255), summary("y/run", "fgsm", 8 / 255)])
    assert labels == ["apart 8/255", "fgsm 8/255"]
    labels = unique_labels([summary("x/run", "fgsm", 8 / 255), summary("y/run", "fgsm", 8 / 255)])
    assert labels == ["x/run", "y/run"]
    with pytest.raises(ConfigError, match="given twice"):
        unique_labels([summary("x/run", "fgsm", 0.1), summary("x/run", "fgsm", 0.1)])


def test_bad_directories_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        load_run_summary(str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="not a training run: no config.json"):
        load_run_summary(str(tmp_path))
    run = write_run(tmp_path / "r", config("apart", 1), [(0.5, 0.2)], 1.0)
    (run / "metrics.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_run_summary(str(run))
    row = '{"epoch": 1, "step": 40, "method": "apart", "clean_acc": 0.5}\n'
    (run / "metrics.jsonl").write_text(row)
    with pytest.raises(ConfigError, match=r"metrics.jsonl:1: missing key\(s\) pgd20_acc"):
        load_run_summary(str(run))


@pytest.mark.slow
def test_command_writes_markdown_and_csv(runs, tmp_path):
    apart, pgd = runs
    out, table_csv = tmp_path / "out" / "table.md", tmp_path / "table.csv"
    proc = run_module(
        "experiments.summarize",
        f"--workdir={apart}",
        f"--workdir={pgd}",
        f"--out={out}",
        f"--csv={table_csv}",
    )
    assert proc.returncode == 0, proc.stderr
    assert parse_table(out.read_text())["pgd_run"]["best C&W"] == "43.25%"
    assert out.read_text() in proc.stdout
    # Missing: APART's best epoch, PGD's last, and PGD's best (C&W only, no AutoAttack).
    lines = [line.strip() for line in proc.stdout.splitlines()]
    commands = [line for line in lines if line.startswith("python -m experiments.evaluate")]
    assert [c.split(" --suite")[0].split("--workdir=")[1] for c in commands] == [
        f"{apart} --step=80",
        f"{pgd} --step=120",
        f"{pgd} --step=160",
    ]
    assert all(c.endswith("--suite=cw,autoattack --num_points=1000") for c in commands)
    with open(table_csv) as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert rows["pgd_run"]["best_epoch"] == "3" and rows["pgd_run"]["best_step"] == "120"
    assert float(rows["pgd_run"]["best_cw"]) == pytest.approx(0.4325)
    assert rows["pgd_run"]["best_autoattack"] == "" and rows["apart_run"]["best_cw"] == ""
    assert float(rows["apart_run"]["train_seconds"]) == pytest.approx(390.0)


@pytest.mark.slow
def test_missing_lists_the_steps_to_evaluate_and_nothing_else(runs):
    apart, pgd = runs
    proc = run_module(
        "experiments.summarize", f"--workdir={apart}", f"--workdir={pgd}", "--missing"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{apart} 80\n{pgd} 120\n{pgd} 160\n"
    done = {"cw": 0.3, "autoattack": 0.25}
    write_eval(apart, "eval_step80.json", 80, 0.6, done)
    write_eval(pgd, "eval_step120.json", 120, 0.549, done)
    write_eval(pgd, "eval_step160.json", 160, 0.55, done)
    proc = run_module(
        "experiments.summarize", f"--workdir={apart}", f"--workdir={pgd}", "--missing"
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr


@pytest.mark.slow
def test_command_rejects_a_run_without_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config("apart", 1)))
    proc = run_module("experiments.summarize", f"--workdir={run}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "metrics.jsonl not found" in lines[0]


def test_evaluate_resolves_the_checkpoint_step():
    assert resolve_step([40, 120, 80], None) == 120
    assert resolve_step([40, 120, 80], 80) == 80
    with pytest.raises(ConfigError, match=r"--step=50: .*saved steps: 40, 80, 120$"):
        resolve_step([120, 40, 80], 50, "runs/x/checkpoints")
    with pytest.raises(ConfigError, match="no checkpoint in runs/x"):
        resolve_step([], None, "runs/x")
    assert [epoch_of(s, 40) for s in (1, 40, 41, 120)] == [1, 1, 2, 3]
    assert report_path("d", 120, newest=120) == "d/eval.json"
    assert report_path("d", 80, newest=120) == "d/eval_step80.json"
