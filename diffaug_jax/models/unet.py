"""ADM UNet (guided-diffusion `UNetModel`) in Flax Linen, NHWC.

Numerical parity with openai/guided-diffusion @ 22e0df8 (`guided_diffusion/unet.py`):
- GroupNorm32: 32 groups, eps 1e-5, statistics and affine in float32, result cast back to the input dtype
  (in reduced precision the default rounds once, after the scale-shift and SiLU that follow it; see below).
- Timestep embedding: concat[cos, sin] of t * exp(-ln(10000) * arange(half) / half).
- ResBlock scale-shift: GN(h) * (1 + scale) + shift, `scale` is the FIRST half of the embedding projection.
- Down: 3x3 stride-2 conv (pad 1) when `conv_resample`, else 2x2 average pool (also inside up/down ResBlocks).
- Up: nearest x2 (then a 3x3 conv when `conv_resample`). The default computes that same function as four
  2x2 convs on the low-resolution input (`upsample_impl`, below).
- Decoder input: concat([h, skip]) along channels.
- Attention: legacy order splits the qkv channels as (heads, 3, ch); the new order as (3, heads, ch). Softmax
  in float32 (inside `jax.nn.dot_product_attention`). The legacy code scales q and k by ch^-1/4 each, which
  equals the 1/sqrt(ch) logit scale used here (one fused attention call per block).

Parameter names mirror the PyTorch state dict so that conversion is a mechanical renaming: a torch key
`input_blocks.1.0.in_layers.2.weight` lives at flax path `input_blocks_1_0/in_layers_2/kernel` (every numeric
path segment is joined to the previous one with "_"; weight -> kernel / scale / embedding).

Compute dtype (`dtype`): params stay float32 (flax casts them to `dtype` inside each layer); GroupNorm and the
attention softmax always run in float32. The timestep MLP and the final `out` block run in float32 (as the
official fp16 mode does, which only converts the conv stacks); the output is float32.

Speed (execution choices, same params; see the UNet fields; each default chosen by an A/B on an H200,
benchmarks/RESULTS.md): cuDNN fused attention where it applies (`attention_impl="auto"`), q/k/v written
contiguously by three GEMMs over column blocks of the qkv kernel (no strided slices of the activation),
GroupNorm in reduced precision as one read for the statistics and one fused multiply-add + SiLU, as Pallas
(Triton) kernels on an NVIDIA GPU (`norm_stats="auto"` -> "pallas"; in a resampling ResBlock the same kernel
also writes the pooled or up-sampled skip path, and a down-sampling block's kernel pools the activation
before writing it), decoder skips without a materialised concatenation (`skip_impl="split"`), the input and
output 3x3 convs (3 -> 256, 256 -> 6 channels) as one GEMM each (`edge_impl="gemm"`), the up-sampling convs
as four 2x2 convs on the low-resolution input, one per output phase, interleaved by the GroupNorm kernel that
reads them (`upsample_impl="phases"`: 0.44x the arithmetic of those convs, 3.2-3.3% faster than "nearest").
Optional: one stride-2 transposed conv instead (`upsample_impl="transposed"`, measured 3% slower than
"nearest").

GPU note: parity at 1e-5 in float32 assumes full-precision matmuls/convs (CPU). On GPUs XLA may use TF32 for
float32 dots by default; for bit-level comparisons run under `jax.default_matmul_precision("highest")`.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffaug_jax.models import pallas_norm
from diffaug_jax.models.attention import ATTENTION_IMPLS, QKV
from diffaug_jax.models.attention import dot_product_attention as _attention

Dtype = Any

__all__ = [
    "UNet", "UNET_PRESETS", "unet_from_preset", "unet_from_flags", "timestep_embedding", "GroupNorm32",
    "default_channel_mult", "count_params", "cast_params_for_compute", "ATTENTION_IMPLS", "NORM_STATS",
    "UPSAMPLE_IMPLS", "SKIP_IMPLS", "EDGE_IMPLS", "EXECUTION_FIELDS",
]


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding, (B,) int/float -> (B, dim) float32, [cos, sin] order like guided-diffusion."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


NORM_STATS = ("auto", "two_pass", "one_pass", "channel", "pallas")


def auto_norm_stats(dtype) -> str:
  """What `norm_stats="auto"` means for inputs of `dtype`: "pallas" for bf16/fp16, "two_pass" otherwise (the
  float32 parity path). Measured on an H200 (benchmarks/RESULTS.md, 2026-11-26): "channel" is 2.8% faster and
  more accurate than "one_pass", and "pallas" (the same arithmetic in Triton kernels on NVIDIA GPUs, XLA
  elsewhere) 3.1% faster again, for the same error. "pallas" is reverse-mode only and lowers for one platform
  at a time: for forward-mode AD or an export to several platforms at once, set norm_stats="channel"."""
  return "pallas" if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else "two_pass"

# UNet fields that choose how the network runs, never what it computes (same params, same function).
EXECUTION_FIELDS = ("attention_impl", "norm_stats", "upsample_impl", "skip_impl", "edge_impl")


def _as_parts(x) -> tuple:
  """An array, or channel parts whose concatenation is the input (a decoder's [h, skip]) -> tuple of parts."""
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _concat_channels(parts: Sequence[jax.Array]) -> jax.Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _channel_moments(x: jax.Array, sums_fn=None) -> tuple[jax.Array, jax.Array]:
  """x (B, ..., C) -> per-channel mean, variance (B, C) float32, from shifted sums in ONE read.

  Each channel is shifted by its own first element K (a constant for autodiff), so sum(x - K) and
  sum((x - K)^2) over the spatial axes are column reductions over the contiguous C axis, and the cancellation
  error stays at float32 rounding times ((K - mean)^2 + var) / var. `sums_fn(x (B, N, C), pivot (B, C)) ->
  (sum d, sum d^2)` computes the sums (the "pallas" mode passes its kernel); without it they are this XLA
  expression.
  """
  b, c = x.shape[0], x.shape[-1]
  if sums_fn is None:
    xf = x.astype(jnp.float32).reshape(b, -1, c)
    pivot = jax.lax.stop_gradient(xf[:, 0, :])  # (B, C)
    d = xf - pivot[:, None, :]
    m_c = jnp.mean(d, axis=1)
    return pivot + m_c, jnp.maximum(jnp.mean(jnp.square(d), axis=1) - jnp.square(m_c), 0.0)
  x3 = x.reshape(b, -1, c)
  pivot = jax.lax.stop_gradient(x3[:, 0, :].astype(jnp.float32))
  s1, s2 = sums_fn(x3, pivot)
  m_c = s1 / x3.shape[1]
  return pivot + m_c, jnp.maximum(s2 / x3.shape[1] - jnp.square(m_c), 0.0)


def _channel_group_stats(parts: Sequence[jax.Array], num_groups: int, sums_fn=None,
                         spatial: bool = False) -> tuple[jax.Array, jax.Array]:
  """Channel parts (B, ..., C_i) of one input (their concatenation) -> group mean, variance (B, G) float32.
  With `spatial`, the parts are equal-sized spatial pieces of one input with all its channels (`Phases`).

  Per-channel moments of each part (`_channel_moments`; a part is never concatenated for its statistics),
  then the channels of a group (equal counts) combine exactly: mean_g = mean_c(mu_c),
  var_g = mean_c(var_c + (mu_c - mean_g)^2).
  """
  moments = [_channel_moments(p, sums_fn) for p in parts]
  if spatial:
    # Equal-sized pieces of the same channels: mean = mean_p(mu_p), var = mean_p(var_p + (mu_p - mean)^2).
    mus, vs = (jnp.stack(m) for m in zip(*moments))
    mu_c = jnp.mean(mus, axis=0)
    v_c = jnp.mean(vs + jnp.square(mus - mu_c), axis=0)
  elif len(moments) == 1:
    mu_c, v_c = moments[0]
  else:
    mu_c, v_c = (jnp.concatenate(m, axis=-1) for m in zip(*moments))
  b = mu_c.shape[0]
  mu_c = mu_c.reshape(b, num_groups, -1)
  mean = jnp.mean(mu_c, axis=-1)
  var = jnp.mean(v_c.reshape(b, num_groups, -1) + jnp.square(mu_c - mean[..., None]), axis=-1)
  return mean, var


class GroupNorm32(nn.Module):
  """GroupNorm(32, C, eps=1e-5) computed in float32 (guided-diffusion GroupNorm32), with the ResBlock's
  scale-shift and SiLU that follow it optionally fused in.

  `__call__(x (B, ..., C) NHWC, scale_shift=None | (scale, shift) each broadcastable to (B, 1.., C),
  silu=False, resample=None) -> GN(x) [* (1 + scale) + shift] [-> SiLU]`, in `out_dtype` (None: x's dtype).
  `resample` gives a resampling ResBlock's two paths from one read of x, as a pair: "down" ->
  (avg_pool2(that), avg_pool2(x)) ("pallas": `pallas_norm.affine_act_pool`, which never writes the
  full-resolution activation and pools in float32 before rounding once; the other modes round first), "up" ->
  (that, nearest x2 of x) ("pallas": `pallas_norm.affine_act_up`, the up-sampled copy written by the apply
  kernel). `x` may also be `Phases` (an up-sampling conv's output phases: per-phase statistics, and the apply
  interleaves them; `pallas_norm.affine_act_phases` on a GPU). Params `scale` (C,), `bias` (C,) (torch:
  weight, bias). `x` may also be a tuple of channel parts (B, ..., C_i) whose
  concatenation is the input (a decoder block's [h, skip], `UNet.skip_impl="split"`): the "channel" and
  "pallas" modes read the parts where they lie (per-part statistics; the apply fuses or, in the kernel, reads
  the concatenation), the others concatenate first. `project=(kernel (1, 1, C, O), bias (O,))` (in the
  compute dtype) also returns the 1x1 conv of the raw input, as a pair (activation, `skip_conv(x, kernel,
  bias)`): a ResBlock's skip connection from the same read of x (`UNet.skip_impl="fused"`; "pallas":
  `pallas_norm.affine_act_skip` where it tiles, which accumulates all C channels in float32 and rounds once;
  elsewhere the apply and `skip_conv`).

  `stats` picks how the float32 group statistics are computed and applied:
  - "two_pass": mean, then the centred variance (like torch): the activation is read three times (mean,
    variance, normalise). The float32 reference for parity.
  - "one_pass": shifted sums: with K = the group's first element, sum(x - K) and sum((x - K)^2) in ONE read
    (XLA fuses both reductions into one multi-output kernel), var = E[(x-K)^2] - E[x-K]^2. Shifting by a sample
    of the group keeps the cancellation error at float32 rounding times ((K - mean)^2 + var) / var, i.e.
    small whatever the offset (unshifted E[x^2] - E[x]^2 is not). One read fewer per GroupNorm: the UNet
    runs 100 of them, over most of its memory traffic.
  - "channel": per-channel shifted sums (`_channel_group_stats`: column reductions, one read), and the
    normalisation, the affine params and the scale-shift folded into one per-(batch, channel) multiply-add
    y = x * a + d computed once on (B, C) (an optimization barrier keeps XLA from recomputing it per element),
    with the SiLU in float32 before the single rounding to the output dtype. On an H200 in bf16 (ADM-256 at
    224, batch 128) the UNet ran 2.8% faster than with "one_pass" and its eps was closer to the float32 one
    (relative L2 error 6.9e-3 instead of 8.9e-3: one rounding instead of three).
  - "pallas": "channel" with the per-channel sums and the multiply-add + SiLU in Pallas (Triton) kernels on
    NVIDIA GPUs (`models.pallas_norm`) where they tile every part, XLA elsewhere (chosen per platform at
    lowering, `lax.platform_dependent`). On an H200 (bf16, ADM-256 at 224, batch 128) 3.1% faster than
    "channel" for the same error (its kernels move 3.5-3.8 TB/s, XLA's fusions 3.1-3.2). In a
    batch-sharded program each device runs the kernels on its own examples (`pallas_norm` tells XLA how to
    partition them; measured on one GPU only). Reverse-mode differentiable (custom VJP), not forward-mode;
    lower for one platform at a time.
  - "auto" (default): "pallas" for bf16/fp16 inputs, where the result is rounded to 8 (11) mantissa bits
    anyway; "two_pass" for float32 (exact parity) and any other dtype (`auto_norm_stats`).
  The "two_pass" and "one_pass" paths round to the input dtype after the affine params and apply scale-shift
  and SiLU in it, as guided-diffusion does (in float32 they are the reference computation).
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  stats: str = "auto"
  out_dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x, scale_shift: Optional[tuple] = None, silu: bool = False, resample: Optional[str] = None,
               project: Optional[tuple] = None):
    phases = x if isinstance(x, Phases) else None
    parts = phases.arrays[:1] if phases else _as_parts(x)  # (the phases share the channels)
    if resample not in (None, "down", "up"):
      raise ValueError(f"GroupNorm32: resample {resample!r} not in (None, 'down', 'up')")
    if resample and (phases or len(parts) > 1):
      raise ValueError("GroupNorm32: resample takes one array (a resampling ResBlock's input)")
    c = sum(p.shape[-1] for p in parts)
    if project is not None and (phases or resample or project[0].ndim != 4 or project[0].shape[:3] != (1, 1, c)
                                or project[1].shape != project[0].shape[3:]):
      raise ValueError("GroupNorm32: project takes a (1, 1, C, O) kernel and (O,) bias, for an array or channel "
                       f"parts without resample (C = {c}; got {project[0].shape}, {project[1].shape})")
    if c % self.num_groups:
      raise ValueError(f"GroupNorm32: channels {c} not divisible by {self.num_groups} groups ({self.name})")
    if self.stats not in NORM_STATS:
      raise ValueError(f"GroupNorm32: stats {self.stats!r} not in {NORM_STATS}")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    out_dtype = parts[0].dtype if self.out_dtype is None else self.out_dtype
    mode = self.stats
    if mode == "auto":
      mode = auto_norm_stats(parts[0].dtype)
    if mode in ("channel", "pallas"):
      return self._folded(phases or parts, scale, bias, scale_shift, silu, out_dtype, pallas=mode == "pallas",
                          resample=resample, project=project)
    x = phases.interleave() if phases else _concat_channels(parts)
    # Reference order: normalise in float32 at (at least) the output precision, round, then scale-shift, SiLU.
    x = x.astype(jnp.promote_types(x.dtype, out_dtype))
    shape = x.shape
    # (B, spatial, groups, channels per group); the float32 conversion fuses into the reductions.
    g = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, c // self.num_groups)
    if mode == "one_pass":
      pivot = jax.lax.stop_gradient(g[:, :1, :, :1])  # (B, 1, G, 1): one element of each group
      d = g - pivot
      mean_d = jnp.mean(d, axis=(1, 3), keepdims=True)
      var = jnp.maximum(jnp.mean(jnp.square(d), axis=(1, 3), keepdims=True) - jnp.square(mean_d), 0.0)
      mean = pivot + mean_d
    else:
      mean = jnp.mean(g, axis=(1, 3), keepdims=True)
      var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = (g.reshape(shape) * scale + bias).astype(x.dtype)
    if scale_shift is not None:
      y = y * (1 + scale_shift[0]) + scale_shift[1]
    if silu:
      y = nn.silu(y)
    y = y.astype(out_dtype)
    if project is not None:
      return y, skip_conv(parts, *project)
    return _resample_pair(y, parts[0], resample)

  def _folded(self, x, scale, bias, scale_shift, silu, out_dtype, pallas=False, resample=None, project=None):
    # x: channel parts, or Phases (spatial pieces: per-phase statistics, the apply interleaves).
    phases = isinstance(x, Phases)
    parts = x.arrays if phases else x
    shape = x.shape if phases else parts[0].shape
    b, spatial, c = shape[0], shape[1:-1], scale.shape[0]
    # The Pallas kernels where every part tiles, chosen per platform at lowering (XLA off NVIDIA GPUs).
    if phases:
      pallas = pallas and pallas_norm.phases_supported(*parts[0].shape[1:])
    else:
      pallas = pallas and all(pallas_norm.supported(math.prod(spatial), p.shape[-1]) for p in parts)
    sums_fn = None
    if pallas:
      sums_fn = lambda x3, p: jax.lax.platform_dependent(x3, p, cuda=pallas_norm.channel_sums,
                                                         default=pallas_norm.channel_sums_reference)
    mean, var = _channel_group_stats(parts, self.num_groups, sums_fn, spatial=phases)  # (B, G)
    per_channel = lambda v: jnp.repeat(v, c // self.num_groups, axis=-1)  # (B, G) -> (B, C)
    a = per_channel(jax.lax.rsqrt(var + self.epsilon)) * scale
    d = bias - per_channel(mean) * a
    bcast = (b,) + (1,) * len(spatial) + (c,)
    a, d = a.reshape(bcast), d.reshape(bcast)
    if scale_shift is not None:
      mul = 1 + scale_shift[0].astype(jnp.float32)
      a, d = a * mul, d * mul + scale_shift[1].astype(jnp.float32)
    a, d = jax.lax.optimization_barrier((a, d))

    def xla_apply(parts, a, d):
      x = Phases(parts).interleave() if phases else _concat_channels(parts)  # fused into the apply
      y = x.astype(jnp.float32) * a + d
      return (nn.silu(y) if silu else y).astype(out_dtype)

    def kernel_apply(parts, a, d):
      if phases:
        return pallas_norm.affine_act_phases(parts, a.reshape(b, c), d.reshape(b, c), silu=silu,
                                             out_dtype=out_dtype)
      y = pallas_norm.affine_act(tuple(p.reshape(b, -1, p.shape[-1]) for p in parts), a.reshape(b, c),
                                 d.reshape(b, c), silu=silu, out_dtype=out_dtype)
      return y.reshape(b, *spatial, c)

    def apply(parts, a, d):
      if not pallas:
        return xla_apply(parts, a, d)
      return jax.lax.platform_dependent(parts, a, d, cuda=kernel_apply, default=xla_apply)

    if project is not None:
      # A ResBlock's skip conv from the apply's read of its input (`UNet.skip_impl="fused"`), where the kernel
      # tiles; else the apply and `skip_conv` (XLA's 1x1 convs).
      n, kernel, kbias = math.prod(spatial), project[0], project[1]
      xla_pair = lambda parts, a, d: (xla_apply(parts, a, d), skip_conv(parts, kernel, kbias))
      # (the kernel returns the parts' dtype, skip_conv the kernel's: one dtype for both branches)
      if not (pallas and pallas_norm.skip_supported(n, [p.shape[-1] for p in parts], kernel.shape[-1])
              and all(p.dtype == kernel.dtype for p in parts)):
        return apply(parts, a, d), skip_conv(parts, kernel, kbias)

      def kernel_pair(parts, a, d):
        y, s = pallas_norm.affine_act_skip(tuple(p.reshape(b, n, p.shape[-1]) for p in parts), a.reshape(b, c),
                                           d.reshape(b, c), kernel[0, 0], kbias, silu=silu, out_dtype=out_dtype)
        return y.reshape(b, *spatial, c), s.reshape(b, *spatial, kernel.shape[-1])

      return jax.lax.platform_dependent(parts, a, d, cuda=kernel_pair, default=xla_pair)
    if not resample:
      return apply(parts, a, d)
    # A resampling block: one kernel for the apply and the skip path where it tiles, else the apply (the rows
    # kernel where that tiles), then the XLA pools / up-sampling.
    fused, ok = {"down": (pallas_norm.affine_act_pool, pallas_norm.pool_supported),
                 "up": (pallas_norm.affine_act_up, pallas_norm.up_supported)}[resample]
    if not (pallas and ok(*parts[0].shape[1:])):
      return _resample_pair(apply(parts, a, d), parts[0], resample)
    xla_pair = lambda parts, a, d: _resample_pair(xla_apply(parts, a, d), parts[0], resample)
    kernel = lambda parts, a, d: fused(parts[0], a.reshape(b, c), d.reshape(b, c), silu=silu, out_dtype=out_dtype)
    return jax.lax.platform_dependent(parts, a, d, cuda=kernel, default=xla_pair)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1, zero: bool = False) -> nn.Conv:
  pad = kernel // 2
  kw = dict(kernel_init=nn.initializers.zeros) if zero else {}  # guided-diffusion's zero_module
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 dtype=dtype, param_dtype=jnp.float32, name=name, **kw)


def _avg_pool2(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def _resample_pair(y: jax.Array, x: jax.Array, resample: Optional[str]):
  """GroupNorm32's result for `resample` from its activation y and input x (the XLA paths)."""
  if resample == "down":
    return _avg_pool2(y), _avg_pool2(x)
  if resample == "up":
    return y, _upsample_nearest2(x)
  return y


def _upsample_nearest2(x: jax.Array) -> jax.Array:
  return pallas_norm.upsample_nearest2(x)  # broadcast + reshape: one fused copy, no gather


UPSAMPLE_IMPLS = ("nearest", "transposed", "phases")


def _fold_nearest2(kernel: jax.Array, axis: int) -> jax.Array:
  """3 taps of a conv that follows nearest x2 -> the 4 taps of the equivalent stride-2 transposed conv.

  Output 2i sees x[i-1] through w[0] and x[i] through w[1] + w[2]; output 2i+1 sees x[i] through w[0] + w[1]
  and x[i+1] through w[2]. Over the 2x-dilated input padded by 2 these are the taps (w0, w0+w1, w1+w2, w2).
  """
  w0, w1, w2 = jnp.split(kernel, 3, axis=axis)
  return jnp.concatenate([w0, w0 + w1, w1 + w2, w2], axis=axis)


def _phase_kernels(kernel: jax.Array) -> jax.Array:
  """(3, 3, Cin, Cout) kernel of a conv that follows nearest x2 -> (2, 2, Cin, 2, 2, Cout): [..., py, px, :]
  is the 2x2 kernel of output phase (py, px) (the output pixels (2i + py, 2j + px)).

  Along one axis (`_fold_nearest2`'s sums): output 2i reads rows (i - 1, i) with taps (w0, w1 + w2), output
  2i + 1 reads rows (i, i + 1) with taps (w0 + w1, w2).
  """
  def fold(k, axis):  # -> the two phases' 2-tap kernels, phase axis inserted before Cout
    w0, w1, w2 = jnp.split(k, 3, axis=axis)
    return jnp.stack([jnp.concatenate([w0, w1 + w2], axis), jnp.concatenate([w0 + w1, w2], axis)], axis=-2)

  return fold(fold(kernel, 0), 1)  # the second fold inserts px after py


@dataclasses.dataclass(frozen=True)
class Phases:
  """A nearest-x2 up-sampled conv's output (B, 2H, 2W, C) kept as its four output phases: `arrays` =
  (p00, p01, p10, p11), each (B, H, W, C), with out[:, 2i + py, 2j + px] = arrays[2 * py + px][:, i, j].

  `UpConv(impl="phases")` makes it and the GroupNorm32 that follows reads it: its statistics sum each phase and
  its Pallas apply kernel writes the interleaved output (`pallas_norm.affine_act_phases`), so the interleaved
  conv output is never materialised."""
  arrays: tuple

  @property
  def shape(self) -> tuple:
    b, h, w, c = self.arrays[0].shape
    return (b, 2 * h, 2 * w, c)

  @property
  def dtype(self):
    return self.arrays[0].dtype

  def map(self, fn) -> "Phases":
    """An elementwise `fn` (with per-example/channel broadcasts only) commutes with the interleave."""
    return Phases(tuple(fn(a) for a in self.arrays))

  def interleave(self) -> jax.Array:
    return pallas_norm.interleave_phases(self.arrays)  # one XLA copy, or fused into its consumer


jax.tree_util.register_dataclass(Phases, data_fields=["arrays"], meta_fields=[])


class UpConv(nn.Module):
  """Nearest x2 up-sampling followed by a 3x3 conv (pad 1), with the parameters of that 3x3 `nn.Conv`.

  `impl`:
  - "nearest" materialises the 4x up-sampled tensor and convolves it (9 taps per output pixel, like
    guided-diffusion).
  - "transposed" folds the up-sampling into the kernel: one stride-2 transposed conv with a 4x4 kernel built
    from the 3x3 one (`_fold_nearest2`), reading the low-resolution input directly (measured 3% slower on an
    H200: cuDNN runs it as a strided backward-data conv).
  - "phases": the same folded taps as four ordinary 2x2 convs over the low-resolution input, one per output
    phase (`_phase_kernels`; 16 taps per 2x2 output block instead of 36: 0.44x the arithmetic), no 4x
    up-sampled intermediate. The phases are interleaved by one copy, or (`keep_phases`) by the GroupNorm32
    that reads them (`Phases`).
  All three are equal in exact arithmetic; in floating point the summed taps round differently (float32:
  ~1e-7 relative). The folded kernels add the taps rounded to the compute dtype, in float32, and round the
  sums once more (weights only, once per call): from float32 params that is what pre-cast params
  (`cast_params_for_compute`) give, so the two stay bit-identical.
  """
  features: int
  dtype: Dtype = jnp.float32
  impl: str = "phases"

  def _taps(self, kernel: jax.Array) -> jax.Array:
    """The 3x3 taps as the folds add them: rounded to the compute dtype (as pre-cast params already are),
    then float32."""
    return kernel.astype(self.dtype or kernel.dtype).astype(jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, keep_phases: bool = False):
    """x (B, H, W, Cin) -> (B, 2H, 2W, Cout); with `keep_phases` and impl "phases", the output as `Phases`
    (for a GroupNorm32 to read; any other impl returns the array)."""
    if self.impl not in UPSAMPLE_IMPLS:
      raise ValueError(f"upsample impl {self.impl!r} not in {UPSAMPLE_IMPLS}")
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    if self.impl == "phases":
      kernels = _phase_kernels(self._taps(kernel))
      x, kernels, bias = nn.dtypes.promote_dtype(x, kernels, bias, dtype=self.dtype)
      # Phase (py, px) reads input rows (i - 1 + py, i + py): its own zero padding makes each output (B, H, W).
      phases = Phases(tuple(
          jax.lax.conv_general_dilated(x, kernels[:, :, :, py, px], (1, 1), ((1 - py, py), (1 - px, px)),
                                       dimension_numbers=dn) + bias
          for py in (0, 1) for px in (0, 1)))
      return phases if keep_phases else phases.interleave()
    if self.impl == "nearest":
      x, pad, dilation = _upsample_nearest2(x), 1, 1
    else:
      kernel = _fold_nearest2(_fold_nearest2(self._taps(kernel), 0), 1)  # (4, 4, Cin, Cout)
      pad, dilation = 2, 2
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)), lhs_dilation=(dilation,) * 2,
                                     dimension_numbers=dn)
    return y + bias


