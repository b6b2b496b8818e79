"""Command line: `python -m cmil_jax.main --config configs/seqattr.py:demo --workdir runs/demo`.

--mode train   trains, then tests the best checkpoint of each selection metric. A workdir that
               holds a checkpoint is resumed; its recorded config (<workdir>/config.json) is
               used when --config is omitted, and a --config that differs from it stops the
               run (exit 2, the fields listed) unless --accept_config_changes (recorded in
               <workdir>/config_changes.jsonl). Runtime, data location, worker and logging
               fields never count as a change (config_base.RESUME_FREE_FIELDS).
--mode eval    tests the best checkpoints of a run on the test split. The model and every
               training override come from <workdir>/config.json; --config is optional and
               only chooses the datasets to test on (cross-dataset evaluation), and
               --config.x=y may set data, eval and runtime fields.
Every config field can be overridden: --config.train.num_steps=100. How this machine computes
the model (the `runtime` section: ResNet kernels, XLA:CPU options, host memory reuse) is
resolved once at start-up, logged and recorded in <workdir>/config.json.

Configs (`--config FILE[:VARIANT]`; docs/datasets.md builds the data each reads):
  configs/seqattr.py     Seq-DeepFake facial_attributes; :demo (synthetic faces, triples,
                         72 px, minutes on a CPU), :demo_single (single images, 96 px)
  configs/seqcomp.py     Seq-DeepFake facial_components; :demo, :demo_single
  configs/ffpp.py        FF++ binary detection; :c23 (default), :c40, :raw, :c23_<methods>
                         (a build with --methods, e.g. :c23_Deepfakes-FaceSwap), :demo
  configs/binary.py      binary training on any built dataset: :ffpp, :celebdf, :dfdc,
                         :wilddeepfake, :folders/NAME, any TFDS name; ',demo' = demo size
  configs/cross_eval.py  cross-dataset test of a trained run (--mode eval): :celebdf, :dfdc,
                         :wilddeepfake, :dfd, :ffpp, :folders/NAME, any TFDS name
  configs/celebdf_eval.py  the Celeb-DF test (same as cross_eval.py:celebdf); :joint
  configs/joint.py       joint Seq-FaceComp + FF++ training; :c40, :demo
  configs/sequences.py   sequence training on your own labelled folders: :NAME,components or
                         :NAME,attributes; ',demo' = demo size

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
    "Config file, optionally with a variant: configs/seqattr.py:demo (the files and their "
    "variants are listed above). Optional with --mode eval, and when resuming a workdir: "
    "<workdir>/config.json is used.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train (or resume), then test; eval: test the best checkpoints "
                          "of the run in --workdir.")
_ACCEPT_CHANGES = flags.DEFINE_bool(
    "accept_config_changes", False,
    "Resume even though --config differs from <workdir>/config.json; the changes are listed in "
    "<workdir>/config_changes.jsonl.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES, or SLURM's)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0..num_processes-1 (default: $JAX_PROCESS_ID)."
)
flags.mark_flags_as_required(["workdir"])


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


def _run_config(workdir: str):
    """The config of this run: --config (with its overrides), or the workdir's recorded config
    where --config is omitted; in --mode eval the recorded config with the datasets of --config
    (config_base.eval_config)."""
    from cmil_jax import config_base  # pylint: disable=import-outside-toplevel

    given = _CONFIG.value if flags.FLAGS["config"].present else None
    recorded_path = os.path.join(workdir, "config.json")
    if given is None and not os.path.isfile(recorded_path):
        raise config_base.ConfigError(
            f"--config is required: {recorded_path} does not exist (it is written when a run "
            "starts training)")
    if _MODE.value == "train":
        return given if given is not None else config_base.load_recorded(recorded_path)
    if not os.path.isfile(recorded_path):  # a run recorded before config.json existed
        return given
    overrides = config_flags.get_override_values(flags.FLAGS["config"]) if given else {}
    return config_base.eval_config(config_base.load_recorded(recorded_path), given, overrides,
                                   where=recorded_path)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every step at INFO
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    # pylint: disable=import-outside-toplevel
    from cmil_jax import config_base
    from cmil_jax import runtime

    try:
        cfg = _run_config(workdir)
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
            train.train_and_evaluate(cfg, workdir, _ACCEPT_CHANGES.value)
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
