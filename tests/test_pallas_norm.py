"""The Pallas GroupNorm kernels (models.pallas_norm). The apply kernel: (through Pallas' interpreter) equals the
XLA expression, its custom VJP equals the expression's gradient, shapes it cannot tile are refused, and
the same holds for an input in channel parts (read in place, never concatenated), and
`UNet.norm_stats="pallas"` lowers to two Triton calls per tiled GroupNorm (sums and apply) for CUDA while
running XLA elsewhere (bit-identical to "channel" on CPU). The statistics kernel (`channel_sums`): equals the
XLA sums through the interpreter (one and many row chunks), keeps mean and variance accurate far from zero,
has the XLA expression's gradient in x and the pivot, refuses untileable shapes and lowers to one Triton call
for CUDA. Both partition over a sharded batch without gathering it, and tracing under `tuning` changes their
launch. Speed is measured on a GPU only (`benchmarks/bench_pallas_norm.py`, `gn=pallas`)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.test_util import check_grads

from diffaug_jax.models import pallas_norm
from diffaug_jax.models import unet as unet_lib


def _inputs(b=2, n=64, c=512, dtype=jnp.bfloat16):
  k = jax.random.split(jax.random.key(0), 3)
  x = (3.0 * jax.random.normal(k[0], (b, n, c))).astype(dtype)
  return x, jax.random.normal(k[1], (b, c)), jax.random.normal(k[2], (b, c))


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_equals_xla_expression(silu, out_dtype):
  x, a, d = _inputs()
  got = pallas_norm.affine_act(x, a, d, silu=silu, out_dtype=out_dtype, interpret=True)
  want = pallas_norm.reference(x, a, d, silu, out_dtype)
  assert got.dtype == out_dtype and got.shape == x.shape
  # float32: a few ulps (contraction to FMA may differ); bf16: at most one rounding step apart.
  tol = 2e-6 if out_dtype == jnp.float32 else 2 ** -7
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
  # ... and the expression is GroupNorm's apply: silu(x * a + d) as jax.nn.silu computes it.
  ref = (x.astype(jnp.float32) * a[:, None] + d[:, None])
  ref = jax.nn.silu(ref) if silu else ref
  np.testing.assert_allclose(np.asarray(want, np.float32), np.asarray(ref.astype(out_dtype), np.float32),
                             rtol=tol, atol=tol)


def test_custom_vjp_matches_numerical_gradients_and_is_finite():
  """The custom VJP against finite differences (float32, through the interpreter), and finite where the
  pre-activation is far below -88 (differentiating x / (1 + exp(-x)) itself gives inf / inf there); there it
  equals the gradient of the XLA apply with jax.nn.silu."""
  x, a, d = _inputs(b=1, n=16, c=256, dtype=jnp.float32)
  kern = lambda x, a, d: pallas_norm.affine_act(x, a, d, silu=True, out_dtype=jnp.float32, interpret=True)
  check_grads(kern, (x, 0.5 * a, 0.5 * d), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
  y = jnp.array([-100.0, -90.0, -86.0, -10.0, 0.0, 3.0])
  x = jnp.pad(jnp.broadcast_to(y[None, :, None], (1, 6, 256)), ((0, 0), (0, 10), (0, 0)))  # 16 rows: tileable
  one, zero = jnp.ones((1, 256)), jnp.zeros((1, 256))
  loss = lambda fn: lambda x: jnp.sum(fn(x))
  got = jax.grad(loss(lambda x: pallas_norm.affine_act(x, one, zero, silu=True, out_dtype=jnp.float32,
                                                       interpret=True)))(x)
  want = jax.grad(loss(jax.nn.silu))(x)
  assert bool(jnp.all(jnp.isfinite(got)))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("widths", [(256, 512), (512, 256, 256)])
def test_kernel_reads_channel_parts_in_place(widths):
  """x given as channel parts: the kernel (interpreter) equals the expression on their concatenation, and
  the custom VJP returns one cotangent per part, equal to the expression's gradient."""
  k = jax.random.split(jax.random.key(3), len(widths) + 2)
  parts = tuple((2.0 * jax.random.normal(kk, (2, 32, w))).astype(jnp.bfloat16) for kk, w in zip(k, widths))
  c = sum(widths)
  a, d = jax.random.normal(k[-2], (2, c)), jax.random.normal(k[-1], (2, c))
  got = pallas_norm.affine_act(parts, a, d, silu=True, out_dtype=jnp.bfloat16, interpret=True)
  want = pallas_norm.reference(jnp.concatenate(parts, axis=-1), a, d, True, jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=2 ** -7)
  f32 = tuple(p.astype(jnp.float32) for p in parts)
  loss = lambda fn: lambda ps: jnp.sum(jnp.sin(fn(ps)))
  g = jax.grad(loss(lambda ps: pallas_norm.affine_act(ps, a, d, silu=True, out_dtype=jnp.float32,
                                                      interpret=True)))(f32)
  want_g = jax.grad(loss(lambda ps: jax.nn.silu(jnp.concatenate(ps, -1) * a[:, None] + d[:, None])))(f32)
  assert len(g) == len(parts) and [x.shape for x in g] == [p.shape for p in parts]
  for gi, wi in zip(g, want_g):
    np.testing.assert_allclose(gi, wi, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="not tiled"):
    pallas_norm.affine_act((parts[0][..., :256], parts[1][..., :128]), a[:, :384], d[:, :384], silu=True,
                           out_dtype=jnp.bfloat16, interpret=True)
  with pytest.raises(ValueError, match="parts"):
    pallas_norm.affine_act((parts[0], parts[1][:, :16]), a, d, silu=True, out_dtype=jnp.bfloat16)
  for degenerate in ((), (parts[0], parts[1][..., :0])):
    with pytest.raises(ValueError, match="non-empty parts"):
      pallas_norm.affine_act(degenerate, a, d, silu=True, out_dtype=jnp.bfloat16)


def test_untileable_shapes_refused():
  assert pallas_norm.supported(50176, 256) and pallas_norm.supported(784, 1536)
  assert not pallas_norm.supported(49, 1024)  # 7x7: no power-of-two row tile >= 16
  assert not pallas_norm.supported(64, 128)  # channels not a multiple of 256
  x, a, d = _inputs(n=49)
  with pytest.raises(ValueError, match="not tiled"):
    pallas_norm.affine_act(x, a, d, silu=True, out_dtype=jnp.bfloat16, interpret=True)
  with pytest.raises(ValueError, match=r"\(B, N, C\)"):
    pallas_norm.affine_act(x[0], a, d, silu=True, out_dtype=jnp.bfloat16)


def _assert_sums_close(got, want, x, pivot, rtol=1e-5):
  """f32 sums in different orders: within `rtol` of sum_n |d| (s1) and of sum_n d^2 (s2), per channel."""
  d = np.asarray(x, np.float64) - np.asarray(pivot, np.float64)[:, None, :]
  for g, w, scale in zip(got, want, (np.abs(d).sum(1), (d * d).sum(1))):
    assert g.dtype == jnp.float32 and g.shape == pivot.shape
    np.testing.assert_array_less(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)), rtol * scale + 1e-30)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("n, cap", [(64, 1024), (2048, 1024), (2048, 32)])
def test_channel_sums_equals_xla_expression(dtype, n, cap, monkeypatch):
  """One row chunk (n=64), two chunks of 1024 rows (64 sub-tiles each), and 64 chunks of 32 rows (the cap
  lowered so the partial-sum path runs many chunks cheaply)."""
  monkeypatch.setattr(pallas_norm, "_TUNING", pallas_norm.Tuning(stats_rows=cap))
  x, _, _ = _inputs(n=n, dtype=dtype)
  x = x + 2.0
  pivot = x[:, 0, :].astype(jnp.float32)
  got = pallas_norm.channel_sums(x, pivot, interpret=True)
  _assert_sums_close(got, pallas_norm.channel_sums_reference(x, pivot), x, pivot)
  assert n // pallas_norm._stats_rows(n) == max(n // cap, 1)


def test_channel_sums_stats_accurate_far_from_zero(monkeypatch):
  """x = 1000 + noise in float32: mean and variance from the shifted sums (pivot = the first row, as
  `_channel_group_stats` takes it) match float64 to ~1e-5 relative; several chunks."""
  monkeypatch.setattr(pallas_norm, "_TUNING", pallas_norm.Tuning(stats_rows=256))
  n = 2048
  x = 1000.0 + jax.random.normal(jax.random.key(3), (2, n, 256), jnp.float32)
  pivot = x[:, 0, :]
  s1, s2 = pallas_norm.channel_sums(x, pivot, interpret=True)
  m = s1 / n
  mean, var = np.asarray(pivot + m, np.float64), np.asarray(jnp.maximum(s2 / n - m * m, 0.0), np.float64)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(mean, x64.mean(1), rtol=1e-6)
  np.testing.assert_allclose(var, x64.var(1), rtol=1e-5)


