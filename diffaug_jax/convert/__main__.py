"""`python -m diffaug_jax.convert KIND SRC DST [options]` — see each converter's `main` for options."""

import importlib
import sys

CONVERTERS = {
    "guided-diffusion": "diffaug_jax.convert.guided_diffusion",
    "torchvision": "diffaug_jax.convert.torchvision",
    "deit": "diffaug_jax.convert.timm",
}


def main(argv: list[str]) -> int:
  if not argv or argv[0] not in CONVERTERS:
    print(f"usage: python -m diffaug_jax.convert {{{'|'.join(CONVERTERS)}}} SRC DST [options]",
          file=sys.stderr)
    return 2
  module = importlib.import_module(CONVERTERS[argv[0]])
  try:
    return module.main(argv[1:]) or 0
  # Bad input (a missing, corrupt or unwritable file, a mismatching checkpoint): a clear message, not a traceback.
  except (ValueError, OSError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
