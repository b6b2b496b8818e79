"""Command line: `python -m cmil_jax.main --config configs/seqattr.py:demo --workdir runs/demo`.

--mode train   trains (resuming when the workdir holds a checkpoint), then tests the best
                              checkpoint of each selection metric.
--mode eval    tests the best checkpoints of an earlier run on the test split.
Every config field can be overridden: --config.train.num_steps=100.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with a variant: configs/seqattr.py:demo",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to do.")
_CPU_ONEDNN = flags.DEFINE_bool(
    "cpu_onednn",
    True,
    "On CPU, let XLA call oneDNN for convolutions and matmuls (about 1.5x faster train steps "
    "measured on our 2-core CPU; see benchmarks/RESULTS.md). No effect on GPU.",
)
flags.mark_flags_as_required(["config", "workdir"])

ONEDNN_FLAG = "--xla_cpu_experimental_onednn_custom_call=true"


def _set_xla_flags():
    """Adds the oneDNN flag to XLA_FLAGS; must run before JAX starts its CPU backend."""
    current = os.environ.get("XLA_FLAGS", "")
    if _CPU_ONEDNN.value and "onednn" not in current:
        os.environ["XLA_FLAGS"] = f"{current} {ONEDNN_FLAG}".strip()


def _maybe_initialize_distributed():
    """Joins a multi-process run when the launcher says there is more than one process."""
    import jax  # pylint: disable=import-outside-toplevel

    if os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every step at INFO
    cfg = _CONFIG.value
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    _set_xla_flags()
    _maybe_initialize_distributed()
    from cmil_jax import train  # pylint: disable=import-outside-toplevel

    try:
        if _MODE.value == "train":
            train.train_and_evaluate(cfg, workdir)
        else:
            train.evaluate_best(cfg, workdir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
