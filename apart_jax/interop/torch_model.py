"""A PyTorch twin of our PreAct-ResNets, with RobustBench's key names (torch imported lazily).

:func:`torch_preact_resnet` builds, for an :class:`~apart_jax.interop.torch_layout.Architecture`,
an ``nn.Module`` taking NCHW float32 images in [0, 1] and returning logits (B, K). Its
``state_dict`` has exactly the keys and shapes of
:func:`~apart_jax.interop.torch_layout.to_state_dict`: at PreAct-ResNet-18, width 64, 3 input
channels and ``shortcut_input="raw"`` that is RobustBench's
``PreActResNet(PreActBlock, [2, 2, 2, 2], bn_before_fc=True, out_shortcut=False)``
("preact" is ``out_shortcut=True``); with ``psi=True`` the APART release's ``preact20``
(its psi scalars are inert here: the module is for inference).

One difference from RobustBench's forward: the final pooling averages over the whole
feature map (as our model does) instead of ``avg_pool2d(out, 4)``; the two agree on 32x32
inputs, and this one also runs on the 8x8 digits.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from apart_jax.interop.torch_layout import Architecture, infer_architecture, normalize_keys


@functools.cache
def _classes() -> tuple[type, type]:
    """The module classes, defined on first use so that importing this file needs no torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812 (PyTorch's own convention)

    class PreActBlock(nn.Module):
        """relu(bn1(z)) -> conv1 -> relu(bn2) -> conv2, plus the (projected) shortcut."""

        def __init__(self, c_in: int, c_out: int, stride: int, shortcut_input: str, psi: bool):
            super().__init__()
            self.shortcut_input = shortcut_input
            if psi:
                self.alpha = nn.Parameter(torch.zeros(1))
            self.bn1 = nn.BatchNorm2d(c_in)
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False))

        def forward(self, z):
            h = F.relu(self.bn1(z))
            out = self.conv2(F.relu(self.bn2(self.conv1(h))))
            if hasattr(self, "shortcut"):
                return out + self.shortcut(z if self.shortcut_input == "raw" else h)
            return out + z

    class PreActResNet(nn.Module):
        """Stem conv, the stages of :class:`PreActBlock`, BN + ReLU, global average pool, linear."""

        def __init__(self, arch: Architecture, psi: bool):
            super().__init__()
            if psi:
                self.alpha = nn.Parameter(torch.zeros(1))
                self.alpha_omega = nn.Parameter(torch.zeros(1))
            self.conv1 = nn.Conv2d(arch.in_channels, arch.width, 3, 1, padding=1, bias=False)
            c_in = arch.width
            for s, size in enumerate(arch.stage_sizes, start=1):
                c_out = arch.stage_width(s)
                blocks = []
                for b in range(size):
                    stride = 2 if s > 1 and b == 0 else 1
                    blocks.append(PreActBlock(c_in, c_out, stride, arch.shortcut_input, psi))
                    c_in = c_out
                setattr(self, f"layer{s}", nn.Sequential(*blocks))
            self.num_stages = len(arch.stage_sizes)
            self.bn = nn.BatchNorm2d(c_in)
            self.linear = nn.Linear(c_in, arch.num_classes)

        def forward(self, x):
            out = self.conv1(x)
            for s in range(1, self.num_stages + 1):
                out = getattr(self, f"layer{s}")(out)
            out = F.relu(self.bn(out))
            return self.linear(out.mean(dim=(2, 3)))

    return PreActBlock, PreActResNet


def torch_preact_resnet(arch: Architecture, *, psi: bool = False) -> Any:
    """A freshly initialized PyTorch PreActResNet for ``arch`` (float32, training mode).

    ``psi`` adds the APART release's ``alpha``, ``alpha_omega`` and per-block ``alpha``
    parameters (shape (1,)), unused by ``forward``. Raises ValueError for an unknown
    ``shortcut_input``.
    """
    if arch.shortcut_input not in ("raw", "preact"):
        raise ValueError(f"shortcut_input must be 'raw' or 'preact', got {arch.shortcut_input!r}")
    _, net = _classes()
    return net(arch, psi)


def torch_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
    """NumPy arrays -> CPU torch tensors (copies), key order kept."""
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


def load_into_torch(
    state_dict: dict[str, Any], arch: Architecture | None = None, *, shortcut_input: str = "raw"
) -> Any:
    """A PyTorch twin holding ``state_dict`` (arrays or tensors, loaded strictly), in eval mode.

    ``arch`` defaults to the state dict's own (:func:`infer_architecture`, with
    ``shortcut_input``, which weights cannot tell). The state dict holds psi iff it has an
    ``alpha`` key (the APART release's layout).
    """
    state_dict = normalize_keys(state_dict)
    if arch is None:
        arch = infer_architecture(state_dict, shortcut_input)
    module = torch_preact_resnet(arch, psi="alpha" in state_dict)
    module.load_state_dict(torch_state_dict(state_dict), strict=True)
    return module.float().eval()
