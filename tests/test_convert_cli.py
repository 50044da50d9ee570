"""`python -m diffaug_jax.convert`: dispatch, and bad input answered by a message and exit 1, no traceback."""

import numpy as np

from diffaug_jax.convert import __main__ as cli


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
