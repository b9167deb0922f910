"""Layers with PyTorch's numerics, so that weights and steps can be compared with the release.

* Convolution and dense kernels are initialized uniform in +-1/sqrt(fan_in) (PyTorch's
  ``kaiming_uniform_(a=sqrt(5))``); dense biases likewise.
* :class:`BatchNorm` normalizes with the biased batch variance but updates the running
  variance with the unbiased one, with PyTorch's momentum convention (0.1 = weight of the
  new batch) and epsilon 1e-5. Flax's own ``nn.BatchNorm`` stores the biased variance.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# Uniform in +-sqrt(3 * (1/3) / fan_in) = +-1/sqrt(fan_in), as PyTorch's default.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """Returns an initializer uniform in +-1/sqrt(fan_in), PyTorch's default bias init."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv3x3(
    features: int, strides: int = 1, name: str | None = None, dtype: jnp.dtype | None = None
) -> nn.Conv:
    """A 3x3 convolution without bias, padded by one pixel on each side like PyTorch's.

    ``dtype`` is the computation dtype (None: the input's); the kernel is stored in float32.

    Explicit padding matters: Flax's "SAME" pads (0, 1) for stride 2 on even sizes,
    PyTorch's ``padding=1`` pads (1, 1).
    """
    return nn.Conv(
        features,
        (3, 3),
        strides=(strides, strides),
        padding=((1, 1), (1, 1)),
        use_bias=False,
        kernel_init=torch_kernel_init,
        dtype=dtype,
        name=name,
    )


def conv1x1(
    features: int, strides: int = 1, name: str | None = None, dtype: jnp.dtype | None = None
) -> nn.Conv:
    """A 1x1 projection convolution without bias (the shortcut of a down-sampling block)."""
    return nn.Conv(
        features,
        (1, 1),
        strides=(strides, strides),
        padding="VALID",
        use_bias=False,
        kernel_init=torch_kernel_init,
        dtype=dtype,
        name=name,
    )


class BatchNorm(nn.Module):
    """Batch normalization over all axes but the last, with PyTorch's semantics.

    Variables: ``params/scale`` (C,) init 1, ``params/bias`` (C,) init 0,
    ``batch_stats/mean`` (C,) init 0, ``batch_stats/var`` (C,) init 1.

    In training mode the input is normalized with the batch mean and biased variance and,
    unless the module is initializing, the running statistics are updated (the caller must
    make ``batch_stats`` mutable). Under ``jit`` with a batch sharded over devices the
    means are global, so statistics do not depend on the number of devices.

    Statistics are computed in at least float32 (bfloat16 inputs are upcast) and stored in
    float32; the output has ``dtype`` (None: the precision the statistics were computed in).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            if not self.is_initializing():
                count = x.size // features
                unbiased = var * (count / max(count - 1, 1))
                m = self.momentum
                running_mean.value = (1.0 - m) * running_mean.value + m * mean
                running_var.value = (1.0 - m) * running_var.value + m * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y if self.dtype is None else y.astype(self.dtype)
