"""metrics.jsonl's schema and reader, and MetricsLog's rows and TensorBoard events, read back
with TensorBoard's own reader."""

from __future__ import annotations

import json
import os
import re
import socket
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from apart_jax.config import ConfigError
from apart_jax.logbook import MetricsLog, read_rows, scalar_fields

PSI = {"alpha": 0.25, "alpha_omega": 1e-8, "layer_alphas": [0.5, 2.302585093]}


def row(step: int, clean_acc: float, **extra) -> dict:
    """A row of the schema, epoch ``step // 3`` (three steps per epoch)."""
    return {
        "epoch": step // 3,
        "step": step,
        "method": "apart",
        "train_loss": 1.5,
        "clean_acc": clean_acc,
        "pgd20_acc": clean_acc / 2,
        **extra,
    }


def log_rows(workdir, rows, resume_step=None, tensorboard=True) -> None:
    with MetricsLog(str(workdir), resume_step=resume_step, tensorboard=tensorboard) as log:
        for r in rows:
            log.write(r)


def events(workdir) -> EventAccumulator:
    accumulator = EventAccumulator(str(workdir))
    accumulator.Reload()
    return accumulator


def read_scalars(workdir, tag):
    """The scalar events of ``tag`` in ``workdir`` ([] if none yet)."""
    accumulator = events(workdir)
    return accumulator.Scalars(tag) if tag in accumulator.Tags()["scalars"] else []


def points(accumulator, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def f32(value: float) -> float:
    return float(np.float32(value))


def event_files(workdir) -> list[str]:
    return sorted(name for name in os.listdir(workdir) if "tfevents" in name)


def test_scalar_fields_flatten_nested_numbers_and_leave_out_the_rest():
    fields = scalar_fields({**row(3, 0.5), "psi": PSI, "skipped_steps": 0, "flag": True})
    assert fields == {
        "epoch": 1.0,
        "step": 3.0,
        "train_loss": 1.5,
        "clean_acc": 0.5,
        "pgd20_acc": 0.25,
        "psi/alpha": 0.25,
        "psi/alpha_omega": 1e-8,
        "psi/layer_alphas/0": 0.5,
        "psi/layer_alphas/1": 2.302585093,
        "skipped_steps": 0.0,
    }


def test_rows_go_to_the_file_and_their_numbers_to_tensorboard(tmp_path):
    rows = [row(3, 0.5, psi=PSI), row(6, 0.75, psi=PSI)]
    log_rows(tmp_path, rows)
    assert read_rows(str(tmp_path / "metrics.jsonl")) == rows
    (name,) = event_files(tmp_path)
    pattern = rf"events\.out\.tfevents\.\d{{10}}\.{re.escape(socket.gethostname())}\.1"
    assert re.fullmatch(pattern, name)
    accumulator = events(tmp_path)
    expected_tags = set(scalar_fields(rows[0])) - {"step"}
    assert set(accumulator.Tags()["scalars"]) == expected_tags  # "method" is no number
    for tag in expected_tags:
        assert points(accumulator, tag) == [(r["step"], f32(scalar_fields(r)[tag])) for r in rows]


def test_each_rows_events_reach_the_file_while_the_log_is_open(tmp_path):
    with MetricsLog(str(tmp_path), resume_step=None, tensorboard=True) as log:
        for step in (3, 6):
            log.write(row(step, 0.5))
            deadline = time.monotonic() + 30  # tensorboardX writes within about a second
            while step not in [e.step for e in read_scalars(tmp_path, "clean_acc")]:
                assert time.monotonic() < deadline
                time.sleep(0.1)


def test_a_resumed_log_keeps_the_rows_up_to_its_step_and_tensorboard_hides_the_rest(
    tmp_path, monkeypatch
):
    # Both runs start in the same second, the resolution of event file names.
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    log_rows(tmp_path, [row(3, 0.1), row(6, 0.2), row(9, 0.3)])
    # Resumed from the checkpoint of step 6.
    log_rows(tmp_path, [row(9, 0.4), row(12, 0.5)], resume_step=6)
    rows = read_rows(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["clean_acc"]) for r in rows] == [(3, 0.1), (6, 0.2), (9, 0.4), (12, 0.5)]
    assert [name.rsplit(".", 1)[1] for name in event_files(tmp_path)] == ["1", "7"]
    assert points(events(tmp_path), "clean_acc") == [
        (3, f32(0.1)),
        (6, f32(0.2)),
        (9, f32(0.4)),
        (12, f32(0.5)),
    ]


