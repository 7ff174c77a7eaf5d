r"""The quantized step: one pass per leaf, new codes written once.

:func:`quantized_optimizer` turns a momentum rule and a *leaf step* (the ECO
equation of :mod:`eco_optax.transform`, or a baseline of
:mod:`eco_optax.baselines`) into an ``optax.GradientTransformation``. For every
quantized leaf it reads the stored codes, the gradient and the moments once,
runs the leaf step in FP32 and writes the new codes and moments once.

The update contract
-------------------
The update of a quantized leaf *is* its new stored value, not a difference to add:
a :class:`eco_optax.tree.NewCodes`, the storage bits of the new codes (``uint8``, 1
byte per parameter), a ``float32`` flag and the scale they were stored with (the scale
policy's :func:`eco_optax.quantize.next_scale` of the stored weights, in stored form).
:func:`eco_optax.apply_updates` copies these bits and this scale: nothing is rounded
twice, and nothing is computed again. The flag is ``VALID`` (apply), NaN (apply and
poison: a non-finite value, or a gradient entry of :data:`GRADIENT_LIMIT` or more,
reached the leaf, its scale becomes NaN, so the fault shows
in the weights and the loss) or ``KEEP``, which the skipping wrappers
(:func:`eco_optax.apply_if_finite`, :class:`eco_optax.MultiSteps`) write to keep the
leaf's codes and scale: a skipped step is skipped exactly. A transformation placed
after the optimizer that does arithmetic on updates (``optax.scale``,
``optax.clip``...) turns the bits into floats, and :func:`eco_optax.apply_updates`
refuses them at trace time; one that keeps them ``uint8`` (``optax.scale_by_schedule``
casts its factor to the update's dtype) multiplies the flag by its factor, and
:func:`eco_optax.apply_updates` poisons the leaf and warns.
Updates of plain (and lossless) leaves are FP32 differences, as in optax.

Memory and speed
----------------
On CPU a leaf is stepped in blocks of rows by a ``lax.fori_loop`` whose carries
are updated in place: the storage bits enter as a carry (each block reads its old
codes there and writes the new ones; they leave as the update's bits) and the
moments keep their own buffers, so no array the size of the weights is allocated in
FP32
(XLA:CPU does not fuse a computation with several outputs into one loop over
whole arrays, and would materialise each intermediate). Elsewhere (GPU, TPU) the
step runs on whole leaves and XLA fuses it. Rules that are not elementwise
(Muon's orthogonalization) and 8-bit moments (blocks of 256 over the flattened
leaf) always run on whole leaves.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from eco_optax import moments as mom
from eco_optax import quantize as qz
from eco_optax import rules
from eco_optax import tree as qtree

# Elements per block of rows on CPU: the streams of one block stay in cache. A leaf of
# more than 16 such blocks takes blocks twice as large, up to four times: fewer
# iterations, each with its fixed cost (FP8 ECO-RTN, 2.5M- and 12.5M-element leaves:
# 6-9% faster steps), while the block buffers (about 20 bytes per element of a
# block) stay small beside the leaf (benchmarks/memory.py's MLP, 1M-element leaves:
# optimizer-step temporaries 1.17 -> 1.00 B/param with blocks of 64K rather than 128K;
# the step as fast).
BLOCK_ELEMENTS = 1 << 16
# Leaves of more blocks than this carry their 16-bit floats as bits (_bits_when_due).
_BLOCKS_BEFORE_BITS = 16


# A gradient entry this large or larger is a fault: its square overflows FP32, which
# would make Adam's second moment infinite and its direction 0 (a leaf that stops
# moving for good, as FP32 weights do in optax, with its flags valid).
GRADIENT_LIMIT = 2.0 ** 64


class Block(NamedTuple):
  """One block of rows of one quantized leaf, in FP32, as a leaf step sees it.

  Attributes:
    grad: the gradient ``g``.
    stored: the stored weights ``Q(w)``.
    state: the optax state of the rule for this block (moments decoded to FP32).
    extra: the mode's own state for this block (FP32; ``None`` if it has none).
    quantize: ``target -> (codes, value)``: stores ``target`` with the next scale;
      ``codes`` in storage form (their bits; a leaf step passes them on as they
      are), ``value = Q(target)`` in FP32.
    encode_error: ``e -> count``: an error as kept between steps (its
      :func:`encode_error` count, an integer in FP32, which the step writes into the
      low 10 bits of the momentum).
    eta_before: the last positive learning rate, at which the debt the momentum
      carries was written (the memory-free rule; 0 before the first step and in the modes that
      write no debt: :attr:`Mode.debt_eta`).
  """
  grad: jax.Array
  stored: jax.Array
  state: Any
  extra: Optional[jax.Array]
  quantize: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
  encode_error: Callable[[jax.Array], jax.Array]
  eta_before: jax.Array


# (rule, eta, decay, block) -> (codes, new optax state, new extra or None)
LeafStep = Callable[[rules.LeafRule, jax.Array, Any, Block], tuple[jax.Array, Any, Any]]


class Mode(NamedTuple):
  """How a mode steps a quantized leaf.

  Attributes:
    step: the :data:`LeafStep`.
    extra: what the mode keeps per quantized leaf between steps: ``None``,
      ``"master"`` (an FP32 copy of the weights) or ``"error"`` (the last
      quantization error, in the low 10 bits of the FP32 momentum: :func:`join_momentum`).
    debt_eta: whether the state keeps (``previous_eta``) the last positive learning
      rate, at which the debt the momentum carries was written (it is still in the
      momentum, decayed, after a step at ``eta = 0``).
  """
  step: LeafStep
  extra: Optional[str] = None
  debt_eta: bool = False


# The exact rule's kept error e: a signed ERROR_BITS-bit count of 1/ERROR_STEPS of the grid
# step at the code it was written beside, in that code's scale (RTN: |e| <= half a step;
# SR: < one step), kept in the low bits of the quantized leaf's FP32 momentum.
ERROR_BITS = 10
ERROR_STEPS = 1 << (ERROR_BITS - 1)       # 512: counts within [-511, 511]
_LOW_BITS = (1 << ERROR_BITS) - 1


def _error_unit(spacing, scale: jax.Array) -> jax.Array:
  """One count of a kept error beside codes whose grid step is ``spacing`` (grid units,
  :func:`eco_optax.quantize.grid_spacing_and_inverse`), stored with ``scale`` (expanded)."""
  return spacing * (scale * (1.0 / ERROR_STEPS))


def encode_error(error: jax.Array, codes: jax.Array, inverse_scale: jax.Array,
                 fmt: qz.QuantFormat, key: jax.Array, offset) -> jax.Array:
  """``error`` as the exact rule keeps it: a count (FP32) of :func:`_error_unit`.

  The error in units of :func:`_error_unit` beside the new ``codes`` (:func:`qz._blocked`
  view) stored with the scale whose reciprocal is ``inverse_scale``, rounded
  stochastically, ``floor(x + u)`` with ``u`` a Weyl dither
  (:func:`eco_optax.quantize.dither_uniform`; unbiased per element: an update far below
  a count still moves the kept error on average), within ``[-511, 511]`` (a saturating
  target's excess beyond a grid step is dropped, as the weights cannot follow it).
  :func:`decode_error` reads it back.
  """
  inverse = qz._expand_scale(inverse_scale, fmt, error.ndim)
  spacing_inverse = qz.grid_spacing_and_inverse(codes, fmt)[1]
  steps = qz._blocked(error, fmt) * inverse * (spacing_inverse * ERROR_STEPS)
  limit = ERROR_STEPS - 1.0
  count = jnp.floor(jnp.clip(steps, -limit, limit) + qz.dither_uniform(key, steps.shape, offset))
  return qz._unblocked(count, error.shape)


def decode_error(count: jax.Array, bits: jax.Array, scale: jax.Array,
                 fmt: qz.QuantFormat) -> jax.Array:
  """The kept error (FP32) from its ``count`` (:func:`encode_error`), the storage ``bits``
  of the codes it was written beside and their ``scale``."""
  codes = qz._blocked(qz.bits_to_float32(bits, fmt), fmt)
  unit = _error_unit(qz.grid_spacing_and_inverse(codes, fmt)[0],
                     qz._expand_scale(scale, fmt, bits.ndim))
  return qz._unblocked(qz._blocked(count, fmt) * unit, bits.shape)


def split_momentum(mu: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(momentum, kept error's count)`` of a momentum written by :func:`join_momentum`."""
  bits = jax.lax.bitcast_convert_type(mu, jnp.uint32)
  low = (bits & _LOW_BITS).astype(jnp.int32)
  count = jnp.where(low >= ERROR_STEPS, low - (1 << ERROR_BITS), low)   # two's complement
  return (jax.lax.bitcast_convert_type(bits & ~jnp.uint32(_LOW_BITS), jnp.float32),
          count.astype(jnp.float32))


def join_momentum(mu: jax.Array, count: jax.Array) -> jax.Array:
  """The FP32 momentum rounded to 14 significant bits, the error's count in its low 10.

  Rounding adds half of the dropped bits to the magnitude bits (to nearest, ties away
  from zero; a carry moves into the exponent as it should): the momentum keeps a
  relative precision of ``2^-14`` (bfloat16: ``2^-8``).
  """
  half = 1 << (ERROR_BITS - 1)
  bits = (jax.lax.bitcast_convert_type(mu, jnp.uint32) + half) & ~jnp.uint32(_LOW_BITS)
  low = jax.lax.bitcast_convert_type(count.astype(jnp.int32), jnp.uint32) & _LOW_BITS
  return jax.lax.bitcast_convert_type(bits | low, jnp.float32)


def _rows_per_block(shape: tuple[int, ...], fmt: qz.QuantFormat, whole: bool,
                    matrix_rows: Optional[int] = None) -> int:
  """Rows per block of the loop; with ``matrix_rows`` (a stack viewed as rows, see
  :func:`_stack_view`) a divisor of it, so that a block stays inside one matrix."""
  rows = shape[0]
  if whole or jax.default_backend() != "cpu":
    return rows
  multiple = 1
  if fmt.scaling == "block" and fmt.axis % len(shape) == 0:
    multiple = fmt.block_size
  elements = BLOCK_ELEMENTS
  while math.prod(shape) > 16 * elements and elements < 4 * BLOCK_ELEMENTS:
    elements *= 2
  n = max(1, elements // max(1, math.prod(shape[1:])))
  n = min(rows, max(multiple, n // multiple * multiple))
  if matrix_rows is None:
    return n
  return max(d for d in range(multiple, min(n, matrix_rows) + 1, multiple)
             if matrix_rows % d == 0)


def _stack_view(shape: tuple[int, ...], fmt: qz.QuantFormat
                ) -> Optional[tuple[tuple[int, int], qz.QuantFormat]]:
  """A stack of matrices (``ndim > 2``, scales per matrix) stepped in blocks of rows:
  ``((rows, columns), format)``, the leaf viewed as the rows of all its matrices and
  the format with its axis counted from the end. Stepped one matrix per block, a stack
  kept temporaries the size of a whole matrix: optimizer-step temporaries of a
  ``(8, 1024, 1024)`` FP8 AdamW leaf 3.51 B/param, in this view 1.63, as one
  ``(8192, 1024)`` leaf (1.63; eight ``(1024, 1024)`` leaves: 0.28). ``None`` for
  other leaves, for blocks that run across the stack, and with more than one device:
  XLA's sharding propagation cannot carry a split of each matrix's rows through the
  merged axis (``P(None, "data", None)`` moments came back replicated), so there a stack
  is stepped matrix by matrix."""
  ndim = len(shape)
  if (ndim <= 2 or (fmt.scaling == "block" and fmt.axis % ndim < ndim - 2)
      or jax.device_count() > 1):
    return None
  return (math.prod(shape[:-1]), shape[-1]), dataclasses.replace(fmt, axis=fmt.axis % ndim - ndim)


def _per_array(x: Any, fn: Callable[[jax.Array], jax.Array]) -> Any:
  """``fn(x)``; for 8-bit moment codes, ``fn`` of their codes and of their absmax, with
  the shape of the new codes (a block of rows of them has the block's shape)."""
  if isinstance(x, mom.BlockCodes):
    codes = fn(x.codes)
    return mom.BlockCodes(codes, fn(x.absmax), tuple(codes.shape))
  return fn(x)


def _as_rows(x: jax.Array) -> jax.Array:
  """An array (a leaf of a stack, or its scales) as rows: all but its last axis merged;
  a scalar (the scale of an unscaled format) as it is."""
  return x if jnp.ndim(x) == 0 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _rows(x: jax.Array, r0, n: int, total: int) -> jax.Array:
  """Rows ``[r0, r0 + n)`` of ``x``, for arrays whose axis 0 is ``total`` rows or
  ``total / k`` groups of ``k`` rows; scalars and single-row arrays broadcast."""
  if jnp.ndim(x) == 0 or x.shape[0] == 1 or n == total:
    return x
  k = total // x.shape[0]
  # A block inside one group of k rows (a matrix of a stack) takes its group's row.
  return jax.lax.dynamic_slice_in_dim(x, r0 // k, max(1, n // k))


def blockwise(fn: Callable, carries: list, inputs: list, rows: int, n: int,
              always: Optional[jax.Array] = None):
  """``fn(r0, valid, carry_blocks, input_blocks) -> (new carry blocks, flag)`` over rows.

  Runs ``fn`` on blocks of ``n`` rows in a ``lax.fori_loop`` that updates the carries
  in place. Block ``k`` starts at ``r0 = min(k n, rows - n)``: the last block may
  overlap its predecessor, and ``valid`` (a boolean per row of the block) marks
  the rows it owns; ``fn`` must leave the others as they are in the carries.
  With a single block (``n == rows``) ``valid`` is ``None``, and given ``always`` (a
  traced predicate that always holds, as in :func:`_materialize`) ``fn`` runs behind a
  conditional on it: its temporaries then live only while it runs, and what comes
  after waits for all of it (transformer of benchmarks/memory.py: optimizer-step
  temporaries 11.0 -> 2.7 B/param). Returns the carries and whether any block's flag
  was set.
  """
  if n == rows and always is None:
    return fn(0, None, carries, inputs)
  if n == rows:   # the untaken branch passes the carries through: nothing to compile
    return jax.lax.cond(
        always, lambda c, i: fn(0, None, c, i),
        lambda c, i: (list(c), jnp.zeros((), bool)), carries, inputs)

  # The loop carries the carries' arrays (8-bit moment codes are two: codes and absmax).
  arrays, treedef = jax.tree.flatten(list(carries))

  def body(k, state):
    arrays, flag = state
    start = k * n
    r0 = jnp.minimum(start, rows - n)
    valid = None if rows % n == 0 else r0 + jnp.arange(n) >= start
    # Materialise each block once: XLA would fuse the slices into every consumer,
    # which then read the carries directly and force a copy of each carry before
    # its in-place update. A conditional is a fusion boundary.
    carry_blocks = jax.lax.cond(r0 >= 0, lambda cs: [_rows(c, r0, n, rows) for c in cs],
                                lambda cs: [jnp.zeros((n,) + c.shape[1:], c.dtype) for c in cs],
                                arrays)
    input_blocks = [_rows(x, r0, n, rows) for x in inputs]
    blocks, f = fn(r0, valid, treedef.unflatten(carry_blocks), input_blocks)
    return ([jax.lax.dynamic_update_slice_in_dim(c, b, r0, 0)
             for c, b in zip(arrays, jax.tree.leaves(blocks))], flag | f)

  arrays, flag = jax.lax.fori_loop(0, -(-rows // n), body, (arrays, jnp.zeros((), bool)))
  return treedef.unflatten(arrays), flag


def _dequantize_block(bits, scale, fmt):
  codes = qz._blocked(qz.bits_to_float32(bits, fmt), fmt)
  return qz._unblocked(codes * qz._expand_scale(scale, fmt, bits.ndim), bits.shape)


def _materialize(x: jax.Array, always: jax.Array) -> jax.Array:
  """``x`` (a block), computed once into a buffer of its own on CPU.

  XLA:CPU fuses a value into each of its consumers and does not fuse several outputs
  into one loop, so the new codes, read by their storage bits and by the error, would
  be rounded twice, and one large fusion runs slower per element than several small
  ones (10M FP8 params: 31 -> 22 ms per ECO-RTN step). A conditional is a fusion
  boundary: its operand is computed once, into a buffer (the block, in cache). Its
  predicate ``always`` is a traced value that always holds (the step count is not
  negative): a constant one would be folded away, and the whole-leaf and blockwise
  steps would then contract their floating-point operations differently. Elsewhere
  a value with several consumers is computed once.
  """
  if jax.default_backend() != "cpu":
    return x
  return jax.lax.cond(always, _identity, jnp.zeros_like, x)


def _identity(x):
  return x


class _Quantizer:
  """``target -> (bits, value)`` with a given FP32 scale (non-finite targets: code 0).

  ``bits`` are the storage bits of the new codes (``uint8``; ``uint16`` for 16-bit
  formats), ``value`` their FP32 value ``Q(target)``. ``materialize``: ``None``, or
  the ``always`` of :func:`_materialize`, to round the codes of a block once, into an
  FP32 buffer of their own; not for whole leaves. After a call, ``fault`` says whether
  an element of the target or of ``gradient`` (the block's gradient, or ``None``) was
  not finite (the leaf is then poisoned), and ``codes`` holds the new codes (FP32, grid
  units, :func:`qz._blocked` view).
  """

  def __init__(self, fmt, scale, rounding, key, offset, materialize, gradient=None):
    self.fmt, self.scale, self.rounding, self.key, self.offset = (
        fmt, scale, rounding, key, offset)
    self.materialize, self.gradient = materialize, gradient
    self.fault = self.codes = None

  def __call__(self, target):
    fmt, rho = self.fmt, self.fmt.max_value
    scale, inverse = (qz._expand_scale(x, fmt, target.ndim) for x in self.scale)
    y = jnp.clip(qz._blocked(target, fmt) * inverse, -rho, rho)
    finite = jnp.isfinite(y)
    if self.gradient is not None:   # as cheap as isfinite: NaN compares false
      finite = finite & (jnp.abs(qz._blocked(self.gradient, fmt)) < GRADIENT_LIMIT)
    codes = qz._round_to_grid(jnp.where(finite, y, 0.0), fmt, self.rounding, self.key,
                              self.offset)
    if self.materialize is None:
      self.fault = ~jnp.all(finite)
    else:
      # Read by the stored bits and the error: rounded once, into a buffer that marks
      # the faults as NaN. The fault check reads that buffer (in cache): column sums
      # are NaN where an element is (a float reduction; a boolean one would
      # materialise a mask first), and a check of the gradient or the target on their
      # own would materialise the gradient block or compute the step a second time
      # (the gradient block's check: 10M FP8 master-weight step 25 -> 21 ms without it).
      marked = _materialize(jnp.where(finite, codes, jnp.nan), self.materialize)
      # Codes of a scaled format are small; those of an unscaled one (bfloat16) are the
      # values, whose column sums could overflow: there the sums are of ``x - x``.
      self.fault = ~jnp.all(jnp.isfinite(_column_sums(
          marked - marked if fmt.scaling == "none" else marked)))
      codes = jnp.where(jnp.isnan(marked), 0.0, marked)
    self.codes = codes
    bits = qz.grid_to_bits(codes, fmt).astype(qtree.new_codes_dtype(fmt))
    return qz._unblocked(bits, target.shape), qz._unblocked(codes * scale, target.shape)


def _sharded(q: qz.QuantizedArray, grad: jax.Array) -> bool:
  """Whether the leaf's codes or its gradient have a sharded type (explicit mesh axes)."""
  return qz.has_sharded_type(grad) or qz.has_sharded_type(q.values)


def _bits_when_due(q: qz.QuantizedArray, narrow: list, grad: jax.Array,
                   previous_flags: Optional[jax.Array]) -> tuple:
  """``(storage bits of q's codes, [bits of each narrow-float carry], next scales)``
  (bits as ``uint8``, ``uint16`` for 16-bit formats; the scales as stored,
  :func:`eco_optax.quantize.next_scale`'s), computed once ``grad`` exists and the
  previous quantized leaf's step (its ``previous_flags``, ``None`` for the first) is done.

  XLA:CPU materialises a float8 -> uint8 bitcast as a copy (1 byte per parameter), and
  its scheduler computes these copies for every leaf at the start of the step, where
  they all stay alive (through the backward pass, in a train step) until the last
  leaf's codes are applied. Behind a conditional on the gradient and on the previous
  leaf's flags (its other branch, never taken, returns zeros),
  each copy is made when its leaf's step is about to run, and the scheduler applies
  each leaf's new codes before the next leaf's step starts: one leaf's copy is alive
  at a time (MLP of benchmarks/memory.py, FP32
  moments: optimizer-step temporaries 1.84 -> 1.17 bytes per parameter). The scale
  policy's absmax of the codes runs behind a conditional of its own, before the
  copies: XLA:CPU reduces a copy of the code magnitudes (1 byte per parameter; its
  library max kernel reads a materialised input, and a fused reduction was 25 times
  slower), which it would otherwise make for every leaf at once at the start of the
  step, and which is freed before the leaf's code copy is made (the MLP: 1.00 -> 0.75
  bytes per parameter). Elsewhere the bitcast is free and a conditional would only
  add a synchronisation.

  ``narrow``: the leaf's 16-bit float carries (bfloat16 moments, ``eco_exact``'s kept
  error) when it is stepped in more than ``_BLOCKS_BEFORE_BITS`` blocks. XLA:CPU
  updates a slice of a bfloat16 array by converting the whole array to FP32 and
  back, once per block: a cost of the leaf's size times its number of blocks.
  Measured with bfloat16 moments (SR), blocks of 128K elements, per step: equal at
  leaves of 1M elements (8 blocks), 160 -> 118 ms at 6M (48), 633 -> 276 ms at 12.5M (96) when
  these carries travel through the loop as their bits, for a copy of 2 bytes per
  element each (taking the 1M-element leaves of benchmarks/memory.py's MLP this way
  too raised its optimizer-step temporaries from 1.09 to 2.09 bytes per parameter).
  """
  if jax.default_backend() != "cpu" or _sharded(q, grad):
    return bits_and_scales(q, narrow)
  due = qz.always_holds(grad)
  if previous_flags is not None:
    due = due & qz.always_holds(previous_flags)
  scales = jax.lax.cond(due, qz._next_scales, _stored_scales, q)
  due = due & qz.always_holds(scales[0])
  return jax.lax.cond(due, _to_bits(q.fmt), _untaken_bits(q.fmt), q, narrow) + (scales,)


def bits_and_scales(q: qz.QuantizedArray, narrow: list) -> tuple:
  """:func:`_bits_when_due`'s result, computed where it stands (no conditional)."""
  return _to_bits(q.fmt)(q, narrow) + (qz._next_scales(q),)


def _stored_scales(q: qz.QuantizedArray) -> tuple:
  """The branch of :func:`_bits_when_due` that never runs: the stored scales, passed through."""
  return q.scale, q.tensor_scale


@functools.cache   # one function per format: an eager step does not compile the branch again
def _to_bits(fmt: qz.QuantFormat) -> Callable[[qz.QuantizedArray, list], tuple]:
  return lambda q, narrow: (qz.values_to_bits(q.values, fmt).astype(qtree.new_codes_dtype(fmt)),
                            [_float_bits(x) for x in narrow])


@functools.cache
def _untaken_bits(fmt: qz.QuantFormat) -> Callable[[qz.QuantizedArray, list], tuple]:
  """The branch of :func:`_bits_when_due` that never runs: zero bits."""
  return lambda q, narrow: (jnp.zeros(q.shape, qtree.new_codes_dtype(fmt)),
                            [jnp.zeros(x.shape, jnp.uint16) for x in narrow])


def _float_bits(x: jax.Array) -> jax.Array:
  """The bits of a 16-bit float array, as ``uint16``."""
  return jax.lax.bitcast_convert_type(x, jnp.uint16)


def _quantized_leaf(mode: Mode, rule: rules.LeafRule, fields, formats, rounding,
                    q: qz.QuantizedArray, grad, stored_moments: dict, extra, count, eta,
                    eta_before, decay, key, error_key, moment_keys: dict, previous_flags):
  """Steps one quantized leaf: returns ``(update, stored moments, extra)``.

  ``key`` seeds the stochastic rounding of its weights, ``error_key`` that of its kept
  error (``eco_exact``; ``None`` in the other modes)."""
  fmt, shape = q.fmt, q.shape
  scale = q.effective_scale
  # A leaf or gradient whose type is sharded (explicit mesh axes) is stepped whole: the
  # loop's slices and in-place updates of a sharded dimension are refused there. So is
  # a leaf with 8-bit moments whose blocks span several rows.
  whole = (not rule.elementwise or _sharded(q, grad)
           or any(isinstance(formats.get(f), mom.Blockwise8bit)
                  and not formats[f].rows_hold_whole_blocks(shape) for f in fields))
  view = None if whole or jax.default_backend() != "cpu" else _stack_view(shape, fmt)
  if view is not None:    # the loop's format: its axis counted in the view
    (rows, columns), loop_fmt = view
    n = _rows_per_block((rows, columns), loop_fmt, whole, matrix_rows=shape[-2])
  else:
    rows, loop_fmt = shape[0], fmt
    n = _rows_per_block(shape, fmt, whole)
  row_size = q.size // rows
  # The loop's first carry enters with the stored bits: each block reads its old codes
  # there and writes the new ones, and it leaves as the update's bits.
  carries = [stored_moments[f] for f in fields]
  if mode.extra == "master":
    carries.append(extra)
  narrow = [] if -(-rows // n) <= _BLOCKS_BEFORE_BITS else [
      i for i, c in enumerate(carries) if isinstance(c, jax.Array) and c.dtype.itemsize == 2]
  narrow_dtypes = [carries[i].dtype for i in narrow]
  bits, narrow_bits, next_scales = _bits_when_due(q, [carries[i] for i in narrow], grad,
                                                  previous_flags)
  next_scale = qz._decode_scale(*next_scales)
  # The reciprocal of the next scale is materialised here: XLA would otherwise fuse its
  # division into the loop over the elements.
  inputs = [grad, scale, next_scale, 1.0 / next_scale]
  for i, x in zip(narrow, narrow_bits):
    carries[i] = x
  carries = [bits] + carries
  if view is not None:
    carries = [_per_array(c, _as_rows) for c in carries]
    inputs = [_as_rows(x) for x in inputs]

  def as_floats(xs):   # the narrow carries back in their float dtypes
    xs = list(xs)
    for i, dtype in zip(narrow, narrow_dtypes):
      xs[i] = jax.lax.bitcast_convert_type(xs[i], dtype)
    return xs

  always = None if whole else count >= 0

  def block_fn(r0, valid, carry, inp):
    bits, *rest = carry
    # 8-bit moment codes reach a block with the leaf's shape: given the block's.
    rest = [_per_array(x, _identity) for x in as_floats(rest)]
    carry = [bits] + rest
    g, s, s_next, s_next_inverse = inp
    offset = r0 * row_size
    decoded = {f: (mom.decode_tree(formats[f], x) if f in formats else x)
               for f, x in zip(fields, rest)}
    quantizer = _Quantizer(loop_fmt, (s_next, s_next_inverse), rounding, key, offset, always,
                           gradient=g)
    extra_in = None
    if mode.extra == "master":
      extra_in = rest[len(fields)]
    elif mode.extra == "error":   # e_t: written beside the stored codes, in their scale
      decoded["mu"], count_in = split_momentum(decoded["mu"])
      extra_in = decode_error(count_in, bits, s, loop_fmt)
    block = Block(g.astype(jnp.float32), _dequantize_block(bits, s, loop_fmt),
                  rule.pack(count, decoded), extra_in, quantizer,
                  lambda e: encode_error(e, quantizer.codes, s_next_inverse, loop_fmt,
                                         error_key, offset), eta_before)
    codes, state, extra_out = mode.step(rule, eta, decay, block)
    new = rule.unpack(state)
    if mode.extra == "error":
      new["mu"] = join_momentum(new["mu"], extra_out)
    out = [codes]
    for f in fields:
      x = new[f]
      if f in formats:
        x = formats[f].encode(x, moment_keys[f], offset)
      out.append(x)
    if mode.extra == "master":
      out.append(extra_out)
    if valid is not None:
      keep = valid.reshape(valid.shape + (1,) * (bits.ndim - 1))
      out = [jax.tree.map(lambda o, c: jnp.where(keep, o, c), o, c) for o, c in zip(out, carry)]
    for i in narrow:
      out[1 + i] = _float_bits(out[1 + i])
    # A non-finite gradient or target poisons the leaf (the quantizer's check). Rows of
    # an overlapping last block that an earlier block owns are real rows: checking them
    # again changes nothing.
    return out, quantizer.fault

  # One block runs behind a conditional only when traced (always, through
  # _step_quantized_leaf's jit, but for an unhashable rule or under jax.disable_jit):
  # eagerly each operation runs on its own, and a conditional of a new closure would
  # compile again at every step. Not in master-weights mode: measured there, the
  # conditional raised the optimizer step's temporaries (benchmark transformer: 0.85 ->
  # 0.97 B/param; 347.6 -> 357.4 B/param at the whole step's peak under XLA:CPU's
  # memory-optimised scheduler).
  conditional = isinstance(always, jax.core.Tracer) and mode.extra != "master"
  carries, poisoned = blockwise(block_fn, carries, inputs, rows, n,
                                always if conditional else None)
  if view is not None:
    carries = [_per_array(c, lambda x: x.reshape(shape[:-1] + x.shape[-1:])) for c in carries]
  poisoned = poisoned | ~jnp.isfinite(eta)
  bits, *rest = carries
  rest = as_floats(rest)
  update = qtree.NewCodes(bits, jnp.where(poisoned, jnp.nan, qtree.VALID).astype(jnp.float32),
                          *next_scales)
  new_moments = dict(zip(fields, rest))
  return update, new_moments, rest[len(fields)] if mode.extra == "master" else None


def _step_quantized_leaf(static: tuple, *args):
  """:func:`_quantized_leaf` through one jitted function per ``static`` (mode, rule,
  fields, moment formats, rounding) and argument shapes: the leaves of a model that are
  alike (the same kind of matrix in every layer) are traced and lowered once, not once
  per leaf (the benchmark transformer at depth 24, 96 FP8 leaves: the optimizer step
  traced and lowered in 1.5 s instead of 4.5 s). XLA inlines the calls. A rule that
  holds a traced hyperparameter (:func:`optax.inject_hyperparams`) is not hashable,
  and its leaves are traced one by one.
  """
  try:
    hash(static)
  except TypeError:
    return _quantized_leaf_unpacked(static, *args)
  return _quantized_leaf_jit(static, *args)


def _quantized_leaf_unpacked(static: tuple, *args):
  mode, rule, fields, formats, rounding = static
  return _quantized_leaf(mode, rule, list(fields), dict(formats), rounding, *args)


_quantized_leaf_jit = jax.jit(_quantized_leaf_unpacked, static_argnums=0)


def _plain_leaf(rule: rules.LeafRule, fields, formats, value, grad, stored_moments, count,
                eta, decay, moment_keys):
  """Steps a plain (or lossless) leaf as optax: returns ``(update, stored moments)``."""
  decoded = {f: (mom.decode_tree(formats[f], stored_moments[f]) if f in formats
                 else stored_moments[f]) for f in fields}
  direction, state = rule.transform.update(grad, rule.pack(count, decoded))
  update = (-eta) * (direction + decay * value) if decay is not None else (-eta) * direction
  new = rule.unpack(state)
  return update, {f: formats[f].encode(new[f], moment_keys[f]) if f in formats else new[f]
                  for f in fields}


class ErrorFeedbackState(NamedTuple):
  """State of an eco_optax optimizer.

  Attributes:
    count: steps taken (int32).
    moments: the rule's moments (``mu`` receives the injected error), each field a
      tree of leaves in its storage format (FP32 arrays by default; ``None`` where
      a leaf has no such moment). Under the exact rule (``mode="eco_exact"``, and
      ``"eco"`` with round-to-nearest and an FP32 ``mu``) the low 10 bits of each
      quantized leaf's FP32 ``mu`` keeps its last quantization error
      (:func:`join_momentum`; read it with :func:`kept_error`).
    master: FP32 master weights in ``"master_weights"`` mode, else ``None``.
    key: the raw data (``jax.random.key_data``, ``uint32``) of the PRNG key of
      stochastic rounding, advanced at every step that rounds stochastically (the
      weights, a kept error or the moments). Raw, not a typed key, so that the state
      goes through ``flax.serialization`` (msgpack), which refuses typed keys.
    formats: the storage format of every parameter leaf the state was built for
      (static; :func:`eco_optax.tree.formats_of`): ``update`` refuses params stored
      otherwise.
    previous_eta: under the memory-free rule, the last positive learning rate, at which the
      debt the momentum carries was written (FP32 scalar; 0 before the first step;
      :attr:`Mode.debt_eta`); ``None`` in the modes that write no debt. Kept, not
      recomputed from the schedule, because a learning rate injected from outside
      (:func:`optax.inject_hyperparams`) has none.
    error_bits: under the exact rule, how many low bits of each quantized leaf's
      FP32 ``mu`` keep its last error (int32 scalar, :data:`ERROR_BITS`); ``None`` in
      the other modes. It marks the layout of ``mu`` in the state and in checkpoints:
      a state of one layout given to an optimizer of the other is refused (its low
      bits would be read as an error, or an error as momentum).
  """
  count: jax.Array
  moments: Any
  master: Optional[Any]
  key: jax.Array
  formats: Any = None
  previous_eta: Optional[jax.Array] = None
  error_bits: Optional[jax.Array] = None


# fold_in(state.key, _MOMENT_STREAM) seeds the moments' rounding; with n lossy leaves the
# weights use split(state.key, m)[i] (= fold_in(state.key, i)) for 1 <= i <= n, and
# eco_exact's kept errors i = n + 1 ... 2n.
_MOMENT_STREAM = 2**32 - 1


def _per_leaf(value: Any, tree: Any) -> Any:
  """``value(tree)`` for a callable (a tree of per-leaf values), else ``value`` at every leaf."""
  return value(tree) if callable(value) else jax.tree.map(lambda _: value, tree)


def dense_shapes(params: Any) -> Any:
  """``params`` with every quantized leaf as a ``jax.ShapeDtypeStruct`` (FP32)."""
  return jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32) if qtree.is_quantized(p) else p,
      params, is_leaf=qtree.is_quantized)


def quantized_optimizer(rule: rules.MomentumRule, mode: Mode,
                        learning_rate: optax.ScalarOrSchedule, weight_decay: Any,
                        mask: Any, rounding: qz.Rounding, seed: int,
                        moment_formats: dict, check_beta: bool,
                        ) -> optax.GradientTransformation:
  """The ``optax.GradientTransformation`` of ``rule`` stepped by ``mode`` (module docstring).

  Args:
    rule: the momentum rule.
    mode: the leaf step of quantized leaves and what it keeps.
    learning_rate: ``eta``: a float or an optax schedule of the step count.
    weight_decay: ``lambda`` (``None``: no decay term), or a callable of the
      dequantized params returning per-leaf values.
    mask: a tree of booleans (or a callable returning one) where decay applies.
    rounding: ``"nearest"`` or ``"stochastic"``.
    seed: seed of the PRNG key of stochastic rounding.
    moment_formats: ``{field: MomentFormat}`` of the moments not kept in FP32.
    check_beta: refuse momentum decays outside ``(0, 1)`` (ECO needs one).
  """
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
  if mode.extra == "error" and "mu" in moment_formats:
    raise ValueError(
        f"mode='eco_exact' keeps each quantized leaf's last error in the low 10 bits of its FP32 "
        f"first moment (mu), and mu stored as {moment_formats['mu']} leaves no room for it. "
        "Keep mu in FP32 and store the second moment narrower instead (nu_dtype=jnp.bfloat16: "
        "7 bytes/param with FP8 weights), or use mode='eco_memory_free'.")

  def leaf_rules(params):
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=qtree.is_quantized)
    out = [rule.for_leaf(jax.ShapeDtypeStruct(jnp.shape(p), jnp.float32)) for p in leaves]
    if check_beta:
      # A traced beta (optax.inject_hyperparams) has no value to check at trace time.
      betas = {float(lr.beta) for lr, _ in out if not isinstance(lr.beta, jax.core.Tracer)}
      bad = sorted(b for b in betas if not 0.0 < b < 1.0)
      if bad:
        raise ValueError(
            f"ECO needs a momentum decay (b1 / momentum) in (0, 1), got {bad}: the error is "
            "paid back through the momentum, alpha = (1/eta)(1 - 1/beta). Use "
            "mode='naive' or 'master_weights' for momentum-free training.")
    return leaves, treedef, out

  def init(params):
    qtree.check_pure(params)
    leaves, treedef, lrules = leaf_rules(params)
    moments = {name: treedef.unflatten([
        _zero_moment(moment_formats.get(name), p)
        if name in lr[1] else None
        for p, lr in zip(leaves, lrules)]) for name in rule.moments._fields}
    master = None   # eco_exact's e_0 = 0 (a zero momentum's low 10 bits): the initial rounding error is dropped
    if mode.extra == "master":
      master = treedef.unflatten([qz.dequantize(p) if qtree.is_lossy(p) else None for p in leaves])
    return ErrorFeedbackState(jnp.zeros([], jnp.int32), rule.moments(**moments), master,
                              jax.random.key_data(jax.random.key(seed)),
                              qtree.formats_of(params),
                              jnp.zeros([], jnp.float32) if mode.debt_eta else None,
                              jnp.asarray(ERROR_BITS, jnp.int32) if mode.extra == "error" else None)

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("eco_optax optimizers need params: tx.update(grads, state, params)")
    leaves, treedef, lrules = leaf_rules(params)
    _check_state(state, rule.moments, mode)
    qtree.check_updates_match(params, grads, "grads")
    qtree.check_shardings(params, grads)
    qtree.check_formats_match(params, state.formats)
    dense = qtree.dequantize_params(params) if callable(weight_decay) or callable(mask) else (
        dense_shapes(params))
    decay = _decays(weight_decay, mask, dense, treedef)
    g_leaves = treedef.flatten_up_to(grads)
    eta = jnp.asarray(schedule(state.count), jnp.float32)
    count = state.count
    eta_before = state.previous_eta if state.previous_eta is not None else jnp.zeros([])
    n_lossy = sum(map(qtree.is_lossy, leaves))
    if rounding == "stochastic" or mode.extra == "error" or moment_formats:
      # One split for the step: its own next key, the weights' keys, the kept errors' keys.
      root = jax.random.wrap_key_data(state.key)
      keys = jax.random.split(root, n_lossy * (2 if mode.extra == "error" else 1) + 1)
      next_key, leaf_keys = _placed_like(state.key, keys[0]), iter(keys[1:n_lossy + 1])
      error_keys = iter(keys[n_lossy + 1:])
      moment_root = jax.random.fold_in(root, _MOMENT_STREAM)
      moment_keys = {name: iter(jax.random.split(jax.random.fold_in(moment_root, i), len(leaves)))
                     for i, name in enumerate(rule.moments._fields)}
    else:   # nothing is rounded stochastically: no key is drawn (a threefry hash less to compile)
      next_key, leaf_keys, error_keys = state.key, iter([None] * n_lossy), iter([])
      moment_keys = {name: iter([None] * len(leaves)) for name in rule.moments._fields}
    stored = {name: treedef.flatten_up_to(getattr(state.moments, name))
              for name in rule.moments._fields}
    master = treedef.flatten_up_to(state.master) if state.master is not None else None

    weight_keys = [next(leaf_keys) if qtree.is_lossy(p) else None for p in leaves]
    leaf_error_keys = [next(error_keys) if qtree.is_lossy(p) and mode.extra == "error" else None
                       for p in leaves]
    leaf_moment_keys = [{name: next(moment_keys[name]) for name in rule.moments._fields}
                        for _ in leaves]
    updates, new_extra = [None] * len(leaves), [None] * len(leaves)
    new_moments = {name: [None] * len(leaves) for name in rule.moments._fields}
    previous_flags = None
    # Last leaf first, the order in which backpropagation usually produces gradients;
    # on CPU each quantized leaf's step waits for the one before it (_bits_when_due).
    for i in reversed(range(len(leaves))):
      p, g, lam, (leaf_rule, fields) = leaves[i], g_leaves[i], decay[i], lrules[i]
      mkeys = leaf_moment_keys[i]
      moments_in = {f: stored[f][i] for f in fields}
      formats = {f: moment_formats[f] for f in fields if f in moment_formats}
      if qtree.is_lossy(p):
        extra = master[i] if mode.extra == "master" else None
        u, moments_out, new_extra[i] = _step_quantized_leaf(
            (mode, leaf_rule, tuple(fields), tuple(formats.items()), rounding),
            p, g, moments_in, extra, count, eta, eta_before,
            jnp.asarray(0.0 if lam is None else lam, jnp.float32), weight_keys[i],
            leaf_error_keys[i], mkeys, previous_flags)
        previous_flags = u.flags
      else:
        value = p.values if qtree.is_quantized(p) else p
        u, moments_out = _plain_leaf(leaf_rule, fields, formats, value, g, moments_in,
                                     count, eta, lam, mkeys)
      updates[i] = u
      for name in new_moments:
        new_moments[name][i] = moments_out.get(name)

    moments = rule.moments(**{k: treedef.unflatten(v) for k, v in new_moments.items()})
    master = treedef.unflatten(new_extra) if mode.extra == "master" else None
    return treedef.unflatten(updates), ErrorFeedbackState(
        optax.safe_increment(count), moments, master, next_key, state.formats,
        _debt_eta(mode, eta, state.previous_eta), state.error_bits)

  return optax.GradientTransformation(init, update)


def kept_error(params: Any, state: ErrorFeedbackState) -> Any:
  """The last quantization error the exact rule keeps, per quantized leaf.

  Args:
    params: the quantized params as applied after the step that wrote ``state``
      (the error is kept in units of their codes' grid step and scale).
    state: the optimizer's :class:`ErrorFeedbackState`.

  Returns:
    ``params``' structure: the error ``e = target - Q(target)`` in FP32 for each
    lossy quantized leaf, as the next step reads it (to 1/512 of a grid step), and
    ``None`` for the other leaves.

  Example:
    >>> import jax.numpy as jnp, eco_optax as eco
    >>> q = eco.quantize_params({"w": jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)},
    ...                         eco.int8("tensor"))
    >>> tx = eco.sgdm(0.1, mode="eco_exact")
    >>> updates, state = tx.update({"w": jnp.full((4, 4), 0.03)}, tx.init(q), q)
    >>> q = eco.apply_updates(q, updates)
    >>> e = eco.kept_error(q, state)["w"]     # the step, 0.1 * (0.1 * 0.03), rounded back
    >>> bool(jnp.allclose(e, -3e-4, atol=q["w"].scale / 512))   # to a count
    True
  """
  if not isinstance(state, ErrorFeedbackState) or state.error_bits is None:
    raise TypeError("state: kept_error reads the state of an optimizer of the exact rule "
                    "(mode='eco_exact', or 'eco' with rounding='nearest'; its error_bits set), "
                    f"got {_describe(state)}")
  leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=qtree.is_quantized)
  return treedef.unflatten([
      decode_error(split_momentum(mu)[1], qz.values_to_bits(p.values, p.fmt),
                   p.effective_scale, p.fmt) if qtree.is_lossy(p) else None
      for p, mu in zip(leaves, treedef.flatten_up_to(state.moments.mu))])


def _debt_eta(mode: Mode, eta: jax.Array, before: Optional[jax.Array]) -> Optional[jax.Array]:
  """The ``previous_eta`` a step leaves (:attr:`Mode.debt_eta`): the last positive rate."""
  return jnp.where(eta > 0, eta, before) if mode.debt_eta else None


def _placed_like(raw: jax.Array, key: jax.Array) -> jax.Array:
  """``key``'s raw data, computed elementwise from ``raw`` (``raw ^ raw ^ data``, bit for bit
  the data): XLA then gives it ``raw``'s sharding, where a new key would come back
  replicated, so a key the user placed on a mesh axis stays there (no recompilation)."""
  return raw ^ (raw ^ jax.random.key_data(key))


def _describe(state: Any) -> str:
  """What ``state`` is, for an error message about a state without the exact rule's error."""
  if isinstance(state, ErrorFeedbackState) and state.error_bits is None:
    return ("an ErrorFeedbackState without error_bits (mode 'eco_memory_free', 'naive' or "
            "'master_weights')")
  return f"a {type(state).__name__}"


def _check_state(state: Any, moments: type, mode: Mode) -> None:
  """Refuses a state that an ``init`` of this optimizer (rule and mode) did not return."""
  master = " with a master copy"
  if isinstance(state, ErrorFeedbackState):
    has_master = state.master is not None
    if isinstance(state.moments, moments) and has_master == (mode.extra == "master"):
      if (state.error_bits is not None) != (mode.extra == "error"):
        wants, has = ("keeps", "does not keep") if mode.extra == "error" else (
            "does not keep", "keeps")
        raise TypeError(
            f"state: expected this optimizer's init(params): a state whose first moment "
            f"{wants} the exact rule's error in its low {ERROR_BITS} bits (mode='eco_exact' "
            f"keeps it, and mode='eco' with rounding='nearest' and an FP32 mu; the other modes "
            f"do not), got one that {has} it. Pass the optimizer the state its own init "
            "returned, or restore a checkpoint saved by an optimizer of the same mode (a state "
            "of the memory-free rule continues with mode='eco_memory_free').")
      if (state.previous_eta is not None) == mode.debt_eta:
        return
      wants, has_eta = ("with", "without") if mode.debt_eta else ("without", "with")
      saved = ("before the memory-free rule kept previous_eta lacks it" if mode.debt_eta else
               "in 'eco_exact' mode before the exact rule stopped keeping previous_eta has it")
      raise TypeError(
          f"state: expected this optimizer's init(params): an ErrorFeedbackState {wants} "
          f"previous_eta (the learning rate the momentum's debt was written at), got one "
          f"{has_eta} it. Pass the optimizer the state its own init returned (a state saved "
          f"by an eco_optax {saved}).")
    got = f"an ErrorFeedbackState of {type(state.moments).__name__}" + master * has_master
  else:
    got = f"a {type(state).__name__}"
  raise TypeError(
      f"state: expected this optimizer's init(params): an ErrorFeedbackState of "
      f"{moments.__name__}{master * (mode.extra == 'master')}, "
      f"got {got}. Pass each transformation the state its own init returned (optax.chain "
      "hands each of its transformations its part).")


def _zero_moment(fmt, param):
  """A zero moment of ``param`` in its storage format, shaped and placed as the
  parameter's values (the moment of a sharded weight is sharded as it is, as optax's
  ``init`` makes it): a fresh buffer per field (buffers are donated).

  Stored as they are (``fmt`` None), a quantized leaf's moments are FP32, a plain
  leaf's FP32 or wider: float64 for float64 params (``jax_enable_x64``), whose float64
  gradients would otherwise turn them float64 after the first step, as in optax.
  """
  if qtree.is_quantized(param):
    like, dtype = param.values, jnp.float32
  else:
    like, dtype = param, jnp.promote_types(param.dtype, jnp.float32)
  return fmt.zeros_like(like) if fmt else jnp.zeros_like(like, dtype)


def _decays(weight_decay: Any, mask: Any, dense: Any, treedef) -> list:
  """Per leaf ``lambda``, or ``None`` where no decay term applies (optax's masked leaves)."""
  if weight_decay is None:
    return [None] * treedef.num_leaves
  mask = mask(dense) if callable(mask) else mask
  masks = [True] * treedef.num_leaves if mask is None else treedef.flatten_up_to(mask)
  lams = treedef.flatten_up_to(_per_leaf(weight_decay, dense))
  return [lam if m else None for m, lam in zip(masks, lams)]


def _column_sums(x: jax.Array) -> jax.Array:
  """Sums over axis 0 (``x`` itself if it has one axis or none)."""
  return jnp.sum(x, axis=0) if x.ndim > 1 else x
