"""experiments.fast_at_psi and the study's psi stage, on hand-written ledgers (no training)."""

from __future__ import annotations

import pytest

from experiments import fast_at_study
from experiments.fast_at_psi import parse_setting, psi_rows, sweep_label
from experiments.fast_at_report import BEGIN, END, load_ledger, write_report
from tests.test_fast_at_study import ledger_run


def apart_run(ledger, radius, seed, final_psi, label=None, psi_lr_scale=1.0, decay=400.0):
    """A two-epoch APART ledger run (PGD-20 0.1 then 0.15) whose psi ends at ``final_psi``
    = (alpha, alpha_omega, layer alphas)."""
    psi = [(0.001, 0.001, [0.0] * len(final_psi[2])), final_psi]
    return ledger_run(ledger, "apart", radius, seed, [0.1, 0.15], wall={"train": 100.0},
                      psi=psi, label=label, psi_lr_scale=psi_lr_scale,
                      psi_weight_decay=decay)  # fmt: skip


def test_settings_parse_into_labels_and_bad_ones_are_named():
    assert parse_setting("psi_lr_scale=4") == ("psi_lr_scale", 4.0)
    assert sweep_label("apart16_s0", "psi_weight_decay=100") == "apart16_s0_psi_weight_decay100"
    assert sweep_label("apart8_s2", "psi_lr_scale=0.5") == "apart8_s2_psi_lr_scale0.5"
    with pytest.raises(ValueError, match="'lr_max=2': the key must be one of psi_lr_scale"):
        parse_setting("lr_max=2")
    for bad in ("psi_lr_scale=x", "psi_lr_scale=0", "psi_weight_decay=-1", "psi_lr_scale"):
        with pytest.raises(ValueError, match="must be a positive number"):
            parse_setting(bad)


def test_psi_rows_average_the_final_psi_over_seeds_per_radius(tmp_path):
    apart_run(tmp_path, 8, 0, (0.03, 0.015, [1e-5, -4e-5]))
    apart_run(tmp_path, 8, 1, (0.01, 0.005, [2e-5, 0.0]))
    apart_run(tmp_path, 16, 0, (0.02, 0.01, [-1e-3, 0.0]))
    ledger_run(tmp_path, "pgd", 8, 0, [0.2, 0.3])
    rows = psi_rows(load_ledger(tmp_path))
    assert [(r["radius"], r["seeds"]) for r in rows] == [(8, 2), (16, 1)]
    assert rows[0]["alpha"] == pytest.approx(0.02) and rows[0]["alpha_omega"] == 0.01
    assert rows[0]["max_layer_alpha"] == pytest.approx(3e-5)  # the largest |alpha_i|, averaged
    assert rows[1]["max_layer_alpha"] == 1e-3


def test_the_psi_stage_trains_each_missing_setting_once_from_its_base(tmp_path, monkeypatch):
    runs, psi_ledger = tmp_path / "runs", tmp_path / "psi"
    apart_run(psi_ledger, 16, 0, (0.02, 0.01, [0.0]), "apart16_s0_psi_lr_scale2", 2.0)
    commands = []

    def train(args, log_path):
        commands.append(args)
        workdir = next(a for a in args if a.startswith("--workdir=")).split("=", 1)[1]
        apart_run(runs, 16, 0, (0.02, 0.01, [0.0]), workdir.rsplit("/", 1)[1], decay=100.0)
        return 100.0

    monkeypatch.setattr(fast_at_study, "run_command", train)
    psi = ("apart16_s0", ["psi_lr_scale=2", "psi_weight_decay=100"], str(psi_ledger))
    for _ in range(2):
        fast_at_study.run_study("/data.npz", str(runs), str(tmp_path / "ledger"), [], ["psi"],
                                500, "results.md", psi)  # fmt: skip
    assert commands == [
        [
            "experiments.train",
            "--config=experiments/configs/fast_at.py:apart16",
            "--config.npz_path=/data.npz",
            "--config.seed=0",
            "--config.psi_weight_decay=100",
            "--config.progress=False",
            f"--workdir={runs}/apart16_s0_psi_weight_decay100",
        ]
    ]
    record = load_ledger(psi_ledger)[1]
    assert record["label"] == "apart16_s0_psi_weight_decay100" and record["wall"] == {
        "train": 100.0
    }


@pytest.mark.parametrize("with_base", [True, False])
def test_the_report_sets_the_sweep_beside_its_unchanged_run(tmp_path, with_base):
    """Rows: the study's run, then by decay (largest first) and rate; the sweep's wall time
    counts in the study's."""
    ledger, psi_ledger = tmp_path / "results" / "fast_at", tmp_path / "results" / "fast_at_psi"
    ledger_run(ledger, "pgd", 16, 0, [0.2, 0.3], wall={"train": 600.0})
    if with_base:
        apart_run(ledger, 16, 0, (3 / 255, 2 / 255, [0.01, -0.004]))
    apart_run(psi_ledger, 16, 0, (6 / 255, 3 / 255, [0.02]), "apart16_s0_psi_weight_decay100",
              decay=100.0)  # fmt: skip
    apart_run(psi_ledger, 16, 0, (5 / 255, 2 / 255, [0.015]), "apart16_s0_psi_lr_scale8", 8.0)
    apart_run(psi_ledger, 16, 0, (4 / 255, 2 / 255, [0.012]), "apart16_s0_psi_lr_scale2", 2.0)
    md = tmp_path / "results.md"
    md.write_text(f"{BEGIN}\n{END}\n")
    block = write_report(str(ledger), str(md), str(psi_ledger))
    table = block.split("psi decay |")[1].split("\n\n")[0].splitlines()[2:]
    accuracies = " | 35.0 | 15.0 | 15.0 |"  # final clean, final and best PGD-20 of every run
    assert all(row.endswith(accuracies) for row in table)
    base = ["| apart16_s0 | 1 | 400 | 3.00 | 2.00 | 1.00e-02 | 0.85"]
    assert [row.removesuffix(accuracies) for row in table] == (base if with_base else []) + [
        "| apart16_s0_psi_lr_scale2 | 2 | 400 | 4.00 | 2.00 | 1.20e-02 | 0.77",
        "| apart16_s0_psi_lr_scale8 | 8 | 400 | 5.00 | 2.00 | 1.50e-02 | 0.77",
        "| apart16_s0_psi_weight_decay100 | 1 | 100 | 6.00 | 3.00 | 2.00e-02 | 0.85",
    ]
    assert "APART at 16/255, seed 0, with one psi setting changed per run" in block
    assert "![APART's psi per psi setting](results/fast_at_psi/psi_sweep.png)" in block
    assert f"Wall time of the {5 if with_base else 4} runs so far" in block
    assert (psi_ledger / "psi_sweep.png").stat().st_size > 1000
