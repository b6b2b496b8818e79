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
are tested on both test splits (one results row per dataset).

`configs/joint.py:c40` reads FF++ c40. `configs/joint.py:demo` runs the same recipe on the
built-in synthetic data, with synthetic facial_attributes standing in, binary-only, for FF++.
"""

from cmil_jax import config_base


def get_config(arg=None):
  if arg not in (None, "", "c23", "c40", "demo"):
    raise ValueError(f"unknown config variant {arg!r}; expected '', c23, c40 or demo")
  c = config_base.seq_config("facial_components", None)
  if arg == "demo":
    c = config_base.apply_demo(c)
  c.data.triples = True
  c.data.joint_name = f"ffpp/{arg or 'c23'}"  # binary dataset mixed into training
  c.data.joint_fraction = 0.5  # share of each training batch taken from it [ours]
  c.eval.select_metrics = "fixed_acc,adaptive_acc"
  if arg == "demo":
    c.data.joint_name = "cmil_synthetic/facial_attributes"
    c.train.batch_size = 12  # triples: 36 images a step, about the plain demo's 32
  return c
