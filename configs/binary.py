"""Binary (real / fake) training on any built dataset: `--config configs/binary.py:DATASET`.

DATASET is a short name, ffpp (= ffpp/c23), celebdf, dfdc, wilddeepfake, or a TFDS name
'<builder>/<config>' as the data_prep builders write it: ffpp/c40, ffpp/c23_Deepfakes-FaceSwap
(a build with --methods), folders/NAME (python -m data_prep.folders --name NAME). Append
',demo' for the demo's small model, image size and schedule (minutes on a CPU):

    python -m data_prep.folders --real REAL --fake FAKE --name mine --data-dir DATA
    python -m cmil_jax.main --config configs/binary.py:folders/mine --workdir runs/mine \
        --config.data.data_dir=DATA

Celeb-DF, DFDC and WildDeepfake have no official val split: their configs validate (and select
the best checkpoint) on the test split; say so when reporting. DFD has a test split only: test
on it with configs/cross_eval.py:dfd. The recipe is configs/ffpp.py's [paper]: one class token,
one class (target = is_fake), no L_Rank, genuine / SBI / fake triples, best checkpoint by AUC.
"""

from cmil_jax import config_base


def get_config(arg=None):
  dataset, demo = config_base.split_variant(arg or "ffpp")
  name, splits = config_base.binary_dataset(dataset)
  if "train" not in splits:
    raise ValueError(f"{name} has no train split (splits: {', '.join(splits)}); test a trained "
                     f"run on it with --config configs/cross_eval.py:{dataset} --mode eval")
  c = config_base.use_splits(config_base.apply_binary(config_base.base_config(), name), splits)
  if demo:
    c = config_base.apply_demo_size(c)
    c.data.triples = True  # binary: genuine / SBI / fake balance is the point
    c.train.batch_size = 12  # triples: 36 images a step, about the plain demo's 32
  return c
