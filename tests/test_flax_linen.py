"""Flax Linen: train a Linen model whose kernels are stored in FP8.

The pattern: ``variables = model.init(...)``, quantize ``variables["params"]``,
and call ``model.apply({"params": eco.dequantize_params(q), ...}, x)`` inside
the jitted loss. Mutable collections (here LayerNorm has none, BatchNorm's
``batch_stats`` would) stay ordinary arrays next to the quantized params.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
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