def test_channel_sums_gradient():
  """The custom VJP against finite differences (float32, through the interpreter), equal to the XLA
  expression's gradient in x and in the pivot."""
  x, p, _ = _inputs(b=1, n=16, c=256, dtype=jnp.float32)
  kern = lambda x: pallas_norm.channel_sums(x, p, interpret=True)
  check_grads(kern, (x,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
  check_grads(lambda p: pallas_norm.channel_sums(x, p, interpret=True), (p,), order=1, modes=["rev"],
              atol=2e-2, rtol=2e-2)
  loss = lambda fn: lambda x, p: jnp.sum(jnp.sin(fn(x, p)[0])) + jnp.sum(jnp.cos(fn(x, p)[1]))
  gx, gp = jax.grad(loss(lambda x, p: pallas_norm.channel_sums(x, p, interpret=True)), argnums=(0, 1))(x, p)
  want_x, want_p = jax.grad(loss(pallas_norm.channel_sums_reference), argnums=(0, 1))(x, p)
  np.testing.assert_allclose(gx, want_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gp, want_p, rtol=1e-4, atol=1e-4)
  assert np.any(np.asarray(gp))
  xb = x.astype(jnp.bfloat16)
  assert jax.grad(lambda x: jnp.sum(pallas_norm.channel_sums(x, p, interpret=True)[1]))(xb).dtype == jnp.bfloat16


def test_channel_sums_untileable_shapes_refused():
  x, p, _ = _inputs(n=49)
  with pytest.raises(ValueError, match="not tiled"):
    pallas_norm.channel_sums(x, p, interpret=True)
  x, p, _ = _inputs(n=64, c=384)
  with pytest.raises(ValueError, match="not tiled"):
    pallas_norm.channel_sums(x, p, interpret=True)
  with pytest.raises(ValueError, match=r"\(B, N, C\)"):
    pallas_norm.channel_sums(x[0], p, interpret=True)
  with pytest.raises(ValueError, match=r"pivot \(B, C\)"):
    pallas_norm.channel_sums(x, p[:, :256], interpret=True)


@pytest.mark.parametrize("n", [50176, 3136, 16])
def test_channel_sums_lowers_to_triton_for_cuda(n):
  """Lowered for CUDA on CPU (Pallas' Triton lowering of the fori_loop over pl.ds sub-tiles): one Triton call
  for the sums, also under value-and-grad (the backward is XLA). 50176 rows: 49 chunks of 1024."""
  x = jax.ShapeDtypeStruct((2, n, 512), jnp.bfloat16)
  p = jax.ShapeDtypeStruct((2, 512), jnp.float32)
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  text = export.export(jax.jit(lambda x, p: pallas_norm.channel_sums(x, p)), **opts)(x, p).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 1
  grad = jax.jit(jax.value_and_grad(lambda x, p: sum(jnp.sum(s) for s in pallas_norm.channel_sums(x, p))))
  assert export.export(grad, **opts)(x, p).mlir_module().count("__gpu$xla.gpu.triton") == 1


def test_tuning_context_and_validation():
  """`tuning` changes the launch parameters of what is traced inside it and restores them after (also on an
  error); the results are the same whatever the tiling (the apply bit for bit, the sums to float32 rounding);
  bad parameters raise."""
  default = pallas_norm.current_tuning()
  x, a, d = _inputs(n=64)
  pivot = x[:, 0, :].astype(jnp.float32)
  apply_fn = lambda: pallas_norm.affine_act(x, a, d, silu=True, out_dtype=jnp.bfloat16, interpret=True)
  sums_fn = lambda: pallas_norm.channel_sums(x, pivot, interpret=True)
  want_y, want_s = apply_fn(), sums_fn()
  with pallas_norm.tuning(apply_rows=16, stats_rows=16, stats_block=16) as t:
    assert pallas_norm.current_tuning() == t and t.apply_rows == 16 and t.apply_warps == default.apply_warps
    assert pallas_norm._block_n(64) == 16 and pallas_norm._stats_rows(64) == 16  # 4 row tiles, 4 chunks
    np.testing.assert_array_equal(np.asarray(apply_fn(), np.float32), np.asarray(want_y, np.float32))
    _assert_sums_close(sums_fn(), want_s, x, pivot)
  with pallas_norm.tuning(apply_rows=16, apply_steps=2, apply_stages=3):  # 2 programs of 2 sub-tiles each
    np.testing.assert_array_equal(np.asarray(apply_fn(), np.float32), np.asarray(want_y, np.float32))
    parts = (x[..., :256], x[..., 256:])
    np.testing.assert_array_equal(
        np.asarray(pallas_norm.affine_act(parts, a, d, silu=True, out_dtype=jnp.bfloat16, interpret=True), np.float32),
        np.asarray(want_y, np.float32))
  assert pallas_norm.current_tuning() == default and pallas_norm._block_n(64) == 32
  with pytest.raises(RuntimeError), pallas_norm.tuning(apply_warps=8):
    raise RuntimeError
  assert pallas_norm.current_tuning() == default
  for bad, msg in ((dict(apply_rows=48), "power of two"), (dict(stats_block=8), "power of two"),
                   (dict(apply_warps=0), "positive int"), (dict(stats_stages=2.0), "positive int"),
                   (dict(skip_chunk=512), "divide 256"), (dict(skip_block_o=512), "divide 256"),
                   (dict(skip_rows=96), "power of two"), (dict(apply_steps=3), "power of two")):
    with pytest.raises(ValueError, match=msg):
      pallas_norm.Tuning(**bad)
  with pytest.raises(TypeError):
    pallas_norm.Tuning(num_warps=4)


def test_tuning_reaches_the_triton_launch():
  """The launch parameters in force while tracing are the ones in the lowered CUDA program (grid, warps and
  stages of both kernels)."""
  x = jax.ShapeDtypeStruct((2, 4096, 256), jnp.bfloat16)
  row = jax.ShapeDtypeStruct((2, 256), jnp.float32)
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])

  def launch(kernel, **kw):
    # A new function each time: jax reuses the trace of a function it has seen with the same shapes.
    if kernel == "apply":
      fn, args = (lambda x, a, d: pallas_norm.affine_act(x, a, d, silu=True, out_dtype=jnp.bfloat16)), (x, row, row)
    else:
      fn, args = (lambda x, p: pallas_norm.channel_sums(x, p)), (x, row)
    with pallas_norm.tuning(**kw):
      text = export.export(jax.jit(fn), **opts)(*args).mlir_module()
    return [re.findall(rf"{k} = (\d+)", text) for k in ("grid_[xyz]", "num_warps", "num_stages")]

  # grid = (batch, row tiles or chunks, channel tiles)
  assert launch("apply") == [["2", "128", "1"], ["4"], ["1"]]
  assert launch("apply", apply_rows=64, apply_warps=8, apply_stages=2) == [["2", "64", "1"], ["8"], ["2"]]
  assert launch("apply", apply_steps=8, apply_stages=3) == [["2", "16", "1"], ["4"], ["3"]]  # 256-row programs
  assert launch("sums") == [["2", "4", "1"], ["4"], ["3"]]
  assert launch("sums", stats_rows=512, stats_warps=8, stats_stages=2) == [["2", "8", "1"], ["8"], ["2"]]


def test_auto_is_the_kernels_in_bf16_and_xla_in_float32():
  """GroupNorm32's default ("auto") lowers to the two Triton kernels for CUDA in bf16 (whatever the number of
  devices: the suite runs with 8) and to none in float32 (the parity path)."""
  shape = (2, 8, 8, 256)
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  for dtype, calls in ((jnp.bfloat16, 2), (jnp.float32, 0)):
    v, fn = _gn_apply("auto", 256, shape)
    text = export.export(jax.jit(fn), **opts)(v, jax.ShapeDtypeStruct(shape, dtype)).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == calls, dtype


def _gn_apply(stats, c, shape):
  v = {"params": {"scale": 1 + 0.1 * jnp.arange(c) / c, "bias": 0.01 * jnp.arange(c)}}
  ss = (jnp.full((shape[0], 1, 1, c), 0.1, jnp.bfloat16), jnp.full((shape[0], 1, 1, c), -0.2, jnp.bfloat16))
  return v, lambda v, x: unet_lib.GroupNorm32(stats=stats).apply(v, x, scale_shift=ss, silu=True)


def _cuda() -> bool:
  return jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the kernel runs: see the GPU test")
def test_groupnorm_pallas_is_channel_off_gpu():
  shape = (2, 8, 8, 256)
  x = (5.0 + jax.random.normal(jax.random.key(1), shape)).astype(jnp.bfloat16)
  v, pallas = _gn_apply("pallas", 256, shape)
  _, channel = _gn_apply("channel", 256, shape)
  np.testing.assert_array_equal(np.asarray(jax.jit(pallas)(v, x), np.float32),
                                np.asarray(jax.jit(channel)(v, x), np.float32))


@pytest.mark.parametrize("c, calls", [(256, 2), (64, 0)])
def test_groupnorm_pallas_lowers_to_triton_for_cuda(c, calls):
  """Lowered for CUDA (no GPU needed): two Triton custom calls (statistics sums, apply) where the shape tiles,
  none where it does not; value-and-gradient lowers too (the forward through the kernels, the custom VJPs'
  backward in XLA)."""
  shape = (2, 8, 8, c)
  v, fn = _gn_apply("pallas", c, shape)
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  text = export.export(jax.jit(fn), **opts)(v, x).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == calls
  grad = jax.jit(jax.value_and_grad(lambda v, x: jnp.sum(fn(v, x).astype(jnp.float32)), argnums=1))
  gtext = export.export(grad, **opts)(v, x).mlir_module()
  assert gtext.count("__gpu$xla.gpu.triton") == calls


