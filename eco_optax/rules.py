"""Momentum rules: the optimizer-specific part of an ECO optimizer.

A rule wraps an optax transformation that computes an EMA-momentum method's step
direction (before the learning rate)::

    m~ = beta * m + (1 - beta) * g            (the momentum, field ``mu``)
    d  = P^-1(m~)                             (the direction optax computes)

and adds what the error feedback of :mod:`eco_optax.transform` needs beyond it:
``beta`` and the preconditioner ``P``, the inverse of the direction's first-order
response to the momentum. ECO pays a quantization error ``e`` back through
``m += ((1 - eta*lambda) / eta) * (1 - 1/beta) * P(e)`` (its exact rule needs neither:
it adds the kept error to the weights).

==========================  =================================  ===============================
rule                        optax transformation               ``P(e)``
==========================  =================================  ===============================
:func:`sgdm_rule`           ``optax.ema(b, debias=False)``     ``e``
:func:`adam_rule`           ``optax.scale_by_adam``            ``(1-b1^t)(sqrt(v_hat)+eps) e``
:func:`lion_rule`           ``optax.scale_by_lion``            ``(b2/b1) |c| e``
:func:`muon_rule` (2-D)     ``optax.contrib.scale_by_muon``    ``E (R^T R)^1/2`` (polar)
==========================  =================================  ===============================

The optax transformation runs unchanged, one leaf (or one block of rows of a leaf,
for elementwise rules) at a time: with the lossless format an eco optimizer is the
optax optimizer (the same arithmetic; XLA may fuse the bias-correction and
learning-rate scalars differently in the two programs, a few ulps apart after
100 steps, ``tests/test_alias.py``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import optax


class SGDMMoments(NamedTuple):
  """Moments of :func:`sgdm_rule`: the EMA momentum ``mu``."""
  mu: Any


class AdamMoments(NamedTuple):
  """Moments of :func:`adam_rule`: first moment ``mu`` and second moment ``nu``."""
  mu: Any
  nu: Any


class MuonMoments(NamedTuple):
  """Moments of :func:`muon_rule`: momentum ``mu`` of every leaf, Adam's ``nu`` (``None`` at matrices)."""
  mu: Any
  nu: Any


class LionMoments(NamedTuple):
  """Moments of :func:`lion_rule`: the momentum ``mu`` (decay ``b2``)."""
  mu: Any


class LeafRule(NamedTuple):
  """The rule for one leaf.

  Attributes:
    transform: the optax transformation giving the direction ``d`` and new state.
    beta: decay of the momentum ``mu``.
    pack: ``(count, {field: array}) -> optax state`` of one leaf (or block).
    unpack: ``optax state -> {field: array}``.
    precondition: ``(old_state, new_state, grad, error) -> P(error)``.
    elementwise: whether the transformation acts on each element alone, so that
      a leaf may be stepped one block of rows at a time.
  """
  transform: optax.GradientTransformation
  beta: float
  pack: Callable[[jax.Array, dict], Any]
  unpack: Callable[[Any], dict]
  precondition: Callable[[Any, Any, jax.Array, jax.Array], jax.Array]
  elementwise: bool = True


class MomentumRule(NamedTuple):
  """An EMA-momentum optimizer in the form the error feedback needs.

  Attributes:
    moments: the NamedTuple class of the optimizer state's moment trees.
    for_leaf: ``shape-and-dtype -> (LeafRule, fields)``: the rule of a parameter leaf
      (given as a ``jax.ShapeDtypeStruct`` of its dequantized value) and the moment
      fields it has.
    nonnegative: moment fields that are never negative (their 8-bit storage uses
      the unsigned map of :func:`eco_optax.moments.blockwise_8bit`).
  """
  moments: type
  for_leaf: Callable[[Any], tuple[LeafRule, tuple[str, ...]]]
  nonnegative: tuple[str, ...] = ()


def _identity_precondition(old, new, grad, error):
  del old, new, grad
  return error


def sgdm_rule(momentum: float = 0.9) -> MomentumRule:
  """EMA-momentum SGD (the paper's Algorithm 2): ``m~ = b*m + (1-b)*g``, ``d = m~``.

  The direction is :func:`optax.ema` without debiasing. optax's ``sgd(momentum=b)``
  uses ``m = b*m + g`` instead: this rule with the learning rate times ``1/(1-b)``.
  """
  leaf = LeafRule(
      transform=optax.ema(momentum, debias=False), beta=momentum,
      pack=lambda count, m: optax.EmaState(count=count, ema=m["mu"]),
      unpack=lambda s: {"mu": s.ema}, precondition=_identity_precondition)
  return MomentumRule(SGDMMoments, lambda p: (leaf, ("mu",)))


