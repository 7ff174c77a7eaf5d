"""The benchmarks: data, model policy, quick quality run and step timing."""
import json
import math

import jax
import numpy as np
import pytest

import eco_optax as eco
from benchmarks import __main__ as bench
from benchmarks import data as bdata
from benchmarks import compile_time
from benchmarks import memory as bmemory
from benchmarks import model as bmodel
from benchmarks import finetune
from benchmarks import long_run
from benchmarks import sweep
from benchmarks import step as bstep


def test_stdlib_corpus_split_and_batches_are_deterministic():
  corpus = bdata.load_corpus()
  n = len(corpus.train) + len(corpus.valid)
  assert n == sum(f.stat().st_size for f in bdata.stdlib_files())
  assert len(corpus.valid) == n - int(0.95 * n)
  a = bdata.batch_starts(len(corpus.train), 3, 4, 16, seed=7)
  assert np.array_equal(a, bdata.batch_starts(len(corpus.train), 3, 4, 16, seed=7))
  batch = bdata.get_batch(corpus.train, a[0], 16)
  assert batch.shape == (4, 17) and batch.min() >= 0 and batch.max() < 256


def test_policy_quantizes_only_block_linear_kernels():
  cfg = bmodel.ModelConfig(width=32, depth=2, heads=2, mlp="swiglu")
  params = jax.eval_shape(lambda: bmodel.init(cfg)[1])  # shapes only: fast

  def quantize(policy):
    return jax.eval_shape(lambda p: eco.quantize_params(p, policy), params)

  q = quantize(bmodel.block_linear_policy(eco.fp8_e4m3()))
  paths = jax.tree_util.tree_flatten_with_path(q, is_leaf=eco.is_quantized)[0]
  quantized = {bmodel.path_names(p) for p, leaf in paths if eco.is_quantized(leaf)}
  assert len(quantized) == 2 * 5  # qkv, out, up, gate, down per block
  assert all(p[0] == "blocks" and p[-1] == "kernel" for p in quantized)
  q = quantize(bmodel.block_linear_policy(eco.fp8_e4m3(), quantize_embedding=True))
  assert eco.is_quantized(q["embed"]["embedding"])


@pytest.mark.slow
def test_quick_benchmark_output_is_complete_and_finite(tmp_path, capsys):
  moment_rows = ["fp8-eco-sr-bf16-moments", "fp8-eco-sr-8bit-moments"]
  bench.main(["--quick", "--steps", "6", "--eval-every", "3", "--timing-repeats", "1",
              "--methods", ",".join(["paper", *moment_rows]), "--out", str(tmp_path)])
  report = json.loads((tmp_path / "results.json").read_text())
  results = report["results"]
  names = bench.GROUPS["paper"] + moment_rows
  assert list(results) == names
  for name, r in results.items():
    assert not r["diverged"], name
    for key in ("final_val_loss", "bytes_per_param", "step_seconds", "step_ratio"):
      assert r[key] is not None and math.isfinite(r[key]) and r[key] > 0, (name, key)
    assert len(r["train_loss"]) == 6
    assert all(math.isfinite(x) for x in r["train_loss"])
    assert [step for step, _ in r["val_loss"]] == [3, 6]
    assert (r["delta_vs_mw_pct"] is None) == (name == "fp32")
  assert results["fp32"]["bytes_per_param"] == pytest.approx(12.0, abs=0.01)
  assert results["fp8-eco-sr"]["bytes_per_param"] < results["fp8-mw"]["bytes_per_param"]
  # Quantized leaves alone: FP8 codes + FP32 / bf16 / 8-bit Adam moments (+ small scales).
  qbytes = {n: results[n]["quantized_bytes_per_param"] for n in names}
  assert qbytes["fp32"] is None
  # (ECO's state keeps one FP32 scalar more than master weights': the rate of its debt.)
  assert 9.0 < qbytes["fp8-eco-sr"] < 9.2
  assert qbytes["fp8-mw"] - qbytes["fp8-eco-sr"] == pytest.approx(4, abs=1e-3)
  # 8 B of FP32 moments become 4 B of bfloat16, or 2 B of codes + two FP32 absmax per
  # block (this model's blocks hold 192 to 256 elements: a row of 192, or 256).
  assert qbytes["fp8-eco-sr"] - qbytes["fp8-eco-sr-bf16-moments"] == pytest.approx(4)
  saved = qbytes["fp8-eco-sr"] - qbytes["fp8-eco-sr-8bit-moments"]
  assert 8 - 2 - 8 / 192 <= saved <= 8 - 2 - 8 / 256
  # ECO-RTN's exact rule keeps its error in the low 10 bits of the FP32 first moment: the
  # memory-free rule's bytes (its state's error_bits scalar, which marks that layout, in
  # place of previous_eta).
  for f in ("fp8", "int4"):
    assert qbytes[f"{f}-eco-rtn"] == qbytes[f"{f}-eco-memory-free-rtn"] == qbytes[f"{f}-eco-sr"]
  assert {c["verdict"] for c in report["checks"]} <= {"PASS", "MISS"}
  assert len(report["checks"]) == 16
  assert (tmp_path / "curves.png").stat().st_size > 10_000
  out = capsys.readouterr().out
  assert all(name in out for name in names)
  assert out.count("PASS") + out.count("MISS") >= 16


