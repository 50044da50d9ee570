"""Score model (DDPM, eps prediction, L_simple, linear schedule T=1000) on the embedded digits.

The digits are 8x8, see configs/default.py.

Run:
  python train.py --config configs/score_digits.py --workdir runs/score_digits
This is step 1 of the embedded demo (configs/default.py) on its own. Expected: the DDPM loss falls from ~1
to ~0.05-0.1 within 1500 steps (a few minutes on CPU); one-step denoised digits are recognisable up to t~400.
"""
from diffaug_jax.config_files import check_arg, sibling


def get_config(arg=None):
  """arg: None | "smoke"."""
  check_arg(__file__, arg, (None, "smoke"))
  return sibling(__file__, "default").score_run(arg == "smoke")
