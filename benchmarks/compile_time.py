"""Compile time of a whole train step, against the number of quantized leaves.

The byte-level transformer of ``python -m benchmarks`` at several depths (its block
linears quantized, FP8 E4M3 row-wise: four matrices per block), one jitted, donated
train step (forward, backward with ``eco.grad``, optimizer, apply) per method. Each
quantized leaf is its own piece of the program (on CPU: a loop over blocks of rows and
the conditionals that schedule it), so tracing and compiling grow with their number,
while ``optax.adamw``'s step is a few fused loops whatever the depth. Timed: tracing and
lowering (``jax.jit(...).lower``) and XLA's compilation (``.compile()``), seconds, in
one process, the methods taking turns.

Run: ``python -m benchmarks.compile_time [--depths 2,8,24]``.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import eco_optax as eco
from benchmarks import model as lm

METHODS: dict[str, Callable[[], optax.GradientTransformation | None]] = {
    "optax.adamw (fp32)": lambda: None,
    "ECO-RTN": lambda: eco.adamw(1e-3, rounding="nearest"),
    "ECO-SR": lambda: eco.adamw(1e-3),
    "ECO-RTN memory-free": lambda: eco.adamw(1e-3, mode="eco_memory_free", rounding="nearest"),
}


class CompileTime(NamedTuple):
  depth: int
  quantized_leaves: int
  method: str
  lower_s: float
  compile_s: float


def measure(depth: int, width: int = 128, batch: int = 8) -> list[CompileTime]:
  """Every method of :data:`METHODS` on the benchmark transformer of this depth."""
  cfg = lm.ModelConfig(depth=depth, width=width)
  graphdef, params = lm.init(cfg)
  loss = lm.make_loss_fn(graphdef)
  tokens = jnp.zeros((batch, cfg.seq_len + 1), jnp.int32)
  rows = []
  for method, make in METHODS.items():
    tx = make()
    if tx is None:
      p, tx, grad, apply = params, optax.adamw(1e-3), jax.grad(loss), optax.apply_updates
    else:
      p = eco.quantize_params(params, lm.block_linear_policy(eco.fp8_e4m3()))
      grad, apply = eco.grad(loss), eco.apply_updates
    state = tx.init(p)

    def train_step(p, s, t):
      updates, s = tx.update(grad(p, t), s, p)
      return apply(p, updates), s

    start = time.perf_counter()
    lowered = jax.jit(train_step, donate_argnums=(0, 1)).lower(p, state, tokens)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    leaves = sum(map(eco.is_quantized, jax.tree.leaves(p, is_leaf=eco.is_quantized)))
    rows.append(CompileTime(depth, leaves, method, lowered_at - start, done - lowered_at))
  return rows


def main(argv: list[str] | None = None) -> list[CompileTime]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--depths", default="2,8,24")
  parser.add_argument("--width", type=int, default=128)
  args = parser.parse_args(argv)
  rows = [r for d in args.depths.split(",") for r in measure(int(d), args.width)]
  print(f"{'depth':>5} {'quantized leaves':>16} {'method':<26} {'trace+lower s':>13} "
        f"{'compile s':>9} {'total vs adamw':>14}")
  for r in rows:
    base = next(b for b in rows if b.depth == r.depth and b.method.startswith("optax"))
    ratio = (r.lower_s + r.compile_s) / (base.lower_s + base.compile_s)
    print(f"{r.depth:5d} {r.quantized_leaves:16d} {r.method:<26} {r.lower_s:13.2f} "
          f"{r.compile_s:9.2f} {ratio:13.1f}x")
  return rows


if __name__ == "__main__":
  main()
