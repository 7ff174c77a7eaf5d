"""Low-precision storage formats, scales and rounding.

A :class:`QuantFormat` says how one tensor is stored: its ml_dtypes storage dtype
(``float8_e4m3fn``, ``float8_e5m2``, ``int8``, ``int4``, ``float4_e2m1fn``, or
``float32`` for the lossless reference format), the granularity of its scales and
the dtype they are stored in, and the *scale policy* that decides how the scale
moves as training changes the weights.

A tensor ``x`` is stored as a :class:`QuantizedArray` of codes ``c`` and scales
``s`` with the symmetric absmax quantizer of the paper::

    s = headroom * max|x| / rho,      c = R(x / s) in the format's grid,   Q(x) = s * c

where ``rho`` is the format's largest finite magnitude (448 for E4M3, 57344 for
E5M2, 127 for INT8, 7 for INT4, 6 for E2M1) and ``R`` rounds to nearest (even) or
stochastically (``E[R(y)] = y``). Values beyond ``rho * s`` saturate to
``+-rho`` *before* the cast: ``float8_e4m3fn`` has no infinity and a cast of an
overflowing value gives NaN, and float-to-int casts truncate, so every cast here
is preceded by an explicit rounding and clipping.

Scale policies. The scale of step ``t+1`` is a function of the *stored* weights
of step ``t`` only (delayed scaling, as in FP8 training recipes)::

    fixed:    s' = s
    sticky:   s' = s * g        if #{|c| = rho} > p * n      (codes saturated: grow)
              s' = s / g        if max|c| * h * g < rho      (room for h after a shrink: shrink)
              s' = s            otherwise
    dynamic:  s' = h * max|c| * s / rho                      (absmax every step, with headroom h)

with ``g`` the growth factor (``h`` unless given), ``n`` the group's size and
``p`` the saturated fraction (0 for the float formats: one saturated code
grows the scale; 1/64 for INT4, whose few clipped outliers cost less than a
coarser grid for all). A group whose codes are all zero shrinks too, down to
the range ``[-2^-20, 2^-20]`` (:func:`zero_group_floor`): it has no magnitude to
keep (it starts at the range ``[-2^-7, 2^-7]``, :data:`ZERO_GROUP_START`), and a
zero-initialized layer's first updates may be smaller still; ``fixed`` and
``dynamic`` keep it. An integer ``dynamic`` scale is ``max|c| * s / k`` with
``k = floor(rho / h)``, so that the largest code lands on an integer and the
scale is a fixed point (rounding ``rho / h`` up would grow it every step).
The scale is then stored in the format's scale dtype (below; a no-op for FP32
scales).

What a rescale does to ECO's error bookkeeping: a scale that moves re-rounds
every code of its group onto the new grid within the same step, so the step's
quantization error ``e`` holds that re-rounding too and ECO injects it into the
momentum like any other error (master weights simply re-round their FP32 copy).
The memory-free rule assumes ``e_t ~ e_{t+1}``, which a rescale breaks for one
step; it is exact for float formats rescaled by a power of two (every normal
code stays where it is), which is why their growth factor is 2. ``fixed``
never re-rounds but clips: an update that would take a weight past ``rho * s``
is lost (naive, master weights' stored copy) or kept as a debt in the momentum
that can never be paid (ECO), and :func:`eco_optax.apply_updates` warns when
more than :data:`SATURATION_WARNING` of a fixed-scale leaf's codes saturate.

Float formats round every absmax scale up to a power of two (no precision is
lost: a float grid looks the same in every binade).

Scale storage. Scales are FP32 unless the format says otherwise: the FP4 formats
of :func:`fp4_e2m1` store one byte per block, MXFP4 a power of two in
``float8_e8m0fnu``, NVFP4 an ``float8_e4m3fn`` code ``b`` times one FP32 tensor
scale ``S`` per tensor (per matrix of a stack; :attr:`QuantizedArray.tensor_scale`)::

    s = b * S,     b = ceil_e4m3(s~ / S) in [2^-9, 448],     S = 2^ceil(log2(h * max s~ / 448))

where ``s~`` is the FP32 scale the policy asks for, rounded *up* onto the scale
grid so that no element saturates that would not have, and the max runs over the
groups that are not all zero. ``S`` leaves the largest block scale a factor ``h``
below 448, room for one sticky growth step, and stays a power of two (``b * S``
is exact): ``fixed`` keeps it, ``dynamic`` chooses it again from the new block
scales, ``sticky`` doubles it when a block scale would pass 448 and halves it
when the largest is below 448 / 4. Every block scale stays representable.

Because ``s'`` depends only on what is stored, :func:`eco_optax.apply_updates` can
recompute it bit for bit without access to the optimizer state, and an update
cannot feed back into its own scale within a step (the instability of recomputing
a tensor-wise absmax from each step's target, which ECO's injected momentum then
pushes past the absmax). With ``h = 2`` a sticky float format only ever rescales by
a power of two, which is exact for every normal code.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

Scaling = Literal["tensor", "channel", "block", "none"]
ScalePolicy = Literal["fixed", "sticky", "dynamic"]
Rounding = Literal["nearest", "stochastic"]

Fp4Style = Literal["mxfp4", "nvfp4"]

SCALINGS = ("tensor", "channel", "block", "none")
SCALE_POLICIES = ("fixed", "sticky", "dynamic")
ROUNDINGS = ("nearest", "stochastic")
# Scale storage: FP32, a power of two (E8M0, MXFP4), or E4M3 times an FP32 tensor scale (NVFP4).
SCALE_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.float8_e8m0fnu),
                np.dtype(ml_dtypes.float8_e4m3fn))
FP4_STYLES = ("mxfp4", "nvfp4")

# Scales below this are treated as "no scale yet": dividing by an FP32 subnormal
# overflows (and XLA flushes subnormals to zero on CPU and GPU).
_MIN_SCALE = float(np.finfo(np.float32).tiny)
# E4M3 block scale codes of two-level (NVFP4) scales: the smallest positive one
# (subnormal) and the largest. A block scale is never zero and never NaN.
_E4M3_TINY = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).smallest_subnormal)
_E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


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
      (scale fixed at 1: formats with an 8-bit exponent, bfloat16). A tensor of
      more than two dimensions is a stack of matrices (the last two axes: layers
      under ``nn.scan``, experts, convolution taps), and ``"tensor"`` and
      ``"channel"`` scales are per matrix: a ``(L, in, out)`` kernel gets ``L``
      tensor scales (shape ``(L, 1, 1)``) or ``(L, 1, out)`` channel scales.
    axis: the channel axis, or the axis cut into blocks.
    block_size: elements per block for ``scaling="block"``.
    scale_policy: ``"fixed"``, ``"sticky"`` or ``"dynamic"`` (module docstring).
    headroom: ``h`` above: initial scale ``h * absmax / rho`` (and the dynamic
      policy's room).
    growth_factor: ``g``, the factor by which a sticky scale grows or shrinks;
      ``None`` means ``g = h``.
    saturated_fraction: ``p``: a sticky scale grows when more than this
      fraction of its group's codes sit at ``+-rho``; ``0`` (the float formats'
      default): as soon as one does.
    scale_dtype: storage dtype of the scales (:data:`SCALE_DTYPES`): ``float32``,
      ``float8_e8m0fnu`` (powers of two) or ``float8_e4m3fn`` (block scale codes
      times an FP32 tensor scale, :attr:`has_tensor_scale`).
  """

  name: str
  dtype: np.dtype
  scaling: Scaling = "tensor"
  axis: int = -1
  block_size: int = 32
  scale_policy: ScalePolicy = "sticky"
  headroom: float = 2.0
  scale_dtype: np.dtype = np.dtype(np.float32)
  growth_factor: float | None = None
  saturated_fraction: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    object.__setattr__(self, "scale_dtype", np.dtype(self.scale_dtype))
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f"{self.name}: scale_dtype must be one of "
                       f"{[d.name for d in SCALE_DTYPES]}, got {self.scale_dtype.name}")
    if self.scale_dtype != np.float32 and (self.lossless or self.scaling == "none"):
      raise ValueError(f"{self.name}: scale_dtype={self.scale_dtype.name} needs "
                       f"scales, but the format is unscaled")
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
    if not 0.0 <= self.saturated_fraction < 1.0:
      raise ValueError(f"{self.name}: saturated_fraction must be in [0, 1), got "
                       f"{self.saturated_fraction}")
    scaled = not self.lossless and self.scaling != "none"
    if self.scale_policy == "sticky" and scaled and not self.growth > 1.0:
      raise ValueError(f"{self.name}: a sticky scale moves by growth_factor (the headroom "
                       f"when not given), so {self.growth} would never move it; use a "
                       "factor > 1 (e.g. 2) or scale_policy='fixed'")
    if self.scale_policy == "dynamic" and scaled and self.headroom == 1.0:
      raise ValueError(f"{self.name}: a dynamic scale is h * max|Q(w)| / rho, so with "
                       "headroom=1 no weight can ever grow past the current maximum; use "
                       "headroom > 1 (e.g. 2) or scale_policy='sticky'")

  @property
  def growth(self) -> float:
    """``g``: the sticky policy's growth (and shrink) factor."""
    return self.headroom if self.growth_factor is None else self.growth_factor

  @property
  def lossless(self) -> bool:
    """True for the float32 reference format: no scale, no rounding."""
    return self.dtype == np.dtype(np.float32)

  @property
  def has_tensor_scale(self) -> bool:
    """True when E4M3 scale codes are multiplied by an FP32 tensor scale (NVFP4)."""
    return self.scale_dtype == ml_dtypes.float8_e4m3fn

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
    """Shape of the scale array (``QuantizedArray.scale``) of a tensor of ``shape``."""
    if self.lossless or self.scaling == "none" or (self.scaling == "tensor"
                                                   and len(shape) <= 2):
      return ()
    if self.scaling == "tensor":
      return tuple(shape[:-2]) + (1, 1)
    axis = _normalize_axis(self.axis, len(shape), self.name)
    if self.scaling == "channel":
      reduced = _reduced_axes(len(shape), axis)
      return tuple(1 if i in reduced else n for i, n in enumerate(shape))
    if shape[axis] % self.block_size:
      raise ValueError(
          f"{self.name}: block scaling needs axis {self.axis} of shape {shape} "
          f"to be a multiple of block_size={self.block_size}" + (
              " (for a stack of (in, out) kernels, blocks along the input features "
              "are axis=-2)" if len(shape) > 2 and axis == 0 else ""))
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

  def check_sharding(self, x: jax.Array, where: str = "") -> None:
    """Raises a ``ValueError`` (prefixed by ``where``) if ``x`` is sharded over explicit
    mesh axes so that a device would hold part of a block of one scale."""
    if self.scaling != "block" or not x.ndim:
      return
    axis = _normalize_axis(self.axis, x.ndim, self.name)
    parts, spec = explicit_shards(x, axis)
    if parts > 1 and x.shape[axis] % (parts * self.block_size):
      prefix = f"{where}: " if where else ""
      raise ValueError(
          f"{prefix}{self.name}: a leaf of shape {tuple(x.shape)} sharded "
          f"{spec} over explicit mesh axes splits its scale "
          f"blocks between devices: {x.shape[axis]} elements along axis {self.axis} in "
          f"{parts} shards are not whole blocks of {self.block_size}. Shard that axis so "
          f"each device holds whole blocks (a multiple of {parts * self.block_size}), "
          "shard another axis, or choose a block_size that divides its shards.")


