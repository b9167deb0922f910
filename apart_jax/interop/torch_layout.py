"""Our PreAct-ResNet variables <-> a PyTorch ``state_dict`` (NumPy arrays, no torch needed).

The PyTorch layout is RobustBench's ``PreActResNet(PreActBlock, [2, 2, 2, 2],
bn_before_fc=True)`` (the APART release's ``preact20`` adds its psi scalars to the same keys):

=====================================  ==========================================  =============
ours (:func:`flatten_variables` key)   PyTorch key                                 conversion
=====================================  ==========================================  =============
params/stem/kernel (3, 3, I, O)        conv1.weight (O, I, 3, 3)                   HWIO -> OIHW
params/stage{s}_block{b}/conv1/kernel  layer{s}.{b-1}.conv1.weight                 HWIO -> OIHW
params/stage{s}_block{b}/conv2/kernel  layer{s}.{b-1}.conv2.weight                 HWIO -> OIHW
params/stage{s}_block{b}/shortcut/...  layer{s}.{b-1}.shortcut.0.weight (O,I,1,1)  HWIO -> OIHW
params/.../bn{1,2}/{scale,bias}        layer{s}.{b-1}.bn{1,2}.{weight,bias}        as is
batch_stats/.../bn{1,2}/{mean,var}     ....bn{1,2}.{running_mean,running_var}      as is
(none)                                 ....bn{1,2}.num_batches_tracked () int64    = ``step``
params/bn_final/...                    bn.* (and batch_stats/bn_final/...)         as is
params/head/kernel (C, K), bias (K,)   linear.weight (K, C), linear.bias (K,)      transposed
perturb/alpha, perturb/alpha_omega ()  alpha, alpha_omega (1,)                     reshaped
perturb/stage{s}_block{b}/alpha ()     layer{s}.{b-1}.alpha (1,)                   reshaped
=====================================  ==========================================  =============

Both BN conventions agree (PyTorch's: eps 1e-5, unbiased running variance, see
:mod:`apart_jax.models.layers`), so the statistics copy as they are. ``num_batches_tracked``
only matters to a PyTorch BN without momentum; it is set to the checkpoint's step.

``preact_resnet18`` and ``small_cnn`` (a stem of ``width`` channels, stage s of
``width * 2**(s-1)``, strides 1, 2, 2, ...) have this layout, at any width; only
``preact_resnet18`` at width 64 on 3-channel inputs is RobustBench's class itself
(:func:`robustbench_compatible`). Everything else (``wide_resnet34_10``, a state dict without
the final BN, bottleneck blocks) is refused with one line.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from apart_jax.models import PSI, PreActResNet

StateDict = dict[str, np.ndarray]

#: The models with this layout, by their blocks per stage.
SUPPORTED = {(2, 2, 2, 2): "preact_resnet18", (1, 1): "small_cnn"}
_SUPPORTED_NAMES = " and ".join(SUPPORTED.values())
_BN_FIELDS = (("scale", "weight"), ("bias", "bias"))
_STAT_FIELDS = (("mean", "running_mean"), ("var", "running_var"))
_TRACKED = ".num_batches_tracked"
_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")
#: What a block of this layout may hold (after ``layer{s}.{b}.``).
_BLOCK_ENTRIES = re.compile(
    r"^(bn[12]\.(weight|bias|running_mean|running_var|num_batches_tracked)"
    r"|conv[12]\.weight|shortcut\.0\.weight|alpha)$"
)
_TOP_ENTRIES = re.compile(
    r"^(conv1\.weight|bn\.(weight|bias|running_mean|running_var|num_batches_tracked)"
    r"|linear\.(weight|bias)|alpha|alpha_omega)$"
)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the PyTorch layout needs to know of a PreActResNet.

    stage_sizes: blocks per stage ((2, 2, 2, 2) for PreAct-ResNet-18, (1, 1) for the small
    CNN); width: channels of the stem and the first stage (stage s has ``width * 2**(s-1)``);
    in_channels: image channels; num_classes: logits; shortcut_input: "raw" (RobustBench's
    ``out_shortcut=False``) or "preact" (``out_shortcut=True``). Stage 1 has stride 1 and every
    later stage stride 2, as in both models.
    """

    stage_sizes: tuple[int, ...]
    width: int
    in_channels: int
    num_classes: int
    shortcut_input: str = "raw"

    @property
    def name(self) -> str:
        """Our registry name of this architecture (``preact_resnet18`` or ``small_cnn``)."""
        return SUPPORTED[self.stage_sizes]

    def stage_width(self, stage: int) -> int:
        """Channels of stage ``stage`` (1-based)."""
        return self.width * 2 ** (stage - 1)


