"""eco_optax in the training code people already have: optax wrappers and Flax."""
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import eco_optax as eco


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (16, 8)) * 0.3, "b": jax.random.normal(k2, (8,)) * 0.1}


def _grads(params, i):
  return jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(jax.random.key(1), i),
                                                  p.shape), params)


# Every eco_optax optimizer, as optax's alias tests name them.
OPTIMIZERS = {"adamw": eco.adamw, "adam": eco.adam, "sgdm": eco.sgdm, "lion": eco.lion,
              "muon": eco.muon}
MOMENTUM = {"adamw": "b1", "adam": "b1", "sgdm": "momentum", "lion": "b1", "muon": "beta"}


def _bits(q):
  return np.asarray(jax.lax.bitcast_convert_type(q.values, jnp.uint8))


def _codes(q):
  """The storage bits of any format's codes (4-bit ones too)."""
  return np.asarray(eco.quantize.values_to_bits(q.values, q.fmt))


def test_clip_before_the_optimizer_is_clipping_the_gradients():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  g = _grads(_params(), 0)
  chained = optax.chain(optax.clip_by_global_norm(0.5), eco.adamw(0.1))
  plain = eco.adamw(0.1)
  u1, _ = chained.update(g, chained.init(q), q)
  clipped, _ = optax.clip_by_global_norm(0.5).update(g, optax.EmptyState())
  u2, _ = plain.update(clipped, plain.init(q), q)
  chex.assert_trees_all_equal(u1, u2)


def test_a_transformation_after_the_optimizer_is_refused_at_trace_time():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = optax.chain(eco.adamw(0.1), optax.scale(0.5))
  state = tx.init(q)

  @jax.jit
  def step(q, state, g):
    updates, state = tx.update(g, state, q)
    return eco.apply_updates(q, updates), state

  with pytest.raises(TypeError, match=r"\['w'\]: the update of this fp8_e4m3 leaf is NewCodes "
                                      r"with float32 bits"):
    step(q, state, _grads(_params(), 0))


@pytest.mark.parametrize("post,error,message", [
    (optax.clip_by_global_norm(1.0), TypeError, "lax.select requires arguments to have the same dtypes"),
    (optax.add_noise(0.1, 0.5, 0), ValueError, "must be a float or complex dtype, got uint8")],
    ids=["clip_by_global_norm", "add_noise"])
def test_transformations_after_the_optimizer_that_cannot_take_codes_fail_in_optax(
    post, error, message):
  """What docs/guide.md says of them: they raise optax's (JAX's) own error at trace time."""
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = optax.chain(eco.adamw(0.1), post)
  with pytest.raises(error, match=message):
    jax.jit(tx.update)(_grads(_params(), 0), tx.init(q), q)


@pytest.mark.parametrize("post", [
    optax.scale(2), optax.scale(-1), optax.scale_by_learning_rate(1),
    optax.scale_by_schedule(lambda count: 0.0), optax.scale_by_schedule(lambda count: 0.5),
    optax.scale_by_schedule(lambda count: 1.5),
    optax.scale_by_schedule(optax.linear_schedule(0.0, 1.0, 10))],
    ids=["scale(2)", "scale(-1)", "scale_by_learning_rate(1)", "schedule(0)", "schedule(0.5)",
         "schedule(1.5)", "warmup"])
