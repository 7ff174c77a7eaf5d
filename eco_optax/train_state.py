"""Flax's ``TrainState`` for quantized parameters.

:class:`flax.training.train_state.TrainState` applies updates with
:func:`optax.apply_updates`, which adds them; the updates of quantized leaves are
their new codes (:mod:`eco_optax.step`) and must be copied by
:func:`eco_optax.apply_updates`. :class:`TrainState` is the same class with that one
change.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, eco_optax as eco
  >>> from eco_optax.train_state import TrainState
  >>> model = nn.Dense(4)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  >>> state = TrainState.create(apply_fn=model.apply,
  ...                           params=eco.quantize_params(params, eco.fp8_e4m3()),
  ...                           tx=eco.adamw(1e-2, rounding="stochastic"))
  >>> loss = lambda p, x: jnp.mean(state.apply_fn({"params": p}, x) ** 2)
  >>> state = state.apply_gradients(grads=eco.grad(loss)(state.params, jnp.ones((2, 8))))
  >>> int(state.step), state.params["kernel"].values.dtype
  (1, dtype(float8_e4m3fn))
"""

from __future__ import annotations

from flax.training import train_state

from eco_optax import tree as qtree


class TrainState(train_state.TrainState):
  """:class:`flax.training.train_state.TrainState` with :func:`eco_optax.apply_updates`.

  ``params`` may hold :class:`~eco_optax.quantize.QuantizedArray` leaves; ``grads``
  have the structure of the dequantized params (:func:`eco_optax.grad`).
  """

  def apply_gradients(self, *, grads, **kwargs):
    """Updates ``step``, ``params`` and ``opt_state`` (and ``**kwargs``), as Flax's."""
    overwrite = train_state.OVERWRITE_WITH_GRADIENT
    if overwrite in grads:
      grads_with_opt, params_with_opt = grads["params"], self.params["params"]
    else:
      grads_with_opt, params_with_opt = grads, self.params
    updates, new_opt_state = self.tx.update(grads_with_opt, self.opt_state, params_with_opt)
    new_params = qtree.apply_updates(params_with_opt, updates)
    if overwrite in grads:
      new_params = {"params": new_params, overwrite: grads[overwrite]}
    return self.replace(step=self.step + 1, params=new_params, opt_state=new_opt_state,
                        **kwargs)
