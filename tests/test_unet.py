"""ADM UNet: golden parity with guided-diffusion, presets, create_model flags, reduced precision.

Runtime: ~25 s of CPU time (two tiny golden models, a few jitted applies; the 256 preset only via eval_shape).
"""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from diffaug_jax import diffusion
from diffaug_jax.convert.guided_diffusion import load_guided_diffusion
from diffaug_jax.models import attention as attention_lib
from diffaug_jax.models import unet as unet_lib
from diffaug_jax.models.score import make_eps_fn, make_model_fn

GOLDEN = ("adm_uncond_tiny", "adm_cond_variant_tiny")


@pytest.fixture(scope="module")
def golden_models(golden_dir):
  """name -> dict(module, variables, x, t, y, ref, fn): fn(variables, x, t) jitted float32 full output."""
  out = {}
  for name in GOLDEN:
    flags = json.loads((golden_dir / f"{name}.json").read_text())
    module, variables = load_guided_diffusion(golden_dir / f"{name}.npz", **flags)
    data = np.load(golden_dir / f"{name}.npz")
    y = jnp.asarray(data["y"].astype(np.int32)) if "y" in data.files else None
    fn = jax.jit(lambda v, x, t, module=module, y=y: make_model_fn(module, v, y=y)(x, t))
    out[name] = dict(module=module, variables=variables, y=y, fn=fn,
                     x=jnp.asarray(data["x"].transpose(0, 2, 3, 1)),  # NCHW -> NHWC
                     t=jnp.asarray(data["t"].astype(np.int32)), ref=data["out"].transpose(0, 2, 3, 1))
  return out


# Execution choices that must not change the function (same params): the defaults (decoder skips in parts,
# the input and output convs as GEMMs, up-sampling convs as four 2x2 phase convs), guided-diffusion's literal
# structure (concatenated skips, convs, nearest x2 then the 3x3 conv), and the fast paths forced on in float32
# (one-pass GroupNorm statistics, up-sampling convs as stride-2 transposed convs, the "channel" GroupNorm fold,
# with per-part statistics over the decoder's parts and per-phase statistics over the up-sampling convs).
FAST_PATHS = {"one_pass+transposed": dict(norm_stats="one_pass", upsample_impl="transposed"),
              "channel": dict(norm_stats="channel"),
              "concat+conv+nearest": dict(skip_impl="concat", edge_impl="conv", upsample_impl="nearest"),
              "channel+concat+nearest": dict(norm_stats="channel", skip_impl="concat", upsample_impl="nearest"),
              "fused": dict(skip_impl="fused"), "channel+fused": dict(norm_stats="channel", skip_impl="fused")}


@pytest.mark.parametrize("variant", [None, *FAST_PATHS])
@pytest.mark.parametrize("name", GOLDEN)
def test_golden_parity_float32(golden_models, name, variant):
  g = golden_models[name]
  fn = g["fn"]
  if variant:
    module = g["module"].clone(**FAST_PATHS[variant])
    fn = jax.jit(lambda v, x, t: make_model_fn(module, v, y=g["y"])(x, t))
  out = np.asarray(fn(g["variables"], g["x"], g["t"]))
  ref = g["ref"]
  assert out.shape == ref.shape and out.dtype == np.float32
  scale = np.abs(ref).max()
  err = np.abs(out - ref).max() / scale
  print(f"{name}: max abs error / max |out| = {err:.2e}")
  assert err < 1e-5, f"{name}: max abs error {err:.3g} relative to max |out|"
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * scale)


def test_flags_semantics():
  m = unet_lib.unet_from_flags(image_size=256, num_channels=256, channel_mult="",
                               attention_resolutions="32,16,8", learn_sigma=True, use_fp16=True)
  assert m.channel_mult == (1, 1, 2, 2, 4, 4)
  assert tuple(m.attention_resolutions) == (8, 16, 32)  # downsample factors, as UNetModel receives
  assert m.out_channels == 6 and m.dtype == jnp.float16 and m.num_classes is None
  m = unet_lib.unet_from_flags(image_size=64, num_channels=192, channel_mult="1,2", class_cond=True)
  assert m.channel_mult == (1, 2) and m.num_classes == 1000 and m.out_channels == 3
  # Diffusion flags of a full guided-diffusion args dump are ignored; unknown (typo) flags are not.
  assert unet_lib.unet_from_flags(image_size=64, diffusion_steps=1000, noise_schedule="cosine").image_size == 64
  with pytest.raises(ValueError, match="num_chanels"):
    unet_lib.unet_from_flags(image_size=64, num_chanels=128)
  with pytest.raises(ValueError, match="predict_xstart"):
    unet_lib.unet_from_flags(image_size=64, predict_xstart=True)
  with pytest.raises(ValueError, match="channel_mult"):
    unet_lib.unet_from_flags(image_size=48, channel_mult="")


def _param_count(module):
  s = 2 ** (len(module.channel_mult) - 1)
  y = jnp.zeros((1,), jnp.int32) if module.num_classes else None
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, s, s, module.in_channels)),
                                              jnp.zeros((1,), jnp.int32), y))
  return unet_lib.count_params(shapes)


@pytest.mark.parametrize("name,count", [
    ("adm_256_uncond", 552_814_086),   # guided-diffusion 256x256_diffusion_uncond.pt
    ("adm_64_cond", 295_904_454),      # ADM paper: 296M
    ("adm_128_cond", 421_529_606),     # ADM paper: 422M
    ("iddpm_cifar10", 52_546_438),     # improved-diffusion CIFAR-10, 52.5M
])
def test_preset_param_counts(name, count):
  assert _param_count(unet_lib.unet_from_preset(name)) == count


