"""Shared test settings: 8 CPU devices for the sharding tests, full-precision float32 matmuls.

The device flag is set before JAX starts a backend, so ``pytest`` alone runs the
sharded checks in-process (as ``make test`` does).
"""
import os

_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