@pytest.mark.parametrize("widths", [(768,), (512, 256)])
def test_groupnorm_pallas_kernel_branch_through_the_interpreter(monkeypatch, widths):
  """GroupNorm32(stats="pallas") with its CUDA branch forced (both kernels through Pallas' interpreter), on a
  single input and on channel parts whose groups straddle the boundary (24 channels per group): within one
  bf16 rounding of "channel" on the concatenation, with the same gradients (float32 inputs)."""
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, default=None, **per: per["cuda"](*args))
  monkeypatch.setattr(pallas_norm, "channel_sums", functools.partial(pallas_norm.channel_sums, interpret=True))
  monkeypatch.setattr(pallas_norm, "affine_act", functools.partial(pallas_norm.affine_act, interpret=True))
  k = jax.random.split(jax.random.key(5), len(widths) + 1)
  parts = tuple((3.0 + 2.0 * jax.random.normal(kk, (2, 8, 8, w))) for kk, w in zip(k, widths))
  c = sum(widths)
  v, _ = _gn_apply("channel", c, (2, 8, 8, c))
  ss = (jnp.full((2, 1, 1, c), 0.1, jnp.float32), jnp.full((2, 1, 1, c), -0.2, jnp.float32))
  x_in = lambda ps: ps[0] if len(ps) == 1 else ps
  apply = lambda stats, ps, dt: unet_lib.GroupNorm32(stats=stats).apply(
      v, x_in(tuple(p.astype(dt) for p in ps)), scale_shift=tuple(s.astype(dt) for s in ss), silu=True)
  whole = (jnp.concatenate(parts, axis=-1),)
  got, want = apply("pallas", parts, jnp.bfloat16), apply("channel", whole, jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=2 ** -7)
  loss = lambda stats, ps: jnp.sum(jnp.sin(apply(stats, ps, jnp.float32)))
  g = jax.grad(lambda ps: loss("pallas", ps))(parts)
  gw = jax.grad(lambda ps: loss("channel", (jnp.concatenate(ps, axis=-1),)))(parts)
  for gi, wi in zip(g, gw):
    np.testing.assert_allclose(gi, wi, rtol=1e-4, atol=1e-4)


def test_groupnorm_pallas_reads_channel_parts_in_place_for_cuda():
  """A GroupNorm given channel parts (a decoder's [h, skip] with skip_impl="split"), lowered for CUDA: one
  sums kernel per part and one apply kernel that reads both parts, and no activation-sized concatenation in
  the program or in its gradient (only (B, C) statistics are concatenated)."""
  v, _ = _gn_apply("pallas", 512, (2, 8, 8, 512))
  gn = unet_lib.GroupNorm32(stats="pallas")
  parts = (jax.ShapeDtypeStruct((2, 8, 8, 256), jnp.bfloat16), jax.ShapeDtypeStruct((2, 8, 8, 256), jnp.bfloat16))
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  text = export.export(jax.jit(lambda v, ps: gn.apply(v, ps, silu=True)), **opts)(v, parts).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 3
  shapes = re.findall(r"stablehlo.concatenate .*?-> tensor<([0-9x]+)x(?:bf16|f32)>", text)
  assert shapes and all(s.count("x") == 1 for s in shapes), shapes  # rank 2: (B, C) only
  # ... and the backward (custom VJPs in XLA, part by part) concatenates no activation either.
  grad = jax.jit(jax.grad(lambda ps: jnp.sum(gn.apply(v, ps, silu=True).astype(jnp.float32))))
  gtext = export.export(grad, **opts)(parts).mlir_module()
  shapes = re.findall(r"stablehlo.concatenate .*?-> tensor<([0-9x]+)x(?:bf16|f32)>", gtext)
  assert all(s.count("x") == 1 for s in shapes), shapes


@pytest.mark.skipif(not _cuda(), reason="the compiled Triton kernel needs an NVIDIA GPU")
def test_compiled_kernel_on_gpu():
  """On a GPU (benchmarks/gpu_check.sh runs this file first): the compiled kernels equal their expressions
  (the apply also on channel parts; `channel_sums` up to f32 summation order), and a UNet-sized GroupNorm
  with "pallas" equals "channel" up to one bf16 rounding."""
  for silu, out_dtype in ((True, jnp.bfloat16), (False, jnp.float32)):
    x, a, d = _inputs(b=4, n=1024, c=768)
    got = jax.jit(lambda x, a, d: pallas_norm.affine_act(x, a, d, silu=silu, out_dtype=out_dtype))(x, a, d)
    want = pallas_norm.reference(x, a, d, silu, out_dtype)
    tol = 2e-6 if out_dtype == jnp.float32 else 2 ** -7
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
  x, a, d = _inputs(b=2, n=3136, c=768)
  parts = (x[..., :512], x[..., 512:])  # a decoder's [h, skip]: the kernel reads each tile from its part
  got = jax.jit(lambda ps, a, d: pallas_norm.affine_act(ps, a, d, silu=True, out_dtype=jnp.bfloat16))(parts, a, d)
  want = pallas_norm.reference(x, a, d, True, jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=2 ** -7)
  for n, dtype in ((4096, jnp.bfloat16), (3136, jnp.float32)):  # 4 chunks of 1024 rows; 49 chunks of 64
    x, _, _ = _inputs(b=2, n=n, c=768, dtype=dtype)
    x = x + 2.0
    pivot = x[:, 0, :].astype(jnp.float32)
    got = jax.jit(pallas_norm.channel_sums)(x, pivot)
    _assert_sums_close(got, pallas_norm.channel_sums_reference(x, pivot), x, pivot)
  shape = (2, 56, 56, 512)
  x = (2.0 + jax.random.normal(jax.random.key(2), shape)).astype(jnp.bfloat16)
  v, pallas = _gn_apply("pallas", 512, shape)
  _, channel = _gn_apply("channel", 512, shape)
  lowered = jax.jit(pallas).lower(v, x)
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 2
  want = np.asarray(jax.jit(channel)(v, x), np.float32)
  np.testing.assert_allclose(np.asarray(lowered.compile()(v, x), np.float32), want, rtol=2 ** -7, atol=2 ** -7)
  # The same GroupNorm given channel parts (a decoder's [h, skip]): 2 sums kernels + 1 apply reading both.
  lowered = jax.jit(pallas).lower(v, (x[..., :256], x[..., 256:]))
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3
  np.testing.assert_allclose(np.asarray(lowered.compile()(v, (x[..., :256], x[..., 256:])), np.float32), want,
                             rtol=2 ** -7, atol=2 ** -7)
  # The phase apply (an up-sampling ResBlock's conv output as four phases): bit-equal to the rows kernel on
  # the interleave, and a GroupNorm given the phases equals "channel" on the interleave up to a bf16 rounding.
  phases, a, d = _phase_inputs(b=2, h=28, w=28, c=512)
  got = jax.jit(lambda ps, a, d: pallas_norm.affine_act_phases(ps, a, d, silu=True, out_dtype=jnp.bfloat16))(
      phases, a, d)
  flat = pallas_norm.interleave_phases(phases).reshape(2, -1, 512)
  rows = jax.jit(lambda x, a, d: pallas_norm.affine_act(x, a, d, silu=True, out_dtype=jnp.bfloat16))(flat, a, d)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(rows.reshape(got.shape), np.float32))
  phases = tuple(x[:, py::2, px::2] for py in (0, 1) for px in (0, 1))
  lowered = jax.jit(lambda v, ps: pallas(v, unet_lib.Phases(ps))).lower(v, phases)
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 5
  np.testing.assert_allclose(np.asarray(lowered.compile()(v, phases), np.float32), want, rtol=2 ** -7, atol=2 ** -7)
  # The pooled apply (a down-sampling ResBlock): the pooled x exact, the pooled activation within a rounding.
  a, d = jax.random.normal(jax.random.key(3), (2, 512)), jax.random.normal(jax.random.key(4), (2, 512))
  y, xp = jax.jit(lambda x, a, d: pallas_norm.affine_act_pool(x, a, d, silu=True, out_dtype=jnp.bfloat16))(x, a, d)
  ry, rx = pallas_norm.pool_reference(x, a, d, True, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(xp, np.float32), np.asarray(rx, np.float32))
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ry, np.float32), rtol=2 ** -7, atol=2 ** -7)
  # The up-sampling apply: the activation bit-equal to the rows kernel, the up-sampled copy exact.
  y, xu = jax.jit(lambda x, a, d: pallas_norm.affine_act_up(x, a, d, silu=True, out_dtype=jnp.bfloat16))(x, a, d)
  rows = jax.jit(lambda x, a, d: pallas_norm.affine_act(x, a, d, silu=True, out_dtype=jnp.bfloat16))(
      x.reshape(2, -1, 512), a, d)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(rows.reshape(x.shape), np.float32))
  np.testing.assert_array_equal(np.asarray(xu, np.float32), np.asarray(pallas_norm.upsample_nearest2(x), np.float32))


