"""Parameter pytrees with quantized leaves: quantize, dequantize, apply updates.

A *quantized parameter tree* is an ordinary pytree in which some leaves are
:class:`~eco_optax.quantize.QuantizedArray` (values in a low-precision dtype plus their
scales) and the others stay plain arrays. Gradients and updates always have the
structure of the *dequantized* tree: one plain array per parameter.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from eco_optax import at_use
from eco_optax import quantize as qz

Policy = Callable[[tuple, jax.Array], Union[qz.QuantFormat, None]]
FormatOrPolicy = Union[qz.QuantFormat, Policy]


def is_quantized(x: Any) -> bool:
  """True for a :class:`~eco_optax.quantize.QuantizedArray` leaf."""
  return isinstance(x, qz.QuantizedArray)


def is_lossy(x: Any) -> bool:
  """True for a quantized leaf that rounds (not the lossless reference format)."""
  return is_quantized(x) and not x.fmt.lossless


def path_str(path: tuple) -> str:
  """A key path as text, e.g. ``['block_0']['kernel']``; ``<root>`` when empty."""
  return jax.tree_util.keystr(path) or "<root>"


def path_entry_key(entry: Any) -> Any:
  """The plain key of a key path entry: a dict key, a sequence index or an attribute name."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


# Flax's names (Linen and NNX) for biases and norm gains (LayerNorm, RMSNorm): vectors, but
# matrices when stacked by nn.scan / nnx.vmap ((L, features)) or split per head ((heads, head_dim)).
FULL_PRECISION_NAMES = frozenset({"bias", "scale"})

# Flax attention's input projections (Linen MultiHeadDotProductAttention, NNX
# MultiHeadAttention): their ``kernel`` is (in, heads, head_dim), (L, in, heads, head_dim)
# when stacked, with the input features at axis -3.
ATTENTION_PROJECTIONS = frozenset({"query", "key", "value"})


def default_policy(fmt: qz.QuantFormat) -> Policy:
  """Quantizes the matrices: leaves with ``ndim >= 2`` (kernels, embeddings, stacks of
  them) but those named ``bias`` or ``scale`` (:data:`FULL_PRECISION_NAMES`).

  Vectors, scalars and zero-size leaves (no scale to take) stay in full precision,
  and so do biases and norm gains when stacked (``(L, features)`` under ``nn.scan``)
  or split per head (``(heads, head_dim)``, Flax attention): they are tiny and
  sensitive. The paper also keeps the embedding and the output layer in full
  precision; this policy quantizes them (they are matrices, often the largest). Pass
  your own ``callable(path, leaf) -> format | None`` to :func:`quantize_params` to
  choose differently.

  Flax attention's query, key and value kernels (:data:`ATTENTION_PROJECTIONS`),
  ``(in, heads, head_dim)``, get channel scales and blocks along their input features
  (``axis=-3``): read as a stack of ``in`` matrices, as any leaf of three dimensions
  is, they would get a channel scale per ``(input, head_dim)`` (``4 / heads`` bytes per
  parameter) and blocks across the heads (FP4 would need ``heads`` to be a multiple of
  the block size).

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> stack = {"kernel": jnp.ones((3, 8, 8)), "bias": jnp.zeros((3, 8))}
    >>> q = eco.quantize_params(stack, eco.default_policy(eco.int8()))
    >>> eco.is_quantized(q["kernel"]), eco.is_quantized(q["bias"])
    (True, False)
  """

  def policy(path, leaf):
    names = _leaf_names(path)
    if names and names[-1] in FULL_PRECISION_NAMES:
      return None
    if jnp.ndim(leaf) < 2 or jnp.size(leaf) == 0:
      return None
    if (jnp.ndim(leaf) >= 3 and fmt.scaling in ("channel", "block") and len(names) == 2
        and names[1] == "kernel" and names[0] in ATTENTION_PROJECTIONS):
      return dataclasses.replace(fmt, axis=-3)
    return fmt

  return policy


