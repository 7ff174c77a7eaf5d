r"""ECO: the error feedback that updates quantized weights without a master copy.

Per quantized leaf, in FP32 (the paper's Algorithms 2-3)::

    m~, d  = the optimizer's moment update and direction (optax), d = P^-1(m~)
    target = Q(w) - eta * (d + lambda * Q(w))          (the optimizer's step)
    w'     = Q(target)                                 (stored weights, RTN or SR)
    e      = target - Q(w')                            (quantization error)
    m      = m~ + alpha * P(e),   alpha = ((1 - eta*lambda) / eta) * (1 - 1/beta)

Derivation. Ask the stored weights to trail the master weights by exactly the
current error, ``w_t = w_t^MW - e_t``, and the momentum to carry the matching debt,
``m_t = m_t^MW + delta_t``. The next step gives ``w~ = w^MW_{t+1} - (1 - eta*lambda)
e_t - eta * beta * P^-1(delta_t)`` (to first order when ``P`` depends on ``m``), the
master-weight iterate exactly when ``delta_t = -c_t P_t(e_t) / beta`` with
``c = (1 - eta*lambda) / eta``, in the units of the step that wrote it (``c_t``,
``P_t``). Keeping that across the momentum decay ``m <- beta*m + ...`` needs the
injection ``delta_{t+1} - beta*delta_t = c_t P_t(e_t) - c_{t+1} P_{t+1}(e_{t+1}) /
beta``. With consecutive errors aligned, ``e_t ~ e_{t+1}`` (the paper's Figure 3),
and the units taken as constant, it is ``alpha P(e)`` above and costs no memory
(:func:`eco_step`). The exact injection needs ``e_t``, and paid back through the
momentum it moves the next target by ``eta_t P_t^-1(c_{t-1} P_{t-1}(e_t))``, which is
the ``(1 - eta_t*lambda) e_t`` the master-weight iterate needs only in constant units
(under warm-up ``c`` halves from the first step to the second, and Adam's ``P`` moves
with ``v`` and the bias correction ``1 - b1^t``). The exact rule (:func:`eco_exact_step`)
pays it at once instead: it adds ``e_t`` to the weights the step starts from, with
``e_t`` kept in the low 10 bits of the FP32 momentum (a 10-bit count of 1/512 grid
steps; the momentum keeps 14 significant bits: memory-free ECO's bytes,
:func:`eco_optax.step.join_momentum`), so that ``Q(w) + e`` is the master copy at every
step. Under round-to-nearest the errors of a weight that does not move for several steps drift
(``e_{t+1} - e_t`` is the step that vanished), and the memory-free rule then lets
the stored weights trail the master path by about ``beta/(1-beta)`` half grid steps;
the exact rule keeps them within half a step. The memory-free rule keeps the
constant units on purpose: with ``e_t`` unknown, the difference ``c_{t-1}
P(e_{t+1} - e_t)`` of a units-kept memory-free rule grows with ``c_{t-1}/c_t``
during warm-up and, under stochastic rounding (independent errors), injects noise
(measured on the benchmark LM: INT4 ECO-SR +61% against master weights instead of
+4.7%, ``docs/design.md``).

``mode="eco"`` takes the exact rule with round-to-nearest (and an FP32 ``mu``) and the
memory-free rule with stochastic rounding (:func:`eco_rule`); ``"eco_exact"`` and
``"eco_memory_free"`` name one rule whatever the rounding. The baselines (naive
rounding, master weights) are in :mod:`eco_optax.baselines`; :func:`error_feedback`
picks the leaf step by ``mode``, and :mod:`eco_optax.step` runs it in one pass per leaf.

Guards. ``eta = 0`` (warm-up from zero, annealing to zero) makes ``alpha``
undefined: no error is injected on such steps. A non-finite gradient, learning
rate or moment turns the leaf's weights into NaN (its scale, :func:`eco_optax.apply_updates`)
as it would turn FP32 weights into NaN in optax: the fault shows. Wrap the
optimizer in :func:`eco_optax.apply_if_finite` to skip such steps instead.
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from eco_optax import baselines
from eco_optax import moments as mom
from eco_optax import quantize as qz
from eco_optax import rules
from eco_optax import step
from eco_optax.step import Block, ErrorFeedbackState  # noqa: F401 (re-exported)

Mode = Literal["eco", "eco_memory_free", "eco_exact", "master_weights", "naive"]
MODES = ("eco", "eco_memory_free", "eco_exact", "master_weights", "naive")


def payback(eta: jax.Array, decay) -> jax.Array:
  """``(1 - eta*lambda) / eta``, and 0 where ``eta <= 0`` (no debt can be expressed)."""
  return jnp.where(eta > 0, (1 - eta * decay) / jnp.where(eta > 0, eta, 1.0), 0.0)


def _with_momentum(rule: rules.LeafRule, state, change: Callable[[jax.Array], jax.Array]):
  """``state`` with its momentum ``mu`` replaced by ``change(mu)``."""
  moments = rule.unpack(state)
  moments["mu"] = change(moments["mu"])
  return rule.pack(state.count, moments)


def _inject(rule: rules.LeafRule, state, delta: jax.Array):
  """``state`` with ``delta`` added to its momentum ``mu``."""
  return _with_momentum(rule, state, lambda mu: mu + delta)


# The most an upward jump of the learning rate may overpay the debt the momentum carries.
JUMP_OVERPAYMENT = 2.0


def _rescale_momentum(rule: rules.LeafRule, state, eta: jax.Array, eta_before: jax.Array):
  """``state`` with its momentum ``mu`` times ``min(1, 2 eta_before / eta)``.

  The momentum carries debts written in units of ``1 / eta_before`` and pays them in
  ``eta``'s: a rate that jumps up ``r`` times (a warm restart, a piecewise-constant
  schedule) would pay them ``r`` times over, and a stochastic rounding error is a
  grid step whatever the rate (thousands of grid steps after a warm restart).
  Beyond twice the rate the debt was written at (:data:`JUMP_OVERPAYMENT`), the
  momentum is scaled down with it; a warm-up (``eta_{t-1} = 0``, then at most 2x a
  step) and any decreasing rate leave it as it is.
  """
  limit = JUMP_OVERPAYMENT * eta_before
  factor = jnp.where((eta_before > 0) & (eta > limit), limit / jnp.where(eta > 0, eta, 1.0), 1.0)
  return _with_momentum(rule, state, lambda mu: mu * factor)


def eco_step(rule: rules.LeafRule, eta: jax.Array, decay, b: Block):
  r"""ECO on one block of a quantized leaf (paper, Algorithms 2-3).

  .. math::
    \tilde w = Q(w) - \eta (d + \lambda Q(w)),\quad w' = Q(\tilde w),\quad
    e = \tilde w - w',\quad
    m = \tilde m + \frac{1 - \eta\lambda}{\eta}\Big(1 - \frac{1}{\beta}\Big) P(e)

  A learning rate more than twice the one the momentum's debt was written at
  scales the momentum down first (:func:`_rescale_momentum`).

  Returns:
    ``(codes of w', optax state with the new momentum, None)``.
  """
  before = _rescale_momentum(rule, b.state, eta, b.eta_before)
  direction, state = rule.transform.update(b.grad, before)       # m~, d = P^-1(m~)
  target = b.stored - eta * (direction + decay * b.stored)
  codes, new_w = b.quantize(target)
  error = jnp.where((eta > 0) & jnp.isfinite(target), target - new_w, 0.0)
  alpha = payback(eta, decay) * (1 - 1 / rule.beta)
  return codes, _inject(rule, state, alpha * rule.precondition(before, state, b.grad, error)), None


def eco_exact_step(rule: rules.LeafRule, eta: jax.Array, decay, b: Block):
  r"""ECO's exact rule on one block: the kept previous error ``e_t`` paid back in full.

  .. math::
    \tilde w = \big(Q(w) + e_t\big) - \eta \big(d + \lambda (Q(w) + e_t)\big),\quad
    w' = Q(\tilde w),\quad e_{t+1} = \tilde w - w'

  ``Q(w) + e_t`` is the master copy: the target is the master-weight iterate at every
  step, and the momentum is the optimizer's own. This is the exact injection of the
  module docstring paid back at once: the debt ``c_{t-1} P_{t-1}(e_t)`` the momentum
  would carry moves the next target by ``eta_t P_t^{-1}`` of it, which is
  ``(1 - eta_t lambda) e_t`` only in constant units; adding ``e_t`` to the weights
  the step starts from needs neither ``P_{t-1}`` nor the units, and holds for any
  direction (Lion's sign, Muon's orthogonalized matrices) as for Adam's and SGDM's.
  ``e_{t+1}`` is kept as :func:`eco_optax.step.encode_error` counts it (1/512 of the
  grid step at its code, rounded stochastically), read back beside that code in the
  scale it was written in.

  Returns:
    ``(codes of w', optax state, e_{t+1} as kept)``.
  """
  direction, state = rule.transform.update(b.grad, b.state)
  master = b.stored + b.extra
  target = master - eta * (direction + decay * master)
  codes, new_w = b.quantize(target)
  error = jnp.where(jnp.isfinite(target), target - new_w, 0.0)
  return codes, state, b.encode_error(error)


def default_rounding(mode: Mode) -> qz.Rounding:
  """The rounding of the new weights when none is given: ``"stochastic"`` for ECO's
  ``"eco"`` and ``"eco_memory_free"``, ``"nearest"`` for the others.

  The memory-free rule assumes consecutive errors alike; stochastic rounding makes
  them independent and zero-mean, which the momentum averages away, and with it ECO
  follows master weights (benchmark LM, AdamW: FP8 -1.7%, INT4 +3.1% of master
  weights, ``docs/results.md``). The other modes round to nearest: the paper's
  master-weight and naive baselines, and the exact rule, which keeps its
  round-to-nearest errors (``docs/design.md``).
  """
  return "stochastic" if mode in ("eco", "eco_memory_free") else "nearest"


def eco_rule(mode: Mode, rounding: qz.Rounding, moment_formats: Mapping[str, mom.MomentFormat]
             ) -> Mode:
  """The rule ``mode="eco"`` runs: ``"eco_exact"`` for round-to-nearest with an FP32 first
  moment, else ``"eco_memory_free"``; any other mode as it is.

  Both take the same bytes. With stochastic rounding the memory-free rule follows master
  weights (benchmark LM: FP8 -1.7% of them). With round-to-nearest it trails them
  (+8.9%; behind naive rounding in some runs at FP8 and peak rate 1e-2), because the
  error of a weight that does not move drifts; the exact rule keeps that error in the
  low 10 bits of the FP32 ``mu`` and follows master weights (FP8 -0.4%, INT4 +0.9%),
  for about 1.05x the memory-free rule's step time (``docs/results.md``,
  ``docs/benchmarks.md``). A narrow ``mu`` (bfloat16, 8-bit) has no room for it, and
  takes the memory-free rule.
  """
  if mode != "eco":
    return mode
  return "eco_exact" if rounding == "nearest" and "mu" not in moment_formats else "eco_memory_free"


MODE_STEPS = {
    "eco_memory_free": step.Mode(eco_step, debt_eta=True),
    "eco_exact": step.Mode(eco_exact_step, extra="error"),
    "naive": step.Mode(baselines.naive_step),
    "master_weights": step.Mode(baselines.master_weights_step, extra="master"),
}


def _moment_formats(rule: rules.MomentumRule,
                    specs: Optional[Mapping[str, mom.Spec]]) -> dict[str, mom.MomentFormat]:
  """``{field: format}`` for the fields of ``rule``'s moments not stored in FP32."""
  fields = rule.moments._fields
  unknown = sorted(set(specs or {}) - set(fields))
  if unknown:
    raise ValueError(f"moment_formats: unknown moment fields {unknown}; this rule's "
                     f"moments are {list(fields)}")
  formats = {name: mom.as_format(spec, nonnegative=name in rule.nonnegative, name=name)
             for name, spec in (specs or {}).items()}
  return {name: fmt for name, fmt in formats.items() if fmt is not None}


def error_feedback(
    rule: rules.MomentumRule,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay=None,
    mode: Mode = "eco",
    rounding: Optional[qz.Rounding] = None,
    seed: int = 0,
    mask=None,
    *,
    moment_formats: Optional[Mapping[str, mom.Spec]] = None,
) -> optax.GradientTransformation:
  r"""Steps quantized weights with ``rule``, paying rounding errors back via momentum.

  Args:
    rule: the optimizer's momentum rule, e.g. :func:`eco_optax.rules.adam_rule`.
    learning_rate: ``eta``: a float or an optax schedule of the step count.
    weight_decay: ``lambda`` of decoupled weight decay ``w <- (1 - eta*lambda) w``;
      a callable of the dequantized params returning per-leaf floats; or ``None``
      (no decay term, as :func:`optax.adam`).
    mode: ``"eco"`` (ECO: the rule :func:`eco_rule` picks for the rounding),
      ``"eco_memory_free"`` (the paper's injection, :func:`eco_step`), ``"eco_exact"``
      (:func:`eco_exact_step`), ``"naive"`` or ``"master_weights"``
      (:mod:`eco_optax.baselines`).
    rounding: ``"nearest"`` (round half to even) or ``"stochastic"`` (unbiased);
      ``None``: :func:`default_rounding` of ``mode`` (stochastic for ECO, nearest for
      the others).
    seed: seed of the PRNG key kept in the state for stochastic rounding.
    mask: as ``mask`` in :func:`optax.adamw`: a tree of booleans with the structure
      of the dequantized params, or a callable returning one; decay only where True.
    moment_formats: storage of the moments between steps, by field (``"mu"``;
      ``"nu"`` for Adam and Muon): ``None``/``jnp.float32`` (FP32, default),
      ``jnp.bfloat16``, ``jnp.float16`` or a format of :mod:`eco_optax.moments`.

  Returns:
    An ``optax.GradientTransformation``. ``update(grads, state, params)`` needs the
    quantized ``params``; its updates of quantized leaves are their new codes
    (:mod:`eco_optax.step`): apply them with :func:`eco_optax.apply_updates`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, eco_optax as eco
    >>> from eco_optax import rules, transform
    >>> q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
    >>> tx = transform.error_feedback(rules.sgdm_rule(0.9), learning_rate=0.1)
    >>> state = tx.init(q)
    >>> grads = {"w": jnp.full((4, 4), 0.01)}
    >>> updates, state = jax.jit(tx.update)(grads, state, q)
    >>> q = eco.apply_updates(q, updates)

    Adam with bfloat16 first and 8-bit second moments:

    >>> tx = transform.error_feedback(
    ...     rules.adam_rule(), learning_rate=1e-3,
    ...     moment_formats={"mu": jnp.bfloat16, "nu": eco.moments.blockwise_8bit()})
    >>> state = tx.init(q)
    >>> state.moments.mu["w"].dtype, state.moments.nu["w"].codes.dtype
    (dtype(bfloat16), dtype('uint8'))
    >>> updates, state = jax.jit(tx.update)(grads, state, q)
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  rounding = default_rounding(mode) if rounding is None else rounding
  if rounding not in qz.ROUNDINGS:
    raise ValueError(f"rounding must be one of {qz.ROUNDINGS}, got {rounding!r}")
  formats = _moment_formats(rule, moment_formats)
  mode = eco_rule(mode, rounding, formats)
  return step.quantized_optimizer(
      rule, MODE_STEPS[mode], learning_rate, weight_decay, mask, rounding, seed, formats,
      check_beta=mode.startswith("eco"))
