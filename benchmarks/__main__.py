"""Quality benchmark: ECO against master weights and naive quantized training.

Trains the byte-level transformer of :mod:`benchmarks.model` on the
standard-library corpus of :mod:`benchmarks.data` once per method, with
identical initialisation, batches and hyper-parameters: AdamW, linear warm-up
from 0.01x peak over 10% of the steps then cosine decay to 0.1x peak (the
paper's recipe), global-norm clipping at 1.0. The methods are the paper's
Table 1 set for FP8 E4M3 (row-wise scales) and INT4 (tensor-wise by default):

=============================  ====================================================
``fp32``                       ``optax.adamw`` on FP32 parameters
``<fmt>-mw``                   FP32 master weights in the state, stored ``Q(w_MW)`` (RTN)
``<fmt>-mw-sr``                master weights, stored by stochastic rounding (redrawn each step)
``<fmt>-naive-rtn``            no master weights, round to nearest (error dropped)
``<fmt>-naive-sr``             no master weights, stochastic rounding
``<fmt>-eco-rtn``              ECO, round to nearest (``mode="eco"``: the exact rule, previous error
                               kept in the low bits of the FP32 first moment)
``<fmt>-eco-sr``               ECO with stochastic rounding (the paper's memory-free injection)
``<fmt>-eco-memory-free-rtn``  the paper's ECO-RTN: error injected into the momentum
                               (``mode="eco_memory_free"``), round to nearest
``<fmt>-eco-exact-rtn``        the exact rule named (``mode="eco_exact"``): ``<fmt>-eco-rtn``
``<fmt>-eco-exact-sr``         the exact rule with stochastic rounding
=============================  ====================================================

Each step takes the gradient at the stored weights ``Q(w)`` with one jitted
``value_and_grad`` shared by all methods (it sees plain FP32 arrays), then runs
the method's own jitted optimizer step ``tx.update`` + ``apply_updates``, the
same executable whose time is reported. (Splitting the step this way compiles
the model's backward pass once instead of once per method.)

The default rows (``--methods headline``) are ``fp32`` and the paper's set in FP8
(master weights with RTN / SR, naive RTN / SR, ECO-RTN / SR) and the paper's memory-free
ECO-RTN (``<fmt>-eco-rtn`` is the exact rule, in the same bytes;
``<fmt>-eco-rtn-bf16-nu-moments`` stores AdamW's second moment in bfloat16,
2 B/param less). ``<fmt>`` is ``fp8`` (E4M3, row-wise
scales) or ``int4`` (tensor-wise) for ``--methods paper`` (the same rows in both formats),
and ``mxfp4`` / ``nvfp4`` (:func:`eco_optax.fp4_e2m1`) for ``--methods fp4``. ``--methods moments`` adds
``fp8-mw-<m>-moments`` and ``fp8-eco-sr-<m>-moments``: AdamW's moments stored in
bfloat16 (``m = bf16``) or 8-bit block-wise codes (``m = 8bit``), compared with
``fp8-mw`` (FP32 moments). ``--methods all`` runs every row but ``<fmt>-eco-exact-rtn*`` (the ``<fmt>-eco-rtn*`` rows).

Only the linear kernels inside the transformer blocks are quantized. Outputs
in ``--out``: ``results.json`` (every number; rewritten after each row, so an
interrupted run keeps the finished rows), ``curves.png`` (train and validation
loss) and the table printed to stdout, followed by PASS/MISS lines for the
paper's findings that the rows run can check.

``--optimizer muon`` or ``lion`` runs every row with that optimizer instead
(:func:`optax.contrib.muon` / :func:`optax.lion` for ``fp32``, :func:`eco_optax.muon`
/ :func:`eco_optax.lion` otherwise; Muon's AdamW leaves take ``b1``, ``b2``, ``eps``).

Run: ``python -m benchmarks [--quick] [--optimizer adamw] [--methods paper,fp4,fp8-eco-sr,...]``;
``--full`` runs ``--methods paper`` and then the studies of :mod:`benchmarks.sweep`,
:mod:`benchmarks.finetune` and :mod:`benchmarks.long_run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt  # a headless machine gets the Agg backend by itself
import numpy as np
import optax
from tqdm import tqdm

import eco_optax as eco
from benchmarks import data as bdata
from benchmarks import model as bmodel
from benchmarks import step as bstep


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the benchmark. ``fmt`` is ``None`` for plain FP32 training.

  ``moments`` stores the optimizer's moments in FP32 (``"fp32"``), bfloat16
  (``"bf16"``) or 8-bit block-wise codes (``"8bit"``, :func:`eco_optax.moments.blockwise_8bit`),
  or only the second moment in bfloat16 (``"bf16-nu"``: the exact rule keeps its error in
  the first moment, which stays FP32).
  """

  name: str
  fmt: str | None = None
  variant: str = "fp32"
  moments: str = "fp32"

  @property
  def mode(self) -> str:
    return VARIANTS[self.variant][0] if self.fmt else "fp32"

  @property
  def rounding(self) -> str:
    return VARIANTS[self.variant][1] if self.fmt else "nearest"