def robustbench_compatible(arch: Architecture) -> str | None:
    """None if RobustBench's ``PreActResNet(PreActBlock, [2, 2, 2, 2], bn_before_fc=True,
    out_shortcut=...)`` loads this architecture's state dict strictly, else the reason."""
    if arch.stage_sizes != (2, 2, 2, 2):
        return f"{arch.name} is not PreAct-ResNet-18: RobustBench's class has stages (2, 2, 2, 2)"
    if arch.width != 64:
        return f"width {arch.width}: RobustBench's class hard-codes width 64"
    if arch.in_channels != 3:
        return f"{arch.in_channels}-channel inputs: RobustBench's class takes 3 channels"
    return None


def architecture_of(model: Any, in_channels: int) -> Architecture:
    """The :class:`Architecture` of a Flax model, or a one-line ValueError if it has no
    PyTorch layout here.

    Expressible: a :class:`~apart_jax.models.PreActResNet` with the default stem width and
    channel multipliers, stride 1 then 2 (``preact_resnet18``, ``small_cnn``).
    """
    if not isinstance(model, PreActResNet):
        raise ValueError(
            f"{type(model).__name__} has no PyTorch layout here: only {_SUPPORTED_NAMES}"
        )
    sizes = tuple(model.stage_sizes)
    if sizes not in SUPPORTED:
        raise ValueError(
            f"a PreActResNet with stages {sizes} (wide_resnet34_10 has (5, 5, 5)) has no "
            f"PyTorch layout here: only {_SUPPORTED_NAMES}"
        )
    strides = tuple(model.stage_strides)
    default_multipliers = [2**s for s in range(len(sizes))]
    stem = model.width if model.stem_width is None else model.stem_width
    multipliers = (
        default_multipliers if model.width_multipliers is None else model.width_multipliers
    )
    if stem != model.width or list(multipliers) != default_multipliers:
        raise ValueError(
            f"a stem of {stem} channels and stage multipliers {list(multipliers)} have no "
            f"PyTorch layout here: only {_SUPPORTED_NAMES}"
        )
    if strides != (1,) + (2,) * (len(sizes) - 1):
        raise ValueError(f"stage strides {strides} have no PyTorch layout here: need 1, 2, 2, ...")
    return Architecture(sizes, model.width, in_channels, model.num_classes, model.shortcut_input)


def _blocks(arch: Architecture):
    """(our block name, PyTorch prefix, in channels, out channels) of every block, in order."""
    channels = arch.width
    for s, size in enumerate(arch.stage_sizes, start=1):
        for b in range(size):
            out = arch.stage_width(s)
            yield f"stage{s}_block{b + 1}", f"layer{s}.{b}.", channels, out, s > 1 and b == 0
            channels = out


