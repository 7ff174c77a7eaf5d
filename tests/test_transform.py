"""The error feedback: modes, injection coefficient, guards, optax composition, bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eco_optax as eco
from eco_optax import quantize as qz
from eco_optax import step

from _helpers import ramp_problem, train_steps


def _regression(n_in=32, n_out=16, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  w_true = jax.random.normal(k1, (n_in, n_out)) * 0.3
  x = jax.random.normal(k2, (256, n_in))
  y = x @ w_true + 0.01 * jax.random.normal(k3, (256, n_out))
  params = {"w": jax.random.normal(k1, (n_in, n_out)) * 0.05, "b": jnp.zeros(n_out)}

  def loss(p):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  return params, loss


def _applied(q, updates, name="w"):
  """The FP32 step ``Q(w') - Q(w)`` the updates of an eco_optax optimizer make."""
  return eco.apply_updates(q, updates)[name].dequantize() - q[name].dequantize()


def _train(tx, q, loss, steps):
  state = tx.init(q)

  def body(carry, _):
    q, state = carry
    l, g = jax.value_and_grad(loss)(eco.dequantize_params(q))
    updates, state = tx.update(g, state, q)
    return (eco.apply_updates(q, updates), state), l

  (q, state), losses = jax.jit(lambda c: jax.lax.scan(body, c, None, steps))((q, state))
  return q, state, losses


@pytest.mark.filterwarnings("ignore:.*scale_policy='fixed':RuntimeWarning")  # the fixed range is the point
def test_eco_rtn_recovers_what_naive_rtn_loses():
  params, loss = _regression()
  fmt = eco.int8("tensor", scale_policy="fixed", headroom=4.0)
  q = eco.quantize_params(params, fmt)
  lr = optax.cosine_decay_schedule(3e-3, 400, 0.1)
  final = {}
  for mode in ("naive", "eco", "master_weights"):
    _, _, losses = _train(eco.adamw(lr, weight_decay=0.0, mode=mode), q, loss, 400)
    final[mode] = float(losses[-1])
  assert final["eco"] < 0.5 * final["naive"], final
  assert final["eco"] < 2.0 * final["master_weights"], final


def test_injection_coefficient_with_weight_decay():
  """m = m~ + ((1 - eta*lambda)/eta) (1 - 1/beta) e, with e = target - Q(target)."""
  eta, beta, lam = 0.1, 0.9, 0.5
  q, g = ramp_problem()
  tx = eco.sgdm(eta, beta, weight_decay=lam, mode="eco_memory_free", rounding="nearest")
  state = tx.init(q)
  updates, state = tx.update(g, state, q)
  w = q["w"].dequantize()
  m_tilde = (1 - beta) * g["w"]
  target = (1 - eta * lam) * w - eta * m_tilde
  new_w = qz.requantize(q["w"], target).dequantize()
  np.testing.assert_allclose(np.asarray(_applied(q, updates)), np.asarray(new_w - w), atol=1e-7)
  expected = m_tilde + (1 - eta * lam) / eta * (1 - 1 / beta) * (target - new_w)
  assert float(jnp.max(jnp.abs(target - new_w))) > 0.01   # the error is not trivial
  np.testing.assert_allclose(np.asarray(state.moments.mu["w"]), np.asarray(expected),
                             rtol=1e-5, atol=1e-6)


def test_adam_injection_uses_the_preconditioner():
  """Adam: m += ((1-b1^t)(1-eta*lambda)/eta)(1 - 1/b1)(sqrt(v_hat)+eps) e."""
  eta, b1, b2, eps, lam = 0.05, 0.9, 0.99, 1e-8, 0.1
  q, g = ramp_problem(eco.int8("tensor", headroom=1.0))
  tx = eco.adamw(eta, b1, b2, eps, weight_decay=lam)
  updates, state = tx.update(g, tx.init(q), q)
  w = q["w"].dequantize()
  m_t, v_t = (1 - b1) * g["w"], (1 - b2) * g["w"] ** 2
  denom = (1 - b1) * (jnp.sqrt(v_t / (1 - b2)) + eps)
  target = w - eta * (m_t / denom + lam * w)
  e = target - (w + _applied(q, updates))
  expected = m_t + (1 - eta * lam) / eta * (1 - 1 / b1) * denom * e
  np.testing.assert_allclose(np.asarray(state.moments.mu["w"]), np.asarray(expected),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:.*scale_policy='fixed':RuntimeWarning")  # the fixed range is the point
def test_naive_mode_drops_the_error():
  q = eco.quantize_params({"w": jnp.ones((8, 8))}, eco.int4("tensor", scale_policy="fixed"))
  g = {"w": jnp.full((8, 8), 0.01)}
  tx = eco.sgdm(0.1, 0.9, mode="naive")
  updates, state = tx.update(g, tx.init(q), q)
  np.testing.assert_array_equal(np.asarray(_applied(q, updates)), 0.0)   # the step vanished
  np.testing.assert_allclose(np.asarray(state.moments.mu["w"]), 0.001, rtol=1e-6)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_master_weights_mode_stores_the_quantized_master(rounding):
  params, loss = _regression()
  q = eco.quantize_params(params, eco.fp8_e4m3())
  tx = eco.adamw(1e-2, mode="master_weights", rounding=rounding)
  state = tx.init(q)
  assert state.master["b"] is None and state.master["w"].dtype == jnp.float32
  for _ in range(5):
    prev = q
    updates, state = tx.update(jax.grad(loss)(eco.dequantize_params(q)), state, q)
    q = eco.apply_updates(q, updates)
    if rounding == "nearest":
      expected = qz.requantize(prev["w"], state.master["w"]).dequantize()
      np.testing.assert_array_equal(np.asarray(q["w"].dequantize()), np.asarray(expected))
  assert float(jnp.max(jnp.abs(state.master["w"] - q["w"].dequantize()))) > 0


@pytest.mark.parametrize("mode", ["eco", "naive", "master_weights"])
def test_learning_rate_zero_warmup_and_anneal_stay_finite(mode):
  params, loss = _regression()
  q0 = eco.quantize_params(params, eco.int4("tensor", scale_policy="sticky", headroom=2.0))
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 40, end_value=0.0)
  tx = eco.adamw(sched, mode=mode, rounding="stochastic")
  state = tx.init(q0)
  updates, state1 = tx.update(jax.grad(loss)(eco.dequantize_params(q0)), state, q0)
  np.testing.assert_array_equal(np.asarray(_applied(q0, updates)), 0.0)  # eta = 0: no step
  q, state, losses = _train(tx, q0, loss, 41)                       # ends at eta = 0
  leaves = jax.tree.leaves((eco.dequantize_params(q), state.moments))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
  assert bool(jnp.all(jnp.isfinite(losses)))


def _regression_loss(schedule, mode, steps):
  """Final loss (and state) of a 32x16 least-squares fit in FP8 with AdamW under ``schedule``."""
  target = jax.random.normal(jax.random.key(1), (32, 16))
  q = eco.quantize_params({"w": 0.3 * jax.random.normal(jax.random.key(0), (32, 16))},
                          eco.fp8_e4m3())
  tx = eco.adamw(schedule, weight_decay=0.0, mode=mode)
  batch = lambda i: (jax.random.normal(jax.random.fold_in(jax.random.key(2), i), (64, 32)),)
  losses, _, state = train_steps(tx, q, lambda p, x: jnp.mean((x @ p["w"] - x @ target) ** 2),
                                 batch, steps)
  return losses[-1], state


def test_a_learning_rate_that_jumps_up_does_not_overpay_the_momentums_debt():
  """ECO-SR writes each rounding error (about a grid step, whatever the rate) into the
  momentum in units of 1/eta: a rate that jumps from 1e-6 to 1e-2 (a warm restart) paid
  it 1e4 times over (here: loss 195.7 against 17.5 with master weights). The momentum
  is scaled down where the rate passes twice the one its debt was written at."""
  jump = optax.piecewise_constant_schedule(1e-6, {100: 1e4})
  master, _ = _regression_loss(jump, "master_weights", 160)
  ours, state = _regression_loss(jump, "eco", 160)
  assert ours < 1.3 * master, (ours, master)
  assert float(state.previous_eta) == pytest.approx(1e-2)
  # The rate the debt was written at is the last positive one: a step at 0 writes none.
  _, state = _regression_loss(optax.piecewise_constant_schedule(1e-3, {5: 0.0}), "eco", 6)
  assert float(state.previous_eta) == pytest.approx(1e-3)


def test_eco_needs_momentum():
  q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.int8())
  with pytest.raises(ValueError, match=r"ECO needs a momentum decay \(b1 / momentum\) in "
                                       r"\(0, 1\), got \[0.0\]"):
    eco.sgdm(0.1, momentum=0.0).init(q)
  with pytest.raises(ValueError, match=r"in \(0, 1\), got \[1.0\]"):
    eco.adamw(0.1, b1=1.0).init(q)
  state = eco.sgdm(0.1, momentum=0.0, mode="naive").init(q)   # fine without error feedback
  assert isinstance(state, eco.ErrorFeedbackState) and int(state.count) == 0
  with pytest.raises(ValueError, match=r"ECO needs a momentum decay .* got \[0.0\]"):
    eco.sgdm(0.1, momentum=0.0).update({"w": jnp.ones((4, 4))}, state, q)


