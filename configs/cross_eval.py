"""Cross-dataset test of a trained run: `--config configs/cross_eval.py:DATASET --mode eval`.

    python -m data_prep.videos --dataset dfdc --raw-dir RAW --data-dir DATA
    python -m cmil_jax.main --config configs/cross_eval.py:dfdc --workdir runs/ffpp \
        --mode eval --config.data.data_dir=DATA

DATASET: celebdf, dfdc, wilddeepfake, dfd (= dfd/c23), ffpp (= ffpp/c23), or a TFDS name such
as dfd/c40, ffpp/c23_Deepfakes or folders/NAME. `--workdir` is the training run: its model and
every training override come from <workdir>/config.json, so nothing needs repeating; this config
only names the dataset and split to test (its other fields are not used). Every run reports
AUC, EER, AP (and video-level AUC where records carry video ids, under the video protocol:
config section `video`) of its MIL fake probability p(x), and the class heads' beside them as
`class_auc`, ... Results are appended to the run's metrics.jsonl (split 'test', `dataset` = the
TFDS name) and its results.md.
"""

from cmil_jax import config_base


def get_config(arg=None):
  if not arg:
    raise ValueError("name the dataset to test on: configs/cross_eval.py:celebdf (or dfdc, "
                     "wilddeepfake, dfd, ffpp, folders/NAME, any TFDS name)")
  name, splits = config_base.binary_dataset(arg)
  c = config_base.apply_binary(config_base.base_config(), name)
  c.data.test_split = "test" if "test" in splits else splits[-1]
  c.data.joint_name = ""  # the joint dataset of a joint run is not tested again
  return c
