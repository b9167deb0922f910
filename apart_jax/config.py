"""The configuration of a training run: every key, its default, and validation.

The defaults are the paper's CIFAR-10 setting; docs/algorithm.md explains each of them.

Experiment configs (``experiments/configs/*.py``) start from :func:`default_config` and
change what they need; any key can be overridden on the command line with
``--config.KEY=VALUE``.
"""

from __future__ import annotations

import json
import os

import ml_collections
from ml_collections.config_dict import placeholder

from apart_jax.collapse import ON_COLLAPSE
from apart_jax.data import DATASETS
from apart_jax.methods import METHOD_NAMES, OMEGA_DTYPES
from apart_jax.models import COMPUTE_DTYPES, MODELS

# Steps of the release's 30-epoch CIFAR-10 run (30 x 391): psi's defaults are tuned for it.
REFERENCE_PSI_STEPS = 11_730


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key, in one line."""


def default_config() -> ml_collections.ConfigDict:
    """The defaults: the paper's CIFAR-10 setting (PreAct-ResNet-18, APART, 30 epochs, batch 128).

    ``dataset`` defaults to the embedded digits, so that a bare command runs offline.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Data: a dataset name (see apart_jax.data.DATASETS), sizes (0 = whole split) and
    # augmentation (None = the dataset's default).
    c.dataset = "digits"
    c.npz_path = ""
    c.data_dir = ""  # TFDS data directory (local path or gs:// bucket); "" = TFDS's default
    c.num_classes = placeholder(
        int
    )  # npz only: labels must lie in [0, num_classes); None = max + 1
    c.train_size = 0
    c.test_size = 0
    c.pad = placeholder(int)
    c.flip = placeholder(bool)
    c.pad_value = placeholder(float)

    # Model.
    c.model = "preact_resnet18"
    c.width = 64
    c.shortcut_input = "raw"
    # Computation dtype: "float32", "bfloat16" (weights, BN statistics and psi stay float32)
    # or "float64" (everything float64; the run enables jax_enable_x64 for its process).
    c.dtype = "float32"

    # Method and threat model.
    c.method = "apart"
    c.eps = 8 / 255
    c.fgsm_rs_step_scale = 1.25
    c.pgd_steps = 10
    c.pgd_step_size = 2 / 255
    c.nfgsm_noise_scale = 2.0  # N-FGSM: noise uniform in [-k eps, k eps]
    c.nfgsm_step_scale = 1.0  # N-FGSM: step alpha = this x eps
    c.grad_align_base = "fgsm"  # GradAlign's attack: "fgsm" (the release's) or "fgsm_rs"
    # GradAlign's lambda; None = the release's schedule 0.02 * 10 ** (255 eps / 8).
    c.grad_align_lambda = placeholder(float)

    # Weights' optimizer: SGD, triangular rate 0 -> lr_max -> 0 per cycle, cycled momentum.
    c.epochs = 30
    c.batch_size = 128
    c.drop_remainder = False
    c.lr_max = 0.2
    c.momentum_max = 0.9
    c.momentum_min = 0.8
    c.weight_decay = 2e-4
    c.schedule_epochs = 0  # epochs per triangle; 0 = one triangle over the whole run

    # APART / FGSM+ generator: psi's initial values, its optimizer, Omega.
    c.alpha_init = 1e-4
    c.alpha_omega_init = 1e-4
    c.layer_alpha_init = 0.0
    c.omega_init_std = 1e-3
    # Omega's storage: "float32", "bfloat16" (half the memory) or "float64" (float64 runs
    # only); None = float64 in float64 runs, float32 otherwise (see omega_storage).
    c.omega_dtype = placeholder(str)
    c.psi_lr_max = 5e-8
    c.psi_weight_decay = 400.0
    c.psi_lr_scale = 1.0
    c.psi_lr_autoscale = False  # multiply psi's rate by 11,730 / total steps
    c.psi_in_weight_optimizer = True

    # Evaluation: clean and PGD-20 accuracy (BN in inference mode) every eval_every epochs.
    c.eval_every = 2
    c.eval_batch_size = 500
    c.eval_eps = 8 / 255
    c.eval_pgd_steps = 20
    c.eval_pgd_step_size = 2 / 255

    # Catastrophic overfitting (apart_jax.collapse): an evaluated epoch whose PGD-20 accuracy
    # is below collapse_ratio x the best of the evaluated epochs before it, that best being
    # at least collapse_min_best (chance level on 10 classes; 1 / num_classes elsewhere,
    # 0 = no floor). on_collapse:
    # "continue" (log it only), "stop" (end the run there, its checkpoint the final one) or
    # "revert" (end the run with the best epoch's checkpoint as the final one: early
    # stopping; needs checkpoint=True). A run resumes only with the same values.
    c.collapse_ratio = 0.5
    c.collapse_min_best = 0.1
    c.on_collapse = "continue"

    # Execution.
    c.unroll = placeholder(bool)  # attack loops unrolled; None = backend default
    c.log_every = 50
    # A step with a non-finite loss, weights, psi or BN statistics stops the run with an
    # error naming it (checked every log_every steps and before every checkpoint); True
    # discards such steps instead and logs their count as skipped_steps.
    c.skip_nonfinite = False
    c.progress = True
    c.tensorboard = True  # also write WORKDIR/events.out.tfevents.* (no TensorFlow needed)

    # Checkpoints: WORKDIR/checkpoints/STEP every checkpoint_every steps (0 = at the end of
    # every epoch) and at the end, the newest checkpoint_keep kept. A rerun with the same
    # workdir resumes from the newest one.
    c.checkpoint = True
    c.checkpoint_every = 0
    c.checkpoint_keep = 3
    # Several processes: one that has not responded for peer_timeout seconds (killed, its
    # host lost) ends the others with one line (apart_jax.runguard.PeerWatch).
    c.peer_timeout = 60.0
    return c


