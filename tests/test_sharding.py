"""Sharded (data-parallel + FSDP) ECO training stores the codes and scales of one-device
training, bit for bit.

Runs on 8 CPU devices (``tests/conftest.py`` sets
``--xla_force_host_platform_device_count=8``).
"""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import eco_optax as eco

from _helpers import train_steps
from examples import sharded_training as st

DEVICES = 8
SCALINGS = {"layer_0": eco.fp8_e4m3("tensor"),          # one scale, replicated
            "layer_1": eco.fp8_e4m3("channel"),         # (1, out) scales
            "layer_2": eco.int8("block", block_size=8)}  # (in, out/8) scales, sharded


def policy(path, leaf):
  return SCALINGS[path[0].key] if leaf.ndim == 2 else None


def check_sharded_equals_single(rounding):
  mesh = st.make_mesh()
  q_one, _, loss_one = st.train(policy, rounding, steps=5, mesh=None)
  q_dp, state_dp, loss_dp = st.train(policy, rounding, steps=5, mesh=mesh)
  # Really sharded: codes and moments of the kernels are split over 8 devices.
  assert q_dp["layer_1"]["kernel"].values.sharding.spec == P("data")
  assert len({s.device for s in q_dp["layer_1"]["kernel"].values.addressable_shards}) == DEVICES
  assert state_dp[1].moments.mu["layer_1"]["kernel"].sharding.spec == P("data")
  assert q_dp["layer_2"]["kernel"].scale.sharding.spec == P("data")
  for name, fmt in SCALINGS.items():
    a, b = q_one[name]["kernel"], q_dp[name]["kernel"]
    assert a.fmt == b.fmt == fmt
    assert a.values.dtype == b.values.dtype == fmt.dtype
    np.testing.assert_array_equal(np.asarray(a.values).view(np.uint8),
                                  np.asarray(b.values).view(np.uint8), err_msg=name)
    np.testing.assert_array_equal(a.scale, b.scale, err_msg=name)
  np.testing.assert_allclose(loss_one, loss_dp, rtol=1e-5)
  assert loss_dp[-1] < loss_dp[0]


def check_tensor_scale_spans_all_shards():
  """A tensor-wise scale is the absmax of the whole tensor, not of a shard."""
  mesh = st.make_mesh()
  x = jnp.full((64, 32), 0.1).at[63, 5].set(100.0)   # the max lives on the last shard
  sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  fmt = eco.int8("tensor")
  whole = eco.quantize.initial_scale(x, fmt)
  assert whole != eco.quantize.initial_scale(x[:8], fmt)   # what shard 0 alone would say
  for q in (eco.quantize_array(sharded, fmt),
            jax.jit(eco.quantize_array, static_argnums=1)(sharded, fmt)):
    assert q.scale.shape == () and q.scale == whole
    assert float(q.dequantize()[63, 5]) == pytest.approx(100.0, rel=1e-2)
    # Every device holds the same (global) scale.
    assert {float(s.data) for s in q.scale.addressable_shards} == {float(whole)}
    np.testing.assert_array_equal(q.values, eco.quantize_array(x, fmt).values)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_sharded_training_equals_one_device(rounding):
  assert jax.device_count() >= DEVICES, "tests/conftest.py asks for 8 host devices"
  check_sharded_equals_single(rounding)


def test_a_tensor_scale_spans_all_shards():
  check_tensor_scale_spans_all_shards()


@pytest.mark.parametrize("mode,rounding,moments", [
    ("eco", "stochastic", jnp.bfloat16), ("eco_exact", "nearest", None),
    ("eco", "stochastic", eco.moments.blockwise_8bit())])
