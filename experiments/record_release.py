"""Records K training steps of the APART authors' released code, for tests/test_replay.py.

    python -m experiments.record_release --release=PATH/TO/APART \\
        [--out=tests/data/apart_release_steps.npz --steps=3 --width=8 --batch_size=32]

PATH/TO/APART is a checkout of github.com/LiyuanLucasLiu/APART (the README gives the
commit the committed recording was made from). The recorder imports its unmodified
``train.py`` and runs its own ``train()`` on the CPU in float64 (``torch`` from the
optional extra: ``pip install torch==2.13.0 && pip install -e '.[torch]'``). Not run by CI.

The smallest shims that let the release run here, each stated where it is made:

* ``apex``, ``torchvision`` and ``torch.utils.tensorboard`` are stand-in modules: the
  release imports them at the top but ``train()`` uses none of them without ``--half``.
* ``train()`` hard-codes CIFAR-10's 50,000 training examples in its
  ``np.random.permutation(50000)``; the stand-in ``np`` it sees permutes this recording's
  N examples instead.
* ``optimizer.zero_grad()`` zeroes gradients as in PyTorch 1.3.1, the release's version
  (PyTorch 2 drops them instead, which would skip psi's step in the weights' optimizer).
* The model is the release's ``PreActResNet`` with its own ``PreActBlock`` at ``--width``
  channels instead of the hard-wired 64, so that the recording stays small.
* ``main()`` is not called (it downloads CIFAR-10 and needs CUDA); the optimizers and
  schedules are built as ``main()`` builds them, except that the cycle is ``--cycle_steps``
  updates (``main()``: 391 x epochs) so that a few steps already move the weights.
* The data are N synthetic uint8 images (padded by 4 with 0.5, as the release's loader
  pads), the initial Omega is 1e-3 N(0, 1) rounded to float16 and the initial weights are
  rounded to float32, so that they store exactly in a few bytes.

The npz holds: the images and labels; the release's initial and final ``state_dict``
(``init/NAME``, ``final/NAME``, in the release's layout); per step the batch indices, the
crop offsets (row, column) and flips drawn by ``atta_aug``; Omega's rows of the used
examples before and after, NHWC; and ``meta`` (JSON: commit, versions, settings).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import types

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
PAD, PAD_VALUE, SIZE = 4, 0.5, 32
NUM_CLASSES = 10


def define_flags() -> None:
    """Defines this program's flags (once, before ``app.run``), so that other modules can
    import the shims below (experiments.release_reference) beside their own flags."""
    flags.DEFINE_string("release", None, "Checkout of the APART release (LiyuanLucasLiu/APART).")
    flags.DEFINE_string(
        "out", "tests/data/apart_release_steps.npz", "Where to write the recording."
    )
    flags.DEFINE_integer("steps", 3, "Training steps K to record.")
    flags.DEFINE_integer("width", 8, "Channels of the first stage (the release: 64).")
    flags.DEFINE_integer("batch_size", 32, "Batch size (the release: 128).")
    flags.DEFINE_integer("num_train", 128, "Training examples N (at least steps x batch_size).")
    flags.DEFINE_integer("cycle_steps", 8, "Updates per triangular learning-rate cycle.")
    flags.DEFINE_bool("layerwise", True, "APART (--layerwise); False records FGSM+.")
    flags.DEFINE_integer("seed", 0, "Seed of the data, the initial state and the release's draws.")


class Recorded(Exception):
    """Raised by the recording ``atta_aug`` when K steps are complete."""


def stub_modules() -> None:
    """Stand-ins for the modules the release imports but ``train()`` does not use."""
    apex = types.ModuleType("apex")
    apex.amp = types.SimpleNamespace()
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = torchvision.transforms = types.SimpleNamespace()
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = object
    sys.modules.update(
        {"apex": apex, "torchvision": torchvision, "torch.utils.tensorboard": tensorboard}
    )


def import_release(path: str, save_dir: str, layerwise: bool, batch_size: int):
    """Imports the release's ``train.py`` (which parses its command line at import)."""
    stub_modules()
    sys.path.insert(0, path)
    argv = ["train.py", "--no_cuda", "--save_dir", save_dir, "--batch_size", str(batch_size)]
    own_argv, sys.argv = sys.argv, argv + (["--layerwise"] if layerwise else [])
    try:
        import train as release  # noqa: PLC0415 (the release's module, found on sys.path)
    finally:
        sys.argv = own_argv
    return release


