"""Momentum rules: the optimizer-specific part of an ECO optimizer.

A :class:`MomentumRule` describes an EMA-momentum method whose step (before the
learning rate) is a preconditioned momentum::

    m~ = beta * m + (1 - beta) * g            (first moment, the "momentum")
    d  = P^-1(m~)                             (the step direction)
    w~ = w - eta * (d + lambda * w)

SGDM has ``P = identity``; Adam has the diagonal ``P(x) = D * x`` with
``D = (1 - beta1^t) * (sqrt(v_hat) + eps)``. The error feedback of
:mod:`eco_optax.transform` needs exactly ``beta`` and ``P``: to first order it
pays a quantization error ``e`` back through
``m += ((1 - eta*lambda) / eta) * (1 - 1/beta) * P(e)``.

In general ``P`` is the inverse of the step's first-order response to the
momentum, with the preconditioner frozen: when ``m~`` changes by ``delta`` the
direction changes by ``P^-1(delta)``. For Nesterov variants (``d`` is a function
of ``beta*m~/(1-beta^(t+1)) + ...``) this picks up the slope
``beta/(1-beta^(t+1))``; for Muon (``d = s * M (M^T M)^-1/2``) ``P`` is the
non-diagonal ``P(E) = E (R^T R)^1/2`` of :func:`frozen_polar_preconditioner`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from optax.contrib import _muon  # optax's Newton-Schulz: the one optax.contrib.muon runs


class SGDMMoments(NamedTuple):
  """State of :func:`sgdm_rule`: the EMA momentum ``mu``."""
  mu: Any


class AdamMoments(NamedTuple):
  """State of :func:`adam_rule`: first moment ``mu`` and second moment ``nu``."""
  mu: Any
  nu: Any


class MuonMoments(NamedTuple):
  """State of :func:`muon_rule`: momentum ``mu`` of every leaf, Adam's ``nu``.

  ``nu`` is ``None`` at the matrix (Muon) leaves.
  """
  mu: Any
  nu: Any


class LionMoments(NamedTuple):
  """State of :func:`lion_rule`: the momentum ``mu`` (decay ``b2``)."""
  mu: Any


def diagonal_preconditioner(denominator: jax.Array, error: jax.Array) -> jax.Array:
  """``P(e) = D * e``: the preconditioner of SGDM (``D = 1``), Adam and Lion."""
  return denominator * error


def frozen_polar_preconditioner(r: jax.Array, error: jax.Array) -> jax.Array:
  """``P(E) = E (R^T R)^(1/2)``: the inverse of Muon's frozen step ``X -> X (R^T R)^(-1/2)``.

  Computed from the thin SVD ``R = U S V^T`` as ``((E V) * S) V^T``, which costs
  ``O(m n min(m, n))`` (the small side) and needs no inverse: zero singular values,
  the all-zero ``R`` included, contribute nothing.

  Example:
    >>> import jax.numpy as jnp
    >>> from eco_optax import rules
    >>> r = jnp.array([[3.0, 0.0], [0.0, 0.0], [0.0, 4.0]])   # R^T R = diag(9, 16)
    >>> rules.frozen_polar_preconditioner(r, jnp.ones((3, 2)))
    Array([[3., 4.],
           [3., 4.],
           [3., 4.]], dtype=float32)
  """
  _, s, vh = jnp.linalg.svd(r, full_matrices=False)
  return ((error @ vh.T) * s) @ vh


def polar_preconditioner(r: jax.Array, error: jax.Array) -> jax.Array:
  """The inverse of the polar factor's derivative at ``R = U S V^T`` (thin SVD), on its range.

  ``d polar(R)[X] = U Omega V^T + (I - UU^T) X V S^-1 V^T + U S^-1 U^T X (I - VV^T)`` with
  ``Omega = skew(U^T X V) / ((s_i + s_j)/2)``: the symmetric part of ``U^T X V`` (the
  scale of ``R`` among it) does not move the polar factor. Its inverse applied to ``E``::

    P(E) = U (skew(U^T E V) * (s_i + s_j)/2) V^T + (I - UU^T) E V S V^T + U S U^T E (I - VV^T)

  drops the part of ``E`` that no change of the momentum can pay back.
  """
  u, s, vh = jnp.linalg.svd(r, full_matrices=False)
  k = u.T @ error @ vh.T
  inside = u @ (((k - k.T) / 2) * ((s[:, None] + s[None, :]) / 2)) @ vh
  left = ((error - u @ (u.T @ error)) @ vh.T * s) @ vh
  right = (u * s) @ (u.T @ (error - (error @ vh.T) @ vh))
  return inside + left + right


class MomentumRule(NamedTuple):
  """An EMA-momentum optimizer in the form the error feedback needs.

  Attributes:
    beta: decay of the first moment ``mu`` (the momentum ECO writes into); or,
      for rules that run different optimizers on different leaves, a callable
      ``params -> tree of per-leaf floats``.
    init: ``params_f32 -> moments`` (a NamedTuple with a ``mu`` field).
    step: ``(grads, moments, count) -> (moments, direction, preconditioner)``
      with ``count`` the 1-based step number, ``moments.mu`` the updated ``m~``,
      ``direction = P^-1(m~)`` and ``preconditioner`` a tree (like ``grads``) of
      whatever ``precondition`` needs per leaf.
    precondition: ``(preconditioner_leaf, error_leaf) -> P(error_leaf)``.
    nonnegative: names of the moment fields that are never negative (Adam's
      ``nu``): their 8-bit storage uses the unsigned map
      (:func:`eco_optax.moments.blockwise_8bit`).
  """
  beta: Union[float, Callable[[Any], Any]]
  init: Callable[[Any], Any]
  step: Callable[[Any, Any, jax.Array], tuple[Any, Any, Any]]
  precondition: Callable[[Any, jax.Array], jax.Array] = diagonal_preconditioner
  nonnegative: tuple[str, ...] = ()


def _zeros(params: Any) -> Any:
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


def sgdm_rule(momentum: float = 0.9) -> MomentumRule:
  """EMA-momentum SGD (the paper's Algorithm 2): ``m~ = b*m + (1-b)*g``, ``d = m~``.

  Note the EMA form: optax's ``sgd(momentum=b)`` uses ``m = b*m + g`` instead, which
  is this rule with the learning rate multiplied by ``1/(1-b)``.
  """

  def init(params):
    return SGDMMoments(mu=_zeros(params))

  def step(grads, moments, count):
    del count
    mu = optax.tree.update_moment(grads, moments.mu, momentum, 1)
    ones = jax.tree.map(lambda m: jnp.ones((), m.dtype), mu)
    return SGDMMoments(mu=mu), mu, ones

  return MomentumRule(beta=momentum, init=init, step=step)


def adam_rule(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              eps_root: float = 0.0, *, nesterov: bool = False) -> MomentumRule:
  """Adam (the paper's Algorithm 3), matching :func:`optax.scale_by_adam`.

  ``d = m_hat / (sqrt(v_hat + eps_root) + eps)`` with ``v_hat = v/(1-b2^t)`` and
  ``m_hat = m~/(1-b1^t)``, so ``D = (1-b1^t) * (sqrt(v_hat + eps_root) + eps)``.
  With ``nesterov`` (NAdam, as optax) ``m_hat = b1 m~/(1-b1^(t+1)) + (1-b1) g/(1-b1^t)``,
  whose slope in ``m~`` gives ``D = (1-b1^(t+1))/b1 * (sqrt(v_hat + eps_root) + eps)``.
  """

  def init(params):
    return AdamMoments(mu=_zeros(params), nu=_zeros(params))

  def step(grads, moments, count):
    mu = optax.tree.update_moment(grads, moments.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(grads, moments.nu, b2, 2)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    if nesterov:
      next_count = optax.safe_increment(count)
      mu_hat = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g,
                            optax.tree.bias_correction(mu, b1, next_count),
                            optax.tree.bias_correction(grads, b1, count))
      slope = b1 / (1 - b1 ** next_count.astype(jnp.float32))
    else:
      mu_hat = optax.tree.bias_correction(mu, b1, count)
      slope = 1 / (1 - b1 ** count.astype(jnp.float32))
    root = jax.tree.map(lambda v: jnp.sqrt(v + eps_root) + eps, nu_hat)
    direction = jax.tree.map(lambda m, r: m / r, mu_hat, root)
    denom = jax.tree.map(lambda r: r / slope, root)
    return AdamMoments(mu=mu, nu=nu), direction, denom

  return MomentumRule(beta=b1, init=init, step=step, nonnegative=("nu",))


def is_matrix(x: Any) -> bool:
  """The leaves :func:`muon_rule` orthogonalizes: 2-D, as :func:`optax.contrib.muon`."""
  return jnp.ndim(x) == 2


def _select(tree: Any, matrices: bool) -> Any:
  """``tree`` with ``None`` at the leaves that are (not, if ``matrices``) matrices."""
  return jax.tree.map(lambda x: x if is_matrix(x) == matrices else None, tree)


def _merge(a: Any, b: Any) -> Any:
  """Leaves of ``a``, and of ``b`` where ``a`` has ``None``."""
  return jax.tree.map(lambda x, y: y if x is None else x, a, b,
                      is_leaf=lambda x: x is None)


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

  Matrix leaves (shape ``m x n``), EMA momentum as optax::

    m~ = beta*m + (1-beta)*g
    N  = beta*m~/(1-beta^(t+1)) + (1-beta)*g/(1-beta^t)     (nesterov; else m~/(1-beta^t))
    d  = s * NS(N),   s = sqrt(max(1, n/m))   (or sqrt(max(m, n)) * consistent_rms)

  ``NS`` is optax's Newton-Schulz orthogonalization, approximately the polar factor
  ``N (N^T N)^-1/2``, which is invariant to the scale of ``N``. Freezing the factor
  ``(N^T N)^-1/2``, a change ``delta`` of ``m~`` moves ``d`` by
  ``s * a * delta (N^T N)^-1/2`` with ``a = dN/dm~ = beta/(1-beta^(t+1))``
  (``1/(1-beta^t)`` without nesterov), so ``P(E) = E (R^T R)^1/2`` with
  ``R = N/(a s)`` (:func:`frozen_polar_preconditioner`); without nesterov ``R = m~/s``,
  the blog's ``P(E) = sqrt(m/n) E (M~^T M~)^1/2`` for wide matrices: that is
  ``injection="frozen"``. The polar factor ignores the scale of ``N`` (more
  generally the symmetric part of ``U^T dN V``), so that rule also injects a part of
  ``E`` no momentum can pay back: when every entry of a step rounds back,
  ``E = -eta s NS(N)`` is all such a part, and the frozen injection cancels the
  momentum's decay (``m`` becomes an undecayed sum of gradients, with no step taken).
  ``injection="polar"`` (default) inverts the exact derivative of the polar factor
  instead (:func:`polar_preconditioner`) and injects only the part that pays back.
  Other leaves follow :func:`adam_rule` (``adam_b1``, ``adam_b2``, ``eps``,
  ``adam_eps_root`` and ``nesterov``), so ``beta`` is per leaf: ``beta`` or ``adam_b1``.
  """
  if injection not in ("polar", "frozen"):
    raise ValueError(f"injection must be 'polar' or 'frozen', got {injection!r}")
  matrix_preconditioner = (polar_preconditioner if injection == "polar"
                           else frozen_polar_preconditioner)
  coeffs = jnp.asarray(ns_coeffs, jnp.float32)
  if coeffs.ndim not in (1, 2) or coeffs.shape[-1] != 3:
    raise ValueError(f"ns_coeffs must have shape (3,) or (n, 3), got {coeffs.shape}")
  if coeffs.ndim == 2:
    if coeffs.shape[0] < ns_steps:
      raise ValueError(f"{coeffs.shape[0]} rows of ns_coeffs for ns_steps={ns_steps}")
    coeffs = coeffs[-ns_steps:]
  adam = adam_rule(adam_b1, adam_b2, eps, adam_eps_root, nesterov=nesterov)

  def shape_scale(x):
    m, n = x.shape
    return math.sqrt(max(1, n / m)) if consistent_rms is None else (
        math.sqrt(max(m, n)) * consistent_rms)

  def init(params):
    return MuonMoments(mu=_zeros(params), nu=_zeros(_select(params, False)))

  def step(grads, moments, count):
    adam_moments, adam_dir, adam_pre = adam.step(
        _select(grads, False), AdamMoments(_select(moments.mu, False), moments.nu), count)

    def matrix(g, m):
      m = (1 - beta) * g + beta * m
      if nesterov:
        next_count = optax.safe_increment(count)
        n = (beta * optax.tree.bias_correction(m, beta, next_count)
             + (1 - beta) * optax.tree.bias_correction(g, beta, count))
        slope = beta / (1 - beta ** next_count.astype(jnp.float32))
      else:
        n = optax.tree.bias_correction(m, beta, count)
        slope = 1 / (1 - beta ** count.astype(jnp.float32))
      s = shape_scale(g)
      d = s * _muon.orthogonalize_via_newton_schulz(n, coeffs, ns_steps, preconditioning, eps)
      return m, d, n / (slope * s)

    g_leaves, treedef = jax.tree.flatten(_select(grads, True))
    out = [matrix(g, m) for g, m in
           zip(g_leaves, treedef.flatten_up_to(_select(moments.mu, True)))]
    mu, direction, pre = (treedef.unflatten([o[i] for o in out]) for i in range(3))
    return (MuonMoments(mu=_merge(mu, adam_moments.mu), nu=adam_moments.nu),
            _merge(direction, adam_dir), _merge(pre, adam_pre))

  def precondition(pre, error):
    if is_matrix(error):
      return matrix_preconditioner(pre, error)
    return diagonal_preconditioner(pre, error)

  def betas(params):
    return jax.tree.map(lambda p: beta if is_matrix(p) else adam_b1, params)

  return MomentumRule(beta=betas, init=init, step=step, precondition=precondition,
                      nonnegative=("nu",))


def lion_rule(b1: float = 0.9, b2: float = 0.99) -> MomentumRule:
  """Lion, matching :func:`optax.scale_by_lion`: ``d = sign(c)``, ``c = b1*m + (1-b1)*g``.

  The momentum ``m~ = b2*m + (1-b2)*g`` is the EMA with ``beta = b2``; the step
  reads the old ``m`` through ``c``. Freezing ``d = c / |c|``, a debt ``delta`` in
  ``m`` moves the next direction by ``b1 * delta / |c|``, where the ECO derivation
  has ``beta * P^-1(delta)``: ``P(e) = (b2/b1) * |c| * e``. The sign makes this a
  poor model: a debt can flip a step's sign but never enlarge it.
  """

  def init(params):
    return LionMoments(mu=_zeros(params))

  def step(grads, moments, count):
    del count
    c = jax.tree.map(lambda g, m: (1.0 - b1) * g + b1 * m, grads, moments.mu)
    mu = optax.tree.update_moment(grads, moments.mu, b2, 1)
    denom = jax.tree.map(lambda c: (b2 / b1) * jnp.abs(c), c)
    return LionMoments(mu=mu), jax.tree.map(jnp.sign, c), denom

  return MomentumRule(beta=b2, init=init, step=step)
