"""optax's wrappers for quantized parameters: :class:`MultiSteps`, :func:`apply_if_finite`,
:func:`set_to_zero`, :func:`with_dequantized_params`.

Gradient accumulation. :class:`optax.MultiSteps` builds its accumulator from the params it is initialized
with, and quantized params have another structure than their gradients.
:class:`MultiSteps` is optax's class with an accumulator shaped like the dequantized
params, and updates that mark the micro-steps that do not step as skipped (flags
``KEEP``: :func:`eco_optax.apply_updates` keeps codes and scales); everything else is
optax's: the inner optimizer steps on the mean (or sum) of ``k`` gradients.

Accumulate *before* the optimizer: ``optax.apply_every`` placed after an eco_optax
optimizer would add up new codes, and is refused.

Skipping non-finite steps. :func:`optax.apply_if_finite` answers a rejected step
with zeros shaped like the *gradients* (FP32), and ``lax.cond`` refuses them beside
the new codes of quantized leaves. :func:`apply_if_finite` is optax's wrapper around the
optimizer with those codes passed through it as FP32 arrays shaped like the gradients
(exact).

Freezing leaves. :func:`optax.set_to_zero` answers with float zeros, which
:func:`eco_optax.apply_updates` cannot tell from a float step reaching a quantized
leaf; :func:`set_to_zero` keeps quantized leaves as they are stored.

Gradient transformations before the optimizer. In :func:`optax.chain` every
transformation gets the params the optimizer gets, quantized leaves included; one that
reads them (:func:`optax.add_decayed_weights`) or keeps a state shaped like them
(:func:`optax.trace`) is given them dequantized by :func:`with_dequantized_params`.

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

from eco_optax import quantize as qz
from eco_optax import tree as qtree


class MultiSteps(optax.MultiSteps):
  """:class:`optax.MultiSteps` for parameter trees with quantized leaves.

  Takes the arguments of :class:`optax.MultiSteps`. The accumulated gradients have the
  structure and shapes of :func:`eco_optax.dequantize_params` of the params, and the
  zero updates of the micro-steps that do not step keep the quantized leaves
  (flags ``KEEP``).
  """

  def init(self, params: Any) -> optax.MultiStepsState:
    state = super().init(qtree.zeros_for_quantized(params))
    return state._replace(inner_opt_state=self.inner_opt.init(params))

  def update(self, updates: Any, state: optax.MultiStepsState, params: Any = None,
             **extra_args: Any) -> tuple[Any, optax.MultiStepsState]:
    updates, new_state = super().update(updates, state, params, **extra_args)
    stepped = new_state.gradient_step != state.gradient_step
    return _keep_unless(stepped, updates), new_state


def _keep_unless(stepped: jax.Array, updates: Any) -> Any:
  """``updates`` with the flags of each :class:`~eco_optax.tree.NewCodes` set to ``KEEP``
  where ``stepped`` is false (a wrapper's zeros, which would otherwise read as altered)."""
  return jax.tree.map(
      lambda u: u._replace(flags=jnp.where(stepped, u.flags, qtree.KEEP).astype(jnp.float32))
      if qtree.is_new_codes(u) else u, updates, is_leaf=qtree.is_new_codes)


# The flags a NewCodes carries through apply_if_finite, by their index in the float form
# (index 0, optax's zeros for a rejected step: keep the leaf; the last: any other flags).
_FLAGS_BY_INDEX = (qtree.KEEP, qtree.VALID, jnp.nan, qtree.KEEP, 0.0)


def _codes_as_float(updates: Any) -> Any:
  """``updates`` with each :class:`~eco_optax.tree.NewCodes` as one FP32 array shaped like
  its leaf: ``bits + 2^16 i`` in the first element, ``bits`` elsewhere (exact), with
  ``i`` the index of its flags in ``_FLAGS_BY_INDEX``."""

  def as_float(u):
    if not qtree.is_new_codes(u):
      return u
    first = (0,) * u.bits.ndim
    index = jnp.select([u.flags == qtree.VALID, jnp.isnan(u.flags), u.flags == qtree.KEEP],
                       [1.0, 2.0, 3.0], 4.0)
    bits = u.bits.astype(jnp.float32)
    return bits.at[first].add(index * 2.0**16, out_sharding=jax.typeof(bits).sharding)

  return jax.tree.map(as_float, updates, is_leaf=qtree.is_new_codes)


def _codes_from_float(updates: Any, params: Any) -> Any:
  """The inverse of :func:`_codes_as_float` (zeros become an update that keeps the leaf).

  The scale, which the float form does not carry, is the scale policy's next scale of
  the stored weights again: the one the optimizer stored the codes with.
  """

  def from_float(p, u):
    if not qtree.is_lossy(p):
      return u
    x = u.astype(jnp.uint32)
    # The index sits in the first element; the others are bits below 2^16. Under explicit
    # mesh axes, which refuse a slice of one element of a sharded axis, a maximum reads it.
    index = jnp.max(x >> 16) if qz.has_sharded_type(x) else x[(0,) * x.ndim] >> 16
    flags = jnp.asarray(_FLAGS_BY_INDEX, jnp.float32)[index]
    return qtree.NewCodes((x & 0xFFFF).astype(qtree.new_codes_dtype(p.fmt)), flags,
                          *qz._next_scales(p))

  return jax.tree.map(from_float, params, updates, is_leaf=qtree.is_quantized)


def apply_if_finite(inner: optax.GradientTransformation,
                    max_consecutive_errors: int) -> optax.GradientTransformation:
  """:func:`optax.apply_if_finite` for an eco_optax optimizer (or a chain ending in one).

  Skips a step whose gradients are not all finite (the updates are zeros: codes and
  scales stay as stored, and the optimizer state is kept), until more than
  ``max_consecutive_errors`` come in a row. The state is optax's
  :class:`optax.ApplyIfFiniteState`.

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
    >>> tx = eco.apply_if_finite(eco.adamw(0.5), max_consecutive_errors=3)
    >>> state = tx.init(q)
    >>> updates, state = tx.update({"w": jnp.full((4, 4), jnp.nan)}, state, q)
    >>> bool((eco.apply_updates(q, updates)["w"].values == q["w"].values).all())
    True
    >>> int(state.notfinite_count)
    1
  """

  def float_update(grads, state, params=None):
    updates, state = inner.update(grads, state, params)
    return _codes_as_float(updates), state

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("eco_optax optimizers need params: tx.update(grads, state, params)")
    # optax checks the gradients it is given and makes a rejected step's updates as zeros
    # like them: given in the dtypes of the updates (FP32 float forms of the codes beside
    # bfloat16 or float64 gradients), both branches of its conditional agree. The
    # optimizer steps on the gradients as they came.
    shapes = jax.eval_shape(float_update, grads, state.inner_state, params)[0]
    probe = jax.tree.map(lambda g, u: jnp.asarray(g).astype(u.dtype), grads, shapes)
    tx = optax.apply_if_finite(optax.GradientTransformation(
        inner.init, lambda _, state, params=None: float_update(grads, state, params)),
        max_consecutive_errors)
    updates, state = tx.update(probe, state, params)
    return _codes_from_float(updates, params), state

  return optax.GradientTransformation(
      optax.apply_if_finite(inner, max_consecutive_errors).init, update)


def set_to_zero() -> optax.GradientTransformation:
  """:func:`optax.set_to_zero` for parameter trees with quantized leaves: freezes them.

  The update of a quantized leaf keeps its codes and scale (a
  :class:`~eco_optax.tree.NewCodes` with flags ``KEEP``); plain leaves get zeros, as
  from optax. Give it the leaves to freeze in :func:`optax.multi_transform`.

  Example:
    >>> import jax.numpy as jnp, optax, eco_optax as eco
    >>> q = eco.quantize_params({"frozen": jnp.ones((4, 4)), "w": jnp.ones((4, 4))},
    ...                         eco.fp8_e4m3())
    >>> tx = optax.multi_transform({"train": eco.adamw(0.1), "freeze": eco.set_to_zero()},
    ...                            {"frozen": "freeze", "w": "train"})
    >>> g = {"frozen": jnp.ones((4, 4)), "w": jnp.ones((4, 4))}
    >>> updates, _ = tx.update(g, tx.init(q), q)
    >>> new = eco.apply_updates(q, updates)
    >>> bool((new["frozen"].values == q["frozen"].values).all())
    True
  """

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("eco_optax.set_to_zero needs params to tell the quantized leaves: "
                       "tx.update(grads, state, params)")

    def zero(p, u):
      if not qtree.is_lossy(p):
        return jnp.zeros_like(u)
      return qtree.NewCodes(jnp.zeros_like(p.values, qtree.new_codes_dtype(p.fmt)),
                            jnp.asarray(qtree.KEEP, jnp.float32), p.scale, p.tensor_scale)

    return jax.tree.map(zero, params, updates, is_leaf=qtree.is_quantized), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def with_dequantized_params(
    inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  r"""``inner`` with the params dequantized: for gradient transformations before the optimizer.

  In :func:`optax.chain` each transformation gets the params the eco_optax optimizer
  gets, whose quantized leaves are :class:`~eco_optax.quantize.QuantizedArray`\ s (no
  arithmetic). A transformation before the optimizer that reads the params
  (:func:`optax.add_decayed_weights`, :func:`optax.adaptive_grad_clip`) or keeps a
  state shaped like them (:func:`optax.trace`, :func:`optax.ema`,
  :func:`optax.scale_by_adam`) needs them as arrays shaped like the gradients: this
  wrapper gives ``inner`` ``Q(w)`` in FP32 (:func:`eco_optax.dequantize_params`) at
  ``init`` and at ``update``; the state is ``inner``'s. Under ``jax.jit`` a weight
  ``inner`` does not read is never dequantized, and one it reads is dequantized where
  it is read (no FP32 copy of the weights is kept).

  Example:
    >>> import jax.numpy as jnp, optax, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
    >>> tx = optax.chain(eco.with_dequantized_params(optax.add_decayed_weights(0.1)),
    ...                  eco.adam(0.1))                  # Adam with an L2 penalty
    >>> updates, state = tx.update({"w": jnp.zeros((4, 4))}, tx.init(q), q)
    >>> bool((eco.apply_updates(q, updates)["w"].dequantize() < 1).all())   # decayed
    True
  """
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return inner.init(qtree.dequantize_params(params))

  def update(updates, state, params=None, **extra_args):
    dense = None if params is None else qtree.dequantize_params(params)
    return inner.update(updates, state, dense, **extra_args)

  return optax.GradientTransformationExtraArgs(init, update)
