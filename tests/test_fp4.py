"""FP4 E2M1 weights with MXFP4 (E8M0 per 32) and NVFP4 (E4M3 per 16 x FP32) block scales.

Grid, rounding (RTN half to even, unbiased SR), saturation, zero blocks, scale
storage and policies, jit, ECO and the baselines end to end, and sharding over 8
devices.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import eco_optax as eco
from _helpers import train_steps
from eco_optax import quantize as qz

STYLES = ["mxfp4", "nvfp4"]
GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def _is_e4m3(x: np.ndarray) -> bool:
  return np.array_equal(x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), x)


def _unit_scale(shape, fmt) -> jax.Array:
  """FP32 scales of 1 for every block."""
  return jnp.ones(fmt.scale_shape(shape), jnp.float32)


@pytest.mark.parametrize("style", STYLES)
def test_formats(style):
  fmt = eco.fp4_e2m1(style)
  assert fmt.name == style and fmt.dtype == ml_dtypes.float4_e2m1fn and fmt.max_value == 6.0
  assert fmt.bits == 4 and fmt.scaling == "block" and fmt.axis == -2
  assert (fmt.block_size, fmt.scale_dtype, fmt.has_tensor_scale) == (
      (32, ml_dtypes.float8_e8m0fnu, False) if style == "mxfp4"
      else (16, ml_dtypes.float8_e4m3fn, True))
  assert eco.fp4_e2m1(style, block_size=64).block_size == 64
  with pytest.raises(ValueError, match="style must be one of"):
    eco.fp4_e2m1("fp4")
  with pytest.raises(ValueError, match="scale_dtype must be one of"):
    eco.QuantFormat("x", ml_dtypes.float4_e2m1fn, "block", scale_dtype=jnp.bfloat16)


@pytest.mark.parametrize("style", STYLES)
def test_block_axis_must_be_a_multiple_of_the_block_size(style):
  fmt = eco.fp4_e2m1(style)
  with pytest.raises(ValueError, match=r"axis -2 of shape \(40, 64\).*multiple of "
                     rf"block_size={fmt.block_size}"):
    eco.quantize_array(jnp.ones((40, 64)), fmt)
  with pytest.raises(ValueError, match=r"\['w'\].*block_size"):
    eco.quantize_params({"w": jnp.ones((40, 64))}, fmt)
  q = eco.quantize_array(jnp.ones((64, 40)), fmt)        # blocks along the input features only
  assert q.scale.shape == (64 // fmt.block_size, 40)
  assert eco.quantize_array(jnp.ones((40, 64)), eco.fp4_e2m1(style, axis=-1)).scale.shape \
      == (40, 64 // fmt.block_size)


@pytest.mark.parametrize("style", STYLES)
def test_grid_values_round_trip_exactly(style):
  fmt = eco.fp4_e2m1(style)
  x = jnp.asarray(np.concatenate([GRID, -GRID[1:], [0.5]]).reshape(-1, 1))   # 16 x 1
  x = jnp.tile(x, (2, 3)) * jnp.array([1.0, 0.25, 64.0])          # three binades of scale
  q = qz.quantize_with_scale(x, jnp.ones(fmt.scale_shape(x.shape)) * jnp.array(
      [1.0, 0.25, 64.0]), fmt)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(x))
  # The codes are the E2M1 values themselves, and all 15 are reachable.
  codes = np.asarray(q.values.astype(jnp.float32))
  np.testing.assert_array_equal(codes[:, 0], np.asarray(x[:, 0]))
  assert len(np.unique(np.abs(codes))) == len(GRID)


@pytest.mark.parametrize("style", STYLES)
def test_round_to_nearest_is_half_to_even_on_the_e2m1_grid(style):
  fmt = eco.fp4_e2m1(style, block_size=16)
  x = jnp.array([5.0, 2.5, 0.25, 0.75, 1.25, 1.75, 3.5, -5.0, -2.5, 2.75, 4.9, 0.26,
                 -0.74, 1.3, 3.6, 6.0]).reshape(16, 1)
  want = [4.0, 2.0, 0.0, 1.0, 1.0, 2.0, 4.0, -4.0, -2.0, 3.0, 4.0, 0.5,
          -0.5, 1.5, 4.0, 6.0]
  q = qz.quantize_with_scale(x, _unit_scale(x.shape, fmt), fmt)
  np.testing.assert_array_equal(np.asarray(q.dequantize())[:, 0], want)
  # And, for any input, the same as the IEEE cast of ml_dtypes (RNE), clipped first.
  y = jnp.concatenate([jax.random.normal(jax.random.key(0), (2048,)) * 10.0 ** k
                       for k in range(-2, 2)]).reshape(512, 16)
  q = qz.quantize_with_scale(y, _unit_scale(y.shape, fmt), fmt)
  cast = jnp.clip(y, -6, 6).astype(jnp.float4_e2m1fn).astype(jnp.float32)
  np.testing.assert_array_equal(np.asarray(q.values.astype(jnp.float32)), np.asarray(cast))


@pytest.mark.parametrize("style", STYLES)
def test_stochastic_rounding_is_unbiased(style):
  """E[SR(x)] = x: the mean of 20000 draws is within 5 standard errors, at every binade."""
  fmt = eco.fp4_e2m1(style, block_size=1, axis=0)
  n = 20000
  values = np.array([0.3, 0.13, 1.37, -2.71, 5.1, 4.5, -0.6, 3.99], np.float32)
  x = jnp.broadcast_to(jnp.asarray(values)[None, :], (n, len(values)))
  q = qz.quantize_with_scale(x, _unit_scale(x.shape, fmt), fmt, "stochastic",
                             jax.random.key(42))
  draws = np.asarray(q.dequantize())
  for v, col in zip(values, draws.T):
    lo = GRID[GRID <= abs(v)].max()
    hi = GRID[GRID >= abs(v)].min()
    assert set(np.abs(np.unique(col))) <= {lo, hi}     # only the two neighbours
    stderr = col.std() / np.sqrt(n)
    assert abs(col.mean() - v) < 5 * stderr, (v, col.mean(), stderr)
  nearest = np.asarray(qz.quantize_with_scale(x, _unit_scale(x.shape, fmt), fmt).dequantize())
  assert abs(nearest[:, 3].mean() - values[3]) > 0.2       # RTN is biased: -2.71 -> -3


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_values_beyond_the_range_saturate_at_6_and_never_become_nan(style, rounding):
  fmt = eco.fp4_e2m1(style, block_size=16)
  x = jnp.array([1e30, -1e30, 1e6, -7.0, 6.5, 100.0, 1.0, 0.0] * 2).reshape(16, 1)
  q = qz.quantize_with_scale(x, _unit_scale(x.shape, fmt), fmt, rounding, jax.random.key(0))
  out = np.asarray(q.dequantize())[:, 0]
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[:8], [6, -6, 6, -6, 6, 6, 1, 0])
  # A raw cast would not saturate: float4_e2m1fn has no inf/NaN and ml_dtypes' cast
  # of an overflow is not 6 for every value.
  again = qz.requantize(q, q.dequantize() * 10)            # the next scale grows
  assert np.all(np.isfinite(np.asarray(again.dequantize())))


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("policy", ["fixed", "sticky", "dynamic"])
def test_zero_blocks_get_a_finite_nonzero_scale(style, policy):
  """Zero blocks never get a zero or non-finite scale; the fixed and dynamic policies
  keep it, the sticky one shrinks it (``tests/test_quantize.py`` follows it down)."""
  fmt = eco.fp4_e2m1(style, scale_policy=policy)
  x = jax.random.normal(jax.random.key(0), (64, 8)) * 0.01
  x = x.at[:32, 0].set(0.0).at[:, 3].set(0.0)              # a zero block, a zero column
  for tensor in (x, jnp.zeros_like(x)):
    q = eco.quantize_array(tensor, fmt)
    scale = np.asarray(q.effective_scale)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    np.testing.assert_array_equal(np.asarray(q.dequantize())[tensor == 0], 0.0)
    zero = np.asarray(qz._group_absmax(tensor, fmt)) == 0
    after = np.asarray(qz.next_scale(q))[zero]
    if policy == "sticky":
      assert np.all(after < scale[zero]) and np.all(after > 0)
    else:
      np.testing.assert_array_equal(after, scale[zero])
  # NVFP4's tensor scale comes from the nonzero blocks: their scales keep room to grow.
  q = eco.quantize_array(x, fmt)
  if style == "nvfp4":
    codes = np.asarray(q.scale.astype(jnp.float32))
    top = codes[np.asarray(qz._group_absmax(x, fmt)) > 0].max()
    assert 448 / (2 * fmt.headroom) < top <= 448 / fmt.headroom


@pytest.mark.parametrize("style", STYLES)
def test_scales_are_representable_and_round_up(style):
  """E8M0 scales are powers of two; NVFP4 scales are E4M3 codes times a power of two."""
  fmt = eco.fp4_e2m1(style)
  x = jax.random.normal(jax.random.key(1), (256, 64)) * jnp.logspace(-5, 2, 64)
  q = eco.quantize_array(x, fmt)
  scale = np.asarray(q.scale.astype(jnp.float32))
  assert np.all(scale > 0) and np.all(np.isfinite(scale))
  if style == "mxfp4":
    assert q.tensor_scale is None
    np.testing.assert_array_equal(np.exp2(np.round(np.log2(scale))), scale)
  else:
    assert q.tensor_scale.dtype == jnp.float32 and q.tensor_scale.shape == ()
    s = float(q.tensor_scale)
    assert s == 2.0 ** np.round(np.log2(s))
    assert _is_e4m3(scale) and scale.max() <= 448
  # Rounded up: s >= h * absmax / 6, so no element saturates at initialization.
  wanted = fmt.headroom * np.asarray(qz._group_absmax(x, fmt)) / 6
  assert np.all(np.asarray(q.effective_scale) >= wanted)
  assert np.abs(np.asarray(q.values.astype(jnp.float32))).max() <= 6 / fmt.headroom
  if style == "nvfp4":    # E4M3 spans 2^-9..448: blocks 1e7 below the top get the smallest code
    assert scale.min() == 2.0 ** -9


@pytest.mark.parametrize("headroom", [1.0, 2.0])
def test_nvfp4_finer_scales_lose_less_than_mxfp4(headroom):
  """E4M3 block scales (3 mantissa bits, blocks of 16) vs powers of two (blocks of 32)."""
  x = jax.random.normal(jax.random.key(1), (256, 64)) * jnp.logspace(-2, 1, 64)

  def rel_rms(style):
    q = eco.quantize_array(x, eco.fp4_e2m1(style, scale_policy="fixed", headroom=headroom))
    return float(jnp.sqrt(jnp.mean((q.dequantize() - x) ** 2 / jnp.mean(x ** 2, 0))))

  mx, nv = rel_rms("mxfp4"), rel_rms("nvfp4")
  assert nv < 0.9 * mx < 0.2, (nv, mx)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("policy", ["fixed", "sticky", "dynamic"])
def test_scale_policies_grow_shrink_and_stay_representable(style, policy):
  fmt = eco.fp4_e2m1(style, scale_policy=policy, headroom=2.0)
  x = jax.random.normal(jax.random.key(2), (64, 16))
  q = eco.quantize_array(x, fmt)
  s0 = np.asarray(q.effective_scale)
  grown = qz.next_scale(qz.requantize(q, x * 100.0))        # every block saturates
  shrunk = qz.next_scale(qz.requantize(q, x / 5.0))        # codes <= 0.6: two steps unused
  if policy == "fixed":
    np.testing.assert_array_equal(grown, s0)
    np.testing.assert_array_equal(shrunk, s0)
  elif policy == "sticky":
    np.testing.assert_array_equal(grown, 2 * s0)
    np.testing.assert_array_equal(shrunk, s0 / 2)
    np.testing.assert_array_equal(qz.next_scale(q), s0)     # codes <= 3: no reason to move
  else:   # absmax of the requantized codes, which used the scale s1 of q
    s1 = np.asarray(qz.next_scale(q))
    assert np.all(grown >= 2 * s1) and np.all(shrunk < s1 / 2)
  # A long random walk with 10x swings: scales stay representable, never NaN or 0.
  key = jax.random.key(3)
  requantize = jax.jit(qz.requantize, static_argnums=2)
  for i in range(40):
    key, k1, k2 = jax.random.split(key, 3)
    target = q.dequantize() * (10.0 if i % 20 < 10 else 0.1) + 1e-3 * jax.random.normal(
        k1, x.shape)
    q = requantize(q, target, "stochastic", k2)
    stored = np.asarray(q.scale.astype(jnp.float32))
    assert np.all(np.isfinite(stored)) and np.all(stored > 0)
    assert np.all(np.isfinite(np.asarray(q.dequantize())))
    if style == "nvfp4":
      assert _is_e4m3(stored) and stored.max() <= 448 and np.isfinite(float(q.tensor_scale))


@pytest.mark.parametrize("style", STYLES)
def test_sticky_scales_keep_growing_exactly(style):
  """Every block saturates each step: its scale doubles, exactly, past E4M3's 448."""
  fmt = eco.fp4_e2m1(style, headroom=2.0)
  x = jax.random.normal(jax.random.key(4), (32, 8))
  q0 = q = eco.quantize_array(x, fmt)
  for _ in range(7):           # codes <= 3 at first, so x4 saturates every block
    q = qz.requantize(q, q.dequantize() * 4)
  np.testing.assert_array_equal(np.asarray(q.effective_scale),
                                np.asarray(q0.effective_scale) * 64)
  if style == "nvfp4":         # NVFP4: the tensor scale took the growth the codes had no room for
    assert np.asarray(q.scale.astype(jnp.float32)).max() <= 448
    assert float(q.tensor_scale) >= 16 * float(q0.tensor_scale)


