"""Seq-DeepFake, facial_attributes: `--config configs/seqattr.py` (paper recipe) or `configs/seqattr.py:demo`
(= `:demo_triples`: triples, 72 px) or `configs/seqattr.py:demo_single` (single images, 96 px), or
`configs/seqattr.py:swin_t` (`:swin_s`, `:swin_b`: the Swin backbone at 224 px for 400 epochs,
cmil_jax/paper.py apply_swin).

All but `:demo_single` train on genuine / SBI / fake triples: `train.batch_size` counts triples,
and one epoch is one pass over the training split's genuine images (train.training_steps)."""

from cmil_jax import config_base
from cmil_jax import paper


def get_config(arg=None):
  if arg in paper.SWIN_BACKBONES:  # :swin_t, :swin_s, :swin_b: the Swin recipe, 400 epochs
    return paper.apply_swin(config_base.seq_config("facial_attributes", None), arg)
  return config_base.seq_config("facial_attributes", arg)