@pytest.mark.parametrize("kwargs,match", [(dict(mode="eco-sr"), "mode must be one of"),
                                          (dict(rounding="floor"), "rounding must be one of")])
def test_bad_mode_or_rounding(kwargs, match):
  with pytest.raises(ValueError, match=match):
    eco.adamw(1e-3, **kwargs)


def test_update_needs_params():
  q = eco.quantize_params({"w": jnp.ones((4, 4))}, eco.int8())
  tx = eco.adamw(1e-3)
  with pytest.raises(ValueError, match="need params"):
    tx.update({"w": jnp.ones((4, 4))}, tx.init(q))


def test_update_refuses_a_state_that_another_optimizer_made():
  params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
  q = eco.quantize_params(params, eco.fp8_e4m3())
  g = jax.tree.map(jnp.ones_like, params)
  expected = r"state: expected this optimizer's init\(params\): an ErrorFeedbackState of "
  for tx, state, got in [
      (eco.adamw(1e-2), eco.sgdm(0.1).init(q), "AdamMoments, got an ErrorFeedbackState of SGDMMoments"),
      (eco.adamw(1e-2), optax.adamw(1e-2).init(params), "AdamMoments, got a tuple"),
      (eco.adamw(1e-2, mode="master_weights"), eco.adamw(1e-2, mode="eco_exact").init(q),
       "AdamMoments with a master copy, got an ErrorFeedbackState of AdamMoments")]:
    with pytest.raises(TypeError, match=expected + got + r"\. Pass each transformation"):
      tx.update(g, state, q)
  with pytest.raises(TypeError, match=r"state: expected this optimizer's init\(params\): an "
                                      r"ErrorFeedbackState with previous_eta \(the learning rate the "
                                      r"momentum's debt was written at\), got one without it"):
    eco.adamw(1e-2).update(g, eco.adamw(1e-2, mode="naive").init(q), q)
  exact = eco.adamw(1e-2, mode="eco_exact")
  stale = exact.init(q)._replace(previous_eta=jnp.zeros([]))   # as the exact rule kept it before
  with pytest.raises(TypeError, match=r"an ErrorFeedbackState without previous_eta .*got one with "
                                      r"it\. .*in 'eco_exact' mode before the exact rule stopped "
                                      r"keeping previous_eta has it\)"):
    exact.update(g, stale, q)
  layout = (r"state: expected this optimizer's init\(params\): a state whose first moment "
            r"{} the exact rule's error in its low 10 bits \(mode='eco_exact' keeps it, and "
            r"mode='eco' with rounding='nearest' and an FP32 mu; the other modes do not\), got "
            r"one that {} it\. Pass the optimizer the state .*\(a state of the memory-free rule "
            r"continues with mode='eco_memory_free'\)")
  with pytest.raises(TypeError, match=layout.format("keeps", "does not keep")):
    eco.adamw(1e-2, mode="eco_exact").update(g, eco.adamw(1e-2).init(q), q)
  with pytest.raises(TypeError, match=layout.format("does not keep", "keeps")):
    jax.jit(eco.adamw(1e-2).update)(g, eco.adamw(1e-2, mode="eco_exact").init(q), q)
  with pytest.raises(TypeError, match=layout.format("keeps", "does not keep")):  # saved before
    eco.adamw(1e-2, rounding="nearest").update(                                # "eco" took it
        g, eco.adamw(1e-2, mode="eco_memory_free", rounding="nearest").init(q), q)
  with pytest.raises(TypeError, match=r"state: kept_error reads the state of an optimizer of "
                                      r"the exact rule \(mode='eco_exact', or 'eco' with "
                                      r"rounding='nearest'; its error_bits set\), got an "
                                      r"ErrorFeedbackState without error_bits \(mode "
                                      r"'eco_memory_free', 'naive' or "):
    eco.kept_error(q, eco.adamw(1e-2).init(q))


