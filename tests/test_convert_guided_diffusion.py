"""guided-diffusion checkpoint conversion: strict key check, the real 256x256 key set, msgpack round trip.

Runtime: ~10 s on one core (the 552M-param 256 model is only traced with jax.eval_shape: nothing allocated).
"""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffaug_jax.convert import common
from diffaug_jax.convert import guided_diffusion as gd
from diffaug_jax.convert.__main__ import main as convert_main
from diffaug_jax.models import unet as unet_lib


def test_256_uncond_key_set_and_param_count(golden_dir):
  spec = json.loads((golden_dir / "adm_256x256_uncond_shapes.json").read_text())
  module = unet_lib.unet_from_flags(**spec["config"])
  preset = unet_lib.unet_from_preset("adm_256_uncond")
  assert module == preset  # the preset is exactly the official create_model config
  # Expected keys derived from the Flax model == the real checkpoint's keys, shapes included.
  expected = gd.expected_torch_shapes(preset)
  shapes = {k: tuple(v) for k, v in spec["shapes"].items()}
  assert set(expected) == set(shapes), (sorted(set(expected) - set(shapes))[:5],
                                        sorted(set(shapes) - set(expected))[:5])
  assert expected == shapes
  # Convert a zeros state dict of exactly these keys/shapes, without allocating it (552M float32 = 2.2 GB).
  state = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  variables = jax.eval_shape(lambda sd: gd.convert_state_dict(preset, sd), state)
  n = unet_lib.count_params(variables)
  assert n == spec["num_params"] == 552_814_086
  # The converted tree is exactly what the module initialises (names, shapes).
  init_shapes = jax.eval_shape(
      lambda: preset.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)))
  assert jax.tree.structure(init_shapes) == jax.tree.structure(variables)
  assert jax.tree.map(lambda a: a.shape, init_shapes) == jax.tree.map(lambda a: a.shape, variables)


def test_wrong_checkpoint_names_all_three_problems(golden_dir):
  flags = json.loads((golden_dir / "adm_uncond_tiny.json").read_text())
  sd = common.load_state_dict(golden_dir / "adm_uncond_tiny.npz")
  sd.pop("input_blocks.1.0.emb_layers.1.bias")  # missing
  sd["middle_block.1.qkv_renamed.weight"] = sd.pop("middle_block.1.qkv.weight")  # renamed: missing + unexpected
  sd["out.2.weight"] = np.zeros((6, 32, 3, 4), np.float32)  # mis-shaped
  with pytest.raises(common.CheckpointMismatchError) as err:
    gd.load_guided_diffusion(sd, **flags)
  msg = str(err.value)
  for key in ("input_blocks.1.0.emb_layers.1.bias", "middle_block.1.qkv.weight",
              "middle_block.1.qkv_renamed.weight", "out.2.weight"):
    assert key in msg, msg
  assert (re.search(r"missing \(2\)", msg) and re.search(r"unexpected \(1\)", msg)
          and re.search(r"mis-shaped \(1\)", msg))
  # Wrong flags against a correct checkpoint fail the same way (not a silent partial load).
  with pytest.raises(common.CheckpointMismatchError, match="label_emb.weight"):
    gd.load_guided_diffusion(golden_dir / "adm_uncond_tiny.npz", **{**flags, "class_cond": True})


def test_layouts_and_key_mapping(golden_dir):
  flags = json.loads((golden_dir / "adm_uncond_tiny.json").read_text())
  sd = common.load_state_dict(golden_dir / "adm_uncond_tiny.npz")
  _, variables = gd.load_guided_diffusion(sd, **flags)
  p = variables["params"]
  np.testing.assert_array_equal(p["input_blocks_1_0"]["in_layers_2"]["kernel"],
                                sd["input_blocks.1.0.in_layers.2.weight"].transpose(2, 3, 1, 0))  # OIHW -> HWIO
  np.testing.assert_array_equal(p["middle_block_1"]["qkv"]["kernel"], sd["middle_block.1.qkv.weight"][:, :, 0].T)
  np.testing.assert_array_equal(p["time_embed_0"]["kernel"], sd["time_embed.0.weight"].T)
  np.testing.assert_array_equal(p["out_0"]["scale"], sd["out.0.weight"])
  assert gd.torch_key(("output_blocks_1_2", "in_layers_0", "scale")) == "output_blocks.1.2.in_layers.0.weight"