# variant suffix -> (eco mode, rounding)
VARIANTS = {
    "mw": ("master_weights", "nearest"),
    "mw-sr": ("master_weights", "stochastic"),
    "naive-rtn": ("naive", "nearest"),
    "naive-sr": ("naive", "stochastic"),
    "eco-rtn": ("eco", "nearest"),
    "eco-sr": ("eco", "stochastic"),
    "eco-memory-free-rtn": ("eco_memory_free", "nearest"),
    "eco-exact-rtn": ("eco_exact", "nearest"),
    "eco-exact-sr": ("eco_exact", "stochastic"),
}
FORMATS = ("fp8", "int4", "mxfp4", "nvfp4")
METHODS = (
    {"fp32": Method("fp32")}
    | {f"{f}-{v}": Method(f"{f}-{v}", f, v) for f in FORMATS for v in VARIANTS}
    | {f"fp8-{v}-{m}-moments": Method(f"fp8-{v}-{m}-moments", "fp8", v, m)
       for m in ("bf16", "8bit") for v in ("mw", "eco-sr")}
    | {f"{f}-{v}-bf16-nu-moments": Method(f"{f}-{v}-bf16-nu-moments", f, v, "bf16-nu")
       for f in FORMATS for v in ("eco-rtn", "eco-exact-rtn", "eco-exact-sr")})
# --methods groups: the paper's Table 1 set in FP8 (the default) and in FP8 and INT4, each
# with the paper's memory-free ECO-RTN beside the exact rule ECO-RTN runs, and the rows beyond it.
# Master weights (RTN), naive RTN / SR, ECO-RTN / SR: the FP4 rows, the sweep and the fine-tune.
CORE_VARIANTS = ("mw", "naive-rtn", "naive-sr", "eco-rtn", "eco-sr")
PAPER_VARIANTS = ("mw", "mw-sr", *CORE_VARIANTS[1:], "eco-memory-free-rtn")
GROUPS = {
    "headline": ["fp32", *(f"fp8-{v}" for v in PAPER_VARIANTS)],
    "paper": ["fp32", *(f"{f}-{v}" for f in ("fp8", "int4") for v in PAPER_VARIANTS)],
    "fp4": [f"{f}-{v}" for f in ("mxfp4", "nvfp4") for v in CORE_VARIANTS],
    "moments": ["fp8-mw", "fp8-eco-sr",
                *(f"fp8-{v}-{m}-moments" for m in ("bf16", "8bit") for v in ("mw", "eco-sr")),
                "fp8-eco-rtn-bf16-nu-moments"],
    # Every row once: the eco-exact-rtn rows name the optimizer the eco-rtn rows run.
    "all": [m for m in METHODS if METHODS[m].variant != "eco-exact-rtn"],
}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """Training recipe shared by every method (AdamW betas/eps/decay as in the paper)."""

  model: bmodel.ModelConfig = bmodel.ModelConfig()
  steps: int = 300
  batch_size: int = 16
  learning_rate: float = 3e-3
  warmup_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-9
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  eval_every: int = 30
  eval_batches: int = 8
  timing_repeats: int = 30
  seed: int = 0
  optimizer: str = "adamw"
  muon_consistent_rms: float | None = None
  lr_schedule: str = "cosine"


