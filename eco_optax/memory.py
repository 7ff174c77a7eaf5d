"""Static memory of a quantized model and its optimizer state, in bytes per parameter.

Counts what stays resident between steps: stored weights (at the format's bit
width, so int4 and FP4 count 0.5 byte as XLA packs them, although a host
``.nbytes`` shows 1), their scales at their storage dtype (FP32, or one byte for
the block scales of MXFP4 / NVFP4, plus NVFP4's FP32 tensor scale), plain
(unquantized) parameters, and every array of the
optimizer state, attributed to the master copy, the first and second moments, or
"other state" (step counters, PRNG keys, ...). Activations and gradients are not
static and are not counted there; pass the compiled train step to
:func:`memory_report` to see its peak beside the static bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from eco_optax import tree as qtree

# State fields (NamedTuple attribute names) -> report component.
_STATE_COMPONENTS = {"master": "master weights", "mu": "first moment",
                     "nu": "second moment"}


def _bits(dtype: np.dtype) -> int:
  """Bits per element as XLA stores it: 4 for int4 / float4, 8 * itemsize otherwise.

  Older JAX has no ``jax.dtypes.itemsize_bits``; numpy keeps sub-byte dtypes one
  per byte (``np.dtype(int4).itemsize == 1``), so their width comes from ml_dtypes.
  """
  if hasattr(jax.dtypes, "itemsize_bits"):
    return int(jax.dtypes.itemsize_bits(dtype))
  if dtype.itemsize == 1:
    for info in (ml_dtypes.iinfo, ml_dtypes.finfo):
      try:
        return int(info(dtype).bits)
      except ValueError:
        pass
  return dtype.itemsize * 8


def _nbytes(x: Any) -> float:
  """Bytes of one array at its dtype's bit width (int4 / float4 packed at 0.5 byte)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return int(np.prod(x.shape)) * _bits(np.dtype(x.dtype)) / 8


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Static bytes by component and per parameter.

  Attributes:
    num_params: number of model parameters (elements of the dequantized tree).
    components: ``{component: bytes}``.
    peak_bytes: the peak of a compiled step (:func:`peak_bytes`), when one was given.
  """
  num_params: int
  components: dict
  peak_bytes: Optional[float] = None

  @property
  def total_bytes(self) -> float:
    return float(sum(self.components.values()))

  @property
  def bytes_per_param(self) -> float:
    return self.total_bytes / max(self.num_params, 1)

  @property
  def peak_bytes_per_param(self) -> Optional[float]:
    return None if self.peak_bytes is None else self.peak_bytes / max(self.num_params, 1)

  def __str__(self) -> str:
    width = max(len(k) for k in self.components) if self.components else 0
    lines = [f"{self.num_params:,} parameters, {self.total_bytes / 2**20:.2f} MiB "
             f"static, {self.bytes_per_param:.3f} bytes/param"]
    for name, nbytes in self.components.items():
      lines.append(f"  {name:<{width}}  {nbytes / max(self.num_params, 1):7.3f} B/param"
                   f"  ({nbytes / 2**20:.2f} MiB)")
    if self.peak_bytes is not None:
      lines.append(f"compiled step peak {self.peak_bytes / 2**20:.2f} MiB, "
                   f"{self.peak_bytes_per_param:.3f} bytes/param")
    return "\n".join(lines)


def peak_bytes(compiled: jax.stages.Compiled) -> int:
  """The peak memory of a compiled program: ``arguments + outputs - aliased + temporaries``.

  Read from ``compiled.memory_analysis()``; donated arguments aliased to outputs count
  once. Raises ``ValueError`` where the backend reports no memory analysis.
  """
  m = compiled.memory_analysis()
  if m is None:
    raise ValueError("this backend reports no memory analysis for compiled programs")
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def memory_report(params: Any, opt_state: Any = None,
                  step: Optional[jax.stages.Compiled] = None) -> MemoryReport:
  """Static memory of ``params`` (quantized or not) and ``opt_state``, and a step's peak.

  ``step``: a compiled train step, ``jax.jit(train_step, donate_argnums=...).lower(
  ...).compile()``; its :func:`peak_bytes` are reported beside the static bytes. The
  static bytes are what stays resident between steps; the peak adds what a step
  holds while it runs (gradients, activations, temporaries), as XLA compiled it.

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.ones((256, 256))}, eco.fp8_e4m3("tensor"))
    >>> state = eco.adamw(1e-3).init(q)
    >>> round(eco.memory_report(q, state).bytes_per_param, 2)
    9.0
  """
  components = {"weights": 0.0, "scales": 0.0, "plain params": 0.0}
  num_params = 0
  for leaf in jax.tree.leaves(params, is_leaf=qtree.is_quantized):
    if qtree.is_quantized(leaf):
      components["weights"] += _nbytes(leaf.values)
      components["scales"] += sum(map(_nbytes, jax.tree.leaves(
          (leaf.scale, leaf.tensor_scale))))
      num_params += leaf.size
    else:
      components["plain params"] += _nbytes(jnp.asarray(leaf))
      num_params += int(np.size(leaf))
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    component = next((_STATE_COMPONENTS[n] for n in reversed(names)
                      if n in _STATE_COMPONENTS), "other state")
    components[component] = components.get(component, 0.0) + _nbytes(jnp.asarray(leaf))
  return MemoryReport(num_params=num_params,
                      components={k: v for k, v in components.items() if v},
                      peak_bytes=None if step is None else float(peak_bytes(step)))
