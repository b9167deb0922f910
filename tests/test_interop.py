"""PyTorch interop: the state-dict layout, the PyTorch twin, the export and crosscheck commands."""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest
from conftest import ROOT, run_module, tiny_config
from flax import traverse_util

torch = pytest.importorskip("torch")

from apart_jax.interop import (  # noqa: E402 (after the skip: these tests need torch)
    export_state_dict,
    exported_architecture,
    import_state_dict,
    load_torch_state_dict,
    to_state_dict_shapes,
)
from apart_jax.interop.torch_layout import Architecture, robustbench_compatible  # noqa: E402
from apart_jax.interop.torch_model import load_into_torch, torch_preact_resnet  # noqa: E402
from apart_jax.models import (  # noqa: E402
    PSI,
    create_model,
    flatten_variables,
    init_variables,
    load_variables,
)

# Measured with random_variables (logits up to ~4): over 5 seeds each of widths 8 and 16
# (raw and preact) and the small CNN, and 2 seeds at width 64 (32x32x3), JAX and PyTorch
# logits differed by at most 7.2e-7 (float32 sums in another order); on the trained
# quickstart models by at most 3.8e-6. 1e-4 leaves a 25x margin and stays far below the
# 0.5-1.6 the other shortcut choice moves the logits by.
LOGITS_ATOL = 1e-4


def random_variables(model, seed: int, image_shape=(16, 16, 3), psi: bool = False):
    """Random variables with non-trivial BN parameters and running statistics and logits of
    O(1): kernels uniform in +-1/sqrt(fan_in) (the head's 10x that). Drawn with NumPy on the
    model's variable shapes (``eval_shape``: nothing is compiled)."""
    template = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))
    flat = traverse_util.flatten_dict(template, sep="/")
    rng = np.random.default_rng(seed)
    for key, ref in flat.items():
        if key.endswith(("/scale", "/var")):
            flat[key] = rng.uniform(0.5, 1.5, ref.shape)
        elif key.endswith(("/bias", "/mean")) or key.startswith(PSI):
            flat[key] = rng.normal(0.0, 0.2, ref.shape)
        else:  # a kernel
            bound = 1.0 / np.sqrt(np.prod(ref.shape[:-1]))
            bound *= 10.0 if key == "params/head/kernel" else 1.0
            flat[key] = rng.uniform(-bound, bound, ref.shape)
    variables = load_variables(flat, template)
    return variables if psi else {k: variables[k] for k in ("params", "batch_stats")}


def torch_apply(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def compare_logits(name: str, width: int, shortcut_input: str, image_shape, seed=0):
    model = create_model(name, num_classes=10, width=width, shortcut_input=shortcut_input)
    variables = random_variables(model, seed, image_shape)
    arch = exported_architecture(model, variables)
    module = load_into_torch(export_state_dict(model, variables, step=3), arch)
    x = np.random.default_rng(seed).uniform(size=(4, *image_shape)).astype(np.float32)
    ours = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x))
    theirs = torch_apply(module, x)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=LOGITS_ATOL)
    assert np.abs(ours).max() > 0.5  # logits of O(1): the tolerance is meaningful
    return arch, module, x, ours


@pytest.mark.parametrize("width", [8, 16])
@pytest.mark.parametrize("shortcut_input", ["raw", "preact"])
def test_pytorch_twin_gives_the_same_logits(width, shortcut_input):
    arch, module, x, ours = compare_logits("preact_resnet18", width, shortcut_input, (16, 16, 3))
    assert not module.training  # BN in eval mode: running statistics, as train=False
    # The shortcut choice matters: the other one (out_shortcut flipped) is far off.
    other = "preact" if shortcut_input == "raw" else "raw"
    flipped = torch_preact_resnet(Architecture(**{**arch.__dict__, "shortcut_input": other}))
    flipped.load_state_dict(module.state_dict(), strict=True)
    assert np.abs(torch_apply(flipped.eval(), x) - ours).max() > 100 * LOGITS_ATOL


def test_pytorch_twin_of_the_small_cnn_on_one_channel_images():
    arch, _, _, _ = compare_logits("small_cnn", 8, "raw", (8, 8, 1))
    assert (arch.name, arch.in_channels) == ("small_cnn", 1)


def test_pytorch_twin_at_width_64_on_cifar_sized_images():
    arch, _, _, _ = compare_logits("preact_resnet18", 64, "raw", (32, 32, 3))
    assert robustbench_compatible(arch) is None