DEFAULT = BenchConfig()
QUICK = BenchConfig(
    model=bmodel.ModelConfig(seq_len=32, width=32, depth=1, heads=2),
    steps=120, batch_size=8, learning_rate=1e-2, eval_every=20, eval_batches=4,
    timing_repeats=10)


# Shared by every quantized method; jit caches one executable per format.
dequantize = jax.jit(eco.dequantize_params)


class Setup(NamedTuple):
  """How one method stores its parameters and steps them."""

  tx: optax.GradientTransformation
  params: Any
  to_f32: Callable[[Any], Any]
  apply_updates: Callable[[Any, Any], Any]


def schedule(cfg: BenchConfig) -> optax.Schedule:
  """Warm-up from ``0.01 * peak`` over ``warmup_fraction``, cosine to ``0.1 * peak``.

  ``cfg.lr_schedule == "constant"``: ``peak`` at every step (fine-tuning).
  """
  peak = cfg.learning_rate
  if cfg.lr_schedule == "constant":
    return optax.constant_schedule(peak)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.01 * peak, peak_value=peak,
      warmup_steps=max(1, int(cfg.warmup_fraction * cfg.steps)),
      decay_steps=cfg.steps, end_value=0.1 * peak)


OPTIMIZERS = ("adamw", "muon", "lion")


def make_optimizer(method: Method, cfg: BenchConfig) -> optax.GradientTransformation:
  """``cfg.optimizer`` from optax for ``fp32``, else from eco_optax in ``method``'s mode."""
  lr, wd = schedule(cfg), cfg.weight_decay
  plain, ours, hyper = {
      "adamw": (optax.adamw, eco.adamw, dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd)),
      "muon": (optax.contrib.muon, eco.muon, dict(eps=cfg.eps, weight_decay=wd, adam_b1=cfg.b1,
                                                  adam_b2=cfg.b2, adam_weight_decay=wd,
                                                  consistent_rms=cfg.muon_consistent_rms)),
      "lion": (optax.lion, eco.lion, dict(weight_decay=wd)),
  }[cfg.optimizer]
  if method.fmt is None:
    return plain(lr, **hyper)
  if method.moments == "bf16-nu":
    hyper |= dict(nu_dtype=jnp.bfloat16)
  elif method.moments != "fp32":
    spec = {"bf16": jnp.bfloat16, "8bit": eco.moments.blockwise_8bit()}[method.moments]
    hyper |= dict(mu_dtype=spec) | ({} if cfg.optimizer == "lion" else dict(nu_dtype=spec))
  return ours(lr, **hyper, mode=method.mode, rounding=method.rounding, seed=cfg.seed)


def make_setup(method: Method, params_f32: Any, formats: dict[str, eco.QuantFormat],
               cfg: BenchConfig, quantize_embedding: bool = False) -> Setup:
  """Optimizer and parameter storage of ``method``, clipped as in the paper."""
  clip = optax.clip_by_global_norm(cfg.clip_norm)
  tx = make_optimizer(method, cfg)
  if method.fmt is None:
    return Setup(optax.chain(clip, tx), params_f32, lambda p: p, optax.apply_updates)
  policy = bmodel.block_linear_policy(formats[method.fmt], quantize_embedding)
  return Setup(optax.chain(clip, tx), eco.quantize_params(params_f32, policy),
               dequantize, eco.apply_updates)


class Task(NamedTuple):
  """A corpus with the training windows and validation batches that every method sees."""

  corpus: bdata.Corpus
  starts: np.ndarray       # int64[steps, batch_size] window offsets into corpus.train
  val_batches: jax.Array   # int32[eval_batches, batch_size, seq_len + 1]


def make_task(corpus: bdata.Corpus, cfg: BenchConfig) -> Task:
  """``cfg.steps`` training batches (seed ``cfg.seed``) and the validation batches (seed + 1)."""
  seq = cfg.model.seq_len
  starts = bdata.batch_starts(len(corpus.train), cfg.steps, cfg.batch_size, seq, cfg.seed)
  val_starts = bdata.batch_starts(len(corpus.valid), cfg.eval_batches, cfg.batch_size, seq,
                                  cfg.seed + 1)
  return Task(corpus, starts,
              jnp.stack([bdata.get_batch(corpus.valid, s, seq) for s in val_starts]))