def test_a_new_run_hides_a_stale_runs_events_and_rows(tmp_path, monkeypatch):
    for seconds, rows in (
        (1_700_000_000.0, [row(3, 0.1), row(6, 0.2)]),
        (1_700_000_060.0, [row(6, 0.9)]),
    ):
        monkeypatch.setattr(time, "time", lambda seconds=seconds: seconds)
        log_rows(tmp_path, rows)
    assert len(event_files(tmp_path)) == 2
    assert read_rows(str(tmp_path / "metrics.jsonl")) == [row(6, 0.9)]
    assert points(events(tmp_path), "clean_acc") == [(6, f32(0.9))]


def test_resuming_without_a_metrics_file_starts_one(tmp_path):
    log_rows(tmp_path, [row(9, 0.3)], resume_step=6, tensorboard=False)
    assert read_rows(str(tmp_path / "metrics.jsonl")) == [row(9, 0.3)]
    assert event_files(tmp_path) == []


def test_a_disabled_log_keeps_rows_in_memory_and_writes_nothing(tmp_path):
    with MetricsLog(str(tmp_path), resume_step=None, tensorboard=True, enabled=False) as log:
        log.write(row(3, 0.5))
    assert log.rows == [row(3, 0.5)] and log.path == str(tmp_path / "metrics.jsonl")
    assert os.listdir(tmp_path) == []


def test_blank_lines_are_skipped_and_an_empty_file_has_no_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n")
    assert read_rows(str(path)) == []
    path.write_text(f"\n{json.dumps(row(3, 0.5))}\n\n")
    assert read_rows(str(path)) == [row(3, 0.5)]


GOOD = row(3, 0.5, psi=PSI, eval_examples=64, skipped_steps=0)


def line(**changes) -> str:
    """GOOD with ``changes`` as one JSON line; a change to None drops the key."""
    return json.dumps({k: v for k, v in {**GOOD, **changes}.items() if v is not None}) + "\n"


BAD_METRICS = [
    (line() + '{"epoch": 2, "cl', ":2: not valid JSON"),
    ("[1, 2]\n", ":1: expected a JSON object, got list"),
    (line(step=None, pgd20_acc=None), ":1: missing key\\(s\\) step, pgd20_acc"),
    (line(epoch=1.5), ":1: epoch must be an integer, got 1.5"),
    (line(step=True), "step must be an integer, got True"),
    (line(method=3), "method must be a string, got 3"),
    (line(clean_acc="x"), "clean_acc must be a number, got 'x'"),
    (line(train_loss=None, train_acc=[0.5]), "train_acc must be a number"),
    (line(eval_examples=64.0), "eval_examples must be an integer"),
    (line(psi={"alpha": "big"}), "psi must be an object of numbers and lists of numbers"),
    (line(psi={"layer_alphas": [0.5, None]}), "psi must be an object"),
    (line(skipped_steps=False), "skipped_steps must be an integer"),
]


@pytest.mark.parametrize("text, message", BAD_METRICS)
def test_bad_rows_are_refused_in_one_line_naming_the_line(tmp_path, text, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        read_rows(str(path))
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{path}:")


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="metrics.jsonl not found: no epoch has been evaluated"):
        read_rows(str(tmp_path / "metrics.jsonl"))


def test_a_resumed_log_refuses_a_malformed_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(line() + "{oops\n")
    with pytest.raises(ConfigError, match="metrics.jsonl:2: not valid JSON"):
        MetricsLog(str(tmp_path), resume_step=6, tensorboard=False)
