"""Command line: `python -m cmil_jax.main --config configs/seqattr.py:demo --workdir runs/demo`.

--mode train   trains (resuming when the workdir holds a checkpoint), then tests the best
                              checkpoint of each selection metric.
--mode eval    tests the best checkpoints of an earlier run on the test split.
Every config field can be overridden: --config.train.num_steps=100.

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
_CPU_ONEDNN = flags.DEFINE_bool(
    "cpu_onednn",
    False,
    "On CPU, add --xla_cpu_experimental_onednn_custom_call=true to XLA_FLAGS. With jaxlib 0.10.2 "
    "it changes nothing: XLA:CPU gives convolutions and matmuls to YNNPACK and compiles the "
    "same program with or without it (train-step CPU time within noise, benchmarks/RESULTS.md); "
    "older jaxlib versions, whose default was Eigen, may gain from it. No effect on GPU. "
    "(cmil_jax's own oneDNN convolutions are --config.model.conv_impl=onednn, the CPU default.)",
)
_HOST_MALLOC = flags.DEFINE_enum(
    "host_malloc",
    "auto",
    ["auto", "keep", "default"],
    "Host memory: 'keep' reuses freed memory instead of mapping fresh pages for every XLA:CPU "
    "step (cmil_jax.host_memory; 20-35% more CPU train-step throughput, "
    "benchmarks/RESULTS.md); 'default' leaves glibc's settings; 'auto' = 'keep' where JAX "
    "runs on the CPU (JAX_PLATFORMS=cpu or no GPU plugin installed).",
)
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

ONEDNN_FLAG = "--xla_cpu_experimental_onednn_custom_call=true"


def _set_xla_flags():
    """Adds the oneDNN flag to XLA_FLAGS; must run before JAX starts its CPU backend."""
    current = os.environ.get("XLA_FLAGS", "")
    if _CPU_ONEDNN.value and "onednn" not in current:
        os.environ["XLA_FLAGS"] = f"{current} {ONEDNN_FLAG}".strip()


def _set_host_malloc():
    """Applies --host_malloc; must run before JAX starts its CPU backend."""
    from cmil_jax import host_memory  # pylint: disable=import-outside-toplevel

    host_memory.apply(_HOST_MALLOC.value)


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
    _set_xla_flags()
    _set_host_malloc()
    _maybe_initialize_distributed()
    # pylint: disable=import-outside-toplevel  (JAX must not start before the lines above)
    from cmil_jax import faults
    from cmil_jax import train
    from cmil_jax.data import sources

    try:
        if _MODE.value == "train":
            train.train_and_evaluate(cfg, workdir)
        else:
            train.evaluate_best(cfg, workdir)
    except (FileNotFoundError, faults.WorkdirError, sources.DataError, train.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except faults.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