def test_grads_with_wrong_tree_or_shape_are_clear_errors():
  q = eco.quantize_params({"w": jnp.ones((4, 4)), "b": jnp.ones(4)}, eco.int8())
  tx = eco.adamw(1e-3)
  state = tx.init(q)
  with pytest.raises(ValueError, match=r"grads do not have the structure.*missing \[\"\['b'\]\"\]"):
    tx.update({"w": jnp.ones((4, 4))}, state, q)
  with pytest.raises(ValueError, match=r"\['w'\]: grads leaf has shape \(4, 3\), expected \(4, 4\)"):
    tx.update({"w": jnp.ones((4, 3)), "b": jnp.ones(4)}, state, q)
  with pytest.raises(TypeError, match=r"\['b'\]: grads leaf has dtype int32"):
    tx.update({"w": jnp.ones((4, 4)), "b": jnp.ones(4, jnp.int32)}, state, q)
  # jax.grad with respect to the quantized params: derivatives of the codes and scales.
  q8 = eco.quantize_params({"w": jnp.ones((4, 4)), "b": jnp.ones(4)}, eco.fp8_e4m3())
  codes_grads = jax.grad(lambda p: jnp.sum(eco.dequantize_params(p)["w"]))(q8)
  with pytest.raises(ValueError, match=r"unexpected \[\"\['w'\]\.scale\", \"\['w'\]\.values\"\]; "
                                       r"these are derivatives with respect to QuantizedArray "
                                       r"fields: take gradients .* with eco_optax\.grad"):
    tx.update(codes_grads, tx.init(q8), q8)


def test_update_refuses_params_stored_in_another_format():
  """A state built for one tree of formats is refused for another, naming both formats."""
  params = {"layer": {"kernel": jnp.ones((8, 8))}, "b": jnp.zeros(8)}
  g = jax.tree.map(jnp.ones_like, params)
  tx = eco.adamw(1e-3, mode="eco_exact")
  state = tx.init(eco.quantize_params(params, eco.fp8_e4m3()))
  for update in (tx.update, jax.jit(tx.update)):
    with pytest.raises(ValueError, match=r"\['layer'\]\['kernel'\]: params are stored as "
                                         r"int4 \(.*\) but the optimizer state was built for "
                                         r"fp8_e4m3 \(.*\); build the state with tx.init"):
      update(g, state, eco.quantize_params(params, eco.int4()))
  with pytest.raises(ValueError, match=r"\['layer'\]\['kernel'\]: params are stored as not "
                                       r"quantized but the optimizer state was built for fp8_e4m3"):
    tx.update(g, state, params)
  with pytest.raises(ValueError, match=r"\['layer'\]\['kernel'\]: params are stored as fp8_e4m3 "
                                       r"\(.*scaling='tensor'.*\) but the optimizer state was "
                                       r"built for fp8_e4m3 \(.*scaling='channel'"):
    tx.update(g, state, eco.quantize_params(params, eco.fp8_e4m3("tensor")))
  updates, _ = tx.update(g, state, eco.quantize_params(params, eco.fp8_e4m3()))
  assert updates["layer"]["kernel"].bits.dtype == jnp.uint8  # its own formats: accepted