_COLLECTIVES = re.compile(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the suite runs with 8 fake CPUs)")
@pytest.mark.parametrize("shardy", [True, False])
def test_kernels_partition_over_the_batch(shardy):
  """Both kernels (through the interpreter) in a program whose operands are sharded over the batch: each
  device computes its own examples (no collective; values, gradients, a vmapped call, a 2-D mesh with the batch
  over both axes; the result stays batch-sharded), equal to the unsharded call, with Shardy and with GSPMD (its
  sharding propagation callback). A bare pallas_call in the same program is gathered: the rule prevents it."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  previous = jax.config.jax_use_shardy_partitioner
  jax.config.update("jax_use_shardy_partitioner", shardy)
  try:
    x, a, d = _inputs(b=8, n=32)
    parts = (x[..., :256], x[..., 256:])
    pivot = x[:, 0, :].astype(jnp.float32)

    def apply_loss(parts, a, d):
      return jnp.sum(pallas_norm.affine_act(parts, a, d, silu=True, out_dtype=jnp.float32, interpret=True) ** 2)

    def sums_loss(x, p):
      s1, s2 = pallas_norm.channel_sums(x, p, interpret=True)
      return jnp.sum(s1 * s1) + jnp.sum(s2)

    apply = lambda parts, a, d: pallas_norm.affine_act(parts, a, d, silu=True, out_dtype=jnp.bfloat16,
                                                       interpret=True)
    sums = lambda x, p: pallas_norm.channel_sums(x, p, interpret=True)
    # vmapped over a leading axis of 2, the batch (axis 1) sharded
    vapply = jax.vmap(apply)
    vargs = (tuple(p.reshape(2, 4, *p.shape[1:]) for p in parts), a.reshape(2, 4, -1), d.reshape(2, 4, -1))
    mesh1 = Mesh(np.array(jax.devices()), ("data",))
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    cases = [(apply, (parts, a, d), mesh1, "data", 0), (sums, (x, pivot), mesh1, "data", 0),
             (jax.grad(apply_loss, (0, 1, 2)), (parts, a, d), mesh1, "data", 0),
             (jax.grad(sums_loss), (x, pivot), mesh1, "data", 0),
             (apply, (parts, a, d), mesh2, ("a", "b"), 0), (vapply, vargs, Mesh(np.array(jax.devices()[:4]), ("data",)),
                                                            "data", 1)]
    for fn, args, mesh, batch, axis in cases:
      spec = lambda v: P(*(None,) * axis, batch, *(None,) * (v.ndim - axis - 1))
      sharded = jax.tree.map(lambda v: jax.device_put(v, NamedSharding(mesh, spec(v))), args)
      compiled = jax.jit(fn).lower(*sharded).compile()
      assert not _COLLECTIVES.search(compiled.as_text()), (fn, mesh)
      got, want = compiled(*sharded), jax.jit(fn)(*args)
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert tuple(g.sharding.spec)[axis:axis + 1] == (batch,)  # still one shard of examples per device
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=2e-5, atol=1e-4)
    bare = functools.partial(pallas_norm._apply_call, silu=True, out_dtype=jnp.bfloat16, interpret=True,
                             tune=pallas_norm.Tuning())
    put = lambda v: jax.device_put(v, NamedSharding(mesh1, P("data", *(None,) * (v.ndim - 1))))
    assert "all-gather" in jax.jit(bare).lower(*map(put, (x, a, d))).compile().as_text()
  finally:
    jax.config.update("jax_use_shardy_partitioner", previous)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the suite runs with 8 fake CPUs)")
def test_groupnorm_kernel_branch_partitions_over_the_batch(monkeypatch):
  """GroupNorm32's default in bf16, with its CUDA branch (the kernels, through the interpreter) taken on CPU,
  in a batch-sharded program, on one input and on [h, skip] parts: no collective, the output stays sharded,
  equal to the unsharded call (to a bf16 ulp); its gradient has no collective either. Lowered for CUDA with sharded
  inputs, the default bf16 GroupNorm holds the two kernels as partitioned calls, the float32 one none."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()), ("data",))
  put = lambda v: jax.device_put(v, NamedSharding(mesh, P("data", *(None,) * (v.ndim - 1))))
  shape = (8, 8, 8, 512)
  opts_cuda = dict(lowering_platforms=("cuda",))
  for dtype, calls in ((jnp.bfloat16, 2), (jnp.float32, 0)):
    v, fn = _gn_apply("auto", 512, shape)
    x = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("data")))
    text = jax.jit(fn).trace(v, x).lower(**opts_cuda).as_text()
    assert text.count("CustomSPMDPartitioning") == calls, dtype
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, cuda, default: cuda(*args))
  monkeypatch.setattr(pallas_norm, "channel_sums", functools.partial(pallas_norm.channel_sums, interpret=True))
  monkeypatch.setattr(pallas_norm, "affine_act", functools.partial(pallas_norm.affine_act, interpret=True))
  x = (5.0 + jax.random.normal(jax.random.key(2), shape)).astype(jnp.bfloat16)
  v, fn = _gn_apply("auto", 512, shape)
  for arg in (x, (x[..., :256], x[..., 256:])):
    sharded = jax.tree.map(put, arg)
    compiled = jax.jit(fn).lower(v, sharded).compile()
    assert not _COLLECTIVES.search(compiled.as_text())
    got = compiled(v, sharded)
    assert tuple(got.sharding.spec)[:1] == ("data",)
    # bf16 out: the float32 statistics may round differently per device layout (one bf16 ulp)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(jax.jit(fn)(v, arg), np.float32),
                               rtol=2 ** -7, atol=2 ** -7)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(v, x).astype(jnp.float32) ** 2)))
  assert not _COLLECTIVES.search(grad.lower(put(x)).compile().as_text())


def test_kernels_vmap_by_folding_into_the_batch():
  """vmap (a custom_partitioning call has no batching rule of its own): the mapped axis is folded into the
  batch; equal to a loop over the mapped axis, with unmapped operands, under grad, nested; for CUDA the vmapped
  call is still one Triton call."""
  k = jax.random.split(jax.random.key(4), 3)
  x = (3.0 * jax.random.normal(k[0], (3, 2, 32, 512))).astype(jnp.bfloat16)
  a, d = jax.random.normal(k[1], (3, 2, 512)), jax.random.normal(k[2], (3, 2, 512))
  parts = (x[..., :256], x[..., 256:])
  f = lambda p, a, d: pallas_norm.affine_act(p, a, d, silu=True, out_dtype=jnp.float32, interpret=True)
  at = lambda i: tuple(p[i] for p in parts)
  want = np.stack([f(at(i), a[i], d[i]) for i in range(3)])
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(f))(parts, a, d)), want)
  np.testing.assert_array_equal(np.asarray(jax.vmap(f, in_axes=(0, None, None))(parts, a[0], d[0])),
                                np.stack([f(at(i), a[0], d[0]) for i in range(3)]))
  nested = jax.vmap(jax.vmap(f))((parts[0][None].repeat(2, 0), parts[1][None].repeat(2, 0)), a[None].repeat(2, 0),
                                 d[None].repeat(2, 0))
  np.testing.assert_array_equal(np.asarray(nested), np.stack([want, want]))
  loss = lambda p, a, d: jnp.sum(jax.vmap(f)(p, a, d) ** 2)
  looped = lambda p, a, d: sum(jnp.sum(f(tuple(q[i] for q in p), a[i], d[i]) ** 2) for i in range(3))
  for g, w in zip(jax.tree.leaves(jax.grad(loss, (0, 1, 2))(parts, a, d)),
                  jax.tree.leaves(jax.grad(looped, (0, 1, 2))(parts, a, d))):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=1e-4, atol=1e-3)
  pivot = x[:, :, 0, :].astype(jnp.float32)
  sums = jax.vmap(lambda x, p: pallas_norm.channel_sums(x, p, interpret=True))(x, pivot)
  for i in range(3):
    _assert_sums_close([s[i] for s in sums], pallas_norm.channel_sums(x[i], pivot[i], interpret=True), x[i], pivot[i])
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  vf = jax.vmap(lambda x, a, d: pallas_norm.affine_act(x, a, d, silu=True, out_dtype=jnp.bfloat16))
  text = export.export(jax.jit(vf), **opts)(x, a, d).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 1 and re.findall(r"grid_[xyz] = (\d+)", text) == ["6", "1", "2"]


def test_single_device_lowering_is_the_bare_kernel():
  """On one device the partitioning wrapper lowers to the bare kernel: one Triton call with the same kernel
  IR, nothing else (so the single-GPU program measured on an H200 is unchanged)."""
  x = jax.ShapeDtypeStruct((4, 4096, 256), jnp.bfloat16)
  row = jax.ShapeDtypeStruct((4, 256), jnp.float32)
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  bare = functools.partial(pallas_norm._apply_call, silu=True, out_dtype=jnp.bfloat16, interpret=False,
                           tune=pallas_norm.Tuning())
  texts = [export.export(jax.jit(f), **opts)(x, row, row).mlir_module() for f in (
      lambda x, a, d: bare(x, a, d),
      lambda x, a, d: pallas_norm.affine_act(x, a, d, silu=True, out_dtype=jnp.bfloat16))]
  ops = [re.findall(r"stablehlo\.[a-z_]+", t) for t in texts]
  kernels = [re.findall(r'ir = "[^"]*"', t) for t in texts]
  assert ops[0] == ops[1] and len(kernels[0]) == 1 and kernels[0] == kernels[1]


