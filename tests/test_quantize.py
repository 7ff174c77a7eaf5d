"""Formats, scales, rounding: round trip, saturation, zeros, int4 rounding, SR."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import eco_optax as eco
from eco_optax import quantize as qz

ALL_FORMATS = {
    "fp8_e4m3/tensor": eco.fp8_e4m3("tensor"),
    "fp8_e4m3/channel": eco.fp8_e4m3("channel"),
    "fp8_e4m3/block": eco.fp8_e4m3("block", block_size=16),
    "fp8_e5m2/channel": eco.fp8_e5m2(),
    "int8/channel": eco.int8(),
    "int8/block": eco.int8("block", block_size=8),
    "int4/tensor": eco.int4(),
    "int4/channel": eco.int4("channel"),
    "int4/block": eco.int4("block", block_size=32),
    "mxfp4": eco.fp4_e2m1("mxfp4"),
    "nvfp4": eco.fp4_e2m1("nvfp4"),
}
# Largest relative round-trip error (half a grid step at the top of the range,
# with the format's headroom): e4m3 has 3 mantissa bits, e5m2 2.
REL_TOL = {"fp8_e4m3": 2**-4, "fp8_e5m2": 2**-3, "int8": 0.5 / 127, "int4": 0.5 / 7,
           "mxfp4": 2**-2, "nvfp4": 2**-2}


@pytest.fixture(params=list(ALL_FORMATS), ids=list(ALL_FORMATS))
def fmt(request):
  return ALL_FORMATS[request.param]


def test_default_formats_follow_the_paper():
  assert eco.fp8_e4m3().dtype == ml_dtypes.float8_e4m3fn
  assert eco.fp8_e4m3().scaling == "channel"       # row-wise scales
  assert eco.int4().scaling == "tensor"            # tensor-wise
  assert eco.int4().dtype == ml_dtypes.int4
  assert [f.max_value for f in (eco.fp8_e4m3(), eco.fp8_e5m2(), eco.int8(), eco.int4())] \
      == [448.0, 57344.0, 127.0, 7.0]


def test_round_trip_error_is_within_half_a_grid_step(fmt):
  x = jax.random.normal(jax.random.key(0), (32, 64)) * 3.0
  q = eco.quantize_array(x, fmt)
  assert q.values.dtype == fmt.dtype and q.values.shape == x.shape
  assert q.scale.shape == fmt.scale_shape(x.shape) and q.scale.dtype == fmt.scale_dtype
  err = jnp.abs(q.dequantize() - x)
  # Per-element bound: half a step at the element's group absmax (times headroom).
  bound = REL_TOL[fmt.name] * fmt.headroom * jnp.max(jnp.abs(x)) * 1.0001
  assert float(jnp.max(err)) <= float(bound)
  # Requantizing stored weights with their own scale is the identity.
  again = qz.quantize_with_scale(q.dequantize(), q.effective_scale, fmt)
  np.testing.assert_array_equal(np.asarray(again.values, np.float32),
                                np.asarray(q.values, np.float32))


def test_channel_scales_are_per_output_channel():
  x = jnp.stack([jnp.full(8, 1.0), jnp.full(8, 100.0)], axis=1)  # (8, 2): column 1 large
  q = eco.quantize_array(x, eco.int8("channel", headroom=1.0))
  np.testing.assert_allclose(np.asarray(q.scale), [[1 / 127, 100 / 127]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(x), rtol=1e-6)


def test_block_scales_cover_blocks_of_the_last_axis():
  x = jnp.concatenate([jnp.full((2, 4), 1.0), jnp.full((2, 4), 7.0)], axis=1)
  q = eco.quantize_array(x, eco.int4("block", block_size=4))
  np.testing.assert_allclose(np.asarray(q.scale), [[1 / 7, 1.0]] * 2, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(x))


@pytest.mark.parametrize("name,fmt_fn,huge", [
    ("e4m3", eco.fp8_e4m3, 1e6), ("e5m2", eco.fp8_e5m2, 1e9),
    ("int8", eco.int8, 1e6), ("int4", eco.int4, 1e6)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_values_beyond_the_range_saturate_and_never_become_nan(name, fmt_fn, huge, rounding):
  fmt = fmt_fn("tensor", scale_policy="fixed", headroom=1.0)
  scale = jnp.asarray(1.0)  # range [-rho, rho]; 1e6 is far beyond 448 / 57344 / 127 / 7
  x = jnp.array([[huge, -huge, 500.0, -70000.0, 1.0, 0.0]])
  q = qz.quantize_with_scale(x, scale, fmt, rounding, jax.random.key(0))
  out = np.asarray(q.dequantize())
  assert np.all(np.isfinite(out)), out
  assert out[0, 0] == fmt.max_value and out[0, 1] == -fmt.max_value
  assert out[0, 4] == 1.0 and out[0, 5] == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_poisons_the_stored_leaf(fmt, bad):
  """It reads back NaN everywhere (most formats have no NaN code), eagerly and under
  jit, where quantize_params cannot raise; the same array made finite reads back finite."""
  x = jnp.ones((32, 64)).at[5, 7].set(bad)
  for f in (fmt, eco.bf16()):
    assert np.all(np.isnan(np.asarray(eco.quantize_array(x, f).dequantize()))), f.name
    q = jax.jit(lambda p, f=f: eco.quantize_params(p, f))({"w": x})
    assert np.all(np.isnan(np.asarray(eco.dequantize_params(q)["w"]))), f.name
    assert np.all(np.isfinite(np.asarray(eco.quantize_array(x.at[5, 7].set(2.0), f).dequantize())))


def test_e4m3_cast_alone_would_overflow_to_nan():
  """Why saturation matters: the raw cast of 500 to e4m3fn is NaN."""
  assert np.isnan(np.asarray(jnp.asarray(500.0).astype(jnp.float8_e4m3fn), np.float32))
  q = qz.quantize_with_scale(jnp.array([[500.0]]), jnp.asarray(1.0), eco.fp8_e4m3("tensor"))
  assert float(q.dequantize()[0, 0]) == 448.0


def test_all_zero_tensor_has_a_finite_scale_and_stays_zero(fmt):
  x = jnp.zeros((32, 64))
  q = eco.quantize_array(x, fmt)
  scale = np.asarray(q.effective_scale)
  assert np.all(np.isfinite(scale)) and np.all(scale > 0)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), 0.0)
  if not fmt.is_integer and not fmt.has_tensor_scale:   # float formats: powers of two
    np.testing.assert_array_equal(np.log2(scale), np.round(np.log2(scale)))
  # A scale that moves starts at the range [-2^-7, 2^-7] (a zero-initialized layer's first
  # updates are that small, not a 4-bit grid step of [-1, 1]); a fixed one at [-1, 1].
  assert np.all(fmt.max_value * scale >= qz.ZERO_GROUP_START)
  assert np.all(fmt.max_value * scale < 2 * qz.ZERO_GROUP_START)
  fixed = eco.quantize_array(x, dataclasses.replace(fmt, scale_policy="fixed"))
  assert np.all(fmt.max_value * np.asarray(fixed.effective_scale) >= 1.0)
  # The dynamic policy keeps the scale of an all-zero group; the sticky one shrinks it
  # by its growth factor, as any group whose codes use little of the range (a
  # zero-initialized layer reaches the scale of its first updates), but not below the
  # range [-2^-20, 2^-20] (a group that stays zero for long is not left at zero).
  q = eco.quantize_array(x, dataclasses.replace(
      fmt, scale_policy="dynamic", headroom=max(fmt.headroom, 1.5)))
  np.testing.assert_array_equal(np.asarray(qz.next_scale(q)), np.asarray(q.effective_scale))
  sticky = dataclasses.replace(fmt, scale_policy="sticky")
  q = eco.quantize_array(x, sticky)
  floor = np.asarray(qz.zero_group_floor(sticky))
  scales = [np.asarray(q.effective_scale)]
  for _ in range(100):
    scale, tensor_scale = qz._next_scales(q)
    q = dataclasses.replace(q, scale=scale, tensor_scale=tensor_scale)
    scales.append(np.asarray(q.effective_scale))
  assert np.all(scales[1] < scales[0]) and np.all(scales[-1] >= floor)
  np.testing.assert_array_equal(scales[-1], scales[-2])           # it stops
  if not fmt.has_tensor_scale:    # NVFP4's block scales stop at 2^-9 of the tensor scale
    assert np.all(scales[-1] < 1.5 * sticky.growth * floor)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), 0.0)


def test_tiny_tensor_does_not_divide_by_a_subnormal_scale():
  x = jnp.full((4, 4), 1e-42)  # FP32 subnormal: absmax / rho underflows
  q = eco.quantize_array(x, eco.fp8_e4m3("tensor"))
  assert np.all(np.isfinite(np.asarray(q.dequantize())))


def test_int4_rounds_to_nearest_instead_of_truncating():
  fmt = eco.int4("tensor", headroom=1.0)
  x = jnp.array([[3.7, -3.7, 2.5, 3.5, -2.5, 0.49, 7.0]])
  q = qz.quantize_with_scale(x, jnp.asarray(1.0), fmt)
  # Round half to even: 2.5 -> 2, 3.5 -> 4; truncation would give 3, -3, 2, 3.
  np.testing.assert_array_equal(np.asarray(q.values, np.int32), [[4, -4, 2, 4, -2, 0, 7]])


def test_int4_clips_instead_of_wrapping():
  q = qz.quantize_with_scale(jnp.array([[20.0, -20.0]]), jnp.asarray(1.0), eco.int4())
  np.testing.assert_array_equal(np.asarray(q.values, np.int32), [[7, -7]])


@pytest.mark.parametrize("fmt", [eco.fp8_e4m3("tensor", scale_policy="fixed", headroom=1.0),
                                 eco.fp8_e5m2("tensor", scale_policy="fixed", headroom=1.0),
                                 eco.int8("tensor"), eco.int4("tensor")],
                         ids=["e4m3", "e5m2", "int8", "int4"])
def test_stochastic_rounding_is_unbiased(fmt):
  """E[SR(x)] = x: the mean of 20000 draws is within 5 standard errors of x."""
  n = 20000
  values = np.array([0.3, 1.37, -2.71, 5.5, 0.013, 6.9], np.float32)
  x = jnp.broadcast_to(jnp.asarray(values)[:, None], (len(values), n))
  q = qz.quantize_with_scale(x, jnp.asarray(1.0), fmt, "stochastic", jax.random.key(42))
  draws = np.asarray(q.dequantize())
  for v, row in zip(values, draws):
    lo, hi = row.min(), row.max()
    assert lo <= v <= hi and len(np.unique(row)) <= 2  # only the two neighbours
    stderr = max(row.std() / np.sqrt(n), 1e-7)
    assert abs(row.mean() - v) < 5 * stderr, (v, row.mean(), stderr)
  # And it is not round-to-nearest in disguise.
  nearest = np.asarray(qz.quantize_with_scale(x, jnp.asarray(1.0), fmt).dequantize())
  assert not np.array_equal(draws, nearest)


def test_stochastic_rounding_is_deterministic_given_the_key():
  x = jax.random.normal(jax.random.key(0), (64, 64))
  a = eco.quantize_array(x, eco.fp8_e4m3(), "stochastic", jax.random.key(7))
  b = eco.quantize_array(x, eco.fp8_e4m3(), "stochastic", jax.random.key(7))
  np.testing.assert_array_equal(np.asarray(a.values, np.float32),
                                np.asarray(b.values, np.float32))


@pytest.mark.parametrize("policy", ["fixed", "sticky", "dynamic"])
def test_scale_policies(policy):
  fmt = eco.int8("tensor", scale_policy=policy, headroom=2.0, growth_factor=2.0)
  x = jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)
  q = eco.quantize_array(x, fmt)
  s0 = float(q.scale)
  np.testing.assert_allclose(s0, 2.0 / 127, rtol=1e-6)
  saturated = qz.quantize_with_scale(x * 10, q.scale, fmt)   # codes hit 127
  shrunk = qz.quantize_with_scale(x / 10, q.scale, fmt)      # codes <= 6
  grow, shrink = float(qz.next_scale(saturated)), float(qz.next_scale(shrunk))
  if policy == "fixed":
    assert grow == s0 and shrink == s0
  elif policy == "sticky":
    assert grow == 2 * s0 and shrink == s0 / 2
    assert float(qz.next_scale(q)) == s0   # codes up to 64: no reason to move
  else:   # the largest code lands on floor(127 / 2) = 63 exactly
    np.testing.assert_allclose(grow, 127 * s0 / 63, rtol=1e-6)
    np.testing.assert_allclose(shrink, 6 * s0 / 63, rtol=1e-6)
    regrown = qz.requantize(saturated, saturated.dequantize())
    assert float(jnp.max(jnp.abs(regrown.values.astype(jnp.int32)))) == 63
    assert float(qz.next_scale(regrown)) == float(regrown.scale)   # a fixed point


@pytest.mark.parametrize("fmt", [eco.int8("tensor", scale_policy="dynamic", headroom=2.0),
                                 eco.int4("tensor", scale_policy="dynamic", headroom=1.25),
                                 eco.int8(scale_policy="dynamic", headroom=1.5),
                                 eco.fp8_e4m3(scale_policy="dynamic"),
                                 eco.fp4_e2m1("mxfp4", scale_policy="dynamic"),
                                 eco.fp4_e2m1("nvfp4", scale_policy="dynamic")])
def test_dynamic_scale_does_not_drift_when_the_weights_do_not_change(fmt):
  """Re-storing the same weights must not move the scale: rounding the largest code up
  (INT4 at headroom 1.25: 7/1.25 = 5.6 -> 6) once grew an integer scale by 7% a step, to inf.
  Compiled, as in a train step: XLA divides by a constant as a multiplication by its
  rounded reciprocal, which once grew an integer tensor scale by an ulp a step."""
  x = jax.random.normal(jax.random.key(0), (64, 64))
  q = eco.quantize_array(x, fmt)
  scales = []
  restore = jax.jit(lambda q: qz.requantize(q, q.dequantize()))
  for _ in range(4):
    q = restore(q)
    scales.append(np.asarray(q.effective_scale))
  for s in scales[2:]:
    np.testing.assert_array_equal(s, scales[1])


def test_sticky_float_rescale_by_headroom_is_exact():
  fmt = eco.fp8_e4m3("tensor", scale_policy="sticky", headroom=2.0)
  x = jax.random.normal(jax.random.key(3), (16, 16))
  q = qz.quantize_with_scale(x, jnp.asarray(jnp.max(jnp.abs(x)) / 448), fmt)  # saturating
  grown = qz.requantize(q, q.dequantize())
  np.testing.assert_array_equal(np.asarray(grown.dequantize()), np.asarray(q.dequantize()))
  assert float(grown.scale) == 2 * float(q.scale)


@pytest.mark.parametrize("bad,match", [
    (dict(scaling="row"), "scaling must be one of"),
    (dict(scale_policy="amax"), "scale_policy must be one of"),
    (dict(headroom=0.5), "headroom must be"),
    (dict(headroom=1.0), "so 1.0 would never move it"),   # sticky by default
    (dict(growth_factor=1.0), "so 1.0 would never move it"),
    (dict(scale_policy="dynamic", headroom=1.0), "with headroom=1 no weight can ever grow"),
    (dict(saturated_fraction=1.0), r"saturated_fraction must be in \[0, 1\)"),
])
def test_bad_format_arguments_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    eco.fp8_e4m3(**bad)


def test_block_size_must_divide_the_axis():
  with pytest.raises(ValueError, match="multiple of block_size=32"):
    eco.quantize_array(jnp.ones((4, 48)), eco.int4("block", block_size=32))


def test_stochastic_rounding_needs_a_key():
  with pytest.raises(ValueError, match="PRNG key"):
    qz.quantize_with_scale(jnp.ones((2, 2)), jnp.asarray(1.0), eco.int8(), "stochastic")


def test_quantize_jits():
  f = jax.jit(lambda x: eco.quantize_array(x, eco.fp8_e4m3()).dequantize())
  x = jax.random.normal(jax.random.key(0), (8, 8))
  np.testing.assert_array_equal(np.asarray(f(x)),
                                np.asarray(eco.quantize_array(x, eco.fp8_e4m3()).dequantize()))


def test_stochastic_uniform_is_uniform_and_independent():
  u = np.asarray(qz.stochastic_uniform(jax.random.key(0), (512, 512))).ravel()
  v = np.asarray(qz.stochastic_uniform(jax.random.key(1), (512, 512))).ravel()
  assert u.min() >= 0.0 and u.max() < 1.0
  hist = np.histogram(u, bins=16, range=(0, 1))[0] / u.size
  np.testing.assert_allclose(hist, 1 / 16, atol=0.002)
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01      # neighbours
  assert abs(np.corrcoef(u[:-512], u[512:])[0, 1]) < 0.01  # rows
  assert abs(np.corrcoef(u, v)[0, 1]) < 0.01              # keys


def test_dither_is_uniform_per_element_over_keys_and_even_across_elements():
  """Per element, over 4000 keys: uniform and uncorrelated from key to key (rounding with it
  is unbiased); across one draw's elements, evenly spread; a block at an offset draws
  what the whole array draws there."""
  keys = jax.random.split(jax.random.key(0), 4000)
  u = np.asarray(jax.vmap(lambda k: qz.dither_uniform(k, (4, 8)))(keys)).reshape(4000, 32)
  assert u.min() >= 0.0 and u.max() < 1.0
  for element in u.T:
    hist = np.histogram(element, bins=8, range=(0, 1))[0] / len(element)
    np.testing.assert_allclose(hist, 1 / 8, atol=0.03)
    assert abs(np.corrcoef(element[:-1], element[1:])[0, 1]) < 0.06
  one = np.asarray(qz.dither_uniform(jax.random.key(1), (512, 512))).ravel()
  np.testing.assert_allclose(np.histogram(one, bins=64, range=(0, 1))[0] / one.size, 1 / 64,
                             atol=2e-4)
  whole = qz.dither_uniform(jax.random.key(2), (6, 5))
  np.testing.assert_array_equal(np.asarray(qz.dither_uniform(jax.random.key(2), (2, 5), 20)),
                                np.asarray(whole[4:]))
  np.testing.assert_array_equal(np.asarray(qz.dither_uniform(jax.random.key(2), (5,), 7)),
                                np.asarray(whole[1, 2:]).tolist() + np.asarray(whole[2, :2]).tolist())
  flat = np.asarray(qz.dither_uniform(jax.random.key(2), (30,)))
  for shape in ((), (3, 2, 5)):   # no axis; several leading axes
    np.testing.assert_array_equal(np.asarray(qz.dither_uniform(jax.random.key(2), shape)).ravel(),
                                  flat[:max(1, np.prod(shape, dtype=int))])


def test_stochastic_rounding_of_negative_values_and_binade_edges_is_unbiased():
  fmt = eco.fp8_e4m3("tensor")
  values = np.array([-1.03, -0.999, -2.0 ** -7, 255.0, -300.0, 2.0 ** -10], np.float32)
  n = 20000
  x = jnp.broadcast_to(jnp.asarray(values)[:, None], (len(values), n))
  draws = np.asarray(qz.quantize_with_scale(x, jnp.asarray(1.0), fmt, "stochastic",
                                            jax.random.key(3)).dequantize())
  for v, row in zip(values, draws):
    assert len(np.unique(row)) <= 2
    assert abs(row.mean() - v) < 5 * max(row.std() / np.sqrt(n), 1e-9), (v, row.mean())


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_bf16_format_is_unscaled_bfloat16(rounding):
  x = jax.random.normal(jax.random.key(0), (16, 16)) * 1e3
  q = eco.quantize_array(x, eco.bf16(), rounding, jax.random.key(1))
  assert q.values.dtype == jnp.bfloat16 and float(q.scale) == 1.0 and q.scale.shape == ()
  # half a step (7 mantissa bits) for nearest, a whole step for stochastic rounding
  np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(x),
                             rtol=2**-8 if rounding == "nearest" else 2**-7)
  assert float(qz.next_scale(q)) == 1.0
  if rounding == "nearest":
    np.testing.assert_array_equal(np.asarray(q.values), np.asarray(x.astype(jnp.bfloat16)))


@pytest.mark.parametrize("fmt", [eco.fp8_e4m3("tensor", scale_policy="fixed", headroom=1.0),
                                 eco.fp8_e5m2("tensor", scale_policy="fixed", headroom=1.0), eco.bf16(),
                                 eco.QuantFormat("e2m1", jnp.float4_e2m1fn, "tensor")],
                         ids=["e4m3", "e5m2", "bf16", "e2m1"])
def test_nearest_rounding_on_the_fp32_grid_is_the_ieee_cast(fmt):
  """Codes are rounded in FP32 then cast exactly: the same as the cast's own RNE."""
  x = jnp.concatenate([jax.random.normal(jax.random.key(0), (4096,)) * 10.0 ** k
                       for k in range(-6, 4)]).reshape(40, 1024)
  y = jnp.clip(x, -fmt.max_value, fmt.max_value)
  q = qz.quantize_with_scale(x, jnp.asarray(1.0), fmt)
  np.testing.assert_array_equal(np.asarray(q.values.astype(jnp.float32)),
                                np.asarray(y.astype(fmt.dtype).astype(jnp.float32)))