def test_256_preset_runs_on_224_crops():
  m = unet_lib.unet_from_preset("adm_256_uncond")
  s = 2 ** (len(m.channel_mult) - 1)
  variables = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1,), jnp.int32)))
  out = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((2, 224, 224, 3)), jnp.zeros((2,), jnp.int32)), variables)
  assert out.shape == (2, 224, 224, 6) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="divisible by 32"):
    jax.eval_shape(lambda v: m.apply(v, jnp.zeros((1, 240, 240, 3)), jnp.zeros((1,), jnp.int32)), variables)


def test_small_presets_shapes():
  for name in ("small_32", "digits", "iddpm_cifar10"):
    m = unet_lib.unet_from_preset(name)
    x = jnp.zeros((2, m.image_size, m.image_size, m.in_channels))
    variables = jax.eval_shape(m.init, jax.random.key(0), x, jnp.zeros((2,), jnp.int32))
    out = jax.eval_shape(m.apply, variables, x, jnp.array([0, 999]))
    assert out.shape == x.shape[:3] + (m.out_channels,)
  assert unet_lib.unet_from_preset("digits").in_channels == 1


def test_rescale_timesteps_feeds_t_times_1000_over_T():
  """improved-diffusion's rescale_timesteps (its default; the released CIFAR-10 model): the network is fed
  t * 1000 / T, so the 4000-step preset at t = 400 computes what an unscaled net computes at t = 100."""
  assert unet_lib.unet_from_preset("iddpm_cifar10").timestep_scale == 0.25
  assert unet_lib.unet_from_preset("adm_256_uncond").timestep_scale == 1.0  # guided-diffusion: integer t
  m = unet_lib.unet_from_preset("digits", diffusion_steps=4000, rescale_timesteps=True)
  plain = m.clone(timestep_scale=1.0)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  v = plain.init(jax.random.key(1), x, jnp.zeros((2,), jnp.int32))
  v = jax.tree.map(lambda a: a + 0.01, v)  # the output conv is zero-initialised
  np.testing.assert_allclose(np.asarray(m.apply(v, x, jnp.array([400, 2000]))),
                             np.asarray(plain.apply(v, x, jnp.array([100, 500]))), rtol=1e-5, atol=1e-6)
  assert not np.allclose(m.apply(v, x, jnp.array([400, 2000])), plain.apply(v, x, jnp.array([400, 2000])))


def test_dropout_only_in_train_mode():
  block = unet_lib.ResBlock(32, dropout=0.5, use_scale_shift_norm=True)
  x, emb = jnp.ones((1, 4, 4, 32)), jnp.ones((1, 16))
  v = block.init(jax.random.key(0), x, emb)
  v = jax.tree.map(lambda a: a + 0.1, v)  # the output conv is zero-initialised (guided-diffusion zero_module)
  a = block.apply(v, x, emb, True, rngs={"dropout": jax.random.key(1)})
  b = block.apply(v, x, emb, True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(block.apply(v, x, emb), block.apply(v, x, emb))


def test_bad_inputs_raise():
  m = unet_lib.unet_from_preset("digits")
  with pytest.raises(ValueError, match="channels"):
    m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match="class-conditional"):
    m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))


# Reduced precision on the tiny golden model (random weights, so a harsher case than a trained net).
# Measured on CPU: bf16 eps rel. error ~0.02, x0_hat rel. error 0.004 (t=50) .. 0.018 (t=500);
# fp16 about 8x smaller. Bounds leave ~1.5-2x headroom.
BF16_EPS_BOUND = 0.04
BF16_X0_BOUND = 0.03
FP16_EPS_BOUND = 0.006


def test_reduced_precision_x0_hat_error(golden_models):
  g = golden_models["adm_uncond_tiny"]
  module, variables = g["module"], g["variables"]
  sched = diffusion.linear_schedule()
  x0 = jax.random.uniform(jax.random.key(0), g["x"].shape, minval=-1.0, maxval=1.0)
  t = jnp.array([100, 400], jnp.int32)
  x_t = diffusion.q_sample(sched, x0, t, jax.random.normal(jax.random.key(1), x0.shape))
  eps = {jnp.float32: g["fn"](variables, x_t, t)[..., :3]}  # same jitted fn as the parity test
  for dt in (jnp.bfloat16, jnp.float16):
    eps[dt] = jax.jit(lambda v, x, tt, dt=dt: make_eps_fn(module, v, dtype=dt)(x, tt))(variables, x_t, t)
    assert eps[dt].dtype == jnp.float32 and eps[dt].shape == x0.shape  # learn_sigma: eps channels only
  x0h = {dt: diffusion.predict_x0(sched, x_t, t, e) for dt, e in eps.items()}
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  eps_bf16, x0_bf16 = rel(eps[jnp.bfloat16], eps[jnp.float32]), rel(x0h[jnp.bfloat16], x0h[jnp.float32])
  eps_fp16, x0_fp16 = rel(eps[jnp.float16], eps[jnp.float32]), rel(x0h[jnp.float16], x0h[jnp.float32])
  print(f"bf16: eps rel err {eps_bf16:.4f}, x0_hat rel err {x0_bf16:.4f}; "
        f"fp16: eps rel err {eps_fp16:.4f}, x0_hat rel err {x0_fp16:.4f}")
  assert 0 < eps_bf16 < BF16_EPS_BOUND
  assert 0 < x0_bf16 < BF16_X0_BOUND
  assert 0 < eps_fp16 < FP16_EPS_BOUND
  # Master params untouched (still float32).
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables))


