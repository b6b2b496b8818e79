"""Seq-DeepFake, facial_components: `--config configs/seqcomp.py` (paper recipe),
`configs/seqcomp.py:demo` (single images, 72 px: the CPU demo, docs/demo_tuning.md),
`configs/seqcomp.py:demo_triples` (triples, 72 px), `configs/seqcomp.py:demo_single` (single
images, 96 px), or `configs/seqcomp.py:swin_t` (`:swin_s`, `:swin_b`: the Swin backbone at
224 px for 400 epochs, cmil_jax/paper.py apply_swin).

The paper recipe, `:demo_triples` and the Swin variants train on genuine / SBI / fake triples:
`train.batch_size` counts triples, and one epoch is one pass over the training split's genuine
images (train.training_steps)."""

from cmil_jax import config_base
from cmil_jax import paper


def get_config(arg=None):
  if arg in paper.SWIN_BACKBONES:  # :swin_t, :swin_s, :swin_b: the Swin recipe, 400 epochs
    return paper.apply_swin(config_base.seq_config("facial_components", None), arg)
  return config_base.seq_config("facial_components", arg)
