"""Sharded (data-parallel + FSDP) ECO training equals one-device training, bit for bit.

Runs on 8 CPU devices (``tests/conftest.py`` sets
``--xla_force_host_platform_device_count=8``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import eco_optax as eco

from examples import sharded_training as st

DEVICES = 8
SCALINGS = {"layer_0": eco.fp8_e4m3("tensor"),          # one scale, replicated
            "layer_1": eco.fp8_e4m3("channel"),         # (1, out) scales
            "layer_2": eco.int8("block", block_size=8)}  # (in, out/8) scales, sharded


def policy(path, leaf):
  return SCALINGS[path[0].key] if leaf.ndim == 2 else None


def check_sharded_equals_single(rounding):
  mesh = st.make_mesh()
  q_one, _, loss_one = st.train(policy, rounding, steps=5, mesh=None)
  q_dp, state_dp, loss_dp = st.train(policy, rounding, steps=5, mesh=mesh)
  # Really sharded: codes and moments of the kernels are split over 8 devices.
  assert q_dp["layer_1"]["kernel"].values.sharding.spec == P("data")
  assert len({s.device for s in q_dp["layer_1"]["kernel"].values.addressable_shards}) == DEVICES
  assert state_dp[1].moments.mu["layer_1"]["kernel"].sharding.spec == P("data")
  assert q_dp["layer_2"]["kernel"].scale.sharding.spec == P("data")
  for name, fmt in SCALINGS.items():
    a, b = q_one[name]["kernel"], q_dp[name]["kernel"]
    assert a.fmt == b.fmt == fmt
    assert a.values.dtype == b.values.dtype == fmt.dtype
    np.testing.assert_array_equal(np.asarray(a.values).view(np.uint8),
                                  np.asarray(b.values).view(np.uint8), err_msg=name)
    np.testing.assert_array_equal(a.scale, b.scale, err_msg=name)
  np.testing.assert_allclose(loss_one, loss_dp, rtol=1e-5)
  assert loss_dp[-1] < loss_dp[0]


def check_tensor_scale_spans_all_shards():
  """A tensor-wise scale is the absmax of the whole tensor, not of a shard."""
  mesh = st.make_mesh()
  x = jnp.full((64, 32), 0.1).at[63, 5].set(100.0)   # the max lives on the last shard
  sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  fmt = eco.int8("tensor")
  whole = eco.quantize.initial_scale(x, fmt)
  assert whole != eco.quantize.initial_scale(x[:8], fmt)   # what shard 0 alone would say
  for q in (eco.quantize_array(sharded, fmt),
            jax.jit(eco.quantize_array, static_argnums=1)(sharded, fmt)):
    assert q.scale.shape == () and q.scale == whole
    assert float(q.dequantize()[63, 5]) == pytest.approx(100.0, rel=1e-2)
    # Every device holds the same (global) scale.
    assert {float(s.data) for s in q.scale.addressable_shards} == {float(whole)}
    np.testing.assert_array_equal(q.values, eco.quantize_array(x, fmt).values)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_sharded_training_equals_one_device(rounding):
  assert jax.device_count() >= DEVICES, "tests/conftest.py asks for 8 host devices"
  check_sharded_equals_single(rounding)


def test_a_tensor_scale_spans_all_shards():
  check_tensor_scale_spans_all_shards()
