"""torchvision ResNet / timm DeiT-III import: golden parity, full-size key lists, strict errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffaug_jax.convert import common
from diffaug_jax.convert import timm as timm_convert
from diffaug_jax.convert import torchvision as tv_convert
from diffaug_jax.models.classifiers import get_classifier


def _params(npz_path):
  with np.load(npz_path) as z:
    return {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}, z["x"], z["out"]


def _assert_logits_close(got, want):
  got = np.asarray(got)
  assert got.shape == want.shape
  # 1e-4 relative to the logit scale.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def _shape_only(shapes):
  # Zero-stride views: right shapes, no memory.
  return {k: np.broadcast_to(np.zeros((), np.float16), tuple(s)) for k, s in shapes.items()}


def test_torchvision_bottleneck_golden_parity(golden_dir):
  path = golden_dir / "torchvision_resnet_bottleneck_1111.npz"
  module, variables = tv_convert.load_torchvision_resnet(
      path, arch="resnet50", num_classes=10, stage_sizes=(1, 1, 1, 1), mean=None, std=None)
  assert set(variables) == {"params", "batch_stats"}
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(variables))
  _, x, out = _params(path)
  _assert_logits_close(module.apply(variables, _nhwc(x)), out)


def test_torchvision_wrapped_module_prefix_gives_same_variables(golden_dir):
  sd, _, _ = _params(golden_dir / "torchvision_resnet_bottleneck_1111.npz")
  kw = dict(arch="resnet50", num_classes=10, stage_sizes=(1, 1, 1, 1))
  _, plain = tv_convert.load_torchvision_resnet(sd, **kw)
  wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 180}
  _, got = tv_convert.load_torchvision_resnet(wrapped, **kw)
  jax.tree.map(np.testing.assert_array_equal, got, plain)


def test_torchvision_resnet50_full_key_list(golden_dir):
  spec = json.loads((golden_dir / "torchvision_resnet50_shapes.json").read_text())["shapes"]
  module = tv_convert.resnet_module("resnet50", 1000)
  # Converted weights must load into the registry's module (training / evaluation build it by name).
  assert module == get_classifier("resnet50", 1000)
  expected = tv_convert.expected_torch_shapes(module, (1, 64, 64, 3))
  ignored = {k for k in spec if k.endswith("num_batches_tracked")}
  assert len(ignored) == 53
  assert expected == {k: tuple(s) for k, s in spec.items() if k not in ignored}
  common.check_keys(expected, _shape_only(spec), "resnet50", ignore=tv_convert.IGNORED)


def test_corrupted_resnet50_checkpoint_names_every_problem(golden_dir):
  spec = json.loads((golden_dir / "torchvision_resnet50_shapes.json").read_text())["shapes"]
  sd = _shape_only(spec)
  del sd["layer3.2.bn1.running_var"]
  del sd["fc.bias"]
  sd["layer5.0.conv1.weight"] = np.zeros((1,), np.float16)
  sd["layer2.1.conv2.weight"] = np.zeros((128, 128, 1, 3), np.float16)
  with pytest.raises(common.CheckpointMismatchError) as err:
    tv_convert.load_torchvision_resnet(sd, arch="resnet50")
  msg = str(err.value)
  for name in ("layer3.2.bn1.running_var", "fc.bias", "layer5.0.conv1.weight", "layer2.1.conv2.weight"):
    assert name in msg
  assert "missing (2)" in msg and "unexpected (1)" in msg and "mis-shaped (1)" in msg


def test_torchvision_cli_reports_wrong_arch(golden_dir, tmp_path):
  # The 1-block-per-stage golden is not a ResNet-50: the CLI must refuse, naming the missing blocks.
  src = golden_dir / "torchvision_resnet_bottleneck_1111.npz"
  with pytest.raises(common.CheckpointMismatchError, match="layer1.1.conv1.weight"):
    tv_convert.main([str(src), str(tmp_path / "out.msgpack"), "--num-classes", "10"])
  assert not (tmp_path / "out.msgpack").exists()
  # AugMix / DeepAugment release files are named checkpoint.pth.tar: read as torch files, not "unknown format".
  with pytest.raises(FileNotFoundError, match="checkpoint.pth.tar"):
    tv_convert.main([str(tmp_path / "checkpoint.pth.tar"), str(tmp_path / "out.msgpack")])


def _tiny_deit_kw(golden_dir):
  cfg = json.loads((golden_dir / "timm_deit3_tiny.json").read_text())
  assert "embed_dim=64, depth=2, num_heads=2" in cfg["builder"]
  return dict(num_classes=10, img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, mean=None,
              std=None)


@pytest.mark.parametrize("naming", ["timm", "deit_repo"])
def test_deit3_tiny_golden_parity(golden_dir, naming):
  sd, x, out = _params(golden_dir / "timm_deit3_tiny.npz")
  if naming == "deit_repo":  # facebookresearch/deit models_v2 naming, wrapped as the released .pth is
    sd = {"model": {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
                    for k, v in sd.items()}}
    assert any("gamma_1" in k for k in sd["model"])
  kw = _tiny_deit_kw(golden_dir)
  module, variables = timm_convert.load_deit(sd, **kw)
  _assert_logits_close(module.apply(variables, _nhwc(x)), out)


def test_deit3_base_full_key_list_both_namings(golden_dir):
  spec = json.loads((golden_dir / "timm_deit3_base_patch16_224_shapes.json").read_text())["shapes"]
  module = timm_convert.vit_module("deit3_base_patch16_224", 1000)
  assert module == get_classifier("vit_b16", 1000)
  expected = tv_convert.expected_torch_shapes(module, (1, 224, 224, 3))
  assert expected == {k: tuple(s) for k, s in spec.items()}
  common.check_keys(expected, timm_convert.deit_to_timm_names(_shape_only(spec)), "deit3 timm")
  deit_names = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): s
                for k, s in spec.items()}
  common.check_keys(expected, timm_convert.deit_to_timm_names(_shape_only(deit_names)), "deit3 repo")
  # A corrupted ViT checkpoint lists every problem too.
  bad = _shape_only(spec)
  del bad["blocks.11.ls2.gamma"]
  bad["pos_embed"] = np.zeros((1, 197, 768), np.float16)  # embed-class layout: not DeiT-III
  bad["head_dist.weight"] = np.zeros((1000, 768), np.float16)
  with pytest.raises(common.CheckpointMismatchError) as err:
    common.check_keys(expected, timm_convert.deit_to_timm_names(bad), "deit3")
  for name in ("blocks.11.ls2.gamma", "pos_embed", "head_dist.weight"):
    assert name in str(err.value)


def test_stage1_pos_embed_resized_as_deit_finetune(golden_dir):
  """Stage-1 weights on another patch grid (DeiT-III: ViT-B at 192 -> fine-tuned at 224): pos_embed is
  resized as DeiT's --finetune does, F.interpolate(bicubic, align_corners=False); without the flag the grid
  mismatch is an error. Reference values: PyTorch's output for arange(16) 4x4 -> 8x8 (first three rows, as
  quoted by candle's PyTorch-comparison test)."""
  torch_rows = [[-0.52734375, -0.23046875, 0.24609375, 0.875, 1.28125, 1.9101563, 2.3867188, 2.6835938],
                [0.66015625, 0.95703125, 1.4335938, 2.0625, 2.46875, 3.0976563, 3.5742188, 3.8710938],
                [2.5664063, 2.8632813, 3.3398438, 3.96875, 4.375, 5.0039063, 5.4804688, 5.7773438]]
  grid = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
  np.testing.assert_allclose(timm_convert.bicubic_resize_grid(grid, 8)[:3, :, 0], torch_rows, rtol=1e-6)
  np.testing.assert_array_equal(timm_convert.bicubic_resize_grid(grid, 4), grid)  # same size: identity
  sd, _, _ = _params(golden_dir / "timm_deit3_tiny.npz")  # 64 px / 16: a 4 x 4 grid
  kw = {**_tiny_deit_kw(golden_dir), "img_size": 96}  # 6 x 6
  with pytest.raises(common.CheckpointMismatchError, match="pos_embed"):
    timm_convert.load_deit(sd, **kw)
  _, variables = timm_convert.load_deit(sd, resize_pos_embed=True, **kw)
  pos = np.asarray(sd["pos_embed"], np.float32)
  expect = timm_convert.bicubic_resize_grid(pos[0].reshape(4, 4, -1), 6).reshape(1, 36, -1)
  np.testing.assert_array_equal(variables["params"]["pos_embed"], expect)
  with pytest.raises(ValueError, match="square"):
    timm_convert.interpolate_pos_embed({"pos_embed": np.zeros((1, 15, 8))}, 36)


