"""The feature table of docs/guide.md: every optimizer x format x rounding, in ECO mode
(and with round-to-nearest under the paper's memory-free rule, ``mode="eco_memory_free"``).

Each combination fits a small linear regression (a quantized ``(32, 64)`` kernel
and an FP32 bias, weights initialised at the scale of the solution) for 40 jitted
steps. Its *progress* is the fraction of the loss reduction that the same optimizer
achieves in FP32 (``eco.lossless()``): ``(1 - L_T/L_0) / (1 - L_T^fp32/L_0)``. The
table of docs/guide.md states the measured class of every cell, and this test holds
it to that: ``full`` (progress >= 0.8), ``partial`` (0.15 to 0.8) or ``stalls``
(< 0.15: the steps are below half a grid step and round back). Modes other than
``"eco"`` are covered format by format in ``tests/test_transform.py`` and
``tests/test_fp4.py``.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eco_optax as eco

FORMATS = {
    "fp8_e4m3": eco.fp8_e4m3(), "fp8_e5m2": eco.fp8_e5m2(), "int8": eco.int8(),
    "int4": eco.int4(), "mxfp4": eco.fp4_e2m1("mxfp4"), "nvfp4": eco.fp4_e2m1("nvfp4"),
    "bf16": eco.bf16(),
}
# Learning rates at which the FP32 version of each optimizer fits the problem in 40 steps.
OPTIMIZERS = {
    "sgdm": lambda **kw: eco.sgdm(0.5, momentum=0.9, **kw),
    "adamw": lambda **kw: eco.adamw(0.05, weight_decay=0.0, **kw),
    "muon": lambda **kw: eco.muon(0.05, **kw),
    "lion": lambda **kw: eco.lion(0.01, weight_decay=0.0, **kw),
}
STEPS = 40
# Every cell is "full" except these (docs/guide.md, "Feature table"): the memory-free rule with
# round-to-nearest and optimizers whose steps are small or of fixed size (SGDM at this rate,
# Muon, Lion). In ECO mode round-to-nearest takes the exact rule, which trains every cell.
_FOUR_BIT = ("int4", "mxfp4", "nvfp4")
_MEMORY_FREE_RTN = ("eco_memory_free", "nearest")
EXPECTED = (
    {(o, f, *_MEMORY_FREE_RTN): "stalls" for o in ("sgdm", "muon", "lion") for f in _FOUR_BIT}
    | {(o, "fp8_e5m2", *_MEMORY_FREE_RTN): "partial" for o in ("sgdm", "muon", "lion")}
    | {("lion", "fp8_e4m3", *_MEMORY_FREE_RTN): "partial",
       ("sgdm", "nvfp4", *_MEMORY_FREE_RTN): "partial"})


def _problem():
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (128, 32))
  y = x @ (jax.random.normal(kw, (32, 64)) / np.sqrt(32))
  params = {"w": jax.random.normal(jax.random.key(1), (32, 64)) / np.sqrt(32),
            "b": jnp.zeros(64)}
  return params, x, y


def _loss(p, x, y):
  return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


@functools.cache
def _train(opt_name: str, fmt_name: str, mode: str, rounding: str):
  """(final / initial loss, stored weights) after ``STEPS`` steps in ``mode``."""
  params, x, y = _problem()
  fmt = eco.lossless() if fmt_name == "lossless" else FORMATS[fmt_name]
  q = eco.quantize_params(params, fmt)
  tx = OPTIMIZERS[opt_name](mode=mode, rounding=rounding)

  def step(carry, _):
    q, state = carry
    loss, grads = jax.value_and_grad(_loss)(eco.dequantize_params(q), x, y)
    updates, state = tx.update(grads, state, q)
    return (eco.apply_updates(q, updates), state), loss

  (q, _), losses = jax.jit(lambda q, s: jax.lax.scan(step, (q, s), length=STEPS))(
      q, tx.init(q))
  return float(_loss(eco.dequantize_params(q), x, y)) / float(losses[0]), q


def _progress_class(progress: float) -> str:
  return "full" if progress >= 0.8 else "partial" if progress >= 0.15 else "stalls"


@pytest.mark.parametrize("mode,rounding", [("eco", "nearest"), ("eco", "stochastic"),
                                           _MEMORY_FREE_RTN])
@pytest.mark.parametrize("fmt_name", list(FORMATS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_feature_table_cell(opt_name, fmt_name, mode, rounding):
  ratio, q = _train(opt_name, fmt_name, mode, rounding)
  reference, _ = _train(opt_name, "lossless", "eco", "nearest")
  assert reference < 0.3  # the FP32 optimizer does fit the problem
  assert q["w"].values.dtype == FORMATS[fmt_name].dtype
  assert np.isfinite(ratio) and ratio <= 1.0   # never worse than where it started
  progress = (1 - ratio) / (1 - reference)
  expected = EXPECTED.get((opt_name, fmt_name, mode, rounding), "full")
  assert _progress_class(progress) == expected, f"progress {progress:.2f}"