def make_grad_fn(loss_fn: Callable) -> Callable:
  """``jit((params_f32, batch) -> (loss, grads))``.

  It sees plain FP32 weights (the dequantized ``Q(w)`` of a quantized method),
  so one executable serves every method; only the optimizer step differs.
  """
  return jax.jit(jax.value_and_grad(loss_fn))


def make_eval(loss_fn: Callable) -> Callable:
  """``jit((params_f32, batches) -> mean loss)`` over a stack of batches."""

  @jax.jit
  def evaluate(params, batches):
    return jnp.mean(jax.lax.map(functools.partial(loss_fn, params), batches))

  return evaluate


def train(method: Method, setup: Setup, opt_step: Callable, grad_fn: Callable,
          evaluate: Callable, corpus: bdata.Corpus, starts: np.ndarray,
          val_batches: jax.Array, cfg: BenchConfig) -> tuple[dict, Any]:
  """Trains one method; returns its loss curves, wall time and static memory, and
  the trained parameters.

  Each step takes the gradient at the stored weights ``Q(w)`` and then runs the
  method's jitted ``opt_step`` (``tx.update`` + ``apply_updates``), the same
  executable that :func:`time_step` times.
  """
  params = jax.tree.map(jnp.copy, setup.params)  # donated to opt_step
  state = setup.tx.init(params)
  train_loss, val_loss, diverged, unchanged = [], [], False, []
  start = time.perf_counter()
  bar = tqdm(range(cfg.steps), desc=f"{method.name:<14}", dynamic_ncols=True)
  for i in bar:
    batch = bdata.get_batch(corpus.train, starts[i], cfg.model.seq_len)
    loss, grads = grad_fn(setup.to_f32(params), batch)
    codes = stored_codes(params)
    params, state = opt_step(grads, params, state)
    if codes:
      unchanged.append(float(unchanged_fraction(codes, stored_codes(params))))
    train_loss.append(float(loss))
    if not math.isfinite(train_loss[-1]):
      diverged = True
      break
    if (i + 1) % cfg.eval_every == 0 or i + 1 == cfg.steps:
      val_loss.append((i + 1, float(evaluate(setup.to_f32(params), val_batches))))
      bar.set_postfix(train=f"{train_loss[-1]:.3f}", val=f"{val_loss[-1][1]:.3f}")
  bar.close()
  return dict(train_loss=train_loss, val_loss=val_loss, diverged=diverged,
              unchanged_codes=float(np.mean(unchanged)) if unchanged else None,
              final_val_loss=val_loss[-1][1] if val_loss and not diverged else math.nan,
              train_seconds=time.perf_counter() - start,
              quantized_bytes_per_param=quantized_bytes_per_param(setup),
              bytes_per_param=eco.memory_report(params, state).bytes_per_param), params


def add_deltas_vs_mw(results: dict[str, dict]) -> None:
  """Sets each row's ``delta_vs_mw_pct``: % against the same format's ``-mw`` row, if run."""
  for name, r in results.items():
    mw = results.get(f"{METHODS[name].fmt}-mw")
    r["delta_vs_mw_pct"] = (None if mw is None or METHODS[name].fmt is None else
                            100 * (r["final_val_loss"] / mw["final_val_loss"] - 1))


def stored_codes(params: Any) -> list[jax.Array]:
  """Copies of the codes of the lossy quantized leaves (the step donates its params)."""
  return [jnp.copy(x.values) for x in jax.tree.leaves(params, is_leaf=eco.is_quantized)
          if eco.is_quantized(x) and not x.fmt.lossless]


@jax.jit
def unchanged_fraction(before: list[jax.Array], after: list[jax.Array]) -> jax.Array:
  """The fraction of stored codes a step left as they were.

  Under naive round-to-nearest the weights sit on the grid, so this is the fraction
  of updates below half a grid step: the ones that round back and are lost.
  """
  same = sum(jnp.sum(a == b) for a, b in zip(before, after))
  return same / sum(a.size for a in before)


