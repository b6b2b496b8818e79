"""FaceForensics++ binary detection: `--config configs/ffpp.py` (c23), `configs/ffpp.py:c40`,
`configs/ffpp.py:raw`, `configs/ffpp.py:c23_Deepfakes-FaceSwap` (the dataset a build with
`--methods Deepfakes,FaceSwap` writes: ffpp/<compression>_<methods joined by '-'>),
`configs/ffpp.py:swin_t` (`:swin_s`, `:swin_b`: c23 with the Swin backbone at 224 px for 400
epochs, cmil_jax/paper.py apply_swin), or `configs/ffpp.py:demo` (binary training on the
built-in synthetic faces).

Build the data first (docs/datasets.md):
    python -m data_prep.videos --dataset ffpp --compression c23 --raw-dir RAW --data-dir DATA
    python -m cmil_jax.main --config configs/ffpp.py --workdir runs/ffpp --config.data.data_dir=DATA
Binary mode [paper]: one class token, one class (target = is_fake), no L_Rank. Training examples
are genuine / SBI pseudo-fake / fake triples (method.md, "Data and training"); one epoch is one
pass over the training frames of genuine videos (train.training_steps). Records are frames of the
official train/val/test videos; with `eval.video_auc` (default) val and test records also get
video-level AUC, EER and AP under the video protocol (config section `video`: 32 frames per
`video_id`, their scores averaged; docs/evaluation.md, "Binary detection").
"""

from cmil_jax import config_base
from cmil_jax import paper


def binary(c, name="ffpp/c23"):
  """Turns a base config into the binary recipe reading TFDS dataset `name`."""
  return config_base.apply_binary(c, name)


def get_config(arg=None):
  arg = arg or "c23"
  if arg in ("raw", "c23", "c40"):
    return binary(config_base.base_config(), f"ffpp/{arg}")
  if arg in paper.SWIN_BACKBONES:
    return paper.apply_swin(binary(config_base.base_config()), arg)
  if arg == "demo":
    c = config_base.apply_demo(binary(config_base.base_config()))
    c.data.triples = True  # binary: genuine / SBI / fake balance is the point
    c.train.batch_size = 12  # triples: 36 images a step, about the plain demo's 32
    return c
  if "_" in arg:  # a build with --methods: <compression>_<Method>-<Method>
    name, _ = config_base.binary_dataset(f"ffpp/{arg}")  # ValueError naming a bad part
    return binary(config_base.base_config(), name)
  raise ValueError(f"unknown config variant {arg!r}; expected raw, c23, c40, "
                   "<compression>_<methods> (e.g. c23_Deepfakes-FaceSwap), swin_t, swin_s, swin_b "
                   "or demo")