@pytest.mark.parametrize("fmt", [eco.fp8_e4m3("block", block_size=16), eco.fp8_e5m2(),
                                 eco.int8(), eco.int4("channel"), eco.fp4_e2m1("mxfp4"),
                                 eco.fp4_e2m1("nvfp4")],
                         ids=["e4m3", "e5m2", "int8", "int4", "mxfp4", "nvfp4"])
def test_code_absmax_reads_the_bits_right(fmt):
  q = eco.quantize_array(jax.random.normal(jax.random.key(1), (32, 64)), fmt)
  expected = np.asarray(qz._group_absmax(q.values.astype(jnp.float32), fmt))
  np.testing.assert_array_equal(np.asarray(qz._code_absmax(q.values, fmt)), expected)
  # In one pass with the count of codes at +-rho, per scale group (some groups saturate).
  loud = qz.quantize_with_scale(jax.random.normal(jax.random.key(2), (32, 64)) * 4,
                                q.effective_scale, fmt)
  values = jnp.concatenate([q.values[:16], loud.values[16:]])
  code_max, count = qz._code_absmax_and_saturated_count(values, fmt)
  at_max = np.abs(np.asarray(values.astype(jnp.float32))) == fmt.max_value
  axis = fmt.axis % 2
  if fmt.scaling == "tensor":
    expected_count = at_max.sum()
  elif fmt.scaling == "channel":
    expected_count = at_max.sum(axis=1 - axis, keepdims=True)
  else:                                      # blocks of block_size along axis
    expected_count = np.asarray(qz._blocked(jnp.asarray(at_max), fmt)).sum(axis=axis + 1)
  np.testing.assert_array_equal(np.asarray(code_max),
                                np.asarray(qz._group_absmax(values.astype(jnp.float32), fmt)))
  np.testing.assert_array_equal(np.asarray(count), expected_count)
  assert count.dtype == jnp.int32 and np.asarray(count).shape == np.asarray(code_max).shape
  assert 0 < int(count.sum()) < values.size
  value, stored = qz.requantize_with_value(q, q.dequantize() * 1.3)
  np.testing.assert_array_equal(np.asarray(value.dequantize()), np.asarray(stored))