def test_a_factor_after_the_optimizer_that_keeps_the_codes_uint8_poisons_the_leaf_and_says_why(post):
  """Integer factors, and schedules (optax casts their factor to the update's dtype), keep
  the codes uint8, so no dtype check sees them: the flags, multiplied by the exact factor,
  do. A schedule below 1 would otherwise zero the codes (read as "keep": a silent
  freeze), one in [1, 2) would be truncated to 1 (ignored)."""
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = optax.chain(eco.adamw(0.1), post)
  updates, _ = jax.jit(tx.update)(_grads(_params(), 0), tx.init(q), q)
  assert updates["w"].bits.dtype == np.uint8
  with pytest.warns(RuntimeWarning, match=r"\['w'\]: this update's flags are not ones an "
                                          r"eco_optax optimizer writes"):
    new = jax.block_until_ready(jax.jit(eco.apply_updates)(q, updates))
  assert np.all(np.isnan(np.asarray(new["w"].dequantize())))
  assert np.all(np.isfinite(np.asarray(new["b"])))        # a plain leaf: optax's arithmetic


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_each_member_of_a_vmapped_ensemble_steps_as_it_would_alone(name):
  tx = OPTIMIZERS[name](1e-2)
  members = [eco.quantize_params(jax.tree.map(lambda x, i=i: x * (1 + i), _params()),
                                 eco.fp8_e4m3()) for i in range(2)]
  grads = [_grads(_params(), i) for i in range(2)]

  def step(q, state, g):
    updates, state = tx.update(g, state, q)
    return eco.apply_updates(q, updates), state

  stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
  together, _ = jax.jit(jax.vmap(step))(stack(members), jax.vmap(tx.init)(stack(members)),
                                        stack(grads))
  for i in range(2):
    alone, _ = jax.jit(step)(members[i], tx.init(members[i]), grads[i])
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], together), alone)


@pytest.mark.parametrize("policy", ["sticky", "fixed"])
def test_run_time_warnings_under_vmap_concern_only_the_members_they_name(policy):
  """Under jax.vmap a conditional runs both branches: an ensemble's step warns for the
  members whose updates were altered, and never for members whose updates are valid."""
  q = eco.quantize_params(_params(), eco.fp8_e4m3(scale_policy=policy))
  tx = eco.adamw(1e-3)
  members = jax.tree.map(lambda a: jnp.stack([a, a]), q)
  grads = jax.tree.map(lambda a: jnp.stack([a, -a]), _grads(_params(), 0))
  updates, _ = jax.jit(jax.vmap(tx.update))(grads, jax.vmap(tx.init)(members), members)
  apply = jax.jit(jax.vmap(eco.apply_updates))

  def run(updates):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      new = jax.block_until_ready(apply(members, updates))
      jax.effects_barrier()
    return new, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]

  new, caught = run(updates)
  assert caught == []
  assert np.all(np.isfinite(np.asarray(jax.vmap(eco.dequantize)(new["w"]))))
  halved = updates["w"]._replace(flags=updates["w"].flags * jnp.array([1.0, 0.5]))
  new, caught = run({**updates, "w": halved})
  assert len(caught) == 1 and "['w']: this update's flags are not ones" in caught[0]
  values = np.asarray(jax.vmap(eco.dequantize)(new["w"]))
  assert np.all(np.isfinite(values[0])) and np.all(np.isnan(values[1]))


def test_a_factor_of_one_after_the_optimizer_changes_nothing():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  g = _grads(_params(), 0)
  tx = optax.chain(eco.adamw(0.1), optax.scale_by_schedule(lambda count: 1.0))
  updates, _ = jax.jit(tx.update)(g, tx.init(q), q)
  reference, _ = eco.adamw(0.1).update(g, eco.adamw(0.1).init(q), q)
  chex.assert_trees_all_equal(updates, reference)
  np.testing.assert_array_equal(_bits(eco.apply_updates(q, updates)["w"]),
                                _bits(eco.apply_updates(q, reference)["w"]))


@pytest.mark.parametrize("fmt", [eco.fp8_e4m3(), eco.int4(), eco.fp4_e2m1("nvfp4")],
                         ids=["fp8", "int4", "nvfp4"])
