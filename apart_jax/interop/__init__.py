"""PyTorch interop: our PreAct-ResNets as PyTorch state dicts, and back.

Export (no torch needed; ``experiments.export`` writes the files)::

    from apart_jax.interop import export_state_dict
    from apart_jax.run import load_model
    trained = load_model("runs/cifar10_apart")
    state_dict = export_state_dict(trained.model, trained.variables, step=trained.step)
    # {"conv1.weight": (64, 3, 3, 3) float32, ..., "linear.bias": (10,)}: NumPy arrays

Import (a RobustBench ``PreActResNet(PreActBlock, [2, 2, 2, 2], bn_before_fc=True)`` or the
APART release's ``preact20``, from a ``.pt``/``.pth``/``.safetensors`` file or a dict)::

    from apart_jax.interop import load_torch_state_dict
    model, variables = load_torch_state_dict("model.pt")            # preact_resnet18, raw
    logits = model.apply(variables, images_nhwc_in_0_1, train=False)

``variables`` holds ``params``, ``batch_stats`` and ``perturb`` (psi: the release's
``alpha``, ``alpha_omega`` and block alphas when the file has them, zeros otherwise). The key
mapping and what is refused: :mod:`apart_jax.interop.torch_layout`; the PyTorch twin used by
the tests and ``experiments.crosscheck``: :mod:`apart_jax.interop.torch_model`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from apart_jax.interop.torch_layout import (
    Architecture,
    architecture_of,
    from_state_dict,
    infer_architecture,
    normalize_keys,
    robustbench_compatible,
    to_state_dict,
    to_state_dict_shapes,
)
from apart_jax.models import (
    PSI,
    PreActResNet,
    create_model,
    flatten_variables,
    init_variables,
    load_variables,
)

PyTree = Any

__all__ = [
    "Architecture",
    "export_state_dict",
    "exported_architecture",
    "import_state_dict",
    "load_torch_state_dict",
    "read_state_dict_file",
    "robustbench_compatible",
    "to_state_dict_shapes",
]


def exported_architecture(model: nn.Module, variables: PyTree) -> Architecture:
    """The PyTorch :class:`Architecture` of ``model``, input channels read from its stem.

    Raises:
      ValueError: ``model`` has no PyTorch layout here (one line).
    """
    if not isinstance(model, PreActResNet):
        return architecture_of(model, 0)  # raises: no PyTorch layout
    stem = variables["params"]["stem"]["kernel"]
    return architecture_of(model, in_channels=int(stem.shape[2]))


def export_state_dict(
    model: nn.Module, variables: PyTree, psi: PyTree | None = None, *, step: int = 0
) -> dict[str, np.ndarray]:
    """A model's weights as a PyTorch state dict of NumPy arrays (RobustBench's key names).

    Args:
      model: a ``preact_resnet18`` or ``small_cnn`` (any width, either ``shortcut_input``).
      variables: ``{"params", "batch_stats"}`` (a :class:`~apart_jax.run.TrainedModel`'s).
      psi: the ``perturb`` collection, to write the APART release's psi keys too (RobustBench's
        class refuses them); None leaves them out.
      step: stored as every BN's ``num_batches_tracked``.

    Raises:
      ValueError: the model has no PyTorch layout (WideResNet), or the variables do not fit it.
    """
    arch = exported_architecture(model, variables)
    tree = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    if psi is not None:
        tree[PSI] = psi
    return to_state_dict(flatten_variables(tree), arch, step=step, psi=psi is not None)


def _model_for(arch: Architecture) -> nn.Module:
    """Our model of ``arch``: the registry's preact_resnet18 or small_cnn."""
    return create_model(
        arch.name,
        num_classes=arch.num_classes,
        width=arch.width,
        shortcut_input=arch.shortcut_input,
    )


def import_state_dict(
    state_dict: Mapping[str, Any], model: nn.Module | None = None, *, shortcut_input: str = "raw"
) -> tuple[nn.Module, dict[str, PyTree]]:
    """A PyTorch PreActResNet state dict -> ``(model, variables)`` of ours.

    Args:
      state_dict: RobustBench's layout (``bn_before_fc=True``) or the APART release's (with
        psi); values torch tensors or arrays; a ``module.`` prefix is removed.
      model: the Flax model to load into; None builds ``preact_resnet18`` (4 stages of 2
        blocks) or ``small_cnn`` (2 stages of 1) of the state dict's width and classes.
      shortcut_input: for ``model=None``: "raw" (RobustBench's default ``out_shortcut=False``
        and the APART release) or "preact" (``out_shortcut=True``); weights cannot tell.

    Returns:
      ``model`` and ``{"params", "batch_stats", "perturb"}`` (float32 jax arrays, values
      bit-identical to the state dict's); ``perturb`` is zeros when the state dict has no psi.

    Raises:
      ValueError: another layout (no final BN, bottleneck blocks, a WideResNet), or a state
        dict that does not fit ``model`` (one line).
    """
    flat = normalize_keys(state_dict)
    arch = infer_architecture(flat, shortcut_input)
    if model is None:
        model = _model_for(arch)
    else:
        wanted = architecture_of(model, arch.in_channels)
        arch = Architecture(
            arch.stage_sizes, arch.width, arch.in_channels, arch.num_classes, wanted.shortcut_input
        )
        if wanted != arch:
            raise ValueError(f"the state dict holds {arch}, the model is {wanted}")
    variables = from_state_dict(flat, arch)
    image_shape = (8, 8, arch.in_channels)  # any size: parameter shapes do not depend on it
    template = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))
    if not any(k.startswith(PSI + "/") for k in variables):
        for key, ref in _flat_shapes(template[PSI]).items():
            variables[f"{PSI}/{key}"] = np.zeros(ref.shape, ref.dtype)
    return model, load_variables(variables, template)


def _flat_shapes(tree: PyTree) -> dict[str, jax.ShapeDtypeStruct]:
    """``{"a/b": leaf}`` of a tree of shape structs (flatten_variables without the copies)."""
    return traverse_util.flatten_dict(dict(tree), sep="/")


def read_state_dict_file(path: str) -> dict[str, np.ndarray]:
    """A state dict from ``.safetensors`` (no torch needed) or a ``torch.save`` file
    (``.pt``, ``.pth``, ..., read with ``weights_only=True`` on the CPU), as NumPy arrays.

    Raises:
      FileNotFoundError: no such file. ValueError: the file holds no dict of arrays.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    import torch

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return normalize_keys(loaded)


def load_torch_state_dict(
    path_or_dict: str | os.PathLike | Mapping[str, Any],
    model: nn.Module | None = None,
    *,
    shortcut_input: str = "raw",
) -> tuple[nn.Module, dict[str, PyTree]]:
    """:func:`import_state_dict` of a file (:func:`read_state_dict_file`) or an in-memory dict.

    ``model.apply(variables, x, train=False)`` then maps NHWC images in [0, 1] to logits.
    """
    if isinstance(path_or_dict, Mapping):
        state_dict = path_or_dict
    else:
        state_dict = read_state_dict_file(os.fspath(path_or_dict))
    return import_state_dict(state_dict, model, shortcut_input=shortcut_input)
