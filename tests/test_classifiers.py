"""Classifier registry and interface: shapes, features/head split, normalisation, dtype, BatchNorm, training."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffaug_jax.models.classifiers import INPUT_SIZES, classifier_names, get_classifier

# name -> (feature dim, has batch_stats)
EXPECTED = {
    "resnet18": (512, True), "resnet50": (2048, True), "resnet18_cifar": (512, True),
    "resnet50_cifar": (2048, True), "wrn28_10": (640, True), "vit_b16": (768, False),
    "resnet_tiny": (64, True), "cnn_small": (64, True),
}


def test_registry_names():
  assert set(classifier_names()) == set(EXPECTED)
  with pytest.raises(ValueError, match="unknown classifier 'resnet9000'"):
    get_classifier("resnet9000", 10)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shapes_and_dtypes_abstract(name):
  # eval_shape: the big nets are traced, never allocated.
  module = get_classifier(name, 7, dtype=jnp.bfloat16)
  s = INPUT_SIZES[name]
  x = jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
  dim, has_bn = EXPECTED[name]
  assert ("batch_stats" in variables) == has_bn
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))  # params + stats float32
  logits, feats = jax.eval_shape(lambda v, x: module.apply(v, x, return_features=True), variables, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert feats.shape == (2, dim)
  head = jax.eval_shape(lambda v, h: module.apply(v, h, method="logits_from_features"), variables, feats)
  assert head.shape == (2, 7)


def test_imagenet_resnet_spatial_path():
  # torchvision stem: 224 -> 112 (conv) -> 56 (pool) -> 56, 28, 14, 7. Check the last map via intermediates.
  module = get_classifier("resnet18", 3)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
  _, inter = jax.eval_shape(
      lambda v, x: module.apply(v, x, capture_intermediates=lambda m, n: m.name == "layer4_1",
                                mutable=["intermediates"]), variables, x)
  assert inter["intermediates"]["layer4_1"]["__call__"][0].shape == (1, 7, 7, 512)


def test_small_resnet_real_forward_one_channel():
  # (cnn_small runs for real in the toy-training and normalisation tests.)
  module = get_classifier("resnet_tiny", 10)
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1), minval=-1, maxval=1)
  # jit: eager Flax dispatch op by op is several times slower on CPU.
  variables = jax.jit(module.init)(jax.random.key(0), x)

  @jax.jit
  def run(variables, x):
    logits, feats = module.apply(variables, x, return_features=True)
    head = module.apply(variables, feats, method="logits_from_features")
    return logits, head, module.apply(variables, x, train=True, mutable=["batch_stats"])

  logits, head, (out, upd) = run(variables, x)
  np.testing.assert_allclose(head, logits, rtol=1e-6, atol=1e-6)
  # Train mode uses batch statistics and updates the running ones; eval mode leaves them alone.
  assert out.shape == (4, 10)
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(upd["batch_stats"])
  assert all(a.shape == b.shape for a, b in zip(before, after))
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  assert not np.allclose(out, logits)


def test_normalisation_and_bad_inputs():
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  base = get_classifier("cnn_small", 5)
  variables = jax.jit(base.init)(jax.random.key(0), x)
  # mean=std=0.5 maps [-1, 1] onto itself, so it must equal mean=None (x fed unchanged).
  same = get_classifier("cnn_small", 5, mean=(0.5,), std=(0.5,))
  imagenet = get_classifier("cnn_small", 5, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  out_base, out_same, out_imagenet = jax.jit(
      lambda v, x: (base.apply(v, x), same.apply(v, x), imagenet.apply(v, x)))(variables, x)
  np.testing.assert_allclose(out_same, out_base, rtol=1e-5, atol=1e-5)
  assert not np.allclose(out_imagenet, out_base, atol=1e-3)
  abstract_init = lambda m, shape: jax.eval_shape(
      lambda x: m.init(jax.random.key(0), x), jax.ShapeDtypeStruct(shape, jnp.float32))
  with pytest.raises(ValueError, match="3 values but the input has 1 channels"):
    abstract_init(imagenet, (2, 16, 16, 1))
  with pytest.raises(ValueError, match="NHWC"):
    abstract_init(base, (16, 16, 3))
  vit = get_classifier("vit_b16", 10)
  with pytest.raises(ValueError, match="224x224"):
    abstract_init(vit, (1, 32, 32, 3))


def test_bf16_compute_keeps_float32_state():
  module = get_classifier("resnet_tiny", 4, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 16, 16, 3))
  # Abstract evaluation: dtypes are decided at trace time, and bf16 compiles slowly on CPU.
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  out, upd = jax.eval_shape(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
  assert out.dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves((variables, upd)))


def test_cnn_small_learns_a_toy_task():
  # Two classes that differ by a bright square: a few Adam steps must drive the loss well down.
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 64)
  x = rng.uniform(-1, -0.5, (64, 16, 16, 1)).astype(np.float32)
  x[y == 1, 4:12, 4:12] = 0.8
  module = get_classifier("cnn_small", 2)
  variables = jax.jit(module.init)(jax.random.key(0), x)
  tx = optax.adam(1e-2)
  params, stats = variables["params"], variables["batch_stats"]
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt):
    def loss_fn(p):
      logits, upd = module.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    upd, opt = tx.update(g, opt)
    return optax.apply_updates(params, upd), stats, opt, loss

  losses = []
  for _ in range(25):
    params, stats, opt, loss = step(params, stats, opt)
    losses.append(float(loss))
  assert losses[-1] < 0.2 * losses[0]
  acc = (jax.jit(module.apply)({"params": params, "batch_stats": stats}, x).argmax(-1) == y).mean()
  assert acc > 0.95


def test_imports_stay_light():
  # Models/converters must import without the data stack; on-device AugMix is pure jax (no flax, no PIL).
  code = (
      "import sys\n"
      "import diffaug_jax.augmix\n"
      "pure = sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'PIL', 'optax', 'orbax'))\n"
      "import diffaug_jax.models.classifiers, diffaug_jax.convert.torchvision, diffaug_jax.convert.timm\n"
      "heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
      "               ('grain', 'tensorflow_datasets', 'tensorflow', 'orbax', 'torch', 'ml_collections'))\n"
      "print(','.join(pure) + '|' + ','.join(heavy))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "|", out.stdout


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_vit_drop_path_schedule(monkeypatch, schedule):
  """DeiT-III (models_v2, dpr_constant) drops every block at the same rate; timm's schedule rises linearly."""
  from diffaug_jax.models import vit
  rates = []

  class Spy(vit.Block):
    def __call__(self, x, train):
      rates.append(self.drop_path)
      return super().__call__(x, train)

  monkeypatch.setattr(vit, "Block", Spy)
  m = vit.VisionTransformer(num_classes=3, img_size=16, patch_size=8, embed_dim=16, depth=4, num_heads=2,
                            drop_path_rate=0.3, drop_path_schedule=schedule)
  jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  want = [0.3] * 4 if schedule == "constant" else [0.0, 0.1, 0.2, 0.3]
  assert rates == pytest.approx(want)