def test_cli_round_trip(golden_dir, tmp_path, capsys):
  name = "adm_cond_variant_tiny"
  dst = tmp_path / "adm.msgpack"
  assert convert_main(["guided-diffusion", str(golden_dir / f"{name}.npz"), str(dst),
                       "--flags-json", str(golden_dir / f"{name}.json")]) == 0
  assert "params" in capsys.readouterr().out
  assert (tmp_path / "adm.msgpack.sha256").is_file()
  flags = json.loads((golden_dir / f"{name}.json").read_text())
  _, direct = gd.load_guided_diffusion(golden_dir / f"{name}.npz", **flags)
  reloaded = common.load_params(dst)
  jax.tree.map(np.testing.assert_array_equal, reloaded, direct)
  module, via_path = gd.load_guided_diffusion(dst, **flags)  # converted file reloads through the same entry
  jax.tree.map(np.testing.assert_array_equal, via_path, direct)
  assert module.num_classes == 1000 and module.use_new_attention_order
  # The CLI reports a mismatch (wrong flags) with exit code 1 and the key list on stderr.
  assert convert_main(["guided-diffusion", str(golden_dir / f"{name}.npz"), str(tmp_path / "bad.msgpack"),
                       "--flags-json", "adm_256_uncond"]) == 1
  assert "missing" in capsys.readouterr().err and not (tmp_path / "bad.msgpack").exists()
  # A converted file does not load into a different model.
  with pytest.raises(common.CheckpointMismatchError):
    gd.load_guided_diffusion(dst, **{**flags, "num_channels": 64})
  # Corruption is detected by the checksum.
  data = bytearray(dst.read_bytes())
  data[-1] ^= 1
  dst.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="checksum"):
    gd.load_guided_diffusion(dst, **flags)


def test_safetensors_source(golden_dir, tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  name = "adm_uncond_tiny"
  sd = common.load_state_dict(golden_dir / f"{name}.npz")
  src = tmp_path / "adm.safetensors"
  safetensors_numpy.save_file({f"module.{k}": v for k, v in sd.items()}, str(src))  # DataParallel prefix
  dst = tmp_path / "adm.msgpack"
  assert gd.main([str(src), str(dst), "--flags-json", str(golden_dir / f"{name}.json")]) == 0
  flags = json.loads((golden_dir / f"{name}.json").read_text())
  _, direct = gd.load_guided_diffusion(golden_dir / f"{name}.npz", **flags)
  jax.tree.map(np.testing.assert_array_equal, common.load_params(dst), direct)


def test_flags_from_preset_name():
  assert gd.resolve_flags("adm_256_uncond")["num_head_channels"] == 64
  with pytest.raises(ValueError, match="preset"):
    gd.resolve_flags("no_such_preset")


def test_pt_files_load_with_weights_only(tmp_path, monkeypatch):
  """.pt/.pth go through torch.load(..., weights_only=True) (a stand-in torch records the call); without
  torch the error says how to proceed instead of failing obscurely."""
  import sys
  import types
  src = tmp_path / "model.pt"
  src.write_bytes(b"stand-in")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(ImportError, match=r"model\.pt needs PyTorch"):
    common.load_state_dict(src)
  calls = []

  def fake_load(path, **kw):
    calls.append((path, kw))
    return {"state_dict": {"module.out.2.bias": np.ones(3, np.float32)}}
  monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=fake_load))
  sd = common.load_state_dict(src)
  assert calls and calls[0][0] == str(src) and calls[0][1].get("weights_only") is True
  assert list(sd) == ["out.2.bias"] and sd["out.2.bias"].dtype == np.float32  # unwrapped, prefix stripped
