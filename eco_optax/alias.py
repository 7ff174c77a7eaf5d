"""User-facing ECO optimizers: :func:`sgdm`, :func:`adam`, :func:`adamw`, :func:`muon`, :func:`lion`.

Each returns an ``optax.GradientTransformation`` for a quantized parameter tree
(:func:`eco_optax.quantize_params`); apply its updates with
:func:`eco_optax.apply_updates`. ``mode`` and ``rounding`` select ECO or one of
the paper's baselines (see :mod:`eco_optax.transform`):

=====================================  ==========================================
paper's name                           arguments
=====================================  ==========================================
FP32 / BF16 training                   ``eco.lossless()`` format, or optax itself
low precision with master weights      ``mode="master_weights"``
w/o MW, round to nearest (naive)       ``mode="naive", rounding="nearest"``
w/o MW + SR                            ``mode="naive", rounding="stochastic"``
ECO + RTN (the paper's rule)           ``mode="eco_memory_free", rounding="nearest"``
ECO + SR (the default)                 ``mode="eco"`` (``rounding="stochastic"``)
ECO + RTN, exact rule (same bytes)     ``mode="eco", rounding="nearest"``
=====================================  ==========================================

``rounding=None`` (the default) is stochastic in ECO mode, where it follows master
weights without their copy, and round-to-nearest in the others
(:func:`eco_optax.transform.default_rounding`). ``mode="eco"`` runs the rule that
follows master weights for its rounding (:func:`eco_optax.transform.eco_rule`): the
paper's memory-free injection with stochastic rounding; with round-to-nearest, where
that rule trails master weights (consecutive errors are not alike), the exact rule
(``mode="eco_exact"``), which keeps its last error in the low 10 bits of the FP32
first moment, in the same bytes.

``mu_dtype`` (every optimizer) and ``nu_dtype`` (Adam, AdamW, Muon) store the
moments between steps in low precision (:mod:`eco_optax.moments`): ``jnp.bfloat16``
or ``jnp.float16`` with stochastic rounding, or ``eco.moments.blockwise_8bit()``
(bitsandbytes' block-wise 8-bit). ``None`` keeps FP32. AdamW on FP8 weights then
takes 9 bytes per parameter with FP32 moments, 5 with bfloat16 and about 3.03 with
8-bit moments (:func:`eco_optax.memory_report`). The exact rule needs an FP32 first
moment: with round-to-nearest and a narrower ``mu_dtype``, ``mode="eco"`` runs the
memory-free rule; ``nu_dtype=jnp.bfloat16`` keeps the exact rule in 7 bytes
(``docs/design.md``)::

    eco.adamw(lr, rounding="nearest", nu_dtype=jnp.bfloat16)
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

import jax
import optax

from eco_optax import moments
from eco_optax import quantize as qz
from eco_optax import rules
from eco_optax import transform


def sgdm(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, *,
         weight_decay: float = 0.0, mode: transform.Mode = "eco",
         rounding: Optional[qz.Rounding] = None, seed: int = 0,
         mask: Any = None, mu_dtype: moments.Spec = None) -> optax.GradientTransformation:
  r"""EMA-momentum SGD on quantized weights (paper, Algorithm 2).

  .. math::
    m~ = \beta m + (1-\beta) g,\quad w' = Q((1-\eta\lambda) w - \eta m~),\quad
    m = m~ + \frac{1-\eta\lambda}{\eta}(1 - \tfrac{1}{\beta})\,(w~ - w')

  Example:
    >>> import jax, jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.ones((8, 8))}, eco.int8())
    >>> tx = eco.sgdm(0.1, momentum=0.9)
    >>> state = tx.init(q)
    >>> updates, state = tx.update({"w": jnp.ones((8, 8))}, state, q)
    >>> q = eco.apply_updates(q, updates)
  """
  return transform.error_feedback(rules.sgdm_rule(momentum), learning_rate,
                                  weight_decay, mode, rounding, seed, mask,
                                  moment_formats={"mu": mu_dtype})


def adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, *, weight_decay: float = 1e-4,
          eps_root: float = 0.0, mode: transform.Mode = "eco",
          rounding: Optional[qz.Rounding] = None, seed: int = 0,
          mask: Any = None, mu_dtype: moments.Spec = None,
          nu_dtype: moments.Spec = None) -> optax.GradientTransformation:
  r"""AdamW on quantized weights without a master copy (paper, Algorithm 3).

  With the lossless format it equals :func:`optax.adamw`. Under ECO's memory-free rule
  (stochastic rounding, the default) the error ``e = w~ - Q(w~)`` enters the first
  moment as

  .. math::
    m = m~ + \frac{(1-\beta_1^t)(1-\eta\lambda)}{\eta}\,(1 - \tfrac{1}{\beta_1})
        \left(\sqrt{\hat v} + \epsilon\right) e

  Example:
    >>> import jax, jax.numpy as jnp, optax, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.ones((8, 8)), "b": jnp.zeros(8)}, eco.fp8_e4m3())
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  eco.adamw(1e-3, rounding="stochastic"))
    >>> state = tx.init(q)
    >>> grads = {"w": jnp.ones((8, 8)), "b": jnp.ones(8)}
    >>> updates, state = jax.jit(tx.update)(grads, state, q)
    >>> q = eco.apply_updates(q, updates)

    Moments in bfloat16 (stochastic rounding) or 8 bits, as ``mu_dtype`` of
    :func:`optax.adamw` (any spec of :func:`eco_optax.moments.as_format`):

    >>> tx = eco.adamw(1e-3, rounding="stochastic", mu_dtype=jnp.bfloat16,
    ...                nu_dtype=eco.moments.blockwise_8bit())
    >>> state = tx.init(q)
    >>> updates, state = jax.jit(tx.update)(grads, state, q)
    >>> state.moments.mu["w"].dtype, state.moments.nu["w"].codes.dtype
    (dtype(bfloat16), dtype('uint8'))
  """
  return transform.error_feedback(rules.adam_rule(b1, b2, eps, eps_root),
                                  learning_rate, weight_decay, mode, rounding,
                                  seed, mask,
                                  moment_formats={"mu": mu_dtype, "nu": nu_dtype})


def adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-8, *, eps_root: float = 0.0,
         mode: transform.Mode = "eco", rounding: Optional[qz.Rounding] = None,
         seed: int = 0, mu_dtype: moments.Spec = None,
         nu_dtype: moments.Spec = None) -> optax.GradientTransformation:
  """Adam on quantized weights: :func:`adamw` without weight decay (:func:`optax.adam`)."""
  return transform.error_feedback(rules.adam_rule(b1, b2, eps, eps_root), learning_rate,
                                  None, mode, rounding, seed,
                                  moment_formats={"mu": mu_dtype, "nu": nu_dtype})


def muon(learning_rate: optax.ScalarOrSchedule,
         ns_coeffs: Union[Sequence[float], Sequence[Sequence[float]]] = (3.4445, -4.7750, 2.0315),
         ns_steps: int = 5, beta: float = 0.95, eps: float = 1e-8,
         weight_decay: float = 0.0, mask: Any = None, *,
         nesterov: bool = True,
         preconditioning: Literal["frobenius", "spectral", "aol", "schatten"] = "frobenius",
         adam_b1: float = 0.9, adam_b2: float = 0.999, adam_eps_root: float = 0.0,
         adam_weight_decay: float = 0.0, consistent_rms: float | None = None,
         injection: Literal["polar", "frozen"] = "polar", mode: transform.Mode = "eco",
         rounding: Optional[qz.Rounding] = None, seed: int = 0, mu_dtype: moments.Spec = None,
         nu_dtype: moments.Spec = None) -> optax.GradientTransformation:
  r"""Muon on quantized weights: :func:`optax.contrib.muon` without a master copy.

  2-D leaves take Muon's orthogonalized momentum step ``-eta (s NS(N) + lambda w)``,
  the others AdamW's (``adam_*``, ``eps``, ``nesterov``, one ``learning_rate`` for
  both, as optax's default ``adam_learning_rate=None``); with the lossless format
  it equals :func:`optax.contrib.muon`. ``weight_decay`` and ``mask`` apply to the
  matrices, ``adam_weight_decay`` to the rest (``mask`` is optax's
  ``weight_decay_mask``, named as in :func:`adamw`, :func:`sgdm` and :func:`lion`).
  ``mu_dtype`` stores the momentum of every leaf, ``nu_dtype`` Adam's second moment
  of the other leaves.

  In ECO mode the error ``E = W~ - Q(W~)`` of a quantized matrix enters the
  momentum as ``M = M~ + ((1-eta*lambda)/eta)(1 - 1/beta) P(E)``.
  ``injection="frozen"`` is the blog's first-order rule for updates ``g(X) X h(X)``
  with ``g, h`` frozen; for Muon's ``s X (X^T X)^-1/2`` (``s = sqrt(max(1, n/m))``):

  .. math::
    P(E) = E\,(R^T R)^{1/2},\qquad R = \frac{N}{a\,s}

  where ``N`` is the matrix Newton-Schulz orthogonalizes and ``a = dN/dM~``
  (``R = M~/s`` without nesterov). ``injection="polar"`` (default) inverts the exact
  derivative of the polar factor at ``R`` instead and drops the part of ``E`` that
  changes only the scale of ``N`` (:func:`eco_optax.rules.muon_rule`). Other
  quantized leaves get Adam's (NAdam's) diagonal rule with ``adam_b1``.

  Measured: neither injection makes the memory-free rule beat naive rounding for Muon.
  Muon's step has a fixed size, so a debt held in the momentum can turn the step but
  not lengthen it: entries smaller than half a grid step vanish either way. ``python -m
  benchmarks --quick --optimizer muon``: FP8 val loss naive RTN 3.970, memory-free ECO
  RTN 3.993, naive SR 3.418, ECO SR 3.442 (master weights 3.413); INT4 naive RTN =
  memory-free ECO RTN 4.171, naive SR 3.468, ECO SR 3.553 (MW 3.463). Tuned
  (``consistent_rms=0.2``, peak lr 0.012, default benchmark config; docs/results.md,
  "Muon vs AdamW"), vs FP32 Muon 1.5776: FP8 naive RTN +13.0%, memory-free ECO-RTN
  +13.1%, naive SR +1.1%, ECO-SR +2.6%, master weights +0.9%; INT4 master weights
  +2.3% (AdamW +14.6%). The exact rule (``rounding="nearest"``) follows master weights'
  path in ECO's bytes: each step starts from the stored weights plus the kept error (a
  32x16 regression in FP8, cosine lr from 0.02, 300 steps: loss 0.0049 against 0.0041
  with master weights, 0.0114 memory-free ECO-SR, 1.82 naive RTN; the tuned benchmark
  above: FP8 1.5866 against master weights' 1.5914, INT4 1.5995 against 1.6133). Prefer
  it for Muon without a master copy.

  Example:
    >>> import jax, jax.numpy as jnp, optax, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.ones((8, 16)), "b": jnp.zeros(16)}, eco.fp8_e4m3())
    >>> tx = eco.muon(0.02, weight_decay=0.01, rounding="stochastic")
    >>> state = tx.init(q)
    >>> grads = {"w": jnp.ones((8, 16)), "b": jnp.ones(16)}
    >>> updates, state = jax.jit(tx.update)(grads, state, q)
    >>> q = eco.apply_updates(q, updates)
  """
  rule = rules.muon_rule(beta, ns_coeffs, ns_steps, eps, nesterov=nesterov,
                         preconditioning=preconditioning, consistent_rms=consistent_rms,
                         adam_b1=adam_b1, adam_b2=adam_b2, adam_eps_root=adam_eps_root,
                         injection=injection)

  def decay(params):
    flags = mask(params) if callable(mask) else mask
    flags = jax.tree.map(lambda _: True, params) if flags is None else flags
    return jax.tree.map(
        lambda p, m: (weight_decay if m else 0.0) if rules.is_matrix(p) else adam_weight_decay,
        params, flags)

  return transform.error_feedback(rule, learning_rate, decay, mode, rounding, seed,
                                  moment_formats={"mu": mu_dtype, "nu": nu_dtype})


def lion(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99, *,
         weight_decay: float = 1e-3, mode: transform.Mode = "eco",
         rounding: Optional[qz.Rounding] = None, seed: int = 0,
         mask: Any = None, mu_dtype: moments.Spec = None) -> optax.GradientTransformation:
  r"""Lion on quantized weights: :func:`optax.lion` without a master copy.

  ``w~ = (1-eta*lambda) w - eta sign(b1 m + (1-b1) g)``, ``m = b2 m + (1-b2) g``;
  with the lossless format it equals :func:`optax.lion`. Under ECO's memory-free rule
  ``m = m~ + ((1-eta*lambda)/eta)(1 - 1/b2) (b2/b1) |c| e`` with
  ``c = b1 m + (1-b1) g`` (:func:`eco_optax.rules.lion_rule`, the sign frozen as
  ``c/|c|``). A debt can flip a step's sign, never lengthen it: when ``eta`` is below
  half a grid step that rule equals naive rounding. Measured on a 32x16 regression
  (300 steps, cosine lr): with steps of about one INT8 grid step memory-free ECO-RTN
  ends at 0.195 vs 0.257 for naive RTN (master weights 0.104), FP8 SR 0.158 vs 0.180;
  equal where the steps vanish; INT4 SR at lr 1e-3 1.23 vs 1.18. The exact rule
  (``rounding="nearest"``) follows master weights in ECO's bytes (each step starts from
  the stored weights plus the kept error): on a 32x16 regression in INT8 (cosine lr
  from 3e-3, 300 steps, RTN) 0.0832 against 0.0833 with master weights, 0.0894
  memory-free ECO, 0.330 naive.

  Example:
    >>> import jax, jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.ones((8, 8))}, eco.fp8_e4m3())
    >>> tx = eco.lion(1e-4)
    >>> state = tx.init(q)
    >>> updates, state = tx.update({"w": jnp.ones((8, 8))}, state, q)
    >>> q = eco.apply_updates(q, updates)
  """
  return transform.error_feedback(rules.lion_rule(b1, b2), learning_rate, weight_decay,
                                  mode, rounding, seed, mask,
                                  moment_formats={"mu": mu_dtype})