def _adam_leaf(b1, b2, eps, eps_root, nesterov) -> LeafRule:
  def precondition(old, new, grad, error):
    del old, grad
    count = new.count.astype(jnp.float32)
    nu_hat = optax.tree.bias_correction(new.nu, b2, new.count)
    if nesterov:   # m_hat = b1 m~ / (1 - b1^(t+1)) + ...: slope b1 / (1 - b1^(t+1))
      slope = b1 / (1 - b1 ** (count + 1))
    else:
      slope = 1 / (1 - b1 ** count)
    return (jnp.sqrt(nu_hat + eps_root) + eps) / slope * error

  return LeafRule(
      transform=optax.scale_by_adam(b1, b2, eps, eps_root, nesterov=nesterov), beta=b1,
      pack=lambda count, m: optax.ScaleByAdamState(count=count, mu=m["mu"], nu=m["nu"]),
      unpack=lambda s: {"mu": s.mu, "nu": s.nu}, precondition=precondition)


def adam_rule(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              eps_root: float = 0.0, *, nesterov: bool = False) -> MomentumRule:
  """Adam (the paper's Algorithm 3): :func:`optax.scale_by_adam`.

  ``d = m_hat / (sqrt(v_hat + eps_root) + eps)`` with ``m_hat = m~/(1-b1^t)``, so
  ``P(e) = D e`` with ``D = (1-b1^t) (sqrt(v_hat + eps_root) + eps)``. With
  ``nesterov`` (NAdam) ``m_hat = b1 m~/(1-b1^(t+1)) + (1-b1) g/(1-b1^t)``, whose
  slope in ``m~`` gives ``D = (1-b1^(t+1))/b1 (sqrt(v_hat + eps_root) + eps)``.
  """
  leaf = _adam_leaf(b1, b2, eps, eps_root, nesterov)
  return MomentumRule(AdamMoments, lambda p: (leaf, ("mu", "nu")), nonnegative=("nu",))


def lion_rule(b1: float = 0.9, b2: float = 0.99) -> MomentumRule:
  """Lion: :func:`optax.scale_by_lion`, ``d = sign(c)``, ``c = b1*m + (1-b1)*g``.

  The momentum ``m~ = b2*m + (1-b2)*g`` is the EMA with ``beta = b2``; the step
  reads the old ``m`` through ``c``. Freezing ``d = c / |c|``, a debt ``delta`` in
  ``m`` moves the next direction by ``b1 * delta / |c|``, where the ECO derivation
  has ``beta * P^-1(delta)``: ``P(e) = (b2/b1) * |c| * e``. The sign makes this a
  poor model: a debt can flip a step's sign but never enlarge it.
  """

  def precondition(old, new, grad, error):
    del new
    return (b2 / b1) * jnp.abs((1.0 - b1) * grad + b1 * old.mu) * error

  leaf = LeafRule(
      transform=optax.scale_by_lion(b1, b2), beta=b2,
      pack=lambda count, m: optax.ScaleByLionState(count=count, mu=m["mu"]),
      unpack=lambda s: {"mu": s.mu}, precondition=precondition)
  return MomentumRule(LionMoments, lambda p: (leaf, ("mu",)))


