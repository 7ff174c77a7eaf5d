"""Orbax checkpoints of quantized parameters and eco_optax optimizer state.

Orbax (``pip install eco-optax[checkpoint]``) stores float8, int4, float4 and
E8M0 arrays and typed PRNG keys as they are, so a tree of quantized params
(:class:`~eco_optax.QuantizedArray` leaves) together with an
:class:`~eco_optax.ErrorFeedbackState` (moments, optional master copy, the
stochastic-rounding key) round-trips bit for bit: training resumed from a
checkpoint is identical to uninterrupted training.

Two things need care, and :func:`restore` does both:

* The storage formats are static pytree metadata, not arrays: they come back
  from the ``like`` tree, so restoring needs one (a freshly quantized model and
  ``tx.init`` of it, or its ``jax.eval_shape``), and its scale policy is the one
  training resumes with.
* Orbax casts every array to the dtype of the restore target. A checkpoint of
  FP8 weights restored into an INT4 template would silently become garbage
  codes; :func:`restore` compares the stored shapes and dtypes with ``like``
  first and names the first leaf that differs.

Example:
  >>> import tempfile, jax.numpy as jnp, eco_optax as eco
  >>> from eco_optax import checkpoint
  >>> q = eco.quantize_params({"w": jnp.ones((4, 8))}, eco.fp8_e4m3())
  >>> tx = eco.adamw(1e-3, rounding="stochastic")
  >>> state = tx.init(q)
  >>> path = tempfile.mkdtemp() + "/step_10"
  >>> checkpoint.save(path, {"params": q, "opt_state": state})
  >>> restored = checkpoint.restore(path, like={"params": q, "opt_state": state})
  >>> restored["params"]["w"].values.dtype
  dtype(float8_e4m3fn)
"""

from __future__ import annotations

import os
from typing import Any

import jax

try:
  import orbax.checkpoint as ocp
except ImportError as err:  # pragma: no cover - depends on the environment
  raise ImportError(
      "eco_optax.checkpoint needs orbax: pip install 'eco-optax[checkpoint]'"
  ) from err


def _stored_form(leaf: Any) -> tuple[tuple[int, ...], Any]:
  """(shape, dtype) as orbax writes ``leaf``: typed PRNG keys as their raw data; a Python
  scalar (``TrainState.create``'s ``step``) as shape ``()`` of any dtype (``None``)."""
  if not hasattr(leaf, "dtype"):
    return (), None
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  return tuple(leaf.shape), leaf.dtype


def _check_matches(directory: str, stored_tree: Any, like: Any) -> None:
  """Raises ``ValueError`` naming the first leaf whose shape or dtype differs."""
  stored = {m.name: (tuple(m.shape), m.dtype)
            for m in jax.tree.leaves(stored_tree, is_leaf=lambda x: hasattr(x, "dtype"))}
  wanted = {jax.tree_util.keystr(path, simple=True, separator="."): _stored_form(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]}
  missing = sorted(set(wanted) - set(stored))
  extra = sorted(set(stored) - set(wanted))
  if missing or extra:
    raise ValueError(
        f"checkpoint {directory} does not have the structure of `like`: "
        f"missing {missing[:5]}, unexpected {extra[:5]}")
  for name, (shape, dtype) in wanted.items():
    if stored[name] != (shape, dtype if dtype is not None else stored[name][1]):
      raise ValueError(
          f"checkpoint {directory}: {name} is stored with shape {stored[name][0]} "
          f"and dtype {stored[name][1]}, but `like` expects shape {shape} and "
          f"dtype {dtype} (was the model quantized with another format?)")


def save(directory: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
  """Writes ``tree`` (quantized params, optimizer state, ...) to ``directory``.

  Blocks until the checkpoint is complete. Arrays keep their dtype (float8,
  int4, ...), and typed PRNG keys are stored with their implementation.

  Args:
    directory: a directory that does not exist yet (or ``force=True``).
    tree: any pytree of JAX arrays, e.g. ``{"params": q, "opt_state": state}``.
    force: overwrite an existing checkpoint.
  """
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), tree, force=force)


def restore(directory: str | os.PathLike, like: Any) -> Any:
  """Reads a checkpoint written by :func:`save` into the structure of ``like``.

  Args:
    directory: the checkpoint directory.
    like: a tree with the structure, shapes, dtypes and quantization formats
      of the saved one: concrete arrays (e.g. a freshly quantized model and
      ``tx.init`` of it) or ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``).
      Arrays are restored with the sharding of ``like``'s leaves.

  Returns:
    The saved tree, with ``like``'s pytree structure (and so its formats).

  Raises:
    ValueError: naming the first leaf whose stored shape or dtype differs from
      ``like``, or the leaves present on one side only.
  """
  directory = os.path.abspath(directory)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  with ocp.StandardCheckpointer() as ckptr:
    _check_matches(directory, ckptr.metadata(directory).item_metadata.tree, abstract)
    return ckptr.restore(directory, abstract)