def test_freezing_quantized_leaves_in_multi_transform_keeps_them_bit_for_bit(fmt):
  q = eco.quantize_params({"frozen": _params()["w"], "w": _params()["w"], "b": _params()["b"]},
                          fmt)
  labels = {"frozen": "freeze", "w": "train", "b": "freeze"}
  tx = optax.multi_transform({"train": eco.adamw(0.1), "freeze": eco.set_to_zero()}, labels)
  state, new = tx.init(q), q
  step = jax.jit(lambda g, state, q: tx.update(g, state, q))
  for i in range(3):
    g = {"frozen": _grads(_params(), i)["w"], "w": _grads(_params(), i)["w"],
         "b": _grads(_params(), i)["b"]}
    updates, state = step(g, state, new)
    new = jax.jit(eco.apply_updates)(new, updates)
  np.testing.assert_array_equal(_codes(new["frozen"]), _codes(q["frozen"]))
  np.testing.assert_array_equal(np.asarray(new["frozen"].scale, np.float32),
                                np.asarray(q["frozen"].scale, np.float32))
  np.testing.assert_array_equal(np.asarray(new["b"]), np.asarray(q["b"]))
  assert np.any(np.asarray(new["w"].dequantize()) != np.asarray(q["w"].dequantize()))


def test_optax_set_to_zero_on_a_quantized_leaf_is_refused_naming_the_drop_in():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = optax.multi_transform({"train": eco.adamw(0.1), "freeze": optax.set_to_zero()},
                             {"w": "freeze", "b": "train"})
  updates, _ = tx.update(_grads(_params(), 0), tx.init(q), q)
  with pytest.raises(TypeError, match=r"\['w'\]: the update of this fp8_e4m3 leaf is an array "
                     r"of float32.*give them eco_optax.set_to_zero\(\) in optax.multi_transform"):
    eco.apply_updates(q, updates)
  with pytest.raises(ValueError, match="eco_optax.set_to_zero needs params"):
    eco.set_to_zero().update(_grads(_params(), 0), optax.EmptyState())


# Gradient transformations that read the params, or keep a state shaped like them.
BEFORE = {"add_decayed_weights": lambda: optax.add_decayed_weights(1e-1),
          "trace": lambda: optax.trace(0.5),
          "adaptive_grad_clip": lambda: optax.adaptive_grad_clip(0.05)}


@pytest.mark.parametrize("before", BEFORE)
def test_a_transformation_before_the_optimizer_that_reads_params_is_refused_naming_the_wrapper(
    before):
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = optax.chain(BEFORE[before](), eco.adam(1e-2))
  with pytest.raises(TypeError, match=r"wrap it in eco_optax.with_dequantized_params"):
    tx.update(_grads(_params(), 0), tx.init(q), q)


@pytest.mark.parametrize("before", BEFORE)
def test_with_dequantized_params_before_the_optimizer_equals_the_optax_chain(before):
  """With the lossless format the chain is optax's chain on FP32 params."""
  params = _params()
  q = eco.quantize_params(params, eco.lossless())
  ours = optax.chain(eco.with_dequantized_params(BEFORE[before]()), eco.adam(1e-2))
  ref = optax.chain(BEFORE[before](), optax.adam(1e-2))
  ours_state, ref_state = ours.init(q), ref.init(params)
  for i in range(5):
    g = _grads(params, i)
    updates, ours_state = jax.jit(ours.update)(g, ours_state, q)
    q = eco.apply_updates(q, updates)
    updates, ref_state = jax.jit(ref.update)(g, ref_state, params)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_close(eco.dequantize_params(q), params, atol=1e-6, rtol=0)


def test_with_dequantized_params_keeps_its_state_shaped_like_the_gradients():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = optax.chain(eco.with_dequantized_params(optax.trace(0.5)), eco.adamw(1e-2))
  state = tx.init(q)
  chex.assert_trees_all_equal_shapes_and_dtypes(state[0].trace, eco.dequantize_params(q))
  updates, state = jax.jit(tx.update)(_grads(_params(), 0), state, q)
  new = eco.apply_updates(q, updates)
  assert new["w"].values.dtype == jnp.float8_e4m3fn
  assert not np.array_equal(_bits(new["w"]), _bits(q["w"]))