@pytest.mark.slow
def test_fp4_rows_run(tmp_path):
  names = ["mxfp4-mw", "mxfp4-eco-sr", "nvfp4-naive-rtn", "nvfp4-eco-sr"]
  assert set(names) <= set(bench.GROUPS["fp4"])
  report = bench.main(["--quick", "--steps", "4", "--eval-every", "2", "--timing-repeats", "1",
                       "--methods", ",".join(names), "--out", str(tmp_path)])
  results = report["results"]
  assert list(results) == names
  for name, r in results.items():
    assert not r["diverged"] and math.isfinite(r["final_val_loss"]), name
  # E2M1 codes (0.5 B) + block scales (1 B per 32 or 16 elements) + two FP32 moments.
  assert 8.5 < results["mxfp4-eco-sr"]["quantized_bytes_per_param"] < 8.6
  assert 8.5 < results["nvfp4-eco-sr"]["quantized_bytes_per_param"] < 8.65


def test_paper_checks_report_misses_and_skips():
  def row(loss, delta, quantized_bytes=9.02):
    return {"final_val_loss": loss, "delta_vs_mw_pct": delta,
            "quantized_bytes_per_param": quantized_bytes}
  results = {"fp8-mw": row(2.0, 0.0, 13.02), "fp8-mw-sr": row(2.008, 0.4, 13.02),
             "fp8-eco-sr": row(2.01, 0.5), "fp8-eco-rtn": row(2.01, 0.5),
             "fp8-naive-rtn": row(2.1, 5.0)}
  verdicts = {claim: v for v, claim, _ in bench.paper_checks(results)}
  assert verdicts == {
      "fp8-eco-sr within +0.2% of fp8-mw": "MISS",
      "fp8-eco-rtn within +1.0% of fp8-mw": "PASS",
      "fp8-eco-rtn at <= fp8-mw - 4 B/param (quantized leaves)": "PASS",
      "int4-eco-rtn within +1.0% of int4-mw": "SKIP",
      "int4-eco-rtn at <= int4-mw - 4 B/param (quantized leaves)": "SKIP",
      "int4-eco-sr within +2.0% of int4-mw": "SKIP",
      "fp8-eco-sr within +0.2% of fp8-mw-sr": "PASS",
      "int4-eco-sr within +1.0% of int4-mw-sr": "SKIP",
      "fp8-naive-rtn visibly worse than fp8-mw (> +1%)": "PASS",
      "fp8-eco-rtn never worse than fp8-naive-rtn": "PASS",
      "int4-naive-rtn visibly worse than int4-mw (> +1%)": "SKIP",
      "int4-eco-rtn never worse than int4-naive-rtn": "SKIP",
      "fp8-eco-sr-bf16-moments within +0.5% of fp8-mw": "SKIP",
      "fp8-eco-sr-bf16-moments at <= 5.0 B/param (quantized leaves)": "SKIP",
      "fp8-eco-sr-8bit-moments within +0.5% of fp8-mw": "SKIP",
      "fp8-eco-sr-8bit-moments at <= 3.0 B/param (quantized leaves)": "SKIP"}


def test_command_line_overrides_the_chosen_config():
  cfg = bench.config_from_args(bench.parse_args(["--quick", "--steps", "7", "--width", "48"]))
  assert cfg.steps == 7 and cfg.model.width == 48
  assert cfg.batch_size == bench.QUICK.batch_size and cfg.model.depth == bench.QUICK.model.depth
  fmts = bench.formats_from_args(bench.parse_args(["--int4-scaling", "block",
                                                   "--fp8-scale-policy", "dynamic"]))
  assert fmts["int4"].scaling == "block" and fmts["fp8"].scale_policy == "dynamic"
  assert fmts["fp8"].scaling == eco.fp8_e4m3().scaling
  assert fmts["int4"].scale_policy == eco.int4().scale_policy


def test_step_benchmark_small_size():
  timings = bstep.main(["--sizes", "20k", "--repeats", "2", "--warmup", "1",
                        "--moments", "bf16,8bit"])
  assert [t.method for t in timings] == ["optax.adamw (fp32)", "eco-rtn", "eco-sr",
                                         "master-weights", "eco-memory-free-rtn",
                                         "eco-sr bf16 moments", "eco-sr 8bit moments"]
  assert timings[0].ratio == 1.0
  assert all(t.seconds > 0 and t.bandwidth > 0 and t.num_params > 16_000 for t in timings)
  assert timings[0].temp_per_param < 0.01 and all(t.temp_per_param > 0 for t in timings[1:])
  assert bstep.parse_size("50M") == 50_000_000 and bstep.parse_size("250k") == 250_000