def test_a_mesh_with_explicit_axes_steps_every_leaf_and_keeps_its_sharding(mode, rounding, moments):
  """jax.make_mesh's explicit axes put the sharding in the arrays' types, where slicing a
  sharded dimension is refused: such a leaf is stepped whole, not in blocks of rows.
  The partitioned program may contract its arithmetic differently from one device's."""
  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = NamedSharding(mesh, P("data", None))
  params = {"w": jax.random.normal(jax.random.key(0), (4096, 64)) * 0.1}
  direction = jax.random.normal(jax.random.key(1), (4096, 64))
  tx = eco.adamw(1e-2, mode=mode, rounding=rounding, mu_dtype=moments, nu_dtype=moments)

  def train(q):   # the gradient is `direction`, sharded as the weights are
    _, q, state = train_steps(tx, q, lambda p: jnp.sum(p["w"] * direction), lambda i: (), 2)
    return q, state

  q_one, _ = train(eco.quantize_params(params, eco.fp8_e4m3()))
  q_sharded, state = train(jax.tree.map(
      lambda x: jax.device_put(x, sharding) if x.shape == (4096, 64) else x,
      eco.quantize_params(params, eco.fp8_e4m3())))
  assert q_sharded["w"].values.sharding.spec == P("data", None)
  mu = state.moments.mu["w"]   # FP32, bfloat16, or 8-bit codes beside block absmaxes
  assert getattr(mu, "codes", mu).sharding.spec == P("data", None)
  codes = (np.asarray(q_sharded["w"].values).view(np.uint8).astype(int)
           - np.asarray(q_one["w"].values).view(np.uint8).astype(int))
  assert np.abs(codes).max() <= 1 and np.mean(codes != 0) < 1e-3


@pytest.mark.parametrize("recompute,set_mesh", [(False, False), (True, False), (False, True)])
def test_grad_keeps_the_sharding_of_explicit_axes(recompute, set_mesh):
  """eco.grad (with and without recomputing the weights in the backward pass, with and
  without jax.set_mesh) on weights sharded along jax.make_mesh's explicit axes: the
  gradient keeps their sharding (its values up to the order of the partitioned sums)."""
  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  params = {"w": jax.random.normal(jax.random.key(0), (256, 64)) * 0.1, "b": jnp.zeros(64)}
  q = eco.quantize_params(params, eco.fp8_e4m3())
  x = jax.random.normal(jax.random.key(2), (16, 256))
  loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
  expected = jax.grad(loss)(eco.dequantize_params(q), x)
  sharded = jax.tree.map(
      lambda a: jax.device_put(a, NamedSharding(mesh, P("data", None))) if a.shape == (256, 64)
      else a, q)
  with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
    grads = jax.jit(eco.grad(loss, recompute=recompute))(sharded, x)
  assert grads["w"].sharding.spec == P("data", None)
  chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=2e-5)


def test_explicit_axes_step_each_shard_of_a_blocked_leaf_without_gathering_it():
  """On CPU a leaf of several blocks is stepped by a loop over blocks of rows; with
  explicit axes a leaf sharded by rows (FSDP) is stepped whole on each shard: no
  all-gather in the compiled optimizer step, and temporaries below one device's copy
  of the leaf's FP32 moment."""
  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = NamedSharding(mesh, P("data", None))
  q = eco.quantize_params({"w": jax.random.normal(jax.random.key(0), (1024, 1024)) * 0.05},
                          eco.fp8_e4m3())
  tx = eco.adamw(1e-3)
  place = lambda x: jax.device_put(x, sharding) if x.shape == (1024, 1024) else x
  q, state, grads = jax.tree.map(place, (q, tx.init(q), {"w": jnp.ones((1024, 1024))}))

  def step(g, p, s):
    updates, s = tx.update(g, s, p)
    return eco.apply_updates(p, updates), s

  compiled = jax.jit(step, donate_argnums=(1, 2)).lower(grads, q, state).compile()
  assert "all-gather" not in compiled.as_text()
  assert compiled.memory_analysis().temp_size_in_bytes < 4 * 1024 * 1024 / 2


def test_8bit_moments_under_explicit_axes_keep_whole_blocks_on_each_device():
  """Blocks of 256 along the last axis: columns sharded in multiples of a block (tensor
  parallelism) step as on one device; a shard that would split a block is refused at
  trace time with the shape, the sharding and what to do."""
  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  tx = eco.adamw(1e-2, mu_dtype=eco.moments.blockwise_8bit(), nu_dtype=eco.moments.blockwise_8bit())

  def step(q, shape, spec):
    place = lambda x: jax.device_put(x, NamedSharding(mesh, spec)) if x.shape == shape else x
    state = jax.tree.map(place, tx.init(q))
    updates, state = jax.jit(tx.update)({"w": place(jnp.ones(shape))}, state, jax.tree.map(place, q))
    return eco.apply_updates(jax.tree.map(place, q), updates), state

  shape = (32, 256 * DEVICES)
  q = eco.quantize_params({"w": jax.random.normal(jax.random.key(0), shape) * 0.1}, eco.fp8_e4m3())
  q_sharded, state = step(q, shape, P(None, "data"))
  q_one, _ = step(q, shape, P())
  assert state.moments.mu["w"].codes.sharding.spec == P(None, "data")
  assert state.moments.mu["w"].absmax.sharding.spec == P(None, "data")
  codes = (np.asarray(q_sharded["w"].values).view(np.uint8).astype(int)
           - np.asarray(q_one["w"].values).view(np.uint8).astype(int))
  assert np.abs(codes).max() <= 1 and np.mean(codes != 0) < 1e-3

  shape = (32, 128 * DEVICES)     # 128 columns per device: half a block
  q = eco.quantize_params({"w": jnp.ones(shape)}, eco.fp8_e4m3())
  with pytest.raises(ValueError, match=rf"blockwise_8bit: a moment of shape \(32, {128 * DEVICES}\) "
                     r"sharded P\(None, 'data'\) over explicit mesh axes splits its blocks "
                     r"\(1 x 256 elements, block_size=256\) between devices: .* in 8 shards are "
                     r"not whole blocks of 256\. Shard that axis"):
    step(q, shape, P(None, "data"))