def test_flax_train_state_drop_in_equals_the_functional_loop():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = eco.adamw(0.05, rounding="stochastic")
  state = eco.TrainState.create(apply_fn=None, params=q, tx=tx)
  opt_state, ref = tx.init(q), q

  @jax.jit
  def functional(q, opt_state, g):
    updates, opt_state = tx.update(g, opt_state, q)
    return eco.apply_updates(q, updates), opt_state

  for i in range(3):
    g = _grads(_params(), i)
    state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, g)
    ref, opt_state = functional(ref, opt_state, g)
  assert int(state.step) == 3
  np.testing.assert_array_equal(_bits(state.params["w"]), _bits(ref["w"]))
  np.testing.assert_array_equal(np.asarray(state.params["b"]), np.asarray(ref["b"]))


def test_plain_flax_train_state_fails_loudly_not_silently():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  state = train_state.TrainState.create(apply_fn=None, params=q, tx=eco.adamw(0.1))
  with pytest.raises(ValueError, match="QuantizedArray"):
    state.apply_gradients(grads=_grads(_params(), 0))


@pytest.mark.parametrize("name,k", [("adamw", 2), *[(name, 4) for name in OPTIMIZERS]])
def test_multisteps_is_one_step_on_the_mean_gradient(name, k):
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  acc = eco.MultiSteps(OPTIMIZERS[name](0.2), every_k_schedule=k)
  state, qa = acc.init(q), q
  update = jax.jit(acc.update)
  grads = [_grads(_params(), i) for i in range(k)]
  for i, g in enumerate(grads):
    updates, state = update(g, state, qa)
    new = eco.apply_updates(qa, updates)
    if i < k - 1:   # zero updates: nothing moves, not even a scale
      assert float(updates["w"].flags) == eco.tree.KEEP and not np.any(np.asarray(updates["w"].bits))
      np.testing.assert_array_equal(_bits(new["w"]), _bits(qa["w"]))
      np.testing.assert_array_equal(np.asarray(new["w"].scale), np.asarray(qa["w"].scale))
    qa = new
  # optax's running mean, as MultiSteps computes it (jitted: the same arithmetic)
  running = jax.jit(lambda acc, g, n: jax.tree.map(lambda a, b: a + (b - a) / (n + 1), acc, g))
  mean = jax.tree.map(jnp.zeros_like, grads[0])
  for n, g in enumerate(grads):
    mean = running(mean, g, jnp.asarray(n, jnp.int32))
  one = OPTIMIZERS[name](0.2)
  updates, _ = jax.jit(one.update)(mean, one.init(q), q)
  ref = eco.apply_updates(q, updates)
  np.testing.assert_array_equal(_bits(qa["w"]), _bits(ref["w"]))   # the codes: bit for bit
  # The FP32 bias is computed inside MultiSteps' conditional, which XLA may compile a
  # few ulps of the 0.2 step apart from the same arithmetic outside it.
  np.testing.assert_allclose(np.asarray(qa["b"]), np.asarray(ref["b"]), rtol=0, atol=1e-7)
  assert int(state.gradient_step) == 1


def test_optax_apply_every_after_the_optimizer_is_refused_at_trace_time():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = optax.chain(eco.adamw(0.1), optax.apply_every(2))
  # apply_every adds the new codes to an accumulator shaped like the params
  with pytest.raises(ValueError, match=r"(?s)tree\['w'\].*NewCodes.*QuantizedArray"):
    jax.jit(tx.update)(_grads(_params(), 0), tx.init(q), q)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_inject_hyperparams_changes_the_learning_rate_between_steps(name):
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = optax.inject_hyperparams(OPTIMIZERS[name], hyperparam_dtype=jnp.float32)(
      learning_rate=0.1, **{MOMENTUM[name]: 0.9})     # a traced momentum is accepted too
  state = tx.init(q)
  update = jax.jit(tx.update)
  g = _grads(_params(), 0)
  first, state = update(g, state, q)
  assert np.any(_bits(eco.apply_updates(q, first)["w"]) != _bits(q["w"]))
  state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
  updates, state = update(g, state, q)
  after = eco.apply_updates(q, updates)
  # A zero learning rate keeps every code; the plain leaf does not move either.
  np.testing.assert_array_equal(_bits(after["w"]), _bits(q["w"]))
  np.testing.assert_array_equal(np.asarray(after["b"]), np.asarray(q["b"]))
  assert update._cache_size() == 1     # the new learning rate did not recompile