def quantized_bytes_per_param(setup: Setup) -> float | None:
  """Static bytes per parameter of the quantized leaves alone, with their optimizer state.

  The embedding and norms stay FP32 (as in the paper); this is the figure for the
  part of the model that the format stores. ``None`` for unquantized methods.
  """
  leaves = [x for x in jax.tree.leaves(setup.params, is_leaf=eco.is_quantized)
            if eco.is_quantized(x)]
  if not leaves:
    return None
  only = {str(i): x for i, x in enumerate(leaves)}
  return eco.memory_report(only, setup.tx.init(only)).bytes_per_param


def time_step(setup: Setup, opt_step: Callable, grads: Any, repeats: int) -> float:
  """Median seconds of the jitted ``tx.update`` + ``apply_updates`` alone."""
  params = jax.tree.map(jnp.copy, setup.params)
  seconds, _ = bstep.median_time(functools.partial(opt_step, grads),
                                 (params, setup.tx.init(params)), repeats=repeats)
  return seconds


def paper_checks(results: dict[str, dict]) -> list[tuple[str, str, str]]:
  """The paper's findings at this scale, as ``(verdict, claim, figures)``.

  Verdict is ``PASS``, ``MISS``, or ``SKIP`` when a needed method was not run.
  Deltas are relative to the same format with master weights (RTN unless the claim
  names ``-mw-sr``).
  """
  def delta(name):
    return results[name]["delta_vs_mw_pct"] if name in results else None

  def loss(name):
    return results[name]["final_val_loss"] if name in results else None

  def check(claim, names, passed, figures):
    values = [loss(n) for n in names]
    if any(v is None for v in values):
      return ("SKIP", claim, "needs " + ", ".join(names))
    return ("PASS" if passed() else "MISS", claim, figures())

  def delta_check(name, limit, base="mw"):
    base = f"{name.split('-')[0]}-{base}"
    gap = lambda: 100 * (loss(name) / loss(base) - 1)    # NaN (diverged): a miss
    return check(f"{name} within +{limit}% of {base}", [name, base],
                 lambda: gap() <= limit, lambda: f"{gap():+.3f}%")

  def memory_check(name, limit):
    return check(f"{name} at <= {limit} B/param (quantized leaves)", [name],
                 lambda: results[name]["quantized_bytes_per_param"] <= limit,
                 lambda: f"{results[name]['quantized_bytes_per_param']:.3f} B/param")

  def without_master_copy(name):
    # The master copy's 4 B/param gone, the rest (codes, moments, scales) as master weights'
    # (within the state's few scalars: 1e-3 B/param on a model of 16k parameters or more).
    base = f"{name.split('-')[0]}-mw"
    q = lambda n: results[n]["quantized_bytes_per_param"]
    return check(f"{name} at <= {base} - 4 B/param (quantized leaves)", [name, base],
                 lambda: q(name) <= q(base) - 4 + 1e-3,
                 lambda: f"{q(name):.3f} vs {q(base):.3f} B/param")

  checks = [delta_check("fp8-eco-sr", 0.2)]
  for f in ("fp8", "int4"):   # the exact rule, in memory-free ECO's bytes
    checks += [delta_check(f"{f}-eco-rtn", 1.0), without_master_copy(f"{f}-eco-rtn")]
  # Stochastic rounding against master weights rounded the same way: the paper's Table 1
  # has ECO + SR within 0.2% of FP8 w/ MW + SR at every size (INT4: no pretraining figure).
  checks += [delta_check("int4-eco-sr", 2.0), delta_check("fp8-eco-sr", 0.2, "mw-sr"),
             delta_check("int4-eco-sr", 1.0, "mw-sr")]
  for moments, limit in (("bf16", 5.0), ("8bit", 3.0)):
    checks += [delta_check(f"fp8-eco-sr-{moments}-moments", 0.5),
               memory_check(f"fp8-eco-sr-{moments}-moments", limit)]
  for f in ("fp8", "int4"):
    naive = f"{f}-naive-rtn"
    checks.append(check(
        f"{naive} visibly worse than {f}-mw (> +1%)", [naive, f"{f}-mw"],
        lambda n=naive: not delta(n) <= 1.0,   # NaN (diverged) counts as worse
        lambda n=naive: f"{delta(n):+.3f}%"))
    eco_rtn = f"{f}-eco-rtn"
    checks.append(check(
        f"{eco_rtn} never worse than {naive}", [eco_rtn, naive],
        lambda e=eco_rtn, n=naive: not loss(e) > loss(n) and math.isfinite(loss(e)),
        lambda e=eco_rtn, n=naive: f"{loss(e):.4f} vs {loss(n):.4f}"))
  return checks


