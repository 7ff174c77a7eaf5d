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


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_apply_updates_reproduces_the_optimizers_weights_exactly(fmt, rounding):
  """The new stored weights computed inside update() equal apply_updates' result."""
  q = eco.quantize_params(_params(), fmt)
  key = jax.random.key(1)
  for step in range(3):
    key, k1, k2 = jax.random.split(key, 3)
    delta = jax.random.normal(k1, (32, 48)) * 10.0 ** (-step - 1)   # large to tiny steps
    leaf = q["layer"]["kernel"]
    expected = qz.requantize(leaf, leaf.dequantize() + delta, rounding, k2)
    update = expected.dequantize() - leaf.dequantize()
    updates = jax.tree.map(jnp.zeros_like, eco.dequantize_params(q))
    updates["layer"]["kernel"] = update
    q = eco.apply_updates(q, updates)
    got = q["layer"]["kernel"]
    np.testing.assert_array_equal(np.asarray(got.values, np.float32),
                                  np.asarray(expected.values, np.float32))
    np.testing.assert_array_equal(np.asarray(got.scale.astype(jnp.float32)),
                                  np.asarray(expected.scale.astype(jnp.float32)))
    assert got.scale.dtype == fmt.scale_dtype
    np.testing.assert_array_equal(np.asarray(got.effective_scale),
                                  np.asarray(expected.effective_scale))


def test_apply_updates_on_plain_leaves_is_optax():
  q = eco.quantize_params(_params(), eco.int8())
  updates = jax.tree.map(lambda x: jnp.full(x.shape, 0.5), eco.dequantize_params(q))
  out = eco.apply_updates(q, updates)
  np.testing.assert_array_equal(np.asarray(out["scale"]),
                                np.asarray(optax.apply_updates(_params(), updates)["scale"]))


def test_optax_apply_updates_refuses_float8():
  """Why eco.apply_updates exists (paper notes): JAX won't promote float8 + float32."""
  q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
  with pytest.raises(Exception):
    optax.apply_updates(q["w"].values, jnp.ones((4, 4)))


def test_zero_update_keeps_weights_and_scale_even_when_the_policy_would_move():
  fmt = eco.int8("tensor", scale_policy="sticky", headroom=2.0)
  x = jnp.linspace(-1, 1, 64).reshape(8, 8)
  leaf = qz.quantize_with_scale(x, jnp.asarray(1 / 127), fmt)  # saturated: sticky would grow
  q = {"w": leaf}
  out = eco.apply_updates(q, {"w": jnp.zeros((8, 8))})
  np.testing.assert_array_equal(np.asarray(out["w"].values), np.asarray(leaf.values))
  assert float(out["w"].scale) == float(leaf.scale)


def test_non_finite_updates_leave_weights_unchanged():
  q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
  u = jnp.zeros((4, 4)).at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf).at[2, 2].set(0.5)
  out = eco.dequantize_params(eco.apply_updates(q, {"w": u}))["w"]
  assert np.all(np.isfinite(np.asarray(out)))
  assert float(out[0, 0]) == 1.0 and float(out[1, 1]) == 1.0
  assert abs(float(out[2, 2]) - 1.5) < 0.1   # moved, to the grid point nearest 1.5


def test_apply_updates_jits():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  u = jax.tree.map(lambda x: jnp.full(x.shape, 0.01), eco.dequantize_params(q))
  a = jax.jit(eco.apply_updates)(q, u)
  b = eco.apply_updates(q, u)
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
