"""The pure core imports neither flax, orbax, grain, tensorflow_datasets nor config libraries."""

import subprocess
import sys

FORBIDDEN = ("flax", "orbax", "grain", "tensorflow_datasets", "tensorflow", "ml_collections", "optax",
             "torch")


def test_pure_core_imports_nothing_heavy():
  code = (
      "import sys\n"
      "import diffaug_jax.diffusion, diffaug_jax.augment, diffaug_jax.losses, diffaug_jax.sampling, "
      "diffaug_jax.mixing\n"
      f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
      "print(','.join(bad))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "", f"pure core imported: {out.stdout.strip()}"
