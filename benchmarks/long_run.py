"""Tokens per parameter: how the gap to master weights moves as training goes on.

The paper trains 100 tokens per parameter; the benchmark of ``python -m
benchmarks`` about 2. Stochastic rounding's noise accumulates over steps while the
updates shrink under the cosine tail, so the gap of rounding alone to master
weights should open with training length, and ECO's should not. This run trains a
smaller model of the same family (40k parameters by default) for 50 tokens per
parameter or more, with the benchmark's recipe (AdamW 0.9/0.98, warm-up 10%,
cosine to 0.1x, clipping 1.0), for FP32, master weights, naive RTN / SR and
ECO-RTN / SR in FP8 E4M3 row-wise and INT4, and reports the gap of each method's
validation loss to the same format's master weights at every evaluation.

Run: ``python -m benchmarks.long_run [--tokens-per-param 50]`` (any other flag of
``python -m benchmarks`` is passed on). Writes the benchmark's own outputs plus
``gaps.png`` (gap against tokens per parameter, one panel per format) and
``gaps.txt`` (the table) in ``--out``.
"""

from __future__ import annotations

import argparse
import math
import pathlib

import jax

from benchmarks import __main__ as bench
from benchmarks import model as bmodel
from benchmarks import plotting

VARIANTS = ("naive-rtn", "naive-sr", "eco-rtn", "eco-sr")
FORMATS = ("fp8", "int4")
# A model of the benchmark's family small enough to see 50 tokens per parameter in minutes.
MODEL = dict(width=48, depth=1, heads=2, seq_len=64)


def gaps(report: dict, formats: list[str], variants: list[str]) -> dict[str, list]:
  """``{method: [(tokens per param, % gap to the format's master weights), ...]}``."""
  cfg, results = report["config"], report["results"]
  tokens_per_step = cfg["batch_size"] * cfg["model"]["seq_len"]
  out = {}
  for f in formats:
    mw = dict(results[f"{f}-mw"]["val_loss"])
    for v in variants:
      name = f"{f}-{v}"
      out[name] = [(step * tokens_per_step / report["num_params"],
                    100 * (loss / mw[step] - 1) if loss is not None else math.nan)
                   for step, loss in results[name]["val_loss"] if step in mw]
  return out


def format_table(curves: dict[str, list], rows: int = 6) -> str:
  """The gap of every method at ``rows`` evaluation points spread over the run."""
  points = next(iter(curves.values()))
  picks = sorted({round(i * (len(points) - 1) / (rows - 1)) for i in range(rows)})
  nw = max(map(len, curves))
  lines = [f"{'tokens/param':<{nw}}" + "".join(f"{points[i][0]:>9.1f}" for i in picks)]
  for name, curve in curves.items():
    lines.append(f"{name:<{nw}}" + "".join(f"{curve[i][1]:+8.2f}%" for i in picks))
  return "\n".join(lines)


def plot(curves: dict[str, list], formats: list[str], path: pathlib.Path) -> None:
  """Gap to master weights against tokens per parameter, one panel per format."""
  plotting.panels({f"{f}: validation loss vs {f}-mw": [
      (n, *zip(*c), "naive" in n) for n, c in curves.items() if n.startswith(f + "-")]
      for f in formats}, path, xlabel="tokens per parameter",
      ylabel="gap to master weights (%)", sharey=False, zero_line=True)


def main(argv: list[str] | None = None) -> dict[str, list]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tokens-per-param", type=float, default=50.0)
  p.add_argument("--formats", default=",".join(FORMATS))
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--evals", type=int, default=20, help="evaluations over the run")
  p.add_argument("--out", default="results/long_run")
  args, passed_on = p.parse_known_args(argv)
  given = bench.parse_args(passed_on)
  model = {k: getattr(given, k) or v for k, v in MODEL.items()}
  cfg = bench.config_from_args(bench.parse_args(
      [*passed_on, *(f"--{k.replace('_', '-')}={v}" for k, v in model.items())]))
  num_params = sum(x.size for x in jax.tree.leaves(
      jax.eval_shape(lambda: bmodel.init(cfg.model, cfg.seed)[1])))
  steps = math.ceil(args.tokens_per_param * num_params / (cfg.batch_size * cfg.model.seq_len))
  formats, variants = args.formats.split(","), args.variants.split(",")
  methods = ["fp32", *(f"{f}-{v}" for f in formats for v in ("mw", *variants))]
  report = bench.main([*passed_on, *(f"--{k.replace('_', '-')}={v}" for k, v in model.items()),
                       "--steps", str(steps), "--eval-every", str(max(1, steps // args.evals)),
                       "--methods", ",".join(methods), "--out", args.out])
  curves = gaps(report, formats, variants)
  text = format_table(curves)
  print(f"\ngap of the validation loss to the same format's master weights, "
        f"{num_params:,} params, {steps} steps:\n{text}")
  out = pathlib.Path(args.out)
  (out / "gaps.txt").write_text(text + "\n")
  plot(curves, formats, out / "gaps.png")
  return curves


if __name__ == "__main__":
  main()