def skip_conv(parts: Sequence[jax.Array], kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The 1x1 conv with `kernel` (1, 1, C, O) and `bias` (O,) (their dtype is the compute dtype) of the channel
  concatenation of `parts`, as one conv per part with its slice of the kernel, summed, plus the bias."""
  offsets = [0, *itertools.accumulate(p.shape[-1] for p in parts)]
  convs = [jax.lax.conv_general_dilated(p.astype(kernel.dtype), kernel[:, :, lo:hi], (1, 1), ((0, 0), (0, 0)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
           for p, lo, hi in zip(parts, offsets, offsets[1:])]
  return functools.reduce(operator.add, convs) + bias


class SkipConv(nn.Module):
  """The ResBlock's 1x1 `skip_connection` conv over the channel concatenation of `parts` (the params of a
  1x1 `nn.Conv` over all their channels), computed as the sum of one conv per part with its slice of the
  kernel (`skip_conv`): a decoder block given (h, skip) never materialises their concatenation (its
  GroupNorm32 takes the parts too). Equal to the conv of the concatenation in exact arithmetic; in floating
  point the partial sums round differently (float32: ~1e-7 relative; in bf16 each part's conv output may be
  rounded to bf16 before the add, unless XLA folds the add into the cuDNN conv as its side input).
  `weights(C)` gives the (kernel, bias) in the compute dtype, for a caller that computes the conv itself
  (`UNet.skip_impl="fused"`: the GroupNorm kernel that reads the parts anyway)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def weights(self, channels: int) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, channels, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return tuple(nn.dtypes.promote_dtype(kernel, bias, dtype=self.dtype))

  def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
    return skip_conv(parts, *self.weights(sum(p.shape[-1] for p in parts)))