def test_multi_transform_with_labels_from_the_params():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  labels = jax.tree.map(lambda p: "eco" if eco.is_quantized(p) else "adam", q,
                        is_leaf=eco.is_quantized)
  tx = optax.multi_transform({"eco": eco.adamw(0.1), "adam": optax.adam(0.1)}, labels)
  state = tx.init(q)
  g = _grads(_params(), 0)
  updates, state = jax.jit(tx.update)(g, state, q)
  assert updates["w"].bits.dtype == jnp.uint8
  ref, _ = optax.adam(0.1).update({"b": g["b"]}, optax.adam(0.1).init({"b": q["b"]}))
  np.testing.assert_allclose(np.asarray(updates["b"]), np.asarray(ref["b"]), rtol=1e-6)
  new = eco.apply_updates(q, updates)
  assert new["w"].values.dtype == q["w"].values.dtype


def test_multi_transform_with_a_label_function_is_refused_naming_the_label_tree():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  labels = lambda p: jax.tree.map(lambda x: "eco" if eco.is_quantized(x) else "adam", p,
                                  is_leaf=eco.is_quantized)
  tx = optax.multi_transform({"eco": eco.adamw(1e-2), "adam": optax.adam(1e-3)}, labels)
  with pytest.raises(ValueError, match=r"lack: \[\"\['w'\]\"\]\. Under optax.multi_transform "
                                       r"or optax.masked, give the labels"):
    tx.update(_grads(_params(), 0), tx.init(q), q)


def test_optax_apply_if_finite_is_refused_at_trace_time():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = optax.apply_if_finite(eco.adamw(0.1), max_consecutive_errors=3)
  with pytest.raises(TypeError, match=r"(?s)\[0\]\['w'\] is a <class 'eco_optax.tree.NewCodes'>"
                                      r".*is a pytree leaf"):
    jax.jit(tx.update)(_grads(_params(), 0), tx.init(q), q)


def test_apply_if_finite_skips_the_step_exactly():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = eco.apply_if_finite(eco.adamw(0.1), max_consecutive_errors=3)
  state = tx.init(q)
  g = _grads(_params(), 0)
  bad = {"w": g["w"].at[0, 0].set(jnp.nan), "b": g["b"]}
  updates, state = jax.jit(tx.update)(bad, state, q)
  new = eco.apply_updates(q, updates)
  np.testing.assert_array_equal(_bits(new["w"]), _bits(q["w"]))
  np.testing.assert_array_equal(np.asarray(new["b"]), np.asarray(q["b"]))
  assert int(state.notfinite_count) == 1
  good, state = jax.jit(tx.update)(g, state, q)        # a finite step goes through
  ref, _ = eco.adamw(0.1).update(g, eco.adamw(0.1).init(q), q)
  chex.assert_trees_all_equal(good["w"], ref["w"])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float64], ids=["bf16", "x64"])
