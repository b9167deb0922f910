"""experiments.plot: metrics.jsonl curves loaded and drawn into a PNG; bad input, one line."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_module

from apart_jax.config import ConfigError
from experiments.plot import load_curves, plot_curves, run_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WIDTH, HEIGHT = 800, 500

RUNS = {
    "apart_run": [
        {"epoch": 1, "step": 23, "method": "apart", "clean_acc": 0.5, "pgd20_acc": 0.125},
        {"epoch": 2, "step": 46, "method": "apart", "clean_acc": 0.75, "pgd20_acc": 0.3125},
        {"epoch": 4, "step": 92, "method": "apart", "clean_acc": 0.8, "pgd20_acc": 0.4},
    ],
    "pgd_run": [
        {"epoch": 2, "step": 8, "method": "pgd", "clean_acc": 0.625, "pgd20_acc": 0.375},
    ],
}


def write_metrics(workdir, rows) -> str:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(workdir)


@pytest.fixture
def workdirs(tmp_path):
    return [write_metrics(tmp_path / name, rows) for name, rows in RUNS.items()]


def assert_png(path, width=WIDTH, height=HEIGHT):
    image = pytest.importorskip("matplotlib.image")

    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert image.imread(path).shape[:2] == (height, width)


def test_curves_are_the_written_values(workdirs):
    for workdir, rows in zip(workdirs, RUNS.values(), strict=True):
        curves = load_curves(workdir)
        assert curves == {key: [row[key] for row in rows] for key in curves}
        assert sorted(curves) == ["clean_acc", "epoch", "method", "pgd20_acc"]


def test_plot_curves_writes_a_png(workdirs, tmp_path):
    pytest.importorskip("matplotlib")
    runs = dict(zip(["a (apart)", "b (pgd)"], map(load_curves, workdirs), strict=True))
    out = tmp_path / "figures" / "accuracy.png"
    plot_curves(runs, str(out), "a title")
    assert_png(out)


def test_labels_are_basename_and_method_or_paths_when_basenames_coincide(tmp_path):
    assert run_labels(["runs/a/", "b"], ["apart", "pgd"]) == ["a (apart)", "b (pgd)"]
    assert run_labels(["x/run", "y/run"], ["pgd", "pgd"]) == ["x/run (pgd)", "y/run (pgd)"]
    with pytest.raises(ConfigError, match="given twice"):
        run_labels(["x/run", "x/run/"], ["pgd", "pgd"])


GOOD_ROW = {"epoch": 1, "step": 4, "clean_acc": 0.5, "pgd20_acc": 0.2, "method": "pgd"}


def line(**changes) -> str:
    """GOOD_ROW with ``changes`` as one JSON line; a change to None drops the key."""
    row = {k: v for k, v in {**GOOD_ROW, **changes}.items() if v is not None}
    return json.dumps(row) + "\n"


BAD_METRICS = [
    ("", "is empty"),
    ("\n\n", "is empty"),
    (line() + '{"epoch": 2, "cl', ":2: not valid JSON"),
    ("[1, 2]\n", ":1: expected a JSON object, got list"),
    (line(pgd20_acc=None, method=None), ":1: missing key\\(s\\) method, pgd20_acc"),
    (line(epoch=1.5), "epoch must be an integer"),
]  # the other malformed rows: tests/test_logbook.py


@pytest.mark.parametrize("text, message", BAD_METRICS)
def test_bad_metrics_are_refused_in_one_line(tmp_path, text, message):
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_curves(str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path / "metrics.jsonl") in str(info.value)


def test_missing_workdir_or_metrics(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        load_curves(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="metrics.jsonl not found"):
        load_curves(str(tmp_path))


def plot(*args):
    return run_module("experiments.plot", *args, timeout=300)


def test_plot_command_writes_the_png(workdirs, tmp_path):
    pytest.importorskip("matplotlib")
    proc = plot(*(f"--workdir={w}" for w in workdirs))
    assert proc.returncode == 0, proc.stderr
    default = os.path.join(workdirs[0], "accuracy.png")
    assert proc.stdout.strip() == f"written: {default}"
    assert_png(default)

    out = tmp_path / "out" / "both.png"
    proc = plot(f"--workdir={workdirs[1]}", f"--out={out}", "--title=PGD only")
    assert proc.returncode == 0, proc.stderr
    assert_png(out)


@pytest.mark.parametrize("problem", ["missing workdir", "malformed line"])
def test_plot_command_exits_2_with_one_line(workdirs, tmp_path, problem):
    if problem == "missing workdir":
        args, message = [f"--workdir={tmp_path / 'missing'}"], "no such directory"
    else:
        with open(os.path.join(workdirs[1], "metrics.jsonl"), "a") as f:
            f.write("{oops\n")
        args, message = [f"--workdir={w}" for w in workdirs], ":2: not valid JSON"
    proc = plot(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not os.path.exists(os.path.join(workdirs[0], "accuracy.png"))