def test_fp4_under_explicit_axes_keeps_whole_scale_blocks_on_each_device():
  """MXFP4 blocks of 32 run along the rows (axis -2): rows sharded in whole blocks step
  as on one device; a shard that would split a block is refused, naming the leaf, when
  quantized and when stepped."""
  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  tx = eco.adamw(1e-2)

  def step(w, spec, place_after=False):
    place = lambda x: jax.device_put(x, NamedSharding(mesh, spec)) if x.shape == w.shape else x
    q = eco.quantize_params({"w": w if place_after else place(w)}, eco.fp4_e2m1())
    q = jax.tree.map(place, q)
    updates, _ = jax.jit(tx.update)({"w": place(jnp.ones(w.shape))}, jax.tree.map(place, tx.init(q)), q)
    return eco.apply_updates(q, updates)["w"]

  w = jax.random.normal(jax.random.key(0), (64 * DEVICES, 16))    # two blocks per device
  sharded, one = step(w, P("data", None)), step(w, P())
  assert sharded.values.sharding.spec == P("data", None)
  assert np.array_equal(np.asarray(sharded.values.astype(jnp.float32)),
                        np.asarray(one.values.astype(jnp.float32)))
  assert np.array_equal(np.asarray(sharded.scale.astype(jnp.float32)),
                        np.asarray(one.scale.astype(jnp.float32)))

  w = jnp.ones((8 * DEVICES, 16))     # 8 rows per device: a quarter of a block
  message = (rf"\['w'\]: mxfp4: a leaf of shape \({8 * DEVICES}, 16\) sharded P\('data', None\) "
             rf"over explicit mesh axes splits its scale blocks between devices: {8 * DEVICES} "
             rf"elements along axis -2 in {DEVICES} shards are not whole blocks of 32\. Shard that axis")
  for place_after in (False, True):     # quantize_params, then the optimizer's update
    with pytest.raises(ValueError, match=message):
      step(w, P("data", None), place_after)


@pytest.mark.parametrize("moments", [None, jnp.bfloat16, eco.moments.blockwise_8bit()],
                         ids=["fp32", "bf16", "8bit"])
def test_init_places_each_moment_as_its_weight(moments):
  """As optax's init does (its zeros_like of the params), an eco_optax optimizer's init
  makes each moment of a sharded weight sharded as the weight (FSDP x tensor parallel),
  not whole on one device."""
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  sharding = NamedSharding(mesh, P("data", "model"))
  q = eco.quantize_params({"w": jax.device_put(jnp.ones((512, 1024)), sharding),
                           "b": jnp.zeros(1024)}, eco.fp8_e4m3())
  state = eco.adamw(1e-3, mu_dtype=moments, nu_dtype=moments).init(q)
  for moment in (state.moments.mu["w"], state.moments.nu["w"]):
    assert getattr(moment, "codes", moment).sharding == q["w"].values.sharding
  assert state.moments.mu["b"].shape == (1024,)


@pytest.mark.parametrize("wrap", [lambda tx: eco.MultiSteps(tx, every_k_schedule=2),
                                  lambda tx: eco.apply_if_finite(tx, max_consecutive_errors=3),
                                  lambda tx: optax.multi_transform(
                                      {"frozen": eco.set_to_zero(), "trained": tx},
                                      {"w": "trained", "v": "frozen"})],
                         ids=["MultiSteps", "apply_if_finite", "set_to_zero"])