def test_init_follows_the_reference_code():
  """From scratch, the ViT initialises as DeiT-III's models_v2 (LayerScale 1e-4, cls_token/pos_embed
  trunc-normal 0.02, the patch conv at PyTorch's default uniform) and the ResNet fc as torchvision's
  nn.Linear (weight and bias uniform in +-1/sqrt(fan_in))."""
  from diffaug_jax.models import resnet, vit
  m = vit.VisionTransformer(num_classes=10, img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2)
  p = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]  # jit: one compile, not op by op
  np.testing.assert_allclose(p["blocks_0"]["ls1"]["gamma"], 1e-4, rtol=1e-6)
  # trunc_normal_(std=.02) with absolute bounds +-2: a std of 0.02, not the 0.0176 of a +-2-sigma truncation.
  draw = vit._trunc02(jax.random.key(0), (4096, 64))
  assert abs(float(jnp.std(draw)) - 0.02) < 4e-4 and float(jnp.abs(draw).max()) > 0.06
  assert 0.01 < float(jnp.std(p["cls_token"])) < 0.03  # cls_token uses it (timm: normal 1e-6)
  bound = (16 * 16 * 3) ** -0.5
  for leaf in (p["patch_embed"]["proj"]["kernel"], p["patch_embed"]["proj"]["bias"]):
    assert bound * 0.8 < float(jnp.abs(leaf).max()) <= bound
  small = resnet.ResNet(stage_sizes=(1, 1, 1, 1), block="bottleneck", width=4, num_classes=200, stem="cifar")
  fc = jax.jit(small.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]["fc"]
  fan_in = 4 * 8 * 4  # width * 2**3 * bottleneck expansion
  assert fc["kernel"].shape == (fan_in, 200)
  for leaf in (fc["kernel"], fc["bias"]):
    assert fan_in ** -0.5 * 0.8 < float(jnp.abs(leaf).max()) <= fan_in ** -0.5
