"""Shared test settings: 8 CPU devices for the sharding tests, full-precision float32 matmuls,
one XLA compilation cache per test run, and the slow tests first.

The device flag is set before JAX starts a backend, so ``pytest`` alone runs the
sharded checks in-process (as ``make test`` does). Many tests compile the same
programs (the benchmark's tiny config, the same optimizer on the same shapes); a
compilation cache in a fresh folder per run, shared by the ``pytest -n`` workers,
compiles each once.
"""
import os
import shutil
import tempfile

_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# JAX's asynchronous CPU dispatch can hang a step whose host callback fires (the run-time
# warnings of eco.apply_updates), intermittently, after many compiled programs in one process
# (https://github.com/jax-ml/jax/issues/25861; seen once here, in a pytest -n 2 worker).
# Synchronous dispatch runs the same programs.
jax.config.update("jax_cpu_enable_async_dispatch", False)

_CACHE = "ECO_OPTAX_TEST_COMPILATION_CACHE"


def pytest_configure(config):
  # The controller creates the folder before it starts the workers, which inherit it.
  if _CACHE not in os.environ:
    os.environ[_CACHE] = tempfile.mkdtemp(prefix="eco_optax_xla_cache_")
    config.eco_optax_owns_cache = True
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_unconfigure(config):
  if getattr(config, "eco_optax_owns_cache", False):
    shutil.rmtree(os.environ.pop(_CACHE), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  # The tests marked slow first: with pytest -n, the long ones start early and the
  # workers finish together on short ones (make test's --dist worksteal moves the
  # tests left to whichever worker is free: 599 -> 522 s on 2 cores).
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