def test_groupnorm_statistics_in_float32_for_bf16_inputs():
  """GroupNorm32 on bf16 activations: statistics in float32, only the result rounded to bf16 (equal to the
  float32 computation cast down, up to one bf16 rounding: the bf16 path uses shifted per-channel sums, whose
  float32 sums can differ in the last bits). An input with a large offset makes bf16 statistics visibly
  wrong (> 0.05 off)."""
  gn = unet_lib.GroupNorm32()
  x = (40.0 + jax.random.normal(jax.random.key(0), (2, 4, 4, 64))).astype(jnp.bfloat16)
  v = {"params": {"scale": 1.0 + 0.1 * jax.random.normal(jax.random.key(1), (64,)),
                  "bias": 0.1 * jax.random.normal(jax.random.key(2), (64,))}}
  out = gn.apply(v, x)
  assert out.dtype == jnp.bfloat16
  want = gn.apply(v, x.astype(jnp.float32)).astype(jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=2 ** -8, atol=2 ** -9)
  # The same normalisation with bf16 statistics is far off: the test above can tell the two apart.
  g = x.reshape(2, -1, 32, 2)
  mean = jnp.mean(g, axis=(1, 3), keepdims=True)
  var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
  low = ((g - mean) * jax.lax.rsqrt(var + jnp.bfloat16(1e-5))).reshape(x.shape)
  low = (low.astype(jnp.float32) * v["params"]["scale"] + v["params"]["bias"]).astype(jnp.bfloat16)
  assert np.abs(np.asarray(low, np.float32) - np.asarray(want, np.float32)).max() > 0.05


def test_attention_softmax_in_float32_for_bf16_inputs():
  """_attention on bf16 q/k/v matches float32 softmax(q k^T s) v (computed from the same bf16 values) to
  bf16 output rounding."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 2, 8)).astype(jnp.bfloat16) * 3 for i in range(3))
  s = 1.0 / np.sqrt(8)
  out = attention_lib.dot_product_attention(q, k, v, s)
  qf, kf, vf = (a.astype(jnp.float32) for a in (q, k, v))
  p = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", qf, kf) * s, axis=-1)
  want = jnp.einsum("bnts,bsnh->btnh", p, vf)
  err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
  assert err < 2e-2, err  # bf16 has 8 bits of mantissa (~4e-3 per rounding)


def test_num_heads_upsample_applies_to_output_blocks_only():
  """num_heads_upsample (-1 = num_heads) sets the heads of the decoder's attention only (guided-diffusion)."""
  kw = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
            num_heads=1)
  base = unet_lib.unet_from_flags(**kw)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
  t = jnp.array([10])
  # Random, non-zero everywhere (zero_module layers would hide the attention); drawn with numpy from the
  # abstract shapes: jitting init and apply costs ~45 s of CPU here, eager apply ~1 s.
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(base.init, jax.random.key(1), x, t)
  v = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(max(1, np.prod(s.shape[:-1]))),
                                         jnp.float32), shapes)
  out = lambda m: np.asarray(m.apply(v, x, t))
  same = unet_lib.unet_from_flags(**kw, num_heads_upsample=1)
  other = unet_lib.unet_from_flags(**kw, num_heads_upsample=4)
  np.testing.assert_array_equal(out(same), out(base))
  assert np.abs(out(other) - out(base)).max() > 1e-3 * np.abs(out(base)).max()


# ------------------------------------------------------------------ execution choices (speed, same function)


def test_auto_norm_stats_rule():
  """"auto": the float32 parity path in float32, the Pallas kernels in bf16/fp16 (XLA off NVIDIA GPUs)."""
  assert unet_lib.auto_norm_stats(jnp.float32) == "two_pass"
  assert unet_lib.auto_norm_stats(jnp.bfloat16) == unet_lib.auto_norm_stats(jnp.float16) == "pallas"