def _leaf_names(path: tuple) -> list[str]:
  """The names of the last two keys of ``path`` (``['block']['kernel']``: block, kernel).

  The trailing ``.value`` of an ``nnx.State``'s paths (``nnx.split(model, nnx.Param)``)
  is the Variable's value, not a name: ``['lin']['bias'].value`` is a bias.
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return [jax.tree_util.keystr((key,), simple=True) for key in path[-2:]]


def _check_float_leaf(where: str, leaf: Any) -> None:
  dtype = jnp.result_type(leaf)
  if not jnp.issubdtype(dtype, jnp.floating) or jnp.dtype(dtype).itemsize < 2:
    raise TypeError(
        f"{where}: expected a float32/bfloat16/float16 array to quantize, got "
        f"dtype {dtype}")


def _check_finite(where: str, leaf: jax.Array) -> None:
  if isinstance(leaf, jax.core.Tracer):
    return  # values are unknown under jit; checked when called eagerly
  with jax.ensure_compile_time_eval():   # a concrete leaf closed over by a traced function
    finite = bool(jnp.all(jnp.isfinite(leaf)))
  if not finite:
    raise ValueError(f"{where}: cannot quantize non-finite values (NaN or inf)")


def quantize_params(params: Any, fmt_or_policy: FormatOrPolicy) -> Any:
  """Stores the selected leaves of ``params`` in low precision.

  Args:
    params: a pytree of float arrays (Flax ``params``, an NNX pure dict, or the
      ``nnx.State`` of ``nnx.split(model, nnx.Param, ...)``).
    fmt_or_policy: a :class:`~eco_optax.quantize.QuantFormat` (applied through
      :func:`default_policy`: leaves with ``ndim >= 2`` but biases and norm gains) or
      a callable ``(path, leaf) -> QuantFormat | None``.

  Returns:
    The same tree with the selected leaves replaced by ``QuantizedArray``.

  Raises:
    TypeError / ValueError naming the leaf's path for non-float leaves, zero-size
    or scalar leaves the policy selects, shapes the format's scaling can't cut, and (when called
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
    try:
      fmt.check_shape(tuple(jnp.shape(leaf)), where)
    except ValueError as err:
      raise ValueError(f"{err}. A policy callable(path, leaf) -> format | None passed to "
                       "quantize_params chooses per leaf (None keeps a leaf in full "
                       "precision)") from None
    fmt.check_sharding(leaf, where)
    _check_finite(where, leaf)
    return _quantize_leaf(leaf, fmt)

  return jax.tree_util.tree_map_with_path(leaf_fn, params, is_leaf=is_quantized)


# Outside ``jit``: one program per leaf signature, not one per operation. Inside: inlined.
_quantize_leaf = jax.jit(qz.quantize, static_argnums=1, inline=True)


def dequantize_params(params: Any, dtype=jnp.float32) -> Any:
  """Replaces every ``QuantizedArray`` by ``scale * values`` in ``dtype``.

  Plain leaves are returned unchanged. Use it inside the jitted loss so that the
  model sees ordinary arrays and gradients come out with this structure.
  """
  return jax.tree.map(
      lambda x: qz.dequantize(x, dtype) if is_quantized(x) else x,
      params, is_leaf=is_quantized)


def check_pure(params: Any) -> None:
  """Refuses quantized leaves wrapped in ``flax.nnx`` Variables (``TypeError``).

  ``flax.nnx.Optimizer`` builds its state from the model's Variables and applies
  updates with ``optax.apply_updates``, which cannot store quantized weights; the
  drop-in :class:`eco_optax.nnx.Optimizer` passes plain arrays. Raised from
  ``tx.init``, so the mistake shows where the optimizer is built.
  """
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:   # no Variable can exist before flax.nnx is imported
    return
  is_variable = lambda x: isinstance(x, nnx.Variable)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]:
    if is_variable(leaf) and is_quantized(leaf.get_value()):
      raise TypeError(
          f"{path_str(path)}: this quantized weight is a flax.nnx Variable; "
          "flax.nnx.Optimizer applies updates with optax.apply_updates, which cannot "
          "store quantized weights. Use eco_optax.nnx.Optimizer(model, tx, wrt=nnx.Param) "
          "(same interface).")


