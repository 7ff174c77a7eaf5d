"""Optimizer-step benchmark: one jitted ``update`` + ``apply_updates``.

Times, side by side in one process, AdamW with ECO (RTN: the exact rule, its error in
the momentum's low bits; SR), AdamW with FP32 master weights, the paper's memory-free
ECO-RTN (``mode="eco_memory_free"``) and ``optax.adamw`` on FP32 parameters (``--moments bf16,8bit``
adds ECO-SR with low-precision moments), for parameter
trees of a few 2-D matrices (FP8 E4M3, row-wise scales) summing to each size.
The methods take turns, one step each per round (so a slow spell of a noisy
machine falls on all of them alike), and each timing is the median over rounds
after warm-up rounds. As in a training
loop, the parameters and the optimizer state are donated to the step and each
call consumes the previous call's outputs (without donation every call would
also pay for fresh output buffers, which on CPU dominates a memory-bound step).

An optimizer step is memory-bound: it streams the weights, the gradients and
the moments once. The *effective bandwidth* reported is::

    (bytes of all inputs + bytes of all outputs) / step time

with inputs ``(grads, state, params)`` and outputs ``(params, state)`` at their
host ``nbytes``: the traffic of an ideal single-pass kernel. It is compared with
the bandwidth of a jitted ``x + 1`` over a large FP32 array (read + write), a
practical ceiling on the same machine. The last column is the compiled step's
temporaries (``memory_analysis()``), in bytes per parameter.

Run: ``python -m benchmarks.step [--sizes 1M,10M,50M] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import eco_optax as eco

ApplyFn = Callable[[Any, Any], Any]


def make_opt_step(tx: optax.GradientTransformation, apply_updates: ApplyFn) -> Callable:
  """``jit((grads, params, state) -> (params, state))``, donating params and state."""

  def opt_step(grads, params, state):
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates), state

  return jax.jit(opt_step, donate_argnums=(1, 2))


def median_time(fn: Callable[..., tuple], carry: tuple, *, warmup: int = 3,
                repeats: int = 20) -> tuple[float, tuple]:
  """Median wall time of ``carry = fn(*carry)``, each call blocked on.

  Returns:
    ``(seconds, final carry)``; the input ``carry`` may have been donated.
  """
  seconds, carries = interleaved_median_times({"fn": fn}, {"fn": carry}, warmup=warmup,
                                              repeats=repeats)
  return seconds["fn"], carries["fn"]


def interleaved_median_times(fns: dict[str, Callable[..., tuple]], carries: dict[str, tuple], *,
                             warmup: int = 3, repeats: int = 20
                             ) -> tuple[dict[str, float], dict[str, tuple]]:
  """Median wall time of each ``carries[k] = fns[k](*carries[k])``, taking turns.

  Every round calls each function once, in order, each call blocked on; the
  first ``warmup`` rounds are not timed.

  Returns:
    ``({name: seconds}, {name: final carry})``; the input carries may have been donated.
  """
  carries, times = dict(carries), {name: [] for name in fns}
  for i in range(warmup + repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      carries[name] = jax.block_until_ready(fn(*carries[name]))
      if i >= warmup:
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}, carries


def tree_bytes(*trees: Any) -> int:
  """Total host ``nbytes`` of the array leaves of ``trees`` (PRNG keys as key data)."""
  total = 0
  for leaf in jax.tree.leaves(trees):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    total += leaf.nbytes
  return total


def copy_bandwidth(num_bytes: int = 1 << 28, repeats: int = 10) -> float:
  """Bytes/second of a jitted ``x + 1`` over an FP32 array (one read, one write)."""
  plus_one = jax.jit(lambda x: (x + 1,), donate_argnums=0)
  seconds, _ = median_time(plus_one, (jnp.zeros(num_bytes // 4, jnp.float32),),
                           repeats=repeats)
  return 2 * num_bytes / seconds


def matrices(num_params: int, count: int = 4, cols: int = 1024,
             seed: int = 0) -> dict[str, jax.Array]:
  """``count`` FP32 matrices ``[rows, cols]`` with about ``num_params`` entries in all."""
  rows = max(1, round(num_params / (count * cols)))
  keys = jax.random.split(jax.random.key(seed), count)
  return {f"w{i}": 0.02 * jax.random.normal(k, (rows, cols)) for i, k in enumerate(keys)}


class Setup(NamedTuple):
  """An optimizer together with its parameter storage."""

  tx: optax.GradientTransformation
  params: Any
  apply_updates: ApplyFn


MOMENT_SPECS = {"bf16": jnp.bfloat16, "8bit": eco.moments.blockwise_8bit()}


def step_setups(params: dict[str, jax.Array], fmt: eco.QuantFormat,
                learning_rate: float = 1e-3, moments: tuple[str, ...] = ()) -> dict[str, Setup]:
  """The optimizers compared, keyed by display name.

  ``optax.adamw``, ECO-RTN (the exact rule), ECO-SR, master weights and the paper's
  memory-free ECO-RTN; plus ECO-SR with its moments stored in
  each of ``moments`` (keys of :data:`MOMENT_SPECS`).
  """
  q = eco.quantize_params(params, fmt)
  setups = {"optax.adamw (fp32)": Setup(optax.adamw(learning_rate), params,
                                         optax.apply_updates)}
  for name, mode, rounding in (
      ("eco-rtn", "eco", "nearest"), ("eco-sr", "eco", "stochastic"),
      ("master-weights", "master_weights", "nearest"),
      ("eco-memory-free-rtn", "eco_memory_free", "nearest")):
    tx = eco.adamw(learning_rate, mode=mode, rounding=rounding)
    setups[name] = Setup(tx, q, eco.apply_updates)
  for m in moments:
    spec = MOMENT_SPECS[m]
    tx = eco.adamw(learning_rate, rounding="stochastic", mu_dtype=spec, nu_dtype=spec)
    setups[f"eco-sr {m} moments"] = Setup(tx, q, eco.apply_updates)
  return setups


class Timing(NamedTuple):
  num_params: int
  method: str
  seconds: float
  ratio: float          # seconds / seconds of optax.adamw at the same size
  bytes_moved: int      # inputs + outputs of one step
  bandwidth: float      # bytes_moved / seconds
  temp_per_param: float  # the compiled step's temporaries (memory_analysis), bytes/param


def time_size(num_params: int, fmt: eco.QuantFormat, warmup: int,
              repeats: int, moments: tuple[str, ...] = ()) -> list[Timing]:
  """Times every setup of :func:`step_setups` at one size, taking turns."""
  params = matrices(num_params)
  n = sum(p.size for p in params.values())
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  steps, carries, moved, temps = {}, {}, {}, {}
  for name, (tx, p, apply_fn) in step_setups(params, fmt, moments=moments).items():
    opt_step = make_opt_step(tx, apply_fn)
    steps[name] = functools.partial(opt_step, grads)
    carries[name] = (jax.tree.map(jnp.copy, p), tx.init(p))  # donated: copy the shared p
    moved[name] = tree_bytes(grads, carries[name])
    compiled = opt_step.lower(grads, *carries[name]).compile()
    temps[name] = compiled.memory_analysis().temp_size_in_bytes / n
  seconds, carries = interleaved_median_times(steps, carries, warmup=warmup, repeats=repeats)
  base = seconds["optax.adamw (fp32)"]
  rows = []
  for name, s in seconds.items():
    num_bytes = moved[name] + tree_bytes(carries[name])
    rows.append(Timing(n, name, s, s / base, num_bytes, num_bytes / s, temps[name]))
  return rows


def parse_size(text: str) -> int:
  """``"50M"`` -> 50_000_000, ``"250k"`` -> 250_000, ``"1000"`` -> 1000."""
  text = text.strip().lower()
  scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:], 1)
  return int(float(text[:-1] if scale > 1 else text) * scale)


def main(argv: list[str] | None = None) -> list[Timing]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="1M,10M,50M",
                      help="comma list of parameter counts (suffixes k, M)")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--moments", default="",
                      help=f"also time ECO-SR with moments in these formats: comma list of "
                           f"{', '.join(MOMENT_SPECS)}")
  args = parser.parse_args(argv)
  moments = tuple(m for m in args.moments.split(",") if m)
  unknown = [m for m in moments if m not in MOMENT_SPECS]
  if unknown:
    parser.error(f"unknown --moments {unknown}; choose from {list(MOMENT_SPECS)}")

  fmt = eco.fp8_e4m3()
  bandwidth = copy_bandwidth()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"format: {fmt.name} {fmt.scaling} scales ({fmt.scale_policy})")
  print(f"memory-copy bandwidth (jit x+1, 256 MiB f32): {bandwidth / 1e9:.2f} GB/s")
  print(f"{'params':>11}  {'method':<22} {'step ms':>9} {'vs adamw':>9} "
        f"{'MB moved':>9} {'GB/s':>7} {'% copy':>7} {'temp B/p':>9}")
  timings = []
  for size in map(parse_size, args.sizes.split(",")):
    for t in time_size(size, fmt, args.warmup, args.repeats, moments):
      print(f"{t.num_params:>11,}  {t.method:<22} {t.seconds * 1e3:9.3f} "
            f"{t.ratio:8.2f}x {t.bytes_moved / 1e6:9.1f} {t.bandwidth / 1e9:7.2f} "
            f"{100 * t.bandwidth / bandwidth:6.1f}% {t.temp_per_param:9.2f}")
      timings.append(t)
  return timings


if __name__ == "__main__":
  main()
