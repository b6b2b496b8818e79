"""Joint training on Seq-FaceComp and FF++ (supplementary Table A2): `--config configs/joint.py`.

    python -m data_prep.seq_deepfake --raw-dir SEQ_RAW --data-dir DATA
    python -m data_prep.videos --dataset ffpp --raw-dir FFPP_RAW --data-dir DATA
    python -m cmil_jax.main --config configs/joint.py --workdir runs/joint \
        --config.data.data_dir=DATA

The model keeps the Seq-DeepFake heads (5 class tokens, 5 classes). Every training batch holds
(1 - data.joint_fraction) Seq-FaceComp triples and data.joint_fraction FF++ triples. FF++ frames
carry no sequence label: they enter with has_seq = 0, which masks L^U, L^V and L_Rank per sample
while L_CLS uses their is_fake (method.md, "Data and training") [ours: masking]. Each val pass also scores
FF++ val (binary metrics, keys `joint_auc`, `joint_video_auc`, ...), and the best checkpoints
are tested on both test splits (one results row per dataset). The FF++ figures `auc`,
`video_auc`, ... are those of the MIL fake probability p(x), which L_CLS trains on the FF++
rows; the class heads, which never see them, are reported beside as `class_auc`, ...
(docs/evaluation.md, "Binary detection").

One epoch is one pass over the genuine Seq-FaceComp training images, of which each batch takes
(1 - data.joint_fraction) x train.batch_size triples (train.training_steps); FF++ wraps around
at its own length.

`configs/joint.py:c40` reads FF++ c40; `configs/joint.py:swin_t` (`:swin_s`, `:swin_b`) trains
the Swin backbone at 224 px for 400 epochs (cmil_jax/paper.py apply_swin). `configs/joint.py:demo`
runs the same recipe on the built-in synthetic data, with synthetic facial_attributes standing
in, binary-only, for FF++.
"""

from cmil_jax import config_base
from cmil_jax import paper


def get_config(arg=None):
  if arg not in (None, "", "c23", "c40", "demo", *paper.SWIN_BACKBONES):
    raise ValueError(f"unknown config variant {arg!r}; expected '', c23, c40, swin_t, swin_s, "
                     "swin_b or demo")
  c = config_base.seq_config("facial_components", None)
  if arg == "demo":
    c = config_base.apply_demo(c)
  if arg in paper.SWIN_BACKBONES:
    c = paper.apply_swin(c, arg)
  c.data.triples = True
  compression = arg if arg in ("c23", "c40") else "c23"
  c.data.joint_name = f"ffpp/{compression}"  # binary dataset mixed into training
  c.data.joint_fraction = 0.5  # share of each training batch taken from it [ours]
  c.eval.select_metrics = "fixed_acc,adaptive_acc"
  if arg == "demo":
    c.data.joint_name = "cmil_synthetic/facial_attributes"
    c.train.batch_size = 12  # triples: 36 images a step, about the plain demo's 32
  return c