SKIP_IMPLS = ("concat", "split", "fused")


EDGE_IMPLS = ("conv", "gemm")


def _conv3x3_as_gemm(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (B, H, W, C), kernel (3, 3, C, O) -> the 3x3 conv with zero padding 1, (B, H, W, O), as ONE GEMM.

  For the UNet's two convs with a narrow side, where cuDNN's tiles are mostly padding (H200, ADM-256 at 224,
  batch 128: 3.2 ms/call at 28 TFLOP/s for the input conv 3 -> 256, 8.5 ms at 21 TFLOP/s for the float32
  output conv 256 -> 6):
  - narrow input (C < O): im2col. The nine shifted windows of the zero-padded x, concatenated tap-major, are a
    (B*H*W, 9*C) patch matrix (27 wide for RGB) times kernel.reshape(9*C, O).
  - narrow output: taps[b, p, q, i, j] = x[b, p, q] @ kernel[i, j] is a (B*H*W, C) x (C, 9*O) GEMM that reads
    x once; output pixel (p, q) is the sum over (i, j) of taps[b, p + i - 1, q + j - 1, i, j] (zero outside
    the image, as the padding gives): nine shifted slices of the padded taps, added in one fusion.
  """
  _, h, w, c = x.shape
  o = kernel.shape[-1]
  if c < o:
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(9 * c, o))
  # (B, H, W, 3, 3, O): the dot's natural output order (lhs free dims, then rhs free dims), so no transpose.
  taps = jnp.einsum("bhwc,ijco->bhwijo", x, kernel)
  taps = jnp.pad(taps, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
  return functools.reduce(operator.add, [taps[:, i:i + h, j:j + w, i, j] for i in range(3) for j in range(3)])


class Conv3x3(nn.Module):
  """A 3x3 conv (stride 1, zero padding 1) with the params of the `nn.Conv` it replaces: `impl` "conv"
  (`lax.conv_general_dilated`, as nn.Conv) or "gemm" (the same map as one GEMM, `_conv3x3_as_gemm`). The UNet
  uses it for its input conv and its zero-initialised float32 output conv (`UNet.edge_impl`)."""
  features: int
  dtype: Dtype = jnp.float32
  impl: str = "conv"
  zero_init: bool = False  # guided-diffusion's zero_module (the output conv)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.impl not in EDGE_IMPLS:
      raise ValueError(f"Conv3x3 impl {self.impl!r} not in {EDGE_IMPLS}")
    init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    kernel = self.param("kernel", init, (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.impl == "gemm":
      return _conv3x3_as_gemm(x, kernel) + bias
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


class ResBlock(nn.Module):
  """guided-diffusion ResBlock (optionally up/down sampling). x (B,H,W,C), emb (B,E)."""
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False
  dtype: Dtype = jnp.float32
  norm_stats: str = "auto"
  upsample_impl: str = "phases"
  skip_impl: str = "split"  # "fused": the 1x1 skip conv (if any) computed by the first GroupNorm (no resampling)

  @nn.compact
  def __call__(self, x, emb: jax.Array, train: bool = False) -> jax.Array:
    # x: an array, or a tuple of arrays that make the input as their channel concatenation (a decoder block's
    # (h, skip) with skip_impl="split": the concatenation then feeds only fusions, see SkipConv).
    parts = _as_parts(x)
    if len(parts) > 1 and (self.up or self.down):
      raise ValueError("ResBlock: an input in parts is only supported without up/down sampling")
    x = parts[0] if len(parts) == 1 else parts  # the GroupNorm and the skip conv read parts where they lie
    c = sum(p.shape[-1] for p in parts)
    # A resampling block's skip path (x pooled or up-sampled) comes from the GroupNorm's read of x (on an
    # NVIDIA GPU in bf16 from its Pallas kernel; elsewhere in XLA).
    resample = "down" if self.down else "up" if self.up else None
    project = None
    if self.skip_impl == "fused" and self.out_channels != c and not resample:
      # The skip conv reads what the GroupNorm reads (a decoder block's parts, or one array): one kernel does
      # both, where it tiles.
      project = SkipConv(self.out_channels, self.dtype, name="skip_connection").weights(c)
    h = GroupNorm32(stats=self.norm_stats, name="in_layers_0")(x, silu=True, resample=resample, project=project)
    if resample or project is not None:
      h, x = h
    if self.up:
      # "phases": h stays as its four phases; out_layers_0 (GroupNorm32) interleaves them as it applies.
      h = UpConv(self.out_channels, self.dtype, self.upsample_impl, name="in_layers_2")(h, keep_phases=True)
    else:
      h = _conv(self.out_channels, 3, "in_layers_2", self.dtype)(h)
    emb_dim = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
    emb_out = nn.Dense(emb_dim, dtype=self.dtype, param_dtype=jnp.float32, name="emb_layers_1")(
        nn.silu(emb)).astype(h.dtype)
    emb_out = emb_out[:, None, None, :]
    out_norm = GroupNorm32(stats=self.norm_stats, name="out_layers_0")
    if self.use_scale_shift_norm:
      h = out_norm(h, scale_shift=jnp.split(emb_out, 2, axis=-1), silu=True)
    else:
      h = out_norm(h.map(lambda p: p + emb_out) if isinstance(h, Phases) else h + emb_out, silu=True)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_channels, 3, "out_layers_3", self.dtype, zero=True)(h)
    if project is None:  # (with a projection, x is the skip conv's output already)
      if self.out_channels != c:
        x = SkipConv(self.out_channels, self.dtype, name="skip_connection")(parts if len(parts) > 1 else (x,))
      elif len(parts) > 1:
        x = _concat_channels(parts)  # identity skip over parts (not in the ADM presets)
    if len(parts) > 1:
      # h first: XLA's cuDNN rewriter folds an add into the conv of its FIRST single-use conv operand (as bias,
      # then side input); a split skip conv already holds its second part as side input, the out conv does not.
      return h + x
    return x + h


class AttentionBlock(nn.Module):
  """Spatial self-attention (guided-diffusion AttentionBlock) on NHWC tokens, one fused attention call.

  `qkv` / `proj_out` are projections over channels (torch: 1x1 Conv1d).
  """
  num_heads: int = 1
  num_head_channels: int = -1
  use_new_attention_order: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = "auto"
  norm_stats: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    if self.num_head_channels == -1:
      heads = self.num_heads
    else:
      if c % self.num_head_channels:
        raise ValueError(f"channels {c} not divisible by num_head_channels {self.num_head_channels}")
      heads = c // self.num_head_channels
    if c % heads:
      raise ValueError(f"channels {c} not divisible by num_heads {heads}")
    ch = c // heads
    tokens = x.reshape(b, hh * ww, c)
    normed = GroupNorm32(stats=self.norm_stats, name="norm")(x).reshape(b, hh * ww, c)
    q, k, v = QKV(heads, legacy_order=not self.use_new_attention_order, dtype=self.dtype, name="qkv")(normed)
    a = _attention(q, k, v, 1.0 / math.sqrt(ch), self.attention_impl)  # (B, L, heads, ch)
    a = a.reshape(b, hh * ww, c)
    h = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.zeros,
                 name="proj_out")(a)
    return (tokens + h.astype(tokens.dtype)).reshape(b, hh, ww, c)


class Downsample(nn.Module):
  conv_resample: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.conv_resample:
      return _conv(x.shape[-1], 3, "op", self.dtype, stride=2)(x)
    return _avg_pool2(x)


class Upsample(nn.Module):
  conv_resample: bool = True
  dtype: Dtype = jnp.float32
  upsample_impl: str = "phases"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.conv_resample:
      return UpConv(x.shape[-1], self.dtype, self.upsample_impl, name="conv")(x)
    return _upsample_nearest2(x)


def default_channel_mult(image_size: int) -> tuple:
  """guided-diffusion create_model's channel_mult for channel_mult == "" (32 -> (1, 2, 2, 2) is
  improved-diffusion's CIFAR-10 default; guided-diffusion itself raises for 32)."""
  table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
           32: (1, 2, 2, 2)}
  if image_size not in table:
    raise ValueError(f"no default channel_mult for image_size {image_size}; pass channel_mult explicitly")
  return table[image_size]