def test_groupnorm_one_pass_statistics_survive_large_offsets():
  """One-pass (shifted) statistics are as accurate as the two-pass ones against a float64 reference, also
  where the unshifted E[x^2] - E[x]^2 formula cancels catastrophically (offset 1000, std 0.05). Measured on
  CPU (max abs error of the O(1) normalised output): offset 0: 2.4e-6 vs 5.3e-7; offset 40: 3.4e-6 vs 1.2e-5;
  offset 1000, std 0.05: 6.1e-4 vs 5.8e-3 (the pivot keeps the mean's large part exact)."""
  c = 64
  v = {"params": {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}}
  two, one = unet_lib.GroupNorm32(stats="two_pass"), unet_lib.GroupNorm32(stats="one_pass")
  chan = unet_lib.GroupNorm32(stats="channel")
  for offset, std in ((0.0, 1.0), (40.0, 1.0), (1000.0, 0.05)):
    x = offset + std * jax.random.normal(jax.random.key(0), (2, 8, 8, c))
    g64 = np.asarray(x, np.float64).reshape(2, -1, 32, 2)
    exact = ((g64 - g64.mean((1, 3), keepdims=True)) / np.sqrt(g64.var((1, 3), keepdims=True) + 1e-5))
    err = {name: np.abs(np.asarray(gn.apply(v, x), np.float64) - exact.reshape(x.shape)).max()
           for name, gn in (("one", one), ("two", two), ("channel", chan))}
    assert err["one"] <= max(1e-5, 2 * err["two"]), (offset, std, err)
    assert err["channel"] <= max(1e-5, 2 * err["two"]), (offset, std, err)
    g = x.reshape(2, -1, 32, 2)
    naive_var = jnp.mean(jnp.square(g), axis=(1, 3)) - jnp.square(jnp.mean(g, axis=(1, 3)))
    true_var = jnp.var(g, axis=(1, 3))
    if offset == 1000.0:  # the data is adversarial: the unshifted one-pass formula is useless on it
      assert float(jnp.max(jnp.abs(naive_var - true_var) / true_var)) > 0.1
  with pytest.raises(ValueError, match="stats"):
    unet_lib.GroupNorm32(stats="three_pass").apply(v, x)
  # "auto": two-pass for float32 (the parity path), "channel" for bf16.
  x = 3.0 + jax.random.normal(jax.random.key(3), (2, 4, 4, c))
  np.testing.assert_array_equal(unet_lib.GroupNorm32().apply(v, x), two.apply(v, x))
  xb = x.astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(unet_lib.GroupNorm32().apply(v, xb), np.float32),
                                np.asarray(chan.apply(v, xb), np.float32))


@pytest.mark.parametrize("stats", ["one_pass", "channel"])
def test_groupnorm_one_pass_gradients(stats):
  """The pivot is a constant for autodiff; gradients equal the two-pass ones."""
  c = 64
  x = 5.0 + jax.random.normal(jax.random.key(0), (2, 4, 4, c))
  w = jax.random.normal(jax.random.key(1), x.shape)
  v = {"params": {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}}
  grad = lambda stats: jax.grad(lambda x: jnp.sum(w * unet_lib.GroupNorm32(stats=stats).apply(v, x)))(x)
  np.testing.assert_allclose(grad(stats), grad("two_pass"), atol=2e-5)


@pytest.mark.parametrize("stats", ["two_pass", "one_pass", "channel"])
def test_groupnorm_fused_scale_shift_silu_and_output_dtype(stats):
  """GN(x, scale_shift, silu) == silu(GN(x) * (1 + scale) + shift) in every mode (the "channel" mode folds all
  of it into one multiply-add per (batch, channel)); out_dtype float32 from a bf16 input keeps the head's
  float32 output, and the fused bf16 result is within bf16 rounding of the float32 one."""
  c = 64
  key = jax.random.split(jax.random.key(0), 5)
  x = 2.0 + 3.0 * jax.random.normal(key[0], (2, 6, 5, c))
  scale, shift = (0.3 * jax.random.normal(k, (2, 1, 1, c)) for k in key[1:3])
  v = {"params": {"scale": 1 + 0.1 * jax.random.normal(key[3], (c,)), "bias": jax.random.normal(key[4], (c,))}}
  ref_gn = unet_lib.GroupNorm32(stats="two_pass")
  want = jax.nn.silu(ref_gn.apply(v, x) * (1 + scale) + shift)
  gn = unet_lib.GroupNorm32(stats=stats)
  got = gn.apply(v, x, scale_shift=(scale, shift), silu=True)
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_allclose(gn.apply(v, x, silu=True), jax.nn.silu(ref_gn.apply(v, x)), atol=2e-5)
  xb = x.astype(jnp.bfloat16)
  head = unet_lib.GroupNorm32(stats=stats, out_dtype=jnp.float32).apply(v, xb, silu=True)
  assert head.dtype == jnp.float32
  np.testing.assert_allclose(head, jax.nn.silu(ref_gn.apply(v, xb.astype(jnp.float32))), atol=2e-5)
  fused = gn.apply(v, xb, scale_shift=(scale.astype(jnp.bfloat16), shift.astype(jnp.bfloat16)), silu=True)
  assert fused.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(fused, np.float32), want, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("impl", ["transposed", "phases"])