def has_sharded_type(x: jax.Array) -> bool:
  """Whether ``x``'s type carries a sharding (``jax.make_mesh``'s explicit axes)."""
  spec = getattr(jax.typeof(x).sharding, "spec", None)
  return spec is not None and any(axes is not None for axes in spec)


def always_holds(x: jax.Array) -> jax.Array:
  """A predicate on ``x`` that always holds (NaN too) and that XLA does not fold away:
  what depends on it waits for ``x``."""
  first = x[(0,) * x.ndim]                 # no reshape: a sharded array stays as it is
  return (first == first) | (first != first)


def explicit_shards(x: jax.Array, axis: int) -> tuple[int, jax.sharding.PartitionSpec]:
  """``(shards, spec)``: how many pieces explicit mesh axes cut ``x``'s ``axis`` into
  (1 without explicit axes), and the partition spec of ``x``'s type."""
  sharding = jax.typeof(x).sharding
  spec = tuple(getattr(sharding, "spec", None) or ())
  axes = spec[axis] if axis < len(spec) else None
  axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
  return (math.prod(sharding.mesh.shape[a] for a in axes),
          jax.sharding.PartitionSpec(*spec))


def _per_matrix(reduce: Callable, x: jax.Array) -> jax.Array:
  """``reduce`` (``jnp.max``, ``jnp.any``) over each matrix of ``x``: a scalar for up to
  two dimensions, shape ``(..., 1, 1)`` for a stack."""
  return reduce(x) if x.ndim <= 2 else reduce(x, axis=(-2, -1), keepdims=True)


def _reduced_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
  """The axes a tensor (``axis`` None) or channel scale reduces over: those of the
  matrix (the last two axes), but the channel axis; leading axes are a stack."""
  return tuple(i for i in range(max(0, ndim - 2), ndim) if i != axis)


def _normalize_axis(axis: int, ndim: int, name: str) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{name}: axis {axis} is out of range for a {ndim}-d tensor")
  return axis % ndim


def _make(name, dtype, scaling, block_size, scale_policy, headroom, axis,
          growth_factor=None, saturated_fraction=0.0):
  return QuantFormat(name=name, dtype=dtype, scaling=scaling, axis=axis,
                     block_size=block_size, scale_policy=scale_policy,
                     headroom=headroom, growth_factor=growth_factor,
                     saturated_fraction=saturated_fraction)


def fp8_e4m3(scaling: Scaling = "channel", *, block_size: int = 32,
             scale_policy: ScalePolicy = "sticky", headroom: float = 2.0,
             axis: int = -1, growth_factor: float | None = None,
             saturated_fraction: float = 0.0) -> QuantFormat:
  """FP8 E4M3 (``float8_e4m3fn``, max 448, no inf); the paper's row-wise default.

  Example:
    >>> import eco_optax as eco
    >>> eco.fp8_e4m3().max_value
    448.0
  """
  return _make("fp8_e4m3", ml_dtypes.float8_e4m3fn, scaling, block_size,
               scale_policy, headroom, axis, growth_factor, saturated_fraction)


def fp8_e5m2(scaling: Scaling = "channel", *, block_size: int = 32,
             scale_policy: ScalePolicy = "sticky", headroom: float = 2.0,
             axis: int = -1, growth_factor: float | None = None,
             saturated_fraction: float = 0.0) -> QuantFormat:
  """FP8 E5M2 (``float8_e5m2``, max 57344): more range, one mantissa bit less."""
  return _make("fp8_e5m2", ml_dtypes.float8_e5m2, scaling, block_size,
               scale_policy, headroom, axis, growth_factor, saturated_fraction)


