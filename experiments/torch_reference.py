"""The PyTorch eager reference of the speed benchmark: the same model, batch and dtype on CPU.

Used by ``python -m experiments.bench_speed --reference=torch``. The model is the PyTorch twin
of our PreAct-ResNets (:mod:`apart_jax.interop.torch_model`), in training mode, with SGD
(momentum 0.9, weight decay 2e-4, our defaults); torch comes from the ``torch``
extra and is imported only here.
"""

from __future__ import annotations

from collections.abc import Callable

from apart_jax.interop.torch_layout import Architecture


def torch_steps(
    arch: Architecture, batch_size: int
) -> tuple[str, int, Callable[[], None], Callable[[], None]]:
    """PyTorch eager steps for ``arch`` on random float32 images (B, C, 32, 32) in [0, 1].

    Returns ("torch X.Y.Z", intra-op threads, train_step, input_gradient): ``train_step()``
    runs forward, backward and the SGD update; ``input_gradient()`` forward and backward to
    the input only (BN in training mode). Both return when done (eager, on the CPU).
    """
    import torch
    from torch.nn import functional as F  # noqa: N812 (PyTorch's own convention)

    from apart_jax.interop.torch_model import torch_preact_resnet

    torch.manual_seed(0)
    model = torch_preact_resnet(arch).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    images = torch.rand(batch_size, arch.in_channels, 32, 32)
    labels = torch.randint(0, arch.num_classes, (batch_size,))

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    def input_gradient() -> None:
        x = images.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x), labels), x)

    return f"torch {torch.__version__}", torch.get_num_threads(), train_step, input_gradient