class UNet(nn.Module):
  """guided-diffusion UNetModel, NHWC.

  `__call__(x (B,H,W,in_channels) float in [-1,1], t (B,) int timesteps, y (B,) int labels or None,
  train=False) -> (B,H,W,out_channels) float32`. H and W must be divisible by 2**(len(channel_mult)-1)
  (e.g. the 256 preset runs on 224x224: 224 -> 112 -> 56 -> 28 -> 14 -> 7). `attention_resolutions` are
  downsample factors (ds), like UNetModel's argument (create_model's "32,16,8" becomes image_size // res).
  `image_size` is informational only (the network is fully convolutional).
  """
  image_size: int = 64
  in_channels: int = 3
  model_channels: int = 128
  out_channels: int = 3
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  channel_mult: Sequence[float] = (1, 2, 4, 8)
  conv_resample: bool = True
  num_classes: Optional[int] = None
  num_heads: int = 1
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_new_attention_order: bool = False
  # improved-diffusion's rescale_timesteps: the network sees t * 1000 / T (float), e.g. 0.25 for its
  # 4000-step CIFAR-10 models; guided-diffusion's ADM models see the integer t (1.0).
  timestep_scale: float = 1.0
  dtype: Dtype = jnp.float32
  # Execution choices (EXECUTION_FIELDS), not checkpoint properties (the params are the same for every value):
  # attention_impl: "auto" (cuDNN fused attention on NVIDIA GPUs in bf16/fp16, else XLA), "xla", "cudnn".
  attention_impl: Optional[str] = "auto"
  # norm_stats: GroupNorm statistics and apply, "auto" (two-pass in float32, "pallas" in bf16/fp16:
  # auto_norm_stats), "two_pass", "one_pass", "channel", "pallas" (see GroupNorm32).
  norm_stats: str = "auto"
  # upsample_impl: "phases" (default; nearest x2 + the 3x3 conv as four 2x2 convs on the low-resolution
  # input, one per output phase: 0.44x the arithmetic; H200, bf16: 3.2-3.3% faster), "nearest" (materialise
  # nearest x2, then the 3x3 conv, like guided-diffusion) or "transposed" (one stride-2 transposed conv;
  # measured 3% slower than "nearest"). Same function; see UpConv.
  upsample_impl: str = "phases"
  # skip_impl: how a decoder block takes its encoder skip: "concat" (concatenate, then the ResBlock, like
  # guided-diffusion) or "split" (default; the ResBlock gets both parts; its 1x1 skip conv is one conv per part
  # and its GroupNorm reads the parts, so with the "channel"/"pallas" statistics (bf16 "auto") the
  # concatenation is never materialised; the float32 two-pass statistics still concatenate; see SkipConv,
  # GroupNorm32). H200, bf16: 2.5% faster than "concat". "fused" (not measured on a GPU yet): "split", and
  # every ResBlock with a 1x1 skip conv (the decoder blocks, an encoder block that widens) computes that conv
  # in its first GroupNorm's Pallas kernel from the read the apply makes anyway (`pallas_norm.affine_act_skip`;
  # where it tiles: ADM-256 at 224, the 10 blocks at 56x56 and above); elsewhere it is "split".
  skip_impl: str = "split"
  # edge_impl: the input conv (3 -> 256 channels in ADM-256) and the float32 output conv (256 -> 6): "conv", or
  # "gemm" (default; each as one GEMM, by its narrow side: im2col patches when it has fewer input than output
  # channels, else the nine taps and a shifted sum; see _conv3x3_as_gemm). H200: the two convs 11.7 -> ~5.5
  # ms per call at batch 128 (denoise 1.3% faster).
  edge_impl: str = "gemm"

  @property
  def learn_sigma(self) -> bool:
    return self.out_channels == 2 * self.in_channels

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"UNet expects NHWC input with {self.in_channels} channels, got shape {x.shape}")
    factor = 2 ** (len(self.channel_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"UNet input spatial size {x.shape[1:3]} must be divisible by {factor}")
    for field, allowed in (("skip_impl", SKIP_IMPLS), ("edge_impl", EDGE_IMPLS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"UNet.{field} {getattr(self, field)!r} not in {allowed}")
    if (y is None) != (self.num_classes is None):
      raise ValueError("labels y must be given if and only if the model is class-conditional "
                       f"(num_classes={self.num_classes}, y is None: {y is None})")
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (x.shape[0],))
    if self.timestep_scale != 1.0:
      t = t.astype(jnp.float32) * self.timestep_scale
    mc = self.model_channels
    ted = 4 * mc
    heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
    attn_ds = tuple(int(a) for a in self.attention_resolutions)
    dt = self.dtype
    f32 = jnp.float32

    # Timestep MLP in float32 (tiny; keeps the embedding exact in reduced precision).
    emb = timestep_embedding(t, mc)
    emb = nn.Dense(ted, dtype=f32, param_dtype=f32, name="time_embed_0")(emb)
    emb = nn.Dense(ted, dtype=f32, param_dtype=f32, name="time_embed_2")(nn.silu(emb))
    if self.num_classes is not None:
      emb = emb + nn.Embed(self.num_classes, ted, param_dtype=f32, name="label_emb")(y)

    def res(name, out_ch, **kw):
      return ResBlock(out_ch, dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm, dtype=dt,
                      norm_stats=self.norm_stats, upsample_impl=self.upsample_impl, skip_impl=self.skip_impl,
                      name=name, **kw)

    def attn(name, heads):
      return AttentionBlock(num_heads=heads, num_head_channels=self.num_head_channels,
                            use_new_attention_order=self.use_new_attention_order, dtype=dt,
                            attention_impl=self.attention_impl, norm_stats=self.norm_stats, name=name)

    h = x.astype(dt)
    ch = int(self.channel_mult[0] * mc)
    h = Conv3x3(ch, dt, self.edge_impl, name="input_blocks_0_0")(h)
    hs = [h]
    ds = 1
    idx = 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        ch = int(mult * mc)
        h = res(f"input_blocks_{idx}_0", ch)(h, emb, train)
        if ds in attn_ds:
          h = attn(f"input_blocks_{idx}_1", self.num_heads)(h)
        hs.append(h)
        idx += 1
      if level != len(self.channel_mult) - 1:
        if self.resblock_updown:
          h = res(f"input_blocks_{idx}_0", ch, down=True)(h, emb, train)
        else:
          h = Downsample(self.conv_resample, dtype=dt, name=f"input_blocks_{idx}_0")(h)
        hs.append(h)
        idx += 1
        ds *= 2

    h = res("middle_block_0", ch)(h, emb, train)
    h = attn("middle_block_1", self.num_heads)(h)
    h = res("middle_block_2", ch)(h, emb, train)

    idx = 0
    for level, mult in list(enumerate(self.channel_mult))[::-1]:
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1) if self.skip_impl == "concat" else (h, hs.pop())
        ch = int(mc * mult)
        h = res(f"output_blocks_{idx}_0", ch)(h, emb, train)
        j = 1
        if ds in attn_ds:
          h = attn(f"output_blocks_{idx}_{j}", heads_up)(h)
          j += 1
        if level and i == self.num_res_blocks:
          if self.resblock_updown:
            h = res(f"output_blocks_{idx}_{j}", ch, up=True)(h, emb, train)
          else:
            h = Upsample(self.conv_resample, dtype=dt, upsample_impl=self.upsample_impl,
                       name=f"output_blocks_{idx}_{j}")(h)
          ds //= 2
        idx += 1

    # Output head in float32, like guided-diffusion's fp16 mode (h.type(x.dtype) before self.out): the
    # GroupNorm reads the compute-dtype activation and writes float32.
    h = GroupNorm32(stats=self.norm_stats, out_dtype=f32, name="out_0")(h, silu=True)
    return Conv3x3(self.out_channels, f32, self.edge_impl, zero_init=True, name="out_2")(h)


