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
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SGDMMoments(NamedTuple):
  """State of :func:`sgdm_rule`: the EMA momentum ``mu``."""
  mu: Any


class AdamMoments(NamedTuple):
  """State of :func:`adam_rule`: first moment ``mu`` and second moment ``nu``."""
  mu: Any
  nu: Any


def diagonal_preconditioner(denominator: jax.Array, error: jax.Array) -> jax.Array:
  """``P(e) = D * e``: the preconditioner of SGDM (``D = 1``) and Adam."""
  return denominator * error


class MomentumRule(NamedTuple):
  """An EMA-momentum optimizer in the form the error feedback needs.

  Attributes:
    beta: decay of the first moment ``mu`` (the momentum ECO writes into).
    init: ``params_f32 -> moments`` (a NamedTuple with a ``mu`` field).
    step: ``(grads, moments, count) -> (moments, direction, preconditioner)``
      with ``count`` the 1-based step number, ``moments.mu`` the updated ``m~``,
      ``direction = P^-1(m~)`` and ``preconditioner`` a tree (like ``grads``) of
      whatever ``precondition`` needs per leaf.
    precondition: ``(preconditioner_leaf, error_leaf) -> P(error_leaf)``.
  """
  beta: float
  init: Callable[[Any], Any]
  step: Callable[[Any, Any, jax.Array], tuple[Any, Any, Any]]
  precondition: Callable[[Any, jax.Array], jax.Array] = diagonal_preconditioner


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
              eps_root: float = 0.0) -> MomentumRule:
  """Adam (the paper's Algorithm 3), matching :func:`optax.scale_by_adam`.

  ``d = m_hat / (sqrt(v_hat + eps_root) + eps)`` with ``m_hat = m~/(1-b1^t)``,
  ``v_hat = v/(1-b2^t)``, so ``D = (1-b1^t) * (sqrt(v_hat + eps_root) + eps)``.
  """

  def init(params):
    return AdamMoments(mu=_zeros(params), nu=_zeros(params))

  def step(grads, moments, count):
    mu = optax.tree.update_moment(grads, moments.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(grads, moments.nu, b2, 2)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    denom = jax.tree.map(lambda v: c1 * (jnp.sqrt(v / c2 + eps_root) + eps), nu)
    direction = jax.tree.map(lambda m, d: m / d, mu, denom)
    return AdamMoments(mu=mu, nu=nu), direction, denom

  return MomentumRule(beta=b1, init=init, step=step)