# ---- The phase apply (`affine_act_phases`): a nearest-x2 up-sampled conv's four output phases, interleaved by
# the apply kernel as it writes (UpConv(impl="phases") -> GroupNorm32).


def _phase_inputs(b=2, h=4, w=8, c=512, dtype=jnp.bfloat16, seed=7):
  k = jax.random.split(jax.random.key(seed), 6)
  phases = tuple((3.0 * jax.random.normal(k[i], (b, h, w, c))).astype(dtype) for i in range(4))
  return phases, jax.random.normal(k[4], (b, c)), jax.random.normal(k[5], (b, c))


@pytest.mark.parametrize("hw, rows", [((4, 8), 32), ((8, 2), 32), ((2, 64), 32), ((4, 8), 16)])
@pytest.mark.parametrize("silu, out_dtype", [(True, jnp.bfloat16), (False, jnp.float32)])
def test_phase_kernel_equals_the_apply_of_the_interleave(hw, rows, silu, out_dtype, monkeypatch):
  """Through the interpreter, on tiles of several (rows, columns) shapes: bit-equal to `affine_act` on the
  interleaved input, whose tiles are plain rows, and within a rounding of the XLA expression; the interleave
  itself is the nearest-x2 phase order (out[2i + py, 2j + px] = phase (py, px)[i, j])."""
  monkeypatch.setattr(pallas_norm, "_TUNING", pallas_norm.Tuning(apply_rows=rows))
  phases, a, d = _phase_inputs(h=hw[0], w=hw[1])
  b, h, w, c = phases[0].shape
  got = pallas_norm.affine_act_phases(phases, a, d, silu=silu, out_dtype=out_dtype, interpret=True)
  assert got.shape == (b, 2 * h, 2 * w, c) and got.dtype == out_dtype
  x = pallas_norm.interleave_phases(phases)
  for py in (0, 1):
    for px in (0, 1):
      np.testing.assert_array_equal(np.asarray(x[:, py::2, px::2], np.float32),
                                    np.asarray(phases[2 * py + px], np.float32))
  flat = x.reshape(b, -1, c)
  rows_kernel = pallas_norm.affine_act(flat, a, d, silu=silu, out_dtype=out_dtype, interpret=True)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(rows_kernel.reshape(got.shape), np.float32))
  tol = 2e-6 if out_dtype == jnp.float32 else 2 ** -7
  want = pallas_norm.reference(flat, a, d, silu, out_dtype).reshape(got.shape)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_phase_kernel_gradient():
  """The custom VJP (backward in XLA) against finite differences and against the XLA expression's gradient."""
  phases, a, d = _phase_inputs(b=1, h=4, w=4, c=256, dtype=jnp.float32)
  kern = lambda ps, a, d: pallas_norm.affine_act_phases(ps, a, d, silu=True, out_dtype=jnp.float32, interpret=True)
  check_grads(lambda a, d: kern(phases, a, d), (a, d), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  xla = lambda ps, a, d: pallas_norm._xla_apply(pallas_norm.interleave_phases(ps).reshape(1, -1, 256), a, d,
                                                 True, jnp.float32)
  loss = lambda f: lambda ps, a, d: jnp.sum(jnp.sin(f(ps, a, d)))
  g = jax.grad(loss(kern), (0, 1, 2))(phases, a, d)
  w = jax.grad(loss(xla), (0, 1, 2))(phases, a, d)
  for gi, wi in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
    np.testing.assert_allclose(gi, wi, rtol=1e-5, atol=1e-5)


def test_phase_kernel_refuses_bad_input():
  phases, a, d = _phase_inputs()
  call = lambda ps, a=a, d=d: pallas_norm.affine_act_phases(ps, a, d, silu=True, out_dtype=jnp.bfloat16,
                                                            interpret=True)
  with pytest.raises(ValueError, match="four"):
    call(phases[:3])
  with pytest.raises(ValueError, match="four"):
    call(phases[:3] + (phases[3][:, :2],))
  with pytest.raises(ValueError, match="a, d"):
    call(phases, a=a[:, :256])
  with pytest.raises(ValueError, match="not tiled"):
    call(tuple(p[..., :128] for p in phases), a=a[:, :128], d=d[:, :128])
  with pytest.raises(ValueError, match="not tiled"):  # 2 x 6 pixels: pow2 divisors hold 2 x 2 < 16
    call(tuple(p[:, :2, :6] for p in phases))
  assert pallas_norm.phases_supported(112, 112, 256) and pallas_norm.phases_supported(28, 28, 512)
  assert not pallas_norm.phases_supported(14, 14, 1024) and not pallas_norm.phases_supported(112, 112, 192)


@pytest.mark.parametrize("scale_shift", [True, False])
def test_groupnorm_phases_kernel_branch_through_the_interpreter(monkeypatch, scale_shift):
  """GroupNorm32(stats="pallas") given `Phases` with its CUDA branch forced (sums per phase + the phase apply,
  through the interpreter): within one bf16 rounding of "channel" on the interleaved input, the same
  gradients in float32; and every mode (the XLA paths interleave) equals its own result on the interleave."""
  phases, _, _ = _phase_inputs(c=512)
  phases = tuple(p + 2.0 for p in phases)
  x = pallas_norm.interleave_phases(phases)
  v, _ = _gn_apply("channel", 512, x.shape)
  ss = (jnp.full((2, 1, 1, 512), 0.1, jnp.float32), jnp.full((2, 1, 1, 512), -0.2, jnp.float32))
  apply = lambda stats, arg, dt: unet_lib.GroupNorm32(stats=stats).apply(
      v, jax.tree.map(lambda p: p.astype(dt), arg), silu=True,
      scale_shift=tuple(s.astype(dt) for s in ss) if scale_shift else None)
  for stats in ("two_pass", "one_pass", "channel"):
    np.testing.assert_allclose(np.asarray(apply(stats, unet_lib.Phases(phases), jnp.float32)),
                               np.asarray(apply(stats, x, jnp.float32)), rtol=1e-5, atol=1e-5)
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, default=None, **per: per["cuda"](*args))
  monkeypatch.setattr(pallas_norm, "channel_sums", functools.partial(pallas_norm.channel_sums, interpret=True))
  monkeypatch.setattr(pallas_norm, "affine_act_phases",
                      functools.partial(pallas_norm.affine_act_phases, interpret=True))
  got = apply("pallas", unet_lib.Phases(phases), jnp.bfloat16)
  want = apply("channel", x, jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=2 ** -7)
  loss = lambda stats, arg: jnp.sum(jnp.sin(apply(stats, arg, jnp.float32)))
  f32 = tuple(p.astype(jnp.float32) for p in phases)
  g = jax.grad(lambda ps: loss("pallas", unet_lib.Phases(ps)))(f32)
  gw = jax.grad(lambda ps: loss("channel", pallas_norm.interleave_phases(ps)))(f32)
  for gi, wi in zip(g, gw):
    np.testing.assert_allclose(gi, wi, rtol=1e-4, atol=1e-4)


def test_groupnorm_phases_lower_to_kernels_without_interleave_for_cuda():
  """Lowered for CUDA: a GroupNorm given Phases is four sums kernels (one per phase) and ONE apply kernel, and
  nothing activation-sized is concatenated or stacked (no interleaving copy); value-and-gradient lowers too."""
  phases = tuple(jax.ShapeDtypeStruct((2, 8, 8, 256), jnp.bfloat16) for _ in range(4))
  v, fn = _gn_apply("pallas", 256, (2, 16, 16, 256))
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  text = export.export(jax.jit(lambda v, ps: fn(v, unet_lib.Phases(ps))), **opts)(v, phases).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 5
  shapes = re.findall(r"stablehlo.concatenate .*?-> tensor<([0-9x]+)x(?:bf16|f32)>", text)
  assert all(s.count("x") <= 2 for s in shapes), shapes  # (phase, B, C) statistics at most
  grad = jax.jit(jax.value_and_grad(lambda ps: jnp.sum(fn(v, unet_lib.Phases(ps)).astype(jnp.float32))))
  assert export.export(grad, **opts)(phases).mlir_module().count("__gpu$xla.gpu.triton") == 5


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the suite runs with 8 fake CPUs)")
def test_phase_kernel_partitions_over_the_batch_and_vmaps():
  """The phase apply in a batch-sharded program: no collective, the result stays batch-sharded, equal to the
  unsharded call (values and gradients); vmapped, equal to a loop."""
  phases, a, d = _phase_inputs(b=8, h=4, w=4, c=256)
  f = lambda ps, a, d: pallas_norm.affine_act_phases(ps, a, d, silu=True, out_dtype=jnp.float32, interpret=True)
  loss = jax.grad(lambda ps, a, d: jnp.sum(f(ps, a, d) ** 2), (0, 1, 2))
  for fn in (f, loss):
    _assert_partitions_over_the_batch(fn, (phases, a, d), atol=1e-4)
  stacked = (tuple(p.reshape(2, 4, *p.shape[1:]) for p in phases), a.reshape(2, 4, -1), d.reshape(2, 4, -1))
  got = jax.jit(jax.vmap(f))(*stacked)
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(got[i]),
                                  np.asarray(f(tuple(p[i] for p in stacked[0]), stacked[1][i], stacked[2][i])))


