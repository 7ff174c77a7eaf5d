"""Helpers shared by the tests."""
import jax
import jax.numpy as jnp
import numpy as np

import eco_optax as eco


def ramp_problem(fmt=eco.int4("tensor", headroom=1.0)):
  """An 8x8 ramp of weights stored in ``fmt`` and a ramp of gradients."""
  q = eco.quantize_params({"w": jnp.linspace(-1, 1, 64).reshape(8, 8)}, fmt)
  return q, {"w": jnp.linspace(0.3, -0.2, 64).reshape(8, 8)}


def leaf_bytes(tree):
  """Every leaf (codes, scales, moments, key data) as raw bytes, for exact comparison."""
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def train_steps(tx, q, loss_fn, batch, steps):
  """``steps`` jitted steps of ``tx`` from ``q`` on ``loss_fn(params, *batch(i))``.

  Gradients are taken at the dequantized weights. Returns ``(losses, final params, final
  optimizer state)``.
  """
  state = tx.init(q)

  @jax.jit
  def step(q, state, i):
    loss, grads = jax.value_and_grad(loss_fn)(eco.dequantize_params(q), *batch(i))
    updates, state = tx.update(grads, state, q)
    return eco.apply_updates(q, updates), state, loss

  losses = []
  for i in range(steps):
    q, state, loss = step(q, state, i)
    losses.append(float(loss))
  return losses, q, state


def quadratic_rms_errors(fmt, w0, w_star, steps_by_lr, mode, curvature=1.0):
  """SGDM (momentum 0.9) on ``f(w) = (curvature / 2) ||w - w_star||^2`` from ``w0`` stored in
  ``fmt``: ``{lr: RMS distance to w_star after steps_by_lr[lr] steps}``.

  One executable for every learning rate (``lr`` and the step count are its arguments).
  """
  q = eco.quantize_params({"w": w0}, fmt)

  @jax.jit
  def train(lr, steps):
    tx = eco.sgdm(lr, momentum=0.9, mode=mode)

    def body(_, carry):
      q, state = carry
      grads = {"w": curvature * (eco.dequantize_params(q)["w"] - w_star)}
      updates, state = tx.update(grads, state, q)
      return eco.apply_updates(q, updates), state

    q_end, _ = jax.lax.fori_loop(0, steps, body, (q, tx.init(q)))
    return jnp.sqrt(jnp.mean((eco.dequantize_params(q_end)["w"] - w_star) ** 2))

  return {lr: float(train(jnp.float32(lr), steps)) for lr, steps in steps_by_lr.items()}