def _thin_svd(r: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``(U, S, V^T, finite)``: the thin SVD of ``r``, of zeros where ``r`` is not finite.

  LAPACK's SVD never returns on a matrix with an infinite entry (an infinite
  gradient reaches ``R`` through the momentum); the caller makes its result NaN
  where ``finite`` is false, so the fault shows in the weights.
  """
  finite = jnp.all(jnp.isfinite(r))
  u, s, vh = jnp.linalg.svd(jnp.where(finite, r, 0.0), full_matrices=False)
  return u, s, vh, finite


def frozen_polar_preconditioner(r: jax.Array, error: jax.Array) -> jax.Array:
  """``P(E) = E (R^T R)^(1/2)``: the inverse of Muon's frozen step ``X -> X (R^T R)^(-1/2)``.

  Computed from the thin SVD ``R = U S V^T`` as ``((E V) * S) V^T``, which costs
  ``O(m n min(m, n))`` and needs no inverse: zero singular values, the all-zero
  ``R`` included, contribute nothing.

  Example:
    >>> import jax.numpy as jnp
    >>> from eco_optax import rules
    >>> r = jnp.array([[3.0, 0.0], [0.0, 0.0], [0.0, 4.0]])   # R^T R = diag(9, 16)
    >>> rules.frozen_polar_preconditioner(r, jnp.ones((3, 2)))
    Array([[3., 4.],
           [3., 4.],
           [3., 4.]], dtype=float32)
  """
  _, s, vh, finite = _thin_svd(r)
  return jnp.where(finite, ((error @ vh.T) * s) @ vh, jnp.nan)


def polar_preconditioner(r: jax.Array, error: jax.Array) -> jax.Array:
  """The inverse of the polar factor's derivative at ``R = U S V^T`` (thin SVD), on its range.

  ``d polar(R)[X] = U Omega V^T + (I - UU^T) X V S^-1 V^T + U S^-1 U^T X (I - VV^T)`` with
  ``Omega = skew(U^T X V) / ((s_i + s_j)/2)``: the symmetric part of ``U^T X V`` (the
  scale of ``R`` among it) does not move the polar factor. Its inverse applied to ``E``::

    P(E) = U (skew(U^T E V) * (s_i + s_j)/2) V^T + (I - UU^T) E V S V^T + U S U^T E (I - VV^T)

  drops the part of ``E`` that no change of the momentum can pay back.
  """
  u, s, vh, finite = _thin_svd(r)
  k = u.T @ error @ vh.T
  inside = u @ (((k - k.T) / 2) * ((s[:, None] + s[None, :]) / 2)) @ vh
  left = ((error - u @ (u.T @ error)) @ vh.T * s) @ vh
  right = (u * s) @ (u.T @ (error - (error @ vh.T) @ vh))
  return jnp.where(finite, inside + left + right, jnp.nan)


def is_matrix(x: Any) -> bool:
  """The leaves :func:`muon_rule` orthogonalizes: 2-D, as :func:`optax.contrib.muon`."""
  return len(jnp.shape(x)) == 2


def _scaled(transform: optax.GradientTransformation, scale: float) -> optax.GradientTransformation:
  """``transform`` with its updates multiplied by ``scale`` (and the same state)."""

  def update(updates, state, params=None):
    updates, state = transform.update(updates, state, params)
    return jax.tree.map(lambda u: scale * u, updates), state

  return optax.GradientTransformation(transform.init, update)


def muon_rule(
    beta: float = 0.95,
    ns_coeffs: Union[Sequence[float], Sequence[Sequence[float]]] = (3.4445, -4.7750, 2.0315),
    ns_steps: int = 5,
    eps: float = 1e-8,
    *,
    nesterov: bool = True,
    preconditioning: Literal["frobenius", "spectral", "aol", "schatten"] = "frobenius",
    consistent_rms: float | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps_root: float = 0.0,
    injection: Literal["polar", "frozen"] = "polar",
) -> MomentumRule:
  """Muon for matrices (2-D leaves), Adam for the rest, as :func:`optax.contrib.muon`.

  Matrix leaves (shape ``m x n``) take :func:`optax.contrib.scale_by_muon` times the
  shape scale ``s = sqrt(max(1, n/m))`` (or ``sqrt(max(m, n)) * consistent_rms``)::

    m~ = beta*m + (1-beta)*g
    N  = beta*m~/(1-beta^(t+1)) + (1-beta)*g/(1-beta^t)     (nesterov; else m~/(1-beta^t))
    d  = s * NS(N)

  ``NS`` (Newton-Schulz) is approximately the polar factor ``N (N^T N)^-1/2``, invariant
  to the scale of ``N``. Freezing ``(N^T N)^-1/2``, a change ``delta`` of ``m~`` moves
  ``d`` by ``s * a * delta (N^T N)^-1/2`` with ``a = dN/dm~``, so ``P(E) = E (R^T R)^1/2``
  with ``R = N/(a s)`` (:func:`frozen_polar_preconditioner`, ``injection="frozen"``).
  The polar factor ignores the scale of ``N``, so that rule also injects a part of
  ``E`` no momentum can pay back; ``injection="polar"`` (default) inverts the exact
  derivative of the polar factor (:func:`polar_preconditioner`) and injects only the
  part that pays back. Other leaves follow :func:`adam_rule` (``adam_b1``,
  ``adam_b2``, ``eps``, ``adam_eps_root``, ``nesterov``).
  """
  if injection not in ("polar", "frozen"):
    raise ValueError(f"injection must be 'polar' or 'frozen', got {injection!r}")
  matrix_preconditioner = (polar_preconditioner if injection == "polar"
                           else frozen_polar_preconditioner)
  orthogonalize = optax.contrib.scale_by_muon(
      ns_coeffs, ns_steps, beta, eps, nesterov=nesterov, preconditioning=preconditioning)
  ns_state = orthogonalize.init(jnp.zeros((1, 1))).ns_coeffs
  adam = _adam_leaf(adam_b1, adam_b2, eps, adam_eps_root, nesterov)

  def matrix_leaf(shape) -> LeafRule:
    m, n = shape
    s = math.sqrt(max(1, n / m)) if consistent_rms is None else (
        math.sqrt(max(m, n)) * consistent_rms)

    def precondition(old, new, grad, error):
      del old
      count = new.count.astype(jnp.float32)      # t
      if nesterov:
        n_mat = (beta * new.mu / (1 - beta ** (count + 1))
                 + (1 - beta) * grad / (1 - beta ** count))
        slope = beta / (1 - beta ** (count + 1))
      else:
        n_mat = new.mu / (1 - beta ** count)
        slope = 1 / (1 - beta ** count)
      return matrix_preconditioner(n_mat / (slope * s), error)

    return LeafRule(
        transform=_scaled(orthogonalize, s), beta=beta,
        pack=lambda count, mo: optax.contrib.MuonState(count=count, mu=mo["mu"],
                                                       ns_coeffs=ns_state),
        unpack=lambda st: {"mu": st.mu}, precondition=precondition, elementwise=False)

  def for_leaf(p):
    if is_matrix(p) and math.prod(jnp.shape(p)) > 0:   # an empty one has nothing to orthogonalize
      return matrix_leaf(tuple(jnp.shape(p))), ("mu",)
    return adam, ("mu", "nu")

  return MomentumRule(MuonMoments, for_leaf, nonnegative=("nu",))

