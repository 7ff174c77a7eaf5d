"""``flax.serialization`` (msgpack, state dicts) for quantized params and eco_optax states.

Registers :class:`~eco_optax.QuantizedArray` (its ``values``, ``scale`` and, for
two-level formats, ``tensor_scale``, in their own dtypes), the 8-bit moments'
:class:`~eco_optax.moments.BlockCodes` (``codes``, ``absmax``) and the static
:class:`~eco_optax.tree.LeafFormats` of an optimizer state (nothing stored: the
formats come from the template). ``flax.serialization.to_bytes(params)``, ``to_bytes``
of an optimizer state or of an :class:`~eco_optax.TrainState`, and ``from_bytes``
with a template built the same way then round-trip bit for bit. Restoring into a
template of another format or shape raises ``ValueError`` naming the leaf.
Orbax (:mod:`eco_optax.checkpoint`) remains the path for sharded and large states.

Example:
  >>> import flax.serialization, jax.numpy as jnp, eco_optax as eco
  >>> q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
  >>> data = flax.serialization.to_bytes(q)
  >>> back = flax.serialization.from_bytes(q, data)
  >>> back["w"].values.dtype, back["w"].fmt.name
  (dtype(float8_e4m3fn), 'fp8_e4m3')
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import serialization
import numpy as np

from eco_optax import moments as mom
from eco_optax import quantize as qz
from eco_optax import tree as qtree


def _arrays(x: Any) -> dict[str, Any]:
  """The array fields of a ``jax.tree_util.register_dataclass`` instance (not static, not None)."""
  return {f.name: getattr(x, f.name) for f in dataclasses.fields(x)
          if not f.metadata.get("static") and getattr(x, f.name) is not None}


def _what(x: Any) -> str:
  return (f"a {x.fmt.name} QuantizedArray" if isinstance(x, qz.QuantizedArray)
          else f"an 8-bit moment of shape {list(x.shape)} (BlockCodes)")


def _from_state_dict(target: Any, state: dict[str, Any]) -> Any:
  """``target`` with the stored arrays, checked against its fields, shapes and dtypes."""
  path = serialization.current_path() or "."
  expected = _arrays(target)
  if not isinstance(state, dict) or sorted(state) != sorted(expected):
    got = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{path}: {_what(target)} is stored as {list(expected)}, got {got}; "
                     "restore into a template built as the data was written")
  arrays = {}
  for name, want in expected.items():
    got = np.asarray(state[name])
    if got.dtype != want.dtype or got.shape != tuple(want.shape):
      raise ValueError(
          f"{path}/{name}: the template ({_what(target)}) expects {want.dtype}"
          f"{list(want.shape)}, the data holds {got.dtype}{list(got.shape)}; restore into a "
          "template built with the formats and scales the data was written with")
    arrays[name] = got
  return dataclasses.replace(target, **arrays)


for _cls in (qz.QuantizedArray, mom.BlockCodes):
  serialization.register_serialization_state(_cls, _arrays, _from_state_dict)
# Static metadata: nothing is written, the template's formats are kept.
serialization.register_serialization_state(
    qtree.LeafFormats, lambda formats: {}, lambda target, state: target)
