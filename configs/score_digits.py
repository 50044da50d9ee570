"""Score model (DDPM, eps prediction, L_simple, linear schedule T=1000) on the embedded digits (8x8, see configs/default.py).

Run:
  python train.py --config configs/score_digits.py --workdir runs/score_digits
This is step 1 of the embedded demo (configs/default.py) on its own. Expected: the DDPM loss falls from ~1
to ~0.05-0.1 within 1500 steps (a few minutes on CPU); one-step denoised digits are recognisable up to t~400.
"""
import importlib.util
import os


def get_config(arg=None):
  """arg: None | "smoke"."""
  spec = importlib.util.spec_from_file_location(
      "_default_cfg", os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.score_run(arg == "smoke")