@pytest.mark.parametrize("features", [16, 24])
def test_upconv_folded_equals_nearest_then_conv(features, impl):
  """Nearest x2 + 3x3 conv == the folded forms (stride-2 transposed conv; 2x2 conv of the four phases), on
  odd sizes and at the borders."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 16))
  near = unet_lib.UpConv(features, impl="nearest")
  v = near.init(jax.random.key(1), x)
  v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)  # non-zero bias
  ref = near.apply(v, x)
  assert ref.shape == (2, 10, 14, features)
  # The same as flax's own conv on the explicitly up-sampled input.
  conv = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)))
  np.testing.assert_allclose(conv.apply(v, jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)), ref, atol=1e-5)
  out = unet_lib.UpConv(features, impl=impl).apply(v, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  out16 = unet_lib.UpConv(features, dtype=jnp.bfloat16, impl=impl).apply(v, x)
  assert out16.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(out16.astype(jnp.float32) - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
  with pytest.raises(ValueError, match="upsample impl"):
    unet_lib.UpConv(features, impl="bilinear").apply(v, x)


def test_attention_auto_is_xla_off_gpu_and_falls_back(monkeypatch):
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 2, 8)).astype(jnp.bfloat16) for i in range(3))
  s = 1.0 / np.sqrt(8)
  ref = jax.nn.dot_product_attention(q, k, v, scale=s, implementation="xla")
  auto = attention_lib.dot_product_attention(q, k, v, s, "auto")
  if attention_lib.cudnn_candidate(q):  # on an NVIDIA GPU (gpu_check.sh): cuDNN's kernel vs XLA
    np.testing.assert_allclose(np.asarray(auto, np.float32), np.asarray(ref, np.float32), atol=3e-2)
  else:
    np.testing.assert_array_equal(auto, ref)
  np.testing.assert_array_equal(attention_lib.dot_product_attention(q, k, v, s, None), ref)
  with pytest.raises(ValueError, match="attention implementation"):
    attention_lib.dot_product_attention(q, k, v, s, "flash")
  # Where cuDNN is a candidate, "auto" asks for it and falls back to XLA when jax refuses the shape.
  calls = []
  real = jax.nn.dot_product_attention

  def fake(*args, implementation=None, **kw):
    calls.append(implementation)
    if implementation == "cudnn":
      raise NotImplementedError("shape not supported")
    return real(*args, implementation=implementation, **kw)

  monkeypatch.setattr(attention_lib, "cudnn_candidate", lambda q: True)
  monkeypatch.setattr(attention_lib, "cudnn_compiles", lambda *a: True)
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  np.testing.assert_array_equal(attention_lib.dot_product_attention(q, k, v, s, "auto"), ref)
  assert calls == ["cudnn", "xla"]


def test_attention_auto_falls_back_when_cudnn_does_not_compile(monkeypatch):
  """A cuDNN kernel that traces but does not compile (stood in for by an FFI call no backend has): "auto"
  probes the shape once, gets False and builds the XLA program, which compiles and gives XLA's output."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 2, 8)).astype(jnp.bfloat16) for i in range(3))
  s = 1.0 / np.sqrt(8)
  real = jax.nn.dot_product_attention
  ref = real(q, k, v, scale=s, implementation="xla")

  def missing_kernel(x):  # lowers fine; no backend registers it, so compiling fails
    return jax.ffi.ffi_call("diffaug_no_such_kernel", jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

  @jax.custom_vjp
  def broken_cudnn(q, k, v):
    return missing_kernel(q)

  broken_cudnn.defvjp(lambda q, k, v: (missing_kernel(q), None),
                      lambda _, g: (missing_kernel(g),) * 3)  # differentiable: the probe's vjp traces too

  def fake(q, k, v, *args, implementation=None, **kw):
    if implementation == "cudnn":
      return broken_cudnn(q, k, v)
    return real(q, k, v, *args, implementation=implementation, **kw)

  monkeypatch.setattr(attention_lib, "cudnn_candidate", lambda q: True)
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  # Traces, forward and backward (so only compiling can tell):
  jax.jit(jax.grad(lambda q: fake(q, q, q, implementation="cudnn").astype(jnp.float32).sum())).lower(q)
  attention_lib.cudnn_compiles.cache_clear()
  try:
    out = jax.jit(lambda q, k, v: attention_lib.dot_product_attention(q, k, v, s, "auto"))(q, k, v)
    np.testing.assert_array_equal(out, ref)
    assert attention_lib.cudnn_compiles.cache_info().currsize == 1  # probed once, for this shape
    assert not attention_lib.cudnn_compiles(q.shape, k.shape, "bfloat16")
  finally:
    attention_lib.cudnn_compiles.cache_clear()  # the probe saw the fake


def test_cudnn_candidate_rules():
  f32 = jnp.zeros((1, 4, 2, 64), jnp.float32)
  odd = jnp.zeros((1, 4, 2, 12), jnp.bfloat16)
  assert not attention_lib.cudnn_candidate(f32)
  assert not attention_lib.cudnn_candidate(odd)
  bf = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
  assert attention_lib.cudnn_candidate(bf) == (jax.default_backend() == "gpu")


def test_cast_params_for_compute_is_bit_identical(golden_models):
  """Pre-casting the frozen params once gives the same bf16 output bit for bit, and keeps the float32
  layers float32 (casting those too would change the output: the check below can fail)."""
  for name in GOLDEN:
    g = golden_models[name]
    module, params = g["module"].clone(dtype=jnp.bfloat16), g["variables"]["params"]
    fn = jax.jit(lambda p, x, t: make_model_fn(module, {"params": p}, y=g["y"])(x, t))
    cast = unet_lib.cast_params_for_compute(params, jnp.bfloat16)
    leaves = jax.tree_util.tree_leaves_with_path(cast)
    f32 = {jax.tree_util.keystr(p) for p, l in leaves if l.dtype == jnp.float32}
    assert all(("time_embed" in p or "out_2" in p or "'scale'" in p or "label_emb" in p
                or any(n in p for n in ("in_layers_0", "out_layers_0", "'norm'", "out_0")))
               for p in f32), sorted(f32)
    assert sum(l.dtype == jnp.bfloat16 for _, l in leaves) > len(leaves) // 2
    ref = np.asarray(fn(params, g["x"], g["t"]))
    np.testing.assert_array_equal(np.asarray(fn(cast, g["x"], g["t"])), ref)
    everything = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    assert np.abs(np.asarray(fn(everything, g["x"], g["t"])) - ref).max() > 0
  assert unet_lib.cast_params_for_compute(params, jnp.float32) is params
  with pytest.raises(ValueError, match="variables"):
    unet_lib.cast_params_for_compute({"params": params}, jnp.bfloat16)


# (B, H, W, C_in, C_out): narrow outputs (the taps form) and narrow inputs (im2col), at the borders and on
# images smaller than the kernel.
@pytest.mark.parametrize("shape", [(2, 5, 7, 8, 6), (1, 1, 3, 4, 1), (2, 5, 7, 3, 16), (1, 2, 1, 1, 4),
                                   (1, 4, 4, 6, 6)])
def test_conv3x3_as_gemm_equals_conv(shape):
  """Both GEMM forms of a 3x3 conv (pad 1) equal the conv, also as Conv3x3 with nn.Conv's params, and the
  bf16 GEMM form stays within bf16 rounding of the conv."""
  b, h, w, c, o = shape
  kx, kk, kb = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (b, h, w, c))
  kernel = jax.random.normal(kk, (3, 3, c, o))
  with jax.default_matmul_precision("highest"):
    want = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(unet_lib._conv3x3_as_gemm(x, kernel), want, rtol=1e-5, atol=1e-5)
    v = {"params": {"kernel": kernel, "bias": jax.random.normal(kb, (o,))}}
    ref = nn.Conv(o, (3, 3), padding=((1, 1), (1, 1))).apply(v, x)
    np.testing.assert_allclose(unet_lib.Conv3x3(o, impl="conv").apply(v, x), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(unet_lib.Conv3x3(o, impl="gemm").apply(v, x), ref, rtol=1e-5, atol=1e-5)
  got16 = unet_lib.Conv3x3(o, jnp.bfloat16, impl="gemm").apply(v, x)
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got16, np.float32), ref, rtol=0.05, atol=0.05 * float(jnp.abs(ref).max()))