def test_apply_if_finite_takes_gradients_in_other_dtypes(dtype):
  """bfloat16 gradients (a bfloat16 model's), or float64 ones under ``jax_enable_x64``:
  optax's conditional made a rejected step's zeros in their dtype beside the FP32
  updates (a TypeError at trace time). A finite step is the optimizer's own, a
  non-finite one is skipped."""
  with jax.enable_x64(dtype == jnp.float64):
    q = eco.quantize_params(jax.tree.map(lambda x: x.astype(dtype), _params()), eco.fp8_e4m3())
    g = jax.tree.map(lambda x: x.astype(dtype), _grads(_params(), 0))
    tx = eco.apply_if_finite(eco.adamw(0.1), max_consecutive_errors=3)
    state = tx.init(q)
    bad = {"w": g["w"].at[0, 0].set(jnp.nan), "b": g["b"]}
    updates, state = jax.jit(tx.update)(bad, state, q)
    np.testing.assert_array_equal(_bits(eco.apply_updates(q, updates)["w"]), _bits(q["w"]))
    assert int(state.notfinite_count) == 1
    good, _ = jax.jit(tx.update)(g, state, q)
    ref, _ = jax.jit(eco.adamw(0.1).update)(g, eco.adamw(0.1).init(q), q)
    chex.assert_trees_all_equal(good, ref)


@pytest.mark.parametrize("make", [lambda: eco.adamw(0.1), lambda: eco.sgdm(0.1),
                                  lambda: eco.adamw(0.1, mode="master_weights"),
                                  lambda: eco.apply_if_finite(eco.adamw(0.1), 3)],
                         ids=["adamw", "sgdm", "master_weights", "apply_if_finite"])
def test_float64_params_keep_the_state_dtypes_from_step_to_step(make):
  """Under ``jax_enable_x64`` a float64 bias's moments are float64 from ``init`` on, as
  optax makes them: they stayed FP32 there and came back float64 from the first step
  (a second compilation; ``lax.scan`` and ``apply_if_finite`` refused the carry)."""
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: x.astype(jnp.float64), _params())
    q = eco.quantize_params(params, eco.fp8_e4m3())
    tx = make()
    state = tx.init(q)
    step = jax.jit(tx.update)
    _, new = step(jax.tree.map(lambda x: x.astype(jnp.float64), _grads(_params(), 0)), state, q)
    chex.assert_trees_all_equal_dtypes(new, state)
    bias_moments = [x for x in jax.tree.leaves(state) if x.shape == (8,)]
    assert bias_moments and all(x.dtype == jnp.float64 for x in bias_moments)


@pytest.mark.parametrize("make", [
    lambda: eco.apply_if_finite(eco.MultiSteps(eco.adamw(0.1), 2), max_consecutive_errors=3),
    lambda: eco.MultiSteps(eco.adamw(0.1), 2, should_skip_update_fn=optax.skip_not_finite)],
    ids=["apply_if_finite_outside", "skip_not_finite"])
def test_a_non_finite_micro_batch_is_skipped_under_gradient_accumulation(make):
  """The arrangements docs/integrations.md gives: the weights stay finite and train on."""
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = make()
  state, update = tx.init(q), jax.jit(tx.update)
  for i in range(8):
    g = _grads(_params(), i)
    g = {"w": g["w"].at[0, 0].set(jnp.nan), "b": g["b"]} if i == 1 else g
    updates, state = update(g, state, q)
    q = eco.apply_updates(q, updates)
  w = eco.dequantize_params(q)["w"]
  assert bool(jnp.all(jnp.isfinite(w)))
  assert not np.array_equal(_bits(q["w"]), _bits(eco.quantize_params(_params(), eco.fp8_e4m3())["w"]))


def test_large_finite_bfloat16_weights_are_not_taken_for_a_fault():
  """An unscaled bfloat16 column whose values sum past FP32's range is finite: it is
  stepped, not poisoned; an infinite gradient in it still is."""
  w = jnp.array([1e38, 1e38, 1e38, 1e38])[:, None] * jnp.ones((1, 4))
  q = eco.quantize_params({"w": w}, eco.bf16())
  tx = eco.sgdm(1e-3, mode="naive", rounding="nearest")
  for g, valid in ((jnp.ones((4, 4)), True), (jnp.ones((4, 4)).at[1, 2].set(jnp.inf), False)):
    updates, _ = jax.jit(tx.update)({"w": g}, tx.init(q), q)
    new = eco.apply_updates(q, updates)["w"].dequantize()
    assert (float(updates["w"].flags) == eco.tree.VALID) == valid
    assert bool(jnp.all(jnp.isfinite(new))) == valid