def check_updates_match(params: Any, updates: Any, what: str = "updates") -> None:
  """Raises a clear error unless ``updates`` has the dequantized structure of ``params``.

  Compares tree structure, then each leaf's shape, naming the first offending
  path. Runs on shapes only, so it is free under ``jit``.
  """
  p_paths, p_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
  u_paths, u_def = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_new_codes)
  p_keys = [path_str(p) for p, _ in p_paths]
  u_keys = [path_str(p) for p, _ in u_paths]
  if p_keys != u_keys or p_def.num_leaves != u_def.num_leaves:
    missing = sorted(set(p_keys) - set(u_keys))
    extra = sorted(set(u_keys) - set(p_keys))
    codes = what == "grads" and any(k.endswith((".values", ".scale")) for k in extra)
    raise ValueError(
        f"{what} do not have the structure of the (dequantized) params: "
        f"missing {missing[:5]}, unexpected {extra[:5]}"
        + ("" if missing or extra else f"; params {p_def} vs {what} {u_def}")
        + ("; these are derivatives with respect to QuantizedArray fields: take gradients "
           "with respect to the dequantized weights with eco_optax.grad / "
           "eco_optax.value_and_grad (eco_optax.nnx.value_and_grad for NNX)" if codes else ""))
  for (path, p), (_, u) in zip(p_paths, u_paths):
    if p is None:
      continue
    if is_new_codes(u):
      u = u.bits
    if jnp.shape(u) != jnp.shape(p):
      raise ValueError(f"{path_str(path)}: {what} leaf has shape {jnp.shape(u)}, "
                       f"expected {jnp.shape(p)}")
    if what == "grads" and not jnp.issubdtype(jnp.result_type(u), jnp.floating):
      raise TypeError(f"{path_str(path)}: {what} leaf has dtype "
                      f"{jnp.result_type(u)}, expected a float array")


# NewCodes.flags, a float32 scalar: VALID applies the bits, NaN applies them and poisons
# the leaf (a non-finite gradient or learning rate reached it), KEEP keeps the stored codes
# and scale (a step skipped by eco_optax.MultiSteps or eco_optax.apply_if_finite). Float,
# so that a transformation after the optimizer that multiplies the update by any factor
# but 1 changes them: optax.scale_by_schedule casts its factor to the bits' uint8
# (0.5 -> 0, 1.5 -> 1) but multiplies the flags by the exact factor. KEEP is neither 0
# nor a factor a schedule or a scale would give by design, and exact in float32.
VALID = 1.0
KEEP = 0.6171875   # 79 / 128


class NewCodes(NamedTuple):
  """The update of a quantized leaf: its new codes and scale, which :func:`apply_updates` copies.

  Attributes:
    bits: the storage bits of the new codes, shaped as the leaf: ``uint8``
      (``uint16`` for 16-bit formats; :func:`new_codes_dtype`), 1 byte per parameter.
    flags: ``float32`` scalar. ``VALID`` applies the bits; NaN applies them and
      poisons the leaf, which received a non-finite value (its scale becomes NaN);
      ``KEEP`` keeps codes and scale (:class:`eco_optax.MultiSteps` between
      accumulation steps, :func:`eco_optax.apply_if_finite` on a rejected step). Any
      other value (0 included) means a transformation after the optimizer changed the
      update: :func:`apply_updates` poisons the leaf and warns.
    scale: the scale the codes were stored with, as the leaf stores it (the scale
      policy's :func:`~eco_optax.quantize.next_scale` of the stored weights).
      ``None``: :func:`apply_updates` computes that scale from the stored weights.
    tensor_scale: NVFP4's tensor scale, as ``scale``; ``None`` for other formats.
  """
  bits: jax.Array
  flags: jax.Array
  scale: Optional[jax.Array] = None
  tensor_scale: Optional[jax.Array] = None


def new_codes_dtype(fmt: qz.QuantFormat) -> np.dtype:
  """The dtype of :attr:`NewCodes.bits` for ``fmt``: ``uint8``, ``uint16`` for 16-bit formats."""
  return np.dtype(np.uint8 if fmt.bits <= 8 else np.uint16)


def is_new_codes(x: Any) -> bool:
  return isinstance(x, NewCodes)


@dataclasses.dataclass(frozen=True)
class LeafFormats:
  """The storage format of each parameter leaf, by path (static pytree metadata).

  ``None`` for plain leaves. Part of an optimizer state, it lets ``update`` refuse
  params stored in other formats than the state was built for.
  """
  formats: tuple[tuple[str, Any], ...]


jax.tree_util.register_pytree_node(LeafFormats, lambda f: ((), f.formats),
                                   lambda aux, _: LeafFormats(aux))


