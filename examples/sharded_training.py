"""Data-parallel, fully-sharded ECO training on a device mesh.

The batch is split over the mesh axis ``"data"`` (data parallelism) and so are
the quantized weights, their scales where they have that axis, and every
optimizer moment (fully-sharded / FSDP): each array is cut along its first
dimension that the mesh size divides, and replicated otherwise. Quantized
leaves are ordinary pytrees of arrays, so ``jax.device_put`` and ``jit`` handle
them as they are; a tensor-wise scale is a replicated scalar computed from the
whole tensor (XLA inserts the cross-device ``max``).

Run on 8 simulated CPU devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m examples.sharded_training
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import eco_optax as eco

AXIS = "data"


def fsdp_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
  """Shards the first dimension divisible by the mesh size; replicates otherwise."""
  n = mesh.shape[AXIS]
  for dim, size in enumerate(shape):
    if size % n == 0 and size >= n:
      return P(*([None] * dim), AXIS)
  return P()


def _place(x: jax.Array, spec: P, mesh: Mesh) -> jax.Array:
  return jax.device_put(x, NamedSharding(mesh, spec))


def shard(tree: Any, mesh: Mesh) -> Any:
  """Places every array of ``tree`` (params, optimizer state) with :func:`fsdp_spec`.

  The scales of a quantized weight follow its codes where they span the same
  sharded dimension (block scales along another axis) and are replicated
  otherwise (tensor-wise scales, channel scales of the other axis, the FP32
  tensor scale of NVFP4). Typed PRNG keys are sharded by their key shape (a
  scalar key is replicated).
  """

  def place(x):
    if not eco.is_quantized(x):
      return _place(x, fsdp_spec(x.shape, mesh), mesh)
    spec = fsdp_spec(x.values.shape, mesh)
    dim = len(spec) - 1
    same = x.scale.ndim > dim >= 0 and x.scale.shape[dim] == x.values.shape[dim]
    tensor_scale = None if x.tensor_scale is None else _place(x.tensor_scale, P(), mesh)
    return dataclasses.replace(x, values=_place(x.values, spec, mesh),
                               scale=_place(x.scale, spec if same else P(), mesh),
                               tensor_scale=tensor_scale)

  return jax.tree.map(place, tree, is_leaf=eco.is_quantized)


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices with the axis :data:`AXIS` (automatic sharding)."""
  return jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict:
  """Float32 MLP parameters ``{"layer_i": {"kernel": [in, out], "bias": [out]}}``."""
  keys = jax.random.split(key, len(sizes) - 1)
  return {f"layer_{i}": {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a),
                         "bias": jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def mlp(params: dict, x: jax.Array) -> jax.Array:
  for i in range(len(params)):
    layer = params[f"layer_{i}"]
    x = x @ layer["kernel"] + layer["bias"]
    if i < len(params) - 1:
      x = jax.nn.gelu(x)
  return x


def loss_fn(params: dict, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
  x, y = batch
  return jnp.mean((mlp(params, x) - y) ** 2)


def make_batch(step: int, batch_size: int, dim_in: int, dim_out: int):
  """A deterministic regression batch: ``y = sin(x @ A)`` for a fixed ``A``."""
  x = jax.random.normal(jax.random.fold_in(jax.random.key(1), step), (batch_size, dim_in))
  a = jax.random.normal(jax.random.key(2), (dim_in, dim_out)) / np.sqrt(dim_in)
  return x, jnp.sin(x @ a)


def make_train_step(tx: optax.GradientTransformation, shardings: Any = None):
  """``step(q, state, batch) -> (q, state, loss)``, jitted.

  Args:
    tx: an eco_optax optimizer.
    shardings: the ``(q, state)`` tree of shardings the outputs must keep
      (FSDP layout); ``None`` lets XLA choose.
  """

  def step(q, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(eco.dequantize_params(q), batch)
    updates, state = tx.update(grads, state, q)
    return eco.apply_updates(q, updates), state, loss

  return jax.jit(step, out_shardings=None if shardings is None else (*shardings, None))


def train(fmt_or_policy: Any, rounding: eco.quantize.Rounding, steps: int,
          mesh: Mesh | None, sizes: tuple[int, ...] = (32, 64, 64, 32),
          batch_size: int = 64) -> tuple[Any, Any, list[float]]:
  """Trains the MLP with ECO-AdamW; on ``mesh`` if given, else on one device.

  Args:
    fmt_or_policy: the format of the kernels, or a policy as for
      :func:`eco_optax.quantize_params`.
    rounding: ``"nearest"`` (ECO-RTN) or ``"stochastic"`` (ECO-SR).
    steps: optimizer steps.
    mesh: a mesh from :func:`make_mesh`, or ``None`` for one device.
    sizes: layer widths of the MLP.
    batch_size: global batch size (split over the mesh).

  Returns:
    ``(q, state, losses)``: final quantized params, optimizer state, losses.
  """
  q = eco.quantize_params(init_mlp(jax.random.key(0), sizes), fmt_or_policy)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   eco.adamw(1e-2, weight_decay=1e-4, rounding=rounding, seed=1))
  state = tx.init(q)
  shardings = None
  if mesh is not None:
    q, state = shard((q, state), mesh)
    shardings = jax.tree.map(lambda x: x.sharding, (q, state))
  step = make_train_step(tx, shardings)
  losses = []
  for i in range(steps):
    batch = make_batch(i, batch_size, sizes[0], sizes[-1])
    if mesh is not None:
      batch = jax.device_put(batch, NamedSharding(mesh, P(AXIS)))
    q, state, loss = step(q, state, batch)
    losses.append(float(loss))
  return q, state, losses


def per_device_bytes(tree: Any) -> int:
  """Bytes held by the first device for ``tree`` (its shards only)."""
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree)
             for s in x.addressable_shards if s.device == device)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=100)
  args = parser.parse_args()
  if jax.device_count() == 1:
    print("one device found: nothing is sharded. On CPU, simulate 8 with "
          "XLA_FLAGS=--xla_force_host_platform_device_count=8")
  mesh = make_mesh()
  print(f"mesh: {dict(mesh.shape)} over {jax.devices()[0].platform} devices")
  q, state, losses = train(eco.fp8_e4m3(), "stochastic", args.steps, mesh)
  print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} after {args.steps} ECO-SR steps")
  kernel = q["layer_1"]["kernel"]
  print(f"layer_1 kernel codes {kernel.values.dtype}, sharding {kernel.values.sharding.spec}")
  print(f"device 0 holds {per_device_bytes((q, state)):,} of "
        f"{eco.memory_report(q, state).total_bytes:,.0f} static bytes")


if __name__ == "__main__":
  main()