def int8(scaling: Scaling = "channel", *, block_size: int = 32,
         scale_policy: ScalePolicy = "sticky", headroom: float = 1.25,
         axis: int = -1, growth_factor: float | None = 1.25,
         saturated_fraction: float = 0.0) -> QuantFormat:
  """INT8, symmetric codes in ``[-127, 127]``; row-wise sticky scales, ``h = 1.25``.

  The largest weight of a channel (one scale per index of ``axis``) starts at
  code 102 (``127 / 1.25``); the scale grows by 1.25 when a code reaches 127
  and shrinks by 1.25 when every code stays below 81. A growth re-rounds the
  channel on a grid 127 steps fine, cheaper than clipping a weight that has to
  grow (``docs/guide.md`` has the measurements).

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_array(jnp.array([[1.0], [-0.5]]), eco.int8())
    >>> q.values.tolist()
    [[102], [-51]]
  """
  return _make("int8", np.int8, scaling, block_size, scale_policy, headroom, axis,
               growth_factor, saturated_fraction)


def int4(scaling: Scaling = "tensor", *, block_size: int = 32,
         scale_policy: ScalePolicy = "sticky", headroom: float = 1.0,
         axis: int = -1, growth_factor: float | None = 1.25,
         saturated_fraction: float = 1 / 64) -> QuantFormat:
  """INT4 (ml_dtypes ``int4``), symmetric codes in ``[-7, 7]``; tensor-wise as in the paper.

  The scale starts at the exact absmax (``h = 1``: all 15 codes in use) and is
  sticky: it grows by ``growth_factor`` 1.25 once more than ``saturated_fraction``
  (1/64) of the tensor's codes sit at +-7, and shrinks by 1.25 when every code
  stays within +-5 (below ``7 / 1.25``). On a grid this coarse a few weights clipped at the top cost
  less than a coarser grid for all (the MSE-optimal 4-bit clip of a Gaussian
  leaves about 1% of it saturated), while weights that all have to grow (a small
  initialisation, a fine-tune that moves far) still can. The absmax
  initialisation fills the top code with the tail of the initial distribution:
  uniform and truncated-normal initialisations (Flax's default) put more than
  1/64 of the codes at +-7, so the first step grows such a leaf's scale and
  re-rounds it, whatever the gradient. Starting without codes at +-7
  (``headroom=7/6.5``) avoids it, and cost master weights more than it gained ECO
  on the benchmark LM (``docs/benchmarks.md``, "Scale policies").

  Example:
    >>> import eco_optax as eco
    >>> fmt = eco.int4(scaling="block", block_size=32)
    >>> fmt.scale_shape((64, 128))
    (64, 4)
  """
  return _make("int4", ml_dtypes.int4, scaling, block_size, scale_policy,
               headroom, axis, growth_factor, saturated_fraction)


