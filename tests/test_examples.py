"""The example scripts run end to end (quick configurations)."""

import sys

import jax.numpy as jnp
import numpy as np

from examples import gemma_eco


def test_gemma_eco_quick(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["gemma_eco.py", "--quick"])
  gemma_eco.main()
  out = capsys.readouterr().out
  assert "MLP kernel stored as float8_e4m3fn" in out
  first, last = map(float, out.split("train loss ")[1].split(",")[0].split(" -> "))
  assert last < first - 1.0   # 20 steps take a byte-level model well below ln(256)
  valid = float(out.split("valid loss ")[1].split()[0])
  assert np.isfinite(valid) and valid < jnp.log(256.0)


def test_gemma_block_is_grouped_query_attention():
  cfg = gemma_eco.QUICK
  model = gemma_eco.create_model(cfg, 0)
  attn = model.blocks[0].attn
  assert attn.kv.kernel.get_value().shape == (cfg.width, 2 * cfg.num_kv_heads * cfg.head_dim)
  assert attn.q.kernel.get_value().values.dtype == jnp.float8_e4m3fn
  assert model.embed.embedding.get_value().dtype == jnp.float32   # not quantized
  assert model.blocks[0].pre_attn_norm.scale.get_value().dtype == jnp.float32