def test_nvfp4_default_sticky_step_is_1_5_rounded_up_onto_e4m3():
  fmt = eco.fp4_e2m1("nvfp4")
  assert fmt.headroom == 1.5 and eco.fp4_e2m1("mxfp4").headroom == 2.0
  x = jax.random.normal(jax.random.key(2), (64, 16))
  q = eco.quantize_array(x, fmt)
  s0 = np.asarray(q.effective_scale)
  grown = np.asarray(qz.next_scale(qz.requantize(q, x * 100.0)))
  assert np.all(grown >= 1.5 * s0) and np.all(grown <= 1.5 * s0 * 1.125)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_and_requantize_jit(style, rounding):
  fmt = eco.fp4_e2m1(style)
  x = jax.random.normal(jax.random.key(0), (64, 32))
  key = jax.random.key(5)

  def f(x):
    q = eco.quantize_array(x, fmt, rounding, key)
    return qz.requantize_with_value(q, x * 1.7, rounding, key)

  (a, va), (b, vb) = jax.jit(f)(x), f(x)
  for u, v in zip(jax.tree.leaves((a, va)), jax.tree.leaves((b, vb))):
    np.testing.assert_array_equal(np.asarray(u).view(np.uint8) if u.dtype.itemsize == 1
                                  else np.asarray(u), np.asarray(v).view(np.uint8)
                                  if v.dtype.itemsize == 1 else np.asarray(v))
  np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(va))