@pytest.mark.parametrize("bad", [[jnp.nan, jnp.inf], [jnp.inf], [-jnp.inf]], ids=str)
@pytest.mark.parametrize("jit", [False, True])
def test_non_finite_grads_show_in_the_stored_weights(bad, jit):
  """Documented: a NaN/inf gradient turns the leaf's weights into NaN (never a silent freeze)."""
  q = eco.quantize_params({"w": jnp.ones((4, 4)), "v": jnp.ones((4, 4))}, eco.fp8_e4m3())
  tx = eco.adamw(1e-2)
  w = jnp.full((4, 4), 0.1)
  for i, x in enumerate(bad):
    w = w.at[i, 2 * i].set(x)
  g = {"w": w, "v": jnp.full((4, 4), 0.1)}
  updates, state = (jax.jit(tx.update) if jit else tx.update)(g, tx.init(q), q)
  assert bool(jnp.isnan(updates["w"].flags))
  out = eco.dequantize_params(eco.apply_updates(q, updates))
  assert bool(jnp.all(jnp.isnan(out["w"])))
  assert bool(jnp.all(jnp.isfinite(out["v"])))
  assert float(updates["v"].flags) == eco.tree.VALID


@pytest.mark.parametrize("make,shape", [(eco.adamw, (4, 4)), (eco.adamw, (300, 512)),
                                        (eco.muon, (8, 16))], ids=["adamw", "adamw-blocks", "muon"])
def test_a_non_finite_moment_shows_in_the_stored_weights(make, shape):
  """A NaN that reaches the target from the state (not the gradient) poisons the leaf too:
  never a weight silently stored as code 0. ``(300, 512)`` is stepped in overlapping
  blocks of rows on CPU, the Muon matrix whole."""
  q = eco.quantize_params({"w": jnp.ones(shape), "v": jnp.ones(shape)}, eco.fp8_e4m3())
  tx = make(1e-2)
  state = tx.init(q)
  mu = dict(state.moments.mu, w=state.moments.mu["w"].at[shape[0] - 1, 3].set(jnp.nan))
  state = state._replace(moments=state.moments._replace(mu=mu))
  g = {"w": jnp.full(shape, 0.1), "v": jnp.full(shape, 0.1)}
  updates, _ = jax.jit(tx.update)(g, state, q)
  assert bool(jnp.isnan(updates["w"].flags))
  assert float(updates["v"].flags) == eco.tree.VALID
  out = eco.dequantize_params(eco.apply_updates(q, updates))
  assert bool(jnp.all(jnp.isnan(out["w"]))) and bool(jnp.all(jnp.isfinite(out["v"])))


@pytest.mark.parametrize("kwargs", [
    dict(), dict(rounding="nearest"), dict(mode="eco_memory_free", rounding="nearest"),
    dict(mode="naive", rounding="nearest"), dict(mode="master_weights"),
    dict(rounding="nearest", nu_dtype=jnp.bfloat16)],
    ids=["eco-sr", "eco-rtn", "memory-free-rtn", "naive-rtn", "master-weights", "bf16-nu"])
def test_a_finite_gradient_whose_square_overflows_poisons_the_leaf(kwargs):
  """``g = 1e20`` is finite but ``g**2`` is not: Adam's ``nu`` would turn infinite and
  its direction 0, a leaf that stops moving with valid flags (a silent freeze). A
  gradient entry of ``2**64`` or more poisons the leaf instead."""
  q = eco.quantize_params({"w": jnp.ones((4, 8)), "v": jnp.ones((4, 8))}, eco.fp8_e4m3())
  tx = eco.adamw(1e-3, **kwargs)
  g = {"w": jnp.full((4, 8), 0.1).at[1, 2].set(1e20), "v": jnp.full((4, 8), 0.1)}
  updates, _ = jax.jit(tx.update)(g, tx.init(q), q)
  assert bool(jnp.isnan(updates["w"].flags))
  assert float(updates["v"].flags) == eco.tree.VALID
  out = eco.dequantize_params(eco.apply_updates(q, updates))
  assert bool(jnp.all(jnp.isnan(out["w"]))) and bool(jnp.all(jnp.isfinite(out["v"])))
  g["w"] = g["w"].at[1, 2].set(1e18)      # below 2**64: its square is finite, a valid step
  updates, _ = jax.jit(tx.update)(g, tx.init(q), q)
  assert float(updates["w"].flags) == eco.tree.VALID


