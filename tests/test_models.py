"""Models: psi's collection, perturbation sites, PyTorch numerics, weight loading."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from apart_jax.attacks import cross_entropy
from apart_jax.models import (
    PSI,
    SITES,
    create_model,
    flatten_variables,
    init_variables,
    load_variables,
)
from apart_jax.models.layers import BatchNorm
from apart_jax.models.perturbation import block_alphas, site_zeros

BLOCKS = [f"stage{s}_block{b}" for s in range(1, 5) for b in (1, 2)]


@pytest.fixture(scope="module")
def resnet():
    model = create_model("preact_resnet18", num_classes=10, width=4)
    return model, init_variables(model, jax.random.key(0), (32, 32, 3))


def test_psi_lives_in_its_own_collection_not_in_params(resnet):
    _, variables = resnet
    assert set(variables) == {"params", "batch_stats", PSI}
    assert set(variables[PSI]) == {"alpha", "alpha_omega", *BLOCKS}
    assert all(variables[PSI][b]["alpha"].shape == () for b in BLOCKS)
    param_names = traverse_util.flatten_dict(variables["params"], sep="/")
    assert not any("alpha" in name for name in param_names)


def test_full_size_parameter_count_equals_the_pytorch_model():
    model = create_model("preact_resnet18", num_classes=10, width=64)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (32, 32, 3)))
    # stem 1,728 + stages 147,968 + 525,184 + 2,098,944 + 8,392,192 + final BN 1,024 + head 5,130.
    assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == 11_172_170


WRN_BLOCKS = [f"stage{s}_block{b}" for s in range(1, 4) for b in range(1, 6)]


@pytest.mark.slow
def test_wide_resnet_has_fifteen_blocks_with_psi_and_maps_images_to_logits():
    # Width 16: stem 16, stages at 16, 32, 64 channels.
    model = create_model("wide_resnet34_10", num_classes=7, width=16)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    alphas = block_alphas(variables[PSI])
    assert list(alphas) == WRN_BLOCKS
    assert all(a.shape == () for a in alphas.values())
    assert set(variables[PSI]) == {"alpha", "alpha_omega", *WRN_BLOCKS}
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    assert model.apply(variables, x).shape == (2, 7)
    zeros = site_zeros(model.apply, variables, x)
    assert zeros["stage1_block1"]["preact"].shape == (2, 32, 32, 16)  # the stem's output
    assert zeros["stage2_block1"]["preact"].shape == (2, 32, 32, 16)
    assert zeros["stage2_block2"]["preact"].shape == (2, 16, 16, 32)
    assert zeros["stage3_block5"]["preact"].shape == (2, 8, 8, 64)
    params = variables["params"]
    assert params["stem"]["kernel"].shape == (3, 3, 3, 16)
    assert params["head"]["kernel"].shape == (64, 7)
    # Projections only where the shape changes: stages 2 and 3 (stage 1 keeps 16 channels).
    assert [b for b in WRN_BLOCKS if "shortcut" in params[b]] == ["stage2_block1", "stage3_block1"]


def test_wide_resnet34_10_parameter_count_equals_the_pytorch_model():
    """WRN-34-10 for 10 classes has 46,160,474 parameters, as PyTorch's WideResNet(34, 10).

    Same layout as Madry's/TRADES' model: convolutions (stem, blocks, 1x1 projections)
    without bias, BN scale and bias, a dense head with bias. Shapes only (no forward pass).
    """
    model = create_model("wide_resnet34_10", num_classes=10, width=160)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (32, 32, 3)))
    params = shapes["params"]
    assert params["stem"]["kernel"].shape == (3, 3, 3, 16)
    assert params["stage1_block1"]["shortcut"]["kernel"].shape == (1, 1, 16, 160)
    assert params["stage3_block5"]["conv2"]["kernel"].shape == (3, 3, 640, 640)
    assert params["head"]["kernel"].shape == (640, 10)
    assert len(block_alphas(shapes[PSI])) == 15
    # stem 432 + stages 2,102,112 + 8,812,480 + 35,237,760 + final BN 1,280 + head 6,410.
    assert sum(x.size for x in jax.tree.leaves(params)) == 46_160_474


def test_sites_sit_on_each_blocks_preactivated_input(resnet):
    model, variables = resnet
    zeros = site_zeros(model.apply, variables, jnp.zeros((2, 32, 32, 3)))
    shapes = {b: zeros[b]["preact"].shape for b in BLOCKS}
    # A block's input has the previous stage's width and resolution.
    assert shapes["stage1_block1"] == (2, 32, 32, 4)
    assert shapes["stage2_block1"] == (2, 32, 32, 4)
    assert shapes["stage2_block2"] == (2, 16, 16, 8)
    assert shapes["stage4_block1"] == (2, 8, 8, 16)
    assert shapes["stage4_block2"] == (2, 4, 4, 32)


@pytest.mark.slow
def test_site_gradient_is_the_gradient_of_an_additive_perturbation(resnet):
    model, variables32 = resnet
    with jax.enable_x64(True):  # float64, so that a central difference is exact enough
        variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables32)
        x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3), jnp.float64)
        y = jnp.array([0, 1, 2])
        zeros = site_zeros(model.apply, variables, x)

        def loss(sites):
            variables_with_sites = {**variables, SITES: sites}
            logits, _ = model.apply(variables_with_sites, x, train=True, mutable=["batch_stats"])
            return jnp.mean(cross_entropy(logits, y))

        plain, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        np.testing.assert_array_equal(loss(zeros), jnp.mean(cross_entropy(plain, y)))
        grads = jax.grad(loss)(zeros)
        direction = jax.tree.map(
            lambda z: jax.random.normal(jax.random.key(2), z.shape, jnp.float64), zeros
        )
        h = 1e-6
        plus = loss(jax.tree.map(lambda d: h * d, direction))
        minus = loss(jax.tree.map(lambda d: -h * d, direction))
        pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        inner = sum(jnp.vdot(g, d) for g, d in pairs)
        np.testing.assert_allclose((plus - minus) / (2 * h), inner, rtol=1e-5)
        assert abs(float(inner)) > 1e-3


def test_shortcut_variants_share_weights_but_not_outputs(resnet):
    model, variables = resnet
    preact = create_model("preact_resnet18", num_classes=10, width=4, shortcut_input="preact")
    x = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3))
    raw_out = model.apply(variables, x)
    preact_out = preact.apply(variables, x)
    assert raw_out.shape == preact_out.shape == (2, 10)
    assert not jnp.allclose(raw_out, preact_out)
    with pytest.raises(ValueError, match="shortcut_input"):
        create_model("preact_resnet18", num_classes=10, width=4, shortcut_input="post").init(
            jax.random.key(0), x
        )


def test_batchnorm_follows_pytorch_running_statistics():
    x = jnp.array([[1.0, 10.0], [2.0, 10.0], [3.0, 13.0], [6.0, 7.0]])
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), x, train=True)
    out, mutated = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    mean, biased = x.mean(0), x.var(0)
    np.testing.assert_allclose(out, (x - mean) / jnp.sqrt(biased + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(mutated["batch_stats"]["mean"], 0.1 * mean, rtol=1e-6)
    unbiased = x.var(0, ddof=1)
    np.testing.assert_allclose(mutated["batch_stats"]["var"], 0.9 + 0.1 * unbiased, rtol=1e-6)
    inference = bn.apply({**variables, **mutated}, x, train=False)
    expected = (x - 0.1 * mean) / jnp.sqrt(0.9 + 0.1 * unbiased + 1e-5)
    np.testing.assert_allclose(inference, expected, rtol=1e-6)


def test_kernels_are_uniform_within_pytorch_bounds(resnet):
    _, variables = resnet
    kernel = variables["params"]["stage3_block1"]["conv1"]["kernel"]  # 3x3x8 -> 16
    bound = 1 / np.sqrt(3 * 3 * 8)
    assert float(jnp.max(jnp.abs(kernel))) <= bound
    assert float(jnp.max(jnp.abs(kernel))) > 0.9 * bound


def test_variables_load_from_a_plain_dict_of_arrays(resnet):
    model, variables = resnet
    flat = flatten_variables(variables)
    assert all(isinstance(v, np.ndarray) for v in flat.values())
    assert "params/stem/kernel" in flat and "perturb/stage1_block1/alpha" in flat
    flat["params/head/bias"] = np.arange(10, dtype=np.float64)
    loaded = load_variables(flat, variables)
    assert loaded["params"]["head"]["bias"].dtype == jnp.float32
    np.testing.assert_array_equal(loaded["params"]["head"]["bias"], np.arange(10))
    x = jnp.ones((1, 32, 32, 3))
    shift = loaded["params"]["head"]["bias"] - variables["params"]["head"]["bias"]
    np.testing.assert_allclose(model.apply(loaded, x), model.apply(variables, x) + shift, atol=1e-6)


def test_load_variables_names_what_does_not_match(resnet):
    _, variables = resnet
    flat = flatten_variables(variables)
    missing = {k: v for k, v in flat.items() if k != "params/stem/kernel"}
    with pytest.raises(ValueError, match="params/stem/kernel"):
        load_variables(missing, variables)
    with pytest.raises(ValueError, match="params/extra"):
        load_variables({**flat, "params/extra": np.zeros(1)}, variables)
    with pytest.raises(ValueError, match="shape"):
        load_variables({**flat, "params/head/bias": np.zeros(3)}, variables)


def test_unknown_model_is_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg", num_classes=10, width=4)


def test_bfloat16_computes_in_bfloat16_and_stays_close_to_float32(resnet):
    model, variables = resnet
    mixed = create_model("preact_resnet18", num_classes=10, width=4, dtype="bfloat16")
    x = jax.random.uniform(jax.random.key(1), (8, 32, 32, 3))
    exact = model.apply(variables, x, train=False)
    low = mixed.apply(variables, x, train=False)  # same float32 parameters
    assert low.dtype == jnp.float32
    assert "bf16[8,32,32,4]" in str(jax.make_jaxpr(lambda x: mixed.apply(variables, x))(x))
    assert not np.array_equal(low, exact)
    np.testing.assert_allclose(low, exact, rtol=0.05, atol=0.02 * float(jnp.abs(exact).max()))
    _, stats = mixed.apply(variables, x, train=True, mutable=["batch_stats"])
    assert {a.dtype for a in jax.tree.leaves(stats)} == {jnp.dtype(jnp.float32)}
