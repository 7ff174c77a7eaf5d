"""Learning-rate sweep: final validation loss against the peak learning rate.

Without feedback, quantized training loses every update below half a grid step,
so its error grows like ``1/eta`` as the step size shrinks against the grid; ECO
pays the lost part back through the momentum. This sweep runs the paper's method
set (FP32, master weights, naive RTN / SR, ECO-RTN / SR) for FP8 E4M3 row-wise and
INT4 at each peak learning rate, with the benchmark's recipe (``python -m
benchmarks``), and reports beside each learning rate the fraction of naive RTN's
updates that rounded back (below half a grid step).

Run: ``python -m benchmarks.sweep [--quick] [--learning-rates 1e-2,3e-3,1e-3,3e-4,1e-4]``
(any other flag of ``python -m benchmarks`` is passed on). Writes ``sweep.json``,
``sweep.png`` (loss against learning rate, one panel per format) and
``sweep.txt`` (the table) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from benchmarks import __main__ as bench
from benchmarks import plotting

VARIANTS = bench.CORE_VARIANTS
FORMATS = ("fp8", "int4")


def sweep(learning_rates: list[float], passed_on: list[str], out: pathlib.Path,
          methods: list[str]) -> dict[float, dict]:
  """``{lr: {method: {"loss", "unchanged_codes"}}}``, one benchmark run per learning rate."""
  table = {}
  for lr in learning_rates:
    report = bench.main([*passed_on, "--learning-rate", repr(lr), "--methods",
                         ",".join(methods), "--out", str(out / f"lr_{lr:g}")])
    table[lr] = {name: dict(loss=r["final_val_loss"], unchanged_codes=r["unchanged_codes"])
                 for name, r in report["results"].items()}
    (out / "sweep.json").write_text(json.dumps(
        {repr(k): v for k, v in table.items()}, indent=1))
  return table


def format_table(table: dict[float, dict], methods: list[str], formats: list[str]) -> str:
  """Loss per method and learning rate; the naive-RTN rows' share of rounded-back updates."""
  lines = ["peak lr   " + "".join(f"{m:>16}" for m in methods)
           + "".join(f"{f + ' lost':>11}" for f in formats)]
  for lr, row in table.items():
    lost = [row.get(f"{f}-naive-rtn", {}).get("unchanged_codes") for f in formats]
    lines.append(f"{lr:<10g}" + "".join(f"{row[m]['loss']:16.4f}" for m in methods)
                 + "".join(f"{x:11.1%}" if x is not None else f"{'':>11}" for x in lost))
  return "\n".join(lines)


def plot(table: dict[float, dict], methods: list[str], formats: list[str],
         path: pathlib.Path) -> None:
  """Final validation loss against the peak learning rate, one panel per format."""
  lrs = sorted(table)
  names = {f: [n for n in methods if n == "fp32" or n.startswith(f + "-")] for f in formats}
  plotting.panels({f: [(n, lrs, [table[lr][n]["loss"] for lr in lrs], n == "fp32")
                       for n in names[f]] for f in formats},
                  path, xlabel="peak learning rate", xscale="log",
                  ylabel="final validation loss (nats/byte)")


def main(argv: list[str] | None = None) -> dict[float, dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--learning-rates", default="1e-2,3e-3,1e-3,3e-4,1e-4")
  parser.add_argument("--formats", default=",".join(FORMATS))
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--out", default="results/sweep")
  args, passed_on = parser.parse_known_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  formats = args.formats.split(",")
  methods = ["fp32", *(f"{f}-{v}" for f in formats for v in args.variants.split(","))]
  start = time.perf_counter()
  table = sweep([float(x) for x in args.learning_rates.split(",")], passed_on, out, methods)
  text = format_table(table, methods, formats)
  print(f"\n{text}\n\n'lost': the share of naive RTN's updates that rounded back (below half "
        f"a grid step). Wall time {time.perf_counter() - start:.0f} s.")
  (out / "sweep.txt").write_text(text + "\n")
  plot(table, methods, formats, out / "sweep.png")
  return table


if __name__ == "__main__":
  main()
