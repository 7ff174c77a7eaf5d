"""A small byte-level decoder-only transformer in Flax NNX.

Pre-norm blocks ``x + Attn(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))``, causal
multi-head attention with rotary position embeddings, a GELU or SwiGLU MLP,
and an embedding tied to the output layer (logits ``= h E^T``). All linear
layers are bias-free ``nnx.Linear`` with 2-D kernels ``[in, out]``.

The model is trained functionally: ``graphdef, params = split(model)`` gives
a plain nested dict of float32 arrays, and :func:`make_loss_fn` returns a pure
``loss_fn(params, batch)`` that merges the module back inside ``jit``.
Quantization is chosen per leaf by :func:`block_linear_policy`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Params = dict[str, Any]
Policy = Callable[[tuple[Any, ...], jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Transformer shape. ``mlp`` is ``"gelu"`` or ``"swiglu"``."""

  vocab_size: int = 256
  seq_len: int = 128
  width: int = 128
  depth: int = 3
  heads: int = 4
  mlp: str = "gelu"
  mlp_ratio: float = 4.0

  @property
  def hidden(self) -> int:
    """MLP hidden width; SwiGLU uses 2/3 of it to keep the parameter count."""
    h = self.mlp_ratio * self.width
    return int(2 * h / 3) if self.mlp == "swiglu" else int(h)


def rotary(x: jax.Array) -> jax.Array:
  """Rotary position embedding over ``x: [batch, seq, heads, head_dim]``.

  Channel pairs ``(x1, x2)`` at position ``p`` are rotated by the angle
  ``p * 10000^(-2i/head_dim)``, so ``<q_p, k_s>`` depends on ``p - s`` only.
  """
  seq, dim = x.shape[1], x.shape[-1]
  freq = 10000.0 ** (-jnp.arange(0, dim, 2) / dim)
  angle = jnp.arange(seq)[:, None] * freq[None, :]  # [seq, dim/2]
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(nnx.Module):
  """Causal multi-head self-attention with a fused QKV projection."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.heads = cfg.heads
    self.qkv = nnx.Linear(cfg.width, 3 * cfg.width, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(cfg.width, cfg.width, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.heads, -1), 3, axis=2)
    q, k, v = rotary(q[:, :, 0]), rotary(k[:, :, 0]), v[:, :, 0]
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.reshape(b, t, d))


class MLP(nnx.Module):
  """``W_down gelu(W_up x)`` or, for SwiGLU, ``W_down (silu(W_gate x) * W_up x)``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.swiglu = cfg.mlp == "swiglu"
    self.up = nnx.Linear(cfg.width, cfg.hidden, use_bias=False, rngs=rngs)
    if self.swiglu:
      self.gate = nnx.Linear(cfg.width, cfg.hidden, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(cfg.hidden, cfg.width, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.gate(x)) * self.up(x) if self.swiglu else jax.nn.gelu(self.up(x))
    return self.down(h)


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(cfg.width, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.width, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
  """Byte-level decoder-only language model with tied embedding."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.mlp not in ("gelu", "swiglu"):
      raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {cfg.mlp!r}")
    if cfg.width % cfg.heads or (cfg.width // cfg.heads) % 2:
      raise ValueError("width must split into heads of even size")
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.width,
        embedding_init=nnx.initializers.normal(cfg.width**-0.5), rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.final_norm = nnx.RMSNorm(cfg.width, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits ``[batch, seq, vocab]`` for ``tokens: int[batch, seq]``."""
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.final_norm(x))


def init(cfg: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, Params]:
  """Builds the model and splits it into a graph definition and a pure dict.

  Returns:
    ``(graphdef, params)`` with ``params`` a nested dict of float32 arrays.
  """
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable[[Params, jax.Array], jax.Array]:
  """Pure next-byte cross-entropy (nats/byte) for ``batch: int[B, T + 1]``."""

  def loss_fn(params: Params, batch: jax.Array) -> jax.Array:
    logits = nnx.merge(graphdef, params)(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  return loss_fn


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """Key path of ``jax.tree_util`` keys -> plain strings, e.g. ``('blocks', '0', ...)``."""
  return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)


def block_linear_policy(fmt: Any, quantize_embedding: bool = False) -> Policy:
  """Quantization policy: linear-layer kernels inside the transformer blocks.

  As in the paper, only the linear layers of the blocks are stored quantized;
  the (tied) embedding/output matrix and the RMSNorm gains stay float32.

  Args:
    fmt: the ``eco_optax`` format for the selected leaves.
    quantize_embedding: also quantize the tied embedding matrix.

  Returns:
    ``policy(path, leaf) -> fmt | None`` for ``eco_optax.quantize_params``.
  """

  def policy(path: tuple[Any, ...], leaf: jax.Array) -> Any:
    names = path_names(path)
    in_block = names[0] == "blocks" and names[-1] == "kernel"
    is_embedding = quantize_embedding and names[-1] == "embedding"
    return fmt if in_block or is_embedding else None

  return policy
