"""eco_optax: quantized training without full-precision master weights (ECO).

ECO (Nikdan, Zandieh, Alistarh, Mirrokni, arXiv 2601.22101) stores weights only
in low precision, applies each optimizer step to the quantized weights,
re-quantizes, and injects the quantization error into the momentum so that the
following steps pay it back.

Example:
  >>> import jax, jax.numpy as jnp, optax, eco_optax as eco
  >>> params = {"w": jnp.ones((16, 16)), "b": jnp.zeros(16)}
  >>> q = eco.quantize_params(params, eco.fp8_e4m3())
  >>> tx = optax.chain(optax.clip_by_global_norm(1.0), eco.adamw(1e-3))
  >>> state = tx.init(q)
  >>> grads = eco.grad(lambda p: jnp.sum(p["w"] ** 2))(q)
  >>> updates, state = jax.jit(tx.update)(grads, state, q)
  >>> q = eco.apply_updates(q, updates)
"""

from eco_optax import baselines
from eco_optax import moments
from eco_optax import quantize
from eco_optax import rules
from eco_optax import serialization
from eco_optax import step
from eco_optax import transform
from eco_optax.wrappers import MultiSteps, apply_if_finite, set_to_zero, with_dequantized_params
from eco_optax.alias import adam, adamw, lion, muon, sgdm
from eco_optax.memory import MemoryReport, memory_report
from eco_optax.quantize import (QuantFormat, QuantizedArray, bf16, dequantize,
                                fp4_e2m1, fp8_e4m3, fp8_e5m2, int4, int8, lossless)
from eco_optax.quantize import quantize as quantize_array
from eco_optax.step import ErrorFeedbackState, kept_error
from eco_optax.train_state import TrainState
from eco_optax.transform import error_feedback
from eco_optax.tree import (apply_updates, default_policy, dequantize_params, grad,
                            is_quantized, quantize_params, value_and_grad)

__version__ = "0.1.0"

# The curated public API (`from eco_optax import *`, the names a user needs). The
# submodules (baselines, moments, quantize, rules, step, transform) and the lower-level
# names imported above stay attributes of the package, e.g. eco.moments.blockwise_8bit().
__all__ = [
    # optimizers
    "adam", "adamw", "lion", "muon", "sgdm",
    # formats
    "QuantFormat", "bf16", "fp4_e2m1", "fp8_e4m3", "fp8_e5m2", "int4", "int8", "lossless",
    # quantized parameters
    "QuantizedArray", "dequantize_params", "is_quantized", "quantize_params",
    # training
    "apply_updates", "grad", "kept_error", "value_and_grad",
    # wrappers
    "MultiSteps", "TrainState", "apply_if_finite", "set_to_zero", "with_dequantized_params",
    # memory
    "memory_report",
]
