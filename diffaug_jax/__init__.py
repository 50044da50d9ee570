"""DiffAug in JAX: diffuse-and-denoise augmentation for robust classifiers.

Importing the package imports nothing heavy: the pure core (`diffusion`, `augment`, `losses`)
uses jax.numpy only; models, data and checkpoints live in their own sub-modules.
"""

__version__ = "0.1.0"