def test_conv3x3_params_are_nn_conv_params():
  """Conv3x3 holds the params of the nn.Conv it replaces (values too, for either init) whatever its impl."""
  x = jnp.ones((1, 4, 4, 3))
  key = jax.random.key(0)
  equal = lambda a, b: jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a, b))
  for zero, flax_conv in ((False, nn.Conv(8, (3, 3))), (True, nn.Conv(8, (3, 3), kernel_init=nn.initializers.zeros))):
    want = flax_conv.init(key, x)
    for impl in unet_lib.EDGE_IMPLS:
      assert equal(unet_lib.Conv3x3(8, impl=impl, zero_init=zero).init(key, x), want)
  with pytest.raises(ValueError, match="Conv3x3 impl"):
    unet_lib.Conv3x3(8, impl="winograd").init(key, x)


@pytest.mark.parametrize("stats", ["two_pass", "one_pass", "channel", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_groupnorm_of_channel_parts_equals_groupnorm_of_concatenation(stats, dtype):
  """GroupNorm32 given channel parts (groups spanning the boundary: 48 + 16 channels, 2 per group) equals it
  on their concatenation, with the fused scale-shift and SiLU."""
  k = jax.random.split(jax.random.key(0), 4)
  parts = ((3.0 + jax.random.normal(k[0], (2, 4, 4, 48))).astype(dtype),
           (2.0 * jax.random.normal(k[1], (2, 4, 4, 16))).astype(dtype))
  gn = unet_lib.GroupNorm32(stats=stats)
  whole = jnp.concatenate(parts, axis=-1)
  v = gn.init(k[2], whole)
  v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(k[3], a.shape), v)
  ss = (jnp.full((2, 1, 1, 64), 0.1, dtype), jnp.full((2, 1, 1, 64), -0.2, dtype))
  got = jax.jit(lambda v, ps: gn.apply(v, ps, scale_shift=ss, silu=True))(v, parts)
  want = jax.jit(lambda v, x: gn.apply(v, x, scale_shift=ss, silu=True))(v, whole)
  assert got.dtype == want.dtype == dtype and got.shape == want.shape
  tol = 1e-6 if dtype == jnp.float32 else 2 ** -7
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def _convs_fed_by_concatenation(text: str) -> int:
  """Count the stablehlo.convolution ops whose input is a stablehlo.concatenate result (lowered text)."""
  import re
  concats = set(re.findall(r"(%[\w#]+) = stablehlo.concatenate", text))
  convs = re.findall(r"= stablehlo.convolution\((%[\w#]+),", text)
  return sum(c in concats for c in convs)


def test_skip_split_feeds_no_concatenation_to_a_conv():
  """skip_impl="split": no convolution reads a decoder concatenation (with "concat" every decoder block's 1x1
  skip conv does), same params (SkipConv's equal nn.Conv's), same float32 function; parts are refused in
  up/down blocks and bad values of the new fields raise."""
  m = unet_lib.unet_from_flags(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                               attention_resolutions="8", num_head_channels=16, learn_sigma=True,
                               resblock_updown=True, use_scale_shift_norm=True, skip_impl="concat",
                               edge_impl="conv")
  split = m.clone(skip_impl="split", edge_impl="gemm")  # the defaults
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  t = jnp.array([3, 500])
  shapes = lambda mod: jax.eval_shape(mod.init, jax.random.key(1), x, t)
  assert shapes(split) == shapes(m)  # the same param tree (checkpoints and converted weights load as-is)
  rng = np.random.default_rng(0)  # numpy from the shapes: compiling the initialisers costs seconds here
  v = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes(m))
  # SkipConv's params are a 1x1 nn.Conv's over the concatenation, values too (same key, same initialisers).
  parts = (x[..., :1], x[..., 1:])
  skip_v = unet_lib.SkipConv(8).init(jax.random.key(3), parts)
  flax_v = nn.Conv(8, (1, 1)).init(jax.random.key(3), x)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), skip_v, flax_v))
  np.testing.assert_allclose(unet_lib.SkipConv(8).apply(skip_v, parts), nn.Conv(8, (1, 1)).apply(flax_v, x),
                             rtol=1e-5, atol=1e-5)
  with jax.default_matmul_precision("highest"):
    lowered = {name: jax.jit(mod.apply).lower(v, x, t) for name, mod in (("concat", m), ("split", split))}
    np.testing.assert_allclose(lowered["split"].compile()(v, x, t), lowered["concat"].compile()(v, x, t),
                               rtol=1e-5, atol=1e-5)
  n_decoder_blocks = 2 * (m.num_res_blocks + 1)
  assert _convs_fed_by_concatenation(lowered["concat"].as_text()) == n_decoder_blocks
  assert _convs_fed_by_concatenation(lowered["split"].as_text()) == 0
  with pytest.raises(ValueError, match="up/down"):
    unet_lib.ResBlock(32, up=True).init(jax.random.key(0), (x, x), jnp.zeros((2, 8)))
  for field in ("skip_impl", "edge_impl"):
    with pytest.raises(ValueError, match=f"UNet.{field}"):
      m.clone(**{field: "fast"}).apply(v, x, t)


