"""quantize_params / dequantize_params / apply_updates and their errors."""
import functools

import chex
import flax.linen as nn
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
           eco.fp4_e2m1("nvfp4", scale_policy="dynamic"), eco.bf16()]
IDS = ["e4m3", "e5m2", "int8", "int4", "int4-block", "e4m3-dynamic", "mxfp4", "nvfp4",
       "mxfp4-dynamic", "nvfp4-dynamic", "bf16"]


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


def test_default_policy_keeps_stacked_and_per_head_biases_and_norm_gains():
  """Flax names them ``bias`` and ``scale``: matrices under ``nn.scan`` or per head."""
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.LayerNorm()(nn.Dense(8)(x)), None

  stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
  linen = {"stack": stack().init(jax.random.key(0), jnp.ones((1, 8)), None)["params"],
           "attention": nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8).init(
               jax.random.key(1), jnp.ones((1, 3, 8)))["params"]}
  q = eco.quantize_params(linen, eco.fp8_e4m3())
  kept = {jax.tree_util.keystr(path): eco.is_quantized(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(q, is_leaf=eco.is_quantized)[0]}
  assert kept == {
      "['stack']['Dense_0']['kernel']": True, "['stack']['Dense_0']['bias']": False,
      "['stack']['LayerNorm_0']['scale']": False, "['stack']['LayerNorm_0']['bias']": False,
      **{f"['attention']['{name}']['kernel']": True for name in ("query", "key", "value", "out")},
      **{f"['attention']['{name}']['bias']": False for name in ("query", "key", "value", "out")}}
  # Kept though they are matrices:
  assert linen["stack"]["LayerNorm_0"]["scale"].shape == (3, 8)
  assert linen["attention"]["query"]["bias"].shape == (2, 4)


def test_default_policy_cuts_attention_projections_along_their_input_features():
  """Flax's (in, heads, head_dim) query/key/value kernels: one channel scale per input
  feature and FP4 blocks along the inputs; read as a stack of ``in`` matrices (any
  policy that returns the format as it is) a scale per (input, head_dim), 4 / heads
  B/param, and FP4 blocks across the heads."""
  attention = {name: {"kernel": jnp.ones((64, 8, 16))} for name in ("query", "key", "value")}
  attention["out"] = {"kernel": jnp.ones((8, 16, 64))}
  q = eco.quantize_params(attention, eco.fp8_e4m3())
  assert q["query"]["kernel"].scale.shape == (64, 1, 1)
  assert q["out"]["kernel"].scale.shape == (8, 1, 64)        # a stack of heads: as before
  as_stack = eco.quantize_params(attention, lambda path, leaf: eco.fp8_e4m3())
  assert as_stack["query"]["kernel"].scale.shape == (64, 1, 16)
  assert as_stack["query"]["kernel"].scale.nbytes / as_stack["query"]["kernel"].size == 4 / 8
  stacked = eco.quantize_params({"query": {"kernel": jnp.ones((3, 64, 8, 16))}}, eco.fp8_e4m3())
  assert stacked["query"]["kernel"].scale.shape == (3, 64, 1, 1)
  fp4 = eco.quantize_params({"key": {"kernel": jnp.ones((64, 8, 16))}}, eco.fp4_e2m1())
  assert fp4["key"]["kernel"].scale.shape == (2, 8, 16)
  with pytest.raises(ValueError, match=r"\['key'\]\['kernel'\]: mxfp4: block scaling needs axis -2"):
    eco.quantize_params({"key": {"kernel": jnp.ones((64, 8, 16))}}, lambda p, x: eco.fp4_e2m1())


def test_policy_callable_gets_paths():
  seen = []

  def policy(path, leaf):
    seen.append(jax.tree_util.keystr(path))
    return eco.int4() if "kernel" in jax.tree_util.keystr(path) else None

  q = eco.quantize_params(_params(), policy)
  assert eco.is_quantized(q["layer"]["kernel"]) and not eco.is_quantized(q["head"])
  assert "['layer']['kernel']" in seen


def _sgdm_update(q, lr, rounding, seed=0, mode="eco"):
  """The updates of one eco_optax SGDM step on random gradients."""
  g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed), x.shape),
                   eco.dequantize_params(q))
  tx = eco.sgdm(lr, 0.5, mode=mode, rounding=rounding)
  return tx.update(g, tx.init(q), q)[0]


