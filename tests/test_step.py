"""The one-pass step: blocks of rows give the whole-leaf result, bit for bit."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eco_optax as eco
from eco_optax import step as st

FORMATS = {
    "fp8-channel": eco.fp8_e4m3(),
    "int4-tensor": eco.int4(),
    "int8-block": eco.int8("block", block_size=8),
    "mxfp4": eco.fp4_e2m1("mxfp4", block_size=8),
    "nvfp4": eco.fp4_e2m1("nvfp4", block_size=8),
}


def _run(formats, mode, rounding, moments, block_elements, monkeypatch, steps=3,
         shape=(72, 24)):
  """``steps`` AdamW steps of a tree holding a ``shape`` weight and a bias per format."""
  monkeypatch.setattr(st, "BLOCK_ELEMENTS", block_elements)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {name: {"w": jax.random.normal(jax.random.fold_in(k1, i), shape) * 0.1,
                   "b": jnp.zeros(shape[-1])} for i, name in enumerate(formats)}
  q = eco.quantize_params(params, lambda path, x: formats[path[0].key] if x.ndim > 1 else None)
  tx = eco.adamw(0.05, mode=mode, rounding=rounding, mu_dtype=moments, nu_dtype=moments)
  state = tx.init(q)
  update = jax.jit(tx.update)
  for i in range(steps):
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(k2, i), p.shape), params)
    updates, state = update(g, state, q)
    q = eco.apply_updates(q, updates)
  return q, state


def _assert_bit_identical(a_tree, b_tree):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(a_tree), jax.tree.leaves(b_tree)):
    np.testing.assert_array_equal(np.atleast_1d(np.asarray(a)).view(np.uint8),
                                  np.atleast_1d(np.asarray(b)).view(np.uint8),
                                  err_msg=jax.tree_util.keystr(path))


STACKED_FORMATS = {
    "fp8-channel": eco.fp8_e4m3(), "int4-tensor": eco.int4(),
    "int8-block": eco.int8("block", block_size=8),
    "mxfp4-in": eco.fp4_e2m1("mxfp4", block_size=8, axis=1),
    "nvfp4-in": eco.fp4_e2m1("nvfp4", block_size=8, axis=-2)}


@pytest.mark.parametrize("mode,rounding,moments", [
    ("eco", "stochastic", jnp.bfloat16), ("eco_exact", "nearest", None),
    ("master_weights", "stochastic", None)])
def test_a_stack_stepped_in_blocks_inside_each_matrix_equals_the_whole_leaf(
    mode, rounding, moments, monkeypatch):
  # (3, 24, 16): blocks of 8 rows x 16, three per matrix; each block takes its matrix's
  # scales. As on one device (the suite runs with 8), where stacks are viewed as rows.
  monkeypatch.setattr(jax, "device_count", lambda *args: 1)
  assert st._stack_view((3, 24, 16), STACKED_FORMATS["fp8-channel"]) is not None
  blocked = _run(STACKED_FORMATS, mode, rounding, moments, 8 * 16, monkeypatch, shape=(3, 24, 16))
  assert st._rows_per_block((72, 16), STACKED_FORMATS["fp8-channel"], False,
                            matrix_rows=24) == 8
  whole = _run(STACKED_FORMATS, mode, rounding, moments, 1 << 30, monkeypatch, shape=(3, 24, 16))
  _assert_bit_identical(blocked, whole)


@pytest.mark.parametrize("mode,rounding,moments", [
    ("eco", "nearest", None), ("eco", "stochastic", jnp.bfloat16),
    ("eco_exact", "nearest", None), ("master_weights", "stochastic", None),
    # 8-bit moment blocks of 8 inside rows of 24: the loop encodes their blocks of rows
    ("eco", "stochastic", eco.moments.blockwise_8bit(block_size=8))])
def test_blocks_of_rows_equal_the_whole_leaf(mode, rounding, moments, monkeypatch):
  # Every format in one tree. 16 rows x 24 per block: 72 rows are 4 full blocks and an
  # overlapping last one.
  blocked = _run(FORMATS, mode, rounding, moments, 16 * 24, monkeypatch)
  whole = _run(FORMATS, mode, rounding, moments, 1 << 30, monkeypatch)
  _assert_bit_identical(blocked, whole)


@pytest.mark.parametrize("mode,rounding,moments", [
    ("eco", "stochastic", eco.moments.blockwise_8bit()), ("eco_exact", "nearest", jnp.float32)])
def test_the_accelerator_path_steps_as_the_cpu_path(mode, rounding, moments, monkeypatch):
  """GPUs and TPUs take other branches (no loop over blocks, hardware float8 and FP4
  conversions, no conditionals placing the code copies): run on CPU as if on an
  accelerator, the same steps store the same weights and state as the CPU path, bit for
  bit (the exact rule's momentum to its last kept bit)."""
  cpu = _run(FORMATS, mode, rounding, moments, 16 * 24, monkeypatch)
  jax.clear_caches()      # traces of the CPU branches must not be reused
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  try:
    accelerator = _run(FORMATS, mode, rounding, moments, 16 * 24, monkeypatch)
  finally:
    jax.clear_caches()
  (q_cpu, state_cpu), (q_accelerator, state_accelerator) = cpu, accelerator
  _assert_bit_identical(q_cpu, q_accelerator)
  if mode == "eco_exact":
    # The exact rule's momentum keeps 14 significant bits: where the other fusions
    # contract its FP32 update differently (here the FP4 leaves'), an element next to a
    # rounding boundary of those bits takes the neighbouring value.
    for a, b in zip(jax.tree.leaves(state_cpu.moments.mu),
                    jax.tree.leaves(state_accelerator.moments.mu)):
      np.testing.assert_allclose(st.split_momentum(a)[0], st.split_momentum(b)[0], rtol=2**-11)
      np.testing.assert_array_equal(st.split_momentum(a)[1], st.split_momentum(b)[1])
    state_cpu, state_accelerator = (
        s._replace(moments=s.moments._replace(mu=None)) for s in (state_cpu, state_accelerator))
  _assert_bit_identical(state_cpu, state_accelerator)


def test_16_bit_carries_through_the_blocks_as_bits_equal_the_whole_leaf(monkeypatch):
  # bfloat16 moments cross the loop as uint16 bits when a leaf has more blocks than
  # _BLOCKS_BEFORE_BITS; here every blocked leaf does.
  monkeypatch.setattr(st, "_BLOCKS_BEFORE_BITS", 0)
  formats = {"fp8": FORMATS["fp8-channel"]}
  as_bits = _run(formats, "eco", "stochastic", jnp.bfloat16, 16 * 24, monkeypatch)
  whole = _run(formats, "eco", "stochastic", jnp.bfloat16, 1 << 30, monkeypatch)
  assert as_bits[1].moments.mu["fp8"]["w"].dtype == jnp.bfloat16
  _assert_bit_identical(as_bits, whole)


def test_rows_per_block_respects_the_format_blocks():
  fmt = eco.fp4_e2m1("mxfp4")                       # blocks of 32 along axis 0
  n = st._rows_per_block((4096, 4096), fmt, whole=False)
  assert n % 32 == 0 and 0 < n < 4096
  assert st._rows_per_block((4096, 4096), fmt, whole=True) == 4096
  # 64K-element blocks; a leaf of more than 16 of them takes blocks twice as large, up
  # to 256K.
  fp8 = eco.fp8_e4m3()
  assert st._rows_per_block((1024, 1024), fp8, whole=False) == 64
  assert st._rows_per_block((16384, 1024), fp8, whole=False) == 256
  assert st._rows_per_block((2048, 1024), fp8, whole=False) == 128
  assert st._rows_per_block((2049, 1024), fp8, whole=False) == 256


def test_blockwise_last_block_keeps_rows_it_does_not_own():
  x = jnp.arange(10.0)[:, None] * jnp.ones((1, 3))

  def fn(r0, valid, carries, inputs):
    (c,), = (carries,)
    out = c + 1.0
    if valid is not None:
      out = jnp.where(valid[:, None], out, c)
    return [out], r0 == 6                          # the last block starts at 10 - 4

  (y,), flag = st.blockwise(fn, [x], [], rows=10, n=4)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x + 1.0))   # every row once
  assert bool(flag)


