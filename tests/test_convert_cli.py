"""`python -m diffaug_jax.convert`: dispatch, and bad input answered by a message and exit 1, no traceback."""

import json
import os
import sys
import types
import zipfile

import numpy as np
import pytest

from diffaug_jax.convert import __main__ as cli
from diffaug_jax.convert import common
from diffaug_jax.convert import guided_diffusion as gd


def test_unknown_kind_prints_usage(capsys):
  assert cli.main(["caffe", "a", "b"]) == 2
  assert "usage" in capsys.readouterr().err


def test_missing_file_and_mismatch_are_clear_errors(tmp_path, capsys):
  assert cli.main(["torchvision", str(tmp_path / "nope.npz"), str(tmp_path / "out.msgpack")]) == 1
  assert "checkpoint not found" in capsys.readouterr().err
  bad = tmp_path / "bad.npz"
  np.savez(bad, **{"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)})
  assert cli.main(["torchvision", str(bad), str(tmp_path / "out.msgpack"), "--arch", "resnet18"]) == 1
  err = capsys.readouterr().err
  assert "missing" in err and "fc.weight" in err
  assert not (tmp_path / "out.msgpack").exists()


def _gd_args(golden_dir, src, dst, flags=None):
  return ["guided-diffusion", str(src), str(dst), "--flags-json", str(flags or golden_dir / "adm_uncond_tiny.json")]


def test_dst_that_is_the_source_is_refused_and_the_source_kept(golden_dir, tmp_path, capsys):
  # A valid source: without the check the conversion succeeds and the .npz is replaced by msgpack.
  src = tmp_path / "adm.npz"
  src.write_bytes((golden_dir / "adm_uncond_tiny.npz").read_bytes())
  before = src.read_bytes()
  (tmp_path / "link.npz").symlink_to(src)
  os.link(src, tmp_path / "hard.npz")
  for dst in (src, tmp_path / "link.npz", tmp_path / "hard.npz", f"{tmp_path}/./adm.npz"):
    assert cli.main(_gd_args(golden_dir, src, dst)) == 1
    err = capsys.readouterr().err
    assert "is the source checkpoint" in err and os.path.basename(dst) in err, err
  assert cli.main(["torchvision", str(src), str(src), "--arch", "resnet18", "--num-classes", "10"]) == 1
  assert cli.main(["deit", str(src), str(src)]) == 1
  assert capsys.readouterr().err.count("is the source checkpoint") == 2
  assert src.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adm.npz", "hard.npz", "link.npz"]  # no .sha256, .tmp


def test_dst_directory_is_refused_and_a_failed_write_leaves_no_tmp(golden_dir, tmp_path, capsys, monkeypatch):
  out = tmp_path / "out"
  out.mkdir()
  assert cli.main(_gd_args(golden_dir, golden_dir / "adm_uncond_tiny.npz", out)) == 1
  assert "is a directory" in capsys.readouterr().err
  (tmp_path / "afile").write_text("x")
  assert cli.main(_gd_args(golden_dir, golden_dir / "adm_uncond_tiny.npz", tmp_path / "afile" / "m.msgpack")) == 1
  assert "is a file, not a directory" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "out"] and not any(out.iterdir())
  # Any failure while writing (here: the final move) removes the temporary file; an existing DST is kept.
  dst = tmp_path / "m.msgpack"
  dst.write_bytes(b"old")

  def failing_replace(a, b):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(common.os, "replace", failing_replace)
  assert cli.main(_gd_args(golden_dir, golden_dir / "adm_uncond_tiny.npz", dst)) == 1
  assert "No space left" in capsys.readouterr().err
  assert dst.read_bytes() == b"old" and not (tmp_path / "m.msgpack.tmp").exists()


def test_unreadable_sources_name_the_file_and_format(golden_dir, tmp_path, capsys, monkeypatch):
  data = (golden_dir / "adm_uncond_tiny.npz").read_bytes()
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(data[:len(data) // 2])
  assert cli.main(_gd_args(golden_dir, truncated, tmp_path / "a.msgpack")) == 1
  err = capsys.readouterr().err
  assert f"cannot read {truncated} as .npz" in err and "BadZipFile" in err and "Traceback" not in err
  with pytest.raises(ValueError, match="as .npz") as e:
    common.load_state_dict(truncated)
  assert isinstance(e.value.__cause__, zipfile.BadZipFile)
  single = tmp_path / "single.npz"
  np.save(tmp_path / "single.npy", np.ones(3))
  (tmp_path / "single.npy").rename(single)
  with pytest.raises(ValueError, match=r"single\.npz as \.npz.*single \.npy array"):
    common.load_state_dict(single)
  safetensors = pytest.importorskip("safetensors")
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
  assert cli.main(["torchvision", str(bad), str(tmp_path / "b.msgpack")]) == 1
  assert f"cannot read {bad} as .safetensors" in capsys.readouterr().err
  with pytest.raises(ValueError, match="as .safetensors") as e:
    common.load_state_dict(bad)
  assert isinstance(e.value.__cause__, safetensors.SafetensorError)
  # torch's own errors for a broken .pt (RuntimeError: not a zip archive) get the same treatment.
  def broken_load(path, **kw):
    raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
  monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=broken_load))
  pt = tmp_path / "model.pt"
  pt.write_bytes(b"PK\x03\x04")
  assert cli.main(["deit", str(pt), str(tmp_path / "c.msgpack")]) == 1
  err = capsys.readouterr().err
  assert f"cannot read {pt} as a PyTorch file" in err and "central directory" in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "model.pt", "single.npz", "truncated.npz"]


def test_non_msgpack_params_file_names_the_file(golden_dir, tmp_path):
  fake = tmp_path / "adm.msgpack"  # an .npz saved under the converted file's name
  fake.write_bytes((golden_dir / "adm_uncond_tiny.npz").read_bytes())
  flags = json.loads((golden_dir / "adm_uncond_tiny.json").read_text())
  for load in (lambda: common.load_params(fake), lambda: gd.load_guided_diffusion(fake, **flags)):
    with pytest.raises(ValueError, match=r"adm\.msgpack is not a flax msgpack .*python -m diffaug_jax\.convert"):
      load()
  # Valid msgpack that is not a variables tree: named too, not a KeyError / AttributeError.
  from flax import serialization
  fake.write_bytes(serialization.msgpack_serialize([1, 2]))
  with pytest.raises(ValueError, match=r"adm\.msgpack is not a flax msgpack .*list"):
    common.load_params(fake)
  fake.write_bytes(serialization.msgpack_serialize({"weights": {"w": np.ones(2)}}))
  with pytest.raises(ValueError, match=r"adm\.msgpack has no 'params' tree"):
    gd.load_guided_diffusion(fake, **flags)


def test_flags_json_that_is_not_json_names_the_file(golden_dir, tmp_path, capsys):
  flags = tmp_path / "flags.json"
  flags.write_text("image_size: 32\n")  # YAML, not JSON
  out = tmp_path / "a.msgpack"
  assert cli.main(_gd_args(golden_dir, golden_dir / "adm_uncond_tiny.npz", out, flags)) == 1
  err = capsys.readouterr().err
  assert f"flags file {flags} is not valid JSON" in err
  flags.write_text("[1, 2]")
  assert cli.main(_gd_args(golden_dir, golden_dir / "adm_uncond_tiny.npz", out, flags)) == 1
  assert f"flags file {flags} holds a JSON list" in capsys.readouterr().err
  assert not out.exists()
