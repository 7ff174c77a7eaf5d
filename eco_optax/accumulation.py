"""Gradient accumulation for quantized parameters: :class:`MultiSteps`.

:class:`optax.MultiSteps` builds its accumulator from the params it is initialized
with, and quantized params have another structure than their gradients.
:class:`MultiSteps` is optax's class with an accumulator shaped like the dequantized
params; everything else is optax's: the inner optimizer steps on the mean (or sum)
of ``k`` gradients, and the updates of the other micro-steps are zeros, which
:func:`eco_optax.apply_updates` applies as "keep" (codes and scales unchanged).

Accumulate *before* the optimizer: ``optax.apply_every`` placed after an eco_optax
optimizer would add up new codes, and is refused.

Example:
  >>> import jax, jax.numpy as jnp, eco_optax as eco
  >>> q = eco.quantize_params({"w": jnp.ones((8, 8))}, eco.fp8_e4m3())
  >>> tx = eco.MultiSteps(eco.adamw(1e-2), every_k_schedule=2)
  >>> state = tx.init(q)
  >>> for i in range(2):
  ...   updates, state = tx.update({"w": jnp.full((8, 8), 0.1 * i)}, state, q)
  ...   q = eco.apply_updates(q, updates)
  >>> int(state.gradient_step)
  1
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from eco_optax import tree as qtree


class MultiSteps(optax.MultiSteps):
  """:class:`optax.MultiSteps` for parameter trees with quantized leaves.

  Takes the arguments of :class:`optax.MultiSteps`. Only ``init`` differs: the
  accumulated gradients have the structure and shapes of
  :func:`eco_optax.dequantize_params` of the params.
  """

  def init(self, params: Any) -> optax.MultiStepsState:
    dense = jax.tree.map(
        lambda p: jnp.zeros(p.shape, jnp.float32) if qtree.is_quantized(p) else p,
        params, is_leaf=qtree.is_quantized)
    state = super().init(dense)
    return state._replace(inner_opt_state=self.inner_opt.init(params))