def test_memory_benchmark_reads_peaks_from_the_compiled_step():
  problem = bmemory.mlp_problem(sizes=(64, 256, 64), batch=4)
  methods = ["optax.adamw (fp32)", "ECO fp8, fp32 moments", "ECO fp8, bf16 moments",
             "ECO fp8 RTN (exact rule)", "fp8 master weights"]
  rows = {r.method: r for r in bmemory.measure("mlp", problem, methods)}
  assert list(rows) == methods
  adamw = rows["optax.adamw (fp32)"]
  assert adamw.static == pytest.approx(12.0, abs=0.01) and adamw.step_temp < 0.01
  # FP8 kernels, FP32 biases (320 of 33k parameters at 12 or 8 B) and the row scales.
  assert 9.0 < rows["ECO fp8, fp32 moments"].static < 9.1
  assert 5.0 < rows["ECO fp8, bf16 moments"].static < 5.1
  # The exact rule: the same bytes, its error_bits scalar in place of previous_eta.
  assert rows["ECO fp8 RTN (exact rule)"].static == rows["ECO fp8, fp32 moments"].static
  for r in rows.values():                       # the arguments alone are the state
    assert r.peak >= r.static and r.peak_memory_scheduler >= r.static
  assert bmemory.checkpoint_control(problem) >= adamw.static
  # XLA:CPU keeps every gradient alive when each leaf's update is a loop or a conditional.
  probe = bmemory.control_flow_probe(problem)
  assert probe["arithmetic"] < probe["fori_loop"] and probe["arithmetic"] < probe["cond"]


@pytest.mark.slow
def test_an_interrupted_benchmark_keeps_its_finished_rows(tmp_path, monkeypatch):
  real_train = bench.train
  calls = []

  def train_then_stop(*args, **kwargs):   # the second row is interrupted
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real_train(*args, **kwargs)

  monkeypatch.setattr(bench, "train", train_then_stop)
  with pytest.raises(KeyboardInterrupt):
    bench.main(["--quick", "--steps", "4", "--methods", "fp32,fp8-eco-sr", "--out", str(tmp_path)])
  report = json.loads((tmp_path / "results.json").read_text())
  assert list(report["results"]) == ["fp32"] and report["complete"] is False
  assert len(report["results"]["fp32"]["train_loss"]) == 4


@pytest.mark.slow
def test_learning_rate_sweep_on_a_tiny_config(tmp_path):
  table = sweep.main(["--quick", "--steps", "4", "--eval-every", "2", "--timing-repeats", "1",
                      "--learning-rates", "1e-2,1e-4", "--formats", "int4",
                      "--variants", "naive-rtn,eco-sr", "--out", str(tmp_path)])
  assert list(table) == [1e-2, 1e-4]
  for lr, row in table.items():
    assert list(row) == ["fp32", "int4-naive-rtn", "int4-eco-sr"]
    assert all(math.isfinite(r["loss"]) for r in row.values())
    assert row["fp32"]["unchanged_codes"] is None
    lost = row["int4-naive-rtn"]["unchanged_codes"]
    assert 0.0 <= lost <= 1.0
  # A learning rate 100x smaller rounds back at least as many of naive RTN's updates.
  assert (table[1e-4]["int4-naive-rtn"]["unchanged_codes"]
          >= table[1e-2]["int4-naive-rtn"]["unchanged_codes"])
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert set(saved) == {"0.01", "0.0001"}
  assert (tmp_path / "sweep.png").stat().st_size > 10_000
  assert "int4 lost" in (tmp_path / "sweep.txt").read_text()


def test_docs_corpus_is_english_and_not_the_source_code():
  docs, code = bdata.load_docs_corpus(), bdata.load_corpus()
  text = bytes(docs.train[:2000]).decode()
  assert "statement" in text and "def " not in text[:200]
  assert bytes(docs.train[:1000]) not in bytes(code.train)


