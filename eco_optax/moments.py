r"""Low-precision storage of optimizer moments (the ``mu_dtype`` / ``nu_dtype`` options).

The optimizer computes in FP32; between steps a moment can be kept in a narrower
format. Every step decodes it, updates it (and injects ECO's error into ``mu``) and
encodes the result::

    m = decode(stored),   m' = step(m, g),   stored' = encode(m')

Formats (``spec`` as accepted by :func:`as_format`):

* ``None`` or ``jnp.float32``: FP32, unchanged (4 bytes per parameter).
* ``jnp.bfloat16`` / ``jnp.float16`` (:func:`float_storage`, 2 bytes): rounded
  **stochastically** by default. Adam's second moment moves by
  ``(1 - b2)(g^2 - v)`` per step: a relative change of about ``1e-3`` for
  ``b2 = 0.999``, below bfloat16's relative half ulp (``2^-9`` to ``2^-8``), so
  round-to-nearest returns the old ``v`` every step and the moment freezes (it
  neither grows nor decays); stochastic rounding, ``E[R(v')] = v'``, keeps its
  expectation on the FP32 trajectory. The price is noise: each stored entry wanders
  around that trajectory by up to ``(ulp/2) / sqrt(1 - b2^2)``, about 5% for
  bfloat16 and ``b2 = 0.999`` (``tests/test_moments.py``). float16 has 3 more
  mantissa bits but only 5 exponent bits: second moments of gradients below about
  ``1e-2`` fall into its subnormals, so prefer bfloat16 for ``nu``.
* :func:`blockwise_8bit` (about 1.016 bytes): the block-wise 8-bit quantization of
  bitsandbytes' 8-bit optimizers (Dettmers et al., arXiv 2110.02861). The moment's
  last axis is cut into blocks of ``B = 256`` elements (the last block of a row may
  be shorter); where that axis has ``n < B`` elements, a block takes ``B // n`` whole
  rows instead, so a block holds ``B`` elements or fewer either way. Each block
  stores ``a = max|x|`` in FP32 (recomputed from the block at every encoding) and
  one ``uint8`` code per element, the index of ``x / a`` in the 256-entry
  *dynamic* map of :func:`dynamic_map`, signed for the first moment, unsigned (all
  codes on ``[0, 1]``) for the second::

      encode:  a_b = max_{i in b} |x_i|,   c_i = R_map(x_i / a_b)
      decode:  x_i ~ map[c_i] * a_b

  The codes have the moment's shape and the absmax ``shape[:-2] + (row blocks,
  column blocks)``, so both shard like the parameter (the absmax wherever a shard
  holds whole blocks): a jitted step keeps the shardings it was given.

  ``R_map`` picks the nearest entry, or one of the two neighbours ``lo <= y <= hi``
  with ``P(hi) = (y - lo) / (hi - lo)`` (stochastic, ``E = y``). The one exception
  is bitsandbytes' own: the signed map ends at ``-0.99297``, so a block whose
  absmax is a negative entry stores that entry 0.7% too small, in either rounding.

Non-finite values are never turned into finite ones: a NaN or infinity stays NaN /
infinity in the float formats, and turns its whole 8-bit block into NaN (a uint8
code cannot hold it, the block's ``absmax`` is set to NaN). The moments then carry
the NaN as FP32 optax does; wrap the optimizer in :func:`eco_optax.apply_if_finite` to
skip such steps. Finite values beyond a float format's range saturate to its
largest finite value.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from eco_optax import moments
  >>> fmt = moments.blockwise_8bit(signed=True, rounding="nearest")
  >>> x = jnp.linspace(-1.0, 2.0, 512)
  >>> stored = fmt.encode(x)
  >>> stored.codes.shape, stored.codes.dtype, stored.absmax.tolist()   # 2 blocks of 256
  ((512,), dtype('uint8'), [1.0, 2.0])
  >>> error = jnp.abs(fmt.decode(stored) - x)       # half the map's widest gap, 0.0070
  >>> bool(jnp.all(error[:256] <= 0.0071 * 1.0)), bool(jnp.all(error[256:] <= 0.0071 * 2.0))
  (True, True)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from eco_optax import quantize as qz


def dynamic_map(signed: bool) -> np.ndarray:
  r"""bitsandbytes' 8-bit dynamic (dynamic-tree) quantization map, 256 sorted FP32 values.

  ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``: for the decades
  ``k = 0..6`` the map holds ``10^(k-6)`` times the midpoints of ``n_k`` equal
  intervals of ``[0.1, 1]``, ``n_k = 2^k`` (signed, with the negatives too) or
  ``2^(k+1)`` (unsigned), then ``0`` and ``1``: 127 + 127 + 2 or 254 + 2 entries.
  Small magnitudes get few entries, large ones many: relative precision about 1.4%
  (signed) or 0.7% (unsigned) in ``[0.1, 1]``, down to ``5.5e-7`` (signed) or
  ``3.25e-7`` (unsigned) at the bottom. The signed map is not symmetric: its top is
  ``1`` but its bottom ``-0.99297`` (``-1`` is stored as that). bitsandbytes computes
  the midpoints in float32 with torch; here they are computed in float64 and
  rounded once, which can differ from it in the last bit of an entry.

  Example:
    >>> from eco_optax import moments
    >>> m = moments.dynamic_map(signed=True)
    >>> m.shape, round(float(m[0]), 6), float(m[-1]), int((m == 0).sum())
    ((256,), -0.992969, 1.0, 1)
  """
  parts = []
  for k in range(7):
    edges = np.linspace(0.1, 1.0, 2 ** (k if signed else k + 1) + 1)
    mids = 10.0 ** (k - 6) * (edges[:-1] + edges[1:]) / 2
    parts += [mids, -mids] if signed else [mids]
  return np.sort(np.concatenate(parts + [[0.0, 1.0]])).astype(np.float32)


_MAPS = {signed: dynamic_map(signed) for signed in (True, False)}
_FLOAT_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float16))


@functools.lru_cache(maxsize=None)
def _search_index(signed: bool, midpoints: bool) -> tuple[np.ndarray, np.ndarray]:
  """``(points, start)`` for :func:`_count_below` over the map's entries or midpoints.

  ``start[p]`` counts the points below every float32 whose top 16 bits are ``p``
  (sign, exponent, 7 mantissa bits: a cell of relative width ``2^-7``). The map's
  points are farther apart than that, so a cell holds at most one of them.
  """
  table = _MAPS[signed]
  points = (table[:-1] + table[1:]) / 2 if midpoints else table
  prefixes = np.arange(2**16, dtype=np.uint32) << 16
  ends = np.stack([prefixes, prefixes | 0xFFFF]).view(np.float32)
  finite = np.all(np.isfinite(ends), axis=0)
  low, high = ends.min(axis=0), ends.max(axis=0)
  start = np.searchsorted(points, np.where(finite, low, 0), side="left")
  inside = np.searchsorted(points, np.where(finite, high, 0), side="right") - start
  assert inside.max() <= 1, "two points of the map in one float32 cell"
  return np.append(points, np.inf).astype(np.float32), start.astype(np.uint16)


def _lookup(table: np.ndarray, index: jax.Array) -> jax.Array:
  """``table[index]``, sharded as ``index`` is (a gather from a table on no mesh by
  indices sharded along explicit mesh axes has no sharding of its own to take)."""
  return jnp.asarray(table).at[index].get(out_sharding=jax.typeof(index).sharding)


def _count_below(points: np.ndarray, start: np.ndarray, y: jax.Array) -> jax.Array:
  """``jnp.searchsorted(points, y)`` for finite FP32 ``y`` with two gathers.

  ``jnp.searchsorted`` bisects: 8 dependent gathers per element, 15x slower on CPU.
  """
  i = _lookup(start, jax.lax.bitcast_convert_type(y, jnp.uint32) >> 16).astype(jnp.int32)
  return i + (_lookup(points, i) < y)


@dataclasses.dataclass(frozen=True)
class FloatStorage:
  """A moment stored in a narrower float dtype (bfloat16, float16).

  Attributes:
    dtype: the storage dtype.
    rounding: ``"stochastic"`` (default, unbiased: see the module docstring) or
      ``"nearest"``.
  """
  dtype: np.dtype
  rounding: qz.Rounding = "stochastic"

  def __post_init__(self):
    object.__setattr__(self, "dtype", np.dtype(self.dtype))
    if self.dtype not in _FLOAT_DTYPES:
      raise ValueError(f"float_storage: dtype must be one of "
                       f"{[str(d) for d in _FLOAT_DTYPES]}, got {self.dtype}")
    _check_rounding(self.rounding)

  @functools.partial(jax.jit, static_argnums=0, inline=True)
  def encode(self, x: jax.Array, key: Optional[jax.Array] = None,
             offset: jax.Array | int = 0) -> jax.Array:
    """``R(clip(x))`` in :attr:`dtype`; non-finite entries stay as they are.

    ``offset``: flat index of ``x``'s first element in a larger array (its random
    numbers are those of that array, :func:`eco_optax.quantize.stochastic_bits`).
    """
    _check_key(self.rounding, key)
    x = jnp.asarray(x, jnp.float32)
    finite = jnp.isfinite(x)
    largest = float(ml_dtypes.finfo(self.dtype).max)
    y = jnp.clip(jnp.where(finite, x, 0.0), -largest, largest)
    grid = qz.QuantFormat(name=self.dtype.name, dtype=self.dtype, scaling="none",
                          scale_policy="fixed", headroom=1.0)
    y = qz._round_to_grid(y, grid, self.rounding, key, offset)
    return jnp.where(finite, y, x).astype(self.dtype)

  def decode(self, stored: jax.Array) -> jax.Array:
    return stored.astype(jnp.float32)

  def zeros_like(self, x: jax.Array) -> jax.Array:
    """A zero moment shaped and placed as ``x`` (a sharded weight's moment is sharded
    as it is): :meth:`encode` of zeros, built without encoding."""
    return jnp.zeros_like(x, self.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockCodes:
  """A tensor of ``shape`` stored by :class:`Blockwise8bit`.

  Attributes:
    codes: ``uint8`` of the tensor's shape: indices into the map.
    absmax: FP32, the ``max|x|`` of each block (NaN: the block held a non-finite
      value): ``shape[:-2] + (row blocks, column blocks)``, ``(blocks,)`` for a
      vector or a scalar.
    shape: the tensor's shape (static pytree metadata).
  """
  codes: jax.Array
  absmax: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class Blockwise8bit:
  """bitsandbytes-style block-wise 8-bit storage (module docstring).

  Attributes:
    signed: the signed map (any sign) or the unsigned one (nonnegative moments:
      finer steps, negative values would clip to 0); ``None`` lets
      :func:`as_format` choose by the moment.
    block_size: elements per FP32 absmax (bitsandbytes' optimizers use 256).
    rounding: ``"stochastic"`` (default) or ``"nearest"`` entry of the map.
  """
  signed: Optional[bool] = None
  block_size: int = 256
  rounding: qz.Rounding = "stochastic"

  def __post_init__(self):
    if self.block_size < 1:
      raise ValueError(f"blockwise_8bit: block_size must be >= 1, got {self.block_size}")
    _check_rounding(self.rounding)

  @property
  def table(self) -> np.ndarray:
    """The 256 entries of the map, sorted."""
    if self.signed is None:
      raise ValueError("blockwise_8bit(signed=None) has no map yet: pass signed=True/False, "
                       "or resolve it with eco_optax.moments.as_format(spec, nonnegative=...)")
    return _MAPS[self.signed]

  def _layout(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int, int, int]:
    """``(shape as rows x columns, rows per block, columns per block, row blocks,
    column blocks)``.

    Blocks run along the last axis; where it is shorter than ``block_size`` (and
    the tensor has rows) a block takes ``block_size // n`` whole rows instead.
    """
    matrix = (1,) * (2 - len(shape)) + tuple(shape)
    r, n = matrix[-2:]
    k, size = ((1, min(self.block_size, n)) if n >= self.block_size or len(shape) < 2
               else (self.block_size // n, n))
    return matrix, k, size, -(-r // k), -(-n // size)

  def _check_whole_blocks(self, x: jax.Array) -> None:
    """Refuses ``x`` sharded along explicit mesh axes so that a device would hold part of
    a block: each device encodes and decodes its own blocks."""
    if x.ndim == 0:
      return
    matrix, k, size, _, _ = self._layout(x.shape)
    splits = [(matrix[-1], size, *qz.explicit_shards(x, x.ndim - 1), "entries along the last axis")]
    if x.ndim >= 2:
      splits.append((matrix[-2], k, *qz.explicit_shards(x, x.ndim - 2), "rows"))
    for length, block, parts, spec, name in splits:
      if parts > 1 and length % (parts * block):
        raise ValueError(
            f"blockwise_8bit: a moment of shape {tuple(x.shape)} sharded {spec} over "
            f"explicit mesh axes splits its blocks ({k} x {size} elements, block_size="
            f"{self.block_size}) between devices: {length} {name} in {parts} shards are not "
            f"whole blocks of {block}. Shard that axis so each device holds whole blocks, "
            "choose a block_size that divides its shards, or store this moment in FP32 or "
            "bfloat16.")

  def rows_hold_whole_blocks(self, shape: tuple[int, ...]) -> bool:
    """Whether every block of a moment of ``shape`` lies inside one row (its last axis
    holds at least ``block_size`` elements): any block of rows is then encoded and
    decoded on its own, as a step over blocks of rows does."""
    return len(shape) >= 2 and shape[-1] >= self.block_size

  @functools.partial(jax.jit, static_argnums=0, inline=True)
  def encode(self, x: jax.Array, key: Optional[jax.Array] = None,
             offset: jax.Array | int = 0) -> BlockCodes:
    """Block absmax and map codes of ``x`` (any shape, scalars included).

    ``offset``: flat index of ``x``'s first element in a larger array whose rows hold
    whole blocks (:meth:`rows_hold_whole_blocks`) and whose rows ``x`` continues: its
    random numbers are that array's.
    """
    _check_key(self.rounding, key)
    table = self.table
    x = jnp.asarray(x, jnp.float32)
    self._check_whole_blocks(x)
    blocks = self._split_blocks(x)
    *_, nb, size = blocks.shape
    finite = jnp.all(jnp.isfinite(blocks), axis=(-3, -1), keepdims=True)
    absmax = jnp.where(finite, jnp.max(jnp.abs(blocks), axis=(-3, -1), keepdims=True), jnp.nan)
    inverse = jnp.where(absmax > 0, 1.0 / absmax, 0.0)    # 0 for all-zero and NaN blocks
    y = jnp.where(finite, blocks, 0.0) * inverse
    if self.rounding == "nearest":    # the entry whose midpoint interval holds y
      codes = _count_below(*_search_index(self.signed, midpoints=True), y)
    else:                             # lo = table[i - 1] < y <= table[i] = hi
      i = jnp.clip(_count_below(*_search_index(self.signed, midpoints=False), y),
                   1, table.size - 1)
      inverse_gap = _lookup(1.0 / np.diff(table), i - 1)
      row_offset = offset // x.shape[-1] if x.ndim else 0   # rows before x, each nb * size draws
      up = (qz.stochastic_uniform(key, y.shape, row_offset * (nb * size))
            < (y - _lookup(table, i - 1)) * inverse_gap)
      codes = i - 1 + up
    codes = self._merge_blocks(codes.astype(jnp.uint8), x)
    return BlockCodes(codes.reshape(x.shape), absmax.reshape(self._absmax_shape(x.shape)),
                      tuple(x.shape))

  def zeros_like(self, x: jax.Array) -> BlockCodes:
    """A zero moment shaped as ``x``, its codes placed as ``x`` (a sharded weight's
    codes are sharded as it is): :meth:`encode` of zeros (every code the map's 0 and
    every absmax 0), built without encoding."""
    zero = int(np.searchsorted(self.table, 0.0))
    shape = tuple(jnp.shape(x))
    return BlockCodes(jnp.full_like(x, zero, jnp.uint8),
                      jnp.zeros(self._absmax_shape(shape), jnp.float32), shape)

  def _absmax_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the stored absmax of a moment of ``shape``: one per block."""
    matrix, _, _, rb, nb = self._layout(shape)
    return (*matrix[:-2], rb, nb) if len(shape) >= 2 else (nb,)

  @functools.partial(jax.jit, static_argnums=0, inline=True)
  def decode(self, stored: BlockCodes) -> jax.Array:
    """``map[c] * absmax``, in the stored shape."""
    self._check_whole_blocks(stored.codes)
    blocks = self._split_blocks(stored.codes)
    *lead, rb, _, nb, _ = blocks.shape
    values = _lookup(self.table, blocks) * stored.absmax.reshape(*lead, rb, 1, nb, 1)
    return self._merge_blocks(values, stored.codes).reshape(stored.shape)

  def _split_blocks(self, x: jax.Array) -> jax.Array:
    """``x`` as its blocks, ``(*lead, rb, k, nb, size)``, padded to whole blocks (the
    inverse of :meth:`_merge_blocks`)."""
    matrix, k, size, rb, nb = self._layout(x.shape)
    *lead, r, n = matrix
    padding = [(0, 0)] * len(lead) + [(0, rb * k - r), (0, nb * size - n)]
    return jnp.pad(x.reshape(matrix), padding).reshape(*lead, rb, k, nb, size)

  def _merge_blocks(self, blocks: jax.Array, like: jax.Array) -> jax.Array:
    """``blocks`` (``(*lead, rb, k, nb, size)``) as rows and columns again, cut to the shape
    of ``like`` and, unpadded, sharded as it is (explicit mesh axes leave a merge of a
    sharded axis to the caller)."""
    matrix, k, size, rb, nb = self._layout(like.shape)
    *lead, r, n = matrix
    unpadded = like.ndim >= 2 and (rb * k, nb * size) == (r, n)
    return blocks.reshape((*lead, rb * k, nb * size),
                          out_sharding=jax.typeof(like).sharding if unpadded else None)[..., :r, :n]


MomentFormat = Union[FloatStorage, Blockwise8bit]
Spec = Any   # None, a dtype (jnp.float32, jnp.bfloat16, jnp.float16), or a MomentFormat



def _check_rounding(rounding: str) -> None:
  if rounding not in qz.ROUNDINGS:
    raise ValueError(f"rounding must be one of {qz.ROUNDINGS}, got {rounding!r}")


def _check_key(rounding: str, key: Optional[jax.Array]) -> None:
  if rounding == "stochastic" and key is None:
    raise ValueError("stochastic rounding of a moment needs a PRNG key")


def float_storage(dtype: Any = jnp.bfloat16, *,
                  rounding: qz.Rounding = "stochastic") -> FloatStorage:
  """A moment stored in ``dtype`` (bfloat16 or float16), rounded as ``rounding``.

  ``jnp.bfloat16`` as a spec means ``float_storage(jnp.bfloat16)``; call this to
  choose ``rounding="nearest"``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from eco_optax import moments
    >>> fmt = moments.float_storage(jnp.bfloat16, rounding="nearest")
    >>> fmt.encode(jnp.array([1.0 + 2.0**-8, 3.0])).tolist()   # half an ulp: to even
    [1.0, 3.0]
  """
  return FloatStorage(dtype, rounding)


def blockwise_8bit(*, signed: Optional[bool] = None, block_size: int = 256,
                   rounding: qz.Rounding = "stochastic") -> Blockwise8bit:
  """bitsandbytes-style 8-bit storage: codes of the dynamic map, one FP32 absmax per block.

  ``signed=None`` (default): the signed map for the first moment, the unsigned one
  for moments the rule declares nonnegative (Adam's ``nu``).

  Example:
    >>> import jax, jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.ones((256, 256))}, eco.fp8_e4m3("tensor"))
    >>> eight = eco.moments.blockwise_8bit()
    >>> state = eco.adamw(1e-3, mu_dtype=eight, nu_dtype=eight).init(q)
    >>> state.moments.nu["w"].codes.shape
    (256, 256)
  """
  return Blockwise8bit(signed=signed, block_size=block_size, rounding=rounding)


def as_format(spec: Spec, *, nonnegative: bool, name: str = "moment") -> Optional[MomentFormat]:
  """Normalises a storage spec: ``None`` for FP32, else a :data:`MomentFormat`.

  Args:
    spec: ``None`` or ``jnp.float32`` (FP32), ``jnp.bfloat16`` or ``jnp.float16``
      (stochastic rounding), or a format from :func:`float_storage` /
      :func:`blockwise_8bit`.
    nonnegative: whether the moment is never negative; chooses the map of
      ``blockwise_8bit(signed=None)``.
    name: the moment, for error messages.

  Raises:
    ValueError: for any other spec, or the unsigned 8-bit map on a moment that
      can be negative.

  Example:
    >>> import jax.numpy as jnp
    >>> from eco_optax import moments
    >>> moments.as_format(jnp.float32, nonnegative=False) is None
    True
    >>> moments.as_format(moments.blockwise_8bit(), nonnegative=True, name="nu").signed
    False
  """
  if isinstance(spec, Blockwise8bit):
    if spec.signed is None:
      return dataclasses.replace(spec, signed=not nonnegative)
    if not spec.signed and not nonnegative:
      raise ValueError(f"{name}: blockwise_8bit(signed=False) would clip the negative "
                       f"values of {name!r} to 0; use signed=True or signed=None")
    return spec
  if isinstance(spec, FloatStorage):
    return spec
  expected = ("None, jnp.float32, jnp.bfloat16, jnp.float16, "
              "eco_optax.moments.float_storage(...) or eco_optax.moments.blockwise_8bit(...)")
  if spec is None:
    return None
  try:
    dtype = np.dtype(spec)
  except TypeError:
    raise ValueError(f"{name}: unsupported storage {spec!r}; expected {expected}") from None
  if dtype == np.float32:
    return None
  if dtype in _FLOAT_DTYPES:
    return FloatStorage(dtype)
  raise ValueError(f"{name}: unsupported storage dtype {dtype}; expected {expected} "
                   "(8-bit moments: blockwise_8bit())")


def is_stored(x: Any) -> bool:
  """``is_leaf`` for trees of stored moments: :class:`BlockCodes` is one leaf."""
  return isinstance(x, BlockCodes)


def encode_tree(fmt: MomentFormat, tree: Any, key: jax.Array) -> Any:
  """Encodes every array of ``tree`` (``None`` leaves stay), each with its own key."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([fmt.encode(x, k) for x, k in zip(leaves, keys)])


def decode_tree(fmt: MomentFormat, tree: Any) -> Any:
  """The FP32 tree of an :func:`encode_tree` result."""
  return jax.tree.map(fmt.decode, tree, is_leaf=is_stored)
