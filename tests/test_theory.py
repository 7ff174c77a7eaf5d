"""The paper's theory at small scale, on f(w) = (L/2) ||w - w*||^2 with SGDM.

Master-weight removal without feedback (naive RTN) freezes once ``eta * |grad|``
falls below half a grid step, so its error grows as the learning rate shrinks;
ECO keeps a radius set by the grid alone (paper: ``sigma_q^2 -> 4 L^2 sigma^2 /
(1 - beta^2)``), as master weights do.
"""
import jax
import pytest
import jax.numpy as jnp
import numpy as np

import eco_optax as eco
from _helpers import quadratic_rms_errors

L = 1.0
W_STAR = jax.random.uniform(jax.random.key(0), (32, 32), minval=-1.0, maxval=1.0)
FMT = eco.int8("tensor", scale_policy="fixed", headroom=1.0)


@pytest.mark.filterwarnings("ignore:.*scale_policy='fixed':RuntimeWarning")  # the fixed range is the point
def test_naive_error_grows_as_lr_shrinks_while_eco_stays_in_a_constant_radius():
  errors = {(m, lr): error for m in ("naive", "eco", "master_weights")
            for lr, error in quadratic_rms_errors(FMT, jnp.sign(W_STAR), W_STAR,
                                                  {lr: int(20 / lr) for lr in (0.05, 0.005)},
                                                  m, L).items()}
  print("RMS distance to the optimum:", errors)
  grid_rms = (1.0 / 127) / np.sqrt(12)   # RMS rounding error of the int8 grid
  assert errors[("naive", 0.005)] > 3 * errors[("naive", 0.05)]     # grows as lr shrinks
  assert errors[("naive", 0.005)] > 20 * errors[("eco", 0.005)]
  assert errors[("eco", 0.005)] < 1.5 * errors[("eco", 0.05)]       # constant radius
  for lr in (0.05, 0.005):
    assert errors[("eco", lr)] < 2 * grid_rms
    assert errors[("eco", lr)] < 1.5 * errors[("master_weights", lr)]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*scale_policy='fixed':RuntimeWarning")  # the fixed range is the point
def test_consecutive_quantization_errors_are_aligned():
  """The approximation e_t ~ e_{t+1} behind ECO's memory-free rule (paper Fig. 3)."""
  lr, beta = 0.02, 0.9
  alpha = (1 / lr) * (1 - 1 / beta)
  key = jax.random.key(1)
  q = eco.quantize_params({"w": jnp.sign(W_STAR)}, FMT)   # range [-1, 1]
  tx = eco.sgdm(lr, momentum=beta, mode="eco_memory_free", rounding="nearest")
  state = tx.init(q)

  @jax.jit        # one executable for the 300 steps (eager apply_updates compiles each call)
  def step(q, state, sub):
    g = {"w": L * (eco.dequantize_params(q)["w"] - W_STAR)
              + 0.05 * jax.random.normal(sub, W_STAR.shape)}
    m_tilde = beta * state.moments.mu["w"] + (1 - beta) * g["w"]
    updates, state = tx.update(g, state, q)
    return eco.apply_updates(q, updates), state, (state.moments.mu["w"] - m_tilde) / alpha

  errors = []
  for t in range(300):
    key, sub = jax.random.split(key)
    q, state, e = step(q, state, sub)
    errors.append(e)                                  # e_t, recovered from m
  e = np.stack([np.asarray(x).ravel() for x in errors[100:]])
  cos = np.sum(e[1:] * e[:-1], 1) / (np.linalg.norm(e[1:], axis=1) * np.linalg.norm(e[:-1], axis=1))
  ratio = np.linalg.norm(e[1:], axis=1) / np.linalg.norm(e[:-1], axis=1)
  print(f"consecutive-error cosine: mean {cos.mean():.3f}, min {cos.min():.3f}; "
        f"norm ratio mean {ratio.mean():.3f}")
  assert cos.mean() > 0.6 and 0.8 < ratio.mean() < 1.25


def _first_move(mode, lr, grad=1.0, steps=1000):
  """The step at which a weight with a constant gradient first leaves its code (or None)."""
  w = jnp.zeros((1, 128)).at[0, 0].set(1.27)          # int8 tensor-wise: grid step 0.01
  q = eco.quantize_params({"w": w}, eco.int8("tensor", scale_policy="fixed", headroom=1.0))
  g = {"w": jnp.full((1, 128), grad).at[0, 0].set(0.0)}
  tx = eco.sgdm(lr, momentum=0.9, mode=mode, rounding="nearest")

  def body(carry, _):
    q, state = carry
    updates, state = tx.update(g, state, q)
    q = eco.apply_updates(q, updates)
    return (q, state), eco.dequantize_params(q)["w"][0, 1]

  _, path = jax.jit(lambda c: jax.lax.scan(body, c, None, steps))((q, tx.init(q)))
  moved = np.flatnonzero(np.asarray(path) != 0.0)
  return int(moved[0]) + 1 if moved.size else None


def test_memory_free_eco_waits_1_over_1_minus_b1_times_longer_for_a_first_move():
  # SGDM steps of 1e-4 (after the EMA's warm-up of b1/(1 - b1) = 9 steps) against a half
  # grid step of 5e-3: master weights move after 50 + 9 steps. While the weight stays,
  # the memory-free rule's momentum before injection grows by (1 - b1) g a step
  # (m~_k = k (1 - b1) g), so a single step reaches half a grid step only after
  # 50 / (1 - b1) = 500 steps. The exact rule keeps the vanished steps and moves with
  # master weights (within a few steps: it keeps its error in counts of 1/512 grid step,
  # 5.12 counts a step here, rounded stochastically: over 59 steps the rounding wanders
  # by about sqrt(59)/2 counts, one step's worth); naive rounding never moves.
  lr = 1e-4
  mw, eco_free, exact, eco_rtn = (_first_move(m, lr) for m in (
      "master_weights", "eco_memory_free", "eco_exact", "eco"))
  assert mw == 59 and abs(exact - mw) <= 6 and eco_rtn == exact
  assert eco_free == 501
  assert _first_move("naive", lr) is None