@pytest.mark.parametrize("fmt", [eco.fp8_e4m3(), eco.int4(), eco.fp4_e2m1("mxfp4", block_size=8)],
                         ids=["fp8", "int4", "mxfp4"])
def test_a_non_finite_gradient_shows_in_the_weights(fmt):
  q = eco.quantize_params(_params(), fmt)
  tx = eco.adamw(0.1)
  g = _grads(_params(), 0)
  updates, _ = tx.update({"w": g["w"].at[3, 2].set(jnp.inf), "b": g["b"]}, tx.init(q), q)
  new = eco.dequantize_params(eco.apply_updates(q, updates))
  assert np.all(np.isnan(np.asarray(new["w"])))      # the poisoned leaf: visibly NaN
  assert np.all(np.isfinite(np.asarray(new["b"])))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_infinite_gradient_entry_shows_in_the_weights_of_every_optimizer(name):
  """One infinite entry: Muon's preconditioner takes an SVD of the momentum, which
  LAPACK never returns from on an infinite matrix; the leaf must turn NaN instead."""
  params = {"w": jax.random.normal(jax.random.key(0), (8, 4)) * 0.3, "b": jnp.zeros(4)}
  q = eco.quantize_params(params, eco.fp8_e4m3())
  tx = OPTIMIZERS[name](0.1)
  g = {"w": jnp.ones((8, 4)).at[0, 0].set(jnp.inf), "b": jnp.ones(4)}
  updates, _ = jax.jit(tx.update)(g, tx.init(q), q)
  new = eco.dequantize_params(eco.apply_updates(q, updates))
  assert np.all(np.isnan(np.asarray(new["w"])))
  assert np.all(np.isfinite(np.asarray(new["b"])))


def test_a_non_finite_learning_rate_shows_in_the_weights():
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  tx = eco.adamw(lambda count: jnp.nan * count)    # a broken schedule
  updates, _ = tx.update(_grads(_params(), 0), tx.init(q), q)
  new = eco.dequantize_params(eco.apply_updates(q, updates))
  assert np.all(np.isnan(np.asarray(new["w"])))
  assert np.all(np.isnan(np.asarray(new["b"])))


def test_state_for_other_formats_is_refused_with_both_formats():
  params = _params()
  tx = eco.adamw(0.1, mode="eco_exact")
  state = tx.init(eco.quantize_params(params, eco.fp8_e4m3()))
  with pytest.raises(ValueError, match=r"\['w'\]: params are stored as int4 .* built for fp8_e4m3"):
    tx.update(_grads(params, 0), state, eco.quantize_params(params, eco.int4()))


@pytest.mark.parametrize("make", [
    lambda: eco.adamw(0.05), lambda: eco.sgdm(0.05), lambda: eco.lion(0.01),
    lambda: eco.adam(0.05, rounding="stochastic"), lambda: eco.muon(0.05)],
    ids=["adamw", "sgdm", "lion", "adam-sr", "muon"])
