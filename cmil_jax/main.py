"""Command line: `python -m cmil_jax.main --config configs/seqattr.py:demo --workdir runs/demo`.

--mode train   trains (resuming when the workdir holds a checkpoint), then tests the best
                              checkpoint of each selection metric.
--mode eval    tests the best checkpoints of an earlier run on the test split.
Every config field can be overridden: --config.train.num_steps=100. How this machine computes
the model (the `runtime` section: ResNet kernels, XLA:CPU options, host memory reuse) is
resolved once at start-up, logged and recorded in <workdir>/config.json.

Several processes (docs/distributed.md): each runs this same command. `jax.distributed` is
initialised when --num_processes (or JAX_NUM_PROCESSES) is above 1, with --coordinator_address
and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID), or automatically under SLURM
(SLURM_NTASKS > 1) and Open MPI.

Exit status: 0 done or preempted (SIGTERM: checkpoint saved), 2 bad input (data, config,
workdir), 3 stopped by non-finite losses.
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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES, or SLURM's)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0..num_processes-1 (default: $JAX_PROCESS_ID)."
)
flags.mark_flags_as_required(["config", "workdir"])


def _flag_or_env(flag, env: str, cast=str):
    if flag.value is not None:
        return flag.value
    return cast(os.environ[env]) if os.environ.get(env) else None


def _maybe_initialize_distributed():
    """Joins a multi-process run when flags, JAX_* variables, SLURM or Open MPI say so."""
    import jax  # pylint: disable=import-outside-toplevel

    num_processes = _flag_or_env(_NUM_PROCESSES, "JAX_NUM_PROCESSES", int)
    launcher = (int(os.environ.get("SLURM_NTASKS", "1")) > 1
                or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if not (num_processes or 1) > 1 and not launcher:
        return
    # CPU processes exchange collectives over gloo (GPUs use NCCL whatever this says).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Unset values are filled in by JAX's SLURM / Open MPI detection.
    jax.distributed.initialize(
        coordinator_address=_flag_or_env(_COORDINATOR, "JAX_COORDINATOR_ADDRESS"),
        num_processes=num_processes,
        process_id=_flag_or_env(_PROCESS_ID, "JAX_PROCESS_ID", int),
    )


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every step at INFO
    cfg = _CONFIG.value
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    # pylint: disable=import-outside-toplevel
    from cmil_jax import config_base
    from cmil_jax import runtime

    try:
        runtime.check(cfg.runtime)
    except config_base.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    runtime.apply_host_memory(cfg)  # before JAX starts its CPU backend
    _maybe_initialize_distributed()
    from cmil_jax import checkpoint
    from cmil_jax import faults
    from cmil_jax import train

    try:
        if _MODE.value == "train":
            train.train_and_evaluate(cfg, workdir)
        else:
            train.evaluate_best(cfg, workdir)
    except (FileNotFoundError, faults.WorkdirError, faults.DataError, config_base.ConfigError,
            checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except faults.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
