"""Where should AugMix run? Times one AugMix view per image, host (PIL) vs on-device JAX.

  python benchmarks/augmix_placement.py [--sizes 32,224] [--batch 16] [--repeats 3]

Host: `diffaug_jax.data.augmix.augmix` (PIL, per example, what the grain pipeline calls; one core).
Device: `diffaug_jax.augmix.augmix` jitted over a batch on the default jax backend (CPU here unless run on an
accelerator). Prints ms per image for each. The numbers quoted in `diffaug_jax/augmix.py` came from this
script on the CPU backend.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="32,224")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  from diffaug_jax import augmix as device_augmix
  from diffaug_jax.data import augmix as host_augmix
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind})")
  for size in (int(s) for s in args.sizes.split(",")):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, size, size, 3)).astype(np.uint8)
    t0 = time.perf_counter()
    for r in range(args.repeats):
      for img in images:
        host_augmix.augmix(img, rng)
    host_ms = (time.perf_counter() - t0) * 1e3 / (args.repeats * args.batch)

    fn = jax.jit(device_augmix.augmix)
    x = jax.device_put(images)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    fn(key, x).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in range(args.repeats):
      fn(jax.random.fold_in(key, r), x).block_until_ready()
    dev_ms = (time.perf_counter() - t0) * 1e3 / (args.repeats * args.batch)
    print(f"{size}x{size}x3: host PIL {host_ms:.2f} ms/img | device jax {dev_ms:.2f} ms/img "
          f"(batch {args.batch}, compile {compile_s:.1f} s)")


if __name__ == "__main__":
  main()