def zeros_for_quantized(params: Any, dtype=jnp.float32) -> Any:
  """``params`` with each quantized leaf as zeros of its shape in ``dtype``, placed as its
  codes (a sharded weight's zeros sharded as it is); the plain leaves as they are."""
  return jax.tree.map(lambda p: jnp.zeros_like(p.values, dtype) if is_quantized(p) else p,
                      params, is_leaf=is_quantized)


def formats_of(params: Any) -> LeafFormats:
  """The :class:`LeafFormats` of a (quantized) parameter tree."""
  paths = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
  return LeafFormats(tuple((path_str(path), leaf.fmt if is_quantized(leaf) else None)
                           for path, leaf in paths))


def check_shardings(params: Any, grads: Any) -> None:
  """Raises ``ValueError`` naming the first quantized leaf (or its gradient) that is
  sharded over explicit mesh axes across the blocks of its scales
  (:meth:`QuantFormat.check_sharding`)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
  for (path, p), g in zip(flat, treedef.flatten_up_to(grads)):
    if is_quantized(p):
      p.fmt.check_sharding(p.values, path_str(path))
      p.fmt.check_sharding(g, f"{path_str(path)} (its gradient)")


def check_formats_match(params: Any, formats: Optional[LeafFormats]) -> None:
  """Raises ``ValueError`` naming the first leaf whose format differs from ``formats``."""
  if formats is None:
    return
  current = formats_of(params)
  if current == formats:
    return
  expected = dict(formats.formats)
  for path, fmt in current.formats:
    if path not in expected:
      raise ValueError(f"{path}: this parameter is not in the optimizer state; "
                       "build the state with tx.init(params) for these params")
    if expected[path] != fmt:
      name = lambda f: "not quantized" if f is None else f"{f.name} ({f})"
      raise ValueError(
          f"{path}: params are stored as {name(fmt)} but the optimizer state was built "
          f"for {name(expected[path])}; build the state with tx.init(params) for these "
          "params, or restore the state that belongs to them")
  missing = sorted(set(expected) - {p for p, _ in current.formats})
  raise ValueError(
      f"the optimizer state has parameters these params lack: {missing[:5]}. Under "
      "optax.multi_transform or optax.masked, give the labels (or mask) as a tree computed "
      "once from the quantized params: optax calls a label function on the gradients too, "
      "where no leaf is quantized")


def _warn_when(condition: jax.Array, message: str) -> None:
  """Warns ``message`` (a ``RuntimeWarning``) from the running step where ``condition`` holds.

  The host checks ``condition`` again: under ``jax.vmap`` a conditional runs both
  branches (a select), so the callback is reached whatever the members' conditions.
  """

  def warn(holds):
    if np.any(holds):
      warnings.warn(message, RuntimeWarning, stacklevel=2)

  jax.lax.cond(condition, lambda: jax.debug.callback(warn, condition), lambda: None)


def _warn_if_saturated(path: str, fmt: qz.QuantFormat, fraction: jax.Array,
                       applied: jax.Array) -> None:
  """Warns (from the running step, once per leaf) when a fixed scale pins many codes at +-rho
  in the codes ``applied`` stores."""
  _warn_when(applied & (fraction > qz.SATURATION_WARNING),
             f"{path}: more than {qz.SATURATION_WARNING:.0%} of this {fmt.name} leaf's codes sit "
             f"at the format's largest magnitude +-{fmt.max_value:g} under scale_policy='fixed', "
             "which never grows: updates that would move these weights further out are "
             "clipped. Use scale_policy='sticky' (it grows the scale when codes saturate) or a "
             f"larger headroom (now {fmt.headroom:g}).")


def _warn_if_altered(path: str, altered: jax.Array) -> None:
  """Warns (from the running step) when an update's flags are none an optimizer writes."""
  _warn_when(altered,
             f"{path}: this update's flags are not ones an eco_optax optimizer writes: a "
             "transformation after the optimizer changed its new codes "
             "(optax.scale_by_schedule, an integer optax.scale, ...). The leaf is poisoned "
             "(NaN) rather than stored altered. Place gradient transformations before the "
             "eco_optax optimizer and change its learning_rate to scale its steps.")