@pytest.mark.slow
def test_quantized_finetune_on_a_tiny_config(tmp_path, capsys):
  argv = ["--quick", "--pretrain-steps", "4", "--steps", "4", "--eval-every", "2",
          "--formats", "int4", "--variants", "mw,naive-rtn,eco-sr", "--out", str(tmp_path)]
  results = finetune.main(argv)
  assert list(results) == ["fp32", "int4-mw", "int4-naive-rtn", "int4-eco-sr"]
  assert "(cached)" not in capsys.readouterr().out
  # Every INT4 row starts from the same quantized model; FP32 from the FP32 one.
  starts = {name: r["start_val_loss"] for name, r in results.items()}
  assert starts["int4-mw"] == starts["int4-naive-rtn"] == starts["int4-eco-sr"]
  assert starts["fp32"] != starts["int4-mw"]
  for name, r in results.items():
    assert [s for s, _ in r["val_loss"]] == [2, 4] and math.isfinite(r["final_val_loss"]), name
    assert (r["delta_vs_mw_pct"] is None) == (name == "fp32")
    assert (r["unchanged_codes"] is None) == (name == "fp32")
  assert results["int4-mw"]["delta_vs_mw_pct"] == 0.0
  saved = json.loads((tmp_path / "finetune.json").read_text())
  assert saved["finetune"]["lr_schedule"] == "constant" and saved["finetune"]["steps"] == 4
  assert saved["pretrain"]["steps"] == 4 and saved["pretrain"]["lr_schedule"] == "cosine"
  assert (tmp_path / "finetune.png").stat().st_size > 10_000
  assert "int4-eco-sr" in (tmp_path / "finetune.txt").read_text()
  # A rerun loads the pretrained model from the cache: same starting losses.
  again = finetune.main(argv[:-6] + ["--formats", "int4", "--variants", "mw", "--out",
                                     str(tmp_path)])
  assert "(cached)" in capsys.readouterr().out
  assert again["int4-mw"]["start_val_loss"] == starts["int4-mw"]
  assert again["fp32"]["start_val_loss"] == starts["fp32"]


@pytest.mark.slow
def test_long_run_reports_the_gap_to_master_weights_over_training(tmp_path):
  curves = long_run.main(["--tokens-per-param", "0.2", "--evals", "2", "--width", "16",
                          "--timing-repeats", "1", "--formats", "fp8", "--variants", "naive-sr",
                          "--out", str(tmp_path)])
  report = json.loads((tmp_path / "results.json").read_text())
  params, cfg = report["num_params"], report["config"]
  assert cfg["model"]["width"] == 16 and cfg["model"]["seq_len"] == long_run.MODEL["seq_len"]
  tokens = cfg["steps"] * cfg["batch_size"] * cfg["model"]["seq_len"]
  assert 0.2 * params <= tokens < 0.2 * params + cfg["batch_size"] * cfg["model"]["seq_len"]
  assert list(curves) == ["fp8-naive-sr"]
  sr, mw = (dict(report["results"][n]["val_loss"]) for n in ("fp8-naive-sr", "fp8-mw"))
  assert len(curves["fp8-naive-sr"]) == len(sr) == 2
  tokens_per_step = tokens / cfg["steps"]
  for (x, gap), (step, loss) in zip(curves["fp8-naive-sr"], sorted(sr.items())):
    assert x == pytest.approx(step * tokens_per_step / params)
    assert gap == pytest.approx(100 * (loss / mw[step] - 1))
  assert (tmp_path / "gaps.png").stat().st_size > 10_000
  assert "fp8-naive-sr" in (tmp_path / "gaps.txt").read_text()


@pytest.mark.slow
def test_full_runs_the_paper_set_then_each_study(tmp_path, monkeypatch):
  assert bench.parse_args([]).methods == "headline"
  assert "fp8-eco-rtn" in bench.GROUPS["all"] and "fp8-eco-exact-rtn" not in bench.GROUPS["all"]
  assert bench.GROUPS["headline"] == ["fp32", "fp8-mw", "fp8-mw-sr", "fp8-naive-rtn",
                                      "fp8-naive-sr", "fp8-eco-rtn", "fp8-eco-sr",
                                      "fp8-eco-memory-free-rtn"]
  calls = []
  for module in (sweep, finetune, long_run):
    monkeypatch.setattr(module, "main", lambda argv, m=module: calls.append((m, argv)))
  monkeypatch.setitem(bench.GROUPS, "paper", ["fp32", "int4-eco-sr"])
  report = bench.main(["--quick", "--steps", "2", "--timing-repeats", "1", "--methods",
                       "fp8-mw", "--full", "--out", str(tmp_path)])
  assert list(report["results"]) == ["fp32", "int4-eco-sr"]    # --full runs --methods paper
  assert [m for m, _ in calls] == [sweep, finetune, long_run]
  for (module, argv), name in zip(calls, ("sweep", "finetune", "long_run")):
    assert argv == [*bench.STUDIES[name], "--out", str(tmp_path / name)]


def test_compile_time_benchmark_counts_the_quantized_leaves_of_each_method():
  rows = compile_time.measure(depth=1, width=32, batch=2)
  assert [r.method for r in rows] == list(compile_time.METHODS)
  assert [r.quantized_leaves for r in rows] == [0, 4, 4, 4]   # qkv, out, up, down
  assert all(r.lower_s > 0 and r.compile_s > 0 for r in rows)
