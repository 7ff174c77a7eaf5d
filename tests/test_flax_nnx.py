"""Flax NNX integration: quantized models trained with eco_optax.nnx."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import eco_optax as eco
from eco_optax import nnx as eco_nnx


class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.norm = nnx.BatchNorm(32, rngs=rngs)
    self.down = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.relu(self.norm(self.up(x))))


X = jax.random.normal(jax.random.key(1), (64, 16))
Y = jnp.sin(X[:, :4])


def mse(model):
  return jnp.mean((model(X) - Y) ** 2)


def make_tx():
  return optax.chain(optax.clip_by_global_norm(1.0),
                     eco.adamw(3e-2, rounding="stochastic", seed=3))


@nnx.jit
def nnx_step(model, optimizer):
  loss, grads = eco_nnx.value_and_grad(mse)(model)
  optimizer.update(model, grads)
  return loss


def test_quantize_model_stores_only_codes_and_scales():
  model = MLP(nnx.Rngs(0))
  eco_nnx.quantize_model(model, eco.fp8_e4m3())
  kernel = model.up.kernel.get_value()
  assert eco.is_quantized(kernel) and kernel.values.dtype == jnp.float8_e4m3fn
  assert model.up.bias.get_value().dtype == jnp.float32
  dense = nnx.to_pure_dict(nnx.state(eco_nnx.dequantized(model), nnx.Param))
  np.testing.assert_array_equal(dense["up"]["kernel"], kernel.dequantize())


class Block(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(32, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(4, 32, decode=False, rngs=rngs)
    self.mlp = nnx.Linear(32, 32, rngs=rngs)


def test_quantizing_the_split_state_chooses_the_leaves_quantize_model_chooses():
  """``eco.quantize_params`` on ``nnx.split(model, nnx.Param)``'s State (paths end in
  ``.value``) keeps stacked biases and norm gains in FP32 and cuts attention kernels
  along their input features, as ``quantize_model`` does."""

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(rngs):
    return Block(rngs)

  stacked = lambda: make(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(stacked(), nnx.Param, ...)
  from_state = nnx.merge(graphdef, eco.quantize_params(params, eco.fp8_e4m3()), rest)
  in_place = stacked()
  eco_nnx.quantize_model(in_place, eco.fp8_e4m3())
  formats = lambda model: jax.tree.map(
      lambda x: (x.fmt, x.scale.shape) if eco.is_quantized(x) else x.dtype,
      nnx.to_pure_dict(nnx.state(model, nnx.Param)), is_leaf=eco.is_quantized)
  assert formats(from_state) == formats(in_place)
  assert not eco.is_quantized(from_state.norm.scale.get_value())
  assert not eco.is_quantized(from_state.mlp.bias.get_value())
  assert from_state.attention.query.kernel.get_value().fmt.axis == -3


def test_nnx_optimizer_matches_functional_eco_bit_for_bit():
  """NNX path == quantize_params + tx.update + apply_updates on the split dict."""
  model = MLP(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  q = eco.quantize_params(nnx.to_pure_dict(params), eco.fp8_e4m3())
  rest = nnx.to_pure_dict(rest)
  tx = make_tx()
  state = tx.init(q)

  @jax.jit
  def functional_step(q, state, rest):
    def loss_fn(p, rest):
      m = nnx.merge(graphdef, p, rest)
      return mse(m), nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))
    grads, rest = jax.grad(loss_fn, has_aux=True)(eco.dequantize_params(q), rest)
    updates, state = tx.update(grads, state, q)
    return eco.apply_updates(q, updates), state, rest

  eco_nnx.quantize_model(model, eco.fp8_e4m3())
  optimizer = eco_nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  losses = []
  for _ in range(8):
    q, state, rest = functional_step(q, state, rest)
    losses.append(float(nnx_step(model, optimizer)))

  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(q)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  # The BatchNorm statistics the loss updated were written back to the model.
  np.testing.assert_array_equal(model.norm.mean.get_value(),
                                rest["norm"]["mean"])
  assert int(optimizer.step.get_value()) == 8
  assert losses[-1] < 0.7 * losses[0]


def test_grad_with_aux_and_plain_params():
  model = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
  eco_nnx.quantize_model(model, eco.int8())
  grads, aux = eco_nnx.grad(lambda m: (jnp.sum(m(X)), 7), has_aux=True)(model)
  assert aux == 7
  assert grads["kernel"].get_value().dtype == jnp.float32
  assert grads["kernel"].get_value().shape == (16, 4)


def test_recomputing_the_weights_changes_neither_gradients_nor_written_back_state():
  results = []
  for recompute in (False, True):
    model = MLP(nnx.Rngs(0))
    eco_nnx.quantize_model(model, eco.fp8_e4m3())
    loss, grads = nnx.jit(
        lambda m, recompute=recompute: eco_nnx.value_and_grad(mse, recompute=recompute)(m))(model)
    results.append((loss, nnx.to_pure_dict(grads), model.norm.mean.get_value()))
  (loss, grads, mean), (loss_rc, grads_rc, mean_rc) = results
  assert float(loss) == float(loss_rc)
  jax.tree.map(np.testing.assert_array_equal, grads, grads_rc)
  np.testing.assert_array_equal(mean, mean_rc)
  assert np.any(mean != 0)          # the loss's batch statistics were written back


def test_training_a_subset_keeps_the_other_quantized_weights_stored_as_they_are():
  """Fine-tuning one layer: the frozen quantized layer enters the loss dequantized."""
  model = MLP(nnx.Rngs(0))
  eco_nnx.quantize_model(model, eco.fp8_e4m3())
  frozen = model.up.kernel.get_value()
  down = nnx.All(nnx.Param, nnx.PathContains("down"))
  optimizer = eco_nnx.Optimizer(model, eco.adamw(3e-2), wrt=down)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = eco_nnx.value_and_grad(mse, wrt=down)(model)
    optimizer.update(model, grads)
    return loss

  before = model.down.kernel.get_value().dequantize()
  losses = [float(step(model, optimizer)) for _ in range(5)]
  kept = model.up.kernel.get_value()
  assert eco.is_quantized(kept) and kept.values.dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(np.asarray(kept.values, np.float32),
                                np.asarray(frozen.values, np.float32))
  np.testing.assert_array_equal(kept.scale, frozen.scale)
  trained = model.down.kernel.get_value()
  assert eco.is_quantized(trained) and np.any(trained.dequantize() != before)
  assert losses[-1] < losses[0]


def test_graph_nodes_among_the_arguments_are_written_back_as_nnx_value_and_grad_does():
  """An ``nnx.Rngs`` given to the loss (positionally, by keyword, or shared with the
  model) advances as under ``nnx.value_and_grad``, and the gradients are those of the
  dequantized model with the same random numbers."""
  drop = nnx.Dropout(0.5)

  def loss(m, rngs, *, extra=None):
    y = drop(m(X), rngs=rngs)
    return jnp.mean(y ** 2) + (jnp.mean(drop(y, rngs=extra) ** 2) if extra is not None else 0)

  model = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
  eco_nnx.quantize_model(model, eco.fp8_e4m3())
  reference, reference_rngs = eco_nnx.dequantized(model), nnx.Rngs(dropout=1)
  want_loss, want = nnx.value_and_grad(lambda m, r, e: loss(m, r, extra=e))(
      reference, reference_rngs, nnx.Rngs(dropout=2))
  rngs, extra = nnx.Rngs(dropout=1), nnx.Rngs(dropout=2)
  got_loss, got = nnx.jit(lambda m, r, e: eco_nnx.value_and_grad(loss)(m, r, extra=e))(
      model, rngs, extra)
  assert float(got_loss) == float(want_loss)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(got), nnx.to_pure_dict(want))
  assert int(rngs.dropout.count.get_value()) == int(reference_rngs.dropout.count.get_value()) == 1
  assert int(extra.dropout.count.get_value()) == 1

  class Noisy(nnx.Module):       # the same Rngs in the model and given to the loss
    def __init__(self, rngs):
      self.linear, self.rngs = nnx.Linear(16, 4, rngs=rngs), rngs

  noisy = Noisy(nnx.Rngs(0, dropout=1))
  eco_nnx.quantize_model(noisy, eco.fp8_e4m3())
  eco_nnx.value_and_grad(lambda m, r: jnp.mean(drop(m.linear(X), rngs=r) ** 2)
                         + jnp.mean(drop(m.linear(X), rngs=m.rngs) ** 2))(noisy, noisy.rngs)
  assert int(noisy.rngs.dropout.count.get_value()) == 2      # one variable, drawn twice


def test_a_bfloat16_model_sees_its_quantized_weights_in_bfloat16():
  """``dtype=jnp.bfloat16``: the scanned layers of a model built with bfloat16 params
  carry one dtype (with FP32 weights the scan's carry would change dtype), and the
  gradients come back in bfloat16."""

  class Stack(nnx.Module):
    def __init__(self, rngs):
      make = nnx.vmap(lambda r: nnx.Linear(16, 16, param_dtype=jnp.bfloat16, rngs=r))
      self.layers = make(rngs.split(3))

    def __call__(self, x):
      step = nnx.scan(lambda x, layer: x + jnp.tanh(layer(x)), in_axes=(nnx.Carry, 0),
                      out_axes=nnx.Carry)
      return step(x, self.layers)

  model = Stack(nnx.Rngs(0))
  eco_nnx.quantize_model(model, eco.fp8_e4m3())
  optimizer = eco_nnx.Optimizer(model, eco.adamw(1e-2), wrt=nnx.Param)
  x = X.astype(jnp.bfloat16)
  loss = lambda m: jnp.mean((m(x).astype(jnp.float32) - 1) ** 2)

  @nnx.jit
  def step(model, optimizer):
    value, grads = eco_nnx.value_and_grad(loss, dtype=jnp.bfloat16)(model)
    optimizer.update(model, grads)
    return value, grads

  value, grads = step(model, optimizer)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}
  want = loss(eco_nnx.dequantized(model, jnp.bfloat16))
  losses = [float(step(model, optimizer)[0]) for _ in range(20)]
  assert losses[0] == float(want) and losses[-1] < 0.8 * float(value)
  assert model.layers.kernel.get_value().values.dtype == jnp.float8_e4m3fn
  with pytest.raises(TypeError, match="carry"):    # the FP32 default does not fit this model
    eco_nnx.value_and_grad(loss)(model)


def test_calling_a_quantized_model_says_how_to_dequantize_it():
  model = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
  eco_nnx.quantize_model(model, eco.fp8_e4m3())
  with pytest.raises(TypeError, match=r"QuantizedArray \(fp8_e4m3, shape \(16, 4\)\).*"
                     r"eco_optax.nnx.dequantized\(model\) for Flax NNX"):
    model(X)
  assert eco_nnx.dequantized(model)(X).shape == (64, 4)


def test_plain_optax_still_works_without_quantized_leaves():
  model = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
  optimizer = eco_nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  before = mse(model)
  optimizer.update(model, nnx.grad(mse)(model))
  assert mse(model) < before



class Sharded(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.up = nnx.Linear(16, 64, kernel_init=nnx.with_partitioning(init, (None, "model")),
                         rngs=rngs)

  def __call__(self, x):
    return jnp.sum(jax.nn.relu(self.up(x)) ** 2, axis=-1)


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_the_optimizer_state_takes_the_weights_partition_specs(axis_type):
  """Flax's sharding recipe: build the model and optimizer in nnx.jit, read
  nnx.get_partition_spec of their state, constrain it. Each moment of a quantized weight
  takes the weight's annotation (as an optax optimizer's state does), and the train step
  runs, the moments staying sharded."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  with jax.set_mesh(mesh):
    @nnx.jit
    def create():
      model = Sharded(nnx.Rngs(0))
      eco_nnx.quantize_model(model, eco.fp8_e4m3())
      optimizer = eco_nnx.Optimizer(model, eco.adamw(1e-3), wrt=nnx.Param)
      state = nnx.state((model, optimizer))
      nnx.update((model, optimizer),
                 jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
      return model, optimizer

    model, optimizer = create()
    kernel_moments = lambda: [x for x in jax.tree.leaves(nnx.state(optimizer))
                              if getattr(x, "shape", ()) == (16, 64)]
    created = kernel_moments()

    @nnx.jit
    def step(model, optimizer, x):
      loss, grads = eco_nnx.value_and_grad(lambda m: jnp.mean(m(x)))(model)
      optimizer.update(model, grads)
      return loss

    for _ in range(2):
      step(model, optimizer, jnp.ones((8, 16)))
  assert len(created) == len(kernel_moments()) == 2      # mu and nu of the kernel
  for x in created + kernel_moments() + [model.up.kernel.get_value().values]:
    assert x.sharding.spec == jax.sharding.PartitionSpec(None, "model")