def _quantized_update(path: str, p: qz.QuantizedArray, u: Any) -> qz.QuantizedArray:
  dtype = new_codes_dtype(p.fmt)
  if not (is_new_codes(u) and jnp.result_type(u.bits) == dtype
          and jnp.result_type(u.flags) == np.float32):
    got = (f"NewCodes with {jnp.result_type(u.bits)} bits and {jnp.result_type(u.flags)} "
           "flags" if is_new_codes(u) else f"an array of {jnp.result_type(u)}")
    raise TypeError(
        f"{path}: the update of this {p.fmt.name} leaf is {got}, but eco_optax optimizers "
        f"return the new codes of quantized leaves (NewCodes with {dtype} bits and float32 "
        "flags), to be copied, not added. A transformation after the eco_optax optimizer in "
        "optax.chain changed them (optax.scale, optax.clip, ...), or a float update reached a "
        "quantized leaf. Place gradient transformations before the eco_optax optimizer, "
        "change its learning_rate to scale its steps, and accumulate gradients with "
        "eco_optax.MultiSteps. To freeze quantized leaves, give them eco_optax.set_to_zero() "
        "in optax.multi_transform (optax.set_to_zero answers with float zeros, and "
        "optax.masked passes the gradients of the leaves it leaves out through).")
  if u.bits.shape != p.shape:
    raise ValueError(f"{path}: update has shape {u.bits.shape}, expected {p.shape}")
  if u.scale is not None and (jnp.shape(u.scale) != jnp.shape(p.scale)
                              or jnp.result_type(u.scale) != p.scale.dtype
                              or (u.tensor_scale is None) != (p.tensor_scale is None)):
    raise TypeError(f"{path}: the update's scale is {jnp.result_type(u.scale)}"
                    f"{list(jnp.shape(u.scale))}, but this {p.fmt.name} leaf stores "
                    f"{p.scale.dtype}{list(p.scale.shape)}" + (
                        " and a tensor scale" if p.tensor_scale is not None else ""))
  poisoned = jnp.isnan(u.flags)
  applied = (u.flags == VALID) | poisoned
  # An optimizer writes VALID or NaN, a skipping wrapper KEEP; a transformation that kept
  # the uint8 bits but scaled the update (optax.scale_by_schedule, optax.scale(2)) leaves
  # any other value.
  altered = ~applied & (u.flags != KEEP)

  def copied():
    values = qz.bits_to_values(u.bits, p.fmt)
    if p.fmt.scale_policy == "fixed" and p.fmt.scaling != "none":
      _warn_if_saturated(path, p.fmt, qz.saturation(dataclasses.replace(p, values=values)),
                         applied)
    return values

  def kept():
    _warn_if_altered(path, altered)
    return p.values

  # All or nothing (a conditional, not a select per element: nothing but the new codes
  # is written). Each run-time warning is checked inside the branch it concerns: in a
  # conditional of its own, its host callback holds the leaves' steps behind it (MLP of
  # benchmarks/memory.py, memory-optimised scheduler: whole-step peak 0.85x
  # optax.adamw's that way, 0.81x this way).
  values = jax.lax.cond(applied, copied, kept)
  scale, tensor_scale = qz._next_scales(p) if u.scale is None else (u.scale, u.tensor_scale)
  scale = jnp.where(applied, scale, p.scale)
  if tensor_scale is not None:
    tensor_scale = jnp.where(applied, tensor_scale, p.tensor_scale)
  return qz.poison(dataclasses.replace(p, values=values, scale=scale, tensor_scale=tensor_scale),
                   poisoned | altered)


def apply_updates(params: Any, updates: Any) -> Any:
  """Applies the updates of an eco_optax optimizer to a quantized parameter tree.

  Plain leaves (and lossless ones): ``p + u`` cast back to ``p.dtype``, as
  :func:`optax.apply_updates`. Quantized leaves: the update is a :class:`NewCodes`,
  whose bits and scale (the one the optimizer stored them with,
  :func:`~eco_optax.quantize.next_scale` of the stored weights) are copied, never
  rounded again. A leaf's update is applied when its flags are ``VALID``; a step
  skipped by :func:`eco_optax.apply_if_finite` or :class:`eco_optax.MultiSteps`
  (flags ``KEEP``) keeps codes and scale; a leaf that received a non-finite gradient
  or learning rate (flags NaN) gets a NaN scale, so the fault shows. Any other flags
  (a transformation after the optimizer scaled the update) poison the leaf with a
  ``RuntimeWarning`` naming it.

  ``optax.apply_updates`` can't apply these updates (it adds them), and nothing may
  change them between the optimizer and this function: a float update of a
  quantized leaf raises a ``TypeError`` at trace time.

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.ones((2, 2))}, eco.fp8_e4m3())
    >>> tx = eco.sgdm(1.0)
    >>> updates, _ = tx.update({"w": jnp.full((2, 2), 2.5)}, tx.init(q), q)
    >>> updates["w"].bits.dtype, updates["w"].flags
    (dtype('uint8'), Array(1., dtype=float32))
    >>> eco.dequantize_params(eco.apply_updates(q, updates))["w"].tolist()
    [[0.75, 0.75], [0.75, 0.75]]
  """
  check_updates_match(params, updates)
  return _apply_updates(params, updates)


