"""What every training method shares: the step signature, forward passes, the weight update.

A method is an object with

* ``name`` (registry key), ``label`` (for tables) and ``passes_per_step`` (forward +
  backward passes per step, the paper's cost measure);
* ``learns_psi`` / ``uses_omega``: whether the state carries psi optimizers and Omega;
  a method that learns psi also has ``psi_summary(psi) -> dict`` of the values to log;
* ``step(ctx, state, inputs) -> (state, metrics)``: one pure training step, with
  ``metrics = {"loss": mean training loss, "accuracy": mean accuracy on the training
  inputs the weights were fitted to}``.

All forward passes inside a training step run BN in training mode and, as PyTorch does,
update the BN running statistics, attack passes included. The methods' steps are described
in docs/algorithm.md#methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

from apart_jax.attacks import cross_entropy, gradient_ascent, random_init
from apart_jax.models.perturbation import SITES
from apart_jax.state import StepContext, StepInputs, TrainState

PyTree = Any
Metrics = dict[str, jax.Array]


class Method(Protocol):
    name: str
    label: str
    learns_psi: bool
    uses_omega: bool

    @property
    def passes_per_step(self) -> int: ...

    def step(
        self, ctx: StepContext, state: TrainState, inputs: StepInputs
    ) -> tuple[TrainState, Metrics]: ...


def forward_train(
    ctx: StepContext,
    params: PyTree,
    batch_stats: PyTree,
    x: jax.Array,
    sites: PyTree | None = None,
) -> tuple[jax.Array, PyTree]:
    """A training-mode forward pass: logits (B, K) and the updated BN running statistics.

    ``sites``, if given, is a ``perturbations`` tree added at the blocks' sites.
    """
    variables = {"params": params, "batch_stats": batch_stats}
    if sites is not None:
        variables[SITES] = sites
    logits, mutated = ctx.apply_fn(variables, x, train=True, mutable=["batch_stats"])
    return logits, mutated["batch_stats"]


def mean_cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Batch-mean cross-entropy, the training loss of every method."""
    return jnp.mean(cross_entropy(logits, y))


def step_metrics(loss: jax.Array, logits: jax.Array, y: jax.Array) -> Metrics:
    """The per-step metrics every method returns."""
    correct = (jnp.argmax(logits, -1) == y).astype(loss.dtype)
    return {"loss": loss, "accuracy": jnp.mean(correct)}


def apply_weight_gradients(ctx: StepContext, state: TrainState, grads: PyTree) -> TrainState:
    """One step of the weights' optimizer on ``grads`` (shaped like ``state.params``)."""
    updates, opt_state = ctx.weight_tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def descend(
    ctx: StepContext, state: TrainState, x_adv: jax.Array, y: jax.Array
) -> tuple[TrainState, Metrics]:
    """The training pass: fit the weights to ``x_adv`` and advance the step counter."""

    def loss_fn(params):
        logits, batch_stats = forward_train(ctx, params, state.batch_stats, x_adv)
        return mean_cross_entropy(logits, y), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = apply_weight_gradients(ctx, state.replace(batch_stats=batch_stats), grads)
    return state.replace(step=state.step + 1), step_metrics(loss, logits, y)


def input_gradient(
    ctx: StepContext, params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array
) -> tuple[jax.Array, PyTree]:
    """Gradient of the batch-mean cross-entropy with respect to the inputs ``x`` (B, H, W, C),
    BN in training mode, and the BN running statistics that pass leaves.

    Differentiable with respect to ``params`` (GradAlign differentiates through it).
    """

    def loss_fn(x):
        logits, new_stats = forward_train(ctx, params, batch_stats, x)
        return mean_cross_entropy(logits, y), new_stats

    return jax.grad(loss_fn, has_aux=True)(x)


@dataclasses.dataclass(frozen=True)
class AttackThenDescend:
    """Adversarial training with a fixed L-inf generator: attack, then one weight update.

    The generator starts at x (``random_start=False``) or at a uniform point of the cube of
    half-side ``start_scale * eps`` around x (clipped to [0, 1]), and takes ``steps``
    signed-gradient steps of ``step_size``, each projected onto the eps-ball
    (``projected=True``) or only onto [0, 1] (``projected=False``, N-FGSM). Its input
    gradients are of the batch-mean loss with BN in training mode (weight gradients are
    never formed); each attack pass updates the BN running statistics.
    """

    name: str
    label: str
    random_start: bool
    step_size: float
    steps: int
    start_scale: float = 1.0
    projected: bool = True
    learns_psi = False
    uses_omega = False

    @property
    def passes_per_step(self) -> int:
        return self.steps + 1

    def start(self, ctx: StepContext, inputs: StepInputs) -> jax.Array:
        """The attack's starting point (B, H, W, C) in [0, 1]."""
        if not self.random_start:
            return inputs.x
        return random_init(inputs.key, inputs.x, self.start_scale * ctx.eps, "linf")

    def attack(
        self, ctx: StepContext, state: TrainState, inputs: StepInputs
    ) -> tuple[jax.Array, PyTree]:
        """The adversarial inputs (B, H, W, C) in [0, 1] and the BN statistics after them."""
        y = inputs.y

        def grad_fn(x_adv, batch_stats):
            return input_gradient(ctx, state.params, batch_stats, x_adv, y)

        x_adv, batch_stats = gradient_ascent(
            grad_fn,
            inputs.x,
            self.start(ctx, inputs),
            state.batch_stats,
            eps=ctx.eps if self.projected else jnp.inf,
            step_size=self.step_size,
            steps=self.steps,
            unroll=ctx.unroll,
        )
        return jax.lax.stop_gradient(x_adv), batch_stats

    def step(
        self, ctx: StepContext, state: TrainState, inputs: StepInputs
    ) -> tuple[TrainState, Metrics]:
        x_adv, batch_stats = self.attack(ctx, state, inputs)
        return descend(ctx, state.replace(batch_stats=batch_stats), x_adv, inputs.y)
