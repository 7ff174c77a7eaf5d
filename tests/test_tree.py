"""quantize_params / dequantize_params / apply_updates and their errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eco_optax as eco
from eco_optax import quantize as qz

FORMATS = [eco.fp8_e4m3(), eco.fp8_e5m2(), eco.int8(), eco.int4(),
           eco.int4("block", block_size=16), eco.fp8_e4m3("tensor", scale_policy="dynamic"),
           # blocks of 16: _params() has a (48, 16) head
           eco.fp4_e2m1("mxfp4", block_size=16), eco.fp4_e2m1("nvfp4"),
           eco.fp4_e2m1("mxfp4", block_size=16, scale_policy="dynamic"),
           eco.fp4_e2m1("nvfp4", scale_policy="dynamic")]
IDS = ["e4m3", "e5m2", "int8", "int4", "int4-block", "e4m3-dynamic", "mxfp4", "nvfp4",
       "mxfp4-dynamic", "nvfp4-dynamic"]


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"layer": {"kernel": jax.random.normal(k1, (32, 48)) * 0.05,
                    "bias": jnp.zeros(48)},
          "scale": jnp.ones(48),
          "head": jax.random.normal(k2, (48, 16))}


def test_default_policy_quantizes_matrices_only():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  assert eco.is_quantized(q["layer"]["kernel"]) and eco.is_quantized(q["head"])
  assert not eco.is_quantized(q["layer"]["bias"]) and not eco.is_quantized(q["scale"])
  d = eco.dequantize_params(q)
  assert jax.tree.structure(d) == jax.tree.structure(_params())
  assert d["head"].dtype == jnp.float32
  assert eco.dequantize_params(q, jnp.bfloat16)["head"].dtype == jnp.bfloat16


def test_policy_callable_gets_paths():
  seen = []

  def policy(path, leaf):
    seen.append(jax.tree_util.keystr(path))
    return eco.int4() if "kernel" in jax.tree_util.keystr(path) else None

  q = eco.quantize_params(_params(), policy)
  assert eco.is_quantized(q["layer"]["kernel"]) and not eco.is_quantized(q["head"])
  assert "['layer']['kernel']" in seen


def _step(q, lr, rounding, seed=0, mode="eco"):
  """One eco_optax SGDM step on random gradients: ``(updates, new params)``."""
  g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed), x.shape),
                   eco.dequantize_params(q))
  tx = eco.sgdm(lr, 0.5, mode=mode, rounding=rounding)
  updates, _ = tx.update(g, tx.init(q), q)
  return updates, eco.apply_updates(q, updates)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_apply_updates_copies_the_codes_the_optimizer_computed(fmt, rounding):
  """The new codes are the update's bits; the scale is the policy's next scale."""
  q = eco.quantize_params(_params(), fmt)
  for step, lr in enumerate([1.0, 1e-2, 1e-5]):          # large to vanishing steps
    updates, new = _step(q, lr, rounding, seed=step)
    u, old, got = updates["head"], q["head"], new["head"]
    assert u.dtype == jnp.uint32 and bool(jnp.all(u & eco.tree.VALID))
    np.testing.assert_array_equal(np.asarray(qz.values_to_bits(got.values, fmt)),
                                  np.asarray((u & 0xFFFF).astype(qz.bits_dtype(fmt))))
    np.testing.assert_array_equal(np.asarray(got.effective_scale),
                                  np.asarray(qz.next_scale(old)))
    assert got.scale.dtype == fmt.scale_dtype
    q = new


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_the_optimizers_rounding_is_the_quantizers(fmt):
  """Naive RTN inside the step stores what requantize stores for the same target."""
  q = eco.quantize_params(_params(), fmt)
  lr = 0.3
  g = jax.random.normal(jax.random.key(0), (48, 16))
  updates, new = _step(q, lr, "nearest", seed=0, mode="naive")
  target = q["head"].dequantize() - lr * 0.5 * g              # sgdm: m~ = (1 - 0.5) g
  expected = qz.requantize(q["head"], target)
  np.testing.assert_array_equal(np.asarray(qz.values_to_bits(new["head"].values, fmt)),
                                np.asarray(qz.values_to_bits(expected.values, fmt)))
  np.testing.assert_array_equal(np.asarray(new["head"].effective_scale),
                                np.asarray(expected.effective_scale))


def test_apply_updates_on_plain_leaves_is_optax():
  q = eco.quantize_params(_params(), eco.int8())
  updates, out = _step(q, 0.1, "nearest")
  np.testing.assert_array_equal(
      np.asarray(out["scale"]),
      np.asarray(optax.apply_updates({"scale": _params()["scale"]},
                                     {"scale": updates["scale"]})["scale"]))


def test_optax_apply_updates_refuses_float8():
  """Why eco.apply_updates exists (paper notes): JAX won't promote float8 + float32."""
  q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
  with pytest.raises(jax.dtypes.TypePromotionError, match="no available implicit dtype"):
    optax.apply_updates(q["w"].values, jnp.ones((4, 4)))