# Layers that run in float32 whatever the compute dtype (see UNet.__call__): the timestep MLP and the output
# conv. GroupNorm params (`scale`, `bias` without a `kernel`) are float32 everywhere too.
_FLOAT32_LAYERS = frozenset({"time_embed_0", "time_embed_2", "out_2"})


def cast_params_for_compute(params, dtype: Dtype):
  """A copy of UNet `params` with the weights of the `dtype` layers stored in `dtype` (others untouched).

  Flax casts float32 params to the compute dtype inside every layer, on every call: for the frozen 552M-param
  ADM model in bf16 that is 2.2 GB read + 1.1 GB written per UNet call. Casting once, outside the jitted
  step, gives bit-identical outputs (the same float32 -> dtype rounding, done earlier) at half the memory.
  Cast: the kernel and bias of every conv / dense / qkv layer except the float32 ones (`_FLOAT32_LAYERS`);
  kept: GroupNorm scale/bias and the label embedding. Use only for frozen params (not for training).
  `params` is the "params" collection (a dict tree), not the variables dict.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return params
  if "params" in params and len(params) == 1:
    raise ValueError("cast_params_for_compute takes variables['params'], not the variables dict")

  def walk(tree, top):
    if "kernel" in tree and not isinstance(tree["kernel"], Mapping):
      if top in _FLOAT32_LAYERS:
        return dict(tree)
      return {k: v.astype(dtype) if k in ("kernel", "bias") else v for k, v in tree.items()}
    return {k: walk(v, top or k) if isinstance(v, Mapping) else v for k, v in tree.items()}

  return walk(dict(params), None)


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return int(sum(math.prod(l.shape) for l in jax.tree_util.tree_leaves(tree)))


def _parse_ints(spec) -> tuple:
  if isinstance(spec, str):
    return tuple(int(s) for s in spec.split(",") if s.strip())
  return tuple(int(s) for s in spec)


# guided-diffusion create_gaussian_diffusion arguments: irrelevant to the network, ignored by unet_from_flags.
_DIFFUSION_FLAGS = frozenset({"diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
                              "rescale_timesteps", "rescale_learned_sigmas", "sigma_small"})


def unet_from_flags(image_size: int = 64, num_channels: int = 128, num_res_blocks: int = 2,
                    channel_mult: Any = "", learn_sigma: bool = False, class_cond: bool = False,
                    use_checkpoint: bool = False, attention_resolutions: Any = "16,8", num_heads: int = 1,
                    num_head_channels: int = -1, num_heads_upsample: int = -1,
                    use_scale_shift_norm: bool = False, dropout: float = 0.0, resblock_updown: bool = False,
                    use_fp16: bool = False, use_new_attention_order: bool = False, *, in_channels: int = 3,
                    num_classes: int = 1000, dtype: Optional[Dtype] = None,
                    attention_impl: Optional[str] = "auto", norm_stats: str = "auto",
                    upsample_impl: str = "phases", skip_impl: str = "split", edge_impl: str = "gemm",
                    **unknown) -> UNet:
  """guided-diffusion `create_model(...)` arguments -> UNet (same semantics).

  channel_mult "" -> default per image_size; "1,2,2" or a tuple otherwise. attention_resolutions are
  resolutions ("32,16,8") converted to downsample factors image_size // res. use_fp16 -> dtype float16 (unless
  `dtype` is given). use_checkpoint is accepted and ignored (use jax.checkpoint in the program if needed).
  guided-diffusion's diffusion flags (diffusion_steps, noise_schedule, timestep_respacing, ...) are accepted
  and ignored (they do not change the network), so a full `args` dump works, except rescale_timesteps=True,
  which sets `timestep_scale = 1000 / diffusion_steps` (what the network is fed); any other unknown flag raises a
  ValueError so a typo does not silently build a different net. predict_xstart=True is rejected (the
  eps-prediction factories would misread such a model).
  """
  del use_checkpoint
  if unknown.get("predict_xstart"):
    raise ValueError("unet_from_flags: predict_xstart=True (x0-predicting models) is not supported")
  # rescale_timesteps (improved-diffusion's default; guided-diffusion's is False) changes what the network
  # is fed: t * 1000 / diffusion_steps.
  timestep_scale = 1.0
  if unknown.get("rescale_timesteps"):
    timestep_scale = 1000.0 / float(unknown.get("diffusion_steps", 1000))
  unknown = {k: v for k, v in unknown.items() if k not in _DIFFUSION_FLAGS}
  if unknown:
    raise ValueError(f"unet_from_flags: unknown model flag(s) {sorted(unknown)}")
  if channel_mult in ("", None, ()):
    mult = default_channel_mult(int(image_size))
  elif isinstance(channel_mult, str):
    mult = tuple(float(s) if "." in s else int(s) for s in channel_mult.split(","))
  else:
    mult = tuple(channel_mult)
  attn = tuple(int(image_size) // r for r in _parse_ints(attention_resolutions))
  if dtype is None:
    dtype = jnp.float16 if use_fp16 else jnp.float32
  return UNet(image_size=int(image_size), in_channels=in_channels, model_channels=int(num_channels),
              out_channels=(2 * in_channels if learn_sigma else in_channels), num_res_blocks=int(num_res_blocks),
              attention_resolutions=attn, dropout=float(dropout), channel_mult=mult,
              num_classes=(num_classes if class_cond else None), num_heads=int(num_heads),
              num_head_channels=int(num_head_channels), num_heads_upsample=int(num_heads_upsample),
              use_scale_shift_norm=bool(use_scale_shift_norm), resblock_updown=bool(resblock_updown),
              use_new_attention_order=bool(use_new_attention_order), dtype=dtype, attention_impl=attention_impl,
              norm_stats=norm_stats, upsample_impl=upsample_impl, skip_impl=skip_impl, edge_impl=edge_impl,
              timestep_scale=timestep_scale)


# create_model flags, exactly as in the guided-diffusion / improved-diffusion READMEs (model flags only).
# use_fp16 is False here: the compute dtype is chosen at inference (score.make_eps_fn(dtype=...)).
_ADM_DEFAULTS = dict(num_res_blocks=2, channel_mult="", learn_sigma=False, class_cond=False,
                     use_checkpoint=False, attention_resolutions="16,8", num_heads=4, num_head_channels=-1,
                     num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=False,
                     use_fp16=False, use_new_attention_order=False)

# The presets of released checkpoints also name the noise schedule they were trained with (noise_schedule,
# diffusion_steps: guided-diffusion flags the network ignores); `checkpoint.load_score_model` holds the
# caller's schedule to them.
UNET_PRESETS: dict = {
    # 256x256_diffusion_uncond.pt (the DiffAug score model), 552,814,086 params. Linear schedule, 1000 steps.
    "adm_256_uncond": dict(_ADM_DEFAULTS, image_size=256, num_channels=256, num_res_blocks=2,
                           attention_resolutions="32,16,8", num_head_channels=64, learn_sigma=True,
                           resblock_updown=True, use_scale_shift_norm=True, noise_schedule="linear",
                           diffusion_steps=1000),
    # 256x256_diffusion.pt (class-conditional). Linear schedule.
    "adm_256_cond": dict(_ADM_DEFAULTS, image_size=256, num_channels=256, num_res_blocks=2,
                         attention_resolutions="32,16,8", num_head_channels=64, learn_sigma=True,
                         class_cond=True, resblock_updown=True, noise_schedule="linear", diffusion_steps=1000),
    # 64x64_diffusion.pt. Cosine schedule, dropout 0.1 (only matters for training).
    "adm_64_cond": dict(_ADM_DEFAULTS, image_size=64, num_channels=192, num_res_blocks=3,
                        attention_resolutions="32,16,8", num_head_channels=64, learn_sigma=True,
                        class_cond=True, resblock_updown=True, use_new_attention_order=True, dropout=0.1,
                        noise_schedule="cosine", diffusion_steps=1000),
    # 128x128_diffusion.pt. Linear schedule.
    "adm_128_cond": dict(_ADM_DEFAULTS, image_size=128, num_channels=256, num_res_blocks=2,
                         attention_resolutions="32,16,8", num_heads=4, learn_sigma=True, class_cond=True,
                         resblock_updown=True, noise_schedule="linear", diffusion_steps=1000),
    # improved-diffusion cifar10_uncond_50M_500K.pt (L_hybrid, cosine schedule with 4000 steps, dropout 0.3).
    # Trained with rescale_timesteps=True: the network sees t / 4 (timestep_scale 0.25).
    "iddpm_cifar10": dict(_ADM_DEFAULTS, image_size=32, num_channels=128, num_res_blocks=3,
                          attention_resolutions="16,8", num_heads=4, learn_sigma=True, dropout=0.3,
                          noise_schedule="cosine", diffusion_steps=4000, rescale_timesteps=True),
    # Small 32x32 model to train on CIFAR-10-sized data (~7M params: 6,949,187).
    "small_32": dict(_ADM_DEFAULTS, image_size=32, num_channels=64, num_res_blocks=2, channel_mult="1,2,2",
                     attention_resolutions="8", num_head_channels=32, learn_sigma=False, dropout=0.1),
    # Tiny model for the embedded digits data (1 channel; the demo runs it at the digits' native 8x8, any
    # size divisible by 4 works); trains on CPU in a few minutes. Attention at 8x8 resolution keeps every
    # code path alive.
    "digits": dict(_ADM_DEFAULTS, image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                   attention_resolutions="8", num_head_channels=32, learn_sigma=False, in_channels=1),
}


def unet_from_preset(name: str, **overrides) -> UNet:
  """Build a UNet from `UNET_PRESETS[name]`; overrides are create_model flags (or in_channels / num_classes /
  dtype)."""
  if name not in UNET_PRESETS:
    raise ValueError(f"unknown UNet preset {name!r}; known: {sorted(UNET_PRESETS)}")
  flags = dict(UNET_PRESETS[name])
  flags.update(overrides)
  return unet_from_flags(**flags)
