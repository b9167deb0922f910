"""The APART authors' released training step, timed on the CPU in float32.

Used by ``python -m experiments.bench_speed --release=PATH/TO/APART``. The release's own
``train()`` runs unmodified (:mod:`experiments.record_release` states the shims that let it
run here) on the release's ``PreActResNet`` at ``width`` channels, on random images; a
wrapped ``atta_aug``, which ``train()`` calls once at the start of every step, stamps the
time, so each step is timed whole as a user of the release runs it: augmentation, the
attack's forward and full backward, the training forward and backward, Omega's update,
both optimizers and the schedules. torch comes from the ``torch`` extra and is imported
only here.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np

from experiments.record_release import (
    Recorded,
    import_release,
    narrow_model,
    padded_frames,
    permute_first,
    release_commit,
    run_release_epoch,
    synthetic_images,
)


def release_step_times(
    path: str, width: int, batch_size: int, warmup: int, steps: int
) -> dict[str, object]:
    """Seconds of ``steps`` APART steps of the release (``--layerwise``) after ``warmup``.

    Returns {"framework", "threads", "commit", "width", "batch_size", "step_s" (median),
    "step_s_min", "step_s_max", "times"} with every time in seconds.
    """
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = (warmup + steps + 1) * batch_size
    with tempfile.TemporaryDirectory() as save_dir:
        release = import_release(path, save_dir, layerwise=True, batch_size=batch_size)
    model = narrow_model(release, width)
    images, labels = synthetic_images(rng, n)
    frames = torch.from_numpy(padded_frames(images).astype(np.float32))
    omega_sets = 1e-3 * torch.randn(frames.shape)
    permute_first(release, rng, n)

    stamps: list[float] = []
    original_aug = release.atta_aug

    def timed_aug(omega, rst):
        stamps.append(time.perf_counter())
        if len(stamps) > warmup + steps:
            raise Recorded
        return original_aug(omega, rst)

    release.atta_aug = timed_aug
    run_release_epoch(release, model, frames, omega_sets, torch.from_numpy(labels), n)
    times = [float(t) for t in np.diff(stamps)[warmup:]]
    return {
        "framework": f"torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "commit": release_commit(path),
        "width": width,
        "batch_size": batch_size,
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "times": times,
    }
