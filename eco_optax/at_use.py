"""A loss of quantized weights, each dequantized where the loss reads it.

:func:`eco_optax.value_and_grad` differentiates ``fun(dense_params)`` at the
dequantized weights ``Q(w) = s * c``. Dequantized up front, every FP32 weight would be
computed before the forward pass and kept for the backward pass: the model in FP32
beside its codes, the memory ECO saves. Here ``fun`` is traced to a jaxpr once and
evaluated with each quantized weight left as its codes until an equation reads it:

* a ``dot_general`` of a weight (a dense layer, an einsum, also after an ``astype`` or a
  transpose of the weight) runs as :func:`_quantized_dot`: its forward pass
  dequantizes the weight right before the product (a large weight in slices of a free
  axis); its backward pass saves only the codes and dequantizes them again in slices
  ``K_j`` of a contracted axis, one after the other, ``dx[..., K_j] = ct . Q(w)[K_j]``
  (each element the same dot product as without slices), and ``dW = x^T ct`` from the
  saved input;
* nested ``jax.jit`` is inlined; ``jax.checkpoint`` and ``lax.scan`` (whose stacked
  weights are sliced with their codes) run again with their weights at use;
* any other use (a gather from an embedding, a convolution, a weight penalty, a weight
  carried through a scan, products under explicit mesh axes) reads the whole
  dequantized weight, :func:`_dense`.

On CPU each dequantization is also made to wait for the value it is used with (the
product's other operand, the cotangent, the slice before): XLA:CPU's default scheduler
runs an instruction as soon as its operands are ready, and would otherwise
dequantize every weight at the start of the step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
from jax.extend.core import Literal
from jax.extend.core.primitives import (convert_element_type_p, custom_vjp_call_p,
                                       dot_general_p, jit_p, remat_p, scan_p, transpose_p)
import jax.numpy as jnp

from eco_optax import quantize as qz

# FP32 bytes of one slice of a weight dequantized in the backward pass and in the
# forward pass, and the most slices per weight (each one more product in the compiled
# step: slicing the forward pass of the benchmark MLP's 4 MiB weights in four made its
# train step 4% slower on CPU, for no less memory at peak).
SLICE_BYTES = 1 << 20
FORWARD_SLICE_BYTES = 8 << 20
MAX_SLICES = 8

# The first operand of every _dense call: an empty array of a shape of its own, by which
# the checkpoint policy tells these calls apart (a policy sees operand shapes only).
_DENSE_MARK = (0, 0xEC0)


@jax.custom_vjp
def _dense(mark: jax.Array, q: qz.QuantizedArray, delta: jax.Array) -> jax.Array:
  """``Q(w) + delta`` in ``delta``'s dtype: the whole weight, for a use other than a
  product; the gradient flows to ``delta``."""
  del mark
  return qz.dequantize(q, delta.dtype) + delta


_dense.defvjp(lambda mark, q, delta: (_dense(mark, q, delta), None),
              lambda _, g: (None, None, g))


def save_all_but_dense(prim, *avals, **_) -> bool:
  """``jax.checkpoint`` policy: save every residual but the outputs of :func:`_dense`.

  Whole FP32 weights are recomputed in the backward pass from the stored codes; the
  activations are saved. (JAX's ``save_anything_except_these_names`` can't express
  it: a name marks the last operation of the dequantization, whose inputs, FP32
  arrays the size of the weights, would then be saved instead.)
  """
  return not (prim is custom_vjp_call_p and avals and avals[0].shape == _DENSE_MARK)


def _after(anchor: jax.Array) -> jax.Array:
  """FP32 one, computed from an element of ``anchor``: what is multiplied by it waits
  for ``anchor`` (on CPU; elsewhere a constant one). Exact for any ``anchor``."""
  if jax.default_backend() != "cpu" or anchor.size == 0:
    return jnp.ones((), jnp.float32)
  return qz.always_holds(anchor).astype(jnp.float32)


def _dequantize_after(q: qz.QuantizedArray, anchor: jax.Array, dtype) -> jax.Array:
  """``Q(w)`` in ``dtype``, computed after ``anchor``."""
  one = _after(anchor)
  if q.fmt.lossless:
    return qz.dequantize_with_scale(q, None, dtype) * one.astype(dtype)
  return qz.dequantize_with_scale(q, q.effective_scale * one, dtype)


class _Weight(NamedTuple):
  """A quantized weight as the loss sees it, not computed yet: ``Q(w) + delta`` (in
  ``delta``'s dtype), cast by ``ops`` in order (``(convert_element_type_p, params)``),
  transposed by ``perm`` (``None``: as stored)."""
  q: qz.QuantizedArray
  delta: jax.Array
  ops: tuple = ()
  perm: Optional[tuple[int, ...]] = None


def _is_float_cast(eqn) -> bool:
  """A cast of a weight to a float dtype: applied to its dequantized slices."""
  return (eqn.primitive is convert_element_type_p and eqn.params.get("sharding") is None
          and jnp.issubdtype(eqn.params["new_dtype"], jnp.floating))


def _viewed(dense: jax.Array, ops: tuple, perm: Optional[tuple[int, ...]]) -> jax.Array:
  """The weight the loss sees, from the dense stored one: cast, then transposed."""
  for prim, params in ops:
    dense = prim.bind(dense, **dict(params))
  return dense if perm is None else jnp.transpose(dense, perm)


class _Product(NamedTuple):
  """A ``dot_general`` equation with one weight operand (static)."""
  params: tuple            # the equation's parameters, as items
  weight_first: bool       # the weight is the left operand
  ops: tuple               # the weight as the loss sees it: _Weight.ops
  perm: Optional[tuple[int, ...]]   # ... and _Weight.perm
  dense: Any               # the type of the stored weight, dequantized
  x_axis: int              # backward: the sliced contracted axis of the other operand,
  w_axis: int              # ... and of the stored weight,
  bounds: tuple            # ... its slices ((start, stop), ...)
  out_axis: int            # forward: the sliced output axis,
  w_free_axis: int         # ... the weight's free axis it comes from (stored),
  free_bounds: tuple       # ... its slices

  def __call__(self, x, w):
    lhs, rhs = (w, x) if self.weight_first else (x, w)
    return dot_general_p.bind(lhs, rhs, **dict(self.params))

  def view(self, dense: jax.Array) -> jax.Array:
    return _viewed(dense, self.ops, self.perm)


def _slices(q: qz.QuantizedArray, axis: int, nbytes: int = SLICE_BYTES) -> tuple:
  """Slices of ``q`` along ``axis``: about ``nbytes`` of FP32 each, at most
  ``MAX_SLICES``, on scale-group bounds."""
  n = q.values.shape[axis]
  group = 1
  if q.fmt.scaling == "block" and q.fmt.axis % q.values.ndim == axis % q.values.ndim:
    group = q.fmt.block_size
  count = min(MAX_SLICES, n // group, max(1, 4 * q.values.size // nbytes))
  if count <= 1:
    return ((0, n),)
  step = -(-n // count // group) * group
  return tuple((a, min(a + step, n)) for a in range(0, n, step))


def _product(eqn, w: _Weight, x: jax.Array, weight_first: bool) -> Optional[_Product]:
  """The :class:`_Product` of ``eqn`` if :func:`_quantized_dot` can run it."""
  (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
  w_c, x_c, w_b = (lhs_c, rhs_c, lhs_b) if weight_first else (rhs_c, lhs_c, rhs_b)
  if w_b or not w_c:
    return None
  perm = w.perm or tuple(range(w.q.values.ndim))
  free = [a for a in range(len(perm)) if a not in w_c]
  # The output holds the left operand's free axes, then the right one's.
  out_axis = 0 if weight_first else x.ndim - len(x_c)
  w_free_axis = perm[free[0]] if free else 0
  return _Product(tuple(sorted(eqn.params.items())), weight_first, w.ops, w.perm,
                  jax.typeof(w.delta), x_c[0], perm[w_c[0]],
                  _slices(w.q, perm[w_c[0]]), out_axis, w_free_axis,
                  _slices(w.q, w_free_axis, FORWARD_SLICE_BYTES) if free else ((0, 0),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _quantized_dot(product: _Product, x: jax.Array, q: qz.QuantizedArray,
                   delta: jax.Array) -> jax.Array:
  """``y = x . Q(w)``, the ``dot_general`` of ``product`` (static) with the weight
  ``Q(w) + delta``; ``delta`` is zero and receives the gradient.

  Forward: ``Q(w)`` dequantized after ``x``; a weight of more than
  ``FORWARD_SLICE_BYTES`` in FP32 in slices ``F_j`` of a free axis, ``y[..., F_j] = x .
  Q(w)[F_j]``, each after the one before. Backward, saving ``x`` and the codes:
  ``dx[..., K_j] = ct . Q(w)[K_j]`` over slices ``K_j`` of a contracted axis, each
  after the one before, then ``dW = x^T ct``.
  """
  return _dot_fwd(product, x, q, delta)[0]


def _dot_fwd(product, x, q, delta):
  whole = len(product.free_bounds) == 1
  pieces, anchor = [], x
  for start, stop in product.free_bounds:
    part = q if whole else qz.slice_along(q, product.w_free_axis, start, stop)
    anchor = product(x, product.view(_dequantize_after(part, anchor, delta.dtype)))
    pieces.append(anchor)
  return (anchor if whole else jnp.concatenate(pieces, axis=product.out_axis)), (x, q)


def _dot_bwd(product, residuals, ct):
  x, q = residuals
  pieces, anchor = [], ct
  for start, stop in product.bounds:
    w = product.view(_dequantize_after(qz.slice_along(q, product.w_axis, start, stop),
                                       anchor, product.dense.dtype))
    x_piece = jax.lax.slice_in_dim(x, start, stop, axis=product.x_axis)
    anchor = jax.linear_transpose(lambda xp: product(xp, w), x_piece)(ct)[0]
    pieces.append(anchor)
  # The weight's gradient comes last: the optimizer's step of the weight, which
  # overwrites the codes, then waits for their last read (else XLA copies them), and
  # the step runs before the gradient of the layer below exists.
  ct = ct * _after(anchor).astype(ct.dtype)
  dw = jax.linear_transpose(lambda d: product(x, product.view(d)), product.dense)(ct)[0]
  return jnp.concatenate(pieces, axis=product.x_axis), None, dw


_quantized_dot.defvjp(_dot_fwd, _dot_bwd)


def _is_weight(x: Any) -> bool:
  return isinstance(x, _Weight)


def _dense_of(w: _Weight, mark: jax.Array) -> jax.Array:
  return _viewed(_dense(mark, w.q, w.delta), w.ops, w.perm)


def _bind(eqn, invals: list) -> list:
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


def _is_plain_jit(eqn) -> bool:
  """A nested ``jax.jit`` without shardings of its own (``jnp.einsum`` is one): inlined."""
  return eqn.primitive is jit_p and not any(
      isinstance(s, jax.sharding.Sharding)
      for s in (*eqn.params["in_shardings"], *eqn.params["out_shardings"]))


def _split(values: list) -> tuple[list, Callable[[list], list]]:
  """``values`` as arrays (a weight as its codes and offset) and the function that
  rebuilds them: to pass weights through a JAX transformation."""
  arrays = [(v.q, v.delta) if _is_weight(v) else v for v in values]

  def rebuild(arrays):
    return [_Weight(*a, v.ops, v.perm) if _is_weight(v) else a
            for v, a in zip(values, arrays)]

  return arrays, rebuild


def _stacked(w: Any, length: int) -> bool:
  """Whether ``w`` is a weight that a scan over ``length`` steps can slice: a stack
  (every array of it with ``length`` matrices, no transpose) whose format counts its
  scale axis from the end."""
  return (_is_weight(w) and w.perm is None and w.q.fmt.axis < 0
          and all(jnp.ndim(a) > 1 and a.shape[0] == length
                  for a in jax.tree.leaves((w.q, w.delta))))


def _scan(eqn, invals: list, mark: jax.Array) -> Optional[list]:
  """A ``lax.scan`` over layers: each weight of ``xs`` (a stack) is sliced with its
  codes, each weight among the constants is used as it is; None where a weight is
  carried."""
  p = eqn.params
  consts, carry, xs = (invals[:p["num_consts"]],
                       invals[p["num_consts"]:p["num_consts"] + p["num_carry"]],
                       invals[p["num_consts"] + p["num_carry"]:])
  if any(map(_is_weight, carry)) or not all(
      _stacked(x, p["length"]) for x in xs if _is_weight(x)):
    return None
  xs_arrays, rebuild = _split(xs)

  def body(carry, xs_arrays):
    out = evaluate(p["jaxpr"].jaxpr, p["jaxpr"].consts,
                   [*consts, *carry, *rebuild(xs_arrays)], mark)
    return out[:p["num_carry"]], out[p["num_carry"]:]

  carry, ys = jax.lax.scan(body, carry, xs_arrays, length=p["length"],
                           reverse=p["reverse"], unroll=p["unroll"])
  return [*carry, *ys]


def _apply(eqn, invals: list, mark: jax.Array) -> list:
  """The outputs of ``eqn`` on ``invals``, some of which are :class:`_Weight`."""
  prim, weights = eqn.primitive, [_is_weight(v) for v in invals]
  if prim is dot_general_p and sum(weights) == 1:
    w, x = invals if weights[0] else invals[::-1]
    product = _product(eqn, w, x, weights[0])
    # Explicit mesh axes: the weight is read whole (slices and their products would
    # need output shardings of their own).
    if (product is not None and jnp.issubdtype(x.dtype, jnp.floating)
        and not any(map(qz.has_sharded_type, (x, w.q.values, w.delta)))):
      return [_quantized_dot(product, x, w.q, w.delta)]
  if _is_float_cast(eqn):
    w = invals[0]
    return [w._replace(ops=(*w.ops, (prim, tuple(sorted(eqn.params.items())))))]
  if prim.name == "pvary":   # shard_map: a replicated weight marked as varying, codes too
    w, vary = invals[0], lambda a: _bind(eqn, [a])[0]
    return [w._replace(q=jax.tree.map(vary, w.q), delta=vary(w.delta))]
  if prim is transpose_p:
    w, perm = invals[0], eqn.params["permutation"]
    return [w._replace(perm=tuple(w.perm[i] for i in perm) if w.perm else tuple(perm))]
  if _is_plain_jit(eqn):
    closed = eqn.params["jaxpr"]
    return evaluate(closed.jaxpr, closed.consts, invals, mark)
  if prim is remat_p and not eqn.params["jaxpr"].constvars:   # jax.checkpoint, nnx.remat
    arrays, rebuild = _split(invals)
    return jax.checkpoint(lambda arrays: evaluate(eqn.params["jaxpr"], [], rebuild(arrays), mark),
                          prevent_cse=eqn.params["prevent_cse"],
                          policy=eqn.params["policy"])(arrays)
  if prim is scan_p:
    out = _scan(eqn, invals, mark)
    if out is not None:
      return out
  return _bind(eqn, [_dense_of(v, mark) if _is_weight(v) else v for v in invals])


def evaluate(jaxpr, consts: list, args: list, mark: jax.Array) -> list:
  """``jaxpr`` on ``args``, in which quantized weights are :class:`_Weight`."""
  env = {}
  read = lambda v: v.val if isinstance(v, Literal) else env[v]
  for var, value in zip((*jaxpr.constvars, *jaxpr.invars), (*consts, *args)):
    env[var] = value
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    outvals = (_apply(eqn, invals, mark) if any(map(_is_weight, invals))
               else _bind(eqn, invals))
    for var, value in zip(eqn.outvars, outvals):
      env[var] = value
  return [_dense_of(v, mark) if _is_weight(v) else v for v in map(read, jaxpr.outvars)]


def loss_at_use(fun: Callable[..., Any], params: Any, delta: Any, args: tuple,
                kwargs: dict) -> Callable[[Any], Any]:
  """``delta -> fun(Q(params) + delta, *args, **kwargs)``, each quantized weight
  dequantized at its uses (module docstring). ``delta`` (its value traces ``fun``) has
  the structure of the dense params: zeros at the quantized leaves, in the dtype
  ``fun`` sees them in, and the plain leaves."""
  is_q = lambda x: isinstance(x, qz.QuantizedArray)
  closed, out_shape = jax.make_jaxpr(lambda d: fun(d, *args, **kwargs),
                                     return_shape=True)(delta)
  stored = jax.tree.leaves(params, is_leaf=is_q)

  def loss(delta):
    mark = jnp.zeros(_DENSE_MARK, jnp.uint8)
    inputs = [_Weight(p, d) if is_q(p) else d
              for p, d in zip(stored, jax.tree.leaves(delta))]
    out = evaluate(closed.jaxpr, closed.consts, inputs, mark)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return loss
