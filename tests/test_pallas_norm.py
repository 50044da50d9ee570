"""The Pallas GroupNorm-apply kernel (models.pallas_norm): the kernel (through Pallas' interpreter) equals the
XLA expression, its custom VJP equals the expression's gradient, shapes it cannot tile are refused, and
`UNet.norm_stats="pallas"` lowers to one Triton call per tiled GroupNorm for CUDA while running the XLA
apply elsewhere (bit-identical to "channel" on CPU). Its speed is measured on a GPU only (`gn=pallas`)."""
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


def test_untileable_shapes_refused():
  assert pallas_norm.supported(50176, 256) and pallas_norm.supported(784, 1536)
  assert not pallas_norm.supported(49, 1024)  # 7x7: no power-of-two row tile >= 16
  assert not pallas_norm.supported(64, 128)  # channels not a multiple of 256
  x, a, d = _inputs(n=49)
  with pytest.raises(ValueError, match="not tiled"):
    pallas_norm.affine_act(x, a, d, silu=True, out_dtype=jnp.bfloat16, interpret=True)
  with pytest.raises(ValueError, match=r"\(B, N, C\)"):
    pallas_norm.affine_act(x[0], a, d, silu=True, out_dtype=jnp.bfloat16)


def _gn_apply(stats, c, shape):
  v = {"params": {"scale": 1 + 0.1 * jnp.arange(c) / c, "bias": 0.01 * jnp.arange(c)}}
  ss = (jnp.full((shape[0], 1, 1, c), 0.1, jnp.bfloat16), jnp.full((shape[0], 1, 1, c), -0.2, jnp.bfloat16))
  return v, lambda v, x: unet_lib.GroupNorm32(stats=stats).apply(v, x, scale_shift=ss, silu=True)


def _cuda() -> bool:
  return jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()


@pytest.mark.filterwarnings("ignore:GroupNorm32\\(stats='pallas'\\)")  # the 8 fake devices (tested below)
@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the kernel runs: see the GPU test")
def test_groupnorm_pallas_is_channel_off_gpu():
  shape = (2, 8, 8, 256)
  x = (5.0 + jax.random.normal(jax.random.key(1), shape)).astype(jnp.bfloat16)
  v, pallas = _gn_apply("pallas", 256, shape)
  _, channel = _gn_apply("channel", 256, shape)
  np.testing.assert_array_equal(np.asarray(jax.jit(pallas)(v, x), np.float32),
                                np.asarray(jax.jit(channel)(v, x), np.float32))


@pytest.mark.filterwarnings("ignore:GroupNorm32\\(stats='pallas'\\)")  # the 8 fake devices (tested below)
@pytest.mark.parametrize("c, calls", [(256, 1), (64, 0)])
def test_groupnorm_pallas_lowers_to_triton_for_cuda(c, calls):
  """Lowered for CUDA (no GPU needed): one Triton custom call where the shape tiles, none where it does not;
  value-and-gradient lowers too (the forward through the kernel, the custom VJP's backward in XLA)."""
  shape = (2, 8, 8, c)
  v, fn = _gn_apply("pallas", c, shape)
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  opts = dict(platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  text = export.export(jax.jit(fn), **opts)(v, x).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == calls
  grad = jax.jit(jax.value_and_grad(lambda v, x: jnp.sum(fn(v, x).astype(jnp.float32)), argnums=1))
  gtext = export.export(grad, **opts)(v, x).mlir_module()
  assert gtext.count("__gpu$xla.gpu.triton") == calls


@pytest.mark.skipif(not _cuda(), reason="the compiled Triton kernel needs an NVIDIA GPU")
def test_compiled_kernel_on_gpu():
  """On a GPU (benchmarks/gpu_check.sh runs this file first): the compiled kernel equals the expression, and a
  UNet-sized GroupNorm with "pallas" equals "channel" up to one bf16 rounding."""
  for silu, out_dtype in ((True, jnp.bfloat16), (False, jnp.float32)):
    x, a, d = _inputs(b=4, n=1024, c=768)
    got = jax.jit(lambda x, a, d: pallas_norm.affine_act(x, a, d, silu=silu, out_dtype=out_dtype))(x, a, d)
    want = pallas_norm.reference(x, a, d, silu, out_dtype)
    tol = 2e-6 if out_dtype == jnp.float32 else 2 ** -7
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
  shape = (2, 56, 56, 512)
  x = (2.0 + jax.random.normal(jax.random.key(2), shape)).astype(jnp.bfloat16)
  v, pallas = _gn_apply("pallas", 512, shape)
  _, channel = _gn_apply("channel", 512, shape)
  lowered = jax.jit(pallas).lower(v, x)
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1
  np.testing.assert_allclose(np.asarray(lowered.compile()(v, x), np.float32),
                             np.asarray(jax.jit(channel)(v, x), np.float32), rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several devices (the suite runs with 8 fake CPUs)")
def test_pallas_warns_on_several_devices():
  """XLA cannot partition a Pallas call: with several devices the "pallas" mode says so (at trace time, where
  the kernel would be used), "channel" does not."""
  import warnings
  shape = (2, 8, 8, 256)
  x = jnp.ones(shape, jnp.bfloat16)
  v, pallas = _gn_apply("pallas", 256, shape)
  _, channel = _gn_apply("channel", 256, shape)
  with pytest.warns(UserWarning, match="cannot partition a Pallas call"):
    pallas(v, x)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    channel(v, x)
