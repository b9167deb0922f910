"""experiments.fast_at_study and its report, on hand-written ledgers (no training)."""

from __future__ import annotations

import json

import pytest

from experiments import fast_at_study
from experiments.fast_at_report import (
    BEGIN,
    END,
    autoattack_accuracy,
    format_mean_std,
    group_runs,
    load_ledger,
    psi_rows,
    write_report,
)
from tests.test_summarize import STEPS_PER_EPOCH, config, write_eval, write_run


def ledger_run(ledger, method, radius, seed, pgd, wall=None, psi=None):
    """A finished ledger run with PGD-20 accuracies ``pgd`` (clean = pgd + 0.2)."""
    directory = write_run(
        ledger / f"{method}{radius}_s{seed}",
        config(method, len(pgd), eps=radius / 255, seed=seed),
        [(p + 0.2, p) for p in pgd],
        train_seconds=60.0 * len(pgd),
        eval_examples=1000,
    )
    if psi is not None:  # APART's psi per epoch: (alpha, alpha_omega, layer alphas)
        path = directory / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row, (alpha, alpha_omega, layers) in zip(rows, psi, strict=True):
            row["psi"] = {"alpha": alpha, "alpha_omega": alpha_omega, "layer_alphas": layers}
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if wall is not None:
        (directory / "wall.json").write_text(json.dumps(wall))
    return directory


def test_labels_are_seed_major_and_parse_back():
    labels = fast_at_study.run_labels(["nfgsm", "apart"], [8, 16], [0, 1])
    assert labels[:4] == ["nfgsm8_s0", "apart8_s0", "nfgsm16_s0", "apart16_s0"]
    assert labels[4] == "nfgsm8_s1" and len(labels) == 8
    assert fast_at_study.parse_label("grad_align16_s2") == ("grad_align16", 2)


def test_statistics_over_seeds_and_collapse_counts(tmp_path):
    # FGSM-RS at 16/255: seed 0 collapses at epoch 3 (0.1 < 0.5 x 0.3), seed 1 does not.
    ledger_run(tmp_path, "fgsm_rs", 16, 0, [0.2, 0.3, 0.1, 0.05], wall={"train": 100.0})
    ledger_run(tmp_path, "fgsm_rs", 16, 1, [0.2, 0.3, 0.2, 0.25], wall={"train": 50.0})
    ledger_run(tmp_path, "nfgsm", 8, 0, [0.2, 0.3, 0.35, 0.3])
    write_eval(tmp_path / "nfgsm8_s0", "eval_step120.json", 120, 0.5, {"autoattack": 0.31}, 500)
    runs = load_ledger(tmp_path)
    assert [r["label"] for r in runs] == ["fgsm_rs16_s0", "fgsm_rs16_s1", "nfgsm8_s0"]
    groups = {(g["method"], g["radius"]): g for g in group_runs(runs)}
    rs = groups[("FGSM-RS", 16)]
    assert rs["seeds"] == [0, 1] and rs["collapsed"] == 1 and rs["collapse_epochs"] == [3, None]
    assert rs["final_pgd"] == [0.05, 0.25] and rs["best_pgd"] == [0.3, 0.3]
    assert format_mean_std(rs["final_pgd"]) == "15.0 ± 14.1"  # std of (5, 25): 10 sqrt(2)
    assert format_mean_std(rs["best_pgd"]) == "30.0 ± 0.0"
    nfgsm = groups[("N-FGSM", 8)]
    assert nfgsm["best_aa"] == [0.31] and nfgsm["last_aa"] == [] and nfgsm["aa_points"] == 500
    assert format_mean_std(nfgsm["best_aa"]) == "31.0" and format_mean_std([]) == "-"
    assert list(groups) == [("N-FGSM", 8), ("FGSM-RS", 16)]  # by eps, then appearance


def test_psi_rate_factor_is_alpha_over_the_largest_layer_alpha(tmp_path):
    psi = [(0.01, 0.02, [0.0, 0.0]), (0.03, 0.015, [1e-5, -4e-5])]
    ledger_run(tmp_path, "apart", 8, 0, [0.2, 0.3], psi=psi)
    (row,) = psi_rows(load_ledger(tmp_path))
    assert row["radius"] == 8 and row["seeds"] == 1
    assert row["max_layer_alpha"] == 4e-5 and row["rate_factor"] == pytest.approx(750)


