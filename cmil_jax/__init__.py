"""cmil_jax: CMIL (contrastive MIL + multi-label ranking) deepfake detection in JAX/Flax."""

__version__ = "0.1.0"