def test_blockwise_runs_a_single_block_behind_the_conditional_it_is_given():
  def fn(r0, valid, carries, inputs):
    assert r0 == 0 and valid is None
    return [carries[0] + inputs[0]], jnp.any(inputs[0] < 0)

  x, y = jnp.ones((4, 3)), -jnp.ones((4, 3))
  step = jax.jit(lambda x, y, count: st.blockwise(fn, [x], [y], 4, 4, count >= 0))
  (z,), flag = step(x, y, jnp.int32(0))
  np.testing.assert_array_equal(np.asarray(z), np.zeros((4, 3)))
  assert bool(flag)
  assert "conditional(" in step.lower(x, y, jnp.int32(0)).compile().as_text()
  (z,), flag = st.blockwise(fn, [x], [y], 4, 4)          # no predicate: a plain call
  np.testing.assert_array_equal(np.asarray(z), np.zeros((4, 3)))
  assert bool(flag)


MLP_SIZES = (512, 1024, 1024, 1024, 512)     # the MLP of python -m benchmarks.memory


def _mlp(fmt):
  """``(quantized kernels, loss(q, x), x, number of weights)`` of the benchmark MLP."""
  keys = jax.random.split(jax.random.key(0), len(MLP_SIZES) - 1)
  params = {f"l{i}": jax.random.normal(k, (a, b)) / a ** 0.5
            for i, (k, a, b) in enumerate(zip(keys, MLP_SIZES[:-1], MLP_SIZES[1:]))}

  def loss(p, x):
    for i in range(len(MLP_SIZES) - 1):
      x = jax.nn.relu(x @ p[f"l{i}"])
    return jnp.mean(x ** 2)

  n = sum(x.size for x in params.values())
  return eco.quantize_params(params, fmt), loss, jnp.ones((32, MLP_SIZES[0])), n


