"""Standard (non-adversarial) training: one training pass on the clean inputs.

The reference point of the speed benchmark (``t_train``) and the lower bound of every
adversarial method's cost. See docs/algorithm.md#clean.
"""

from __future__ import annotations

import dataclasses

from apart_jax.methods.base import Metrics, descend
from apart_jax.state import StepContext, StepInputs, TrainState


@dataclasses.dataclass(frozen=True)
class Clean:
    """Fits the weights to the augmented clean batch; no attack, no psi, no Omega."""

    name: str = "clean"
    label: str = "Clean"
    learns_psi = False
    uses_omega = False

    @property
    def passes_per_step(self) -> int:
        return 1

    def step(
        self, ctx: StepContext, state: TrainState, inputs: StepInputs
    ) -> tuple[TrainState, Metrics]:
        return descend(ctx, state, inputs.x, inputs.y)
