"""Catastrophic-overfitting detection: the definition (apart_jax.collapse), its config keys,
the trainer's "continue", "stop" and "revert" on tiny runs whose evaluation is scripted (so
the collapse epoch is certain), and the summary table's column."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import shutil

import numpy as np
import pytest
from conftest import checkpoint_steps, host_leaves, tiny_config

from apart_jax import trainer
from apart_jax.checkpoint import RunCheckpoints
from apart_jax.collapse import Collapse, best_epoch, collapse_epoch, detect_collapse
from apart_jax.config import EXECUTION_KEYS, ConfigError, resume_conflicts, validate_config
from apart_jax.logbook import read_rows
from apart_jax.restore import restore_checkpoint
from apart_jax.run import load_model, setup_run
from apart_jax.trainer import train_and_evaluate
from experiments.run_summary import load_run_summary
from experiments.summarize import format_table, write_csv
from tests.scripted_train import CLEAN, PGD, STEPS_PER_EPOCH, scripted_accuracies

# --- the definition -------------------------------------------------------------------


def test_no_collapse_when_pgd_stays_at_or_above_half_its_best():
    assert collapse_epoch([]) is None
    assert collapse_epoch([(1, 0.2), (2, 0.3), (3, 0.15), (4, 0.4)]) is None  # 0.15 = 0.5 x 0.3
    assert detect_collapse([(1, 0.2), (2, 0.3)]) is None


def test_a_collapse_exactly_at_the_threshold_is_not_one():
    assert collapse_epoch([(1, 0.5), (2, 0.25)]) is None  # 0.25 == 0.5 x 0.5: not below
    assert collapse_epoch([(1, 0.5), (2, np.nextafter(0.25, 0.0))]) == 2
    assert collapse_epoch([(1, 0.5), (2, 0.375)], ratio=0.75) is None
    assert collapse_epoch([(1, 0.5), (2, 0.3125)], ratio=0.75) == 2


def test_the_threshold_follows_the_best_so_far():
    # 0.3 at epoch 2 is above 0.5 x 0.5; after the best rises to 0.75, 0.3 is a collapse.
    pgd = [(1, 0.5), (2, 0.3), (3, 0.75), (4, 0.3), (5, 0.0)]
    assert collapse_epoch(pgd) == 4
    collapse = detect_collapse(pgd, 0.5, "revert")
    assert collapse == Collapse(
        epoch=4,
        pgd20_acc=0.3,
        best_epoch=3,
        best_pgd20_acc=0.75,
        ratio=0.5,
        min_best=0.1,
        action="revert",
    )
    # The first collapse counts, not the deepest.
    assert collapse_epoch([(1, 0.5), (2, 0.2), (3, 0.0)]) == 2


def test_a_drop_counts_only_from_a_best_at_or_above_the_floor():
    # FGSM+ seed 1 at 16/255 (the study's ledger, docs/results/fast_at): 8.3% then 3.7%
    # while it learned, 11.3% at epoch 8; it had not beaten chance (10%) before the drop.
    fgsm_plus_s1 = [(1, 0.020), (2, 0.083), (3, 0.037), (4, 0.071), (5, 0.029), (6, 0.053)]
    fgsm_plus_s1 += [(7, 0.084), (8, 0.113), (9, 0.102), (10, 0.106)]
    assert collapse_epoch(fgsm_plus_s1) is None
    assert collapse_epoch(fgsm_plus_s1, min_best=0.0) == 3  # the definition without a floor
    assert detect_collapse(fgsm_plus_s1) is None
    # The floor is inclusive, and it applies to the best so far, not to the first epoch.
    assert collapse_epoch([(1, 0.1), (2, 0.049)]) == 2
    assert collapse_epoch([(1, np.nextafter(0.1, 0.0)), (2, 0.0)]) is None
    assert collapse_epoch([(1, 0.08), (2, 0.03), (3, 0.2), (4, 0.09)]) == 4
    assert collapse_epoch([(1, 0.3), (2, 0.2)], min_best=0.5) is None
    assert detect_collapse([(1, 0.3), (2, 0.1)], min_best=0.25).min_best == 0.25
    for min_best in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"min_best=.* must be in \[0, 1\)"):
            collapse_epoch([(1, 0.5)], min_best=min_best)


def test_the_first_epoch_never_collapses():
    assert collapse_epoch([(1, 0.0)]) is None
    assert collapse_epoch([(1, 0.0), (2, 0.0)]) is None  # 0 < 0.5 x 0 is false
    assert collapse_epoch([(3, 0.0), (5, 0.5)]) is None


def test_unevaluated_epochs_are_skipped_and_order_does_not_matter():
    # Evaluated every 2 epochs: epochs 2, 4, 6; epoch 5 has no accuracy.
    pgd = [(6, 0.125), (2, 0.5), (5, None), (4, 0.25)]
    assert collapse_epoch(pgd) == 6  # 0.25 at epoch 4 is exactly half: not a collapse
    assert best_epoch(pgd) == 2
    with pytest.raises(ValueError, match="twice"):
        collapse_epoch([(1, 0.5), (1, 0.1)])
    for ratio in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match=r"ratio=.* must be in \(0, 1\)"):
            collapse_epoch([(1, 0.5)], ratio)


def test_best_epoch_ties_go_to_higher_clean_then_the_later_epoch():
    pgd = [(1, 0.25), (2, 0.5), (3, 0.5), (4, 0.125)]
    assert best_epoch(pgd) == 3
    assert best_epoch(pgd, {1: 0.5, 2: 0.75, 3: 0.625}) == 2
    assert best_epoch(pgd, before=3) == 2
    assert best_epoch(pgd, before=1) is None
    assert detect_collapse(pgd, clean_by_epoch={2: 0.75, 3: 0.625}).best_epoch == 2


def test_the_log_line():
    collapse = Collapse(7, 0.031, 4, 0.27, 0.5, 0.1, "stop")
    assert collapse.line() == (
        "catastrophic overfitting at epoch 7: PGD-20 3.1% < 0.5 x best 27.0% (epoch 4); stopped"
    )
    reverted = Collapse(7, 0.031, 4, 0.27, 0.5, 0.1, "revert").line()
    assert reverted.endswith("(epoch 4); reverted to epoch 4")
    assert (
        Collapse(7, 0.031, 4, 0.27, 0.5, 0.1, "continue")
        .line()
        .endswith("; training continues (on_collapse='continue')")
    )
    with pytest.raises(ValueError, match="action='halt'"):
        detect_collapse([(1, 0.5)], action="halt")


# --- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(collapse_ratio=0.0), "collapse_ratio=0.0 must be in (0, 1)"),
        (dict(collapse_ratio=1.0), "collapse_ratio=1.0 must be in (0, 1)"),
        (dict(collapse_ratio=-0.5), "collapse_ratio=-0.5 must be in (0, 1)"),
        (dict(collapse_min_best=-0.1), "collapse_min_best=-0.1 must be in [0, 1)"),
        (dict(collapse_min_best=1.0), "collapse_min_best=1.0 must be in [0, 1)"),
        (
            dict(on_collapse="halt"),
            "on_collapse='halt': choose one of ['continue', 'stop', 'revert']",
        ),
        (
            dict(on_collapse="revert", checkpoint=False),
            "on_collapse='revert' needs checkpoint=True (the best epoch's checkpoint is restored)",
        ),
    ],
)
def test_invalid_collapse_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate_config(tiny_config(**overrides))
    assert str(info.value) == message


def test_defaults_and_resume_rule():
    config = tiny_config()
    assert (config.collapse_ratio, config.collapse_min_best, config.on_collapse) == (
        0.5,
        0.1,
        "continue",
    )
    validate_config(tiny_config(on_collapse="revert", checkpoint=True, collapse_ratio=0.25))
    validate_config(tiny_config(collapse_min_best=0.0))
    assert not {"collapse_ratio", "collapse_min_best", "on_collapse"} & EXECUTION_KEYS
    assert resume_conflicts(tiny_config().to_dict(), tiny_config(collapse_min_best=0.0)) == [
        "collapse_min_best: 0.1 (saved) != 0.0"
    ]
    saved = tiny_config(on_collapse="stop").to_dict()
    assert resume_conflicts(saved, tiny_config(on_collapse="stop")) == []
    assert resume_conflicts(saved, tiny_config()) == ["on_collapse: 'stop' (saved) != 'continue'"]
    # A checkpoint written before the keys existed counts as their defaults.
    old = {k: v for k, v in tiny_config().to_dict().items() if "collapse" not in k}
    assert resume_conflicts(old, tiny_config()) == []


# --- the trainer ------------------------------------------------------------------------

# 64 examples in batches of 32: 2 steps per epoch; every epoch evaluated and checkpointed;
# the scripted accuracies (tests/scripted_train.py) collapse at epoch 4 from epoch 2's best.
RUN = dict(method="fgsm", epochs=5, train_size=64, test_size=32, checkpoint=True)
STOP_LINE = "catastrophic overfitting at epoch 4: PGD-20 12.5% < 0.5 x best 50.0% (epoch 2); "


class ScriptedEvaluation:
    """Stands in for the run's evaluation: :func:`scripted_accuracies`, keeping a host copy
    of every state it is given; raises at epoch ``fail_at``."""

    def __init__(self, fail_at: int | None = None):
        self.states: dict[int, list[np.ndarray]] = {}
        self.fail_at = fail_at

    def __call__(self, state) -> dict[str, float]:
        epoch = int(state.step) // STEPS_PER_EPOCH
        if epoch == self.fail_at:
            raise RuntimeError(f"evaluation failed at epoch {epoch}")
        self.states[epoch] = host_leaves(state)
        return scripted_accuracies(state)


def scripted_run(config, workdir, fail_at=None):
    """``train_and_evaluate`` with :class:`ScriptedEvaluation`; returns (result or the
    error raised, the evaluation, what was written to stderr)."""
    evaluation = ScriptedEvaluation(fail_at)
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.setattr(trainer, "run_evaluation", lambda run: evaluation)
        try:
            result = train_and_evaluate(config, str(workdir))
        except RuntimeError as error:
            result = error
    return result, evaluation, stderr.getvalue()


def collapse_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "catastrophic overfitting" in line]


def assert_states_equal(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stop")
    config = tiny_config(**RUN, on_collapse="stop", checkpoint_keep=1)
    return (config, workdir, *scripted_run(config, workdir))


@pytest.fixture(scope="module")
def reverted(tmp_path_factory):
    # checkpoint_every=3 saves mid-epoch (steps 3, 6) and not at the end of epochs 1 and 2:
    # the new best epochs are saved anyway, and the best one outlives checkpoint_keep=1.
    workdir = tmp_path_factory.mktemp("revert")
    config = tiny_config(
        **{**RUN, "method": "apart"}, on_collapse="revert", checkpoint_keep=1, checkpoint_every=3
    )
    return (config, workdir, *scripted_run(config, workdir))


def test_continue_logs_the_collapse_once_and_trains_to_the_end(tmp_path):
    result, evaluation, stderr = scripted_run(tiny_config(**RUN), tmp_path)
    assert collapse_lines(stderr) == [STOP_LINE + "training continues (on_collapse='continue')"]
    rows = read_rows(str(tmp_path / "metrics.jsonl"))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["pgd20_acc"] for r in rows] == [PGD[e] for e in range(1, 6)]
    assert [e for e, r in enumerate(rows, 1) if "collapsed_epoch" in r] == [4]
    assert {k: v for k, v in rows[3].items() if k.startswith("collapse")} == {
        "collapsed_epoch": 4,
        "collapse_action": "continue",
        "collapse_best_epoch": 2,
        "collapse_best_pgd20_acc": 0.5,
        "collapse_ratio": 0.5,
        "collapse_min_best": 0.1,
    }
    assert (result.collapsed_epoch, result.collapse_action) == (4, "continue")
    assert result.last == rows[-1] and checkpoint_steps(tmp_path) == [6, 8, 10]
    assert sorted(evaluation.states) == [1, 2, 3, 4, 5]


def test_stop_ends_at_the_collapse_epoch_with_its_checkpoint(stopped):
    config, workdir, result, evaluation, stderr = stopped
    assert collapse_lines(stderr) == [STOP_LINE + "stopped"]
    assert sorted(evaluation.states) == [1, 2, 3, 4]  # epoch 5 is never trained
    rows = read_rows(str(workdir / "metrics.jsonl"))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["collapsed_epoch"] == 4 and rows[-1]["collapse_action"] == "stop"
    assert not any("collapsed_epoch" in r for r in rows[:-1])
    assert (result.collapsed_epoch, result.collapse_action) == (4, "stop")
    assert result.collapse == Collapse(4, 0.125, 2, 0.5, 0.5, 0.1, "stop")
    assert result.last == rows[-1]
    assert result.checkpoint_path == str(workdir / "checkpoints" / "8")
    assert checkpoint_steps(workdir) == [8]
    final = host_leaves(restore_checkpoint(str(workdir), setup_run(config)))
    assert_states_equal(final, evaluation.states[4])
    with RunCheckpoints(str(workdir)) as checkpoints:
        meta = checkpoints.read_meta(8)
    assert meta["collapse"] == {
        "epoch": 4,
        "pgd20_acc": 0.125,
        "best_epoch": 2,
        "best_pgd20_acc": 0.5,
        "ratio": 0.5,
        "min_best": 0.1,
        "action": "stop",
    }
    assert meta["evaluations"] == [[e, CLEAN, PGD[e]] for e in (1, 2, 3, 4)]


def test_revert_ends_with_the_best_epochs_state_as_the_final_checkpoint(reverted):
    config, workdir, result, evaluation, stderr = reverted
    assert collapse_lines(stderr) == [STOP_LINE + "reverted to epoch 2"]
    assert sorted(evaluation.states) == [1, 2, 3, 4]
    rows = read_rows(str(workdir / "metrics.jsonl"))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["collapse_action"] == "revert" and rows[-1]["collapse_best_epoch"] == 2
    assert (result.collapsed_epoch, result.collapse_action) == (4, "revert")
    assert result.last == rows[1]  # the final state is epoch 2's
    assert result.checkpoint_path == str(workdir / "checkpoints" / "4")
    # The newest checkpoint is epoch 2's, bit for bit (weights, psi, Omega, optimizer
    # states, RNG, step); the later one is set aside, not deleted.
    assert checkpoint_steps(workdir) == [4]
    assert os.listdir(workdir / "checkpoints.reverted") == ["6"]
    final = restore_checkpoint(str(workdir), setup_run(config))
    assert int(final.step) == 4
    assert_states_equal(host_leaves(final), evaluation.states[2])
    model = load_model(str(workdir))
    assert model.step == 4
    assert_states_equal(host_leaves(model.variables["params"]), host_leaves(final.params))
    with RunCheckpoints(str(workdir)) as checkpoints:
        assert checkpoints.read_meta(4)["collapse"]["action"] == "revert"


@pytest.mark.parametrize("fixture", ["stopped", "reverted"])
def test_rerunning_a_run_ended_by_a_collapse_trains_no_further(fixture, request):
    config, workdir, first, _, _ = request.getfixturevalue(fixture)
    rows = read_rows(str(workdir / "metrics.jsonl"))
    steps = checkpoint_steps(workdir)
    result, evaluation, stderr = scripted_run(config, workdir)
    assert evaluation.states == {} and collapse_lines(stderr) == []
    assert result.resumed_from == steps[-1]
    assert (result.collapse, result.last, result.checkpoint_path) == (
        first.collapse,
        first.last,
        first.checkpoint_path,
    )
    assert read_rows(str(workdir / "metrics.jsonl")) == rows  # all 4 rows kept
    assert checkpoint_steps(workdir) == steps
    # Resuming under another policy is refused: it would change the final numbers.
    other = config.copy_and_resolve_references()
    other.on_collapse = "continue"
    with pytest.raises(ConfigError, match=f"on_collapse: '{config.on_collapse}' \\(saved\\)"):
        train_and_evaluate(other, str(workdir))
    assert read_rows(str(workdir / "metrics.jsonl")) == rows


def test_a_run_ended_before_the_floor_existed_keeps_its_collapse(stopped, tmp_path):
    # A checkpoint written before collapse_min_best: neither its config nor its collapse
    # holds the key. Rerunning it trains no further and reports the collapse found with
    # no floor (min_best 0), not the default.
    config, workdir, first, _, _ = stopped
    old = tmp_path / "old"
    shutil.copytree(workdir, old)
    meta_file = old / "checkpoints" / "8" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["collapse"]["min_best"], meta["config"]["collapse_min_best"]
    meta_file.write_text(json.dumps(meta))
    result, evaluation, stderr = scripted_run(config, old)
    assert evaluation.states == {} and collapse_lines(stderr) == []
    assert result.collapse == dataclasses.replace(first.collapse, min_best=0.0)


def test_a_run_resumed_before_the_collapse_detects_it_from_the_saved_evaluations(tmp_path):
    config = tiny_config(**RUN, on_collapse="stop")
    failed, _, stderr = scripted_run(config, tmp_path, fail_at=4)
    assert isinstance(failed, RuntimeError) and collapse_lines(stderr) == []
    assert checkpoint_steps(tmp_path) == [2, 4, 6]  # epoch 4 trained, not evaluated
    result, evaluation, stderr = scripted_run(config, tmp_path)
    # The best epoch (2) was evaluated by the first process; the second only sees epoch 4.
    assert result.resumed_from == 6 and sorted(evaluation.states) == [4]
    assert collapse_lines(stderr) == [STOP_LINE + "stopped"]
    assert result.collapse == Collapse(4, 0.125, 2, 0.5, 0.5, 0.1, "stop")
    assert [r["epoch"] for r in read_rows(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4]


# --- the summary table ------------------------------------------------------------------


def test_summarize_shows_the_collapse_column(stopped, reverted, tmp_path):
    never = tmp_path / "never"  # written by hand: PGD-20 0.25 then exactly half of it
    never.mkdir()
    config = stopped[0].copy_and_resolve_references()
    config.epochs = 2
    (never / "config.json").write_text(config.to_json())
    (never / "metrics.jsonl").write_text(
        "".join(
            json.dumps(dict(epoch=e, step=2 * e, method="fgsm", clean_acc=0.5, pgd20_acc=p)) + "\n"
            for e, p in ((1, 0.25), (2, 0.125))
        )
    )
    runs = [stopped[1], reverted[1], never]
    summaries = [load_run_summary(str(w)) for w in runs]
    text = format_table(summaries)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header, _, *body = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    table = {cells[0]: dict(zip(header, cells, strict=True)) for cells in body}
    stop, revert, clean = (table[os.path.basename(w)] for w in runs)
    assert (stop["epochs"], stop["collapsed at epoch"]) == ("4/5 (stopped)", "4")
    assert (stop["best epoch"], stop["last epoch"]) == ("2", "4")
    assert (revert["epochs"], revert["collapsed at epoch"]) == ("4/5 (reverted to 2)", "4")
    assert (revert["best epoch"], revert["last epoch"]) == ("2", "2")  # the final state
    assert (clean["epochs"], clean["collapsed at epoch"]) == ("2", "-")
    assert (
        "collapsed at epoch = the first evaluated epoch whose PGD-20 accuracy is below 0.5 x "
        "the best PGD-20 accuracy of the evaluated epochs before it"
    ) in text
    write_csv(summaries, str(tmp_path / "table.csv"))
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["collapsed_epoch"], r["collapse_action"]) for r in rows] == [
        ("4", "stop"),
        ("4", "revert"),
        ("", ""),
    ]
    assert rows[1]["last_step"] == "4"