def test_deit_mixed_namings_rejected():
  with pytest.raises(common.CheckpointMismatchError, match="both DeiT and timm"):
    timm_convert.deit_to_timm_names({"blocks.0.gamma_1": np.zeros(3), "blocks.0.ls1.gamma": np.zeros(3)})


def _f32_views(shapes):
  # Zero-stride float32 views: the loaders' float32 cast and transposes keep them views (no 350 MB alloc).
  return {k: np.broadcast_to(np.zeros((), np.float32), tuple(s)) for k, s in shapes.items()}


def test_full_size_key_lists_convert_through_the_loaders(golden_dir):
  """The real loaders (not only check_keys) on full-size ResNet-50 / DeiT-III-B state dicts: every key
  consumed, every module variable filled, with the module's own shapes (nothing missing or left over)."""
  from flax import traverse_util
  spec = json.loads((golden_dir / "torchvision_resnet50_shapes.json").read_text())["shapes"]
  module, variables = tv_convert.load_torchvision_resnet(_f32_views(spec), arch="resnet50")
  flat = {p: tuple(a.shape) for p, a in traverse_util.flatten_dict(variables).items()}
  assert flat == tv_convert.variable_shapes(module, (1, 64, 64, 3))
  used = {tv_convert.torch_key(p) for p in flat}
  assert used == {k for k in spec if not k.endswith("num_batches_tracked")}  # no key left over
  assert sum(int(np.prod(s)) for p, s in flat.items() if p[0] == "params") == 25_557_032  # torchvision R50
  spec = json.loads((golden_dir / "timm_deit3_base_patch16_224_shapes.json").read_text())["shapes"]
  deit_names = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): s
                for k, s in spec.items()}
  for naming, shapes in (("timm", spec), ("deit_repo", deit_names)):
    module, variables = timm_convert.load_deit({"model": _f32_views(shapes)})
    flat = {p: tuple(a.shape) for p, a in traverse_util.flatten_dict(variables).items()}
    assert flat == tv_convert.variable_shapes(module, (1, 224, 224, 3)), naming
    assert {tv_convert.torch_key(p) for p in flat} == set(spec), naming
    assert sum(int(np.prod(s)) for s in flat.values()) == 86_585_320, naming  # timm deit3_base_patch16_224
