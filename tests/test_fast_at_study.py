"""experiments.fast_at_study and its report, on hand-written ledgers (no training)."""

from __future__ import annotations

import json

import pytest

from apart_jax.config import ConfigError
from experiments import fast_at_study
from experiments.fast_at_report import (
    BEGIN,
    END,
    autoattack_accuracy,
    format_mean_std,
    group_runs,
    load_ledger,
    read_bench,
    results_table,
    retrain_note,
    runtime_line,
    write_report,
)
from tests.test_summarize import STEPS_PER_EPOCH, config, write_eval, write_run


def ledger_run(ledger, method, radius, seed, pgd, wall=None, psi=None, label=None, **settings):
    """A finished ledger run with PGD-20 accuracies ``pgd`` (clean = pgd + 0.2), named
    ``label`` (by default the study's: ``apart16_s0``), with config ``settings``."""
    directory = write_run(
        ledger / (label or f"{method}{radius}_s{seed}"),
        config(method, len(pgd), eps=radius / 255, seed=seed, **settings),
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
    assert fast_at_study.label_method("pgd1016_s0") == "pgd10"
    assert fast_at_study.label_method("fgsm8_s1") == "fgsm"
    assert fast_at_study.label_method("fgsm_rs16_s2") == "fgsm_rs"


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
    assert rs["never_robust"] == nfgsm["never_robust"] == 0
    # AutoAttack on one of FGSM-RS's two seeds says so; on N-FGSM's one seed it needs not.
    write_eval(tmp_path / "fgsm_rs16_s1", "eval.json", 160, 0.5, {"autoattack": 0.2}, 500)
    table = results_table(group_runs(load_ledger(tmp_path)))
    assert "| 30.0 ± 0.0 | 20.0 (1 of 2 seeds) | - |" in table
    assert "| 35.0 | - | 31.0 |" in table


def test_a_run_never_above_the_floor_is_never_robust_not_collapsed(tmp_path):
    # FGSM at 16/255: best 9.9% (below the 10% floor), then 0: no collapse, never robust.
    ledger_run(tmp_path, "fgsm", 16, 0, [0.099, 0.0, 0.0])
    ledger_run(tmp_path, "fgsm", 16, 1, [0.1, 0.3, 0.1])  # from 30% to 10%: collapsed
    (fgsm,) = group_runs(load_ledger(tmp_path))
    assert fgsm["collapsed"] == 1 and fgsm["never_robust"] == 1
    assert "| 1/2 (ep. 3); 1 never robust |" in results_table([fgsm])


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


def test_accuracy_differences_are_the_largest_per_epoch_gaps():
    recorded = [
        dict(epoch=1, clean_acc=0.5, pgd20_acc=0.25),
        dict(epoch=2, clean_acc=0.5, pgd20_acc=0.125),
    ]
    assert fast_at_study.accuracy_differences(recorded, recorded) == {
        "clean_acc": 0.0,
        "pgd20_acc": 0.0,
    }
    retrained = [
        dict(epoch=1, clean_acc=0.375, pgd20_acc=0.25),
        dict(epoch=2, clean_acc=0.5, pgd20_acc=0.25),
    ]
    assert fast_at_study.accuracy_differences(recorded, retrained) == {
        "clean_acc": 0.125,
        "pgd20_acc": 0.125,
    }
    assert fast_at_study.accuracy_differences(recorded, retrained[:1]) == {
        "clean_acc": 1.0,
        "pgd20_acc": 1.0,
    }


@pytest.mark.parametrize("repeats", [True, False])
def test_the_attack_stage_trains_a_run_again_when_its_checkpoints_are_gone(
    tmp_path, monkeypatch, repeats
):
    """The run directory is finished but lacks the best epoch's checkpoint: it is set aside,
    the run trained again (wall time under "retrain"), then attacked; the ledger keeps its
    record, and a retrained run that does not repeat its accuracies is reported."""
    ledger, runs = tmp_path / "ledger", tmp_path / "runs"
    pgd = [0.2, 0.3, 0.1]
    ledger_run(ledger, "fgsm_rs", 16, 0, pgd)
    recorded = (ledger / "fgsm_rs16_s0" / "metrics.jsonl").read_text()
    stale = ledger_run(runs, "fgsm_rs", 16, 0, pgd)  # finished, with only the last checkpoint
    (stale / "checkpoints" / str(3 * STEPS_PER_EPOCH)).mkdir(parents=True)
    commands = []

    def command(args, log_path):
        commands.append(args[0])
        workdir = runs / "fgsm_rs16_s0"
        if args[0] == "experiments.train":
            assert not workdir.exists()  # the stale directory was set aside
            ledger_run(runs, "fgsm_rs", 16, 0, pgd if repeats else [0.2, 0.25, 0.1])
            for epoch in (1, 2, 3):
                (workdir / "checkpoints" / str(epoch * STEPS_PER_EPOCH)).mkdir(parents=True)
            return 100.0
        step = int(next(a for a in args if a.startswith("--step=")).split("=")[1])
        name = "eval.json" if step == 3 * STEPS_PER_EPOCH else f"eval_step{step}.json"
        write_eval(workdir, name, step, 0.4, {"autoattack": 0.2}, num_points=500)
        return 30.0

    monkeypatch.setattr(fast_at_study, "run_command", command)
    fast_at_study.attack("fgsm_rs16_s0", "data.npz", str(runs), str(ledger), 500)
    assert commands == ["experiments.train", "experiments.evaluate", "experiments.evaluate"]
    assert (runs / "fgsm_rs16_s0.incomplete" / "checkpoints" / "120").is_dir()
    assert (ledger / "fgsm_rs16_s0" / "metrics.jsonl").read_text() == recorded
    (run,) = load_ledger(ledger)
    assert run["wall"] == {"retrain": 100.0, "attack": 60.0}
    assert runtime_line([run]) == (
        "Wall time of the 1 runs so far: 2.7 min (0 s training with its per-epoch evaluation, "
        "1.7 min training again for checkpoints, 1.0 min AutoAttack), on the machine each ran on."
    )
    if repeats:
        assert run["retrain"] is None and retrain_note([run]) == ""
    else:
        assert run["retrain"] == {
            "clean_acc": pytest.approx(0.05),
            "pgd20_acc": pytest.approx(0.05),
        }
        assert retrain_note([run]).startswith(
            "The AutoAttack accuracies of fgsm_rs16_s0 are of a model trained again"
        )
        assert "by up to 5.0 points of PGD-20" in retrain_note([run])


def bench_json(step_seconds):
    """A bench_speed.json with these median step times."""
    return {
        "machine": {"date": "2026-12-02", "platform": "cpu", "host_cpus": 2, "jax": "0.10.2"},
        "config": {"model": "preact_resnet18", "width": 16, "batch_size": 128, "dtype": "float32"},
        "results": {name: {"step_s": s} for name, s in step_seconds.items()},
    }


def test_one_machine_time_is_the_steps_times_the_benchmarked_step_time(tmp_path):
    """3 epochs of 40 steps: 120 steps x 1.5 s (APART) and x 6 s (PGD-10, config method
    pgd with 10 steps), whatever the runs measured on their own machines."""
    ledger = tmp_path / "ledger"
    ledger_run(ledger, "apart", 16, 0, [0.2, 0.3, 0.3])
    ledger_run(ledger, "pgd", 16, 0, [0.25, 0.35, 0.3])
    (ledger / "bench_speed.json").write_text(json.dumps(bench_json({"apart": 1.5, "pgd10": 6.0})))
    groups = {g["method"]: g for g in group_runs(load_ledger(ledger), read_bench(ledger))}
    assert groups["APART"]["bench_seconds"] == 3 * STEPS_PER_EPOCH * 1.5
    assert groups["PGD-10"]["bench_seconds"] == 3 * STEPS_PER_EPOCH * 6.0
    assert groups["APART"]["train_seconds"] == 180.0  # measured: 60 s per epoch
    assert "| 3.0 min | 3.0 min |" in results_table(list(groups.values()))
    assert "| 3.0 min | 12.0 min |" in results_table(list(groups.values()))
    no_bench = group_runs(load_ledger(ledger), read_bench(tmp_path / "elsewhere"))
    assert [g["bench_seconds"] for g in no_bench] == [None, None]
    (ledger / "bench_speed.json").write_text('{"rows": [')
    with pytest.raises(ConfigError, match=r"bench_speed.json: not valid JSON"):
        read_bench(ledger)


def test_the_bench_stage_times_the_study_methods_once(tmp_path, monkeypatch):
    ledger, runs = tmp_path / "ledger", tmp_path / "runs"
    runs.mkdir()
    commands = []

    def bench_speed(args, log_path):
        commands.append(args)
        out = next(a for a in args if a.startswith("--json=")).split("=", 1)[1]
        with open(out, "w") as f:
            json.dump(bench_json({"clean": 1.0}), f)
        return 10.0

    monkeypatch.setattr(fast_at_study, "run_command", bench_speed)
    labels = fast_at_study.run_labels(["nfgsm", "pgd10"], [8, 16], [0, 1])
    for _ in range(2):
        fast_at_study.run_study("", str(runs), str(ledger), labels, ["bench"], 500, "results.md")
    (args,) = commands
    assert args[0] == "experiments.bench_speed" and "--methods=clean,nfgsm,pgd10" in args
    assert "--width=16" in args and "--batch_size=128" in args and "--model=preact_resnet18" in args
