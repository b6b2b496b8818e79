"""Seq-DeepFake, facial_components: `--config configs/seqcomp.py` (paper recipe) or `configs/seqcomp.py:demo`
(triples, 72 px) or `configs/seqcomp.py:demo_single` (single images, 96 px)."""

from cmil_jax import config_base


def get_config(arg=None):
  return config_base.seq_config("facial_components", arg)