def test_zero_update_keeps_weights_and_scale_even_when_the_policy_would_move():
  fmt = eco.int8("tensor", scale_policy="sticky", headroom=2.0)
  x = jnp.linspace(-1, 1, 64).reshape(8, 8)
  leaf = qz.quantize_with_scale(x, jnp.asarray(1 / 127), fmt)  # saturated: sticky would grow
  assert float(qz.next_scale(leaf)) == 2 * float(leaf.scale)
  out = eco.apply_updates({"w": leaf}, {"w": jnp.zeros((8, 8), jnp.uint32)})
  np.testing.assert_array_equal(np.asarray(out["w"].values), np.asarray(leaf.values))
  assert float(out["w"].scale) == float(leaf.scale)


def test_a_float_update_of_a_quantized_leaf_is_refused_at_trace_time():
  q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
  with pytest.raises(TypeError, match=r"\['w'\]: the update of this fp8_e4m3 leaf is "
                                      r"float32.*optax.scale"):
    jax.jit(eco.apply_updates)(q, {"w": jnp.full((4, 4), 0.5)})


def test_poison_gives_the_leaf_a_nan_scale():
  q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.int4())
  updates, _ = _step(q, 0.1, "nearest")
  poisoned = {"w": updates["w"].at[0, 0].set(updates["w"][0, 0] | eco.tree.POISON)}
  assert bool(jnp.all(jnp.isnan(eco.apply_updates(q, poisoned)["w"].dequantize())))


def test_applying_a_step_allocates_nothing_the_size_of_the_weights_in_fp32():
  q = eco.quantize_params({"w": jnp.ones((1024, 1024))}, eco.fp8_e4m3())
  updates, _ = _step(q, 0.1, "nearest")
  compiled = jax.jit(eco.apply_updates, donate_argnums=0).lower(q, updates).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  # An FP32 copy of the weights would be 4 MiB. What is there (2 MiB): the codes with
  # their sign bit cleared, reduced by the sticky policy, and the conditional's codes.
  assert temp <= 2 * 1024 * 1024 + 4096, temp


def test_apply_updates_jits():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  updates, b = _step(q, 0.1, "stochastic")
  a = jax.jit(eco.apply_updates)(q, updates)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


# ---- bad input: each a clear error naming the leaf ----

def test_unsupported_dtype_names_the_leaf():
  with pytest.raises(TypeError, match=r"\['ids'\].*int32"):
    eco.quantize_params({"ids": jnp.ones((4, 4), jnp.int32)}, eco.fp8_e4m3())


def test_already_quantized_leaf_is_refused():
  q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
  with pytest.raises(TypeError, match=r"\['w'\].*already quantized"):
    eco.quantize_params(q, eco.fp8_e4m3())


def test_zero_size_leaf_names_the_leaf():
  with pytest.raises(ValueError, match=r"\['empty'\].*zero-size"):
    eco.quantize_params({"empty": jnp.ones((0, 4))}, eco.fp8_e4m3())


def test_non_finite_params_name_the_leaf():
  with pytest.raises(ValueError, match=r"\['w'\].*non-finite"):
    eco.quantize_params({"w": jnp.ones((4, 4)).at[0, 0].set(jnp.nan)}, eco.int8())


def test_bad_policy_return_names_the_leaf():
  with pytest.raises(TypeError, match=r"\['w'\].*expected a QuantFormat"):
    eco.quantize_params({"w": jnp.ones((4, 4))}, lambda p, x: "fp8")


def test_block_size_error_names_the_leaf():
  with pytest.raises(ValueError, match=r"\['w'\].*block_size"):
    eco.quantize_params({"w": jnp.ones((4, 6))}, eco.int4("block", block_size=4))


def test_mismatched_update_tree_is_a_clear_error():
  q = eco.quantize_params(_params(), eco.int8())
  u = eco.dequantize_params(q)
  del u["head"]
  with pytest.raises(ValueError, match=r"missing \[\"\['head'\]\"\]"):
    eco.apply_updates(q, u)


def test_update_with_wrong_shape_names_the_leaf():
  q = eco.quantize_params(_params(), eco.int8())
  u = eco.dequantize_params(q)
  u["head"] = jnp.zeros((16, 48))
  with pytest.raises(ValueError, match=r"\['head'\].*shape \(16, 48\), expected \(48, 16\)"):
    eco.apply_updates(q, u)
