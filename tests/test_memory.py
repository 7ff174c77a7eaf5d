"""Static memory: bytes per parameter by component."""
import jax
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


@pytest.mark.parametrize("fmt", [eco.fp8_e4m3(), eco.int4()], ids=["fp8", "int4"])
def test_exact_rule_fits_in_eco_bytes(fmt):
  """The exact rule keeps its error in the FP32 first moment's low 10 bits: memory-free ECO's
  bytes, and 2 fewer with a bfloat16 second moment."""
  q = eco.quantize_params(_model(), fmt)
  eco_rep = eco.memory_report(q, eco.adamw(1e-3).init(q))
  exact = eco.memory_report(q, eco.adamw(1e-3, mode="eco_exact").init(q))
  narrow = eco.memory_report(q, eco.adamw(1e-3, mode="eco_exact", nu_dtype=jnp.bfloat16).init(q))
  n = 512 * 768
  # The same bytes: the state's error_bits scalar (int32) in place of previous_eta (FP32).
  assert exact.components == eco_rep.components
  assert exact.bytes_per_param == pytest.approx(9.0 if fmt.bits == 8 else 8.5, abs=0.02)
  assert narrow.components["second moment"] == 2 * n
  assert narrow.total_bytes == exact.total_bytes - 2 * n


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


@pytest.mark.parametrize("style,per_param", [("mxfp4", 0.5 + 1 / 32), ("nvfp4", 0.5 + 1 / 16)])
def test_fp4_counts_half_bytes_and_one_byte_block_scales(style, per_param):
  """MXFP4 4.25 bits/param (E8M0 per 32), NVFP4 4.5 bits/param (E4M3 per 16) + 4 B/tensor."""
  q = eco.quantize_params(_model(), eco.fp4_e2m1(style))
  rep = eco.memory_report(q)
  n = 512 * 768
  tensor_scales = 4 * 2 if style == "nvfp4" else 0   # one FP32 scalar per tensor
  assert rep.components["weights"] == n / 2
  assert rep.components["scales"] == n * (per_param - 0.5) + tensor_scales
  assert rep.bytes_per_param == pytest.approx(per_param + tensor_scales / n, rel=1e-12)
  assert rep.bytes_per_param == pytest.approx(per_param, abs=1e-4)


def test_fp4_adamw_total():
  """ECO AdamW on MXFP4 weights: 0.53125 (weights + E8M0 scales) + 8 (FP32 moments)."""
  q = eco.quantize_params(_model(), eco.fp4_e2m1("mxfp4"))
  rep = eco.memory_report(q, eco.adamw(1e-3).init(q))
  n = 512 * 768
  assert rep.components["first moment"] == rep.components["second moment"] == 4 * n
  assert rep.bytes_per_param == pytest.approx(8.53125, abs=1e-4)   # + step count, PRNG key


def test_sub_byte_dtypes_are_counted_without_jax_itemsize_bits(monkeypatch):
  """Older JAX: bit widths of int4 / float4 come from ml_dtypes, not numpy's itemsize 1."""
  from eco_optax import memory
  monkeypatch.delattr(memory.jax.dtypes, "itemsize_bits", raising=False)
  for dtype, bits in [(jnp.int4, 4), (jnp.float4_e2m1fn, 4), (jnp.float8_e8m0fnu, 8),
                      (jnp.bfloat16, 16), (jnp.bool_, 8), (jnp.int8, 8), (jnp.complex64, 64)]:
    assert memory._bits(jnp.dtype(dtype)) == bits, dtype
  q = eco.quantize_params(_model(), eco.fp4_e2m1("mxfp4"))
  assert eco.memory_report(q).bytes_per_param == pytest.approx(0.53125)


def test_report_states_a_compiled_steps_peak_beside_the_static_bytes():
  q = eco.quantize_params(_model(), eco.fp8_e4m3())
  tx = eco.adamw(1e-3)
  state = tx.init(q)
  grads = {"a": jnp.ones((512, 512)), "b": jnp.ones((512, 256))}

  def step(q, state):
    updates, state = tx.update(grads, state, q)
    return eco.apply_updates(q, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(q, state).compile()
  rep = eco.memory_report(q, state, step=compiled)
  m = compiled.memory_analysis()
  assert rep.peak_bytes == (m.argument_size_in_bytes + m.output_size_in_bytes
                            - m.alias_size_in_bytes + m.temp_size_in_bytes)
  assert m.alias_size_in_bytes > 0                         # donated: counted once
  assert rep.peak_bytes >= rep.total_bytes                  # the step holds at least the state
  assert rep.peak_bytes_per_param == rep.peak_bytes / (512 * 768)
  assert "compiled step peak" in str(rep)
  assert eco.memory_report(q, state).peak_bytes is None


def test_peak_bytes_refuses_a_backend_without_memory_analysis():
  class NoAnalysis:
    def memory_analysis(self):
      return None

  with pytest.raises(ValueError, match="reports no memory analysis"):
    eco.memory.peak_bytes(NoAnalysis())