def robustbench_keys() -> list[tuple[str, tuple[int, ...]]]:
    """The state dict of RobustBench's PreActResNet(PreActBlock, [2, 2, 2, 2],
    bn_before_fc=True), written out from its definition: names, shapes, order."""

    def bn(prefix, channels):
        return [
            (f"{prefix}.weight", (channels,)),
            (f"{prefix}.bias", (channels,)),
            (f"{prefix}.running_mean", (channels,)),
            (f"{prefix}.running_var", (channels,)),
            (f"{prefix}.num_batches_tracked", ()),
        ]

    keys = [("conv1.weight", (64, 3, 3, 3))]
    in_planes = 64
    for layer, (planes, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
        for block, s in enumerate([stride, 1]):
            p = f"layer{layer}.{block}."
            keys += bn(p + "bn1", in_planes)
            keys.append((p + "conv1.weight", (planes, in_planes, 3, 3)))
            keys += bn(p + "bn2", planes)
            keys.append((p + "conv2.weight", (planes, planes, 3, 3)))
            if s != 1 or in_planes != planes:
                keys.append((p + "shortcut.0.weight", (planes, in_planes, 1, 1)))
            in_planes = planes
    return keys + bn("bn", 512) + [("linear.weight", (10, 512)), ("linear.bias", (10,))]


def test_width_64_layout_is_robustbench_key_for_key():
    expected = robustbench_keys()
    arch = Architecture((2, 2, 2, 2), 64, 3, 10, "raw")
    assert list(to_state_dict_shapes(arch).items()) == expected
    twin = torch_preact_resnet(arch).state_dict()
    assert [(k, tuple(v.shape)) for k, v in twin.items()] == expected
    model = create_model("preact_resnet18", num_classes=10, width=64)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (32, 32, 3)))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    exported = export_state_dict(model, {k: zeros[k] for k in ("params", "batch_stats")})
    assert [(k, v.shape) for k, v in exported.items()] == expected
    assert exported["layer1.0.bn1.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("psi", [False, True])
def test_export_then_import_is_bit_exact(psi):
    model = create_model("preact_resnet18", num_classes=10, width=8, shortcut_input="preact")
    variables = random_variables(model, 1, psi=True)
    state_dict = export_state_dict(model, variables, variables[PSI] if psi else None, step=7)
    assert ("alpha" in state_dict) == psi
    assert state_dict["bn.num_batches_tracked"] == 7
    # Through torch tensors and a DataParallel prefix, as a checkpoint file would hold them.
    as_torch = {f"module.{k}": torch.from_numpy(v) for k, v in state_dict.items()}
    loaded_model, loaded = load_torch_state_dict(as_torch, shortcut_input="preact")
    assert loaded_model == model
    expected = flatten_variables(variables)
    if not psi:  # without psi keys the perturb collection is zeros
        expected.update({k: np.zeros_like(v) for k, v in expected.items() if k.startswith(PSI)})
    got = flatten_variables(loaded)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


def test_readme_pytorch_example_runs(tmp_path, monkeypatch):
    """The README's "Back into JAX" block, on a state dict saved as model.pt."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("### PyTorch", 1)[1].split("\n## ", 1)[0]
    (block,) = [b.split("```", 1)[0] for b in section.split("```python")[1:]]
    model = create_model("preact_resnet18", num_classes=10, width=8)
    variables = random_variables(model, 3, image_shape=(32, 32, 3))
    state_dict = export_state_dict(model, variables, step=1)
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / "model.pt")
    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    namespace = {"images_nhwc_in_0_1": x}
    exec(compile(block, "README.md", "exec"), namespace)
    expected = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(namespace["logits"], expected)


def test_the_apart_release_preact20_layout_imports_psi():
    # preact20's state dict: RobustBench's keys plus alpha, alpha_omega and each block's
    # alpha, all of shape (1,) (models/preresnet.py of the APART release).
    rng = np.random.default_rng(0)
    state_dict = {k: rng.normal(size=shape).astype(np.float32) for k, shape in robustbench_keys()}
    state_dict.update(alpha=np.array([1e-4], np.float32), alpha_omega=np.array([2e-4], np.float32))
    for layer in range(1, 5):
        for block in range(2):
            state_dict[f"layer{layer}.{block}.alpha"] = np.array([layer + block / 10], np.float32)
    model, variables = import_state_dict(state_dict)
    assert (model.width, model.shortcut_input, model.num_classes) == (64, "raw", 10)
    psi = variables[PSI]
    assert float(psi["alpha"]) == np.float32(1e-4) and float(psi["alpha_omega"]) == np.float32(2e-4)
    assert float(psi["stage3_block2"]["alpha"]) == np.float32(3.1)
    np.testing.assert_array_equal(
        variables["params"]["head"]["kernel"], state_dict["linear.weight"].T
    )
    # And back: the release's layout, key for key.
    again = export_state_dict(model, variables, psi, step=0)
    assert again.keys() == state_dict.keys()
    for key in state_dict:
        if not key.endswith("num_batches_tracked"):
            assert np.array_equal(again[key], state_dict[key]), key


def test_unsupported_models_and_layouts_are_refused_in_one_line():
    wrn = create_model("wide_resnet34_10", num_classes=10, width=16)
    shapes = jax.eval_shape(lambda: init_variables(wrn, jax.random.key(0), (8, 8, 3)))
    with pytest.raises(ValueError, match="wide_resnet34_10") as error:
        export_state_dict(wrn, shapes)
    assert "\n" not in str(error.value)
    import flax.linen as nn

    with pytest.raises(ValueError, match="no PyTorch layout"):
        export_state_dict(nn.Dense(3), {"params": {}})
    keys = dict(robustbench_keys())
    state_dict = {k: np.zeros(s, np.float32) for k, s in keys.items()}
    without_bn = {k: v for k, v in state_dict.items() if not k.startswith("bn.")}
    with pytest.raises(ValueError, match="no final BN"):
        import_state_dict(without_bn)
    bottleneck = {**state_dict, "layer1.0.bn3.weight": np.zeros(64, np.float32)}
    with pytest.raises(ValueError, match="another layout.*layer1.0.bn3.weight"):
        import_state_dict(bottleneck)
    small = create_model("preact_resnet18", num_classes=10, width=8)
    with pytest.raises(ValueError, match="holds"):
        import_state_dict(state_dict, small)
    three_stages = {k: v for k, v in state_dict.items() if not k.startswith("layer4.")}
    with pytest.raises(ValueError, match="blocks per stage"):
        import_state_dict(three_stages)
    missing = {k: v for k, v in state_dict.items() if k != "layer2.0.shortcut.0.weight"}
    with pytest.raises(ValueError, match="missing.*layer2.0.shortcut.0.weight"):
        import_state_dict(missing)
    assert "width 8" in robustbench_compatible(Architecture((2, 2, 2, 2), 8, 3, 10))
    assert "channel" in robustbench_compatible(Architecture((2, 2, 2, 2), 64, 1, 10))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A width-4 small CNN trained with FGSM for one epoch, checkpointed, with an evaluate
    report of its checkpoint (the numbers written by hand: export only copies them)."""
    from apart_jax.trainer import train_and_evaluate

    workdir = tmp_path_factory.mktemp("interop_run")
    config = tiny_config(
        method="fgsm", epochs=1, train_size=256, test_size=64, batch_size=64, checkpoint=True
    )
    train_and_evaluate(config, str(workdir))
    report = {
        "checkpoint_step": 4,
        "num_points": 64,
        "eps": 8 / 255,
        "norm": "linf",
        "clean_accuracy": 0.5,
        "results": {"autoattack": {"robust_accuracy": 0.125}},
    }
    (workdir / "eval.json").write_text(json.dumps(report))
    return workdir


@pytest.mark.slow  # trains a tiny run and starts the command (about 20 s on 2 cores)
def test_export_command_writes_torch_safetensors_and_model_info(tiny_run, tmp_path):
    from safetensors.numpy import load_file

    from apart_jax.run import load_model

    out = tmp_path / "exported" / "tiny"
    proc = run_module("experiments.export", f"--workdir={tiny_run}", f"--out={out}.pt")
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint_manager" not in proc.stderr
    trained = load_model(str(tiny_run))
    expected = export_state_dict(trained.model, trained.variables, step=trained.step)
    from_pt = torch.load(f"{out}.pt", weights_only=True)
    from_safetensors = load_file(f"{out}.safetensors")
    assert list(from_pt) == list(expected)  # PyTorch's order; safetensors sorts the keys
    for loaded in (from_pt, from_safetensors):
        assert sorted(loaded) == sorted(expected)
        for key, value in expected.items():
            assert np.array_equal(np.asarray(loaded[key]), value), key
    info = json.loads((tmp_path / "exported" / "tiny.json").read_text())
    assert info["eps"] == "8/255" and info["threat_model"] == "Linf"
    assert (info["clean_acc"], info["autoattack_acc"], info["reported"]) == (
        "50.00",
        "12.50",
        "12.50",
    )
    assert info["dataset"] == "digits" and info["architecture"] == "PreAct small CNN (width 4)"
    extra = info["apart_jax"]
    assert extra["passes_per_step"] == 2 and extra["checkpoint_step"] == 4
    assert extra["train_seconds"] > 0 and extra["robustbench_loadable"] is False
    for path in (f"{out}.pt", f"{out}.safetensors"):
        model, variables = load_torch_state_dict(path, trained.model)
        for key, value in flatten_variables(trained.variables).items():
            assert np.array_equal(flatten_variables(variables)[key], value), key

    proc = run_module("experiments.export", f"--workdir={tmp_path}", f"--out={out}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.slow  # both AutoAttacks on 8 points of a tiny run (about 25 s on 2 cores)
def test_crosscheck_command_compares_both_autoattacks(tiny_run, tmp_path):
    out = tmp_path / "crosscheck.json"
    proc = run_module(
        "experiments.crosscheck",
        f"--workdir={tiny_run}",
        "--num_points=8",
        "--batch_size=8",
        # One thread: PyTorch's threads stall each other when other tests load the cores.
        "--torch_threads=1",
        f"--out={out}",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["num_points"] == 8 and report["test_points"] == 64
    assert report["logits_max_abs_diff"] < LOGITS_ATOL
    assert report["clean_predictions_agree"] == 8
    ours, original = report["ours"], report["original"]
    assert ours["clean_accuracy"] == original["clean_accuracy"]
    assert sum(report["agreement"].values()) == 8
    assert [s["attack"] for s in ours["stages"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert original["max_linf_perturbation"] <= 8 / 255 + 1e-6
    assert original["seconds"] > 0 and report["time_ratio_original_over_ours"] > 0
    assert original["torch_threads"] == 1
    assert "robust under both" in proc.stdout
