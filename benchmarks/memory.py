"""Peak-memory benchmark: one jitted, donated train step, as XLA compiles it.

For each method, a whole train step (forward, backward, optimizer step, apply) is
jitted with the parameters and the optimizer state donated, compiled, and read back
with ``Compiled.memory_analysis()``::

    peak = arguments + outputs - aliased + temporaries

(donated arguments aliased to outputs are counted once), in bytes per parameter of
the model, side by side with ``optax.adamw`` on FP32 parameters. The optimizer step
alone (``update`` + ``apply_updates``, gradients as an argument) is reported too, by
its temporaries. Two models: an MLP, and the byte-level transformer of
``python -m benchmarks`` (its block linears quantized).

Each model is compiled twice: with XLA's default options and ``eco.grad``'s defaults,
and, on CPU, with XLA:CPU's memory-optimised scheduler
(:data:`MEMORY_OPTIMIZED`, for ``optax.adamw`` too) and ``eco.grad(...,
recompute=True)`` (weights read whole recomputed in the backward pass, not kept).

With ``--time`` it also times each model's whole train step, side by side in one run:
``optax.adamw``, ECO FP8 AdamW with ``eco.grad``, and the same with the gradient taken
at the tree dequantized first (``jax.grad(loss)(eco.dequantize_params(q))``).

Run: ``python -m benchmarks.memory [--batch 32] [--mlp 512,1024,1024,1024,512] [--time]``.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

import eco_optax as eco
from benchmarks import model as lm
from benchmarks import step as bstep


class Memory(NamedTuple):
  model: str
  method: str
  params: int
  peak: float               # bytes per parameter, whole train step
  static: float             # bytes per parameter at rest (params + state)
  step_temp: float          # temporaries of the optimizer step alone, bytes per parameter
  peak_memory_scheduler: Optional[float] = None   # peak, MEMORY_OPTIMIZED and recompute


# XLA:CPU's compiler option for its memory-optimised scheduler (the default one runs
# independent work early, for concurrency).
MEMORY_OPTIMIZED = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def make_train_step(tx: optax.GradientTransformation, grad: Callable,
                    apply: Callable) -> Callable:
  """``(params, state, *batch) -> (params, state)``: one whole train step."""
  def train_step(p, s, *batch):
    updates, s = tx.update(grad(p, *batch), s, p)
    return apply(p, updates), s
  return train_step


def mlp_problem(sizes=(512, 1024, 1024, 1024, 512), batch: int = 32):
  """``(params, loss(params, x, y), x, y)`` of a ReLU MLP with these layer widths."""
  keys = jax.random.split(jax.random.key(0), len(sizes) - 1)
  params = {f"layer{i}": {"kernel": jax.random.normal(k, (a, b)) / a ** 0.5,
                          "bias": jnp.zeros(b)}
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}

  def loss(p, x, y):
    for i in range(len(sizes) - 1):
      x = x @ p[f"layer{i}"]["kernel"] + p[f"layer{i}"]["bias"]
      x = jax.nn.relu(x) if i < len(sizes) - 2 else x
    return jnp.mean((x - y) ** 2)

  x, y = jnp.ones((batch, sizes[0])), jnp.zeros((batch, sizes[-1]))
  return params, loss, (x, y), eco.fp8_e4m3(), None


def lm_problem(batch: int = 32):
  """The benchmark transformer, its next-byte loss and one batch."""
  cfg = lm.ModelConfig()
  graphdef, params = lm.init(cfg)
  loss_fn = lm.make_loss_fn(graphdef)
  tokens = jnp.zeros((batch, cfg.seq_len + 1), jnp.int32)
  return params, lambda p, t: loss_fn(p, t), (tokens,), eco.fp8_e4m3(), lm.block_linear_policy


METHODS: dict[str, Callable[[], tuple[Any, dict]]] = {
    "optax.adamw (fp32)": lambda: (None, {}),
    "ECO fp8, fp32 moments": lambda: (eco.fp8_e4m3(), {}),
    "ECO fp8, bf16 moments": lambda: (eco.fp8_e4m3(), dict(mu_dtype=jnp.bfloat16,
                                                          nu_dtype=jnp.bfloat16)),
    "ECO fp8, 8-bit moments": lambda: (eco.fp8_e4m3(), dict(
        mu_dtype=eco.moments.blockwise_8bit(), nu_dtype=eco.moments.blockwise_8bit())),
    "ECO int4, fp32 moments": lambda: (eco.int4(), {}),
    "ECO fp8 RTN (exact rule)": lambda: (eco.fp8_e4m3(), dict(rounding="nearest")),
    "fp8 master weights": lambda: (eco.fp8_e4m3(), dict(mode="master_weights")),
}


def measure(name: str, problem: tuple, methods: Optional[list[str]] = None) -> list[Memory]:
  """The ``methods`` of :data:`METHODS` (all by default) on one problem."""
  params, loss, batch, _, policy = problem
  n = sum(x.size for x in jax.tree.leaves(params))
  on_cpu = jax.default_backend() == "cpu"
  rows = []
  for method in methods or METHODS:
    make = METHODS[method]
    fmt, kwargs = make()
    if fmt is None:
      p, tx = params, optax.adamw(1e-3)
      grads = dict.fromkeys((None, True), jax.grad(loss))   # nothing to recompute
      apply = optax.apply_updates
    else:
      p = eco.quantize_params(params, policy(fmt) if policy else fmt)
      tx, apply = eco.adamw(1e-3, **kwargs), eco.apply_updates
      grads = {r: eco.grad(loss, recompute=r) for r in (None, True)}
    state = tx.init(p)

    def peak(recompute, options):
      train_step = make_train_step(tx, grads[recompute], apply)
      compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
          p, state, *batch).compile(options)
      return eco.memory.peak_bytes(compiled) / n

    def opt_step(g, p, s):
      updates, s = tx.update(g, s, p)
      return apply(p, updates), s

    g = jax.eval_shape(grads[None], p, *batch)
    alone = jax.jit(opt_step, donate_argnums=(1, 2)).lower(g, p, state).compile()
    static = eco.memory_report(p, state).total_bytes if fmt is not None else sum(
        x.nbytes for x in jax.tree.leaves((p, state)))
    rows.append(Memory(name, method, n, peak(None, None), static / n,
                       alone.memory_analysis().temp_size_in_bytes / n,
                       peak(True, MEMORY_OPTIMIZED) if on_cpu else None))
  return rows


def checkpoint_control(problem: tuple) -> float:
  """Peak (bytes/param) of the ``optax.adamw`` train step with its loss under ``jax.checkpoint``.

  ``eco.grad`` differentiates under ``jax.checkpoint`` (saving every residual but,
  with ``recompute``, the FP32 weights); this is ``optax.adamw``'s step under the
  same wrapper, saving everything: what the wrapper alone does to the schedule.
  """
  params, loss, batch, _, _ = problem
  n = sum(x.size for x in jax.tree.leaves(params))
  tx = optax.adamw(1e-3)
  grad = jax.grad(jax.checkpoint(loss, policy=jax.checkpoint_policies.everything_saveable))
  train_step = make_train_step(tx, grad, optax.apply_updates)
  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
      params, tx.init(params), *batch).compile()
  return eco.memory.peak_bytes(compiled) / n


def control_flow_probe(problem: tuple) -> dict[str, float]:
  """Temporaries (bytes/param) of a plain SGD train step, with and without control flow.

  The same ``p - 0.1 g`` per leaf, written as plain arithmetic, inside a two-step
  ``lax.fori_loop``, and behind a ``lax.cond``: how much of the gradients XLA keeps
  alive at once when each leaf's update is a loop or a conditional.
  """
  params, loss, batch, _, _ = problem
  n = sum(x.size for x in jax.tree.leaves(params))
  sgd = lambda p, g: p - 0.1 * g
  forms = {
      "arithmetic": sgd,
      "fori_loop": lambda p, g: jax.lax.fori_loop(0, 2, lambda _, x: sgd(x, g), p),
      "cond": lambda p, g: jax.lax.cond(g.reshape(-1)[0] > 0, sgd, lambda p, _: p, p, g)}
  temps = {}
  for name, form in forms.items():
    def step(p, *batch):
      return jax.tree.map(form, p, jax.grad(loss)(p, *batch))
    compiled = jax.jit(step, donate_argnums=0).lower(params, *batch).compile()
    temps[name] = compiled.memory_analysis().temp_size_in_bytes / n
  return temps


def train_step_times(problem: tuple, repeats: int = 20) -> dict[str, float]:
  """Median seconds of a donated whole train step (forward, backward, optimizer),
  the three taking turns: ``optax.adamw``; ECO FP8 AdamW with ``eco.grad``; the same
  with the gradient at the tree dequantized first."""
  params, loss, batch, fmt, policy = problem
  q = eco.quantize_params(params, policy(fmt) if policy else fmt)
  upfront = lambda p, *b: jax.grad(loss)(eco.dequantize_params(p), *b)
  fns, carries = {}, {}
  for name, p, tx, grad, apply in (
      ("optax.adamw", params, optax.adamw(1e-3), jax.grad(loss), optax.apply_updates),
      ("eco.grad", q, eco.adamw(1e-3), eco.grad(loss), eco.apply_updates),
      ("dequantized first", q, eco.adamw(1e-3), upfront, eco.apply_updates)):
    step = make_train_step(tx, grad, apply)
    fns[name] = jax.jit(lambda p, s, *batch, step=step: (*step(p, s, *batch), *batch),
                        donate_argnums=(0, 1))
    carries[name] = (jax.tree.map(jnp.copy, p), tx.init(p), *batch)
  return bstep.interleaved_median_times(fns, carries, repeats=repeats)[0]


def main(argv: list[str] | None = None) -> list[Memory]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--mlp", default="512,1024,1024,1024,512",
                      help="the MLP's layer widths, comma-separated")
  parser.add_argument("--time", action="store_true",
                      help="also time each model's whole train step (MLP at batch 256)")
  args = parser.parse_args(argv)
  rows, controls = [], {}
  sizes = tuple(int(n) for n in args.mlp.split(","))
  for name, problem in (("mlp", mlp_problem(sizes, batch=args.batch)),
                        ("transformer", lm_problem(batch=args.batch))):
    rows += measure(name, problem)
    controls[name] = checkpoint_control(problem)
  print(f"{'model':<12} {'method':<24} {'params':>10} {'static B/p':>10} {'peak B/p':>9} "
        f"{'vs adamw':>9} {'opt-step temp B/p':>18} {'mem-sched peak B/p':>19} {'vs adamw':>9}")
  for r in rows:
    base = next(b for b in rows if b.model == r.model and b.method.startswith("optax"))
    sched = (f"{r.peak_memory_scheduler:19.2f} "
             f"{r.peak_memory_scheduler / base.peak_memory_scheduler:8.3f}x"
             if r.peak_memory_scheduler is not None else "")
    print(f"{r.model:<12} {r.method:<24} {r.params:>10,} {r.static:10.2f} {r.peak:9.2f} "
          f"{r.peak / base.peak:8.3f}x {r.step_temp:18.2f} {sched}")
  print("\noptax.adamw with its loss under jax.checkpoint (eco.grad's wrapper, every residual "
        "saved), peak B/param: " + ", ".join(f"{k} {v:.2f}" for k, v in controls.items()))
  probe = control_flow_probe(mlp_problem(sizes, batch=args.batch))
  print("\nSGD train step on the MLP, temporaries B/param by how each leaf's update is "
        "written: " + ", ".join(f"{k} {v:.2f}" for k, v in probe.items()))
  if args.time:
    for name, problem in (("mlp, batch 256", mlp_problem(sizes, batch=256)),
                          ("transformer", lm_problem(batch=args.batch))):
      times = train_step_times(problem)
      base = times["optax.adamw"]
      print(f"\nwhole train step, {name}: " + ", ".join(
          f"{k} {v * 1e3:.1f} ms ({v / base:.2f}x)" for k, v in times.items()))
  return rows


if __name__ == "__main__":
  main()
