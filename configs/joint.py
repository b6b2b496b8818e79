"""Joint training on Seq-FaceComp and FF++ (supplementary Table A2): `--config configs/joint.py`.

    python -m data_prep.seq_deepfake --raw-dir SEQ_RAW --data-dir DATA
    python -m data_prep.videos --dataset ffpp --raw-dir FFPP_RAW --data-dir DATA
    python -m cmil_jax.main --config configs/joint.py --workdir runs/joint \
        --config.data.data_dir=DATA

The model keeps the Seq-DeepFake heads (5 class tokens, 5 classes). FF++ frames carry no
sequence label: they enter with has_seq = 0, which masks L^U, L^V and L_Rank per sample while
L_CLS uses their is_fake (method.md section 5) [ours: masking]. Fields under data.joint_* are
the proposed names for the second dataset (read by the training loop once it mixes datasets).
"""

from cmil_jax import config_base


def get_config(arg=None):
  if arg not in (None, "", "c23", "c40"):
    raise ValueError(f"unknown config variant {arg!r}; expected '', c23 or c40")
  c = config_base.seq_config("facial_components", None)
  c.data.triples = True
  c.data.joint_name = f"ffpp/{arg or 'c23'}"  # binary dataset mixed into training
  c.data.joint_fraction = 0.5  # share of each training batch taken from it [ours]
  c.data.joint_eval_split = "val"  # its split evaluated (AUC) next to Seq-FaceComp's val
  c.eval.select_metrics = "fixed_acc,adaptive_acc"
  c.eval.video_auc = True  # proposed: video-level AUC for datasets with video ids
  return c