def test_a_non_finite_learning_rate_poisons_every_leaf():
  q = eco.quantize_params({"w": jnp.ones((4, 4)), "b": jnp.ones(4)}, eco.int8())
  tx = eco.sgdm(lambda count: jnp.inf * (count + 1), 0.9)
  updates, _ = jax.jit(tx.update)({"w": jnp.full((4, 4), 0.1), "b": jnp.full(4, 0.1)},
                                  tx.init(q), q)
  assert bool(jnp.isnan(updates["w"].flags))
  out = eco.dequantize_params(eco.apply_updates(q, updates))
  assert bool(jnp.all(jnp.isnan(out["w"])))
  assert not bool(jnp.any(jnp.isfinite(out["b"])))    # a plain leaf, as in optax: -inf


def test_apply_if_finite_skips_the_step_and_keeps_the_state():
  params, loss = _regression()
  q = eco.quantize_params(params, eco.fp8_e4m3())
  tx = eco.apply_if_finite(eco.adamw(1e-2, rounding="stochastic"), max_consecutive_errors=3)
  state = tx.init(q)
  step = jax.jit(lambda g, s, q: tx.update(g, s, q))
  updates, state = step(jax.grad(loss)(eco.dequantize_params(q)), state, q)
  q = eco.apply_updates(q, updates)
  bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), eco.dequantize_params(q))
  updates, new_state = step(bad, state, q)
  q2 = eco.apply_updates(q, updates)
  chex.assert_trees_all_equal(q2, q)
  assert int(new_state.notfinite_count) == 1
  chex.assert_trees_all_equal(new_state.inner_state.moments, state.inner_state.moments)


def test_composes_in_optax_chain_under_jit():
  params, loss = _regression()
  q = eco.quantize_params(params, eco.fp8_e4m3())
  tx = optax.chain(optax.clip_by_global_norm(0.1),
                   eco.adamw(optax.linear_schedule(1e-2, 1e-3, 50), rounding="stochastic"))
  q, state, losses = _train(tx, q, loss, 50)
  assert float(losses[-1]) < float(losses[0])
  assert int(state[1].count) == 50


def test_a_gradient_transformation_before_the_optimizer_transforms_the_gradients():
  """chain(clip, eco.adamw) is eco.adamw on the clipped gradients, bit for bit."""
  params, loss = _regression()
  q = eco.quantize_params(params, eco.fp8_e4m3())
  g = jax.tree.map(lambda x: 50.0 * x, jax.grad(loss)(eco.dequantize_params(q)))
  assert float(optax.tree.norm(g)) > 1.0                    # clipping is active
  chained = optax.chain(optax.clip_by_global_norm(1.0), eco.adamw(1e-2, rounding="stochastic"))
  alone = eco.adamw(1e-2, rounding="stochastic")
  clip = optax.clip_by_global_norm(1.0)
  clipped = jax.jit(lambda g: clip.update(g, clip.init(g))[0])(g)
  u1, s1 = jax.jit(chained.update)(g, chained.init(q), q)
  u2, s2 = jax.jit(alone.update)(clipped, alone.init(q), q)
  u3, _ = jax.jit(alone.update)(g, alone.init(q), q)
  assert u1["w"].bits.dtype == jnp.uint8 and u1["b"].dtype == jnp.float32
  chex.assert_trees_all_equal((u1, s1[1].moments), (u2, s2.moments))
  assert not np.array_equal(np.asarray(u1["b"]), np.asarray(u3["b"]))   # clipping mattered
  assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)


def test_a_transformation_after_the_optimizer_is_refused_at_trace_time():
  """chain(eco.adamw, optax.scale) turns the codes into floats: apply_updates refuses them."""
  params = {"layer": {"kernel": jnp.ones((8, 8))}, "b": jnp.zeros(8)}
  q = eco.quantize_params(params, eco.fp8_e4m3())
  g = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
  tx = optax.chain(eco.adamw(1e-2), optax.scale(0.5))
  state = tx.init(q)

  def step(g, state, q):
    updates, state = tx.update(g, state, q)
    return eco.apply_updates(q, updates), state

  match = (r"\['layer'\]\['kernel'\]: the update of this fp8_e4m3 leaf is NewCodes with "
           r"float32 bits and float32 flags.*"
           r"A transformation after the eco_optax optimizer in optax.chain changed them")
  with pytest.raises(TypeError, match=match):
    jax.jit(step).lower(g, state, q)                # tracing alone raises: nothing ran
  with pytest.raises(TypeError, match=match):
    jax.jit(step)(g, state, q)
  with pytest.raises(TypeError, match=match):
    step(g, state, q)
  updates, _ = tx.update(g, state, q)               # the culprit: scale made floats of codes
  assert updates["layer"]["kernel"].bits.dtype == jnp.float32


def test_stochastic_rounding_depends_on_the_seed_only():
  params, loss = _regression()
  q = eco.quantize_params(params, eco.int4("tensor"))
  runs = [_train(eco.adamw(1e-2, rounding="stochastic", seed=s), q, loss, 5)[0]
          for s in (0, 0, 1)]
  w = [np.asarray(r["w"].values, np.float32) for r in runs]
  np.testing.assert_array_equal(w[0], w[1])
  assert not np.array_equal(w[0], w[2])