@pytest.mark.parametrize("fmt", [eco.fp8_e4m3(), eco.fp8_e5m2(), eco.int8(), eco.int4(),
                                 eco.fp4_e2m1("mxfp4"), eco.bf16()],
                         ids=["e4m3", "e5m2", "int8", "int4", "e2m1", "bf16"])
def test_bits_to_float32_decodes_every_code_as_the_cast_does(fmt):
  """Every storage code, NaN, infinity, -0 and subnormals included, from any unsigned width."""
  codes = np.arange(1 << min(fmt.bits, 16), dtype=np.uint32)
  want = qz.bits_to_values(jnp.asarray(codes), fmt).astype(jnp.float32)
  assert (np.isnan(want).any() or np.isinf(want).any()) == (fmt.name in ("fp8_e4m3", "fp8_e5m2",
                                                                          "bf16"))
  for dtype in (np.uint8, np.uint16, np.uint32):
    if fmt.bits > np.dtype(dtype).itemsize * 8:
      continue
    got = jax.jit(qz.bits_to_float32, static_argnums=1)(jnp.asarray(codes.astype(dtype)), fmt)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))      # NaN == NaN here
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))      # -0 stays -0


_STACKED_FORMATS = {
    "int4-tensor": (eco.int4(), (3, 1, 1)), "int8-channel": (eco.int8(), (3, 1, 8)),
    "e4m3-channel": (eco.fp8_e4m3(), (3, 1, 8)), "e4m3-tensor": (eco.fp8_e4m3("tensor"), (3, 1, 1)),
    "int4-block": (eco.int4("block", block_size=4), (3, 32, 2)),
    "mxfp4-in": (eco.fp4_e2m1("mxfp4", axis=-2), (3, 1, 8)),
    "nvfp4-in": (eco.fp4_e2m1("nvfp4", axis=-2), (3, 2, 8))}