def test_the_wrappers_step_leaves_sharded_along_explicit_axes_as_on_one_device(wrap):
  """jax.make_mesh's default axes are explicit. Gradient accumulation, skipping
  non-finite steps and freezing leaves keep each state leaf sharded as its weight and
  step as on one device."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  sharding = NamedSharding(mesh, P("data", "model"))
  params = {"w": jax.random.normal(jax.random.key(0), (64, 128)) * 0.1,
            "v": jax.random.normal(jax.random.key(1), (64, 128)) * 0.1}
  tx = wrap(eco.adamw(1e-2))

  def train(place):
    q = jax.tree.map(place, eco.quantize_params(params, eco.fp8_e4m3()))
    states, update = [tx.init(q)], jax.jit(tx.update)
    for i in range(4):
      g = jax.tree.map(lambda p: place(jnp.cos(p * (i + 1))), params)
      updates, state = update(g, states[-1], q)
      states.append(state)
      q = eco.apply_updates(q, updates)
    return q, states

  q_sharded, states = train(lambda x: jax.device_put(x, sharding) if x.shape == (64, 128) else x)
  q_one, _ = train(lambda x: x)
  for leaf in jax.tree.leaves((states[0], states[-1])):     # from init on
    if getattr(leaf, "shape", None) == (64, 128):
      assert leaf.sharding.spec == P("data", "model")
  for name in ("w", "v"):
    assert q_sharded[name].values.sharding.spec == P("data", "model")
    codes = (np.asarray(q_sharded[name].values).view(np.uint8).astype(int)
             - np.asarray(q_one[name].values).view(np.uint8).astype(int))
    assert np.abs(codes).max() <= 1 and np.mean(codes != 0) < 1e-3
  initial = eco.quantize_params(params, eco.fp8_e4m3())["w"].values
  assert np.any(np.asarray(q_one["w"].values).view(np.uint8) != np.asarray(initial).view(np.uint8))


@pytest.mark.parametrize("spec", [P(None, "data", None), P(None, None, "data")],
                         ids=["rows", "columns"])
def test_a_stack_sharded_inside_its_matrices_keeps_its_sharding_with_automatic_axes(spec):
  """FSDP of scanned layers: an (L, in, out) weight split inside each matrix. The jitted
  step (no out_shardings) returns codes and moments as they came in, and equals the
  one-device step."""
  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  w = jax.random.normal(jax.random.key(0), (4, 32, 64)) * 0.1
  g = {"w": jax.random.normal(jax.random.key(1), w.shape)}
  q = eco.quantize_params({"w": w}, eco.fp8_e4m3())
  tx = eco.adamw(1e-2, rounding="nearest")

  @jax.jit
  def step(q, state, g):
    updates, state = tx.update(g, state, q)
    return eco.apply_updates(q, updates), state

  want_q, want_state = step(q, tx.init(q), g)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, spec if x.shape == w.shape else P()))
  sharded_q, sharded_state = jax.tree.map(put, (q, tx.init(q)))
  got_q, got_state = step(sharded_q, sharded_state, jax.tree.map(put, g))
  for got in (got_q["w"].values, got_state.moments.mu["w"], got_state.moments.nu["w"]):
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, spec), 3), got.sharding
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, (got_q, got_state)),
                              jax.tree.map(np.asarray, (want_q, want_state)))


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_a_replicated_scale_row_beside_a_split_last_axis(axis_type):
  """What docs/integrations.md says: automatic axes return the row split like its weight;
  explicit axes keep it replicated, as placed. Both store the one-device step's codes."""
  mesh = jax.make_mesh((DEVICES,), ("model",), axis_types=(axis_type,))
  q = eco.quantize_params({"w": jax.random.normal(jax.random.key(0), (64, 128)) * 0.1},
                          eco.fp8_e4m3())
  tx = eco.sgdm(1e-2)
  step = jax.jit(lambda q, s, g: eco.apply_updates(q, tx.update(g, s, q)[0]))
  g = {"w": jnp.ones((64, 128)) * 3.0}
  want = step(q, tx.init(q), g)
  put = lambda x: jax.device_put(
      x, NamedSharding(mesh, P(None, "model") if x.shape == (64, 128) else P()))
  got = step(*jax.tree.map(put, (q, tx.init(q), g)))
  explicit = axis_type == jax.sharding.AxisType.Explicit
  assert got["w"].scale.sharding.spec == (P(None, None) if explicit else P(None, "model"))
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want))