def narrow_model(release, width: int):
    """The release's ``PreActResNet`` of its own ``PreActBlock`` at ``width`` channels."""
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    architecture = sys.modules["models.preresnet"]  # imported by the release's train.py
    net = architecture.PreActResNet.__new__(architecture.PreActResNet)
    nn.Module.__init__(net)
    net.in_planes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    for i, stride in enumerate((1, 2, 2, 2)):
        layer = net._make_layer(release.PreActBlock, width * 2**i, 2, stride)
        setattr(net, f"layer{i + 1}", layer)
    net.bn = nn.BatchNorm2d(width * 8)
    net.linear = nn.Linear(width * 8, NUM_CLASSES)
    net.alpha = nn.Parameter(torch.FloatTensor([0.0001]))
    net.alpha_omega = nn.Parameter(torch.FloatTensor([0.0001]))
    net.info = {}
    return net


def synthetic_images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """N smooth random uint8 images (N, 32, 32, 3) with labels in [0, 10)."""
    coarse = rng.uniform(0, 255, (n, 8, 8, 3))
    images = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    images = np.clip(images + rng.normal(0, 20, images.shape), 0, 255)
    return images.round().astype(np.uint8), rng.integers(0, NUM_CLASSES, n).astype(np.int64)


def padded_frames(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, 32, 32, 3) -> float64 frames (N, 3, 40, 40) in [0, 1], padded by 4
    with 0.5 as the release's loader pads them."""
    return np.pad(
        images.transpose(0, 3, 1, 2) / 255.0,
        ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)),
        constant_values=PAD_VALUE,
    )


def permute_first(release, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Shim: ``train()`` permutes 50,000 examples; let it permute these N. Returns the list
    every permutation it draws is appended to."""
    orders: list[np.ndarray] = []

    def permutation(_hard_coded_size):
        orders.append(rng.permutation(n))
        return orders[-1]

    release.np = types.SimpleNamespace(random=types.SimpleNamespace(permutation=permutation))
    return orders


def release_optimizers(model, cycle_steps: int) -> tuple:
    """The optimizers and schedules as the release's ``main()`` builds them, with a cycle of
    ``cycle_steps`` updates and PyTorch 1.3.1's ``zero_grad``: (optimizer, optimizer_alpha,
    scheduler, scheduler_alpha)."""
    from torch import optim  # noqa: PLC0415

    psi = [p for p in model.parameters() if len(p.data) == 1]
    optimizer = optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=2e-4)
    optimizer_alpha = optim.SGD(psi, lr=5e-8, momentum=0.9, weight_decay=400)
    for opt in (optimizer, optimizer_alpha):  # Shim: PyTorch 1.3.1's zero_grad
        opt.zero_grad = lambda opt=opt: type(opt).zero_grad(opt, set_to_none=False)
    half = cycle_steps / 2
    cyclic = dict(base_lr=0, step_size_up=half, step_size_down=half)
    scheduler = optim.lr_scheduler.CyclicLR(optimizer, max_lr=0.2, **cyclic)
    scheduler_alpha = optim.lr_scheduler.CyclicLR(optimizer_alpha, max_lr=5e-8, **cyclic)
    return optimizer, optimizer_alpha, scheduler, scheduler_alpha


def run_release_epoch(release, model, frames, omega_sets, labels, cycle_steps: int) -> None:
    """The release's ``train()`` for one epoch on CPU tensors, its prints sent to stderr,
    until a wrapped ``atta_aug`` raises :class:`Recorded`."""
    import torch  # noqa: PLC0415

    optimizer, optimizer_alpha, scheduler, scheduler_alpha = release_optimizers(model, cycle_steps)
    release.writer = None
    with contextlib.suppress(Recorded), contextlib.redirect_stdout(sys.stderr):
        release.train(
            release.args,
            model,
            torch.device("cpu"),
            frames,
            omega_sets,
            labels,
            optimizer,
            optimizer_alpha,
            1,
            scheduler,
            scheduler_alpha,
        )


def release_commit(path: str) -> str:
    """The checkout's commit, or "unknown" when it is not a git work tree."""
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True)
        return out.stdout.decode().strip() or "unknown"
    except OSError:
        return "unknown"