# ---- The pooled apply (`affine_act_pool`): a down-sampling ResBlock's GroupNorm + SiLU + 2x2 average pool,
# and the pool of its skip path, from one read of x.


@pytest.mark.parametrize("hw, rows", [((8, 16), 32), ((4, 32), 32), ((16, 4), 16), ((8, 8), 64)])
@pytest.mark.parametrize("silu, out_dtype", [(True, jnp.bfloat16), (False, jnp.float32)])
def test_pool_kernel_equals_its_expression(hw, rows, silu, out_dtype, monkeypatch):
  """Through the interpreter, on tiles of several shapes: the pooled x bit-equal to the float32 mean of each
  2x2 window, the pooled activation within a rounding of `pool_reference`, which is the XLA GroupNorm apply
  (jax.nn.silu) pooled in float32; in bf16 within about a rounding of the XLA path, which rounds the
  activation before pooling it."""
  monkeypatch.setattr(pallas_norm, "_TUNING", pallas_norm.Tuning(apply_rows=rows))
  k = jax.random.split(jax.random.key(3), 3)
  x = (3.0 * jax.random.normal(k[0], (2, *hw, 512))).astype(jnp.bfloat16)
  a, d = jax.random.normal(k[1], (2, 512)), jax.random.normal(k[2], (2, 512))
  y, xp = pallas_norm.affine_act_pool(x, a, d, silu=silu, out_dtype=out_dtype, interpret=True)
  b, h, w, c = x.shape
  assert y.shape == xp.shape == (b, h // 2, w // 2, c) and y.dtype == out_dtype and xp.dtype == x.dtype
  ry, rx = pallas_norm.pool_reference(x, a, d, silu, out_dtype)
  np.testing.assert_array_equal(np.asarray(xp, np.float32), np.asarray(rx, np.float32))
  tol = 2e-6 if out_dtype == jnp.float32 else 2 ** -7
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ry, np.float32), rtol=tol, atol=tol)
  xla = unet_lib._avg_pool2(pallas_norm._xla_apply(x.reshape(b, -1, c), a, d, silu, out_dtype).reshape(x.shape))
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(xla, np.float32), rtol=2 * tol, atol=2 * tol)


