"""Scale policies: every format's default lets weights grow, and a scale that can't grow says so.

The small-initialisation quadratic: SGDM on ``f(w) = ||w - w*||^2 / 2`` with the
optimum ``w* ~ N(0, 1)`` and weights initialised at ``+-0.01``, so every weight has
to grow a hundredfold. With a scale that cannot grow, naive rounding, ECO and
master weights all stay at ``+-0.01`` (RMS error 1).
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eco_optax as eco
from eco_optax import quantize as qz
from _helpers import quadratic_rms_errors

W_STAR = jax.random.normal(jax.random.key(0), (64, 64))
W0 = 0.01 * jnp.sign(jax.random.normal(jax.random.key(1), (64, 64)))
STEPS = {1e-2: 2000, 1e-3: 12000}   # 20 and 12 time constants 1/eta

DEFAULTS = [eco.fp8_e4m3(), eco.fp8_e5m2(), eco.int8(), eco.int4(),
            eco.fp4_e2m1("mxfp4"), eco.fp4_e2m1("nvfp4")]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", DEFAULTS, ids=lambda f: f.name)
def test_default_scales_let_small_weights_grow_and_eco_tracks_master_weights(fmt):
  errors = {(mode, lr): error for mode in ("naive", "eco", "master_weights")
            for lr, error in quadratic_rms_errors(fmt, W0, W_STAR, STEPS, mode).items()}
  print(fmt.name, errors)
  for lr in STEPS:
    assert errors[("master_weights", lr)] < 0.35          # the weights did grow (from 1.0)
    assert errors[("eco", lr)] < 2 * errors[("master_weights", lr)]
  # The paper's theory: without feedback the error grows as the learning rate shrinks.
  assert errors[("naive", 1e-3)] > errors[("naive", 1e-2)]
  assert errors[("naive", 1e-3)] > 3 * errors[("eco", 1e-3)]


def test_a_fixed_scale_pins_the_weights_and_says_so():
  fmt = eco.int8(scale_policy="fixed", headroom=1.0)
  q = eco.quantize_params({"layer": {"w": W0}}, fmt)
  tx = eco.sgdm(1e-1)
  step = jax.jit(lambda q, s: tx.update({"layer": {"w": eco.dequantize_params(q)["layer"]["w"]
                                                   - W_STAR}}, s, q))
  state = tx.init(q)
  with pytest.warns(RuntimeWarning, match=r"\['layer'\]\['w'\]: more than 1% of this int8 "
                    r"leaf's codes sit at the format's largest magnitude \+-127 under "
                    r"scale_policy='fixed'"):
    for _ in range(20):
      updates, state = step(q, state)
      q = jax.jit(eco.apply_updates)(q, updates)
    jax.effects_barrier()
  w = eco.dequantize_params(q)["layer"]["w"]
  assert float(jnp.max(jnp.abs(w))) == pytest.approx(0.01)      # pinned at the initial range
  assert float(qz.saturation(q["layer"]["w"])) > 0.9


def test_no_warning_while_a_fixed_scale_has_room():
  fmt = eco.int8(scale_policy="fixed", headroom=2.0)
  x = jax.random.normal(jax.random.key(2), (64, 64))
  q = eco.quantize_params({"w": x}, fmt)
  tx = eco.sgdm(1e-3)
  updates, _ = tx.update({"w": jnp.zeros_like(x)}, tx.init(q), q)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(eco.apply_updates)(q, updates)
    jax.effects_barrier()


def test_saturation_counts_codes_at_the_format_max():
  x = jnp.array([[448.0, -448.0, 1.0, 0.0]] * 16)
  q = qz.quantize_with_scale(x, jnp.asarray(1.0), eco.fp8_e4m3("tensor"))
  assert float(qz.saturation(q)) == 0.5
  q = qz.quantize_with_scale(jnp.array([[9.0, -7.0, 6.9, 0.0]]), jnp.asarray(1.0),
                             eco.int4(scale_policy="fixed"))
  assert float(qz.saturation(q)) == 0.75                       # 9 clips to 7; 6.9 -> 7


def test_int4_sticky_scale_grows_only_past_the_saturated_fraction():
  fmt = eco.int4()                                   # sticky, h = 1, g = 1.25, p = 1/64
  assert (fmt.scale_policy, fmt.headroom, fmt.growth, fmt.saturated_fraction) == (
      "sticky", 1.0, 1.25, 1 / 64)
  x = jax.random.normal(jax.random.key(3), (64, 64))
  q = eco.quantize_array(x, fmt)
  s0 = float(q.scale)
  assert float(qz.saturation(q)) < 1 / 64            # the absmax (and a few) at +-7
  assert float(qz.next_scale(q)) == s0               # a few clipped outliers: no growth
  pushed = qz.quantize_with_scale(x * 1.5, q.scale, fmt)
  assert float(qz.saturation(pushed)) > 1 / 64
  np.testing.assert_allclose(float(qz.next_scale(pushed)), 1.25 * s0, rtol=1e-6)
  small = qz.quantize_with_scale(x / 2, q.scale, fmt)  # every code within +-4 (< 7/1.25)
  np.testing.assert_allclose(float(qz.next_scale(small)), s0 / 1.25, rtol=1e-6)


def test_int8_default_starts_with_room_and_grows_on_one_saturated_code():
  fmt = eco.int8()
  x = jnp.linspace(-1.0, 1.0, 64).reshape(64, 1)
  q = eco.quantize_array(x, fmt)
  assert int(jnp.max(jnp.abs(q.values.astype(jnp.int32)))) == 102     # 127 / 1.25
  s0 = float(q.scale[0, 0])
  one_out = qz.quantize_with_scale(x.at[0, 0].set(-2.0), q.scale, fmt)
  np.testing.assert_allclose(float(qz.next_scale(one_out)[0, 0]), 1.25 * s0, rtol=1e-6)


@pytest.mark.parametrize("fmt", [eco.int4(), eco.int4("channel"), eco.fp4_e2m1("mxfp4", block_size=8)],
                         ids=["int4", "int4-channel", "mxfp4"])
@pytest.mark.parametrize("kwargs", [dict(rounding="nearest"), dict(mode="master_weights"), dict()],
                         ids=["eco-rtn", "master-weights", "eco-sr"])
def test_a_zero_initialized_layer_learns_small_weights(fmt, kwargs):
  """A zero-initialized kernel (as zero-init output projections are) with small weights
  to learn, by every rounding: its all-zero scale groups start at the range
  [-2^-7, 2^-7] and shrink while they stay zero. When they started at [-1, 1] and kept
  it, round-to-nearest stored nothing for dozens of steps and then jumped a whole INT4
  grid step (loss 17.5 -> 2100-3400), and stochastic rounding ended at 55-60."""
  x = jax.random.normal(jax.random.key(1), (128, 16))
  y = x @ (0.01 * jax.random.normal(jax.random.key(2), (16, 8)))
  loss = lambda p: jnp.mean((x @ p["w"] - y) ** 2) / 0.01 ** 2
  q = eco.quantize_params({"w": jnp.zeros((16, 8))}, fmt)
  tx = eco.adamw(1e-3, weight_decay=0.0, **kwargs)

  def step(carry, _):
    q, state = carry
    updates, state = tx.update(eco.grad(loss)(q), state, q)
    q = eco.apply_updates(q, updates)
    return (q, state), loss(eco.dequantize_params(q))

  start = float(loss(eco.dequantize_params(q)))
  _, losses = jax.lax.scan(step, (q, tx.init(q)), length=150)
  assert float(losses.max()) <= start * 1.001, float(losses.max())
  # Stochastic rounding is noisier on this 16 x 8 layer, from any start (0.8-1.4 from
  # weights of +-0.01).
  assert float(losses[-1]) < (0.1 if not kwargs else 0.05) * start, float(losses[-1])
