"""Seq-DeepFake, facial_attributes: `--config configs/seqattr.py` (paper recipe) or `configs/seqattr.py:demo`
(triples, 72 px) or `configs/seqattr.py:demo_single` (single images, 96 px)."""

from cmil_jax import config_base


def get_config(arg=None):
  return config_base.seq_config("facial_attributes", arg)