def test_report_replaces_only_the_marked_section(tmp_path):
    ledger = tmp_path / "docs" / "results" / "fast_at"
    psi = [(0.01, 0.02, [0.0]), (0.03, 0.015, [3e-5])]
    ledger_run(ledger, "apart", 16, 0, [0.2, 0.3], wall={"train": 120.0, "attack": 60.0}, psi=psi)
    ledger_run(ledger, "pgd", 16, 0, [0.25, 0.35], wall={"train": 600.0})
    md = tmp_path / "docs" / "results.md"
    md.write_text(f"# Results\n\nbefore\n{BEGIN}\nold table\n{END}\nafter\n")
    block = write_report(str(ledger), str(md))
    text = md.read_text()
    assert text.startswith("# Results\n\nbefore\n") and text.endswith(f"{END}\nafter\n")
    assert "old table" not in text and block in text
    assert "| APART | 16/255 | 2 | 1 | 0/1 |" in block
    assert "![PGD-20 per epoch](results/fast_at/curves.png)" in block
    assert "13.0 min (12.0 min training" in block  # wall: 120 + 600 + 60 s
    for figure in ("curves.png", "pareto.png", "psi.png"):
        assert (ledger / figure).stat().st_size > 1000
    md.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        write_report(str(ledger), str(md))


def test_the_train_stage_skips_finished_ledger_runs(tmp_path, monkeypatch):
    ledger = tmp_path / "ledger"
    ledger_run(ledger, "apart", 8, 0, [0.2, 0.3])
    unfinished = ledger_run(ledger, "nfgsm", 8, 0, [0.2, 0.3])
    data = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**data, "epochs": 3}))
    trained = []
    monkeypatch.setattr(fast_at_study, "train", lambda label, *_: trained.append(label))
    labels = fast_at_study.run_labels(["apart", "nfgsm"], [8], [0, 1])
    fast_at_study.run_study("data.npz", str(tmp_path / "runs"), str(ledger), labels, ["train"],
                            500, "results.md")  # fmt: skip
    assert trained == ["nfgsm8_s0", "apart8_s1", "nfgsm8_s1"]


def test_attack_steps_are_the_best_and_the_last_epoch(tmp_path):
    directory = ledger_run(tmp_path, "fgsm_rs", 16, 0, [0.2, 0.3, 0.1])
    assert fast_at_study.attack_steps(str(directory)) == [2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]
    flat = ledger_run(tmp_path, "apart", 16, 0, [0.2, 0.3])
    assert fast_at_study.attack_steps(str(flat)) == [2 * STEPS_PER_EPOCH]


def test_the_attack_stage_evaluates_missing_epochs_once_and_copies_the_reports(
    tmp_path, monkeypatch
):
    """Best epoch 2 and last epoch 3: two evaluate commands, reports copied into the ledger;
    a second pass finds them there and runs nothing."""
    ledger, runs = tmp_path / "ledger", tmp_path / "runs"
    ledger_run(ledger, "fgsm_rs", 16, 0, [0.2, 0.3, 0.1])
    workdir = runs / "fgsm_rs16_s0"
    for step in (2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH):
        (workdir / "checkpoints" / str(step)).mkdir(parents=True)
    commands = []

    def evaluate(args, log_path):
        commands.append(args)
        step = int(next(a for a in args if a.startswith("--step=")).split("=")[1])
        name = "eval.json" if step == 3 * STEPS_PER_EPOCH else f"eval_step{step}.json"
        write_eval(workdir, name, step, 0.4, {"autoattack": 0.2}, num_points=500)
        return 30.0

    monkeypatch.setattr(fast_at_study, "run_command", evaluate)
    for _ in range(2):
        fast_at_study.attack("fgsm_rs16_s0", "data.npz", str(runs), str(ledger), 500)
    assert [a[0] for a in commands] == ["experiments.evaluate"] * 2
    assert "--suite=autoattack" in commands[0] and "--num_points=500" in commands[0]
    (run,) = load_ledger(ledger)
    assert run["best"]["epoch"] == 2 and autoattack_accuracy(run["best"]) == 0.2
    assert run["last"]["epoch"] == 3 and autoattack_accuracy(run["last"]) == 0.2
    assert run["wall"] == {"attack": 60.0}