@pytest.mark.parametrize("name", list(_STACKED_FORMATS))
def test_a_stack_of_matrices_is_scaled_and_stepped_matrix_by_matrix(name):
  """(L, in, out) kernels (nn.scan layers, experts): one set of scales per matrix, so a
  small layer keeps its precision beside a large one, and a step on the stack is the
  step on each layer."""
  fmt, scale_shape = _STACKED_FORMATS[name]
  keys = jax.random.split(jax.random.key(0), 3)
  w = jnp.stack([jax.random.normal(k, (32, 8)) * 10.0 ** -i for i, k in enumerate(keys)])
  g = jax.random.normal(jax.random.key(1), w.shape) * 0.1
  stacked = eco.quantize_params({"w": w}, fmt)
  layers = [eco.quantize_params({"w": w[i]}, fmt) for i in range(3)]
  assert stacked["w"].scale.shape == scale_shape
  if fmt.has_tensor_scale:                     # NVFP4: one FP32 tensor scale per matrix
    assert stacked["w"].tensor_scale.shape == (3, 1, 1)
  tx = eco.adamw(1e-2, rounding="nearest")   # stochastic draws differ between leaf layouts
  step = jax.jit(lambda q, g: eco.apply_updates(q, tx.update(g, tx.init(q), q)[0]))
  for i, layer in enumerate(layers):
    np.testing.assert_array_equal(qz.values_to_bits(stacked["w"].values[i], fmt),
                                  qz.values_to_bits(layer["w"].values, fmt))
    np.testing.assert_array_equal(np.asarray(stacked["w"].dequantize()[i]),
                                  np.asarray(layer["w"].dequantize()))
  new = step(stacked, {"w": g})["w"].dequantize()
  for i, layer in enumerate(layers):
    np.testing.assert_array_equal(np.asarray(new[i]),
                                  np.asarray(step(layer, {"w": g[i]})["w"].dequantize()))
  # lax.scan over the stored stack hands each layer its codes and its scales.
  _, per_layer = jax.lax.scan(lambda c, leaf: (c, leaf.dequantize()), 0.0, stacked["w"])
  np.testing.assert_array_equal(np.asarray(per_layer), np.asarray(stacked["w"].dequantize()))


