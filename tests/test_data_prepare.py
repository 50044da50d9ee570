"""The prepare command: an unknown TFDS name or config is one clear line (no TFDS traceback), before any write."""
import pathlib
import subprocess
import sys

import pytest

from diffaug_jax.data import prepare

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, want", [
    ("cifar10_corrupted/gaussian_noise_9",
     "unknown config 'gaussian_noise_9' of TFDS dataset 'cifar10_corrupted'"),
    ("cifar10_corrupted/gausian_noise_5:1.0.0", "unknown config 'gausian_noise_5'"),
    ("cifar10_corruptd/gaussian_noise_5", "unknown TFDS dataset 'cifar10_corruptd'"),
    ("a/b/c", "cannot parse the TFDS name 'a/b/c'"),
])
def test_unknown_name_or_config_is_one_line(tmp_path, capsys, name, want):
  with pytest.raises(SystemExit) as e:
    prepare.main([name, "--data_dir", str(tmp_path / "tfds")])
  err = capsys.readouterr().err
  assert e.value.code == 2 and want in err and len(err.strip().splitlines()) == 1, err
  if "noise" in name:
    assert "Did you mean: " in err and ("gaussian_noise_5" in err or "cifar10_corrupted," in err), err
  assert not (tmp_path / "tfds").exists()  # nothing written


def test_valid_names_pass_the_check():
  for name in ("cifar10", "cifar10_corrupted/gaussian_noise_5", "cifar10_corrupted/gaussian_noise_5:1.0.0",
               "imagenet2012_corrupted/contrast_3"):
    prepare.check_name(name)


def test_command_line_without_tensorflow(tmp_path):
  """The reported case, run as a command: TFDS's name lookup needs no TensorFlow (not installed here), the
  exit status is non-zero and stderr is one line, not a traceback listing every config."""
  run = subprocess.run([sys.executable, "-m", "diffaug_jax.data.prepare", "cifar10_corrupted/gaussian_noise_9",
                        "--data_dir", str(tmp_path / "d")], cwd=REPO, capture_output=True, text=True)
  lines = run.stderr.strip().splitlines()
  assert run.returncode == 2 and len(lines) == 1, run.stderr
  assert "Traceback" not in run.stderr and "gaussian_noise_9" in lines[0] and "gaussian_noise_5" in lines[0]