def _conv_to_torch(kernel: np.ndarray) -> np.ndarray:
    """HWIO -> OIHW."""
    return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def _conv_from_torch(weight: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def _has_shortcut(channels_in: int, channels_out: int, downsamples: bool) -> bool:
    return downsamples or channels_in != channels_out


def to_state_dict(
    flat: Mapping[str, np.ndarray], arch: Architecture, *, step: int = 0, psi: bool = False
) -> StateDict:
    """Our flattened variables -> a PyTorch state dict of NumPy arrays, in PyTorch's key order.

    Args:
      flat: :func:`apart_jax.models.flatten_variables` of ``{"params", "batch_stats"}`` (and
        ``"perturb"`` if ``psi``); float arrays of the model ``arch`` describes.
      arch: the model's :class:`Architecture` (:func:`architecture_of`).
      step: the checkpoint's step, stored as every BN's ``num_batches_tracked`` (int64).
      psi: also write psi as the APART release does (``alpha``, ``alpha_omega``,
        ``layer{s}.{b}.alpha``, each shape (1,)); RobustBench's class refuses these keys.

    Returns:
      ``{key: array}``: conv weights OIHW, ``linear.weight`` (K, C), float32 everywhere but
      ``num_batches_tracked``; arrays are fresh copies. Exactly invertible by
      :func:`from_state_dict`.

    Raises:
      ValueError: a variable is missing or mis-shaped for ``arch`` (one line).
    """
    tracked = np.asarray(step, np.int64)
    out: StateDict = {}

    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in flat:
            raise ValueError(f"variables have no {key}, which {arch.name} needs")
        value = np.asarray(flat[key], np.float32)
        if value.shape != shape:
            raise ValueError(f"variable {key} has shape {value.shape}, expected {shape}")
        return value.copy()

    def put_bn(ours: str, theirs: str, channels: int) -> None:
        for field, name in _BN_FIELDS:
            out[f"{theirs}.{name}"] = get(f"params/{ours}/{field}", (channels,))
        for field, name in _STAT_FIELDS:
            out[f"{theirs}.{name}"] = get(f"batch_stats/{ours}/{field}", (channels,))
        out[f"{theirs}.num_batches_tracked"] = tracked.copy()

    if psi:
        out["alpha"] = get(f"{PSI}/alpha", ()).reshape(1)
        out["alpha_omega"] = get(f"{PSI}/alpha_omega", ()).reshape(1)
    w = arch.width
    out["conv1.weight"] = _conv_to_torch(get("params/stem/kernel", (3, 3, arch.in_channels, w)))
    for ours, theirs, c_in, c_out, down in _blocks(arch):
        if psi:
            out[f"{theirs}alpha"] = get(f"{PSI}/{ours}/alpha", ()).reshape(1)
        put_bn(f"{ours}/bn1", f"{theirs}bn1", c_in)
        kernel = get(f"params/{ours}/conv1/kernel", (3, 3, c_in, c_out))
        out[f"{theirs}conv1.weight"] = _conv_to_torch(kernel)
        put_bn(f"{ours}/bn2", f"{theirs}bn2", c_out)
        kernel = get(f"params/{ours}/conv2/kernel", (3, 3, c_out, c_out))
        out[f"{theirs}conv2.weight"] = _conv_to_torch(kernel)
        if _has_shortcut(c_in, c_out, down):
            kernel = get(f"params/{ours}/shortcut/kernel", (1, 1, c_in, c_out))
            out[f"{theirs}shortcut.0.weight"] = _conv_to_torch(kernel)
    last = arch.stage_width(len(arch.stage_sizes))
    put_bn("bn_final", "bn", last)
    out["linear.weight"] = np.ascontiguousarray(
        get("params/head/kernel", (last, arch.num_classes)).T
    )
    out["linear.bias"] = get("params/head/bias", (arch.num_classes,))
    return out


def _numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a NumPy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def normalize_keys(state_dict: Mapping[str, Any]) -> StateDict:
    """The state dict as NumPy arrays, with DataParallel's ``module.`` prefix removed and a
    checkpoint's ``{"state_dict": ...}`` wrapper opened."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    prefix = "module."
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return {str(k): _numpy(v) for k, v in state_dict.items()}


def infer_architecture(
    state_dict: Mapping[str, np.ndarray], shortcut_input: str = "raw"
) -> Architecture:
    """The :class:`Architecture` a state dict of this layout holds.

    Width, input channels and classes come from ``conv1.weight`` and ``linear.weight``, the
    stages from the ``layer{s}.{b}.`` keys. ``shortcut_input`` cannot be read from weights:
    "raw" is RobustBench's default (``out_shortcut=False``) and the APART release's.

    Raises:
      ValueError: a key of another layout (no final BN ``bn.*``, bottleneck blocks, ...), or a
        missing piece (one line).
    """
    keys = set(state_dict)
    if "bn.weight" not in keys:
        raise ValueError(
            "no final BN (bn.weight): only PreActResNet(..., bn_before_fc=True) state dicts "
            "can be imported, our models end in BN + ReLU"
        )
    for key in ("conv1.weight", "linear.weight"):
        if key not in keys:
            raise ValueError(f"state dict has no {key}: not a PreActResNet state dict")
    foreign = sorted(
        k
        for k in keys
        if not (
            _TOP_ENTRIES.match(k)
            or ((m := _BLOCK_KEY.match(k)) and _BLOCK_ENTRIES.match(k[m.end() :]))
        )
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(f"keys of another layout than PreActResNet with PreActBlock: {shown}")
    stages: dict[int, set[int]] = {}
    for key in keys:
        if m := _BLOCK_KEY.match(key):
            stages.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    numbers = sorted(stages)
    if numbers != list(range(1, len(numbers) + 1)) or any(
        sorted(b) != list(range(len(b))) for b in stages.values()
    ):
        raise ValueError(f"layers are not numbered layer1.0, layer1.1, ...: {numbers}")
    sizes = tuple(len(stages[s]) for s in numbers)
    if sizes not in SUPPORTED:
        raise ValueError(
            f"blocks per stage {sizes}: only PreAct-ResNet-18 (2, 2, 2, 2) and the small CNN "
            "(1, 1) can be imported"
        )
    conv1 = state_dict["conv1.weight"]
    linear = state_dict["linear.weight"]
    if conv1.ndim != 4 or linear.ndim != 2:
        raise ValueError(f"conv1.weight {conv1.shape} or linear.weight {linear.shape} mis-shaped")
    return Architecture(
        stage_sizes=sizes,
        width=int(conv1.shape[0]),
        in_channels=int(conv1.shape[1]),
        num_classes=int(linear.shape[0]),
        shortcut_input=shortcut_input,
    )


def from_state_dict(state_dict: Mapping[str, np.ndarray], arch: Architecture) -> StateDict:
    """A PyTorch state dict of this layout -> our flattened variables (NumPy arrays in the
    state dict's float dtypes: float32 for a float32 checkpoint, float64 for a float64 one).

    Returns ``{"params/...", "batch_stats/...", and "perturb/..." if the state dict holds the
    APART release's psi}``, keyed like :func:`apart_jax.models.flatten_variables`; psi scalars
    have shape (). ``num_batches_tracked`` is dropped. :func:`to_state_dict` inverts it exactly.

    Raises:
      ValueError: a key is missing, unexpected or mis-shaped for ``arch``; psi is partial (one
        line).
    """
    expected = to_state_dict_shapes(arch, psi="alpha" in state_dict)
    # PyTorch before 0.4.1 wrote no num_batches_tracked; it carries nothing we keep.
    missing = [k for k in expected if k not in state_dict and not k.endswith(_TRACKED)]
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match {arch.name} width {arch.width}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, shape in expected.items():
        if key in state_dict and tuple(state_dict[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(state_dict[key].shape)}, expected {shape}")
    flat: StateDict = {}

    def take(key: str) -> np.ndarray:
        return np.array(state_dict[key])

    def take_bn(ours: str, theirs: str) -> None:
        for field, name in _BN_FIELDS:
            flat[f"params/{ours}/{field}"] = take(f"{theirs}.{name}")
        for field, name in _STAT_FIELDS:
            flat[f"batch_stats/{ours}/{field}"] = take(f"{theirs}.{name}")

    flat["params/stem/kernel"] = _conv_from_torch(take("conv1.weight"))
    for ours, theirs, c_in, c_out, down in _blocks(arch):
        take_bn(f"{ours}/bn1", f"{theirs}bn1")
        flat[f"params/{ours}/conv1/kernel"] = _conv_from_torch(take(f"{theirs}conv1.weight"))
        take_bn(f"{ours}/bn2", f"{theirs}bn2")
        flat[f"params/{ours}/conv2/kernel"] = _conv_from_torch(take(f"{theirs}conv2.weight"))
        if _has_shortcut(c_in, c_out, down):
            weight = take(f"{theirs}shortcut.0.weight")
            flat[f"params/{ours}/shortcut/kernel"] = _conv_from_torch(weight)
        if "alpha" in state_dict:
            flat[f"{PSI}/{ours}/alpha"] = take(f"{theirs}alpha").reshape(())
    take_bn("bn_final", "bn")
    flat["params/head/kernel"] = np.ascontiguousarray(take("linear.weight").T)
    flat["params/head/bias"] = take("linear.bias")
    if "alpha" in state_dict:
        flat[f"{PSI}/alpha"] = take("alpha").reshape(())
        flat[f"{PSI}/alpha_omega"] = take("alpha_omega").reshape(())
    return flat


def to_state_dict_shapes(arch: Architecture, *, psi: bool = False) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of :func:`to_state_dict`'s output for ``arch``, in PyTorch's order."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    if psi:
        shapes["alpha"] = shapes["alpha_omega"] = (1,)
    shapes["conv1.weight"] = (arch.width, arch.in_channels, 3, 3)
    for _, theirs, c_in, c_out, down in _blocks(arch):
        if psi:
            shapes[f"{theirs}alpha"] = (1,)
        bn(f"{theirs}bn1", c_in)
        shapes[f"{theirs}conv1.weight"] = (c_out, c_in, 3, 3)
        bn(f"{theirs}bn2", c_out)
        shapes[f"{theirs}conv2.weight"] = (c_out, c_out, 3, 3)
        if _has_shortcut(c_in, c_out, down):
            shapes[f"{theirs}shortcut.0.weight"] = (c_out, c_in, 1, 1)
    last = arch.stage_width(len(arch.stage_sizes))
    bn("bn", last)
    shapes["linear.weight"] = (arch.num_classes, last)
    shapes["linear.bias"] = (arch.num_classes,)
    return shapes