def fp4_e2m1(style: Fp4Style = "mxfp4", *, axis: int = -2,
             block_size: int | None = None, scale_policy: ScalePolicy = "sticky",
             headroom: float | None = None, growth_factor: float | None = None,
             saturated_fraction: float = 0.0) -> QuantFormat:
  """FP4 E2M1 weights with one-byte block scales: OCP MXFP4 or NVIDIA NVFP4.

  Elements are ``float4_e2m1fn`` (magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6, so
  ``rho = 6``; 4 bits, packed). ``style`` picks the block scales:

  * ``"mxfp4"`` (OCP Microscaling): blocks of 32, each scale a power of two
    stored in ``float8_e8m0fnu``: 4 + 8/32 = 4.25 bits per parameter.
  * ``"nvfp4"``: blocks of 16, each scale ``s = b * S``, an ``float8_e4m3fn``
    code ``b`` per block times one FP32 tensor scale ``S`` (module docstring):
    4 + 8/16 = 4.5 bits per parameter, plus 4 bytes per tensor.

  Blocks run along ``axis=-2``, not ``-1`` as for :func:`int4` block scales: MX and
  NVFP4 matmuls scale blocks along the contraction dimension, and for a Flax
  ``(in, out)`` kernel (``y = x @ W``) that is the input features: axis 0 of a
  matrix, and axis -2 of each kernel of a stack (``(L, in, out)``: layers under
  ``nn.scan``, experts) and of a convolution (``(kh, kw, in, out)``). (INT4 here is a
  storage format only; its blocks follow the paper's row-wise scales.) Pass
  ``axis=-1`` for ``(out, in)`` (PyTorch-style) weights, and ``axis=0`` for vectors.
  The axis must be a multiple of ``block_size`` (32 or 16 unless given).

  The default policy is ``sticky``, as for FP8 (a scale computed from the stored
  weights only cannot chase its own update, and it moves only when a block
  saturates or leaves two growth steps unused), with ``h = 2`` for MXFP4 and
  ``h = 1.5`` for NVFP4 (``headroom=None``). E8M0 scales are powers of two, so
  MXFP4 moves by 2 whatever ``h`` (with ``h < 2`` the scale could never shrink
  again); E4M3 scales can hold 1.5, and a headroom of 2 costs FP4 dearly: it
  leaves the top binade (4 and 6) unused at initialization. Measured on a 64x32
  linear regression (ECO-AdamW, 300 steps, final loss, 3 seeds): NVFP4 ECO-RTN
  0.022 with ``h = 1.5`` vs 0.034 with ``h = 2`` (master weights 0.022 vs
  0.033), ECO-SR 0.031 vs 0.049; MXFP4 ECO-RTN 0.036 with sticky ``h = 2``
  (master weights 0.038), 0.025 with ``fixed`` ``h = 1``, which never grows a
  scale and so only suits weights that do not grow.

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> fmt = eco.fp4_e2m1("nvfp4")
    >>> fmt.block_size, fmt.scale_shape((64, 128))     # blocks of 16 along the input features
    (16, (4, 128))
    >>> q = eco.quantize_array(jnp.array([[0.5, -6.0], [5.0, 2.5]] * 8), eco.fp4_e2m1(
    ...     "mxfp4", scale_policy="fixed", headroom=1.0, block_size=16))
    >>> q.values.dtype, q.scale.dtype, float(q.scale[0, 0])
    (dtype(float4_e2m1fn), dtype(float8_e8m0fnu), 1.0)
    >>> q.dequantize()[:2].tolist()                     # 5 -> 4: half to even on the grid
    [[0.5, -6.0], [4.0, 2.0]]
  """
  if style not in FP4_STYLES:
    raise ValueError(f"fp4_e2m1: style must be one of {FP4_STYLES}, got {style!r}")
  mx = style == "mxfp4"
  return QuantFormat(
      name=style, dtype=ml_dtypes.float4_e2m1fn, scaling="block", axis=axis,
      block_size=(32 if mx else 16) if block_size is None else block_size,
      scale_policy=scale_policy,
      headroom=(2.0 if mx else 1.5) if headroom is None else headroom,
      scale_dtype=ml_dtypes.float8_e8m0fnu if mx else ml_dtypes.float8_e4m3fn,
      growth_factor=growth_factor, saturated_fraction=saturated_fraction)


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

  ``values`` has the tensor's shape and the format's dtype; ``scale`` has
  :meth:`QuantFormat.scale_shape` and the format's ``scale_dtype`` (FP32 unless
  the format stores its scales in 8 bits). ``tensor_scale`` is the FP32 scalar
  ``S`` (one per matrix of a stack, shape ``(L, 1, 1)``) of two-level (NVFP4) scales and ``None`` otherwise; the FP32 scale is
  then :attr:`effective_scale` ``= scale * S``. ``fmt`` is static pytree
  metadata, so a tree of ``QuantizedArray`` goes through ``jit``,
  ``jax.device_put`` and sharding as-is (copy one with ``dataclasses.replace``
  to keep its ``tensor_scale``).
  """

  values: jax.Array
  scale: jax.Array
  fmt: QuantFormat = dataclasses.field(metadata=dict(static=True))
  tensor_scale: jax.Array | None = None

  def __post_init__(self):
    # Rebuilding an NVFP4 array as QuantizedArray(values, scale, fmt) would silently
    # drop S; tree operations that put non-arrays at the leaves are left alone.
    if (self.tensor_scale is None and self.fmt.has_tensor_scale
        and isinstance(self.values, (jax.Array, np.ndarray))):
      raise ValueError(
          f"{self.fmt.name}: a QuantizedArray of this format needs its FP32 "
          "tensor_scale; copy one with dataclasses.replace(q, values=..., scale=...)")

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def effective_scale(self) -> jax.Array:
    """The FP32 scale ``s`` of ``Q(x) = s * c``, shaped like ``scale``."""
    return _decode_scale(self.scale, self.tensor_scale)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """``Q(x) = s * c`` in ``dtype`` (float32 by default)."""
    return dequantize(self, dtype)

  def _no_arithmetic(self, *args, **kwargs):
    raise TypeError(
        f"QuantizedArray ({self.fmt.name}, shape {self.shape}) does not support arithmetic: "
        "something treats quantized params as arrays. Gradient accumulation: use "
        "eco_optax.MultiSteps instead of optax.MultiSteps, and accumulate before the "
        "optimizer, not with optax.apply_every after it. A gradient transformation before "
        "the optimizer that reads the params or keeps a state shaped like them "
        "(optax.add_decayed_weights, optax.trace, optax.ema, optax.adaptive_grad_clip): wrap "
        "it in eco_optax.with_dequantized_params. Applying updates: use "
        "eco_optax.apply_updates (eco_optax.TrainState, eco_optax.nnx.Optimizer), not "
        "optax.apply_updates. Computing with the weights (a model's forward pass): "
        "eco_optax.grad / eco_optax.value_and_grad (eco_optax.nnx.value_and_grad) give the "
        "loss dequantized weights; to evaluate, eco_optax.dequantize_params(params) for "
        "Flax Linen's apply, eco_optax.nnx.dequantized(model) for Flax NNX.")

  __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _no_arithmetic
  __truediv__ = __rtruediv__ = __matmul__ = __rmatmul__ = __neg__ = _no_arithmetic
  __pow__ = __rpow__ = _no_arithmetic
  # A JAX operation on it (jnp.dot in a Linen layer), NNX's kernel[...].
  __jax_array__ = __getitem__ = _no_arithmetic


def _decode_scale(scale: jax.Array, tensor_scale: jax.Array | None) -> jax.Array:
  """FP32 scales from stored ones: ``b * S`` (exact: ``S`` is a power of two)."""
  scale = scale.astype(jnp.float32)
  return scale if tensor_scale is None else scale * tensor_scale


def _blocked(x: jax.Array, fmt: QuantFormat) -> jax.Array:
  """Views ``x`` so that its scale broadcasts: splits the block axis in two."""
  if fmt.scaling != "block":
    return x
  fmt.check_sharding(x)
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
    return _per_matrix(jnp.max, ax)
  axis = _normalize_axis(fmt.axis, x.ndim, fmt.name)
  if fmt.scaling == "channel":
    return jnp.max(ax, axis=_reduced_axes(x.ndim, axis), keepdims=True)
  return jnp.max(_blocked(ax, fmt), axis=axis + 1)


def _round_up_pow2(x: jax.Array) -> jax.Array:
  """The smallest power of two ``>= x`` for FP32 ``x >= 0``; 0 stays 0.

  Adding ``2^23 - 1`` to the bits carries any nonzero mantissa into the exponent.
  Subnormals round up to ``2^-126``; inf stays inf.
  """
  bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
  return jax.lax.bitcast_convert_type(
      ((bits + jnp.uint32(0x7FFFFF)) >> 23) << 23, jnp.float32)


def _absmax_scale(amax: jax.Array, fmt: QuantFormat) -> jax.Array:
  """``h * amax / rho``, rounded up to a power of two for float formats.

  A float grid is scale-invariant across binades, so a power-of-two scale costs
  no precision, keeps round numbers exact, and makes every later power-of-two
  rescale (the sticky policy with ``h = 2``) exact. Two-level (NVFP4) scales are
  left as they are: their E4M3 codes have mantissa bits of their own, and
  :func:`_encode_scale` rounds them up onto that finer grid.
  """
  scale = fmt.headroom * amax / fmt.max_value
  if fmt.is_integer or fmt.has_tensor_scale:
    return scale
  return _round_up_pow2(scale)


def _largest_pow2_below(limit: float) -> float:
  return float(2.0 ** np.floor(np.log2(limit)))


def _grid_ceil(y: jax.Array, dtype: np.dtype) -> jax.Array:
  """``y >= 0`` rounded up onto the grid of the float ``dtype`` (not clipped)."""
  delta = _float_grid_spacing(y, dtype)
  return jnp.ceil(y * (1.0 / delta)) * delta


def _clip_tensor_scale(tensor_scale: jax.Array, fmt: QuantFormat) -> jax.Array:
  """A power of two with every ``b * S`` and ``rho * b * S`` a normal finite FP32."""
  top = _largest_pow2_below(float(np.finfo(np.float32).max) / (_E4M3_MAX * fmt.max_value))
  return jnp.clip(_round_up_pow2(tensor_scale), _MIN_SCALE / _E4M3_TINY, top)


def _tensor_scale(scale: jax.Array, active: jax.Array | None,
                  fmt: QuantFormat) -> jax.Array:
  """``S = 2^ceil(log2(h * max s / 448))`` over the ``active`` groups (all if none is)."""
  if active is not None:
    scale = jnp.where(_per_matrix(jnp.any, active) & ~active, 0.0, scale)
  return _clip_tensor_scale(fmt.headroom * _per_matrix(jnp.max, scale) / _E4M3_MAX, fmt)


def _encode_scale(scale: jax.Array, fmt: QuantFormat,
                  tensor_scale: jax.Array | None = None,
                  active: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array | None]:
  """FP32 scales as stored: ``(scale in fmt.scale_dtype, tensor scale or None)``.

  Rounds *up* (a stored scale never makes an element saturate that the requested
  one would not): E8M0 to a power of two with ``rho * s`` finite; E4M3 to
  ``b = ceil_e4m3(s / S)`` in ``[2^-9, 448]`` with the given tensor scale ``S``,
  or, when it is None, ``S`` chosen from the ``active`` groups by
  :func:`_tensor_scale`. FP32 scales are returned as they are.
  """
  scale = jnp.asarray(scale, jnp.float32)
  if fmt.scale_dtype == np.float32:
    return scale, None
  if not fmt.has_tensor_scale:
    top = _largest_pow2_below(float(np.finfo(np.float32).max) / fmt.max_value)
    return jnp.clip(_round_up_pow2(scale), _MIN_SCALE, top).astype(fmt.scale_dtype), None
  if tensor_scale is None:
    tensor_scale = _tensor_scale(scale, active, fmt)
  codes = _grid_ceil(scale * (1.0 / tensor_scale), fmt.scale_dtype)
  codes = jnp.clip(codes, _E4M3_TINY, _E4M3_MAX).astype(fmt.scale_dtype)
  return codes, tensor_scale.astype(jnp.float32)


def _initial_scales(x: jax.Array, fmt: QuantFormat
                    ) -> tuple[jax.Array, jax.Array | None]:
  """:func:`initial_scale` as stored: ``(scale, tensor scale or None)``."""
  if fmt.lossless or fmt.scaling == "none":
    return jnp.ones((), jnp.float32), None
  scale = _absmax_scale(_group_absmax(x.astype(jnp.float32), fmt), fmt)
  active = scale >= _MIN_SCALE
  unit = _range_scale(1.0 if fmt.scale_policy == "fixed" else ZERO_GROUP_START, fmt)
  return _encode_scale(jnp.where(active, scale, unit), fmt, active=active)


def _range_scale(limit: float, fmt: QuantFormat) -> jax.Array:
  """The scale of a group with no values to take it from: its codes ``+-rho`` at
  ``+-limit`` (no headroom), rounded as :func:`_absmax_scale` rounds scales."""
  return _absmax_scale(jnp.asarray(limit / fmt.headroom, jnp.float32), fmt)


# The range an all-zero group starts with under a scale that moves (sticky, dynamic):
# about the size of a first update at common learning rates. A zero-initialized layer
# then stores its first updates on a grid as fine as they are (from the range [-1, 1]
# an INT4 grid step is 0.14: round-to-nearest stored nothing, stochastic rounding
# scattered whole grid steps); the scale grows when the codes saturate.
ZERO_GROUP_START = 2.0 ** -7


def initial_scale(x: jax.Array, fmt: QuantFormat) -> jax.Array:
  """``s_0 = h * max|x| / rho`` per group (FP32); an all-zero group gets
  ``ZERO_GROUP_START / rho`` (``1 / rho`` under a fixed scale), rounded as ``s_0`` is.

  Float formats round ``s_0`` up to a power of two, formats with 8-bit scales
  round it up onto their scale grid (module docstring; NVFP4's tensor scale is
  chosen from the nonzero groups). A zero scale would freeze a group at zero
  forever (nothing stored to rescale from), so an all-zero group starts with the
  range ``[-2^-7, 2^-7]``, or ``[-1, 1]`` for a scale that never grows (or the
  largest block scale NVFP4's tensor scale allows).
  """
  return _decode_scale(*_initial_scales(x, fmt))


def _code_magnitudes(values: jax.Array, fmt: QuantFormat) -> tuple[jax.Array, jax.Array]:
  """``(m, at_max)``: integers that order like ``|c|``, and where ``|c| = rho``.

  Integer codes as int8 magnitudes; float formats are sign-magnitude, so their
  magnitudes order like their bits with the sign bit cleared (NaN and inf codes
  above ``rho`` are not at it).
  """
  if fmt.is_integer:
    magnitude = jnp.abs(values.astype(jnp.int8))
    return magnitude, magnitude >= int(fmt.max_value)
  bits = jnp.dtype(f"uint{fmt.bits}")
  magnitude = jax.lax.bitcast_convert_type(values, bits) & bits.type((1 << (fmt.bits - 1)) - 1)
  return magnitude, magnitude == np.asarray(fmt.max_value, fmt.dtype).view(bits)


def _magnitude_to_float32(m: jax.Array, fmt: QuantFormat) -> jax.Array:
  """The FP32 value of a :func:`_code_magnitudes` integer."""
  if fmt.is_integer:
    return m.astype(jnp.float32)
  return jax.lax.bitcast_convert_type(m, fmt.dtype).astype(jnp.float32)


def _code_absmax(values: jax.Array, fmt: QuantFormat) -> jax.Array:
  """``max|c|`` per scale group, in FP32, without converting every code: the
  integer magnitudes are reduced, then only the maxima decoded."""
  return _magnitude_to_float32(_group_absmax(_code_magnitudes(values, fmt)[0], fmt), fmt)


def _group_size(shape: tuple[int, ...], fmt: QuantFormat) -> int:
  """Elements per scale group."""
  return math.prod(shape) // math.prod(fmt.scale_shape(shape))


def _at_max(values: jax.Array, fmt: QuantFormat) -> jax.Array:
  """Where a code sits at ``+-rho`` (bool)."""
  return _code_magnitudes(values, fmt)[1]


def _code_absmax_and_saturated_count(values: jax.Array,
                                     fmt: QuantFormat) -> tuple[jax.Array, jax.Array]:
  """:func:`_code_absmax` and how many codes of each scale group sit at ``+-rho``
  (int32), both shaped like the scale, in one pass over the codes.

  One variadic reduction: XLA:CPU hands a plain sum or max to a library kernel that
  needs its input materialised (a count in int32 took 4 bytes per parameter, for
  every leaf at once); a variadic one it fuses with the elementwise code above it.
  """
  magnitude, at_max = _code_magnitudes(values, fmt)
  operands = (magnitude, at_max.astype(jnp.int32))
  inits = (np.zeros((), magnitude.dtype), np.int32(0))
  combine = lambda a, b: (jnp.maximum(a[0], b[0]), a[1] + b[1])
  if fmt.scaling == "tensor" and values.ndim <= 2:
    top, count = jax.lax.reduce(operands, inits, combine, tuple(range(values.ndim)))
  else:
    axis = (None if fmt.scaling == "tensor"
            else _normalize_axis(fmt.axis, values.ndim, fmt.name))
    if fmt.scaling in ("tensor", "channel"):
      others = _reduced_axes(values.ndim, axis)
      top, count = (jnp.expand_dims(x, others)
                    for x in jax.lax.reduce(operands, inits, combine, others))
    else:
      top, count = jax.lax.reduce(tuple(_blocked(x, fmt) for x in operands), inits, combine,
                                  (axis + 1,))
  return _magnitude_to_float32(top, fmt), count


def saturation(q: QuantizedArray) -> jax.Array:
  """The fraction of ``q``'s codes at the format's largest magnitude ``+-rho`` (FP32 scalar).

  Weights pinned there cannot grow under a ``fixed`` scale (and trigger a
  ``sticky`` one). :func:`eco_optax.apply_updates` warns when more than
  :data:`SATURATION_WARNING` of a fixed-scale leaf's codes saturate.

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_array(jnp.array([[1.0, -1.0, 0.5, 0.0]]),
    ...                        eco.int8("tensor", scale_policy="fixed", headroom=1.0))
    >>> float(eco.quantize.saturation(q))
    0.5
  """
  if q.fmt.lossless or q.fmt.scaling == "none":
    return jnp.zeros((), jnp.float32)
  at_max = _at_max(q.values, q.fmt).reshape(-1)
  if q.size % 64 == 0:   # XLA:CPU materializes a reduction's input: keep it 1 byte wide
    at_max = at_max.astype(jnp.uint8).reshape(-1, 64).sum(axis=1, dtype=jnp.uint8)
  return jnp.sum(at_max, dtype=jnp.int32).astype(jnp.float32) / q.size


# apply_updates warns when a fixed-scale leaf has more than this fraction of its codes at +-rho.
SATURATION_WARNING = 0.01


# The range an all-zero group's sticky scale shrinks to: 2^-20 (about 1e-6).
ZERO_GROUP_RANGE = 2.0 ** -20


def zero_group_floor(fmt: QuantFormat) -> jax.Array:
  """The smallest scale a sticky policy gives an all-zero group: the range
  ``[-ZERO_GROUP_RANGE, ZERO_GROUP_RANGE]``, as :func:`initial_scale` rounds scales."""
  return _range_scale(ZERO_GROUP_RANGE, fmt)


def _sticky(scale: jax.Array, grow: jax.Array, used: jax.Array, limit: float,
            h: float, g: float, floor: float, zero_floor: jax.Array | float = math.inf
            ) -> jax.Array:
  """``scale * g`` where ``grow``; ``scale / g`` where ``used < limit / (h * g)``, down
  to ``floor`` (``zero_floor`` where nothing is used, ``used = 0``)."""
  shrink = (used * h * g < limit) & (scale / g >= jnp.where(used > 0, floor, zero_floor))
  return jnp.where(shrink, scale / g, jnp.where(grow, scale * g, scale))


def _placed_as(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` (a reduction of the codes, sharded like them) resharded as the stored scales
  ``like`` where explicit mesh axes put shardings in the types (a row of scales left
  replicated beside codes split along their last axis); ``x`` itself elsewhere."""
  want = jax.typeof(like).sharding
  mesh = getattr(want, "mesh", None)
  if (mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types
      or jax.typeof(x).sharding == want):
    return x
  return jax.sharding.reshard(x, want)


def _next_scales(q: QuantizedArray) -> tuple[jax.Array, jax.Array | None]:
  """:func:`next_scale` as stored: ``(scale, tensor scale or None)``."""
  fmt = q.fmt
  if fmt.lossless or fmt.scale_policy == "fixed" or fmt.scaling == "none":
    return q.scale, q.tensor_scale
  rho, scale = fmt.max_value, q.effective_scale
  if fmt.scale_policy == "sticky" and fmt.saturated_fraction > 0:
    code_max, saturated = _code_absmax_and_saturated_count(q.values, fmt)
    code_max, saturated = _placed_as(code_max, scale), _placed_as(saturated, scale)
    grow = saturated > fmt.saturated_fraction * _group_size(q.shape, fmt)
  else:
    code_max = _placed_as(_code_absmax(q.values, fmt), scale)
    grow = code_max >= rho
  if fmt.scale_policy == "sticky":
    new = _sticky(scale, grow, code_max, rho, fmt.headroom, fmt.growth, _MIN_SCALE,
                  zero_group_floor(fmt))
  elif fmt.is_integer:
    # The largest code lands on the integer k = floor(rho / h): a fixed point
    # (h * max|Q(w)| / rho re-rounded would drift by a code every step). Kept
    # exactly where it holds: compiled, XLA divides by k as a multiplication by
    # its rounded reciprocal, and k * s * (1 / k) drifts by an ulp a step.
    k = math.floor(rho / fmt.headroom)
    new = jnp.where(code_max == k, scale, code_max * scale / k)
    new = jnp.where(new >= _MIN_SCALE, new, scale)
  else:
    new = _absmax_scale(code_max * scale, fmt)
    new = jnp.where(new >= _MIN_SCALE, new, scale)
  tensor_scale = None                    # dynamic: chosen again from the new scales
  if fmt.has_tensor_scale and fmt.scale_policy == "sticky":
    old = q.tensor_scale
    used = _per_matrix(jnp.max, jnp.where(code_max > 0, new, 0.0)) / old  # largest block code
    tensor_scale = _clip_tensor_scale(
        _sticky(old, used > _E4M3_MAX, used, _E4M3_MAX, 2.0, 2.0, 0.0), fmt)
  return _encode_scale(new, fmt, tensor_scale, active=code_max > 0)


@functools.partial(jax.jit, inline=True)
def next_scale(q: QuantizedArray) -> jax.Array:
  """The FP32 scale ``s'`` of the next stored weights: a function of ``q`` alone.

  Implements the ``fixed`` / ``sticky`` / ``dynamic`` policies of the module
  docstring. Under ``fixed`` and ``dynamic`` groups whose codes are all zero keep
  their scale (up to the tensor scale of NVFP4, which moves with the other groups);
  ``sticky`` shrinks it down to :func:`zero_group_floor`.
  """
  return _decode_scale(*_next_scales(q))


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijective avalanche mix of uint32."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def stochastic_bits(key: jax.Array, shape: tuple[int, ...],
                    offset: jax.Array | int = 0) -> jax.Array:
  """32 random bits (``uint32``) per element for stochastic rounding.

  A counter-based hash keyed by two 32-bit words of ``key``:
  ``b_i = fmix32(fmix32(i + k0) ^ k1)`` over the element index ``i``, with
  ``(k0, k1)`` the key's own data for a threefry key (``jax.random.key``'s default;
  two words drawn from it for other kinds). On CPU it is about 10x cheaper than
  ``jax.random.bits`` (threefry), which would otherwise dominate the optimizer step,
  and keying it by the key's data leaves no threefry to compile per leaf (the keys
  an optimizer uses come from ``jax.random.split``, threefry's own outputs); it is
  deterministic given ``key``, built from
  ``broadcasted_iota`` so that sharded arrays draw exactly the numbers an unsharded
  one does, and it passes the unbiasedness and independence tests of
  ``tests/test_quantize.py``. It is not a cryptographic generator. ``offset`` is
  added to the index: a block of rows starting at flat index ``offset`` draws the
  numbers the whole array draws there.
  """
  k0, k1 = _hash_words(key)
  return _fmix32(_fmix32(_flat_index(shape, offset) + k0) ^ k1)