# Keys that may change between a run and its resumption: they do not change the numbers.
# collapse_ratio, collapse_min_best and on_collapse are not among them: they decide where a
# run ends and which state is its final one, so a run stopped or reverted at a collapse stays
# finished, and a resumed run follows the policy its checkpoints and metrics were written
# under.
EXECUTION_KEYS = frozenset(
    {
        "npz_path",
        "data_dir",
        "unroll",
        "log_every",
        "skip_nonfinite",
        "progress",
        "tensorboard",
        "checkpoint",
        "checkpoint_every",
        "checkpoint_keep",
        "eval_batch_size",
        "peer_timeout",
    }
)


def omega_storage(dtype: str, omega_dtype: str | None) -> str:
    """The name of Omega's storage dtype for a run computing in ``dtype``: ``omega_dtype``,
    or when it is None, "float64" for float64 runs and "float32" otherwise."""
    if omega_dtype is not None:
        return omega_dtype
    return "float64" if dtype == "float64" else "float32"


def config_as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON values (what ``config.json`` and checkpoints hold)."""
    return json.loads(config.to_json_best_effort())


CONFIG_FILE = "config.json"  # what a training run writes into its workdir


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of the training run in ``workdir`` (its ``config.json``).

    Keys added to :func:`default_config` after the run was written take their defaults.

    Raises:
      ConfigError: if ``workdir`` holds no config.json.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: expected a directory written by experiments.train")
    with open(path) as f:
        saved = json.load(f)
    config = default_config()
    config.update(saved)
    return config


def resume_conflicts(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """The keys, other than :data:`EXECUTION_KEYS`, whose values differ from a saved config.

    Returns ``["method: 'fgsm' (saved) != 'apart'", ...]``, empty when the run may resume.
    A key missing from ``saved`` (a checkpoint older than the key) counts as its default.
    """
    current, defaults = config_as_json(config), config_as_json(default_config())
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    # Compare what a value means: an explicit "float32" and a None that resolves to it agree.
    for values in (saved, current):
        values["omega_dtype"] = omega_storage(values["dtype"], values["omega_dtype"])
    return [
        f"{key}: {saved.get(key)!r} (saved) != {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key not in EXECUTION_KEYS and saved.get(key) != current.get(key)
    ]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Checks every value a run depends on before anything is built or written.

    Raises:
      ConfigError: naming the first invalid key and the accepted values.
    """
    _require(c.dataset in DATASETS, f"dataset={c.dataset!r}: choose one of {sorted(DATASETS)}")
    _require(c.model in MODELS, f"model={c.model!r}: choose one of {sorted(MODELS)}")
    _require(c.method in METHOD_NAMES, f"method={c.method!r}: choose one of {list(METHOD_NAMES)}")
    _require(
        c.shortcut_input in ("raw", "preact"),
        f"shortcut_input={c.shortcut_input!r}: choose 'raw' or 'preact'",
    )
    for key in ("eps", "eval_eps"):
        _require(0.0 < c[key] <= 1.0, f"{key}={c[key]} must be in (0, 1]")
    _require(
        c.grad_align_base in ("fgsm", "fgsm_rs"),
        f"grad_align_base={c.grad_align_base!r}: choose 'fgsm' or 'fgsm_rs'",
    )
    _require(
        c.grad_align_lambda is None or c.grad_align_lambda >= 0,
        f"grad_align_lambda={c.grad_align_lambda} must be >= 0 (None = the release's schedule)",
    )
    _require(c.nfgsm_noise_scale >= 0, f"nfgsm_noise_scale={c.nfgsm_noise_scale} must be >= 0")
    positive = (
        "pgd_step_size",
        "eval_pgd_step_size",
        "fgsm_rs_step_scale",
        "nfgsm_step_scale",
        "lr_max",
    )
    for key in (*positive, "peer_timeout"):
        _require(c[key] > 0, f"{key}={c[key]} must be positive")
    for key in (
        "width",
        "epochs",
        "batch_size",
        "pgd_steps",
        "eval_pgd_steps",
        "eval_every",
        "eval_batch_size",
        "log_every",
    ):
        _require(isinstance(c[key], int) and c[key] >= 1, f"{key}={c[key]} must be a positive int")
    for key in ("train_size", "test_size", "schedule_epochs"):
        _require(c[key] >= 0, f"{key}={c[key]} must be >= 0 (0 = all)")
    for key in ("psi_lr_max", "psi_lr_scale", "psi_weight_decay", "weight_decay", "omega_init_std"):
        _require(c[key] >= 0, f"{key}={c[key]} must be >= 0")
    _require(
        0 <= c.momentum_min <= c.momentum_max < 1, "momentum_min <= momentum_max must lie in [0, 1)"
    )
    _require(
        c.dtype in COMPUTE_DTYPES, f"dtype={c.dtype!r}: choose one of {sorted(COMPUTE_DTYPES)}"
    )
    _require(
        c.omega_dtype is None or c.omega_dtype in OMEGA_DTYPES,
        f"omega_dtype={c.omega_dtype!r}: choose one of {sorted(OMEGA_DTYPES)} or None",
    )
    _require(
        c.omega_dtype != "float64" or c.dtype == "float64",
        "omega_dtype='float64' needs dtype='float64'",
    )
    _require(
        isinstance(c.checkpoint_every, int) and c.checkpoint_every >= 0,
        f"checkpoint_every={c.checkpoint_every} must be >= 0 (0 = every epoch)",
    )
    _require(
        isinstance(c.checkpoint_keep, int) and c.checkpoint_keep >= 1,
        f"checkpoint_keep={c.checkpoint_keep} must be a positive int",
    )
    known = DATASETS[c.dataset].num_classes
    _require(
        c.num_classes is None or (c.num_classes >= 2 and known in (None, c.num_classes)),
        f"num_classes={c.num_classes}: "
        + (f"{c.dataset} has {known} classes" if known else "must be at least 2"),
    )
    _require(0.0 < c.collapse_ratio < 1.0, f"collapse_ratio={c.collapse_ratio} must be in (0, 1)")
    _require(
        0.0 <= c.collapse_min_best < 1.0,
        f"collapse_min_best={c.collapse_min_best} must be in [0, 1)",
    )
    _require(
        c.on_collapse in ON_COLLAPSE,
        f"on_collapse={c.on_collapse!r}: choose one of {list(ON_COLLAPSE)}",
    )
    _require(
        c.on_collapse != "revert" or c.checkpoint,
        "on_collapse='revert' needs checkpoint=True (the best epoch's checkpoint is restored)",
    )
    _require(c.pad is None or c.pad >= 0, f"pad={c.pad} must be >= 0")
    _require(
        c.pad_value is None or 0.0 <= c.pad_value <= 1.0,
        f"pad_value={c.pad_value} must be in [0, 1]",
    )
