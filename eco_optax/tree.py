"""Parameter pytrees with quantized leaves: quantize, dequantize, apply updates.

A *quantized parameter tree* is an ordinary pytree in which some leaves are
:class:`~eco_optax.quantize.QuantizedArray` (values in a low-precision dtype plus their
scales) and the others stay plain arrays. Gradients and updates always have the
structure of the *dequantized* tree: one plain array per parameter.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from eco_optax import quantize as qz

Policy = Callable[[tuple, jax.Array], Union[qz.QuantFormat, None]]
FormatOrPolicy = Union[qz.QuantFormat, Policy]


def is_quantized(x: Any) -> bool:
  """True for a :class:`~eco_optax.quantize.QuantizedArray` leaf."""
  return isinstance(x, qz.QuantizedArray)


def path_str(path: tuple) -> str:
  """A key path as text, e.g. ``['block_0']['kernel']``; ``<root>`` when empty."""
  return jax.tree_util.keystr(path) or "<root>"


def default_policy(fmt: qz.QuantFormat) -> Policy:
  """Quantizes leaves with ``ndim >= 2`` (matrices, kernels); vectors and scalars stay.

  Norm gains and biases are tiny and sensitive; the paper keeps them (and the
  embedding) in full precision. Pass your own ``callable(path, leaf) -> format |
  None`` to :func:`quantize_params` to choose differently.
  """

  def policy(path, leaf):
    del path
    return fmt if jnp.ndim(leaf) >= 2 else None

  return policy


def _check_float_leaf(where: str, leaf: Any) -> None:
  dtype = jnp.result_type(leaf)
  if not jnp.issubdtype(dtype, jnp.floating) or jnp.dtype(dtype).itemsize < 2:
    raise TypeError(
        f"{where}: expected a float32/bfloat16/float16 array to quantize, got "
        f"dtype {dtype}")


def _check_finite(where: str, leaf: jax.Array) -> None:
  if isinstance(leaf, jax.core.Tracer):
    return  # values are unknown under jit; checked when called eagerly
  if not bool(jnp.all(jnp.isfinite(leaf))):
    raise ValueError(f"{where}: cannot quantize non-finite values (NaN or inf)")


def quantize_params(params: Any, fmt_or_policy: FormatOrPolicy) -> Any:
  """Stores the selected leaves of ``params`` in low precision.

  Args:
    params: a pytree of float arrays (e.g. Flax ``params`` or an NNX pure dict).
    fmt_or_policy: a :class:`~eco_optax.quantize.QuantFormat` (applied through
      :func:`default_policy`: leaves with ``ndim >= 2``) or a callable
      ``(path, leaf) -> QuantFormat | None``.

  Returns:
    The same tree with the selected leaves replaced by ``QuantizedArray``.

  Raises:
    TypeError / ValueError naming the leaf's path for non-float leaves, zero-size
    or scalar leaves, shapes the format's scaling can't cut, and (when called
    outside ``jit``) non-finite values.

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}, eco.fp8_e4m3())
    >>> type(q["w"]).__name__, q["w"].values.dtype, q["b"].dtype
    ('QuantizedArray', dtype(float8_e4m3fn), dtype('float32'))
  """
  policy = (default_policy(fmt_or_policy)
            if isinstance(fmt_or_policy, qz.QuantFormat) else fmt_or_policy)

  def leaf_fn(path, leaf):
    where = path_str(path)
    if is_quantized(leaf):
      raise TypeError(f"{where}: leaf is already quantized ({leaf.fmt.name})")
    fmt = policy(path, leaf)
    if fmt is None:
      return leaf
    if not isinstance(fmt, qz.QuantFormat):
      raise TypeError(f"{where}: policy returned {fmt!r}, expected a "
                      f"QuantFormat or None")
    _check_float_leaf(where, leaf)
    fmt.check_shape(tuple(jnp.shape(leaf)), where)
    _check_finite(where, leaf)
    return qz.quantize(leaf, fmt)

  return jax.tree_util.tree_map_with_path(leaf_fn, params, is_leaf=is_quantized)


def dequantize_params(params: Any, dtype=jnp.float32) -> Any:
  """Replaces every ``QuantizedArray`` by ``scale * values`` in ``dtype``.

  Plain leaves are returned unchanged. Use it inside the jitted loss so that the
  model sees ordinary arrays and gradients come out with this structure.
  """
  return jax.tree.map(
      lambda x: qz.dequantize(x, dtype) if is_quantized(x) else x,
      params, is_leaf=is_quantized)


def check_updates_match(params: Any, updates: Any, what: str = "updates") -> None:
  """Raises a clear error unless ``updates`` has the dequantized structure of ``params``.

  Compares tree structure, then each leaf's shape, naming the first offending
  path. Runs on shapes only, so it is free under ``jit``.
  """
  p_paths, p_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
  u_paths, u_def = jax.tree_util.tree_flatten_with_path(updates)
  p_keys = [path_str(p) for p, _ in p_paths]
  u_keys = [path_str(p) for p, _ in u_paths]
  if p_keys != u_keys or p_def.num_leaves != u_def.num_leaves:
    missing = sorted(set(p_keys) - set(u_keys))
    extra = sorted(set(u_keys) - set(p_keys))
    raise ValueError(
        f"{what} do not have the structure of the (dequantized) params: "
        f"missing {missing[:5]}, unexpected {extra[:5]}"
        + ("" if missing or extra else f"; params {p_def} vs {what} {u_def}"))
  for (path, p), (_, u) in zip(p_paths, u_paths):
    if p is None:
      continue
    if jnp.shape(u) != jnp.shape(p):
      raise ValueError(f"{path_str(path)}: {what} leaf has shape {jnp.shape(u)}, "
                       f"expected {jnp.shape(p)}")
    if not jnp.issubdtype(jnp.result_type(u), jnp.floating):
      raise TypeError(f"{path_str(path)}: {what} leaf has dtype "
                      f"{jnp.result_type(u)}, expected a float array")


def apply_updates(params: Any, updates: Any) -> Any:
  """Applies ``updates`` to a quantized parameter tree, exactly.

  Plain leaves: ``p + u`` cast back to ``p.dtype`` (as :func:`optax.apply_updates`).
  Quantized leaves: the new codes are ``round((Q(w) + u) / s')`` with the scale
  ``s'`` of :func:`~eco_optax.quantize.next_scale`, which depends on the stored
  weights alone. For an update produced by an eco_optax optimizer, ``Q(w) + u`` is
  a grid point of ``s'`` up to FP32 rounding, far inside half a grid step, so this
  reproduces the optimizer's new weights bit for bit: no second rounding error
  enters the error bookkeeping. A leaf whose update is exactly zero (a step
  skipped by :func:`optax.apply_if_finite`) keeps its stored value and scale, and
  non-finite update entries leave their weights unchanged.

  ``optax.apply_updates`` can't be used on float8/int4 leaves: JAX does not promote
  8-bit floats implicitly, and its ``p + u`` would round a second time.

  Example:
    >>> import jax.numpy as jnp, optax, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.ones((2, 2))}, eco.fp8_e4m3())
    >>> q2 = eco.apply_updates(q, {"w": jnp.full((2, 2), 0.25)})
    >>> eco.dequantize_params(q2)["w"].tolist()
    [[1.25, 1.25], [1.25, 1.25]]
  """
  check_updates_match(params, updates)

  def leaf_fn(p, u):
    if p is None:
      return None
    if not is_quantized(p):
      return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)
    old = qz.dequantize(p)
    new, _ = qz.requantize_with_value(p, old + u.astype(jnp.float32), stored=old)
    unchanged = jnp.all(u == 0)
    return jax.tree.map(lambda a, b: jnp.where(unchanged, a, b), p, new)

  return jax.tree.map(leaf_fn, params, updates,
                      is_leaf=lambda x: x is None or is_quantized(x))
