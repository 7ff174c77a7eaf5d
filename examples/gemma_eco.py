"""Train a small Gemma-architecture language model with ECO-FP8 weights, on CPU.

The ``gemma`` library (google-deepmind/gemma) pulls in kauldron, TensorFlow,
TensorFlow Datasets and Google Cloud clients (80+ packages), so this example
writes the Gemma 3 decoder block in Flax NNX instead:

* RMSNorm with a zero-initialized ``(1 + scale)`` gain, before *and* after the
  attention and the MLP (pre- and post-norms);
* grouped-query attention (``num_kv_heads`` < ``num_heads``) with RMSNorm on
  queries and keys (QK-norm) and rotary position embeddings;
* a gated-GELU MLP ``down(gelu(gate(x)) * up(x))``;
* an embedding scaled by ``sqrt(width)`` and tied to the output layer.

(Gemma 3's interleaved sliding-window layers are left out: at these sequence
lengths every layer is global.) As in the paper, only the linear layers inside
the blocks are stored in FP8 E4M3 with row-wise scales; the embedding and the
norm gains stay FP32. Training uses :mod:`eco_optax.nnx`: the model's kernels
*are* the FP8 codes, the loss sees the dequantized model, and the optimizer
re-stores the codes. Data: bytes of the Python standard library
(:mod:`benchmarks.data`).

Run::

    python -m examples.gemma_eco                 # ~1M parameters, 300 steps: minutes on CPU
    python -m examples.gemma_eco --mode master_weights   # the FP32-master baseline
    python -m examples.gemma_eco --quick         # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import eco_optax as eco
from eco_optax import nnx as eco_nnx
from benchmarks import data


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Shape of the model; the defaults are a ~1M-parameter byte-level Gemma."""
  vocab_size: int = 256
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  num_kv_heads: int = 1
  head_dim: int = 32
  mlp_hidden: int = 512
  rope_base: float = 10_000.0


QUICK = GemmaConfig(width=32, depth=1, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_hidden=64)


class RMSNorm(nnx.Module):
  """Gemma's RMSNorm: ``x / rms(x) * (1 + scale)`` with ``scale`` initialized to 0."""

  def __init__(self, dim: int, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.zeros(dim))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + self.eps) * (1.0 + self.scale[...])


def rope(x: jax.Array, base: float) -> jax.Array:
  """Rotary embedding of ``x: [batch, seq, heads, head_dim]`` (half-split pairs)."""
  seq, dim = x.shape[1], x.shape[-1]
  freq = base ** (-jnp.arange(0, dim, 2) / dim)
  angle = jnp.arange(seq)[:, None] * freq[None, :]
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs)


class Attention(nnx.Module):
  """Causal grouped-query attention with QK-norm and RoPE."""

  def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f"num_heads={cfg.num_heads} must be a multiple of "
                       f"num_kv_heads={cfg.num_kv_heads}")
    self.cfg = cfg
    self.q = _linear(cfg.width, cfg.num_heads * cfg.head_dim, rngs)
    self.kv = _linear(cfg.width, 2 * cfg.num_kv_heads * cfg.head_dim, rngs)
    self.out = _linear(cfg.num_heads * cfg.head_dim, cfg.width, rngs)
    self.q_norm = RMSNorm(cfg.head_dim)
    self.k_norm = RMSNorm(cfg.head_dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, (b, t, _) = self.cfg, x.shape
    q = self.q(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k, v = jnp.split(self.kv(x).reshape(b, t, 2 * cfg.num_kv_heads, cfg.head_dim), 2, axis=2)
    q = rope(self.q_norm(q), cfg.rope_base)
    k = rope(self.k_norm(k), cfg.rope_base)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.reshape(b, t, -1))


class GatedMLP(nnx.Module):
  """``down(gelu(gate(x)) * up(x))``."""

  def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
    self.gate = _linear(cfg.width, cfg.mlp_hidden, rngs)
    self.up = _linear(cfg.width, cfg.mlp_hidden, rngs)
    self.down = _linear(cfg.mlp_hidden, cfg.width, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  """``x + post_norm(attn(pre_norm(x)))``, then the same around the MLP."""

  def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
    self.pre_attn_norm, self.post_attn_norm = RMSNorm(cfg.width), RMSNorm(cfg.width)
    self.attn = Attention(cfg, rngs=rngs)
    self.pre_mlp_norm, self.post_mlp_norm = RMSNorm(cfg.width), RMSNorm(cfg.width)
    self.mlp = GatedMLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.post_attn_norm(self.attn(self.pre_attn_norm(x)))
    return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))