def test_pool_kernel_gradient_and_refusals():
  k = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(k[0], (1, 4, 8, 256))
  a, d = jax.random.normal(k[1], (1, 256)), jax.random.normal(k[2], (1, 256))
  kern = lambda x, a, d: pallas_norm.affine_act_pool(x, a, d, silu=True, out_dtype=jnp.float32, interpret=True)
  check_grads(lambda a, d: kern(x, a, d)[0], (a, d), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  loss = lambda f: lambda x, a, d: sum(jnp.sum(jnp.sin(o)) for o in f(x, a, d))
  g = jax.grad(loss(kern), (0, 1, 2))(x, a, d)
  w = jax.grad(loss(lambda x, a, d: pallas_norm.pool_reference(x, a, d, True, jnp.float32)), (0, 1, 2))(x, a, d)
  for gi, wi in zip(g, w):
    np.testing.assert_allclose(gi, wi, rtol=1e-5, atol=1e-5)
  call = lambda x, a=a, d=d: pallas_norm.affine_act_pool(x, a, d, silu=True, out_dtype=jnp.float32, interpret=True)
  for bad, match in ((x[0], "B, H, W, C"), (x[:, :3], "not tiled"), (x[:, :2, :4], "not tiled"),
                     (x[..., :128], "a, d")):
    with pytest.raises(ValueError, match=match):
      call(bad)
  assert pallas_norm.pool_supported(224, 224, 256) and pallas_norm.pool_supported(56, 56, 512)
  assert not pallas_norm.pool_supported(28, 28, 512) and not pallas_norm.pool_supported(7, 8, 256)


@pytest.mark.parametrize("resample", ["down", "up"])
def test_groupnorm_resample_kernel_branch_and_lowering(monkeypatch, resample):
  """GroupNorm32(resample=...): every mode returns the pair (activation, skip path) of a resampling ResBlock,
  "down" (avg_pool2(GN(x)), avg_pool2(x)), "up" (GN(x), nearest x2 of x) (the XLA paths: exactly the
  resampled unresampled call); "pallas" lowers for CUDA to the sums kernel + ONE fused apply kernel and no
  XLA resampling of an activation, and with its CUDA branch forced (interpreter) it is within a rounding of
  "channel" with the same float32 gradients; parts or a bad value are refused."""
  shape = (2, 8, 16, 256)
  x = (2.0 + jax.random.normal(jax.random.key(6), shape))
  v, _ = _gn_apply("channel", 256, shape)
  ss = (jnp.full((2, 1, 1, 256), 0.1, jnp.float32), jnp.full((2, 1, 1, 256), -0.2, jnp.float32))
  gn = lambda stats, x, resample: unet_lib.GroupNorm32(stats=stats).apply(
      v, x, scale_shift=tuple(s.astype(x.dtype) for s in ss), silu=True, resample=resample)
  for stats in ("two_pass", "one_pass", "channel"):
    for dt in (jnp.float32, jnp.bfloat16):
      y, xr = gn(stats, x.astype(dt), resample)
      want_y, want_x = unet_lib._resample_pair(gn(stats, x.astype(dt), None), x.astype(dt), resample)
      np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want_y, np.float32))
      np.testing.assert_array_equal(np.asarray(xr, np.float32), np.asarray(want_x, np.float32))
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  fn = lambda v, x: unet_lib.GroupNorm32(stats="pallas").apply(v, x, silu=True, resample=resample)
  text = export.export(jax.jit(fn), **opts)(v, jax.ShapeDtypeStruct(shape, jnp.bfloat16)).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 2 and "reduce_window" not in text
  assert not re.search(r"stablehlo.broadcast_in_dim .*-> tensor<2x8x2x16x2x256xbf16>", text)
  with pytest.raises(ValueError, match="resample takes one array"):
    unet_lib.GroupNorm32().apply(v, (x[..., :128], x[..., 128:]), silu=True, resample=resample)
  with pytest.raises(ValueError, match="resample 'sideways'"):
    unet_lib.GroupNorm32().apply(v, x, silu=True, resample="sideways")
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, default=None, **per: per["cuda"](*args))
  monkeypatch.setattr(pallas_norm, "channel_sums", functools.partial(pallas_norm.channel_sums, interpret=True))
  for name in ("affine_act_pool", "affine_act_up"):
    monkeypatch.setattr(pallas_norm, name, functools.partial(getattr(pallas_norm, name), interpret=True))
  xb = x.astype(jnp.bfloat16)
  for got, want in zip(gn("pallas", xb, resample), gn("channel", xb, resample)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -6, atol=2 ** -6)
  loss = lambda stats: lambda x: sum(jnp.sum(jnp.sin(o)) for o in gn(stats, x, resample))
  np.testing.assert_allclose(jax.grad(loss("pallas"))(x), jax.grad(loss("channel"))(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the suite runs with 8 fake CPUs)")
def test_pool_kernel_partitions_over_the_batch():
  k = jax.random.split(jax.random.key(8), 3)
  x = jax.random.normal(k[0], (8, 4, 8, 256))
  a, d = jax.random.normal(k[1], (8, 256)), jax.random.normal(k[2], (8, 256))
  f = lambda x, a, d: pallas_norm.affine_act_pool(x, a, d, silu=True, out_dtype=jnp.float32, interpret=True)
  _assert_partitions_over_the_batch(f, (x, a, d))


def _assert_partitions_over_the_batch(fn, args, atol=1e-5):
  """fn on batch-sharded args (8 devices): no collective in the program, results still batch-sharded and
  equal to the unsharded call."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()), ("data",))
  put = lambda v: jax.device_put(v, NamedSharding(mesh, P("data", *(None,) * (v.ndim - 1))))
  sharded = jax.tree.map(put, args)
  compiled = jax.jit(fn).lower(*sharded).compile()
  assert not _COLLECTIVES.search(compiled.as_text())
  for g, w in zip(jax.tree.leaves(compiled(*sharded)), jax.tree.leaves(jax.jit(fn)(*args))):
    assert tuple(g.sharding.spec)[:1] == ("data",)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=atol)


# ---- The up-sampling apply (`affine_act_up`): an up-sampling ResBlock's GroupNorm + SiLU, and its skip path
# up-sampled by the same programs.


@pytest.mark.parametrize("hw, rows", [((4, 8), 32), ((8, 2), 32), ((2, 64), 16)])
def test_up_kernel_equals_its_expression(hw, rows, monkeypatch):
  """Through the interpreter: the activation bit-equal to the rows kernel, the up-sampled copy exact."""
  monkeypatch.setattr(pallas_norm, "_TUNING", pallas_norm.Tuning(apply_rows=rows))
  k = jax.random.split(jax.random.key(9), 3)
  x = (3.0 * jax.random.normal(k[0], (2, *hw, 512))).astype(jnp.bfloat16)
  a, d = jax.random.normal(k[1], (2, 512)), jax.random.normal(k[2], (2, 512))
  y, xu = pallas_norm.affine_act_up(x, a, d, silu=True, out_dtype=jnp.bfloat16, interpret=True)
  b, h, w, c = x.shape
  assert y.shape == x.shape and xu.shape == (b, 2 * h, 2 * w, c) and xu.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(xu, np.float32),
                                np.asarray(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), np.float32))
  rows_kernel = pallas_norm.affine_act(x.reshape(b, -1, c), a, d, silu=True, out_dtype=jnp.bfloat16, interpret=True)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(rows_kernel.reshape(x.shape), np.float32))


def test_up_kernel_gradient_refusals_and_partitioning():
  k = jax.random.split(jax.random.key(10), 3)
  x = jax.random.normal(k[0], (8, 4, 4, 256))
  a, d = jax.random.normal(k[1], (8, 256)), jax.random.normal(k[2], (8, 256))
  kern = lambda x, a, d: pallas_norm.affine_act_up(x, a, d, silu=True, out_dtype=jnp.float32, interpret=True)
  xla = lambda x, a, d: (pallas_norm._xla_apply(x.reshape(8, -1, 256), a, d, True, jnp.float32).reshape(x.shape),
                         pallas_norm.upsample_nearest2(x))
  loss = lambda f: lambda x, a, d: sum(jnp.sum(jnp.sin(o)) for o in f(x, a, d))
  for g, w in zip(jax.grad(loss(kern), (0, 1, 2))(x, a, d), jax.grad(loss(xla), (0, 1, 2))(x, a, d)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  for bad, match in ((x[0], "B, H, W, C"), (x[:, :2, :2], "not tiled"), (x[..., :128], "a, d")):
    with pytest.raises(ValueError, match=match):
      kern(bad, a, d)
  if jax.device_count() >= 8:
    _assert_partitions_over_the_batch(kern, (x, a, d))
  # vmapped (the mapped axis joins the batch): equal to a loop, for this kernel and the pooled one
  pool = lambda x, a, d: pallas_norm.affine_act_pool(x, a, d, silu=True, out_dtype=jnp.float32, interpret=True)
  x8 = jnp.concatenate([x, x[:, ::-1]], axis=2)  # (8, 4, 8, 256): pooled tiles of 2 x 4 pixels
  for f, xv in ((kern, x), (pool, x8)):
    stacked = (xv.reshape(2, 4, *xv.shape[1:]), a.reshape(2, 4, -1), d.reshape(2, 4, -1))
    got = jax.jit(jax.vmap(f))(*stacked)
    for i in range(2):
      for g, w in zip(got, f(*(v[i] for v in stacked))):
        np.testing.assert_array_equal(np.asarray(g[i]), np.asarray(w))


def test_groupnorm_phases_fallbacks_and_refusals(monkeypatch):
  """Phases the phase kernel does not tile (7 x 7) lower for CUDA to no apply kernel (XLA interleaves in its
  apply; the sums kernels do not tile either) and still equal the GroupNorm of the interleave; a resample of
  Phases is refused. A resampling GroupNorm whose fused kernel does not tile (28 x 28 pooled: 14 x 14) keeps
  the rows apply kernel and resamples in XLA."""
  phases = tuple(2.0 + jax.random.normal(jax.random.key(20 + i), (2, 7, 7, 256)) for i in range(4))
  v, _ = _gn_apply("channel", 256, (2, 14, 14, 256))
  gn = lambda stats, x, **kw: unet_lib.GroupNorm32(stats=stats).apply(v, x, silu=True, **kw)
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  spec = tuple(jax.ShapeDtypeStruct(p.shape, jnp.bfloat16) for p in phases)
  text = export.export(jax.jit(lambda v, ps: gn("pallas", unet_lib.Phases(ps))), **opts)(v, spec).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 0
  want = gn("channel", pallas_norm.interleave_phases(phases))
  np.testing.assert_allclose(gn("pallas", unet_lib.Phases(phases)), want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="resample takes one array"):
    gn("pallas", unet_lib.Phases(phases), resample="down")
  x = jax.ShapeDtypeStruct((2, 28, 28, 256), jnp.bfloat16)
  assert not pallas_norm.pool_supported(28, 28, 256) and pallas_norm.supported(28 * 28, 256)
  text = export.export(jax.jit(lambda v, x: gn("pallas", x, resample="down")), **opts)(v, x).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 2 and "reduce_window" in text  # sums + rows apply, XLA pools



# ---- The fused skip (`affine_act_skip`): a decoder ResBlock's GroupNorm apply and its 1x1 skip conv of the
# raw input from one read of the parts (UNet.skip_impl="fused").


def _skip_inputs(widths=(256, 256), o=256, b=2, n=128, dtype=jnp.bfloat16, seed=11):
  k = jax.random.split(jax.random.key(seed), len(widths) + 4)
  parts = tuple((2.0 * jax.random.normal(kk, (b, n, w))).astype(dtype) for kk, w in zip(k, widths))
  c = sum(widths)
  w = jax.random.normal(k[-4], (c, o)) / c ** 0.5
  return parts, jax.random.normal(k[-3], (b, c)), jax.random.normal(k[-2], (b, c)), w, jax.random.normal(k[-1], (o,))


@pytest.mark.parametrize("widths, o, n, rows, bo", [((256, 256), 256, 128, 64, 256), ((512, 256), 512, 64, 128, 256),
                                                    ((256,), 256, 256, 128, 128), ((256, 512, 256), 256, 192, 64, 256)])
@pytest.mark.parametrize("dtype, silu", [(jnp.bfloat16, True), (jnp.float32, False)])
def test_skip_kernel_equals_its_expression(widths, o, n, rows, bo, dtype, silu, monkeypatch):
  """Through the interpreter, with one and several row tiles, output-channel tiles and parts: the activation
  equals the apply (bf16: to a rounding of the float32 value), the skip conv equals `skip_reference` (float32
  accumulation of every channel, one rounding), which equals the 1x1 conv of the concatenation."""
  monkeypatch.setattr(pallas_norm, "_TUNING", pallas_norm.Tuning(skip_rows=rows, skip_chunk=64, skip_block_o=bo))
  parts, a, d, w, bias = _skip_inputs(widths, o, n=n, dtype=dtype)
  y, s = pallas_norm.affine_act_skip(parts, a, d, w, bias, silu=silu, out_dtype=dtype, interpret=True)
  ry, rs = pallas_norm.skip_reference(parts, a, d, w, bias, silu, dtype)
  c = sum(widths)
  assert y.shape == (2, n, c) and s.shape == (2, n, o) and y.dtype == s.dtype == dtype
  tol = 2e-6 if dtype == jnp.float32 else 2 ** -7
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ry, np.float32), rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(s, np.float32), np.asarray(rs, np.float32), rtol=tol, atol=4 * tol)
  x = jnp.concatenate(parts, axis=-1)
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(pallas_norm.reference(x, a, d, silu, dtype), np.float32), rtol=tol, atol=tol)
  conv = jnp.einsum("bnc,co->bno", x.astype(jnp.float32), w.astype(dtype).astype(jnp.float32),
                    precision="highest") + bias
  np.testing.assert_allclose(np.asarray(s, np.float32), np.asarray(conv), rtol=tol, atol=4 * tol)


def test_skip_kernel_gradient_refusals_partitioning_and_vmap():
  """The custom VJP is the expression's (parts, a, d, w, bias); shapes it cannot tile are refused; it
  partitions over a sharded batch with the weights replicated (no collective) and vmaps into the batch."""
  parts, a, d, w, bias = _skip_inputs(n=64, dtype=jnp.float32, b=8)
  kern = lambda ps, a, d, w, bias: pallas_norm.affine_act_skip(ps, a, d, w, bias, silu=True, out_dtype=jnp.float32,
                                                               interpret=True)
  ref = lambda ps, a, d, w, bias: pallas_norm.skip_reference(ps, a, d, w, bias, True, jnp.float32)
  loss = lambda f: lambda *args: sum(jnp.sum(jnp.sin(o)) for o in f(*args))
  got = jax.grad(loss(kern), tuple(range(5)))(parts, a, d, w, bias)
  want = jax.grad(loss(ref), tuple(range(5)))(parts, a, d, w, bias)
  for g, wt in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # (forwards differ in summation order)
    np.testing.assert_allclose(g, wt, rtol=1e-4, atol=1e-4)
  for bad, match in (((parts[0][..., :128], parts[1], parts[0][..., 128:]), "not tiled"), ((parts[0][:, :48],), "a, d"),
                     (tuple(p[:, :32] for p in parts), "not tiled"), ((parts[0][0],), "B, N, C")):
    with pytest.raises(ValueError, match=match):
      kern(bad, a, d, w, bias)
  with pytest.raises(ValueError, match="not tiled"):
    kern(parts, a, d, w[:, :128], bias[:128])
  with pytest.raises(ValueError, match="w \\(C, O\\)"):
    kern(parts, a, d, w.T, bias)
  with pytest.raises(ValueError, match="one dtype"):
    kern((parts[0], parts[1].astype(jnp.bfloat16)), a, d, w, bias)
  assert pallas_norm.skip_supported(50176, (256, 256), 256) and not pallas_norm.skip_supported(784, (512,), 512)
  if jax.device_count() >= 8:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = lambda v: jax.device_put(v, NamedSharding(mesh, P("data", *(None,) * (v.ndim - 1))))
    whole = lambda v: jax.device_put(v, NamedSharding(mesh, P()))
    args = (jax.tree.map(batch, parts), batch(a), batch(d), whole(w), whole(bias))
    compiled = jax.jit(kern).lower(*args).compile()
    assert not _COLLECTIVES.search(compiled.as_text())
    for g, wt in zip(compiled(*args), kern(parts, a, d, w, bias)):
      assert tuple(g.sharding.spec)[:1] == ("data",)
      np.testing.assert_allclose(np.asarray(g), np.asarray(wt), rtol=2e-5, atol=1e-5)
  split = lambda v: v.reshape(2, 4, *v.shape[1:])
  got = jax.jit(jax.vmap(kern, in_axes=(0, 0, 0, None, None)))(tuple(map(split, parts)), split(a), split(d), w, bias)
  for i in range(2):
    for g, wt in zip(got, kern(tuple(split(p)[i] for p in parts), split(a)[i], split(d)[i], w, bias)):
      np.testing.assert_allclose(np.asarray(g[i]), np.asarray(wt), rtol=1e-6, atol=1e-6)
  with pytest.raises(NotImplementedError, match="weight operand"):
    jax.vmap(kern, in_axes=(None, None, None, 0, None))(parts, a, d, jnp.stack([w, w]), bias)


def test_groupnorm_project_kernel_branch_through_the_interpreter(monkeypatch):
  """GroupNorm32(stats="pallas") given parts and a projection, its CUDA branch forced (the kernels through
  Pallas' interpreter): the activation within a bf16 rounding of "channel" on the parts, the projection of
  `skip_conv`; float32 gradients (parts, scale, kernel) equal the XLA path's. Lowered for CUDA: the sums of
  each part and one fused kernel, no convolution; the projection is refused with phases or resampling."""
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, default=None, **per: per["cuda"](*args))
  monkeypatch.setattr(pallas_norm, "channel_sums", functools.partial(pallas_norm.channel_sums, interpret=True))
  monkeypatch.setattr(pallas_norm, "affine_act_skip", functools.partial(pallas_norm.affine_act_skip, interpret=True))
  k = jax.random.split(jax.random.key(12), 4)
  parts = tuple(3.0 + 2.0 * jax.random.normal(kk, (2, 8, 8, 256)) for kk in k[:2])
  v, _ = _gn_apply("channel", 512, (2, 8, 8, 512))
  kernel = jax.random.normal(k[2], (1, 1, 512, 256)) / 512 ** 0.5
  kbias = jax.random.normal(k[3], (256,))

  def fn(stats, ps, kernel, v=v, dt=jnp.bfloat16):
    ps = tuple(p.astype(dt) for p in ps)
    return unet_lib.GroupNorm32(stats=stats).apply(v, ps, silu=True, project=(kernel.astype(dt), kbias.astype(dt)))

  (y, s), (wy, ws) = fn("pallas", parts, kernel), fn("channel", parts, kernel)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(wy, np.float32), rtol=2 ** -7, atol=2 ** -7)
  # The projection: one rounding of the float32 conv of the bf16 operands (the XLA path's split convs round
  # each part's sum too, so they are only near it).
  r = lambda v: v.astype(jnp.bfloat16).astype(jnp.float32)
  exact = unet_lib.skip_conv(tuple(map(r, parts)), r(kernel), r(kbias))
  np.testing.assert_allclose(np.asarray(s, np.float32), exact, rtol=2 ** -8, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ws, np.float32), exact, rtol=2 ** -6, atol=2 ** -4)
  loss = lambda stats: lambda ps, v, kernel: sum(jnp.sum(jnp.sin(o)) for o in fn(stats, ps, kernel, v, jnp.float32))
  for g, w in zip(jax.tree.leaves(jax.grad(loss("pallas"), (0, 1, 2))(parts, v, kernel)),
                  jax.tree.leaves(jax.grad(loss("channel"), (0, 1, 2))(parts, v, kernel))):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)  # kernel grads ~100: float32 sums
  monkeypatch.undo()
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  spec = tuple(jax.ShapeDtypeStruct(p.shape, jnp.bfloat16) for p in parts)
  text = export.export(jax.jit(lambda v, ps: fn("pallas", ps, kernel, v)), **opts)(v, spec).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 3 and "stablehlo.convolution" not in text
  # 4 x 4 pixels (16 rows): the apply and sums tile, the fused kernel does not (< 64 rows): the rows apply
  # kernel and the per-part 1x1 convs in XLA.
  small = tuple(jax.ShapeDtypeStruct((2, 4, 4, 256), jnp.bfloat16) for _ in parts)
  assert pallas_norm.supported(16, 256) and not pallas_norm.skip_supported(16, (256, 256), 256)
  text = export.export(jax.jit(lambda v, ps: fn("pallas", ps, kernel, v)), **opts)(v, small).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 3 and text.count("stablehlo.convolution") == 2
  with pytest.raises(ValueError, match="project takes"):
    unet_lib.GroupNorm32(stats="pallas").apply(v, parts[0], resample="down", project=(kernel, kbias))
  with pytest.raises(ValueError, match="project takes"):
    unet_lib.GroupNorm32(stats="pallas").apply(v, parts, project=(kernel[:, :, :256], kbias))


@pytest.mark.skipif(not _cuda(), reason="the compiled Triton kernel needs an NVIDIA GPU")
def test_compiled_skip_kernel_on_gpu():
  """On a GPU: the compiled fused skip kernel (its Triton dot included) equals its expression, on a
  decoder's [h, skip] at 56x56 (64-row tiles) and 112x112 (128-row tiles), two and four output tiles."""
  for widths, o, n in (((256, 256), 256, 3136), ((512, 256), 512, 12544)):
    parts, a, d, w, bias = _skip_inputs(widths, o, n=n)
    y, s = jax.jit(lambda ps, a, d, w, bias: pallas_norm.affine_act_skip(ps, a, d, w, bias, silu=True,
                                                                          out_dtype=jnp.bfloat16))(parts, a, d, w, bias)
    ry, rs = jax.jit(lambda *args: pallas_norm.skip_reference(*args, True, jnp.bfloat16))(parts, a, d, w, bias)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ry, np.float32), rtol=2 ** -7, atol=2 ** -7)
    np.testing.assert_allclose(np.asarray(s, np.float32), np.asarray(rs, np.float32), rtol=2 ** -7, atol=2 ** -5)