def test_an_unscaled_stack_is_stepped_as_its_matrices():
  """bfloat16 storage has one scalar scale, also for a stack: the step on an (L, in, out)
  leaf is the step on each matrix (with every optimizer's elementwise step)."""
  w = jax.random.normal(jax.random.key(0), (3, 32, 8))
  g = jax.random.normal(jax.random.key(1), w.shape) * 0.1
  for tx in (eco.sgdm(1e-2, rounding="nearest"), eco.adamw(1e-2, rounding="nearest"),
             eco.lion(1e-3, rounding="nearest")):    # stochastic draws differ by layout
    step = jax.jit(lambda q, g: eco.apply_updates(q, tx.update(g, tx.init(q), q)[0]))
    new = step(eco.quantize_params({"w": w}, eco.bf16()), {"w": g})["w"]
    assert new.values.dtype == jnp.bfloat16 and new.shape == (3, 32, 8)
    for i in range(3):
      layer = step(eco.quantize_params({"w": w[i]}, eco.bf16()), {"w": g[i]})["w"]
      np.testing.assert_array_equal(np.asarray(new.dequantize()[i]),
                                    np.asarray(layer.dequantize()))


def test_fp4_blocks_run_along_the_input_features_of_stacks_and_convolutions():
  """The default axis -2 is the contraction axis of an (in, out) kernel, of each kernel of
  an (L, in, out) stack and of a (kh, kw, in, out) convolution; blocks across the stack
  are refused, naming the axis to use."""
  assert eco.quantize_params({"w": jnp.ones((3, 64, 8))}, eco.fp4_e2m1())["w"].scale.shape \
      == (3, 2, 8)
  assert eco.quantize_array(jnp.ones((3, 3, 64, 8)), eco.fp4_e2m1("nvfp4")).scale.shape \
      == (3, 3, 4, 8)
  with pytest.raises(ValueError, match=r"\['w'\]: mxfp4: block scaling needs axis 0 of shape "
                     r"\(3, 64, 8\).*stack of \(in, out\) kernels.*axis=-2"):
    eco.quantize_params({"w": jnp.ones((3, 64, 8))}, eco.fp4_e2m1(axis=0))
  with pytest.raises(ValueError, match=r"mxfp4: axis -2 is out of range for a 1-d tensor"):
    eco.quantize_array(jnp.ones(64), eco.fp4_e2m1())
