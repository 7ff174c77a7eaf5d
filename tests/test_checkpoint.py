"""Orbax checkpoints: bit-identical resume of ECO-SR training in a fresh process.

Run as a script (``python tests/test_checkpoint.py CKPT STEPS OUT``) it restores
CKPT, trains STEPS more and writes the weights to OUT: the "fresh process" half
of :func:`test_resume_in_fresh_process_is_bit_identical`.
"""

import os
import subprocess
import sys

import jax
import pytest
import jax.numpy as jnp
import numpy as np
import optax

import eco_optax as eco
from eco_optax import checkpoint

from _helpers import leaf_bytes

N, M = 4, 3


def policy(path, leaf):
  name = jax.tree_util.keystr(path)
  if "w2" in name:
    return eco.int4()
  return eco.fp8_e4m3() if leaf.ndim == 2 else None


def fresh():
  """Initial quantized params and optimizer state (also the restore template)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w1": jax.random.normal(k1, (16, 32)) * 0.3, "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 16)) * 0.3}
  q = eco.quantize_params(params, policy)
  return q, TX.init(q)


TX = optax.chain(optax.clip_by_global_norm(1.0),
                 eco.adamw(1e-2, rounding="stochastic", seed=7))


def loss_fn(p, x):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  return jnp.mean((h @ p["w2"] - jnp.cos(x)) ** 2)


@jax.jit
def step(q, state, i):
  x = jax.random.normal(jax.random.fold_in(jax.random.key(1), i), (32, 16))
  grads = jax.grad(loss_fn)(eco.dequantize_params(q), x)
  updates, state = TX.update(grads, state, q)
  return eco.apply_updates(q, updates), state


def train(q, state, start, steps):
  for i in range(start, start + steps):
    q, state = step(q, state, i)
  return q, state


def test_resume_in_fresh_process_is_bit_identical(tmp_path):
  q, state = train(*fresh(), 0, N)
  ckpt = tmp_path / "ckpt"
  checkpoint.save(ckpt, {"params": q, "opt_state": state})

  out = tmp_path / "resumed.npz"
  subprocess.run([sys.executable, __file__, str(ckpt), str(M), str(out)],
                 check=True, env=os.environ.copy(), timeout=300)

  q_ref, state_ref = train(q, state, N, M)
  resumed = np.load(out)
  expected = leaf_bytes((q_ref, state_ref))
  assert len(resumed.files) == len(expected)
  for i, ref in enumerate(expected):
    assert resumed[f"leaf{i}"].tobytes() == ref, f"leaf {i} differs"
  assert q_ref["w1"].values.dtype == jnp.float8_e4m3fn
  assert q_ref["w2"].values.dtype == jnp.int4


def test_restore_refuses_another_format(tmp_path):
  q, state = fresh()
  checkpoint.save(tmp_path / "c", {"params": q, "opt_state": state})
  other = eco.quantize_params(eco.dequantize_params(q), eco.int4("channel"))
  try:
    checkpoint.restore(tmp_path / "c", {"params": other, "opt_state": TX.init(other)})
  except ValueError as err:
    assert "params.w1.values" in str(err) and "float8_e4m3fn" in str(err)
  else:
    raise AssertionError("restoring FP8 codes into an INT4 template must fail")


def test_restore_into_abstract_template(tmp_path):
  q, state = train(*fresh(), 0, 2)
  checkpoint.save(tmp_path / "c", (q, state))
  abstract = jax.eval_shape(fresh)
  got = checkpoint.restore(tmp_path / "c", abstract)
  assert leaf_bytes(got) == leaf_bytes((q, state))


@pytest.mark.slow
def test_fp4_weights_and_scales_round_trip_bit_identical(tmp_path):
  """float4_e2m1fn codes, float8_e8m0fnu / float8_e4m3fn block scales and NVFP4's
  FP32 tensor scale are stored natively by orbax and come back bit for bit."""
  k1, k2 = jax.random.split(jax.random.key(3))
  params = {"mx": jax.random.normal(k1, (64, 16)), "nv": jax.random.normal(k2, (32, 48))}
  q = eco.quantize_params(params, lambda path, leaf: eco.fp4_e2m1(
      "mxfp4" if "mx" in jax.tree_util.keystr(path) else "nvfp4"))
  tx = eco.adamw(1e-2, rounding="stochastic", mode="eco_exact")

  @jax.jit      # one executable, not an eager compile per operation
  def step(q, state):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, q)
    return eco.apply_updates(q, updates), state

  q, state = step(q, tx.init(q))
  checkpoint.save(tmp_path / "fp4", {"params": q, "opt_state": state})
  got = checkpoint.restore(tmp_path / "fp4", {"params": q, "opt_state": state})
  assert leaf_bytes(got) == leaf_bytes({"params": q, "opt_state": state})
  assert got["params"]["mx"].values.dtype == jnp.float4_e2m1fn
  assert got["params"]["mx"].scale.dtype == jnp.float8_e8m0fnu
  assert got["params"]["nv"].scale.dtype == jnp.float8_e4m3fn
  assert got["params"]["nv"].tensor_scale == q["nv"].tensor_scale
  # And into an abstract template; another FP4 style is refused by name.
  assert leaf_bytes(checkpoint.restore(tmp_path / "fp4", jax.eval_shape(lambda: got))) \
      == leaf_bytes(got)
  other = eco.quantize_params(params, eco.fp4_e2m1("mxfp4", block_size=16))
  try:
    checkpoint.restore(tmp_path / "fp4", {"params": other, "opt_state": tx.init(other)})
  except ValueError as err:   # NVFP4's tensor scale has no place in the MXFP4 template
    assert "params.nv.tensor_scale" in str(err), err
  else:
    raise AssertionError("restoring NVFP4 scales into an MXFP4 template must fail")


def resume_main(ckpt, steps, out):
  q, state = fresh()
  restored = checkpoint.restore(ckpt, like={"params": q, "opt_state": state})
  q, state = restored["params"], restored["opt_state"]
  q, state = train(q, state, N, steps)
  np.savez(out, **{f"leaf{i}": np.frombuffer(b, np.uint8)
                   for i, b in enumerate(leaf_bytes((q, state)))})


if __name__ == "__main__":
  resume_main(sys.argv[1], int(sys.argv[2]), sys.argv[3])


def test_restore_into_a_fresh_train_state_whose_step_is_a_python_int(tmp_path):
  """TrainState.create's step is a Python 0; the saved one, a jitted step's int32 array."""
  params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
  make = lambda: eco.TrainState.create(apply_fn=None, params=eco.quantize_params(
      params, eco.fp8_e4m3()), tx=eco.adamw(1e-3))
  grads = jax.tree.map(jnp.ones_like, params)
  trained = jax.jit(lambda s: s.apply_gradients(grads=grads))(make())
  checkpoint.save(tmp_path / "ts", trained)
  restored = checkpoint.restore(tmp_path / "ts", like=make())
  assert int(restored.step) == 1
  np.testing.assert_array_equal(np.asarray(restored.params["w"].dequantize()),
                                np.asarray(trained.params["w"].dequantize()))


# flax.serialization (msgpack): quantized params, optimizer states, Linen's TrainState.

@pytest.mark.parametrize("fmt", [eco.fp8_e4m3(), eco.fp8_e5m2("block"), eco.int8(), eco.int4(),
                                 eco.fp4_e2m1("mxfp4"), eco.fp4_e2m1("nvfp4")],
                         ids=lambda f: f"{f.name}-{f.scaling}")
def test_flax_msgpack_round_trips_every_format_bit_for_bit(fmt):
  from flax import serialization
  params = {"w": jax.random.normal(jax.random.key(3), (64, 32)), "b": jnp.arange(32.0)}
  q = eco.quantize_params(params, fmt)
  back = serialization.from_bytes(q, serialization.to_bytes(q))
  assert jax.tree.structure(back) == jax.tree.structure(q)
  assert back["w"].fmt == fmt and back["w"].values.dtype == fmt.dtype
  assert leaf_bytes(back) == leaf_bytes(q)


def test_training_resumed_from_flax_msgpack_is_bit_identical():
  from flax import serialization
  q, state = train(*fresh(), 0, N)
  data = serialization.to_bytes({"params": q, "opt_state": state})
  template = dict(zip(("params", "opt_state"), fresh()))
  back = serialization.from_bytes(template, data)
  assert leaf_bytes(train(back["params"], back["opt_state"], N, M)) == leaf_bytes(
      train(q, state, N, M))


def test_flax_msgpack_of_a_linen_train_state():
  import flax.linen as nn
  from flax import serialization
  model = nn.Dense(8)
  params = eco.quantize_params(model.init(jax.random.key(0), jnp.ones((1, 4)))["params"],
                               eco.fp8_e4m3())
  state = eco.TrainState.create(apply_fn=model.apply, params=params,
                                tx=eco.adamw(1e-2, rounding="stochastic"))
  loss = lambda p, x: jnp.mean(state.apply_fn({"params": p}, x) ** 2)
  state = state.apply_gradients(grads=eco.grad(loss)(state.params, jnp.ones((2, 4))))
  back = serialization.from_bytes(state.replace(step=0), serialization.to_bytes(state))
  assert int(back.step) == 1
  assert leaf_bytes((back.params, back.opt_state)) == leaf_bytes((state.params, state.opt_state))


def test_flax_msgpack_refuses_a_template_of_another_format():
  from flax import serialization
  q, _ = fresh()
  data = serialization.to_bytes(q)
  other = eco.quantize_params(eco.dequantize_params(q), eco.fp8_e4m3())   # w2 not INT4
  with pytest.raises(ValueError, match=r"w2/values: the template \(a fp8_e4m3 QuantizedArray\) expects "
                                       r"float8_e4m3fn\[32, 16\], the data holds int4\[32, 16\]"):
    serialization.from_bytes(other, data)
  plain = eco.dequantize_params(q)
  with pytest.raises(ValueError, match=r"w1: a fp8_e4m3 QuantizedArray is stored as "
                                       r"\['values', 'scale'\], got ndarray"):
    serialization.from_bytes(q, serialization.to_bytes(plain))


@pytest.mark.parametrize("kwargs", [dict(mode="eco_exact", nu_dtype=jnp.bfloat16),
                                    dict(mu_dtype=eco.moments.blockwise_8bit(),
                                         nu_dtype=eco.moments.blockwise_8bit())],
                         ids=["exact-rule", "8bit-moments"])
def test_flax_msgpack_round_trips_kept_errors_and_8bit_moments(kwargs):
  from flax import serialization
  q, _ = fresh()
  tx = eco.adamw(1e-2, rounding="stochastic", **kwargs)
  state = tx.init(q)
  grads = jax.tree.map(jnp.ones_like, eco.dequantize_params(q))
  _, state = tx.update(grads, state, q)
  back = serialization.from_bytes(tx.init(q), serialization.to_bytes(state))
  assert jax.tree.structure(back) == jax.tree.structure(state)
  assert leaf_bytes(back) == leaf_bytes(state)
