"""What every attack shares (projection, random start, the iteration loop, ranked targets),
and FGSM and PGD.

An attack is ``attack(logits_fn, x, y, key, *, eps, ...)``: ``logits_fn(x) -> logits``
(inputs (B, ...) in [0, 1], logits (B, K)), clean inputs ``x``, integer labels ``y`` (B,) and
a PRNG key (taken by every attack, also those that draw no noise); it returns adversarial
inputs of the shape and dtype of ``x``, inside the eps-ball around ``x`` and inside [0, 1].
Attacks never touch model state: whether BN runs in training or inference mode is the
caller's choice of closure. They work under ``jax.jit`` and ``jax.vmap``.

The steepest-ascent loop is :func:`gradient_ascent`, which threads an arbitrary carry (the
training methods use it to carry BN statistics through their attack passes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import chex
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp

from apart_jax.attacks.checks import UNSET, check_attack_inputs, check_positive_int
from apart_jax.attacks.losses import attack_loss, cross_entropy
from apart_jax.compiling import jit

LogitsFn = Callable[[jax.Array], jax.Array]
Carry = TypeVar("Carry")

#: The loop form of each attack on XLA:CPU, from measurements (docs/benchmarks.md). Passes
#: inside any loop (rolled or partly unrolled) ran 6-8x slower than straight-line code, but
#: straight-line code compiles slowly: PGD's 20 steps are worth it; APGD's and FAB's 100
#: steps (which also run inside their loops over restarts and target classes) are not, and
#: Square's thousands of queries cannot be. Partial unrolling (by 4 to 32) gained nothing.
CPU_UNROLL: dict[str, bool | int] = {"pgd": True, "apgd": 1, "fab": 1, "square": 1}


def loop(
    steps: int,
    body: Callable[[Any, Carry], Carry],
    carry: Carry,
    unroll: bool | int | str | None,
    attack: str,
) -> Carry:
    """``carry = body(i, carry)`` for i = 0 .. steps - 1: the iteration loop of every attack.

    ``unroll``, the argument of that name of every attack, chooses the loop form:

    * ``True``: straight-line code, every iteration inlined (``i`` is a Python int; unlike
      ``lax.fori_loop(..., unroll=True)`` this leaves no one-trip loop behind);
    * ``False`` or ``1``: a rolled ``lax.fori_loop`` (one copy of the body in the program);
    * ``n > 1``: a ``lax.fori_loop`` unrolled by ``n`` (``n`` iterations per trip);
    * ``"host"``: Python drives the iterations, calling one compiled iteration ``steps``
      times (:func:`host_loop`); only outside ``jax.jit``;
    * ``None``: the fastest form measured on the backend, :data:`CPU_UNROLL` ``[attack]`` on
      CPU and rolled elsewhere (not measured there yet).

    Every form computes the same iterations; the results agree up to float rounding, which
    an attack's sign steps can amplify over many iterations on a large model (a rounding
    flip of a near-zero gradient component moves that pixel to the other side of the ball).
    """
    if unroll == "host":
        return host_loop(steps, body, carry)
    if unroll is None:
        unroll = CPU_UNROLL[attack] if jax.default_backend() == "cpu" else 1
    if unroll is True:
        for i in range(steps):
            carry = body(i, carry)
        return carry
    return jax.lax.fori_loop(0, steps, body, carry, unroll=max(int(unroll), 1))


def outer_form(unroll: bool | int | str | None) -> bool | int:
    """The :func:`loop` form of an attack's loops around its iterations (restarts, targets).

    Rolled (one copy of the attack in the program), except when the host drives the
    iterations (``unroll="host"``): then the outer loops are Python loops too.
    """
    return True if unroll == "host" else 1


def host_loop(steps: int, body: Callable[[Any, Carry], Carry], carry: Carry) -> Carry:
    """``carry = body(i, carry)`` for i < steps, one call of a compiled iteration per step.

    On XLA:CPU a model's passes inside a compiled loop ran several times slower than the
    same passes compiled alone (docs/benchmarks.md), so attacks on CPU run fastest with the
    loop on the host. ``body`` is traced once per call (``i`` an int32 scalar); arrays it
    closes over (inputs, model weights) become arguments of the compiled iteration, which is
    cached by the traced program's text: later calls with other inputs of the same shapes,
    other weights or another closure doing the same computation reuse it without compiling.

    Raises:
      ValueError: under a JAX transformation (``jit``, ``vmap``, ``grad``): Python cannot
        drive a loop over traced values.
    """
    leaves, treedef = jax.tree_util.tree_flatten(carry)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        raise ValueError(
            'unroll="host" drives the loop from Python and cannot run under jax.jit or another '
            "transformation: call the attack outside jit, or choose another unroll"
        )
    index = jnp.zeros((), jnp.int32)
    closed = jax.make_jaxpr(lambda i, leaves: body(i, treedef.unflatten(leaves)))(index, leaves)
    step = _compiled_iteration(str(closed.jaxpr), closed.jaxpr)
    leaves = _placed_like(closed.consts, leaves)
    for i in range(steps):
        leaves = step(closed.consts, jnp.asarray(i, jnp.int32), leaves)
    return treedef.unflatten(leaves)


def _placed_like(consts: list[Any], leaves: list[Any]) -> list[Any]:
    """The carry ``leaves`` placed where the iteration will return them: on the one
    replicated placement of the committed arrays among ``consts`` (weights restored onto a
    mesh), if they share one, else unchanged. Otherwise the second step would see the
    carry's new placement and compile the iteration again."""
    placements = {c.sharding for c in consts if isinstance(c, jax.Array) and c.committed}
    if len(placements) != 1 or not (placement := placements.pop()).is_fully_replicated:
        return leaves
    return [
        jax.device_put(leaf, placement)
        if isinstance(leaf, jax.Array) and not leaf.committed
        else leaf
        for leaf in leaves
    ]


