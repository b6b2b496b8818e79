"""Cross-dataset test on Celeb-DF v2 of a model trained on FF++ (or jointly):

    python -m data_prep.videos --dataset celebdf --raw-dir RAW --data-dir DATA
    python -m cmil_jax.main --config configs/celebdf_eval.py --workdir runs/ffpp --mode eval \
        --config.data.data_dir=DATA

`--workdir` is the training run: its model and every training override come from
<workdir>/config.json (this config only names the dataset and split to test), so this is the
same as configs/cross_eval.py:celebdf. The variant `:joint` also tests a run of configs/joint.py
on its FF++ test split again. Test metrics (`auc`, `video_auc`, ...) are appended to that run's
metrics.jsonl with split 'test'. Other benchmarks: configs/cross_eval.py.
"""

import importlib.util
import os


def _load(name):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"cmil_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  if arg in (None, "", "ffpp"):
    c = _load("ffpp").get_config("c23")
  elif arg == "joint":
    c = _load("joint").get_config()
  else:
    raise ValueError(f"unknown config variant {arg!r}; expected '' (FF++ run) or 'joint'")
  c.data.name = "celebdf/v2"
  c.data.test_split = "test"
  return c