class Gemma(nnx.Module):
  """Decoder-only Gemma-style LM; logits ``[batch, seq, vocab]``."""

  def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
    self.width = cfg.width
    self.embed = nnx.Embed(cfg.vocab_size, cfg.width,
                           embedding_init=nnx.initializers.normal(cfg.width**-0.5),
                           rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.final_norm = RMSNorm(cfg.width)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) * jnp.sqrt(float(self.width))
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.final_norm(x))


def block_linears(fmt: eco.QuantFormat):
  """Policy: the 2-D kernels inside ``blocks`` (the paper quantizes only those)."""

  def policy(path: tuple[Any, ...], leaf: jax.Array):
    return fmt if path[0].key == "blocks" and leaf.ndim == 2 else None

  return policy


@nnx.jit(static_argnums=(0, 1))
def create_model(cfg: GemmaConfig, seed: int) -> Gemma:
  """A Gemma with FP8 block kernels (built under ``jit``: one compile, not one per op)."""
  model = Gemma(cfg, rngs=nnx.Rngs(seed))
  eco_nnx.quantize_model(model, block_linears(eco.fp8_e4m3()))
  return model


def loss_fn(model: Gemma, batch: jax.Array) -> jax.Array:
  """Next-byte cross-entropy in nats/byte for ``batch: int[B, T + 1]``."""
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@nnx.jit
def train_step(model: Gemma, optimizer: eco_nnx.Optimizer, batch: jax.Array) -> jax.Array:
  loss, grads = eco_nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_loss(model: Gemma, batch: jax.Array) -> jax.Array:
  return loss_fn(eco_nnx.dequantized(model), batch)


def train(cfg: GemmaConfig, steps: int, batch_size: int, seq_len: int,
          mode: str = "eco", lr: float = 3e-3, seed: int = 0,
          log_every: int = 0) -> tuple[Gemma, eco_nnx.Optimizer, list[float], float]:
  """Trains with AdamW on FP8 weights; returns model, optimizer, losses, valid loss.

  Args:
    cfg: model shape.
    steps, batch_size, seq_len: training length and batch geometry.
    mode: ``"eco"``, ``"master_weights"`` or ``"naive"`` (see :func:`eco_optax.adamw`).
    lr: peak learning rate (linear warm-up over 10%, cosine decay to 10%).
    seed: model and data seed.
    log_every: print the loss every this many steps (0: never).
  """
  corpus = data.load_corpus()
  model = create_model(cfg, seed)
  schedule = optax.warmup_cosine_decay_schedule(
      lr / 100, lr, max(steps // 10, 1), steps, lr / 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   eco.adamw(schedule, b2=0.98, weight_decay=0.1, mode=mode,
                             rounding="stochastic", seed=seed))
  optimizer = eco_nnx.Optimizer(model, tx, wrt=nnx.Param)
  starts = data.batch_starts(len(corpus.train), steps, batch_size, seq_len, seed)
  losses = []
  for i in range(steps):
    batch = jnp.asarray(data.get_batch(corpus.train, starts[i], seq_len))
    losses.append(float(train_step(model, optimizer, batch)))
    if log_every and (i + 1) % log_every == 0:
      print(f"step {i + 1:5d}  loss {np.mean(losses[-log_every:]):.4f} nats/byte")
  valid_starts = data.batch_starts(len(corpus.valid), 1, 4 * batch_size, seq_len, seed + 1)
  valid = float(eval_loss(model, jnp.asarray(data.get_batch(corpus.valid, valid_starts[0], seq_len))))
  return model, optimizer, losses, valid


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", default="eco", choices=["eco", "master_weights", "naive"])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--quick", action="store_true",
                      help="tiny model, 20 steps of 8 x 32 bytes (a smoke test)")
  args = parser.parse_args()
  cfg, steps, batch_size, seq_len = GemmaConfig(), args.steps, args.batch_size, args.seq_len
  if args.quick:
    cfg, steps, batch_size, seq_len = QUICK, 20, 8, 32
  start = time.time()
  model, optimizer, losses, valid = train(cfg, steps, batch_size, seq_len, args.mode,
                                          log_every=max(steps // 10, 1))
  kernel = model.blocks[0].mlp.up.kernel.get_value()
  print(f"{args.mode}: train loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}, "
        f"valid loss {valid:.3f} nats/byte, {time.time() - start:.0f} s")
  print(f"MLP kernel stored as {kernel.values.dtype} with scales {kernel.scale.shape}")
  print(eco.memory_report(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                          nnx.as_pure(optimizer.opt_state)))


if __name__ == "__main__":
  main()
