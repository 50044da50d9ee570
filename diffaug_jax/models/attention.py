"""Multi-head attention pieces shared by the ADM UNet and the ViT: a q/k/v projection that writes q, k and v
contiguously, and one fused attention call that picks cuDNN's kernel where it applies.

Layout: tokens (B, L, C) -> q, k, v (B, L, heads, ch) -> attention (B, L, heads, ch). Logits and softmax are
float32 whatever the compute dtype (`jax.nn.dot_product_attention` accumulates q k^T in float32).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ATTENTION_IMPLS", "QKV", "cudnn_candidate", "cudnn_compiles", "dot_product_attention"]

ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def cudnn_candidate(q: jax.Array) -> bool:
  """Whether "auto" should try cuDNN's fused attention: a CUDA backend, bf16/fp16, head dim a multiple of 8
  and <= 128 (cuDNN's limit before Hopper; 256 on Hopper, checked by jax itself)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] % 8 or q.shape[-1] > 128:
    return False
  try:
    return jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()
  except Exception:  # noqa: BLE001 - any doubt: the portable XLA path
    return False


@functools.lru_cache(maxsize=None)
def cudnn_compiles(q_shape: tuple[int, ...], kv_shape: tuple[int, ...], dtype_name: str) -> bool:
  """Whether cuDNN's fused attention compiles on this backend for q (B, L, heads, ch) and k, v of kv_shape,
  forward and backward (ViT training, PAG and DDA's guidance differentiate through attention): compiled once
  per shape and dtype (a second or two), so that "auto" also falls back when cuDNN refuses a kernel at
  compile time (an older cuDNN, a shape jax's trace-time checks let through), not only when jax refuses it
  while tracing. Each process decides for itself; identical hosts decide alike."""
  q, kv = (jax.ShapeDtypeStruct(s, jnp.dtype(dtype_name)) for s in (q_shape, kv_shape))
  attend = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")

  def forward_and_backward(q, k, v):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(out)

  try:
    jax.jit(forward_and_backward).lower(q, kv, kv).compile()
    return True
  except Exception:  # noqa: BLE001 - whatever cuDNN or jax says, the answer is "use XLA"
    return False


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                          implementation: Optional[str] = "auto") -> jax.Array:
  """softmax(q k^T * scale) v on (B, L, heads, ch) -> (B, L, heads, ch); logits and softmax in float32.

  `implementation`: "xla" (or None) = `jax.nn.dot_product_attention`'s XLA path (any backend, any dtype);
  "cudnn" = cuDNN's fused flash-attention kernel (NVIDIA GPU, bf16/fp16; jax raises elsewhere); "auto" =
  cuDNN where it applies (measured on an H200 by issue 7: 277 vs 66 TFLOP/s at 784 tokens x 8 heads x 64),
  else XLA: "auto" falls back to XLA when jax refuses cuDNN while tracing (NotImplementedError /
  RuntimeError) or when a probe of the same shape does not compile (`cudnn_compiles`). float16 on CPU spells the math
  out (XLA:CPU rejects the F16_F16_F32 dot algorithm jax requests).
  """
  if implementation not in ATTENTION_IMPLS + (None,):
    raise ValueError(f"attention implementation {implementation!r} not in {ATTENTION_IMPLS}")
  if q.dtype == jnp.float16 and jax.default_backend() == "cpu":
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)
  if implementation == "auto":
    if cudnn_candidate(q) and k.shape == v.shape and cudnn_compiles(q.shape, k.shape, q.dtype.name):
      try:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
      except (NotImplementedError, RuntimeError):
        pass
    implementation = "xla"
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation or "xla")


class QKV(nn.Module):
  """The qkv projection (torch: a Linear / 1x1 Conv1d with 3C outputs) returning q, k, v separately, each
  (B, L, heads, ch) and contiguous.

  Params `kernel` (C, 3C) and `bias` (3C,): the layout of the torch weight (an `nn.Dense(3C)` elsewhere). The
  output channels are ordered (heads, 3, ch) in guided-diffusion's legacy order and (3, heads, ch) in its new
  order and in timm's ViT; instead of slicing q/k/v out of a (.., 3, ..) activation (strided copies in front
  of the attention kernel), the kernel's columns are split once per call (weights only, C x 3C) and three GEMMs
  write q, k, v directly.
  """
  heads: int
  legacy_order: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, n, c = x.shape
    if c % self.heads:
      raise ValueError(f"QKV: channels {c} not divisible by {self.heads} heads")
    ch = c // self.heads
    kernel = self.param("kernel", self.kernel_init, (c, 3 * c), jnp.float32)
    bias = self.param("bias", self.bias_init, (3 * c,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    order = (self.heads, 3, ch) if self.legacy_order else (3, self.heads, ch)
    axis = 1 if self.legacy_order else 0  # position of the "3" in `order`
    kernel = kernel.reshape((c,) + order)
    bias = bias.reshape(order)
    out = []
    for i in range(3):
      w = jax.lax.index_in_dim(kernel, i, axis + 1, keepdims=False).reshape(c, c)
      bi = jax.lax.index_in_dim(bias, i, axis, keepdims=False).reshape(c)
      out.append((jnp.dot(x, w) + bi).reshape(b, n, self.heads, ch))
    return tuple(out)
