"""Per-example attack losses: larger means more adversarial.

Every loss maps logits (B, K) and integer labels (B,) to a per-example value (B,); targeted
losses also take target labels (B,). Attacks maximize the sum, so examples stay independent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy: logits (B, K), integer labels (B,) -> (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _true_logit(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def _largest_other(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The largest logit among the classes other than ``labels`` (B,)."""
    masked = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return jnp.max(masked, axis=-1)


def margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The C&W margin, largest other logit minus the true one (B,): positive = misclassified."""
    return _largest_other(logits, labels) - _true_logit(logits, labels)


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The Difference of Logits Ratio (Croce & Hein 2020), untargeted (B,).

    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, with z sorted decreasingly as
    z_pi1 >= z_pi2 >= ...; shift- and scale-invariant in the logits. Needs K >= 3.
    """
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    denominator = ordered[:, 0] - ordered[:, 2] + 1e-12
    return margin_loss(logits, labels) / denominator


def targeted_dlr_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
    """Targeted DLR (Croce & Hein 2020): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (B,).

    Maximizing it pushes the target logit z_t above the true one. Needs K >= 4.
    """
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    denominator = ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12
    return (_true_logit(logits, targets) - _true_logit(logits, labels)) / denominator


#: The losses an attack can maximize, by name (see :func:`attack_loss`).
LOSSES = ("ce", "margin", "dlr")


def attack_loss(
    name: str, logits: jax.Array, labels: jax.Array, targets: jax.Array | None = None
) -> jax.Array:
    """The per-example loss ``name`` (one of :data:`LOSSES`) that an attack maximizes (B,).

    Untargeted (``targets`` None): "ce" cross-entropy, "margin" the C&W margin, "dlr" the DLR
    loss (needs K >= 3). Targeted (``targets`` (B,) int): "ce" minus the cross-entropy of the
    target, "margin" minus the target's margin (target logit minus the largest other), "dlr"
    the targeted DLR (needs K >= 4). Names and K are checked by ``check_attack_inputs``.
    """
    if targets is None:
        return {"ce": cross_entropy, "margin": margin_loss, "dlr": dlr_loss}[name](logits, labels)
    if name == "ce":
        return -cross_entropy(logits, targets)
    if name == "margin":
        return -margin_loss(logits, targets)
    return targeted_dlr_loss(logits, labels, targets)