def _flat_index(shape: tuple[int, ...], offset: jax.Array | int) -> jax.Array:
  """``offset`` plus each element's row-major index (``uint32``, modulo ``2^32``)."""
  index = jnp.zeros(shape, jnp.uint32) + jnp.asarray(offset).astype(jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(
        stride % 2**32)
    stride *= shape[dim]
  return index


def _hash_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two 32-bit words of ``key`` to seed the hash with: a threefry key's own data."""
  data = jax.random.key_data(key)
  if data.shape == (2,) and data.dtype == jnp.uint32:
    return data[0], data[1]
  return tuple(jax.random.bits(key, (2,), jnp.uint32))


def stochastic_uniform(key: jax.Array, shape: tuple[int, ...],
                       offset: jax.Array | int = 0) -> jax.Array:
  """Uniform ``[0, 1)`` FP32 noise for stochastic rounding, 24 random bits each:
  ``u_i = (b_i >> 8) / 2^24`` with ``b`` the bits of :func:`stochastic_bits`."""
  return _unit_interval(stochastic_bits(key, shape, offset))


def dither_uniform(key: jax.Array, shape: tuple[int, ...],
                   offset: jax.Array | int = 0) -> jax.Array:
  """Uniform ``[0, 1)`` FP32 noise from one random word: ``u_i = frac(i * phi + r)``.

  ``r`` is 32 random bits of ``key`` and ``phi`` the golden ratio's fraction (``i`` the
  element index plus ``offset``, as in :func:`stochastic_bits`; 24 bits each). For a
  given element, ``u`` is uniform over keys, so stochastic rounding with it is unbiased
  and the draws of independent keys (one per step) are independent; across the elements
  of one draw it is a low-discrepancy (Weyl) sequence, not independent noise. For
  roundings where each element's expectation is what counts (the exact rule's kept
  error), not the independence of its neighbours (the weights). ``i * phi + r`` is
  the sum of a term per row of the last axis and one per column (``uint32``
  arithmetic, exact modulo ``2^32``): one addition per element, where
  :func:`stochastic_uniform` hashes each index with four multiplies.
  """
  r = _hash_words(key)[0]
  if not shape:
    return _unit_interval(_flat_index(shape, offset) * _PHI + r)
  rows = _flat_index(shape[:-1], 0) * jnp.uint32(shape[-1] % 2**32) + jnp.asarray(
      offset).astype(jnp.uint32)
  columns = jax.lax.broadcasted_iota(jnp.uint32, shape[-1:], 0) * _PHI
  return _unit_interval((rows * _PHI + r)[..., None] + columns)


_PHI = np.uint32(0x9E3779B9)     # 2^32 times the golden ratio's fraction


def _unit_interval(bits: jax.Array) -> jax.Array:
  """``(bits >> 8) / 2^24`` in FP32, converted through ``int32`` (vectorized on XLA:CPU)."""
  return (bits >> 8).astype(jnp.int32).astype(jnp.float32) * np.float32(2.0**-24)


def _float_grid_spacing(y: jax.Array, dtype: np.dtype) -> jax.Array:
  """Distance between the grid points of the float ``dtype`` around ``|y|``.

  ``2^(max(floor(log2|y|), minexp) - nmant)``, read off the FP32 exponent bits.
  """
  return _float_grid_spacing_and_inverse(y, dtype)[0]


def _float_grid_spacing_and_inverse(y: jax.Array, dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
  """:func:`_float_grid_spacing` and its reciprocal, both built from exponent bits.

  The spacing is a power of two ``2^k``, so ``1 / 2^k = 2^-k`` exactly, without a
  division per element.
  """
  info = ml_dtypes.finfo(dtype)
  exponent = (jax.lax.bitcast_convert_type(jnp.abs(y), jnp.int32) >> 23) - 127
  exponent = jnp.maximum(exponent, info.minexp) - info.nmant
  return (jax.lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32),
          jax.lax.bitcast_convert_type((127 - exponent) << 23, jnp.float32))


def grid_spacing_and_inverse(y: jax.Array, fmt: QuantFormat) -> tuple:
  """The distance between ``fmt``'s grid points around ``|y|`` (code units) and its reciprocal:
  1 for integer formats, :func:`_float_grid_spacing_and_inverse` for float ones."""
  if fmt.is_integer:
    return 1.0, 1.0
  return _float_grid_spacing_and_inverse(y, fmt.dtype)


def _round_to_grid(y: jax.Array, fmt: QuantFormat, rounding: Rounding,
                   key: jax.Array | None, offset: jax.Array | int = 0) -> jax.Array:
  """Rounds ``y`` (in code units, already clipped to ``[-rho, rho]``) to codes.

  Returns the codes as FP32 values on the format's grid (the cast to the storage
  dtype is then exact). With ``delta`` the grid spacing at ``y`` (1 for integers,
  read off the exponent bits for floats), nearest is ``delta * round(y / delta)``,
  half to even, which is the IEEE cast; stochastic is
  ``R(y) = lo + delta * [u < (y - lo) / delta]`` with ``lo = delta * floor(y / delta)``
  and ``u ~ U[0, 1)`` (:func:`stochastic_uniform`; bfloat16 takes :func:`stochastic_bits`),
  so ``E[R(y)] = y``. ``offset``: see :func:`stochastic_bits`.
  Codes are canonical: a result of ``-0`` is returned as ``+0``.
  """
  if rounding == "stochastic" and fmt.dtype == jnp.bfloat16:
    # bfloat16 is the top half of FP32: adding 16 random bits to the FP32 bits and
    # truncating rounds the magnitude up with probability (its low half) / 2^16: this
    # rule in fewer operations (|y| <= the largest bfloat16: no carry into inf).
    noise = stochastic_bits(key, y.shape, offset) >> 16
    codes = jax.lax.bitcast_convert_type(
        (jax.lax.bitcast_convert_type(y, jnp.uint32) + noise) & jnp.uint32(0xFFFF0000),
        jnp.float32)
    return jnp.where(codes == 0, 0.0, codes)
  delta, inverse = grid_spacing_and_inverse(y, fmt)
  steps = y * inverse                       # exact: delta is a power of two
  if rounding == "nearest":
    codes = jnp.round(steps) * delta
  else:
    lo = jnp.floor(steps)
    codes = (lo + (stochastic_uniform(key, y.shape, offset) < steps - lo)) * delta
  return jnp.where(codes == 0, 0.0, codes)    # -0 becomes +0 (XLA folds away a "+ 0.0")


def _code_units(x: jax.Array, scale: jax.Array, fmt: QuantFormat) -> jax.Array:
  """``x / s`` in the :func:`_blocked` view: one division per scale, not per element."""
  return _blocked(x.astype(jnp.float32), fmt) * (1.0 / _expand_scale(scale, fmt, x.ndim))


def _store(x: jax.Array, scale: jax.Array, tensor_scale: jax.Array | None,
           fmt: QuantFormat, rounding: Rounding,
           key: jax.Array | None) -> tuple[QuantizedArray, jax.Array]:
  """Stores ``x`` with stored-form scales; returns it and the FP32 value ``Q(x)``.

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
  rho, fp32_scale = fmt.max_value, _decode_scale(scale, tensor_scale)
  y = jnp.clip(_code_units(x, fp32_scale, fmt), -rho, rho)
  y = jnp.where(jnp.isfinite(y), y, 0.0)
  codes = _round_to_grid(y, fmt, rounding, key)
  stored = QuantizedArray(_unblocked(codes.astype(fmt.dtype), x.shape), scale, fmt,
                          tensor_scale)
  return stored, _unblocked(codes * _expand_scale(fp32_scale, fmt, x.ndim), x.shape)


@functools.partial(jax.jit, static_argnames=("fmt", "rounding"), inline=True)
def quantize_with_scale(x: jax.Array, scale: jax.Array, fmt: QuantFormat,
                        rounding: Rounding = "nearest",
                        key: jax.Array | None = None) -> QuantizedArray:
  """Stores ``x`` with a given FP32 scale: ``c = R(clip(x / s, -rho, rho))``.

  Formats with 8-bit scales store ``s`` rounded up onto their scale grid (NVFP4
  with a tensor scale chosen from ``s`` as at initialization; module docstring).
  Non-finite entries of ``x`` become code 0; callers that must not lose weights
  (:func:`eco_optax.apply_updates`, the optimizers) replace them beforehand.
  """
  return _store(x, *_encode_scale(scale, fmt), fmt, rounding, key)[0]


@functools.partial(jax.jit, static_argnames=("fmt", "rounding"), inline=True)
def quantize(x: jax.Array, fmt: QuantFormat, rounding: Rounding = "nearest",
             key: jax.Array | None = None) -> QuantizedArray:
  """Stores ``x`` in ``fmt`` with the initial absmax scale ``h * max|x| / rho``.

  An ``x`` with a NaN or infinity is stored poisoned (:func:`poison`): it reads back
  NaN everywhere, so the fault shows.

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_array(jnp.array([[1024.0, -0.5, 3.0]]), eco.fp8_e4m3("tensor"))
    >>> q.values.dtype, float(q.scale)      # 2 * 1024 / 448 rounded up to a power of two
    (dtype(float8_e4m3fn), 8.0)
    >>> q.dequantize().tolist()
    [[1024.0, -0.5, 3.0]]
  """
  fmt.check_shape(tuple(jnp.shape(x)))
  stored = _store(x, *_initial_scales(jnp.asarray(x), fmt), fmt, rounding, key)[0]
  return stored if fmt.lossless else poison(stored, ~jnp.all(jnp.isfinite(x)))


def poison(q: QuantizedArray, poisoned: jax.Array) -> QuantizedArray:
  """``q`` with a NaN scale where ``poisoned`` (a boolean scalar): every value reads NaN.

  A non-finite input shows in every weight of the leaf instead of being stored as
  codes (which have no NaN in most formats); NVFP4's tensor scale carries it.
  """
  if q.fmt.has_tensor_scale:
    return dataclasses.replace(q, tensor_scale=jnp.where(poisoned, jnp.nan, q.tensor_scale))
  scale = jnp.where(poisoned, jnp.nan, q.scale.astype(jnp.float32)).astype(q.scale.dtype)
  return dataclasses.replace(q, scale=scale)


@functools.partial(jax.jit, static_argnames=("dtype",), inline=True)
def dequantize(q: QuantizedArray, dtype=jnp.float32) -> jax.Array:
  """``Q(x) = s * c`` (computed in FP32, returned in ``dtype``)."""
  return dequantize_with_scale(q, None if q.fmt.lossless else q.effective_scale, dtype)


def dequantize_with_scale(q: QuantizedArray, scale: jax.Array | None,
                          dtype=jnp.float32) -> jax.Array:
  """``Q(x) = s * c`` of ``q``'s codes with the FP32 ``scale`` (``q.effective_scale``, or
  a value equal to it that must be computed first); ``None`` for a lossless format,
  whose values are the weights."""
  if q.fmt.lossless:
    return q.values.astype(dtype)
  shape = q.values.shape
  codes = _blocked(bits_to_float32(values_to_bits(q.values, q.fmt), q.fmt), q.fmt)
  x = codes * _expand_scale(scale, q.fmt, len(shape))
  return _unblocked(x, shape).astype(dtype)


def slice_along(q: QuantizedArray, axis: int, start: int, stop: int) -> QuantizedArray:
  """Elements ``[start, stop)`` of ``q`` along ``axis``, with their scales.

  A scale group must not straddle ``start`` or ``stop``: along a blocked axis both are
  multiples of the block size (``stop`` may be the axis' end).
  """
  n = q.values.shape[axis]

  def cut(x):
    if x is None or jnp.ndim(x) == 0 or x.shape[axis] == 1:
      return x
    group = n // x.shape[axis]
    if start % group or (stop % group and stop != n):
      raise ValueError(f"{q.fmt.name}: elements [{start}, {stop}) of axis {axis} split a "
                       f"scale group of {group}")
    return jax.lax.slice_in_dim(x, start // group, -(-stop // group), axis=axis)

  # Sliced as their storage bits: XLA:CPU fails to compile a slice of float4 values that
  # is then bitcast (jax 0.10.2: "Invalid bitcast i8 to i4"), and dequantization bitcasts.
  bits = jax.lax.slice_in_dim(values_to_bits(q.values, q.fmt), start, stop, axis=axis)
  return dataclasses.replace(q, values=bits_to_values(bits, q.fmt), scale=cut(q.scale),
                             tensor_scale=cut(q.tensor_scale))


def encode_residual(residual: jax.Array, like: QuantizedArray,
                    key: jax.Array) -> jax.Array:
  """Stores a quantization residual ``e`` compactly: ``e / s`` in ``bfloat16``.

  In the code units of ``like`` (``s`` its scale), a residual is at most about a
  grid step, and bfloat16 keeps it to 8 significant bits whatever its size (FP8
  would lose the small residuals of weights that sit still to its subnormals).
  It is rounded stochastically: the residuals of a weight that sits still grow
  step after step, and round-to-nearest would bias every one the same way.
  """
  codes = _unblocked(_code_units(residual, like.effective_scale, like.fmt),
                     residual.shape)
  return _round_to_grid(codes, bf16(), "stochastic", key).astype(jnp.bfloat16)


def decode_residual(codes: jax.Array, like: QuantizedArray) -> jax.Array:
  """The FP32 residual stored by :func:`encode_residual` with the scale of ``like``."""
  return dequantize(dataclasses.replace(like, values=codes))


def requantize(q: QuantizedArray, target: jax.Array,
               rounding: Rounding = "nearest",
               key: jax.Array | None = None) -> QuantizedArray:
  """Stores ``target`` as the successor of ``q``: scale :func:`next_scale` of ``q``.

  Entries of ``target`` that are not finite keep their stored value, so a bad
  gradient can never write NaN or inf into the weights.
  """
  return requantize_with_value(q, target, rounding, key)[0]


@functools.partial(jax.jit, static_argnames=("rounding",), inline=True)
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
  return _store(target, *_next_scales(q), q.fmt, rounding, key)


def bits_dtype(fmt: QuantFormat) -> np.dtype:
  """The unsigned integer dtype as wide as ``fmt``'s storage (uint4, uint8, uint16)."""
  return np.dtype(getattr(ml_dtypes, f"uint{fmt.bits}", None) or f"uint{fmt.bits}")


def grid_to_bits(codes: jax.Array, fmt: QuantFormat) -> jax.Array:
  """Storage bits (``uint32``, low ``fmt.bits`` bits) of FP32 ``codes`` on ``fmt``'s grid.

  ``codes`` must be exact grid points in ``[-rho, rho]`` with no ``-0`` (as
  :func:`_round_to_grid` returns them). Integers are two's complement; floats are
  re-packed from the FP32 bits (sign, re-biased exponent, top mantissa bits; values
  below the smallest normal become subnormal codes ``|c| / 2^(minexp - nmant)``),
  which XLA:CPU runs several times faster than a float8 ``astype``. Equal to
  ``bitcast(codes.astype(fmt.dtype))``.
  """
  mask = jnp.uint32((1 << fmt.bits) - 1)
  if fmt.is_integer:
    return jax.lax.bitcast_convert_type(codes.astype(jnp.int32), jnp.uint32) & mask
  bits = jax.lax.bitcast_convert_type(codes, jnp.uint32)
  if fmt.dtype == jnp.bfloat16:                 # the top half of an FP32 on the grid
    return bits >> 16
  info = ml_dtypes.finfo(fmt.dtype)
  sign = (bits >> 31) << (fmt.bits - 1)
  exponent = (bits >> 23) & 0xFF
  first_normal = 127 + info.minexp              # biased FP32 exponent of the smallest normal
  normal = ((exponent - (first_normal - 1)) << info.nmant) | ((bits & 0x7FFFFF) >> (23 - info.nmant))
  subnormal = jax.lax.bitcast_convert_type(   # via int32: XLA:CPU vectorizes it, not uint32
      (jnp.abs(codes) * float(2.0 ** (info.nmant - info.minexp))).astype(jnp.int32), jnp.uint32)
  return sign | jnp.where(exponent >= first_normal, normal, subnormal)


def bits_to_float32(bits: jax.Array, fmt: QuantFormat) -> jax.Array:
  """The FP32 code values of storage bits (the low ``fmt.bits`` bits of an unsigned array).

  Equal to ``bits_to_values(bits, fmt).astype(float32)``, NaN and infinity codes
  included. On CPU it is computed from the bits (XLA:CPU converts float8 and FP4 to
  FP32 in software, several times slower); elsewhere the hardware converts.
  Integers are sign-extended; floats of up to 8 bits re-pack sign, exponent and
  mantissa into FP32 (a subnormal code ``m`` is ``m * 2^(minexp - nmant)``).
  """
  if jax.default_backend() != "cpu" or fmt.bits > 8:
    return bits_to_values(bits, fmt).astype(jnp.float32)
  width = fmt.bits
  b = bits.astype(jnp.int32) & ((1 << width) - 1)
  if fmt.is_integer:
    return ((b << (32 - width)) >> (32 - width)).astype(jnp.float32)
  info = ml_dtypes.finfo(fmt.dtype)
  magnitude = b & ((1 << (width - 1)) - 1)
  rebias = (127 - (1 - info.minexp)) << 23
  normal = jax.lax.bitcast_convert_type((magnitude << (23 - info.nmant)) + rebias, jnp.float32)
  subnormal = magnitude.astype(jnp.float32) * np.float32(2.0 ** (info.minexp - info.nmant))
  value = jnp.where(magnitude < (1 << info.nmant), subnormal, normal)
  specials = _special_codes(fmt.dtype)
  if specials:        # the codes above the largest finite one: NaN, or infinity then NaN
    first, top = min(specials), specials[min(specials)]
    value = jnp.where(magnitude >= first,
                      jnp.where(magnitude == first, np.float32(top), np.float32(np.nan)), value)
  sign = (b >> (width - 1)) << 31
  return jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(value, jnp.int32) | sign, jnp.float32)