def _regression(fmt, mode, rounding, steps=150, seed=0):
  """A 64 -> 32 linear regression with ECO-AdamW (or a baseline); returns the losses."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  a = jax.random.normal(k1, (64, 32)) / 8
  params = {"w": jax.random.normal(k2, (64, 32)) * 0.1, "b": jnp.zeros(32)}
  q = eco.quantize_params(params, fmt)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   eco.adamw(optax.cosine_decay_schedule(3e-2, steps), mode=mode,
                             rounding=rounding, weight_decay=0.0, seed=1))

  def loss_fn(p, x):
    return jnp.mean((x @ p["w"] + p["b"] - x @ a) ** 2)

  losses, q, _ = train_steps(tx, q, loss_fn,
                          lambda i: (jax.random.normal(jax.random.fold_in(k3, i), (128, 64)),),
                          steps)
  assert q["w"].values.dtype == ml_dtypes.float4_e2m1fn
  return np.array(losses)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("mode,rounding", [
    ("eco", "nearest"), ("eco", "stochastic"), ("naive", "stochastic"),
    ("master_weights", "nearest"), ("eco_exact", "nearest")])
def test_adamw_trains_fp4_weights(style, mode, rounding):
  losses = _regression(eco.fp4_e2m1(style), mode, rounding)
  assert np.all(np.isfinite(losses))
  assert losses[-10:].mean() < 0.2 * losses[:5].mean(), (losses[:5], losses[-10:])


@pytest.mark.parametrize("style", STYLES)
def test_eco_rtn_trains_where_naive_rtn_stalls(style):
  """Naive RTN loses every step below half an FP4 grid step; ECO pays it back."""
  naive = _regression(eco.fp4_e2m1(style), "naive", "nearest")
  ecos = _regression(eco.fp4_e2m1(style), "eco", "nearest")
  assert np.all(np.isfinite(naive))
  assert ecos[-10:].mean() < 0.2 * naive[-10:].mean(), (ecos[-10:].mean(), naive[-10:].mean())


DEVICES = 8


def check_sharded_fp4_training():
  """FSDP-sharded ECO-SR training of MXFP4 / NVFP4 kernels equals one device, bit for bit."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from examples import sharded_training as st

  mesh = st.make_mesh()
  fmts = {"layer_0": eco.fp4_e2m1("mxfp4"), "layer_1": eco.fp4_e2m1("nvfp4"),
          "layer_2": eco.fp4_e2m1("nvfp4", axis=-1)}
  sizes = (32, 64, 64, 32)

  def run(mesh):
    q = eco.quantize_params(st.init_mlp(jax.random.key(0), sizes),
                            lambda path, leaf: fmts[path[0].key] if leaf.ndim == 2 else None)
    tx = eco.adamw(1e-2, rounding="stochastic", seed=1)
    state = tx.init(q)
    shardings = None
    if mesh is not None:   # every array (codes, block and tensor scales, moments) by its shape
      q, state = jax.tree.map(lambda x: st._place(x, st.fsdp_spec(x.shape, mesh), mesh),
                              (q, state))
      shardings = jax.tree.map(lambda x: x.sharding, (q, state))
    step = st.make_train_step(tx, shardings)
    losses = []
    for i in range(5):
      batch = st.make_batch(i, 64, sizes[0], sizes[-1])
      if mesh is not None:
        batch = jax.device_put(batch, NamedSharding(mesh, P(st.AXIS)))
      q, state, loss = step(q, state, batch)
      losses.append(float(loss))
    return q, losses

  q_one, loss_one = run(None)
  q_dp, loss_dp = run(mesh)
  kernel = q_dp["layer_1"]["kernel"]
  assert kernel.values.sharding.spec == P("data")
  assert len({s.device for s in kernel.values.addressable_shards}) == DEVICES
  for name in fmts:
    a, b = q_one[name]["kernel"], q_dp[name]["kernel"]
    assert a.fmt == b.fmt == fmts[name] and b.values.dtype == ml_dtypes.float4_e2m1fn
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)),
                                    np.asarray(y.astype(jnp.float32)), err_msg=name)
  np.testing.assert_allclose(loss_one, loss_dp, rtol=1e-5)
  assert loss_dp[-1] < loss_dp[0]


@pytest.mark.slow
def test_sharded_fp4_training_equals_one_device():
  assert jax.device_count() >= DEVICES, "tests/conftest.py asks for 8 host devices"
  check_sharded_fp4_training()