def _step(q, lr, rounding, seed=0, mode="eco"):
  """One eager eco_optax SGDM step on random gradients: ``(updates, new params)``."""
  updates = _sgdm_update(q, lr, rounding, seed, mode)
  return updates, eco.apply_updates(q, updates)


@pytest.mark.slow
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_apply_updates_copies_the_codes_the_optimizer_computed(rounding):
  """The new codes are the update's bits, bit for bit; the scale is the policy's next scale.

  Every format in one tree (``_params()`` per format, its matrices quantized), updated
  and applied by one executable each."""
  formats = dict(zip(IDS, FORMATS))
  q = eco.quantize_params({name: _params() for name in IDS},
                          lambda path, x: formats[path[0].key] if x.ndim >= 2 else None)
  update = jax.jit(_sgdm_update, static_argnames=("rounding", "mode"))   # lr, seed traced
  apply, next_scales = jax.jit(eco.apply_updates), jax.jit(qz._next_scales)
  for step, lr in enumerate([1.0, 1e-2, 1e-5]):          # large to vanishing steps
    updates = update(q, lr, rounding, step)
    new = apply(q, updates)
    for name, fmt in formats.items():
      mask = (1 << fmt.bits) - 1
      for path in (("head",), ("layer", "kernel")):
        u, old, got = updates[name], q[name], new[name]
        for key in path:
          u, old, got = u[key], old[key], got[key]
        where = (name, path)
        # 1 byte per parameter; 2 for the 16-bit format
        assert isinstance(u, eco.tree.NewCodes) and u.bits.shape == old.shape, where
        assert u.bits.dtype == (np.uint16 if fmt.bits == 16 else np.uint8), where
        assert u.flags.dtype == np.float32 and float(u.flags) == eco.tree.VALID, where
        assert not bool(jnp.any(u.bits & ~u.bits.dtype.type(mask))), where  # only the code
        np.testing.assert_array_equal(np.asarray(qz.values_to_bits(got.values, fmt)),
                                      np.asarray(u.bits.astype(qz.bits_dtype(fmt))),
                                      err_msg=str(where))
        assert got.values.dtype == fmt.dtype and got.scale.dtype == fmt.scale_dtype, where
        expected_scale, expected_tensor_scale = next_scales(old)
        for scale in (u.scale, got.scale):             # carried by the update, then copied
          assert scale.dtype == fmt.scale_dtype, where
          np.testing.assert_array_equal(np.asarray(scale.astype(jnp.float32)),
                                        np.asarray(expected_scale.astype(jnp.float32)),
                                        err_msg=str(where))
        if fmt.has_tensor_scale:
          assert (float(got.tensor_scale) == float(u.tensor_scale)
                  == float(expected_tensor_scale)), where
        else:
          assert got.tensor_scale is None and u.tensor_scale is None, where
        np.testing.assert_array_equal(np.asarray(got.effective_scale),
                                      np.asarray(qz.next_scale(old)), err_msg=str(where))
        if step == 0:                                         # the large step moved codes
          assert not np.array_equal(np.asarray(qz.values_to_bits(got.values, fmt)),
                                    np.asarray(qz.values_to_bits(old.values, fmt))), where
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


