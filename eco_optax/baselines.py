r"""The paper's baselines, beside ECO: naive rounding and master weights.

Both are leaf steps for :mod:`eco_optax.step`, selected by ``mode`` in
:func:`eco_optax.transform.error_feedback` and the optimizers of
:mod:`eco_optax.alias`:

* ``"naive"`` (:func:`naive_step`): ``w' = Q(w - eta (d + lambda w))``, the
  rounding error dropped: the paper's "w/o MW" rows (``rounding="stochastic"``:
  "w/o MW + SR").
* ``"master_weights"`` (:func:`master_weights_step`): an FP32 master copy
  ``w_MW`` lives in the optimizer state and steps as in full precision;
  ``w' = Q(w_MW)`` is stored for the forward pass ("w/ MW"). The copy costs 4 bytes
  per parameter: it is the point of the baseline.
"""

from __future__ import annotations

import jax

from eco_optax import rules


def naive_step(rule: rules.LeafRule, eta: jax.Array, decay, b):
  """``w' = Q(Q(w) - eta (d + lambda Q(w)))``; returns ``(codes, optax state, None)``."""
  direction, state = rule.transform.update(b.grad, b.state)
  codes, _ = b.quantize(b.stored - eta * (direction + decay * b.stored))
  return codes, state, None


def master_weights_step(rule: rules.LeafRule, eta: jax.Array, decay, b):
  """``w_MW <- w_MW - eta (d + lambda w_MW)``, ``w' = Q(w_MW)``.

  ``b.extra`` is the FP32 master copy; returns ``(codes, optax state, new master)``.
  """
  direction, state = rule.transform.update(b.grad, b.state)
  master = b.extra - eta * (direction + decay * b.extra)
  codes, _ = b.quantize(master)
  return codes, state, master