@functools.cache
def _special_codes(dtype) -> dict[int, float]:
  """``{magnitude bits: value}`` of the non-finite positive codes of a float dtype."""
  width = ml_dtypes.finfo(dtype).bits
  unsigned = np.dtype(getattr(ml_dtypes, f"uint{width}", None) or f"uint{width}")
  magnitudes = np.arange(1 << (width - 1)).astype(unsigned)
  values = magnitudes.view(dtype).astype(np.float32)
  return {int(m): float(v) for m, v in zip(magnitudes, values) if not np.isfinite(v)}


def bits_to_values(bits: jax.Array, fmt: QuantFormat) -> jax.Array:
  """Stored values (``fmt.dtype``) from the low ``fmt.bits`` bits of ``bits``."""
  if bits.dtype == bits_dtype(fmt):
    narrow = bits
  else:
    narrow = (bits.astype(jnp.uint32) & jnp.uint32((1 << fmt.bits) - 1)).astype(bits_dtype(fmt))
  return jax.lax.bitcast_convert_type(narrow, fmt.dtype)


def values_to_bits(values: jax.Array, fmt: QuantFormat) -> jax.Array:
  """The storage bits of ``values`` (``fmt.dtype``) as :func:`bits_dtype`; a free bitcast."""
  return jax.lax.bitcast_convert_type(values, bits_dtype(fmt))