def test_apply_updates_on_plain_and_lossless_leaves_is_optax():
  policy = lambda path, x: (eco.lossless() if "head" in jax.tree_util.keystr(path)
                            else eco.int8() if x.ndim >= 2 else None)
  q = eco.quantize_params(_params(), policy)
  updates, out = _step(q, 0.1, "nearest")
  for leaf in ("scale", "head"):                   # plain, lossless: FP32 differences
    assert updates[leaf].dtype == jnp.float32
  assert updates["layer"]["kernel"].bits.dtype == jnp.uint8
  expected = optax.apply_updates(_params(), {k: updates[k] for k in ("scale", "head")}
                                 | {"layer": {"bias": updates["layer"]["bias"],
                                              "kernel": jnp.zeros((32, 48))}})
  for path in (("scale",), ("layer", "bias")):
    a, b = out, expected
    for key in path:
      a, b = a[key], b[key]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert eco.is_quantized(out["head"]) and out["head"].values.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out["head"].dequantize()),
                                np.asarray(expected["head"]))


def test_optax_apply_updates_refuses_float8():
  """Why eco.apply_updates exists (paper notes): JAX won't promote float8 + float32."""
  q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
  with pytest.raises(jax.dtypes.TypePromotionError, match="no available implicit dtype"):
    optax.apply_updates(q["w"].values, jnp.ones((4, 4)))


def _would_move(name):
  """A leaf whose scale policy moves its scale at the next step, by format."""
  x = jnp.linspace(-1, 1, 256).reshape(16, 16)
  if name == "int8-sticky":             # codes saturated at 127: sticky grows the scale
    return qz.quantize_with_scale(x, jnp.asarray(1 / 127), eco.int8(
        "tensor", scale_policy="sticky", headroom=2.0))
  if name == "e4m3-dynamic":            # codes up to 4 of 448: dynamic shrinks the scale
    return qz.quantize_with_scale(x, jnp.asarray(0.25), eco.fp8_e4m3(
        "tensor", scale_policy="dynamic"))
  fmt = eco.fp4_e2m1("nvfp4")           # codes saturated at 6: the block scales grow
  return qz.quantize_with_scale(x, jnp.full(fmt.scale_shape(x.shape), 1 / 6), fmt)


@pytest.mark.parametrize("name", ["int8-sticky", "e4m3-dynamic", "nvfp4-sticky"])
def test_a_kept_update_keeps_weights_and_scale_even_when_the_policy_would_move(name):
  leaf = _would_move(name)
  assert not np.array_equal(np.asarray(qz.next_scale(leaf)),
                            np.asarray(leaf.effective_scale))          # the policy moves
  for apply in (eco.apply_updates, jax.jit(eco.apply_updates)):
    kept = eco.tree.NewCodes(jnp.zeros((16, 16), jnp.uint8),
                             jnp.asarray(eco.tree.KEEP, jnp.float32))
    out = apply({"w": leaf}, {"w": kept})["w"]
    np.testing.assert_array_equal(np.asarray(qz.values_to_bits(out.values, leaf.fmt)),
                                  np.asarray(qz.values_to_bits(leaf.values, leaf.fmt)))
    np.testing.assert_array_equal(np.asarray(out.scale.astype(jnp.float32)),
                                  np.asarray(leaf.scale.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(out.effective_scale),
                                  np.asarray(leaf.effective_scale))
  # The same codes marked VALID do move the scale: the flags, not the codes, kept it.
  valid = eco.tree.NewCodes(qz.values_to_bits(leaf.values, leaf.fmt).astype(jnp.uint8),
                            jnp.asarray(eco.tree.VALID, jnp.float32))
  moved = eco.apply_updates({"w": leaf}, {"w": valid})["w"]
  np.testing.assert_array_equal(np.asarray(moved.effective_scale),
                                np.asarray(qz.next_scale(leaf)))


def test_new_codes_with_a_scale_of_another_shape_or_dtype_are_refused():
  q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())   # row scales, f32[1, 4]
  bits = qz.values_to_bits(q["w"].values, q["w"].fmt)
  valid = jnp.asarray(eco.tree.VALID, jnp.float32)
  for scale, got in ((jnp.ones((4, 1)), r"float32\[4, 1\]"),
                     (jnp.ones((1, 4), jnp.bfloat16), r"bfloat16\[1, 4\]")):
    with pytest.raises(TypeError, match=r"\['w'\]: the update's scale is " + got +
                       r", but this fp8_e4m3 leaf stores float32\[1, 4\]"):
      eco.apply_updates(q, {"w": eco.tree.NewCodes(bits, valid, scale)})