def state_arrays(model, prefix: str) -> dict[str, np.ndarray]:
    """The model's ``state_dict`` as NumPy arrays keyed ``prefix/NAME``."""
    return {f"{prefix}/{k}": v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def record(release_path: str) -> dict[str, np.ndarray]:
    """Runs the release's ``train()`` for ``--steps`` steps; returns the recording's arrays."""
    import torch  # noqa: PLC0415

    steps, batch, n = FLAGS.steps, FLAGS.batch_size, FLAGS.num_train
    if n < steps * batch:
        raise app.UsageError(f"--num_train={n} is below --steps x --batch_size = {steps * batch}")
    torch.set_default_dtype(torch.float64)
    rng = np.random.default_rng(FLAGS.seed)
    random.seed(FLAGS.seed)
    torch.manual_seed(FLAGS.seed)
    with tempfile.TemporaryDirectory() as save_dir:
        release = import_release(release_path, save_dir, FLAGS.layerwise, batch)
    model = narrow_model(release, FLAGS.width)
    with torch.no_grad():  # initial weights exactly representable in float32
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.float().double())

    images, labels = synthetic_images(rng, n)
    frames = padded_frames(images)
    omega_init = (1e-3 * rng.standard_normal(frames.shape)).astype(np.float16)
    omega_sets = torch.from_numpy(omega_init.astype(np.float64))
    orders = permute_first(release, rng, n)

    # Record every batch's augmentation; stop before the step after the K-th.
    draws: list[dict] = []
    original_aug = release.atta_aug

    def recording_aug(omega, rst):
        if len(draws) == steps:
            raise Recorded
        omega, info = original_aug(omega, rst)
        draws.append(info)
        return omega, info

    release.atta_aug = recording_aug
    initial = state_arrays(model, "init")
    run_release_epoch(
        release,
        model,
        torch.from_numpy(frames),
        omega_sets,
        torch.from_numpy(labels),
        FLAGS.cycle_steps,
    )
    if len(draws) != steps:
        raise RuntimeError(f"the release ran {len(draws)} steps, expected {steps}")

    indices = np.stack([orders[0][k * batch : (k + 1) * batch] for k in range(steps)])
    offsets = np.stack(
        [np.stack([d["crop"]["x"].numpy(), d["crop"]["y"].numpy()], -1) for d in draws]
    )
    used = np.sort(indices.ravel())
    meta = {
        "release_commit": release_commit(release_path),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "steps": steps,
        "width": FLAGS.width,
        "batch_size": batch,
        "num_train": n,
        "cycle_steps": FLAGS.cycle_steps,
        "layerwise": FLAGS.layerwise,
        "epsilon": release.args.epsilon,
        "lr_max": 0.2,
        "psi_lr_max": 5e-8,
        "weight_decay": 2e-4,
        "psi_weight_decay": 400.0,
        "pad": PAD,
        "pad_value": PAD_VALUE,
        "seed": FLAGS.seed,
    }
    return {
        **initial,
        **state_arrays(model, "final"),
        "images": images,
        "labels": labels,
        "indices": indices.astype(np.int32),
        "offsets": offsets.astype(np.int32),
        "flips": np.array([d["flipped"] for d in draws], bool),
        "omega_rows": used.astype(np.int32),
        "omega_init": nchw_to_nhwc(omega_init[used]),
        "omega_final": nchw_to_nhwc(omega_sets.numpy()[used]),
        "meta": np.array(json.dumps(meta)),
    }


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.release or not os.path.isfile(os.path.join(FLAGS.release, "train.py")):
        raise app.UsageError("--release must name a checkout of LiyuanLucasLiu/APART")
    arrays = record(os.path.abspath(FLAGS.release))
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    np.savez_compressed(FLAGS.out, **arrays)
    print(
        f"{FLAGS.out}: {os.path.getsize(FLAGS.out) / 1e6:.2f} MB, {json.loads(str(arrays['meta']))}"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