def _constant_gradient_lag(mode, steps=1500):
  """Distance (in grid steps) by which the stored weights trail the master path.

  SGDM on a constant gradient, int8 grid of step 1/127: each step moves the master
  by eta * g = 0.02 grid steps, so RTN weights sit still for many steps at a time.
  """
  fmt = eco.int8("tensor", scale_policy="fixed", headroom=1.0)
  start = 64 / 127                      # on the grid: no initial rounding error
  q = eco.quantize_params({"w": jnp.full((4, 4), start).at[0, 0].set(1.0)}, fmt)
  eta, g = 0.01, 2.0 / 127
  tx = eco.sgdm(eta, 0.9, mode=mode, rounding="nearest")

  def body(carry, _):
    q, state = carry
    updates, state = tx.update({"w": jnp.full((4, 4), g)}, state, q)
    return (eco.apply_updates(q, updates), state), eco.dequantize_params(q)["w"][1, 1]

  (q, _), path = jax.jit(lambda c: jax.lax.scan(body, c, None, steps))((q, tx.init(q)))
  master = start - eta * g * (np.arange(steps) - 0.9 * (1 - 0.9 ** np.arange(steps)) / 0.1)
  return np.abs(np.asarray(path) - master)[steps // 2:].max() * 127


@pytest.mark.filterwarnings("ignore:.*scale_policy='fixed':RuntimeWarning")  # the fixed range is the point
def test_exact_rule_keeps_rtn_weights_within_half_a_step_of_the_master_path():
  lag = {m: _constant_gradient_lag(m) for m in ("naive", "eco_memory_free", "eco_exact", "eco")}
  print("lag in grid steps:", lag)
  # Half a step, plus the kept error's stochastic rounding to 1/512 of a step: 1500 roundings
  # wander by about sqrt(1500)/2 counts, 0.04 step.
  assert lag["eco_exact"] <= 0.6
  assert lag["eco"] == lag["eco_exact"]  # ECO mode takes the exact rule for round-to-nearest
  assert 3.0 < lag["eco_memory_free"] < 6.0          # ~ beta/(1-beta) half steps
  assert lag["naive"] > 25               # never moves: the master went 30 steps away


def _momentum(state):
  """The first moment of leaf ``w`` without the exact rule's kept error in its low 10 bits."""
  return np.asarray(step.split_momentum(state.moments.mu["w"])[0])


def _count(q):
  """One count of the exact rule's kept error beside ``q``'s codes: grid step * scale / 128."""
  p = q["w"]
  return np.asarray(step.decode_error(jnp.ones(p.shape), qz.values_to_bits(p.values, p.fmt),
                                      p.effective_scale, p.fmt))


def test_exact_rule_keeps_its_error_in_the_low_byte_of_the_momentum():
  """14 significant bits of the momentum (rounded to nearest) and a count in [-511, 511]."""
  mu = jnp.asarray([0.0, 1.0, -1.0, 3.0e-5, -123.456, 1 + 2.0**-15, 1 + 3 * 2.0**-15] * 147)[:1023]
  counts = jnp.arange(-511.0, 512.0)
  kept_mu, kept_counts = step.split_momentum(step.join_momentum(mu, counts))
  np.testing.assert_array_equal(np.asarray(kept_counts), np.asarray(counts))
  assert kept_mu.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(kept_mu), np.asarray(mu), rtol=2.0**-14, atol=0)
  assert float(kept_mu[5]) == 1.0 and float(kept_mu[6]) == 1 + 2.0**-13   # to nearest
  assert np.array_equal(np.sign(np.asarray(kept_mu)), np.sign(np.asarray(mu)))


def test_exact_rule_counts_its_error_without_bias_down_to_a_fraction_of_a_count():
  """An error of 0.3 counts is kept as 0 or 1 count, 0.3 on average over steps (keys):
  an update far below a count still moves the kept error; beyond 511 counts it saturates."""
  fmt = eco.int8("tensor")
  codes, inverse_scale = jnp.zeros((8, 16)), jnp.asarray(2.0)   # scale 0.5: a count is 0.5/512
  unit = 0.5 / step.ERROR_STEPS
  keys = jax.random.split(jax.random.key(0), 2000)
  counts = np.asarray(jax.vmap(lambda k: step.encode_error(
      jnp.full((8, 16), 0.3 * unit), codes, inverse_scale, fmt, k, 0))(keys))
  assert set(np.unique(counts)) == {0.0, 1.0}
  per_element = counts.mean(axis=0)
  assert np.all(np.abs(per_element - 0.3) < 4 * np.sqrt(0.21 / 2000))
  saturated = step.encode_error(jnp.asarray([[-1e3 * unit, 1e3 * unit, -2.5 * unit]]),
                                jnp.zeros((1, 3)), inverse_scale, fmt, keys[0], 0)
  np.testing.assert_array_equal(np.asarray(saturated)[0, :2], [-511.0, 511.0])
  assert float(saturated[0, 2]) in (-3.0, -2.0)


def test_exact_rule_refuses_a_narrow_first_moment():
  for narrow in (jnp.bfloat16, eco.moments.blockwise_8bit()):
    with pytest.raises(ValueError, match=r"mode='eco_exact' keeps each quantized leaf's last "
                       r"error in the low 10 bits of its FP32 first moment \(mu\).*nu_dtype="):
      eco.adamw(1e-3, mode="eco_exact", mu_dtype=narrow)


