"""ECO for Muon and Lion: optax conformance, Muon's injection, ECO against naive RTN."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eco_optax as eco
from eco_optax import quantize as qz
from eco_optax import rules

SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 2e-2, 5, 30, 2e-3)


def _problem():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  params = {"w": jax.random.normal(k1, (16, 8)) * 0.3, "v": jax.random.normal(k4, (8, 24)) * 0.3,
            "b": jnp.zeros(24)}
  x = jax.random.normal(k2, (64, 16))
  y = jax.random.normal(k3, (64, 24))

  def loss(p):
    return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] + p["b"] - y) ** 2)

  return params, loss


def _train(params, loss, tx, steps, quantized):
  state = tx.init(params)

  def body(carry, _):
    p, state = carry
    dense = eco.dequantize_params(p) if quantized else p
    updates, state = tx.update(jax.grad(loss)(dense), state, p)
    p = eco.apply_updates(p, updates) if quantized else optax.apply_updates(p, updates)
    return (p, state), loss(dense)

  (params, _), losses = jax.jit(lambda c: jax.lax.scan(body, c, None, steps))((params, state))
  return (eco.dequantize_params(params) if quantized else params), losses


@pytest.mark.parametrize("mode,nesterov", [("eco", True), ("naive", False),
                                           ("master_weights", True)])
def test_muon_equals_optax_muon_with_lossless_format(mode, nesterov):
  params, loss = _problem()
  kw = dict(weight_decay=0.1, adam_weight_decay=0.05, nesterov=nesterov)
  ours, _ = _train(eco.quantize_params(params, eco.lossless()), loss,
                   eco.muon(SCHEDULE, mode=mode, **kw), 30, True)
  ref, _ = _train(params, loss, optax.contrib.muon(SCHEDULE, **kw), 30, False)
  chex.assert_trees_all_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [
    dict(consistent_rms=0.2, weight_decay=0.1, mask={"w": True, "v": False,
                                                     "b": False, "k": False}),
    dict(ns_coeffs=((3.4445, -4.7750, 2.0315),) * 3, beta=0.9, eps=1e-6, adam_b1=0.8,
         adam_b2=0.99, adam_weight_decay=0.05, preconditioning="spectral"),
], ids=["consistent_rms-mask", "coeffs-betas-spectral"])
def test_muon_options_and_3d_leaves_equal_optax_muon_with_lossless_format(kw):
  """Shape scaling, the decay mask (matrices only), the Adam options, and a 3-D leaf
  (Adam in optax: Muon orthogonalizes 2-D leaves only) as optax.contrib.muon."""
  params, loss2d = _problem()
  params["k"] = jax.random.normal(jax.random.key(7), (2, 4, 6)) * 0.3
  loss = lambda p: loss2d(p) + jnp.sum(jnp.sin(p["k"]) ** 2)
  ours, _ = _train(eco.quantize_params(params, eco.lossless()), loss,
                   eco.muon(SCHEDULE, **kw), 30, True)
  optax_kw = dict(kw)                                 # optax calls the mask weight_decay_mask
  if "mask" in optax_kw:
    optax_kw["weight_decay_mask"] = optax_kw.pop("mask")
  ref, _ = _train(params, loss, optax.contrib.muon(SCHEDULE, **optax_kw), 30, False)
  chex.assert_trees_all_close(ours, ref, atol=1e-5, rtol=0)


def test_muon_steps_an_empty_matrix_leaf_as_nothing():
  """A (0, n) leaf (a layer of width 0 in a config) has nothing to orthogonalize: it is
  stepped by the Adam rule of the other leaves (empty), not divided by its zero rows."""
  params, loss = _problem()
  params = {**params, "empty": jnp.ones((0, 8))}
  q = eco.quantize_params(params, eco.fp8_e4m3())
  tx = eco.muon(1e-2)
  state = tx.init(q)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = jax.jit(tx.update)(grads, state, q)
  new = eco.apply_updates(q, updates)
  assert new["empty"].shape == (0, 8) and state.moments.nu["empty"].shape == (0, 8)
  alone = {k: v for k, v in params.items() if k != "empty"}
  q_alone = eco.quantize_params(alone, eco.fp8_e4m3())
  tx_alone = eco.muon(1e-2)
  want = eco.apply_updates(q_alone, jax.jit(tx_alone.update)(
      jax.tree.map(jnp.ones_like, alone), tx_alone.init(q_alone), q_alone)[0])
  chex.assert_trees_all_equal(eco.dequantize_params({k: new[k] for k in alone}),
                              eco.dequantize_params(want))


def test_lion_equals_optax_lion_with_lossless_format():
  params, loss = _problem()
  mask = {"w": True, "v": True, "b": False}
  ours, _ = _train(eco.quantize_params(params, eco.lossless()), loss,
                   eco.lion(SCHEDULE, weight_decay=0.5, mask=mask), 30, True)
  ref, _ = _train(params, loss, optax.lion(SCHEDULE, weight_decay=0.5, mask=mask), 30, False)
  chex.assert_trees_all_close(ours, ref, atol=1e-5, rtol=0)


def _random(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape)


def _one_muon_step(tx, w, g, fmt):
  q = eco.quantize_params({"w": w}, fmt)
  updates, state = tx.update({"w": g}, tx.init(q), q)
  new = eco.apply_updates(q, updates)["w"].dequantize()
  return q["w"].dequantize(), new - q["w"].dequantize(), state.moments.mu["w"]


def test_muon_frozen_injection_is_the_blogs_equation():
  """M = M~ + ((1-eta*lambda)/eta)(1 - 1/beta) sqrt(m/n) E (M~^T M~)^1/2 (no nesterov)."""
  eta, beta, lam = 0.05, 0.95, 0.1
  w, g = _random((8, 24), 1), _random((8, 24), 2)
  kw = dict(beta=beta, weight_decay=lam, nesterov=False)
  w_q, update, mu = _one_muon_step(eco.muon(eta, injection="frozen", **kw), w, g,
                                   eco.int4("tensor"))
  ref, _ = optax.contrib.muon(eta, **kw).update({"w": g}, optax.contrib.muon(eta, **kw).init(
      {"w": w_q}), {"w": w_q})
  error = (w_q + ref["w"]) - (w_q + update)          # target - Q(target)
  assert float(jnp.max(jnp.abs(error))) > 1e-2        # the error is not trivial
  m_tilde = (1 - beta) * g
  lam_sq, v = jnp.linalg.eigh(m_tilde.T @ m_tilde)    # (M~^T M~)^1/2 another way
  root = (v * jnp.sqrt(jnp.clip(lam_sq, 0))) @ v.T
  expected = m_tilde + (1 - eta * lam) / eta * (1 - 1 / beta) * jnp.sqrt(8 / 24) * error @ root
  np.testing.assert_allclose(np.asarray(mu), np.asarray(expected), rtol=1e-4, atol=1e-5)


def test_muon_polar_injection_pays_back_exactly_what_the_step_can():
  """Nesterov, default injection: the next direction moves by the payable part of E."""
  eta, beta = 0.05, 0.95
  w, g = _random((24, 8), 1), _random((24, 8), 2)
  w_q, update, mu = _one_muon_step(eco.muon(eta, beta=beta), w, g, eco.int8("tensor"))
  ref, _ = optax.contrib.muon(eta, beta=beta).update(
      {"w": g}, optax.contrib.muon(eta, beta=beta).init({"w": w_q}), {"w": w_q})
  error = (w_q + ref["w"]) - (w_q + update)
  m_tilde = (1 - beta) * g
  a = beta / (1 - beta ** 2)                          # dN/dM~ at t = 1
  n = a * m_tilde + g                                 # (1-beta) g / (1-beta^1) = g
  # The debt delta = -P(E)/(eta*beta) moves the next N by a*beta*delta; the step by
  # -eta*s*d polar(N)[a*beta*delta] = s*d polar(N)[a*P(E)], which should give back E (s = 1).
  p_error = (mu - m_tilde) / ((1 / eta) * (1 - 1 / beta))
  polar = lambda x: (lambda u, s, vh: u @ vh)(*jnp.linalg.svd(x, full_matrices=False))
  _, moved = jax.jvp(polar, (n,), (a * p_error,))
  u, _, vh = jnp.linalg.svd(n, full_matrices=False)
  k = u.T @ error @ vh.T
  payable = error - u @ ((k + k.T) / 2) @ vh          # E minus its symmetric in-span part
  scale = float(jnp.max(jnp.abs(payable)))
  assert scale > 1e-3                                 # some of the error is payable
  np.testing.assert_allclose(np.asarray(moved), np.asarray(payable), atol=1e-3 * scale)


def test_muon_polar_injects_nothing_when_the_whole_step_rounds_back():
  """E = -eta s NS(N) is a change of scale only: no momentum can pay it back."""
  w, g = _random((16, 8), 1), _random((16, 8), 2)
  for injection, injected in (("polar", False), ("frozen", True)):
    _, update, mu = _one_muon_step(eco.muon(1e-3, injection=injection), w, g,
                                   eco.int4("tensor"))
    np.testing.assert_array_equal(np.asarray(update), 0.0)   # every entry rounded back
    relative = float(jnp.linalg.norm(mu - 0.05 * g) / jnp.linalg.norm(0.05 * g))
    assert (relative > 0.03) if injected else (relative < 1e-4), (injection, relative)


def test_muon_checks_the_adam_momentum_too():
  q = eco.quantize_params({"w": jnp.ones((4, 4)), "b": jnp.ones(4)}, eco.int8())
  with pytest.raises(ValueError, match=r"ECO needs a momentum decay .* in \(0, 1\), got \[0.0\]"):
    eco.muon(0.02, adam_b1=0.0).init(q)
  eco.muon(0.02, adam_b1=0.0, mode="naive").init(q)


@pytest.mark.parametrize("make", [lambda **kw: eco.lion(1e-3, **kw),
                                  lambda **kw: eco.muon(0.02, **kw)], ids=["lion", "muon"])
def test_the_exact_rule_follows_master_weights_whatever_the_direction(make):
  """Lion's sign and Muon's orthogonalized matrices: Q(w) + e stays the master copy.

  The gradients do not depend on the weights, so the master-weight run sees the same ones;
  the exact rule's momentum differs from it only in its 14 kept bits, and each kept error
  in its count of 1/512 grid step.
  """
  params = {"layer": {"w": jnp.linspace(-1, 1, 256).reshape(16, 16)}, "b": jnp.zeros(16)}
  grads = jax.random.normal(jax.random.key(4), (20, 16, 16))
  q0 = eco.quantize_params(params, eco.fp8_e4m3())
  runs = {}
  for mode in ("master_weights", "eco_exact"):
    tx = make(mode=mode)

    def body(carry, g, tx=tx):
      q, state = carry
      updates, state = tx.update({"layer": {"w": g}, "b": jnp.zeros(16)}, state, q)
      q = eco.apply_updates(q, updates)
      if state.master is not None:
        return (q, state), state.master["layer"]["w"]
      return (q, state), eco.dequantize(q["layer"]["w"]) + eco.kept_error(q, state)["layer"]["w"]

    runs[mode] = jax.jit(lambda c, body=body: jax.lax.scan(body, c, grads))(
        (q0, tx.init(q0)))[1]
  master, copy = runs["master_weights"], runs["eco_exact"]
  assert float(jnp.max(jnp.abs(master[-1] - master[0]))) > 0.01     # the weights moved
  gap = float(jnp.max(jnp.abs(copy - master)))
  assert gap < 2e-3 * float(jnp.max(jnp.abs(master))), gap


def test_lion_eco_rtn_recovers_overshoot_that_naive_rtn_loses():
  """Lion steps of about one grid step: here 0.089 (ECO) vs 0.330 (naive) after 300 steps."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k2, (256, 32))
  y = x @ (jax.random.normal(k1, (32, 16)) * 0.3)
  loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
  params = {"w": jax.random.normal(k3, (32, 16)) * 0.05, "b": jnp.zeros(16)}
  q = eco.quantize_params(params, eco.int8("tensor", scale_policy="fixed", headroom=4.0))
  lr = optax.cosine_decay_schedule(3e-3, 300, 0.1)
  final = {mode: float(_train(q, loss, eco.lion(lr, weight_decay=0.0, mode=mode), 300,
                              True)[1][-1]) for mode in ("naive", "eco")}
  assert final["eco"] < 0.95 * final["naive"], final