def test_skip_fused_moves_decoder_skip_convs_into_the_groupnorm_kernel():
  """skip_impl="fused": the same params as "split" (values too); lowered for CUDA in bf16, every decoder
  block's 1x1 skip conv is gone from the program (its first GroupNorm's kernel computes it from the parts it
  reads; the Triton call count is unchanged: that kernel replaces the apply), while "split" keeps two 1x1
  convs per decoder block; with the XLA GroupNorm ("channel") the convs are back (nothing to fuse into)."""
  from jax import export
  m = unet_lib.unet_from_flags(image_size=16, num_channels=256, num_res_blocks=1, channel_mult="1,1",
                               attention_resolutions="", learn_sigma=True, resblock_updown=True,
                               use_scale_shift_norm=True, dtype=jnp.bfloat16)
  fused = m.clone(skip_impl="fused")
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  p = jax.eval_shape(m.init, jax.random.key(0), x, t)
  assert jax.eval_shape(fused.init, jax.random.key(0), x, t) == p
  small = unet_lib.unet_from_flags(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                   attention_resolutions="", learn_sigma=True)
  xs, ts = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), small.init(jax.random.key(1), xs, ts),
                      small.clone(skip_impl="fused").init(jax.random.key(1), xs, ts))
  assert jax.tree.all(same)
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  text = {name: export.export(jax.jit(mod.apply), **opts)(p, x, t).mlir_module()
          for name, mod in (("split", m), ("fused", fused), ("fused+channel", fused.clone(norm_stats="channel")))}
  one_by_one = {k: len(re.findall(r"stablehlo.convolution.*tensor<1x1x\d+x\d+xbf16>", v)) for k, v in text.items()}
  triton = {k: v.count("__gpu$xla.gpu.triton") for k, v in text.items()}
  decoder_blocks = 2 * (m.num_res_blocks + 1)
  assert one_by_one == {"split": 2 * decoder_blocks, "fused": 0, "fused+channel": 2 * decoder_blocks}, one_by_one
  assert triton["fused"] == triton["split"] and triton["fused+channel"] == 0, triton


@pytest.mark.parametrize("upsample_impl", unet_lib.UPSAMPLE_IMPLS)
def test_lowered_unet_has_no_transpose_or_gather(monkeypatch, upsample_impl):
  """Our layers hand XLA no layout transposes and no gathers (NHWC throughout, q/k/v written contiguously,
  up-sampling by broadcast): with the attention kernel stubbed out (jax's XLA attention transposes its
  output; cuDNN's kernel is one custom call), the lowered bf16 forward contains neither op."""
  monkeypatch.setattr(unet_lib, "_attention", lambda q, k, v, scale, impl=None: q * scale + k + v)
  m = unet_lib.unet_from_flags(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                               attention_resolutions="8", num_head_channels=16, learn_sigma=True,
                               resblock_updown=True, use_scale_shift_norm=True, dtype=jnp.bfloat16,
                               upsample_impl=upsample_impl)
  legacy_up = m.clone(resblock_updown=False, use_new_attention_order=True)
  for mod in (m, legacy_up):
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    p = jax.eval_shape(mod.init, jax.random.key(0), x, t)
    text = jax.jit(mod.apply).lower(p, x, t).as_text()
    assert "stablehlo.convolution" in text
    assert "stablehlo.transpose" not in text
    assert "stablehlo.gather" not in text


