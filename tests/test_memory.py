"""Static memory: bytes per parameter by component."""
import jax.numpy as jnp
import pytest

import eco_optax as eco


def _model():
  return {"a": jnp.ones((512, 512)), "b": jnp.ones((512, 256))}


def test_fp8_adamw_is_about_9_bytes_per_param():
  q = eco.quantize_params(_model(), eco.fp8_e4m3("tensor"))
  rep = eco.memory_report(q, eco.adamw(1e-3).init(q))
  assert rep.bytes_per_param == pytest.approx(9.0, abs=0.01)
  assert rep.components["weights"] == 512 * 768
  assert rep.components["first moment"] == rep.components["second moment"] == 4 * 512 * 768


def test_master_weights_cost_at_least_12_bytes_per_param():
  q = eco.quantize_params(_model(), eco.fp8_e4m3("tensor"))
  rep = eco.memory_report(q, eco.adamw(1e-3, mode="master_weights").init(q))
  assert rep.bytes_per_param >= 12.0
  assert rep.components["master weights"] == 4 * 512 * 768


def test_int4_counts_packed_half_bytes_and_block_scales():
  q = eco.quantize_params(_model(), eco.int4("block", block_size=32))
  rep = eco.memory_report(q)
  n = 512 * 768
  assert rep.components["weights"] == n / 2
  assert rep.components["scales"] == 4 * n / 32
  assert rep.bytes_per_param == pytest.approx(0.5 + 4 / 32)


def test_plain_fp32_adam_baseline_is_12_bytes_and_str_is_readable():
  params = _model()
  import optax
  rep = eco.memory_report(params, optax.adam(1e-3).init(params))
  assert rep.bytes_per_param == pytest.approx(12.0, abs=0.01)
  text = str(rep)
  assert "bytes/param" in text and "first moment" in text and "second moment" in text
