"""Helpers shared by the tests."""
import jax

import eco_optax as eco


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