def test_a_float_update_of_a_quantized_leaf_is_refused_at_trace_time():
  q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
  with pytest.raises(TypeError, match=r"\['w'\]: the update of this fp8_e4m3 leaf is "
                                      r"an array of float32.*optax.scale"):
    jax.jit(eco.apply_updates).lower(q, {"w": jnp.full((4, 4), 0.5)})   # tracing only
  with pytest.raises(TypeError, match=r"\['w'\]: the update of this fp8_e4m3 leaf is an array of int32"):
    eco.apply_updates(q, {"w": jnp.zeros((4, 4), jnp.int32)})


@pytest.mark.parametrize("fmt", [eco.int4(), eco.fp8_e4m3(), eco.fp4_e2m1("nvfp4")],
                         ids=["int4-tensor", "e4m3-channel", "nvfp4"])
def test_poison_gives_the_leaf_a_nan_scale_and_leaves_the_others(fmt):
  q = eco.quantize_params({"w": jnp.ones((16, 16)), "v": jnp.ones((16, 16))}, fmt)
  updates, clean = _step(q, 0.1, "nearest")
  poisoned = dict(updates, w=updates["w"]._replace(flags=jnp.float32(jnp.nan)))
  out = eco.apply_updates(q, poisoned)
  assert bool(jnp.all(jnp.isnan(out["w"].dequantize())))
  if fmt.has_tensor_scale:                       # NVFP4: the FP32 tensor scale is NaN
    assert bool(jnp.isnan(out["w"].tensor_scale))
  np.testing.assert_array_equal(np.asarray(qz.values_to_bits(out["w"].values, fmt)),
                                np.asarray(qz.values_to_bits(clean["w"].values, fmt)))
  np.testing.assert_array_equal(np.asarray(out["v"].dequantize()),
                                np.asarray(clean["v"].dequantize()))
  assert bool(jnp.all(jnp.isfinite(out["v"].dequantize())))


@pytest.mark.parametrize("policy", ["fixed", "sticky", "dynamic"])
def test_applying_a_step_allocates_nothing_the_size_of_the_weights_in_fp32(policy):
  n = 1024 * 1024
  q = eco.quantize_params({"w": jax.random.normal(jax.random.key(0), (1024, 1024))},
                          eco.fp8_e4m3(scale_policy=policy))
  updates, _ = _step(q, 0.1, "nearest")
  memory = jax.jit(eco.apply_updates, donate_argnums=0).lower(
      q, updates).compile().memory_analysis()
  assert memory.alias_size_in_bytes >= n          # the new codes go into the donated buffer
  if policy == "fixed":
    # The update is copied; the saturation check (a fixed scale cannot grow) reads the
    # codes once, one byte per code: nothing the size of the weights in FP32.
    assert memory.temp_size_in_bytes <= n + 65536, memory.temp_size_in_bytes
  else:
    # The new scale travels in the update beside the new codes: applying them reads
    # nothing and rounds nothing (an FP32 copy of the weights would be 4 MiB).
    assert memory.temp_size_in_bytes <= 4096, memory.temp_size_in_bytes


def test_apply_updates_jits():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  updates, b = _step(q, 0.1, "stochastic")
  a = jax.jit(eco.apply_updates)(q, updates)
  assert jax.tree.structure(a, is_leaf=eco.is_quantized) == jax.tree.structure(
      q, is_leaf=eco.is_quantized)
  chex.assert_trees_all_equal(a, b)           # values, shapes and dtypes


