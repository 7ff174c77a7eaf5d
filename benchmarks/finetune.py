"""Quantized fine-tune: a pretrained model, stored in FP8 or INT4, adapted to new text.

The case most users with a fixed memory budget meet first (the paper's
DeepSeek-MoE INT4 fine-tune, at this project's scale): the benchmark LM of
``python -m benchmarks`` is pretrained in FP32 on the standard library's source
(cached under ``--out``, so reruns skip it), its block linears are quantized to
FP8 E4M3 (row-wise) and INT4, and it is fine-tuned on the English prose of the
language reference (:func:`benchmarks.data.load_docs_corpus`) at a small constant
learning rate, with AdamW and clipping as in the benchmark. The methods are the
paper's set: FP32, master weights, naive RTN / SR, ECO-RTN / SR.

At a small learning rate most updates are far below half a grid step: naive
round-to-nearest drops them (the "lost" column: the share of stored codes a step
left unchanged, averaged over the run), master weights and ECO accumulate them.

Run: ``python -m benchmarks.finetune [--quick] [--steps 200] [--learning-rate 1e-4]``.
Writes ``finetune.json``, ``finetune.png`` (validation loss on the new text, one
panel per format) and ``finetune.txt`` (the table) in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import __main__ as bench
from benchmarks import data as bdata
from benchmarks import model as bmodel
from benchmarks import plotting
from benchmarks import step as bstep

VARIANTS = bench.CORE_VARIANTS
FORMATS = ("fp8", "int4")


def pretrained(cfg: bench.BenchConfig, cache: pathlib.Path, grad_fn, evaluate) -> Any:
  """FP32 parameters of ``cfg`` trained on the standard-library source, cached in ``cache``.

  The file name holds a hash of the config: a different recipe trains anew.
  """
  _, init_params = bmodel.init(cfg.model, cfg.seed)
  digest = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
  path = cache / f"pretrained-{digest.hexdigest()[:12]}.npz"
  leaves, treedef = jax.tree.flatten(init_params)
  if path.exists():
    with np.load(path) as saved:
      cached = [saved[str(i)] for i in range(len(leaves)) if str(i) in saved]
    if [x.shape for x in cached] == [x.shape for x in leaves]:   # else: another model's
      print(f"pretrained FP32 model: {path} (cached)")
      return treedef.unflatten([jnp.asarray(x) for x in cached])
  task = bench.make_task(bdata.load_corpus(), cfg)
  fp32 = bench.METHODS["fp32"]
  setup = bench.make_setup(fp32, init_params, {}, cfg)
  result, params = bench.train(fp32, setup, bstep.make_opt_step(setup.tx, setup.apply_updates),
                               grad_fn, evaluate, *task, cfg)
  print(f"pretrained FP32 model: val loss {result['final_val_loss']:.4f} on the source code "
        f"after {cfg.steps} steps")
  cache.mkdir(parents=True, exist_ok=True)
  np.savez(path, **{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
  return params


def finetune(params_f32: Any, corpus: bdata.Corpus, names: list[str], formats: dict,
             cfg: bench.BenchConfig, grad_fn, evaluate, save) -> dict[str, dict]:
  """Fine-tunes ``params_f32`` on ``corpus`` once per method; ``save(results)`` after each."""
  task = bench.make_task(corpus, cfg)
  results = {}
  for name in names:
    method = bench.METHODS[name]
    setup = bench.make_setup(method, params_f32, formats, cfg)
    start_loss = float(evaluate(setup.to_f32(setup.params), task.val_batches))
    r, _ = bench.train(method, setup, bstep.make_opt_step(setup.tx, setup.apply_updates),
                       grad_fn, evaluate, *task, cfg)
    r.update(start_val_loss=start_loss, format=bench.describe(formats[method.fmt])
             if method.fmt else "fp32")
    results[name] = r
    save(results)
  bench.add_deltas_vs_mw(results)
  return results


def format_table(results: dict[str, dict]) -> str:
  """Start and final validation loss on the new text, delta to master weights, lost updates."""
  nw = max([6, *map(len, results)])
  head = (f"{'method':<{nw}} {'start':>8} {'final':>8} {'gained':>8} {'vs MW':>9} "
          f"{'lost':>7}")
  lines = [head, "-" * len(head)]
  for name, r in results.items():
    delta, lost = r["delta_vs_mw_pct"], r["unchanged_codes"]
    lines.append(f"{name:<{nw}} {r['start_val_loss']:8.4f} {r['final_val_loss']:8.4f} "
                 f"{r['start_val_loss'] - r['final_val_loss']:8.4f} "
                 f"{'' if delta is None else f'{delta:+8.2f}%':>9} "
                 f"{'' if lost is None else f'{lost:7.1%}':>7}")
  return "\n".join(lines)


def plot(results: dict[str, dict], formats: list[str], path: pathlib.Path) -> None:
  """Validation loss on the new text during fine-tuning, one panel per format."""
  def line(name, r):
    steps, vals = zip(*[(0, r["start_val_loss"]), *r["val_loss"]])
    return (name, steps, vals, name == "fp32")

  plotting.panels({f: [line(n, r) for n, r in results.items()
                       if n == "fp32" or n.startswith(f + "-")] for f in formats},
                  path, xlabel="fine-tune step",
                  ylabel="validation loss on the new text (nats/byte)")


def main(argv: list[str] | None = None) -> dict[str, dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="the benchmark's tiny config")
  p.add_argument("--pretrain-steps", type=int, help="default: the benchmark's steps")
  p.add_argument("--steps", type=int, default=200, help="fine-tune steps")
  p.add_argument("--learning-rate", type=float, default=1e-4, help="constant, fine-tune")
  p.add_argument("--eval-every", type=int, default=20)
  p.add_argument("--formats", default=",".join(FORMATS))
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--out", default="results/finetune")
  args, passed_on = p.parse_known_args(argv)
  bench_args = bench.parse_args([*passed_on, *(["--quick"] if args.quick else [])])
  base = bench.config_from_args(bench_args)
  pre = dataclasses.replace(base, steps=args.pretrain_steps or base.steps)
  cfg = dataclasses.replace(base, steps=args.steps, learning_rate=args.learning_rate,
                            lr_schedule="constant", eval_every=args.eval_every,
                            seed=base.seed + 1)
  formats = bench.formats_from_args(bench_args)
  fmt_names = args.formats.split(",")
  names = ["fp32", *(f"{f}-{v}" for f in fmt_names for v in args.variants.split(","))]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()

  graphdef, _ = bmodel.init(cfg.model, cfg.seed)
  loss_fn = bmodel.make_loss_fn(graphdef)
  grad_fn, evaluate = bench.make_grad_fn(loss_fn), bench.make_eval(loss_fn)
  params = pretrained(pre, out, grad_fn, evaluate)

  def save(results):
    (out / "finetune.json").write_text(json.dumps(bench.finite_or_none(dict(
        pretrain=dataclasses.asdict(pre), finetune=dataclasses.asdict(cfg),
        formats={f: bench.describe(formats[f]) for f in fmt_names}, results=results)),
        indent=1))

  docs = bdata.load_docs_corpus()
  results = finetune(params, docs, names, formats, cfg, grad_fn, evaluate, save)
  save(results)
  text = format_table(results)
  print(f"\nfine-tune on {docs.source}: {cfg.steps} steps at a constant "
        f"lr {cfg.learning_rate:g}\n\n{text}\n\n'start': the pretrained model as stored "
        "(quantized), 'lost': the share of stored codes a step left unchanged. Wall time "
        f"{time.perf_counter() - start:.0f} s.")
  (out / "finetune.txt").write_text(text + "\n")
  plot(results, fmt_names, out / "finetune.png")
  return results


if __name__ == "__main__":
  main()
