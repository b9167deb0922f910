"""What keeps training at the speed of its passes: no recompilation, no read-backs, donation,
and the speed benchmark's output. Timings themselves live in the benchmark, not here."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import ROOT, CompileCounter, module_env, run_module, tiny_config

from apart_jax.epoch import compile_epoch_steps, train_epoch
from apart_jax.evaluation import evaluate, make_eval_data, make_eval_step
from apart_jax.run import setup_run
from apart_jax.state import zero_totals
from apart_jax.step import device_order


@pytest.mark.parametrize("method", ["apart", "pgd"])
def test_later_epochs_compile_nothing_read_nothing_back_and_donate_the_state(method):
    # 200 examples in batches of 64: two compiled step shapes (64 and the last 8).
    config = tiny_config(method=method, train_size=200, test_size=50, batch_size=64)
    run = setup_run(config)
    num_train = len(run.dataset.y_train)
    with CompileCounter() as compiles:
        steps = compile_epoch_steps(run, run.state)
        assert sorted(steps) == [8, 64]
        first_state = run.state
        order = device_order(config.seed, 1, num_train, run.mesh)
        state, totals, _ = train_epoch(
            steps, first_state, zero_totals(run.mesh), run.data, order, run.batch_sizes
        )
        jax.block_until_ready(state)
        # Donated: every array buffer is reused (XLA may keep a few scalar inputs it could
        # not alias, such as the schedules' hyper-parameters).
        assert all(x.is_deleted() for x in jax.tree.leaves(first_state) if x.ndim)
        after_first_epoch = compiles.count
        orders = [device_order(config.seed, e, num_train, run.mesh) for e in (2, 3)]
        with jax.transfer_guard_device_to_host("disallow"):
            for order in orders:
                state, totals, _ = train_epoch(
                    steps, state, zero_totals(run.mesh), run.data, order, run.batch_sizes
                )
            jax.block_until_ready(state)
        assert compiles.count == after_first_epoch
        assert int(state.step) == 3 * len(run.batch_sizes)

        test = make_eval_data(run.dataset.x_test, run.dataset.y_test, 25, order.sharding)
        eval_step = make_eval_step(
            run.model.apply, eps=0.03, step_size=0.01, steps=2, unroll=None, mesh=run.mesh
        )
        first = evaluate(eval_step, state, test, 25, jax.random.key(0))
        after_first_evaluation = compiles.count
        assert evaluate(eval_step, state, test, 25, jax.random.key(0)) == first
        assert compiles.count == after_first_evaluation


@pytest.mark.slow
def test_speed_benchmark_writes_the_documented_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_module(
        "experiments.bench_speed",
        *[
            "--model=small_cnn",
            "--width=4",
            "--batch_size=32",
            "--steps=3",
            "--warmup=1",
            "--epoch_examples=96",
            "--eval_points=32",
            f"--json={out}",
        ],
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report) >= {"machine", "config", "pass_costs", "results", "epochs", "evaluation"}
    assert report["machine"]["platform"] == "cpu" and report["config"]["batch_size"] == 32
    results = report["results"]
    passes = {"clean": 1, "fgsm": 2, "fgsm_rs": 2, "fgsm_plus": 2, "apart": 2, "pgd10": 11}
    passes.update(nfgsm=2, grad_align=5)
    assert {name: r["passes"] for name, r in results.items()} == passes
    fields = {"step_s", "step_s_min", "step_s_max", "images_per_s", "compile_s", "passes"}
    for r in results.values():
        assert set(r) >= fields | {"ratio_to_pgd10", "ratio_to_clean"}
        assert 0 < r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
        np.testing.assert_allclose(r["images_per_s"], 32 / r["step_s"])
        np.testing.assert_allclose(r["ratio_to_pgd10"], r["step_s"] / results["pgd10"]["step_s"])
        np.testing.assert_allclose(r["ratio_to_clean"], r["step_s"] / results["clean"]["step_s"])
    costs = report["pass_costs"]
    assert costs["t_train"] == results["clean"]["step_s"] and costs["t_in"] > 0
    np.testing.assert_allclose(costs["pgd10_floor_s"], 10 * costs["t_in"] + costs["t_train"])
    for name in ("apart", "pgd10"):
        epoch = report["epochs"][name]
        assert epoch["steps"] == 3 and epoch["examples"] == 96 and epoch["epoch_s"] > 0
    assert report["evaluation"]["points"] == 32
    assert "apart / pgd10" in proc.stdout and "t_in / t_train" in proc.stdout


@pytest.mark.slow
def test_speed_benchmark_times_pytorch_eager_in_the_same_run(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    args = ["--model=small_cnn", "--width=4", "--batch_size=32", "--steps=3", "--warmup=1"]
    args += ["--methods=clean", "--epoch_examples=0", "--eval_points=0", "--reference=torch"]
    proc = run_module("experiments.bench_speed", *args, f"--json={out}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    reference, costs = report["reference"], report["pass_costs"]
    assert reference["framework"].startswith("torch ") and reference["threads"] >= 1
    assert reference["train_step_s"] > 0 and reference["input_gradient_s"] > 0
    np.testing.assert_allclose(
        reference["t_train_over_torch"], costs["t_train"] / reference["train_step_s"]
    )
    np.testing.assert_allclose(
        reference["t_in_over_torch"], costs["t_in"] / reference["input_gradient_s"]
    )
    assert "eager (" in proc.stdout and "t_train / torch train step" in proc.stdout


@pytest.mark.slow
def test_the_pytorch_reference_refuses_what_it_cannot_compare():
    proc = run_module("experiments.bench_speed", "--reference=torch", "--dtype=bfloat16")
    assert proc.returncode != 0
    assert "--reference=torch compares CPU float32 steps" in proc.stderr
    proc = run_module("experiments.bench_speed", "--release=.", "--methods=clean,pgd10")
    assert proc.returncode != 0
    assert "--release compares CPU float32 APART steps" in proc.stderr


# A stand-in for the authors' release with the interface experiments.record_release uses:
# train.py parses its flags at import, imports models.preresnet, and its train() calls
# atta_aug once at the start of every step. Step k sleeps SECONDS[k], so the times the
# wrapped atta_aug measures are known.
FAKE_MODELS = """
    from torch import nn
    class PreActResNet(nn.Module):
        def _make_layer(self, block, planes, num_blocks, stride):
            return nn.Identity()