@functools.partial(jax.jit, inline=True)   # eager calls: one program per tree signature
def _apply_updates(params: Any, updates: Any) -> Any:
  def leaf_fn(path, p, u):
    if is_lossy(p):
      return _quantized_update(path_str(path), p, u)
    if is_quantized(p):
      return dataclasses.replace(p, values=jnp.asarray(p.values + u).astype(p.values.dtype))
    return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)

  return jax.tree_util.tree_map_with_path(leaf_fn, params, updates, is_leaf=is_quantized)


def value_and_grad(fun: Callable[..., Any], has_aux: bool = False, *,
                   recompute: Optional[bool] = None, dtype: Any = jnp.float32
                   ) -> Callable[..., Any]:
  """``jax.value_and_grad`` of ``fun(dense_params, *args)`` at a quantized tree.

  Returns ``(value, grads)`` with ``grads`` the gradient with respect to the
  dequantized weights ``Q(w)`` (the structure of the dequantized params), what the
  eco_optax optimizers take. ``fun`` sees ordinary arrays: each quantized weight as
  ``Q(w)`` in ``dtype`` (FP32 by default; ``jnp.bfloat16`` for a model built with
  bfloat16 parameters, whose other leaves and activations are bfloat16: its scanned
  layers then carry one dtype), its gradient in the same dtype.

  No FP32 copy of the weights lives through the step: ``fun`` is traced once and each
  quantized weight dequantized where it is read (:mod:`eco_optax.at_use`). A product
  with a weight (``x @ w``, ``jnp.einsum``, Flax's dense layers; also after an
  ``astype`` or a transpose, inside ``jax.jit``, ``jax.checkpoint`` and ``lax.scan``
  over stacked layers) dequantizes it right before the product and, in the backward
  pass, again in slices from the codes. Any other use (a gather, a convolution, a
  penalty; products under explicit mesh axes) reads the whole dequantized weight. With
  ``recompute`` (the default except on CPU) the backward pass computes those whole
  weights again from the codes instead of keeping them (under ``jax.checkpoint`` with
  a policy that saves every residual but them).

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}, eco.fp8_e4m3())
    >>> loss, grads = eco.value_and_grad(lambda p, x: jnp.sum(x @ p["w"] + p["b"]))(
    ...     q, jnp.ones((2, 4)))
    >>> float(loss), grads["w"].dtype, grads["w"].shape
    (32.0, dtype('float32'), (4, 4))
  """

  def wrapped(params, *args, **kwargs):
    # Differentiate w.r.t. a zero offset of each quantized weight (and the plain leaves).
    delta = zeros_for_quantized(params, dtype)
    recomputes = jax.default_backend() != "cpu" if recompute is None else recompute
    # Saving everything, the checkpoint still changes how XLA:CPU schedules the
    # activations (benchmark transformer: 431 -> 354 B/param at peak, docs/design.md).
    inner = jax.checkpoint(
        at_use.loss_at_use(fun, params, delta, args, kwargs),
        policy=at_use.save_all_but_dense if recomputes
        else jax.checkpoint_policies.everything_saveable)
    return jax.value_and_grad(inner, has_aux=has_aux)(delta)

  return wrapped


def grad(fun: Callable[..., Any], has_aux: bool = False, *,
         recompute: Optional[bool] = None, dtype: Any = jnp.float32) -> Callable[..., Any]:
  """:func:`value_and_grad` without the value (with ``has_aux``: ``(grads, aux)``)."""

  def wrapped(params, *args, **kwargs):
    value, grads = value_and_grad(fun, has_aux, recompute=recompute, dtype=dtype)(
        params, *args, **kwargs)
    return (grads, value[1]) if has_aux else grads

  return wrapped