def test_exact_rule_steps_sgdm_from_the_stored_weights_plus_the_kept_error():
  """w~ = (1 - eta*lambda)(Q(w) + e_t) - eta m~, e_{t+1} = w~ - Q(w~), m = m~ (SGDM's own).

  The error is kept as counts of 1/512 grid step (stochastically rounded): each within
  one count of the error made, and the momentum is the optimizer's to its 14 kept bits.
  """
  eta, beta, lam = 0.1, 0.9, 0.1
  q, g = ramp_problem()
  tx = eco.sgdm(eta, beta, weight_decay=lam, mode="eco_exact")
  state = tx.init(q)
  kept, m = jnp.zeros((8, 8)), jnp.zeros((8, 8))
  for _ in range(3):
    w = q["w"].dequantize()
    m = beta * m + (1 - beta) * g["w"]
    updates, state = tx.update(g, state, q)
    target = (1 - eta * lam) * (w + kept) - eta * m
    q = eco.apply_updates(q, updates)
    kept = eco.kept_error(q, state)["w"]
    assert np.all(np.abs(kept - (target - q["w"].dequantize())) <= _count(q) * (1 + 1e-6))
    assert float(jnp.max(jnp.abs(kept))) > 0.01                    # not a trivial error
    np.testing.assert_allclose(_momentum(state), np.asarray(m), rtol=2**-13, atol=1e-7)


def test_exact_rule_steps_adam_from_the_master_copy_as_the_rate_changes():
  """A learning rate that halves, Adam's P moving with v and 1 - b1^t: each step starts
  from the master copy Q(w) + e_t, whatever the units the previous error was made in,

  w~ = (Q(w) + e_t) - eta_t (m_hat / (sqrt(v_hat) + eps) + lambda (Q(w) + e_t)),

  and the moments are Adam's own.
  """
  etas, b1, b2, eps, lam = (0.05, 0.025, 0.025), 0.9, 0.99, 1e-8, 0.1
  q, first = ramp_problem(eco.int8("tensor", headroom=1.0))
  grads = [first["w"], jnp.linspace(-0.1, 0.5, 64).reshape(8, 8),
           jnp.linspace(0.2, 0.1, 64).reshape(8, 8)]
  tx = eco.adamw(lambda count: jnp.asarray(etas)[count], b1, b2, eps, weight_decay=lam,
                 mode="eco_exact")
  state = tx.init(q)
  m, v, kept = jnp.zeros((8, 8)), jnp.zeros((8, 8)), jnp.zeros((8, 8))
  for t, (eta, g) in enumerate(zip(etas, grads), start=1):
    updates, state = tx.update({"w": g}, state, q)
    master = q["w"].dequantize() + kept
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g ** 2
    direction = m / (1 - b1 ** t) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
    target = master - eta * (direction + lam * master)
    q = eco.apply_updates(q, updates)
    kept = eco.kept_error(q, state)["w"]
    assert float(jnp.max(jnp.abs(kept))) > 1e-3                    # not a trivial error
    assert np.all(np.abs(kept - (target - q["w"].dequantize())) <= _count(q) * (1 + 1e-6))
    np.testing.assert_allclose(_momentum(state), np.asarray(m), rtol=2**-13, atol=1e-7)
    np.testing.assert_allclose(np.asarray(state.moments.nu["w"]), np.asarray(v), rtol=1e-6)


@pytest.mark.parametrize("nu_dtype", [None, jnp.bfloat16], ids=["fp32-nu", "bf16-nu"])
def test_exact_rule_stays_on_the_master_weight_path_under_a_schedule(nu_dtype):
  """Adam with warm-up, cosine decay and weight decay, FP8 RTN: Q(w) + e is the master copy.

  The gradients do not depend on the weights, so the master-weight run sees the same
  ones. Each step the stored weights plus the kept error equal the master weights up
  to the storage of the error (counts of 1/512 grid step, stochastically rounded), and
  the stored codes are the master's codes.
  With a bfloat16 second moment (the exact rule in memory-free ECO's bytes) both runs
  store it so.
  """
  lr = optax.warmup_cosine_decay_schedule(1e-4, 1e-2, 5, 40, 1e-3)
  q0 = eco.quantize_params({"w": jnp.linspace(-1, 1, 512).reshape(16, 32)}, eco.fp8_e4m3())
  grads = jax.random.normal(jax.random.key(3), (40, 16, 32))
  runs = {}
  for mode in ("master_weights", "eco_exact"):
    tx = eco.adamw(lr, b2=0.98, weight_decay=0.1, mode=mode, nu_dtype=nu_dtype)

    def body(carry, g, tx=tx):
      q, state = carry
      updates, state = tx.update({"w": g}, state, q)
      q = eco.apply_updates(q, updates)
      kept = state.master["w"] if state.master else eco.kept_error(q, state)["w"]
      return (q, state), (q["w"].values, eco.dequantize(q["w"]), kept)

    runs[mode] = jax.jit(lambda c, tx=tx, body=body: jax.lax.scan(body, c, grads))(
        (q0, tx.init(q0)))[1]
  codes_mw, _, master = runs["master_weights"]
  codes, stored, errors = runs["eco_exact"]
  gap = float(jnp.max(jnp.abs(stored + errors - master)))
  # A count is 1/512 of a grid step, 1/256 of the largest RTN error; 40 stochastic roundings of
  # at most a count wander by about sqrt(40)/2 counts (without the unpaid part of the debt
  # the gap exceeds the errors themselves here).
  assert 0 < gap < 2 ** -4 * float(jnp.max(jnp.abs(errors)))
  # A target within that gap of a rounding boundary may take the neighbouring code.
  assert float(jnp.mean(codes == codes_mw)) > 0.99