"""
FAKE_TRAIN = """
    import argparse, time
    import numpy as np
    import models.preresnet
    parser = argparse.ArgumentParser()
    for flag in ("--no_cuda", "--layerwise"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--save_dir")
    parser.add_argument("--batch_size", type=int)
    args = parser.parse_args()
    SECONDS = [0.4, 0.05, 0.1, 0.15]
    class PreActBlock:
        pass
    def atta_aug(omega, rst):
        return omega, {}
    def train(args, model, device, x, omega_sets, y, opt, opt_alpha, epoch, sched, sched_alpha):
        assert args.layerwise and x.dtype == omega_sets.dtype == model.alpha.dtype
        order = np.random.permutation(50000)
        for k in range(50000 // args.batch_size):
            batch = order[k * args.batch_size : (k + 1) * args.batch_size]
            atta_aug(omega_sets[batch], None)
            time.sleep(SECONDS[k])
"""


@pytest.mark.slow
def test_the_release_reference_times_each_release_step_whole_after_the_warmup(tmp_path):
    """Steps are timed from one atta_aug call to the next: the warm-up step's 0.4 s is
    dropped and the 3 timed steps measure their sleeps (plus a little)."""
    pytest.importorskip("torch")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "preresnet.py").write_text(textwrap.dedent(FAKE_MODELS))
    (tmp_path / "train.py").write_text(textwrap.dedent(FAKE_TRAIN))
    code = (
        "import json; from experiments.release_reference import release_step_times; "
        f"print(json.dumps(release_step_times({str(tmp_path)!r}, 4, 8, 1, 3)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=module_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["width"] == 4 and result["batch_size"] == 8 and result["commit"] == "unknown"
    times = np.array(result["times"])
    assert times.shape == (3,)
    # Each step is its sleep plus the loop's own work: at most 0.018 s over 5 runs with both
    # cores busy. The bounds leave 0.3 s, less than the warm-up step that must not be counted.
    assert np.all(times >= [0.05, 0.1, 0.15]) and np.all(times < [0.35, 0.4, 0.45])
    assert result["step_s"] == times[1] and result["step_s_min"] == times[0]
