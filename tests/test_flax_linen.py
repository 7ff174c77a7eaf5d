"""Flax Linen: train a Linen model whose kernels are stored in FP8.

The pattern: ``variables = model.init(...)``, quantize ``variables["params"]``,
and call ``model.apply({"params": eco.dequantize_params(q), ...}, x)`` inside
the jitted loss. Mutable collections (here LayerNorm has none, BatchNorm's
``batch_stats`` would) stay ordinary arrays next to the quantized params.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eco_optax as eco
from _helpers import train_steps


class MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.hidden)(x))
    x = nn.LayerNorm()(x)
    return nn.Dense(8)(x)


MODEL = MLP()


def batch(step):
  x = jax.random.normal(jax.random.fold_in(jax.random.key(1), step), (64, 16))
  return x, jnp.sin(2.0 * x[:, :8]) + x[:, 8:]


def train(steps=40):
  """Losses and final quantized params of ``steps`` ECO-AdamW (SR) steps."""
  variables = MODEL.init(jax.random.key(0), jnp.zeros((1, 16)))
  q = eco.quantize_params(variables["params"], eco.fp8_e4m3())
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   eco.adamw(1e-2, rounding="stochastic"))

  def loss_fn(params, x, y):
    return jnp.mean((MODEL.apply({"params": params}, x) - y) ** 2)

  return train_steps(tx, q, loss_fn, batch, steps)


def test_linen_training_with_fp8_kernels():
  losses, q, _ = train()
  kernel = q["Dense_0"]["kernel"]
  assert eco.is_quantized(kernel) and kernel.values.dtype == jnp.float8_e4m3fn
  assert not eco.is_quantized(q["Dense_0"]["bias"])
  assert not eco.is_quantized(q["LayerNorm_0"]["scale"])
  assert losses[-1] < 0.5 * losses[0]


def test_applying_a_model_to_quantized_params_says_how_to_dequantize_them():
  model = nn.Dense(4)
  params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  q = eco.quantize_params(params, eco.fp8_e4m3())
  with pytest.raises(TypeError, match=r"QuantizedArray \(fp8_e4m3, shape \(8, 4\)\).*"
                     r"eco_optax.dequantize_params\(params\) for Flax Linen's apply"):
    model.apply({"params": q}, jnp.ones((1, 8)))
  out = model.apply({"params": eco.dequantize_params(q)}, jnp.ones((1, 8)))
  assert out.shape == (1, 4)


def test_a_bfloat16_model_scanned_over_its_layers_trains_with_bfloat16_weights():
  """``eco.value_and_grad(..., dtype=jnp.bfloat16)``: ``nn.scan`` over layers built with
  ``param_dtype=jnp.bfloat16`` carries one dtype, the gradients are bfloat16, and they
  are ``jax.value_and_grad``'s at the dequantized bfloat16 params."""

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return x + jnp.tanh(nn.Dense(32, param_dtype=jnp.bfloat16)(x)), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      return scan()(x, None)[0]

  model, x = Stack(), jax.random.normal(jax.random.key(1), (8, 32), jnp.bfloat16)
  q = eco.quantize_params(model.init(jax.random.key(0), x)["params"], eco.fp8_e4m3())
  loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x).astype(jnp.float32) - 1) ** 2)
  value_and_grad = jax.jit(eco.value_and_grad(loss_fn, dtype=jnp.bfloat16))
  loss, grads = value_and_grad(q)
  want_loss, want = jax.jit(jax.value_and_grad(loss_fn))(eco.dequantize_params(q, jnp.bfloat16))
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}
  # Equal up to bfloat16 rounding: the two programs fuse their bfloat16 operations apart.
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2**-7, atol=1e-6), grads, want)
  tx = eco.adamw(1e-2)
  state = tx.init(q)
  for _ in range(20):
    updates, state = tx.update(value_and_grad(q)[1], state, q)
    q = eco.apply_updates(q, updates)
  assert float(value_and_grad(q)[0]) < 0.8 * float(loss)
  assert q["ScanBlock_0"]["Dense_0"]["kernel"].values.dtype == jnp.float8_e4m3fn