def test_resblock_fused_skip_through_the_interpreter(monkeypatch):
  """A decoder ResBlock (bf16, [h, skip] parts) with every kernel branch forced through the interpreter:
  skip_impl="fused" (its skip conv inside the GroupNorm kernel) is as close to the float32 block as "split"
  (within 10% of its error), with the same params."""
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, default=None, **per: per["cuda"](*args))
  for name in ("channel_sums", "affine_act"):
    monkeypatch.setattr(pallas_norm, name, functools.partial(getattr(pallas_norm, name), interpret=True))
  calls = []
  real = pallas_norm.affine_act_skip
  monkeypatch.setattr(pallas_norm, "affine_act_skip",
                      lambda *a, **kw: calls.append(1) or real(*a, **kw, interpret=True))
  k = jax.random.split(jax.random.key(13), 3)
  parts = tuple(1.0 + jax.random.normal(kk, (2, 8, 8, 256)) for kk in k[:2])
  emb = jax.random.normal(k[2], (2, 64))
  block = lambda **kw: unet_lib.ResBlock(256, use_scale_shift_norm=True, **kw)
  v = block(skip_impl="split").init(jax.random.key(0), parts, emb)
  assert jax.tree.structure(block(skip_impl="fused").init(jax.random.key(0), parts, emb)) == jax.tree.structure(v)
  v = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), v)  # non-zero out conv
  with jax.default_matmul_precision("highest"):
    want = block(norm_stats="two_pass").apply(v, parts, emb)
  bf = tuple(p.astype(jnp.bfloat16) for p in parts)
  err = {impl: float(jnp.linalg.norm(block(skip_impl=impl, dtype=jnp.bfloat16, norm_stats="pallas").apply(
      v, bf, emb).astype(jnp.float32) - want) / jnp.linalg.norm(want)) for impl in ("split", "fused")}
  assert calls == [1]  # the fused block went through the kernel (the split one did not)
  assert err["fused"] <= 1.1 * err["split"] and err["split"] < 2e-2, err  # (seen: 4.8e-3 and 5.1e-3)