def _compiled_iteration(text: str, jaxpr: Any) -> Callable:
    """The compiled program of the traced iteration ``jaxpr``, its consts an argument; cached
    by the program's text (which names every constant's shape and dtype)."""
    step = _ITERATIONS.pop(text, None)
    if step is None:

        def run(consts, i, leaves):
            return jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(jaxpr, consts))(i, *leaves)

        step = jit(run)
    _ITERATIONS[text] = step  # most recently used last
    while len(_ITERATIONS) > _MAX_ITERATIONS:
        del _ITERATIONS[next(iter(_ITERATIONS))]
    return step


#: Compiled iterations of :func:`host_loop` by program text, least recently used first: an
#: AutoAttack run uses a handful (one per attack and batch shape).
_ITERATIONS: dict[str, Callable] = {}
_MAX_ITERATIONS = 32


def per_example(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example vector (B,) to broadcast against ``x`` (B, ...)."""
    return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


def clip_with_grad(x: jax.Array, lo: Any, hi: Any) -> jax.Array:
    """``clip(x, lo, hi)`` whose gradient passes (factor 1) where lo <= x <= hi, else 0.

    This is ``torch.clamp``'s gradient; ``jnp.clip`` instead halves the gradient at ties
    (x == lo or x == hi), which happen often (black or white pixels, delta = 0).
    """
    inside = (x >= lo) & (x <= hi)
    return jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, lo, hi)))


def l2_norm(x: jax.Array) -> jax.Array:
    """Per-example L2 norm of a batch (B, ...) -> (B,)."""
    return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=-1))


def l2_normalize(x: jax.Array, tiny: float = 1e-12) -> jax.Array:
    """Scales each example of ``x`` (B, ...) to unit L2 norm (zero stays zero)."""
    return x / per_example(l2_norm(x) + tiny, x)


def project(x_adv: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
    """Projects ``x_adv`` onto the ``norm`` ("linf" or "l2") ball of radius eps around ``x``,
    then onto [0, 1] (the box clip only shrinks an L2 perturbation: it stays in the ball)."""
    if norm == "linf":
        return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)
    delta = x_adv - x
    scale = jnp.minimum(1.0, eps / (l2_norm(delta) + 1e-12))
    return jnp.clip(x + delta * per_example(scale, x), 0.0, 1.0)


def steepest_direction(grad: jax.Array, norm: str) -> jax.Array:
    """The ascent direction for ``norm``: sign(grad) (L-inf) or grad / ||grad||_2 (L2)."""
    return jnp.sign(grad) if norm == "linf" else l2_normalize(grad)


def random_init(
    key: jax.Array, x: jax.Array, eps: Any, norm: str, *, on_sphere: bool = False
) -> jax.Array:
    """A random point around ``x`` (B, ...), clipped to [0, 1]; shape and dtype of ``x``.

    In the ball (default; PGD's start and the training methods'): L-inf uniform in the cube
    of side 2 eps, L2 a uniform direction at radius eps * U(0, 1). On the sphere
    (``on_sphere=True``; APGD's and FAB's start, as in their reference code):
    ``x + eps * t / ||t||`` with t uniform in [-1, 1]^n (L-inf) or Gaussian (L2).

    Args:
      key: PRNG key. x: inputs (B, ...) in [0, 1].
      eps: the radius, a number (checked as an attack's eps) or, on the sphere, (B,) radii.
      norm: "linf" or "l2".
    """
    check_attack_inputs(x, key=key, eps=eps if jnp.ndim(eps) == 0 else UNSET, norm=norm)
    if on_sphere:
        if norm == "linf":
            t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
            size = jnp.max(jnp.abs(t.reshape(x.shape[0], -1)), axis=-1)
        else:
            t = jax.random.normal(key, x.shape, x.dtype)
            size = l2_norm(t)
        radius = per_example(eps, x) if jnp.ndim(eps) else eps
        return jnp.clip(x + radius * t / per_example(size + 1e-12, x), 0.0, 1.0)
    if norm == "linf":
        return jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps), 0.0, 1.0)
    k_dir, k_radius = jax.random.split(key)
    direction = l2_normalize(jax.random.normal(k_dir, x.shape, x.dtype))
    radius = eps * jax.random.uniform(k_radius, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
    return jnp.clip(x + radius * direction, 0.0, 1.0)


def ranked_targets(clean_logits: jax.Array, n_target_classes: int) -> jax.Array:
    """Target classes of the multi-target attacks: ranks 2 .. n + 1 of the clean logits.

    Args:
      clean_logits: (B, K) logits at the clean inputs.
      n_target_classes: n in [1, K - 1] (AutoAttack uses 9).

    Returns:
      (n, B) int: row j holds, per example, the class with the (j + 2)-th largest logit.
    """
    chex.assert_rank(clean_logits, 2)
    check_positive_int("n_target_classes", n_target_classes)
    classes = clean_logits.shape[-1]
    if n_target_classes > classes - 1:
        raise ValueError(
            f"n_target_classes must be in [1, K - 1] = [1, {classes - 1}], got {n_target_classes}"
        )
    ranked = jnp.flip(jnp.argsort(clean_logits, axis=-1), axis=-1)
    return ranked[:, 1 : n_target_classes + 1].T


def gradient_ascent(
    grad_fn: Callable[[jax.Array, Carry], tuple[jax.Array, Carry]],
    x: jax.Array,
    x_start: jax.Array,
    carry: Carry,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    unroll: bool | int | str | None = None,
) -> tuple[jax.Array, Carry]:
    """``steps`` steepest-ascent steps, each projected onto the eps-ball and [0, 1].

    Each step moves ``step_size`` along :func:`steepest_direction` (signed gradient for
    L-inf, normalized gradient for L2).

    Args:
      grad_fn: ``(x_adv, carry) -> (gradient of the loss at x_adv, new carry)``.
      x: clean inputs in [0, 1].
      x_start: the starting point, inside the ball.
      carry: threaded through ``grad_fn`` (for example BN statistics); any pytree.
      eps, step_size, steps: ball radius (``inf``: only the [0, 1] box is projected on),
        step length, number of steps (static int).
      norm: "linf" or "l2".
      unroll: the loop form (:func:`loop`).

    Returns:
      ``(x_adv, carry)`` after the last step.
    """

    def body(_, state):
        x_adv, carry = state
        grad, carry = grad_fn(x_adv, carry)
        return project(x_adv + step_size * steepest_direction(grad, norm), x, eps, norm), carry

    return loop(steps, body, (x_start, carry), unroll, "pgd")


def loss_gradient(logits_fn: LogitsFn, x: jax.Array, y: jax.Array) -> jax.Array:
    """Gradient of the summed cross-entropy with respect to the inputs (shape of ``x``).

    The sum keeps examples independent: each row is that example's own loss gradient.
    """
    return jax.grad(lambda x: jnp.sum(cross_entropy(logits_fn(x), y)))(x)


def fgsm(
    logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *, eps: float
) -> jax.Array:
    """FGSM (Goodfellow et al. 2015): ``clip(x + eps * sign(grad_x CE), 0, 1)``.

    Args:
      logits_fn: inputs (B, ...) in [0, 1] -> logits (B, K).
      x: clean inputs in [0, 1]; y: integer labels (B,).
      key: a PRNG key, checked but unused (FGSM draws no noise; every attack takes one).
      eps: L-inf radius, in (0, 1].

    Returns:
      Adversarial inputs, same shape and dtype as ``x``.
    """
    check_attack_inputs(x, y, key=key, logits_fn=logits_fn, eps=eps, norm="linf")
    return project(x + eps * jnp.sign(loss_gradient(logits_fn, x, y)), x, eps, "linf")


def pgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    step_size: float,
    steps: int,
    restarts: int = 1,
    norm: str = "linf",
    loss: str = "ce",
    targets: jax.Array | None = None,
    random_start: bool = True,
    unroll: bool | int | str | None = None,
) -> jax.Array:
    """PGD (Madry et al. 2018): projected steepest ascent on a loss, with restarts.

    Each step moves ``step_size`` along sign(grad) (L-inf) or grad / ||grad||_2 (L2) and
    projects onto the eps-ball and [0, 1]. With several restarts each example keeps the
    worst point found: a misclassified one (reaching the target, if targeted) wins, then
    the higher loss. The C&W L-inf attack (Carlini & Wagner 2017) is ``loss="margin"``.

    Args:
      logits_fn: inputs (B, ...) in [0, 1] -> logits (B, K).
      x: clean inputs in [0, 1]; y: integer labels (B,).
      key: PRNG key for the random starts (restart r uses ``fold_in(key, r)``).
      eps: radius, in (0, 1] for L-inf; step_size: positive; steps: positive int (static).
      restarts: independent random starts (each adds ``steps`` forward and backward passes
        and, when there are several, one forward pass to compare them).
      norm: "linf" or "l2".
      loss: "ce" (cross-entropy), "margin" (C&W) or "dlr" (see ``attack_loss``).
      targets: target labels (B,) int: the attack is targeted (moves towards them) iff given.
      random_start: start at a random point of the ball (default) or at ``x``.
      unroll: the loop form (:func:`loop`); None: the fastest on the backend.

    Returns:
      Adversarial inputs, same shape and dtype as ``x``.
    """
    check_attack_inputs(
        x,
        y,
        key=key,
        logits_fn=logits_fn,
        targets=targets,
        eps=eps,
        step_size=step_size,
        norm=norm,
        loss=loss,
        unroll=unroll,
        steps=steps,
        restarts=restarts,
    )

    def total_loss(x_adv):
        return jnp.sum(attack_loss(loss, logits_fn(x_adv), y, targets))

    def grad_fn(x_adv, carry):
        return jax.grad(total_loss)(x_adv), carry

    best = best_score = None
    for restart in range(restarts):
        k = jax.random.fold_in(key, restart)
        x_start = random_init(k, x, eps, norm) if random_start else x
        x_adv, _ = gradient_ascent(
            grad_fn, x, x_start, None, eps=eps, step_size=step_size, steps=steps, norm=norm,
            unroll=unroll,
        )  # fmt: skip
        if restarts == 1:
            return x_adv
        logits = logits_fn(x_adv)
        predicted = jnp.argmax(logits, -1)
        success = predicted != y if targets is None else predicted == targets
        score = jnp.where(success, jnp.inf, attack_loss(loss, logits, y, targets))
        if best is None:
            best, best_score = x_adv, score
        else:
            best = jnp.where(per_example(score > best_score, x), x_adv, best)
            best_score = jnp.maximum(score, best_score)
    return best
