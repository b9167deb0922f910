"""Pre-activation ResNets with APART's perturbation sites: PreAct-ResNet-18, WRN-34-10, a small CNN.

Inputs are images in [0, 1], shape (B, H, W, C), no mean/std normalization. The architecture and
its choices: docs/algorithm.md#model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from apart_jax.models.layers import BatchNorm, conv1x1, conv3x3, torch_bias_init, torch_kernel_init
from apart_jax.models.perturbation import declare_psi, site

ShortcutInput = Literal["raw", "preact"]


class PreActBlock(nn.Module):
    """A pre-activation basic block with a perturbation site on its pre-activated input.

    For input z (B, H, W, C_in)::

        h   = relu(bn1(z))
        h~  = h + perturbation          # the site; zero unless ``perturbations`` are passed
        out = conv2(relu(bn2(conv1(h~)))) + shortcut

    The shortcut is the identity when shape is kept; otherwise a strided 1x1 convolution
    of the raw input z (``shortcut_input="raw"``, the APART release) or of h~
    (``"preact"``, the common PreActResNet, which sees the perturbed activation).
    The block also owns its psi scalar ``alpha`` in the ``perturb`` collection.
    """

    features: int
    strides: int = 1
    shortcut_input: ShortcutInput = "raw"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, z: jax.Array, train: bool) -> jax.Array:
        declare_psi(self, "alpha")
        dtype = self.dtype
        h = site(self, nn.relu(BatchNorm(name="bn1", dtype=dtype)(z, train)))
        out = conv3x3(self.features, self.strides, name="conv1", dtype=dtype)(h)
        out = nn.relu(BatchNorm(name="bn2", dtype=dtype)(out, train))
        out = conv3x3(self.features, 1, name="conv2", dtype=dtype)(out)
        if self.strides != 1 or z.shape[-1] != self.features:
            source = z if self.shortcut_input == "raw" else h
            shortcut = conv1x1(self.features, self.strides, name="shortcut", dtype=dtype)(source)
        else:
            shortcut = z
        return out + shortcut


class PreActResNet(nn.Module):
    """A pre-activation ResNet for small images.

    stem 3x3 conv (``stem_width`` channels, no bias); stages of :class:`PreActBlock` at
    ``width * width_multipliers[s]`` channels with the given strides; BN, ReLU, global
    average pooling and a dense layer. The top level owns psi's ``alpha`` and
    ``alpha_omega``.

    Attributes:
      stage_sizes: blocks per stage, (2, 2, 2, 2) for ResNet-18, (5, 5, 5) for WRN-34.
      stage_strides: stride of each stage's first block.
      width: channels of the first stage (64 in the paper), and of the stem by default.
      num_classes: outputs of the final dense layer.
      shortcut_input: "raw" (release, default) or "preact"; see :class:`PreActBlock`.
      dtype: computation dtype: None (the input's, float32 normally) or bfloat16 for mixed
        precision. Parameters, BN statistics and the logits stay at least float32.
      stem_width: channels of the stem; None = ``width`` (16 for a WideResNet).
      width_multipliers: stage s has ``width * width_multipliers[s]`` channels, one entry
        per stage; None = ``2**s`` (1, 2, 4, 8 for ResNet-18).
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    stage_strides: Sequence[int] = (1, 2, 2, 2)
    width: int = 64
    num_classes: int = 10
    shortcut_input: ShortcutInput = "raw"
    dtype: jnp.dtype | None = None
    stem_width: int | None = None
    width_multipliers: Sequence[int] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images (B, H, W, C) in [0, 1] to logits (B, num_classes)."""
        if self.shortcut_input not in ("raw", "preact"):
            raise ValueError(
                f"shortcut_input must be 'raw' or 'preact', got {self.shortcut_input!r}"
            )
        multipliers = self.width_multipliers
        if multipliers is None:
            multipliers = [2**s for s in range(len(self.stage_sizes))]
        declare_psi(self, "alpha", "alpha_omega")
        stem_width = self.width if self.stem_width is None else self.stem_width
        out = conv3x3(stem_width, 1, name="stem", dtype=self.dtype)(x)
        stages = zip(self.stage_sizes, self.stage_strides, multipliers, strict=True)
        for s, (size, stride, multiplier) in enumerate(stages):
            for b in range(size):
                out = PreActBlock(
                    self.width * multiplier,
                    stride if b == 0 else 1,
                    self.shortcut_input,
                    self.dtype,
                    name=f"stage{s + 1}_block{b + 1}",
                )(out, train)
        out = nn.relu(BatchNorm(name="bn_final", dtype=self.dtype)(out, train))
        out = jnp.mean(out, axis=(1, 2))
        logits = nn.Dense(
            self.num_classes,
            kernel_init=torch_kernel_init,
            bias_init=torch_bias_init(out.shape[-1]),
            dtype=self.dtype,
            name="head",
        )(out)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def preact_resnet18(
    num_classes: int = 10,
    width: int = 64,
    shortcut_input: ShortcutInput = "raw",
    dtype: jnp.dtype | None = None,
) -> PreActResNet:
    """PreAct-ResNet-18 as in the APART release (width 64 is the paper's size)."""
    return PreActResNet((2, 2, 2, 2), (1, 2, 2, 2), width, num_classes, shortcut_input, dtype)


def small_cnn(
    num_classes: int = 10,
    width: int = 16,
    shortcut_input: ShortcutInput = "raw",
    dtype: jnp.dtype | None = None,
) -> PreActResNet:
    """A small pre-activation CNN for tiny images (8x8 to 16x16): stem, two blocks (strides 1, 2).

    Same block and perturbation sites as PreAct-ResNet-18, so every method runs on it.
    """
    return PreActResNet((1, 1), (1, 2), width, num_classes, shortcut_input, dtype)


def wide_resnet34_10(
    num_classes: int = 10,
    width: int = 160,
    shortcut_input: ShortcutInput = "raw",
    dtype: jnp.dtype | None = None,
) -> PreActResNet:
    """WRN-34-10, the pre-activation WideResNet of Zagoruyko & Komodakis used by Madry et al.

    For images (B, 32, 32, 3): a 3x3 stem conv to 16 channels (B, 32, 32, 16); three stages
    of 5 :class:`PreActBlock` each, at ``width``, ``2 * width``, ``4 * width`` channels
    (160, 320, 640 for the widen factor 10) with strides 1, 2, 2, giving (B, 32, 32, 160),
    (B, 16, 16, 320), (B, 8, 8, 640); BN, ReLU, global average pooling (B, 640) and a dense
    layer to logits (B, num_classes). 15 blocks, so 15 perturbation sites and block alphas.

    ``width`` is the first stage's channels, 16 x the widen factor (160 = WRN-34-10; the stem
    stays at 16 channels for any width). Each stage's first block has a 1x1 projection
    shortcut (for stage 1 because 16 != width). Madry's and TRADES' WideResNet feeds that
    projection the pre-activated input: ``shortcut_input="preact"`` matches them exactly,
    "raw" is the APART release's choice for its PreAct-ResNet-18; the parameters are the same.
    At width 160 with 10 classes it has 46,160,474 parameters (convolutions without bias,
    the head with bias), the count of the PyTorch WideResNet(34, 10).
    """
    return PreActResNet(
        (5, 5, 5),
        (1, 2, 2),
        width,
        num_classes,
        shortcut_input,
        dtype,
        stem_width=16,
        width_multipliers=(1, 2, 4),
    )
