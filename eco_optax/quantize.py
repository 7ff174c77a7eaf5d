"""Low-precision storage formats, scales and rounding.

A :class:`QuantFormat` says how one tensor is stored: its ml_dtypes storage dtype
(``float8_e4m3fn``, ``float8_e5m2``, ``int8``, ``int4``, or ``float32`` for the
lossless reference format), the granularity of its FP32 scales, and the *scale
policy* that decides how the scale moves as training changes the weights.

A tensor ``x`` is stored as a :class:`QuantizedArray` of codes ``c`` and scales
``s`` with the symmetric absmax quantizer of the paper::

    s = headroom * max|x| / rho,      c = R(x / s) in the format's grid,   Q(x) = s * c

where ``rho`` is the format's largest finite magnitude (448 for E4M3, 57344 for
E5M2, 127 for INT8, 7 for INT4) and ``R`` rounds to nearest (even) or
stochastically (``E[R(y)] = y``). Values beyond ``rho * s`` saturate to
``+-rho`` *before* the cast: ``float8_e4m3fn`` has no infinity and a cast of an
overflowing value gives NaN, and float-to-int casts truncate, so every cast here
is preceded by an explicit rounding and clipping.

Scale policies. The scale of step ``t+1`` is a function of the *stored* weights
of step ``t`` only (delayed scaling, as in FP8 training recipes)::

    fixed:    s' = s
    sticky:   s' = s * h        if max|c| >= rho             (a code saturated: grow)
              s' = s / h        if max|c| * h**2 < rho       (two growth steps unused: shrink)
              s' = s            otherwise
    dynamic:  s' = h * max|c| * s / rho                      (absmax every step, with headroom h)

Float formats round every absmax scale up to a power of two (no precision is
lost: a float grid looks the same in every binade).

Because ``s'`` depends only on what is stored, :func:`eco_optax.apply_updates` can
recompute it bit for bit without access to the optimizer state, and an update
cannot feed back into its own scale within a step (the instability of recomputing
a tensor-wise absmax from each step's target, which ECO's injected momentum then
pushes past the absmax). With ``h = 2`` a sticky float format only ever rescales by
a power of two, which is exact for every normal code.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

Scaling = Literal["tensor", "channel", "block", "none"]
ScalePolicy = Literal["fixed", "sticky", "dynamic"]
Rounding = Literal["nearest", "stochastic"]

SCALINGS = ("tensor", "channel", "block", "none")
SCALE_POLICIES = ("fixed", "sticky", "dynamic")
ROUNDINGS = ("nearest", "stochastic")

# Scales below this are treated as "no scale yet": dividing by an FP32 subnormal
# overflows (and XLA flushes subnormals to zero on CPU and GPU).
_MIN_SCALE = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True)
class QuantFormat:
  """How a tensor is stored: dtype, scale granularity and scale policy.

  Attributes:
    name: short name, e.g. ``"fp8_e4m3"``.
    dtype: storage dtype (an ml_dtypes / numpy dtype).
    scaling: ``"tensor"`` (one scale), ``"channel"`` (one scale per index of
      ``axis``: row-wise scaling of the paper, per output channel of a Flax
      ``(in, out)`` kernel with the default ``axis=-1``), ``"block"`` (one
      scale per ``block_size`` consecutive elements along ``axis``) or ``"none"``
      (scale fixed at 1: formats with an 8-bit exponent, bfloat16).
    axis: the channel axis, or the axis cut into blocks.
    block_size: elements per block for ``scaling="block"``.
    scale_policy: ``"fixed"``, ``"sticky"`` or ``"dynamic"`` (module docstring).
    headroom: ``h`` above: initial scale ``h * absmax / rho`` and growth factor.
  """

  name: str
  dtype: np.dtype
  scaling: Scaling = "tensor"
  axis: int = -1
  block_size: int = 32
  scale_policy: ScalePolicy = "sticky"
  headroom: float = 2.0

  def __post_init__(self):
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    if self.scaling not in SCALINGS:
      raise ValueError(
          f"{self.name}: scaling must be one of {SCALINGS}, got {self.scaling!r}")
    if self.scale_policy not in SCALE_POLICIES:
      raise ValueError(f"{self.name}: scale_policy must be one of "
                       f"{SCALE_POLICIES}, got {self.scale_policy!r}")
    if self.scaling == "block" and self.block_size < 1:
      raise ValueError(f"{self.name}: block_size must be >= 1, got {self.block_size}")
    if not self.headroom >= 1.0:
      raise ValueError(f"{self.name}: headroom must be >= 1, got {self.headroom}")

  @property
  def lossless(self) -> bool:
    """True for the float32 reference format: no scale, no rounding."""
    return self.dtype == np.dtype(np.float32)

  @property
  def is_integer(self) -> bool:
    try:
      ml_dtypes.iinfo(self.dtype)
    except ValueError:
      return False
    return True

  @property
  def max_value(self) -> float:
    """``rho``: the largest finite magnitude used by the absmax scale."""
    if self.lossless:
      return 1.0
    if self.is_integer:
      return float(ml_dtypes.iinfo(self.dtype).max)
    return float(ml_dtypes.finfo(self.dtype).max)

  @property
  def bits(self) -> int:
    """Bits per stored element (int4 counts as 4, packed)."""
    if self.is_integer:
      return int(ml_dtypes.iinfo(self.dtype).bits)
    return int(ml_dtypes.finfo(self.dtype).bits)

  def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the FP32 scale array of a tensor of ``shape``."""
    if self.lossless or self.scaling in ("tensor", "none"):
      return ()
    axis = _normalize_axis(self.axis, len(shape), self.name)
    if self.scaling == "channel":
      return tuple(n if i == axis else 1 for i, n in enumerate(shape))
    if shape[axis] % self.block_size:
      raise ValueError(
          f"{self.name}: block scaling needs axis {self.axis} of shape {shape} "
          f"to be a multiple of block_size={self.block_size}")
    return tuple(
        n // self.block_size if i == axis else n for i, n in enumerate(shape))

  def check_shape(self, shape: tuple[int, ...], where: str = "") -> None:
    """Raises a ``ValueError`` (prefixed by ``where``) if ``shape`` can't be stored."""
    prefix = f"{where}: " if where else ""
    if not shape or 0 in shape:
      raise ValueError(f"{prefix}cannot quantize a tensor of shape {shape} "
                       f"(scalars and zero-size tensors have no scale)")
    try:
      self.scale_shape(tuple(shape))
    except ValueError as err:
      raise ValueError(f"{prefix}{err}") from None


def _normalize_axis(axis: int, ndim: int, name: str) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{name}: axis {axis} is out of range for a {ndim}-d tensor")
  return axis % ndim


def _make(name, dtype, scaling, block_size, scale_policy, headroom, axis):
  return QuantFormat(name=name, dtype=dtype, scaling=scaling, axis=axis,
                     block_size=block_size, scale_policy=scale_policy,
                     headroom=headroom)


def fp8_e4m3(scaling: Scaling = "channel", *, block_size: int = 32,
             scale_policy: ScalePolicy = "sticky", headroom: float = 2.0,
             axis: int = -1) -> QuantFormat:
  """FP8 E4M3 (``float8_e4m3fn``, max 448, no inf); the paper's row-wise default.

  Example:
    >>> import eco_optax as eco
    >>> eco.fp8_e4m3().max_value
    448.0
  """
  return _make("fp8_e4m3", ml_dtypes.float8_e4m3fn, scaling, block_size,
               scale_policy, headroom, axis)


def fp8_e5m2(scaling: Scaling = "channel", *, block_size: int = 32,
             scale_policy: ScalePolicy = "sticky", headroom: float = 2.0,
             axis: int = -1) -> QuantFormat:
  """FP8 E5M2 (``float8_e5m2``, max 57344): more range, one mantissa bit less."""
  return _make("fp8_e5m2", ml_dtypes.float8_e5m2, scaling, block_size,
               scale_policy, headroom, axis)


def int8(scaling: Scaling = "channel", *, block_size: int = 32,
         scale_policy: ScalePolicy = "sticky", headroom: float = 1.0,
         axis: int = -1) -> QuantFormat:
  """INT8, symmetric codes in ``[-127, 127]``."""
  return _make("int8", np.int8, scaling, block_size, scale_policy, headroom, axis)


def int4(scaling: Scaling = "tensor", *, block_size: int = 32,
         scale_policy: ScalePolicy = "fixed", headroom: float = 1.0,
         axis: int = -1) -> QuantFormat:
  """INT4 (ml_dtypes ``int4``), symmetric codes in ``[-7, 7]``; tensor-wise as in the paper.

  Example:
    >>> import eco_optax as eco
    >>> fmt = eco.int4(scaling="block", block_size=32)
    >>> fmt.scale_shape((64, 128))
    (64, 4)
  """
  return _make("int4", ml_dtypes.int4, scaling, block_size, scale_policy,
               headroom, axis)


def bf16() -> QuantFormat:
  """bfloat16 storage, unscaled: BF16 training, with or without a master copy.

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_array(jnp.array([[1.0, 1.0 + 2.0**-9]]), eco.bf16())
    >>> q.values.dtype, q.dequantize().tolist()      # the small increment vanishes
    (dtype(bfloat16), [[1.0, 1.0]])
  """
  return QuantFormat(name="bf16", dtype=jnp.bfloat16, scaling="none",
                     scale_policy="fixed", headroom=1.0)


def lossless() -> QuantFormat:
  """Float32 storage with no scale and no rounding: ECO reduces to the plain optimizer."""
  return QuantFormat(name="lossless", dtype=np.float32, scale_policy="fixed",
                     headroom=1.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A tensor stored as ``values * scale`` in a low-precision format.

  ``values`` has the tensor's shape and the format's dtype; ``scale`` is FP32 with
  :meth:`QuantFormat.scale_shape`. ``fmt`` is static pytree metadata, so a tree of
  ``QuantizedArray`` goes through ``jit``, ``jax.device_put`` and sharding as-is.
  """

  values: jax.Array
  scale: jax.Array
  fmt: QuantFormat = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """``Q(x) = s * c`` in ``dtype`` (float32 by default)."""
    return dequantize(self, dtype)


def _blocked(x: jax.Array, fmt: QuantFormat) -> jax.Array:
  """Views ``x`` so that its scale broadcasts: splits the block axis in two."""
  if fmt.scaling != "block":
    return x
  axis = _normalize_axis(fmt.axis, x.ndim, fmt.name)
  n = x.shape[axis]
  return x.reshape(x.shape[:axis] + (n // fmt.block_size, fmt.block_size)
                   + x.shape[axis + 1:])


def _unblocked(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return x.reshape(shape)


def _expand_scale(scale: jax.Array, fmt: QuantFormat, ndim: int) -> jax.Array:
  """Scale shaped to broadcast against :func:`_blocked` values."""
  if fmt.scaling != "block":
    return scale
  axis = _normalize_axis(fmt.axis, ndim, fmt.name)
  return jnp.expand_dims(scale, axis + 1)


def _group_absmax(x: jax.Array, fmt: QuantFormat) -> jax.Array:
  """``max|x|`` over each scale group, shaped like the scale."""
  ax = jnp.abs(x)
  if fmt.scaling == "tensor":
    return jnp.max(ax)
  axis = _normalize_axis(fmt.axis, x.ndim, fmt.name)
  if fmt.scaling == "channel":
    others = tuple(i for i in range(x.ndim) if i != axis)
    return jnp.max(ax, axis=others, keepdims=True)
  return jnp.max(_blocked(ax, fmt), axis=axis + 1)


def _absmax_scale(amax: jax.Array, fmt: QuantFormat) -> jax.Array:
  """``h * amax / rho``, rounded up to a power of two for float formats.

  A float grid is scale-invariant across binades, so a power-of-two scale costs
  no precision, keeps round numbers exact, and makes every later power-of-two
  rescale (the sticky policy with ``h = 2``) exact.
  """
  scale = fmt.headroom * amax / fmt.max_value
  if fmt.is_integer:
    return scale
  mantissa, exponent = jnp.frexp(scale)          # scale = mantissa * 2**exponent
  return jnp.ldexp(jnp.ones_like(scale),
                   jnp.where(mantissa == 0.5, exponent - 1, exponent))


def initial_scale(x: jax.Array, fmt: QuantFormat) -> jax.Array:
  """``s_0 = h * max|x| / rho`` per group; an all-zero group gets ``1 / rho``.

  Float formats round ``s_0`` up to a power of two. A zero scale would freeze a
  group at zero forever (nothing stored to rescale from), so an all-zero group
  starts with the range ``[-1, 1]``.
  """
  if fmt.lossless or fmt.scaling == "none":
    return jnp.ones((), jnp.float32)
  scale = _absmax_scale(_group_absmax(x.astype(jnp.float32), fmt), fmt)
  return jnp.where(scale >= _MIN_SCALE, scale, 1.0 / fmt.max_value).astype(
      jnp.float32)


def _code_absmax(values: jax.Array, fmt: QuantFormat) -> jax.Array:
  """``max|c|`` per scale group, in FP32, without converting every code.

  Float formats are sign-magnitude, so the magnitudes order like their bits with
  the sign bit cleared: reduce the integers, then decode only the maxima.
  """
  if fmt.is_integer:
    return _group_absmax(values.astype(jnp.int8), fmt).astype(jnp.float32)
  bits = jnp.dtype(f"uint{fmt.bits}")
  sign_cleared = bits.type((1 << (fmt.bits - 1)) - 1)
  top = _group_absmax(jax.lax.bitcast_convert_type(values, bits) & sign_cleared, fmt)
  return jax.lax.bitcast_convert_type(top, fmt.dtype).astype(jnp.float32)


def next_scale(q: QuantizedArray) -> jax.Array:
  """The scale ``s'`` of the next stored weights: a function of ``q`` alone.

  Implements the ``fixed`` / ``sticky`` / ``dynamic`` policies of the module
  docstring. Groups whose codes are all zero keep their scale.
  """
  fmt, scale = q.fmt, q.scale
  if fmt.lossless or fmt.scale_policy == "fixed" or fmt.scaling == "none":
    return scale
  rho, h = fmt.max_value, fmt.headroom
  code_max = _code_absmax(q.values, fmt)
  if fmt.scale_policy == "sticky":
    grown = jnp.where(code_max >= rho, scale * h, scale)
    shrink = (code_max > 0) & (code_max * h * h < rho) & (scale / h >= _MIN_SCALE)
    return jnp.where(shrink, scale / h, grown).astype(jnp.float32)
  new = _absmax_scale(code_max * scale, fmt)
  return jnp.where(new >= _MIN_SCALE, new, scale).astype(jnp.float32)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijective avalanche mix of uint32."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def stochastic_uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform ``[0, 1)`` FP32 noise for stochastic rounding, 24 random bits each.

  A counter-based hash keyed by two 32-bit words drawn from ``key``:
  ``u_i = fmix32(fmix32(i + k0) ^ k1) / 2^32`` over the element index ``i``. On CPU
  it is about 10x cheaper than ``jax.random.uniform`` (threefry), which would
  otherwise dominate the optimizer step; it is deterministic given ``key``, built
  from ``broadcasted_iota`` so that sharded arrays draw exactly the numbers an
  unsharded one does, and it passes the unbiasedness and independence tests of
  ``tests/test_quantize.py``. It is not a cryptographic generator.
  """
  k0, k1 = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(
        stride % 2**32)
    stride *= shape[dim]
  bits = _fmix32(_fmix32(index + k0) ^ k1)
  return (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def _float_grid_spacing(y: jax.Array, fmt: QuantFormat) -> jax.Array:
  """Distance between the float-format grid points around ``|y|`` (code units).

  ``2^(max(floor(log2|y|), minexp) - nmant)``, read off the FP32 exponent bits.
  """
  info = ml_dtypes.finfo(fmt.dtype)
  exponent = (jax.lax.bitcast_convert_type(jnp.abs(y), jnp.int32) >> 23) - 127
  exponent = jnp.maximum(exponent, info.minexp) - info.nmant
  return jax.lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32)


def _round_to_grid(y: jax.Array, fmt: QuantFormat, rounding: Rounding,
                   key: jax.Array | None) -> jax.Array:
  """Rounds ``y`` (in code units, already clipped to ``[-rho, rho]``) to codes.

  Returns the codes as FP32 values on the format's grid (the cast to the storage
  dtype is then exact). With ``delta`` the grid spacing at ``y`` (1 for integers,
  read off the exponent bits for floats), nearest is ``delta * round(y / delta)``,
  half to even, which is the IEEE cast; stochastic is
  ``R(y) = lo + delta * [u < (y - lo) / delta]`` with ``lo = delta * floor(y / delta)``
  and ``u ~ U[0, 1)``, so ``E[R(y)] = y``.
  """
  delta = 1.0 if fmt.is_integer else _float_grid_spacing(y, fmt)
  steps = y * (1.0 / delta)                 # exact: delta is a power of two
  if rounding == "nearest":
    return jnp.round(steps) * delta
  lo = jnp.floor(steps)
  up = stochastic_uniform(key, y.shape) < steps - lo
  return (lo + up) * delta


def _code_units(x: jax.Array, scale: jax.Array, fmt: QuantFormat) -> jax.Array:
  """``x / s`` in the :func:`_blocked` view: one division per scale, not per element."""
  return _blocked(x.astype(jnp.float32), fmt) * (1.0 / _expand_scale(scale, fmt, x.ndim))


def _store(x: jax.Array, scale: jax.Array, fmt: QuantFormat, rounding: Rounding,
           key: jax.Array | None) -> tuple[QuantizedArray, jax.Array]:
  """:func:`quantize_with_scale` and the FP32 value ``Q(x)`` it stores.

  The value comes from the FP32 codes before the cast, bit-identical to
  ``dequantize`` of the result, without converting the codes back.
  """
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
  if rounding == "stochastic" and key is None and not fmt.lossless:
    raise ValueError("stochastic rounding needs a PRNG key")
  x = jnp.asarray(x, jnp.float32)
  if fmt.lossless:
    return QuantizedArray(x, jnp.ones((), jnp.float32), fmt), x
  rho = fmt.max_value
  y = jnp.clip(_code_units(x, scale, fmt), -rho, rho)
  y = jnp.where(jnp.isfinite(y), y, 0.0)
  codes = _round_to_grid(y, fmt, rounding, key)
  stored = QuantizedArray(_unblocked(codes.astype(fmt.dtype), x.shape),
                          scale.astype(jnp.float32), fmt)
  return stored, _unblocked(codes * _expand_scale(scale, fmt, x.ndim), x.shape)


def quantize_with_scale(x: jax.Array, scale: jax.Array, fmt: QuantFormat,
                        rounding: Rounding = "nearest",
                        key: jax.Array | None = None) -> QuantizedArray:
  """Stores ``x`` with a given scale: ``c = R(clip(x / s, -rho, rho))``.

  Non-finite entries of ``x`` become code 0; callers that must not lose weights
  (:func:`eco_optax.apply_updates`, the optimizers) replace them beforehand.
  """
  return _store(x, scale, fmt, rounding, key)[0]


def quantize(x: jax.Array, fmt: QuantFormat, rounding: Rounding = "nearest",
             key: jax.Array | None = None) -> QuantizedArray:
  """Stores ``x`` in ``fmt`` with the initial absmax scale ``h * max|x| / rho``.

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_array(jnp.array([[1024.0, -0.5, 3.0]]), eco.fp8_e4m3("tensor"))
    >>> q.values.dtype, float(q.scale)      # 2 * 1024 / 448 rounded up to a power of two
    (dtype(float8_e4m3fn), 8.0)
    >>> q.dequantize().tolist()
    [[1024.0, -0.5, 3.0]]
  """
  fmt.check_shape(tuple(jnp.shape(x)))
  return quantize_with_scale(x, initial_scale(jnp.asarray(x), fmt), fmt,
                             rounding, key)


def dequantize(q: QuantizedArray, dtype=jnp.float32) -> jax.Array:
  """``Q(x) = s * c`` (computed in FP32, returned in ``dtype``)."""
  if q.fmt.lossless:
    return q.values.astype(dtype)
  shape = q.values.shape
  codes = _blocked(q.values.astype(jnp.float32), q.fmt)
  x = codes * _expand_scale(q.scale, q.fmt, len(shape))
  return _unblocked(x, shape).astype(dtype)


def encode_residual(residual: jax.Array, like: QuantizedArray,
                    key: jax.Array) -> jax.Array:
  """Stores a quantization residual ``e`` compactly: ``e / s`` in ``bfloat16``.

  In the code units of ``like`` (``s`` its scale), a residual is at most about a
  grid step, and bfloat16 keeps it to 8 significant bits whatever its size (FP8
  would lose the small residuals of weights that sit still to its subnormals).
  It is rounded stochastically: the residuals of a weight that sits still grow
  step after step, and round-to-nearest would bias every one the same way.
  """
  codes = _unblocked(_code_units(residual, like.scale, like.fmt), residual.shape)
  return _round_to_grid(codes, bf16(), "stochastic", key).astype(jnp.bfloat16)


def decode_residual(codes: jax.Array, like: QuantizedArray) -> jax.Array:
  """The FP32 residual stored by :func:`encode_residual` with the scale of ``like``."""
  return dequantize(QuantizedArray(codes, like.scale, like.fmt))


def requantize(q: QuantizedArray, target: jax.Array,
               rounding: Rounding = "nearest",
               key: jax.Array | None = None) -> QuantizedArray:
  """Stores ``target`` as the successor of ``q``: scale :func:`next_scale` of ``q``.

  Entries of ``target`` that are not finite keep their stored value, so a bad
  gradient can never write NaN or inf into the weights.
  """
  return requantize_with_value(q, target, rounding, key)[0]


def requantize_with_value(q: QuantizedArray, target: jax.Array,
                          rounding: Rounding = "nearest",
                          key: jax.Array | None = None,
                          stored: jax.Array | None = None
                          ) -> tuple[QuantizedArray, jax.Array]:
  """:func:`requantize` and the FP32 value of the result (``dequantize`` of it).

  ``stored``, the FP32 value of ``q``, may be passed when the caller has it.
  """
  stored = dequantize(q) if stored is None else stored
  target = jnp.where(jnp.isfinite(target), target, stored)
  return _store(target, next_scale(q), q.fmt, rounding, key)
