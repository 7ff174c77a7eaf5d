"""User-facing ECO optimizers: :func:`sgdm`, :func:`adam`, :func:`adamw`.

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
ECO + RTN                              ``mode="eco", rounding="nearest"``
ECO + SR                               ``mode="eco", rounding="stochastic"``
=====================================  ==========================================
"""

from __future__ import annotations

from typing import Any

import optax

from eco_optax import quantize as qz
from eco_optax import rules
from eco_optax import transform


def sgdm(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, *,
         weight_decay: float = 0.0, mode: transform.Mode = "eco",
         rounding: qz.Rounding = "nearest", seed: int = 0,
         mask: Any = None) -> optax.GradientTransformation:
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
                                  weight_decay, mode, rounding, seed, mask)


def adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, *, weight_decay: float = 1e-4,
          eps_root: float = 0.0, mode: transform.Mode = "eco",
          rounding: qz.Rounding = "nearest", seed: int = 0,
          mask: Any = None) -> optax.GradientTransformation:
  r"""AdamW on quantized weights without a master copy (paper, Algorithm 3).

  With the lossless format it equals :func:`optax.adamw`. In ECO mode the error
  ``e = w~ - Q(w~)`` enters the first moment as

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
  """
  return transform.error_feedback(rules.adam_rule(b1, b2, eps, eps_root),
                                  learning_rate, weight_decay, mode, rounding,
                                  seed, mask)


def adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-8, *, eps_root: float = 0.0,
         mode: transform.Mode = "eco", rounding: qz.Rounding = "nearest",
         seed: int = 0) -> optax.GradientTransformation:
  """Adam on quantized weights: :func:`adamw` without weight decay."""
  return adamw(learning_rate, b1, b2, eps, weight_decay=0.0, eps_root=eps_root, mode=mode,
               rounding=rounding, seed=seed)
