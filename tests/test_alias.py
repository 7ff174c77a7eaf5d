"""Conformance: with the lossless format the ECO optimizers are the plain optimizers."""
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eco_optax as eco

from _helpers import ramp_problem


def _problem():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(k1, (16, 8)), "b": jnp.zeros(8)}
  x = jax.random.normal(k2, (64, 16))
  y = jax.random.normal(k3, (64, 8))

  def loss(p):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  return params, loss


def _train(params, loss, tx, steps, quantized):
  state = tx.init(params)

  @jax.jit
  def step(p, state):
    dense = eco.dequantize_params(p) if quantized else p
    updates, state = tx.update(jax.grad(loss)(dense), state, p)
    return (eco.apply_updates(p, updates) if quantized
            else optax.apply_updates(p, updates)), state

  for _ in range(steps):
    params, state = step(params, state)
  return eco.dequantize_params(params) if quantized else params


SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 100, 1e-3)


@pytest.mark.parametrize("mode", ["eco", "naive", "master_weights"])
def test_adamw_equals_optax_adamw_with_lossless_format(mode):
  params, loss = _problem()
  q = eco.quantize_params(params, eco.lossless())
  ours = _train(q, loss, eco.adamw(SCHEDULE, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, mode=mode), 100, True)
  ref = _train(params, loss, optax.adamw(SCHEDULE, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1), 100, False)
  chex.assert_trees_all_close(ours, ref, atol=1e-6, rtol=0)


def test_adam_equals_optax_adam_with_lossless_format():
  params, loss = _problem()
  q = eco.quantize_params(params, eco.lossless())
  ours = _train(q, loss, eco.adam(SCHEDULE, rounding="stochastic"), 100, True)
  ref = _train(params, loss, optax.adam(SCHEDULE), 100, False)
  chex.assert_trees_all_close(ours, ref, atol=1e-6, rtol=0)


def test_weight_decay_mask_matches_optax():
  params, loss = _problem()
  mask = {"w": True, "b": False}
  q = eco.quantize_params(params, eco.lossless())
  ours = _train(q, loss, eco.adamw(1e-2, weight_decay=0.5, mask=mask), 30, True)
  ref = _train(params, loss, optax.adamw(1e-2, weight_decay=0.5, mask=mask), 30, False)
  chex.assert_trees_all_close(ours, ref, atol=1e-6, rtol=0)


def test_sgdm_equals_reference_ema_momentum_sgd():
  params, loss = _problem()
  lr, beta, wd = 0.05, 0.9, 0.01
  q = eco.quantize_params(params, eco.lossless())
  ours = _train(q, loss, eco.sgdm(lr, beta, weight_decay=wd), 100, True)

  ref, m = params, jax.tree.map(jnp.zeros_like, params)
  for _ in range(100):
    g = jax.grad(loss)(ref)
    m = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, m, g)
    ref = jax.tree.map(lambda w, m: w - lr * (m + wd * w), ref, m)
  chex.assert_trees_all_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,theirs,shared", [
    ("adam", optax.adam, "b1 b2 eps eps_root mu_dtype"),
    ("adamw", optax.adamw, "b1 b2 eps eps_root mu_dtype weight_decay mask"),
    ("lion", optax.lion, "b1 b2 mu_dtype weight_decay mask"),
    ("sgdm", optax.sgd, "momentum"),
    ("muon", optax.contrib.muon, "ns_coeffs ns_steps beta eps weight_decay mu_dtype nesterov "
                                 "preconditioning adam_b1 adam_b2 adam_eps_root "
                                 "adam_weight_decay consistent_rms"),
])
def test_arguments_carry_optaxs_names(name, theirs, shared):
  """One naming scheme: optax's names, and the decay mask is ``mask`` in every optimizer
  that decays (optax.contrib.muon calls it ``weight_decay_mask``)."""
  ours = inspect.signature(getattr(eco, name)).parameters
  for arg in ["learning_rate", *shared.split()]:
    assert arg in ours and arg in inspect.signature(theirs).parameters, arg
  if "weight_decay" in ours:
    assert "mask" in ours and "weight_decay_mask" not in ours


@pytest.mark.parametrize("make", [eco.sgdm, eco.adamw, eco.lion], ids=["sgdm", "adamw", "lion"])
@pytest.mark.parametrize("mode,expected", [("eco", "stochastic"), ("eco_memory_free", "stochastic"),
                                           ("naive", "nearest"), ("master_weights", "nearest"),
                                           ("eco_exact", "nearest")])
def test_rounding_defaults_to_stochastic_in_eco_mode_only(make, mode, expected):
  q, g = ramp_problem(eco.int8())

  def new_codes(**kw):
    tx = make(0.05, mode=mode, **kw)
    return eco.apply_updates(q, tx.update(g, tx.init(q), q)[0])["w"].values

  other = {"stochastic": "nearest", "nearest": "stochastic"}[expected]
  np.testing.assert_array_equal(new_codes(), new_codes(rounding=expected))
  assert not np.array_equal(new_codes(), new_codes(rounding=other))


@pytest.mark.parametrize("make", [eco.sgdm, eco.adamw, eco.lion, eco.muon],
                         ids=["sgdm", "adamw", "lion", "muon"])
def test_eco_mode_takes_the_exact_rule_for_round_to_nearest_with_an_fp32_first_moment(make):
  """mode="eco": the memory-free rule with stochastic rounding or a narrow mu (no room for
  the error), the exact rule with round-to-nearest; each the same as its explicit mode."""
  q, g = ramp_problem(eco.int8())

  def run(**kw):
    tx = make(0.05, **kw)
    updates, state = tx.update(g, tx.init(q), q)
    return eco.apply_updates(q, updates)["w"].values, state

  for kw, rule in [({}, "eco_memory_free"), (dict(rounding="nearest"), "eco_exact"),
                   (dict(rounding="nearest", mu_dtype=jnp.bfloat16), "eco_memory_free")]:
    codes, state = run(**kw)
    explicit_codes, explicit = run(**kw, mode=rule)
    np.testing.assert_array_equal(codes, explicit_codes)
    np.testing.assert_array_equal(state.moments.mu["w"], explicit.moments.mu["w"])
    assert (state.error_bits is not None) == (rule == "eco_exact")
    assert (state.previous_eta is not None) == (rule == "eco_memory_free")
