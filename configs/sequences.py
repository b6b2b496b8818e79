"""Sequence training (Seq-DeepFake recipe) on your own labelled folders:
`--config configs/sequences.py:NAME,components` or `configs/sequences.py:NAME,attributes`.

    python -m data_prep.folders --real REAL --fake FAKE --sequences labels.csv \
        --subset facial_components --name mine --data-dir DATA
    python -m cmil_jax.main --config configs/sequences.py:mine,components --workdir runs/mine \
        --config.data.data_dir=DATA

NAME is the --name of the build (dataset folders/NAME); the second part is the class vocabulary
of its labels (components: eye, eyebrow, lip, nose, hair; attributes: Bangs, Eyeglasses,
Beard, Smiling, Young). Append ',demo' for the demo's small model and schedule. Training runs on
genuine / SBI / fake triples as configs/seqcomp.py does.
"""

from cmil_jax import config_base

_SUBSETS = {"components": "facial_components", "attributes": "facial_attributes"}


def get_config(arg=None):
  parts = [p.strip() for p in (arg or "").split(",")]
  if len(parts) < 2 or parts[1] not in _SUBSETS or not parts[0]:
    raise ValueError(f"config variant {arg!r}: expected NAME,components or NAME,attributes "
                     "(optionally ',demo'), NAME being the --name of data_prep.folders")
  name, demo = config_base.split_variant(",".join([parts[0]] + parts[2:]))
  c = config_base.seq_config(_SUBSETS[parts[1]], None)  # paper recipe, triples
  c.data.name = f"folders/{name}" if "/" not in name else name
  if demo:
    c = config_base.apply_demo_size(c)
    c.data.triples = True
    c.data.sbi_labels = "masked"
    c.train.batch_size = 12
  return c