@pytest.mark.parametrize("use_scale_shift_norm", [True, False])
def test_upsampling_resblock_with_phases_equals_nearest(use_scale_shift_norm):
  """An up-sampling ResBlock with upsample_impl="phases" (its conv kept as four phases, interleaved by the
  GroupNorm that reads them; with or without scale-shift, where the embedding add maps over the phases) is
  the nearest one in float32, same params; UpConv(keep_phases=True) returns the Phases that interleave to
  its output, and any other impl ignores keep_phases."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 32))
  emb = jax.random.normal(jax.random.key(1), (2, 16))
  near = unet_lib.ResBlock(32, up=True, use_scale_shift_norm=use_scale_shift_norm, upsample_impl="nearest")
  v = near.init(jax.random.key(2), x, emb)
  v = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), v)  # non-zero out conv
  phases = near.clone(upsample_impl="phases")
  assert jax.tree.structure(phases.init(jax.random.key(2), x, emb)) == jax.tree.structure(v)
  ref = near.apply(v, x, emb)
  assert ref.shape == (2, 8, 12, 32)
  np.testing.assert_allclose(phases.apply(v, x, emb), ref, rtol=1e-5, atol=1e-5)
  up = unet_lib.UpConv(8, impl="phases")
  uv = up.init(jax.random.key(4), x)
  kept = up.apply(uv, x, keep_phases=True)
  assert isinstance(kept, unet_lib.Phases) and kept.shape == (2, 8, 12, 8) and kept.arrays[0].shape == (2, 4, 6, 8)
  np.testing.assert_array_equal(kept.interleave(), up.apply(uv, x))
  assert isinstance(unet_lib.UpConv(8, impl="nearest").apply(uv, x, keep_phases=True), jax.Array)


def test_phases_reach_the_groupnorm_kernel_without_an_interleave_for_cuda():
  """A bf16 UNet with upsample_impl="phases", lowered for CUDA: the up-sampling ResBlock's conv output reaches
  the phase apply kernel as four arrays (3 Triton calls more than with "nearest": 4 sums + 1 apply instead of
  1 + 1) and no activation-sized interleaving concatenation is left in the program; the down-sampling
  ResBlock leaves no reduce_window (its pools are in the GroupNorm kernel), the up-sampling one no broadcast
  of its skip path (up-sampled by the GroupNorm kernel); with the XLA GroupNorm ("channel") all three are
  there (so the census can see them)."""
  from jax import export
  m = unet_lib.unet_from_flags(image_size=16, num_channels=256, num_res_blocks=1, channel_mult="1,1",
                               attention_resolutions="", learn_sigma=True, resblock_updown=True,
                               use_scale_shift_norm=True, dtype=jnp.bfloat16, upsample_impl="nearest")
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  p = jax.eval_shape(m.init, jax.random.key(0), x, t)
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  text = {}
  for name, mod in (("nearest", m), ("phases", m.clone(upsample_impl="phases")),
                    ("phases+channel", m.clone(upsample_impl="phases", norm_stats="channel"))):
    text[name] = export.export(jax.jit(mod.apply), **opts)(p, x, t).mlir_module()
  triton = {k: v.count("__gpu$xla.gpu.triton") for k, v in text.items()}
  assert triton["phases"] == triton["nearest"] + 3 and triton["phases+channel"] == 0, triton
  # The interleave stacks the (2, 8, 8, 256) phases into (2, 8, 8, 2, 256) and (2, 8, 2, 8, 2, 256); the
  # folded kernels (2, 3, 256, 2, 256) ... are weights.
  interleaves = lambda txt: [s for s in re.findall(r"stablehlo.concatenate .*?-> tensor<([0-9x]+)x(?:bf16|f32)>",
                                                   txt) if s.startswith("2x8x")]
  assert interleaves(text["phases"]) == [] and interleaves(text["phases+channel"])
  # ... and its down-sampling ResBlock pools in the GroupNorm's kernel: no XLA pool of an activation.
  assert "reduce_window" not in text["phases"] and "reduce_window" in text["phases+channel"]
  # ... and its up-sampling ResBlock's skip path is up-sampled by the GroupNorm's kernel: no 2x2 broadcast.
  up_copy = re.compile(r"stablehlo.broadcast_in_dim .*-> tensor<2x8x2x8x2x256xbf16>")
  assert not up_copy.search(text["phases"]) and up_copy.search(text["phases+channel"])


def test_programs_hold_frozen_score_params_in_compute_dtype(tmp_path):
  """`score.frozen_params_for_compute` (what train.py and evaluate.py hold): bf16 weights for a bf16 UNet,
  untouched params for float32 or for a module that is not our UNet; `loading.load_score` with
  dtype bfloat16 returns such params and its eps_fn gives the float32-params result bit for bit."""
  from diffaug_jax.convert import common
  from diffaug_jax.evaluation import loading
  from diffaug_jax.models import score

  unet = unet_lib.unet_from_preset("digits", image_size=8)
  x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
  rng = np.random.default_rng(0)  # numpy from the shapes: compiling the initialisers costs seconds here
  params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32),
                        jax.eval_shape(unet.init, jax.random.key(0), x, t)["params"])
  assert score.frozen_params_for_compute(unet, params) is params  # float32 module
  assert score.frozen_params_for_compute(nn.Dense(3), params, jnp.bfloat16) is params  # not a UNet
  cast = score.frozen_params_for_compute(unet.clone(dtype=jnp.bfloat16), params)  # the module's dtype
  assert cast["input_blocks_0_0"]["kernel"].dtype == jnp.bfloat16
  assert cast["time_embed_0"]["kernel"].dtype == jnp.float32

  path = str(tmp_path / "unet.msgpack")
  common.save_params(path, {"params": params})
  loaded = loading.load_score(dict(params_path=path, preset="digits", overrides={"image_size": 8},
                                   dtype="bfloat16"))
  assert loaded.variables["params"]["input_blocks_0_0"]["kernel"].dtype == jnp.bfloat16
  x_t = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  tt = jnp.array([10, 600])
  want = jax.jit(lambda p, x, t: make_eps_fn(unet, {"params": p}, dtype=jnp.bfloat16)(x, t))(params, x_t, tt)
  np.testing.assert_array_equal(jax.jit(loaded.eps_fn)(loaded.variables, x_t, tt), want)