@pytest.mark.parametrize("has_aux,recompute", [(False, None), (True, None), (False, True)])
def test_grad_is_the_gradient_at_the_dequantized_weights(has_aux, recompute):
  q = eco.quantize_params(_params(), eco.int4())
  x = jax.random.normal(jax.random.key(3), (4, 32))

  def loss(p, x):
    y = jnp.tanh(x @ p["layer"]["kernel"] + p["layer"]["bias"]) * p["scale"]
    value = jnp.sum((y @ p["head"]) ** 2)
    return (value, {"y": y}) if has_aux else value

  (value, grads) = eco.value_and_grad(loss, has_aux=has_aux, recompute=recompute)(q, x)
  expected_value, expected = jax.value_and_grad(loss, has_aux=has_aux)(
      eco.dequantize_params(q), x)
  chex.assert_trees_all_close((value, grads), (expected_value, expected), rtol=1e-6, atol=1e-6)
  only = eco.grad(loss, has_aux=has_aux, recompute=recompute)(q, x)
  chex.assert_trees_all_equal(only, (grads, value[1]) if has_aux else grads)


# ---- bad input: each a clear error naming the leaf ----

def test_unsupported_dtype_names_the_leaf():
  with pytest.raises(TypeError, match=r"\['ids'\].*int32"):
    eco.quantize_params({"ids": jnp.ones((4, 4), jnp.int32)}, eco.fp8_e4m3())


def test_already_quantized_leaf_is_refused():
  q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.fp8_e4m3())
  with pytest.raises(TypeError, match=r"\['w'\].*already quantized"):
    eco.quantize_params(q, eco.fp8_e4m3())


def test_zero_size_leaf_stays_plain_by_default_and_is_refused_when_asked_for():
  q = eco.quantize_params({"empty": jnp.ones((0, 4)), "w": jnp.ones((4, 4))}, eco.fp8_e4m3())
  assert not eco.is_quantized(q["empty"]) and eco.is_quantized(q["w"])
  tx = eco.adamw(1e-2)
  updates, _ = tx.update({"empty": jnp.ones((0, 4)), "w": jnp.ones((4, 4))}, tx.init(q), q)
  assert eco.apply_updates(q, updates)["empty"].shape == (0, 4)
  with pytest.raises(ValueError, match=r"\['empty'\].*zero-size"):
    eco.quantize_params({"empty": jnp.ones((0, 4))}, lambda path, leaf: eco.fp8_e4m3())


def test_non_finite_params_name_the_leaf():
  with pytest.raises(ValueError, match=r"\['w'\].*non-finite"):
    eco.quantize_params({"w": jnp.ones((4, 4)).at[0, 0].set(jnp.nan)}, eco.int8())


def test_params_closed_over_by_a_traced_function_are_quantized_and_checked():
  """jax.eval_shape / jax.jit of a function that quantizes params it closes over (how a
  checkpoint template or a jitted create_train_state is built): the values are concrete."""
  params = {"w": jax.random.normal(jax.random.key(0), (32, 16))}
  eager = eco.quantize_params(params, eco.fp8_e4m3())
  jitted = jax.jit(lambda: eco.quantize_params(params, eco.fp8_e4m3()))()
  np.testing.assert_array_equal(np.asarray(jitted["w"].values), np.asarray(eager["w"].values))
  shapes = jax.eval_shape(lambda: eco.quantize_params(params, eco.fp8_e4m3()))
  assert shapes["w"].values.dtype == jnp.float8_e4m3fn
  bad = {"w": params["w"].at[0, 0].set(jnp.inf)}
  with pytest.raises(ValueError, match=r"\['w'\].*non-finite"):
    jax.jit(lambda: eco.quantize_params(bad, eco.fp8_e4m3()))()


def test_bad_policy_return_names_the_leaf():
  with pytest.raises(TypeError, match=r"\['w'\].*expected a QuantFormat"):
    eco.quantize_params({"w": jnp.ones((4, 4))}, lambda p, x: "fp8")


def test_block_size_error_names_the_leaf():
  with pytest.raises(ValueError, match=r"\['w'\].*block_size=4\. A policy callable\(path, "
                     r"leaf\) -> format \| None passed to quantize_params chooses per leaf"):
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