def plot(results: dict[str, dict], path: pathlib.Path, smooth: int = 10) -> None:
  """Train loss (moving average over ``smooth`` steps) and val loss per method."""
  fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
  colors = dict(zip(["fp32", *VARIANTS], plt.get_cmap("tab10").colors))
  finals = [r["final_val_loss"] for r in results.values()
            if math.isfinite(r["final_val_loss"])]
  line_styles = dict(zip((None, *FORMATS), ("-", "-", "--", ":", "-.")))
  for name, r in results.items():
    method = METHODS[name]
    style = dict(color=colors[method.variant], lw=2.4 if method.moments != "fp32" else 1.2,
                 label=name, ls=line_styles[method.fmt])
    y = np.asarray(r["train_loss"])
    k = min(smooth, len(y))
    ax_train.plot(np.arange(k, len(y) + 1), np.convolve(y, np.ones(k) / k, "valid"), **style)
    if r["val_loss"]:
      steps, vals = zip(*r["val_loss"])
      ax_val.plot(steps, vals, marker="o", ms=3, **style)
  if finals:
    ax_train.set_ylim(min(finals) - 0.3, max(finals) + 0.5)
  ax_train.set(title=f"train loss ({smooth}-step mean)", xlabel="step", ylabel="nats/byte")
  ax_val.set(title="validation loss", xlabel="step")
  ax_val.legend(fontsize=8, ncol=2)
  for ax in (ax_train, ax_val):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_table(results: dict[str, dict]) -> str:
  """The results table as text.

  ``B/param`` is the whole model's static memory, ``Q B/param`` that of the
  quantized leaves alone (:func:`quantized_bytes_per_param`).
  """
  nw = max([6, *map(len, results)])
  fw = max([6, *(len(r["format"]) for r in results.values())])
  head = (f"{'method':<{nw}} {'format':<{fw}} {'val loss':>9} {'vs MW':>9} "
          f"{'B/param':>8} {'Q B/param':>9} {'step ms':>9} {'vs adamw':>9}")
  lines = [head, "-" * len(head)]
  for name, r in results.items():
    delta, qbytes = r["delta_vs_mw_pct"], r["quantized_bytes_per_param"]
    lines.append(
        f"{name:<{nw}} {r['format']:<{fw}} "
        f"{r['final_val_loss']:9.4f} "
        f"{'' if delta is None else f'{delta:+8.3f}%':>9} "
        f"{r['bytes_per_param']:8.3f} {'' if qbytes is None else f'{qbytes:9.3f}':>9} "
        f"{r['step_seconds'] * 1e3:9.3f} "
        f"{r['step_ratio']:8.2f}x" + ("  DIVERGED" if r["diverged"] else ""))
  return "\n".join(lines)


def describe(fmt: eco.QuantFormat) -> str:
  """E.g. ``"fp8_e4m3 channel scales, sticky h=2"``, ``"mxfp4 block/32 e8m0 scales, ..."``."""
  scaling = fmt.scaling + (f"/{fmt.block_size}" if fmt.scaling == "block" else "")
  if fmt.scale_dtype != np.float32:
    scaling += " " + np.dtype(fmt.scale_dtype).name.removeprefix("float8_")
    scaling += "*fp32" if fmt.has_tensor_scale else ""
  return f"{fmt.name} {scaling} scales, {fmt.scale_policy} h={fmt.headroom:g}"