def test_exact_rule_under_inject_hyperparams_steps_as_the_schedule_passed_directly():
  """optax.inject_hyperparams evaluates the schedule itself and passes each step's rate as a
  constant: the exact rule, which reads no earlier rate, steps as with the schedule passed
  directly (and keeps no previous_eta)."""
  lr = optax.linear_schedule(1e-3, 1e-2, 8)
  q0 = eco.quantize_params({"w": jnp.linspace(-1, 1, 256).reshape(16, 16)}, eco.fp8_e4m3())
  grads = jax.random.normal(jax.random.key(5), (8, 16, 16))
  direct = eco.adamw(lr, weight_decay=0.1, mode="eco_exact")
  injected = optax.inject_hyperparams(eco.adamw, static_args=("mode",),
                                      hyperparam_dtype=jnp.float32)(
      learning_rate=lr, weight_decay=0.1, mode="eco_exact")
  states = {tx: tx.init(q0) for tx in (direct, injected)}
  qs = dict.fromkeys(states, q0)
  for g in grads:
    for tx in states:
      updates, states[tx] = jax.jit(tx.update)({"w": g}, states[tx], qs[tx])
      qs[tx] = eco.apply_updates(qs[tx], updates)
    inner = states[injected].inner_state
    assert inner.previous_eta is None and states[direct].previous_eta is None
    # The two programs fuse the rates and Adam's arithmetic differently, a few ulps apart:
    # a weight next to a rounding boundary may take the neighbouring code, and a moment
    # next to a boundary of its 14 kept bits the neighbouring value.
    codes = _raw_codes(qs[injected]).astype(int) - _raw_codes(qs[direct]).astype(int)
    assert np.abs(codes).max() <= 1 and np.mean(codes != 0) <= 0.01
    mu, mu_direct = (_momentum(s) for s in (inner, states[direct]))
    assert np.mean(mu != mu_direct) <= 0.03
    assert np.max(np.abs(mu - mu_direct) / (np.abs(mu_direct) + 1e-6)) < 1e-3


def _raw_codes(q):
  return np.asarray(jax.lax.bitcast_convert_type(q["w"].values, jnp.uint8))


def test_exact_rule_costs_no_byte_beyond_memory_free_eco():
  q = eco.quantize_params({"w": jnp.ones((256, 256))}, eco.fp8_e4m3("tensor"))
  state = eco.adamw(1e-3, mode="eco_exact").init(q)
  rep = eco.memory_report(q, state)
  assert state.moments.mu["w"].dtype == jnp.float32
  # The state's error_bits scalar (int32) in place of memory-free ECO's previous_eta (FP32).
  assert rep.components == eco.memory_report(q, eco.adamw(1e-3).init(q)).components
  assert rep.bytes_per_param == pytest.approx(9.0, abs=0.01)


def test_exact_rule_reads_its_error_in_the_scale_it_was_written_in():
  """A sticky scale doubles mid-run; every kept error still reads back as target - Q(w').

  Each error is kept in counts of 1/512 of the grid step at the code it was written
  beside, in that code's scale (the new weights' scale). At the step where the weights'
  scale doubles, the error of the step before, written with the old scale, is read back
  with the old scale: the target shows it (read with the new scale, it would count twice).
  """
  eta, beta = 0.5, 0.9
  fmt = eco.fp8_e4m3("tensor", scale_policy="sticky", headroom=2.0)
  q = eco.quantize_params({"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}, fmt)
  g = {"w": jnp.full((8, 8), 0.02).at[7, 7].set(-3.0)}     # drives the largest weight up
  tx = eco.sgdm(eta, beta, mode="eco_exact")
  state, update = tx.init(q), jax.jit(tx.update)
  kept_before = np.asarray(eco.kept_error(q, state)["w"])
  np.testing.assert_array_equal(kept_before, 0.0)  # e_0 = 0
  doubled = []
  for t in range(8):
    old_scale = float(q["w"].scale)
    w = q["w"].dequantize()
    m_tilde = beta * _momentum(state) + (1 - beta) * g["w"]
    target = w + kept_before - eta * m_tilde
    updates, state = update(g, state, q)
    q = eco.apply_updates(q, updates)
    new_scale = float(q["w"].scale)
    if new_scale == 2 * old_scale:
      doubled.append(t)
    # Read back: target - Q(w') to a count (1/512 of the grid step at the new code, in the
    # new scale). It is rounded stochastically: each element within one count of it, and
    # on average within half a count.
    kept = np.asarray(eco.kept_error(q, state)["w"])
    error = np.asarray(target - q["w"].dequantize())
    count = _count(q)
    assert np.max(np.abs(error)) > 0.01                       # not a trivial error
    assert np.all(np.abs(kept - error) <= count * (1 + 1e-6))
    assert np.mean(np.abs(kept - error) / count) < 0.5
    if doubled and doubled[-1] == t:   # e_t read with the new scale would be 2 e_t
      assert np.max(np.abs(kept - (error + kept_before)) / count) > 10
    kept_before = kept
  assert doubled and doubled[0] >= 1, doubled     # the scale doubled after a kept error