def test_parabola_and_rosenbrock(make):
  # optax's alias tests: minimise a parabola and Rosenbrock's function from fixed starts.
  for target, start, steps, tol in [
      (lambda p: jnp.sum((p["x"] - 1.0) ** 2), jnp.full((4, 4), -1.0), 600, 0.1),
      (lambda p: jnp.sum((1 - p["x"][:, 0]) ** 2
                         + 10 * (p["x"][:, 1] - p["x"][:, 0] ** 2) ** 2),
       jnp.zeros((8, 2)), 1500, 0.25)]:
    q = eco.quantize_params({"x": start}, eco.int8(scale_policy="sticky", headroom=2.0))
    tx = make()
    state = tx.init(q)

    @jax.jit
    def step(q, state):
      updates, state = tx.update(eco.grad(target)(q), state, q)
      return eco.apply_updates(q, updates), state

    for _ in range(steps):
      q, state = step(q, state)
    assert float(target(eco.dequantize_params(q))) < tol * float(target({"x": start}))
    assert step._cache_size() == 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_keeps_its_shapes_and_dtypes_under_lax_cond(name):
  q = eco.quantize_params(_params(), eco.fp8_e4m3())
  if name in ("lion", "muon"):   # they refuse the exact rule
    tx = OPTIMIZERS[name](0.1, mode="master_weights", mu_dtype=jnp.bfloat16)
  else:                          # its error in the FP32 first moment's low 10 bits
    tx = OPTIMIZERS[name](0.1, mode="eco_exact", **({} if name == "sgdm" else
                                                     {"nu_dtype": jnp.bfloat16}))
  state = tx.init(q)
  g = _grads(_params(), 0)
  new = jax.jit(lambda s: jax.lax.cond(True, lambda s: tx.update(g, s, q)[1],
                                       lambda s: s, s))(state)
  chex.assert_trees_all_equal_shapes_and_dtypes(new, state)    # and the same structure


@pytest.mark.parametrize("spec", [eco.moments.blockwise_8bit(), jnp.bfloat16, None],
                         ids=["8bit", "bf16", "fp32"])
def test_every_state_leaf_keeps_its_sharding_through_a_jitted_step(spec):
  # A 2-D mesh, weights split over both axes, no out_shardings: what the user placed stays.
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  P = jax.sharding.PartitionSpec
  params = {"w": jax.random.normal(jax.random.key(0), (64, 512)) * 0.1, "b": jnp.zeros(512)}
  q = eco.quantize_params(params, eco.fp8_e4m3())
  tx = eco.adamw(1e-2, rounding="stochastic", mu_dtype=spec, nu_dtype=spec)
  state = tx.init(q)

  def place(x):   # rows over "data" as the weight's; the last axis over "model" if it splits
    last = ["model" if x.ndim and x.shape[-1] % 2 == 0 else None]
    rows = ["data" if x.shape[0] == 64 else None] if x.ndim == 2 else []
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, P(*rows, *last[:x.ndim])))

  q, state = jax.tree.map(place, (q, state))

  @jax.jit
  def step(q, state, g):
    updates, state = tx.update(g, state, q)
    return eco.apply_updates(q, updates), state

  grads = jax.tree.map(place, _grads(params, 0))
  new = step(*step(q, state, grads), grads)
  old_leaves = jax.tree_util.tree_flatten_with_path((q, state))[0]
  for (path, old), fresh in zip(old_leaves, jax.tree.leaves(new)):
    assert fresh.sharding.is_equivalent_to(old.sharding, old.ndim), (
        jax.tree_util.keystr(path), old.sharding, fresh.sharding)
  mu = new[1].moments.mu["w"]
  assert getattr(mu, "codes", mu).sharding.spec == P("data", "model")
  assert step._cache_size() == 1


def test_plain_nnx_optimizer_is_refused_where_it_is_built_and_names_the_drop_in():
  from flax import nnx
  from eco_optax import nnx as eco_nnx
  model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  eco_nnx.quantize_model(model, eco.fp8_e4m3())
  with pytest.raises(TypeError, match=r"\['kernel'\]: this quantized weight is a flax.nnx "
                                      r"Variable.*eco_optax.nnx.Optimizer\(model, tx"):
    nnx.Optimizer(model, eco.adamw(1e-2), wrt=nnx.Param)
  optimizer = eco_nnx.Optimizer(model, eco.adamw(1e-2), wrt=nnx.Param)   # the drop-in
  grads = eco_nnx.grad(lambda m: jnp.mean(m(jnp.ones((2, 8))) ** 2))(model)
  before = _bits(model.kernel.get_value())
  optimizer.update(model, grads)
  assert model.kernel.get_value().values.dtype == jnp.float8_e4m3fn
  assert np.any(_bits(model.kernel.get_value()) != before)
  assert int(optimizer.step[...]) == 1