def finite_or_none(x: Any) -> Any:
  """JSON has no NaN: non-finite floats become ``null`` (recursively)."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: finite_or_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [finite_or_none(v) for v in x]
  return x


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny model, few steps (< 3 min)")
  p.add_argument("--methods", default="headline",
                 help=f"comma list of methods and groups ({', '.join(GROUPS)}); methods: "
                      f"{', '.join(METHODS)} (default: headline, the paper's Table 1 set "
                      "in FP8; paper: in FP8 and INT4; both with the paper's memory-free "
                      "ECO-RTN beside ECO-RTN's exact rule)")
  p.add_argument("--full", action="store_true",
                 help="--methods paper, then the learning-rate sweep, the quantized "
                      "fine-tune and the long run, each in a subfolder of --out (about 55 "
                      "minutes on 2 CPU cores)")
  p.add_argument("--out", default="results/bench", help="output folder")
  p.add_argument("--data", default=None, help="text file to use instead of the stdlib source")
  for f, scaling in (("fp8", "channel"), ("int4", "tensor")):
    p.add_argument(f"--{f}-scaling", default=scaling, choices=["tensor", "channel", "block"])
    p.add_argument(f"--{f}-scale-policy", default=None, choices=["fixed", "sticky", "dynamic"],
                   help="default: the format's own")
    p.add_argument(f"--{f}-headroom", type=float, default=None,
                   help="initial scale factor h; default: the format's own")
    p.add_argument(f"--{f}-growth-factor", type=float, default=None,
                   help="sticky growth factor; default: the format's own")
    p.add_argument(f"--{f}-saturated-fraction", type=float, default=None,
                   help="sticky scales grow past this fraction of codes at the max; "
                        "default: the format's own")
  p.add_argument("--block-size", type=int, default=32, help="for --*-scaling block")
  p.add_argument("--optimizer", choices=OPTIMIZERS, help="default adamw")
  p.add_argument("--muon-consistent-rms", type=float,
                 help="Muon's matrix steps scaled to this RMS (0.2: AdamW's, so that one "
                      "learning rate suits both); default: optax's shape scaling")
  p.add_argument("--quantize-embedding", action="store_true",
                 help="also store the tied embedding quantized")
  for field in ("steps", "batch_size", "learning_rate", "eval_every", "seed", "weight_decay",
                "timing_repeats"):
    p.add_argument("--" + field.replace("_", "-"), type=type(getattr(DEFAULT, field)))
  for field in ("width", "depth", "heads", "seq_len"):
    p.add_argument("--" + field.replace("_", "-"), type=int)
  p.add_argument("--mlp", choices=["gelu", "swiglu"])
  return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
  """The ``--quick`` or default config with command-line overrides."""
  base = QUICK if args.quick else DEFAULT

  def overrides(obj) -> dict:
    fields = {f.name for f in dataclasses.fields(obj)}
    return {k: v for k, v in vars(args).items() if k in fields and v is not None}

  return dataclasses.replace(
      base, model=dataclasses.replace(base.model, **overrides(base.model)),
      **overrides(base))


def formats_from_args(args: argparse.Namespace) -> dict[str, eco.QuantFormat]:
  """FP8 E4M3 and INT4 with the chosen scaling; scale policy default: the format's."""
  def kwargs(f):
    kw = dict(block_size=args.block_size)
    for option in ("scale_policy", "headroom", "growth_factor", "saturated_fraction"):
      if getattr(args, f"{f}_{option}") is not None:
        kw[option] = getattr(args, f"{f}_{option}")
    return kw
  return {"fp8": eco.fp8_e4m3(args.fp8_scaling, **kwargs("fp8")),
          "int4": eco.int4(args.int4_scaling, **kwargs("int4")),
          "mxfp4": eco.fp4_e2m1("mxfp4"), "nvfp4": eco.fp4_e2m1("nvfp4")}


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  cfg = config_from_args(args)
  formats = formats_from_args(args)
  methods = "paper" if args.full else args.methods
  names = list(dict.fromkeys(
      n for item in methods.split(",") for n in GROUPS.get(item, [item])))
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    raise SystemExit(f"unknown methods {unknown}; choose from {list(GROUPS)} or "
                     f"{list(METHODS)}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  wall_start = time.perf_counter()

  corpus = bdata.load_corpus(args.data)
  seq = cfg.model.seq_len
  task = make_task(corpus, cfg)
  graphdef, params_f32 = bmodel.init(cfg.model, cfg.seed)
  loss_fn = bmodel.make_loss_fn(graphdef)
  num_params = sum(x.size for x in jax.tree.leaves(params_f32))
  print(f"data: {corpus.source}: {len(corpus.train):,} train / {len(corpus.valid):,} "
        f"val bytes")
  print(f"optimizer: {cfg.optimizer}, peak lr {cfg.learning_rate:g}, weight decay "
        f"{cfg.weight_decay:g}")
  print(f"model: {num_params:,} params {cfg.model}; {cfg.steps} steps x "
        f"{cfg.batch_size} x {seq} bytes; device {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs")

  grad_fn, evaluate = make_grad_fn(loss_fn), make_eval(loss_fn)
  # One fixed gradient for the optimizer-step timings (same for every method).
  _, grads = grad_fn(params_f32, bdata.get_batch(corpus.train, task.starts[0], seq))

  def setup_and_step(name):
    setup = make_setup(METHODS[name], params_f32, formats, cfg, args.quantize_embedding)
    return setup, bstep.make_opt_step(setup.tx, setup.apply_updates)

  # The reference: the optax optimizer on FP32 params (also the fp32 row's own timing).
  baseline_seconds = time_step(*setup_and_step("fp32"), grads, cfg.timing_repeats)

  base = dict(
      config=dataclasses.asdict(cfg), formats={k: describe(v) for k, v in formats.items()},
      quantize_embedding=args.quantize_embedding, num_params=num_params,
      data=dict(source=corpus.source, train_bytes=len(corpus.train),
                valid_bytes=len(corpus.valid)),
      environment=dict(jax=jax.__version__, optax=optax.__version__,
                       eco_optax=eco.__version__, device=jax.devices()[0].device_kind,
                       cpus=os.cpu_count(), python=platform.python_version()),
      baseline_step_seconds=baseline_seconds)

  def save(report):
    (out / "results.json").write_text(json.dumps(finite_or_none(report), indent=1,
                                                 allow_nan=False))

  results = {}
  for name in names:
    method, (setup, opt_step) = METHODS[name], setup_and_step(name)
    r, _ = train(method, setup, opt_step, grad_fn, evaluate, *task, cfg)
    r["step_seconds"] = (baseline_seconds if method.fmt is None else
                         time_step(setup, opt_step, grads, cfg.timing_repeats))
    r["step_ratio"] = r["step_seconds"] / baseline_seconds
    r["format"] = "fp32" if method.fmt is None else describe(formats[method.fmt])
    if method.moments != "fp32":
      r["format"] += f", {method.moments} moments"
    r.update(mode=method.mode, rounding=method.rounding, moments=method.moments)
    results[name] = r
    save(dict(base, results=results, complete=False))   # an interrupted run keeps its rows
  add_deltas_vs_mw(results)

  table = format_table(results)
  checks = paper_checks(results)
  wall = time.perf_counter() - wall_start
  print()
  print(table)
  print(f"\nstep time: jitted tx.update + apply_updates, median of {cfg.timing_repeats}; "
        f"optax {cfg.optimizer} on FP32 params: {baseline_seconds * 1e3:.3f} ms")
  print("the paper's findings, checked on this run (val loss vs the same format with "
        "master weights):")
  for verdict, claim, figures in checks:
    if verdict != "SKIP":
      print(f"  {verdict} {claim}: {figures}")
  print(f"wall time {wall:.1f} s")

  plot(results, out / "curves.png")
  report = dict(base, wall_seconds=wall, results=results, complete=True,
                checks=[dict(verdict=v, claim=c, figures=f) for v, c, f in checks])
  save(report)
  (out / "table.txt").write_text(table + "\n")
  print(f"wrote {out / 'results.json'}, {out / 'curves.png'}, {out / 'table.txt'}")
  if args.full:
    run_studies(out)
  return report


# --full: the studies beyond the table, each in its subfolder of --out.
STUDIES = {
    "sweep": ["--width", "64", "--depth", "2", "--heads", "4", "--seq-len", "64",
              "--steps", "300", "--batch-size", "16", "--eval-every", "100",
              "--timing-repeats", "3"],
    "finetune": [],
    "long_run": ["--tokens-per-param", "100"],
}


def run_studies(out: pathlib.Path) -> None:
  """The learning-rate sweep, the quantized fine-tune and the long run (``STUDIES``)."""
  from benchmarks import finetune, long_run, sweep  # they import this module
  for name, module in (("sweep", sweep), ("finetune", finetune), ("long_run", long_run)):
    print(f"\n== {name}: python -m benchmarks.{name} {' '.join(STUDIES[name])}")
    module.main([*STUDIES[name], "--out", str(out / name)])


if __name__ == "__main__":
  main()