def _optimizer_step_temporaries(tx, q, grads) -> int:
  def step(grads, q, state):
    updates, state = tx.update(grads, state, q)
    return eco.apply_updates(q, updates), state

  compiled = jax.jit(step, donate_argnums=(1, 2)).lower(grads, q, tx.init(q)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [eco.fp8_e4m3(), eco.int4()], ids=["fp8", "int4"])
def test_code_copies_are_made_per_leaf_when_its_step_runs(fmt, monkeypatch):
  # XLA:CPU copies the codes for each leaf's loop; made behind a conditional on the
  # gradient and on the previous leaf's step, they do not all stay alive through the
  # other leaves' steps. (In a whole train step, eco.grad's gradient of a weight read
  # by products waits for the last read of its codes, and no copy is made.)
  q, loss, x, n = _mlp(fmt)
  grads = jax.eval_shape(eco.grad(loss), q, x)
  due = _optimizer_step_temporaries(eco.adamw(1e-3), q, grads)
  monkeypatch.setattr(st, "_bits_when_due",
                      lambda q, narrow, grad, previous_flags: st.bits_and_scales(q, narrow))
  # A new optimizer: leaf steps traced for another one are reused.
  upfront = _optimizer_step_temporaries(eco.adamw(1e-3), q, grads)
  largest = max(a * b for a, b in zip(MLP_SIZES[:-1], MLP_SIZES[1:]))
  # One leaf's copy at a time, not all four.
  assert due <= upfront - (n - largest) // 2, (due / n, upfront / n)


@pytest.mark.parametrize("kwargs,limit", [
    ({}, 0.8), (dict(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16), 0.8),
    # 8-bit moments: their blocks of rows are encoded in the loop too (stepped whole, the
    # step held 16 bytes per weight); their block buffers hold more per element.
    (dict(mu_dtype=eco.moments.blockwise_8bit(), nu_dtype=eco.moments.blockwise_8bit()), 1.0),
    (dict(mode="master_weights"), 0.8)],
    ids=["fp32-moments", "bf16-moments", "8bit-moments", "master-weights"])
def test_the_optimizer_step_keeps_under_a_byte_per_weight_of_temporaries(kwargs, limit):
  # The block buffers of 1M-element leaves (blocks of 64K elements) and one leaf's code
  # copy; the copy of the code magnitudes that the scale policy's absmax reads is freed
  # before the code copy is made. No FP32 array the size of a leaf, let alone of all
  # the weights.
  q, loss, x, n = _mlp(eco.fp8_e4m3())
  grads = jax.eval_shape(eco.grad(loss), q, x)
  temporaries = _optimizer_step_temporaries(eco.adamw(1e-3, **kwargs), q, grads)
  assert temporaries <= limit * n, temporaries / n


def test_eager_quantize_and_dequantize_compile_one_program_each(caplog):
  """Outside ``jit``, storing and reading a leaf compile one program each (not one per
  operation), and a second leaf of the same shape and format compiles nothing."""
  x = np.linspace(-1.0, 1.0, 37 * 11, dtype=np.float32).reshape(37, 11)  # a shape of its own
  fmt = eco.int8("block", block_size=11, scale_policy="dynamic")
  with jax.log_compiles(), caplog.at_level(logging.DEBUG, logger="jax"):
    for y in (x, -x):
      q = eco.quantize_array(y, fmt)
      np.testing.assert_allclose(q.dequantize(), y, atol=1.0 / 127)
      eco.quantize.next_scale(q)
  compiled = [r.getMessage().split()[1] for r in caplog.records
              if r.getMessage().startswith("Compiling")]
  assert compiled == ["jit(quantize)", "jit(dequantize)", "jit(next_scale)"]


def test_an_eager_step_compiles_once(caplog):
  """Outside ``jit``, a second step with the same shapes reuses every executable."""
  params = {"w": jnp.ones((64, 32)), "v": jnp.ones((32, 16)), "b": jnp.zeros(16)}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = eco.adamw(1e-2)

  def step(q, state):
    updates, state = tx.update(grads, state, q)
    return eco.apply_updates(q, updates), state

  q = eco.quantize_params(params, eco.fp8_e4m3())
  q, state = step(q, tx.init(q))
  with jax.log_compiles(), caplog.at_level(logging.DEBUG, logger="jax"):
    q = eco.quantize_params(params, eco.fp8_e4m3())
    q, state = step(q, state)
  assert int(state.count) == 2
  compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
  assert compiled == []
