"""The epoch loop, its outputs, config validation and the command-line entry points."""

from __future__ import annotations

import configparser
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_module, tiny_config

from apart_jax.config import ConfigError
from apart_jax.logbook import read_rows
from apart_jax.restore import restore_checkpoint
from apart_jax.run import setup_run
from apart_jax.trainer import train_and_evaluate

REQUIRED_FIELDS = {
    "epoch",
    "step",
    "method",
    "train_loss",
    "train_acc",
    "clean_acc",
    "pgd20_acc",
    "train_seconds",
}


def test_apart_run_writes_metrics_and_a_restorable_checkpoint(digits, tmp_path):
    config = tiny_config(
        method="apart",
        epochs=3,
        eval_every=2,
        train_size=256,
        test_size=64,
        batch_size=64,
        checkpoint=True,
    )
    result = train_and_evaluate(config, str(tmp_path))
    rows = read_rows(str(tmp_path / "metrics.jsonl"))
    assert [r["epoch"] for r in rows] == [2, 3]  # every eval_every epochs, and the last
    assert [r["step"] for r in rows] == [8, 12]
    for row in rows:
        assert set(row) >= REQUIRED_FIELDS
        assert row["method"] == "apart" and row["eval_examples"] == 64
        assert 0 <= row["pgd20_acc"] <= row["clean_acc"] <= 1
        assert set(row["psi"]) == {"alpha", "alpha_omega", "layer_alphas"}
        assert len(row["psi"]["layer_alphas"]) == 2
    assert rows[1]["train_seconds"] > rows[0]["train_seconds"] > 0
    assert result.last == rows[-1]
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "apart"

    run = setup_run(config)
    template = run.state
    restored = restore_checkpoint(str(tmp_path), run)
    assert int(restored.step) == 12
    assert restored.omega.shape == (256, 10, 10, 1)
    np.testing.assert_allclose(restored.psi["alpha"], rows[-1]["psi"]["alpha"])
    assert not np.array_equal(restored.omega, template.omega)


def test_runs_are_deterministic_and_the_last_batch_may_be_partial(digits, tmp_path):
    config = tiny_config(method="fgsm_rs", epochs=1, train_size=80, test_size=40, batch_size=32)
    first = train_and_evaluate(config, str(tmp_path / "a")).last
    second = train_and_evaluate(config, str(tmp_path / "b")).last
    assert first["step"] == 3  # 32 + 32 + 16
    for key in ("train_loss", "train_acc", "clean_acc", "pgd20_acc"):
        assert first[key] == second[key]
    assert "psi" not in first


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(eps=0.0), "eps"),
        (dict(eps=1.5), "eps"),
        (dict(method="trades"), "method"),
        (dict(model="vgg"), "model"),
        (dict(dataset="imagenet"), "dataset"),
        (dict(pgd_steps=0), "pgd_steps"),
        (dict(pgd_step_size=-1.0), "pgd_step_size"),
        (dict(batch_size=5000), "batch_size"),
    ],
)
def test_invalid_configs_fail_before_anything_is_written(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as info:
        train_and_evaluate(tiny_config(**overrides), str(tmp_path / "run"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_command_rejects_bad_input_with_one_line_and_status_2(tmp_path):
    proc = run_module(
        "experiments.train",
        "--config=experiments/configs/digits.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.eps=2.0",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: eps=2.0 must be in (0, 1]"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_quickstart_command_on_a_reduced_size(tmp_path):
    proc = run_module("experiments.quickstart", f"--workdir={tmp_path}", "--epochs=1", "--width=4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert [c.strip() for c in lines[header].split("  ") if c][1:4] == [
        "clean acc",
        "PGD-20 acc",
        "train s",
    ]
    assert [line.split()[0] for line in lines[header + 2 : header + 5]] == [
        "FGSM",
        "APART",
        "PGD-10",
    ]
    assert any(line.startswith("metrics:") for line in lines)
    for name in ("fgsm", "apart", "pgd"):
        rows = read_rows(str(tmp_path / name / "metrics.jsonl"))
        assert rows[-1]["epoch"] == 1 and set(rows[-1]) >= REQUIRED_FIELDS
        assert (tmp_path / name / "checkpoints").is_dir()
    # One bar per method and epoch; stderr is not a terminal, so each bar is drawn only when
    # it opens and when it closes (with the epoch's accuracies), not at every step.
    assert proc.stderr.count("%|") == 3 * 2
    assert proc.stderr.count("pgd20=") == 3
    assert "checkpoint_manager" not in proc.stderr  # no INFO logs from Orbax


def test_requirements_cover_the_package_dependencies():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    install_requires = {r.strip() for r in parser["options"]["install_requires"].split("\n") if r}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        requirements = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    assert install_requires <= requirements
    assert any(r.startswith("importlib_resources") for r in requirements)


@pytest.mark.slow
def test_readme_library_examples_run():
    with open(os.path.join(ROOT, "README.md")) as f:
        library = f.read().split("## Library", 1)[1].split("\n## ", 1)[0]
    library = library.split("### PyTorch", 1)[0]  # needs torch: tests/test_interop.py runs it
    blocks = [block.split("```", 1)[0] for block in library.split("```python")[1:]]
    assert len(blocks) == 2
    namespace = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    x, x_fgsm, x_pgd = namespace["x"], namespace["x_fgsm"], namespace["x_pgd"]
    for x_adv in (x_fgsm, x_pgd):
        assert float(abs(x_adv - x).max()) <= 8 / 255 + 1e-6
        assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float(abs(x_pgd - x).max()) > 7 / 255
    result = namespace["result"]
    assert [s.attack for s in result.stages] == ["apgd-ce", "apgd-dlr"]
    assert result.clean_accuracy == 1.0
    assert result.robust_accuracy <= namespace["pgd_result"].accuracy + 1e-9


@pytest.mark.slow
def test_a_bfloat16_run_keeps_float32_state_and_stays_close_to_float32(tmp_path):
    base = dict(method="apart", epochs=2, train_size=512, test_size=128, batch_size=64)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(**base, dtype=dtype, omega_dtype=dtype, checkpoint=True)
        last = train_and_evaluate(config, str(tmp_path / dtype)).last
        runs[dtype] = last, restore_checkpoint(str(tmp_path / dtype), setup_run(config))
    (f32, _), (bf16, state) = runs["float32"], runs["bfloat16"]
    assert state.omega.dtype == jnp.bfloat16  # stored in bfloat16: half the memory
    rest = jax.tree.leaves(state.replace(omega=None, rng=None, step=None))
    floats = {x.dtype for x in rest if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}  # weights, BN statistics, psi, optimizers
    # Measured: train loss 2.2209 (float32) and 2.2256 (bfloat16).
    np.testing.assert_allclose(bf16["train_loss"], f32["train_loss"], rtol=0.02)
    for key in ("train_acc", "clean_acc", "pgd20_acc"):
        assert abs(bf16[key] - f32[key]) <= 0.05
    assert bf16["train_loss"] != f32["train_loss"]
