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
the model (the `runtime` section: ResNet kernels, XLA:CPU options, host memory reuse, and
model.dtype 'auto': bfloat16 on GPU and TPU, float32 on the CPU) is resolved once at start-up,
logged and recorded in <workdir>/config.json. So is where the backbone starts from
(train.init_from: 'imagenet' in the paper configs, 'none' in the demos; cmil_jax/pretrained.py):
named weights are fetched once with huggingface_hub, checked and converted into a cache; when
they cannot be had (offline and not cached, a checksum mismatch) the run stops with exit 2
naming the file, where to put it and the conversion command.

Configs (`--config FILE[:VARIANT]`; docs/datasets.md builds the data each reads):
  configs/seqattr.py     Seq-DeepFake facial_attributes; :demo (synthetic faces, triples,
                         72 px, minutes on a CPU), :demo_single (single images, 96 px)
  configs/seqcomp.py     Seq-DeepFake facial_components; :demo (single images, 72 px),
                         :demo_triples, :demo_single
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

Exit status: 0 done or preempted (SIGTERM: checkpoint saved; during an evaluation it is
abandoned and redone on resume), 2 bad input (data, config or override, workdir, checkpoints;
the message names the file or field), 3 stopped by non-finite losses, 4 out of disk space
(the message names the file; the previous checkpoint and metrics.jsonl are intact: free space
and run the same command to resume).
"""

import os
import re
import sys
import threading
import time

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


def _override_error(argv, error: Exception) -> str:
    """The message for a --config or --config.x=y flag that cannot be parsed: the flag, and
    for a field that does not exist, its full name and the closest existing one."""
    text = str(error)
    if isinstance(error, flags.Error):
        # It names the flag ('flag --config.data.image_size=abc: invalid literal ...'); an
        # error inside the config file comes with its traceback: keep its first and last line.
        lines = [line for line in text.splitlines() if line.strip()]
        if "Traceback (most recent call last):" in text and len(lines) > 1:
            return f"{lines[0]} {lines[-1].strip()}"
        return text
    text = text.replace("\\'", "'").replace("\\n", " ")
    key = re.search(r'instead of "([^"]+)"', text) or re.search(r"(\w+)", text)
    guess = re.search(r'Did you mean "([^"]+)"', text)
    for arg in argv[1:]:
        match = re.match(r"--config\.([^=]+)", arg)
        if key and match and key.group(1) in match.group(1).split("."):
            path = match.group(1)
            hint = ""
            if guess:
                hint = " (did you mean " + ".".join(
                    guess.group(1) if part == key.group(1) else part
                    for part in path.split(".")) + "?)"
            return f"{arg}: config field {path} does not exist{hint}"
    return f"the --config flags cannot be applied: {text}"


def parse_flags(argv):
    """absl's flag parsing, with exit status 2 and a message naming the flag (and the config
    field) instead of exit 1 or a traceback when --config or an override is wrong."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"error: {_override_error(argv, e)}\nPass --helpshort or --helpfull to see help "
              "on flags.", file=sys.stderr)
        sys.exit(2)


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
        config_base.check_values(cfg)  # before anything starts
        runtime.check(cfg.runtime)
    except config_base.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a --config file that could not be loaded (reported on first use)
        print(f"error: cannot load --config: {e}", file=sys.stderr)
        sys.exit(2)
    runtime.apply_host_memory(cfg)  # before JAX starts its CPU backend
    _maybe_initialize_distributed()
    from cmil_jax import train

    try:
        if _MODE.value == "train":
            train.train_and_evaluate(cfg, workdir, _ACCEPT_CHANGES.value)
        else:
            train.evaluate_best(cfg, workdir)
    except Exception as e:  # pylint: disable=broad-except
        status = exit_status(e, workdir)
        if status is None:
            raise
        sys.exit(status)


def _let_background_writes_end(timeout: float = 10.0) -> None:
    """Waits, at most `timeout` seconds, for the threads still writing (the other parts of a
    checkpoint save that ran out of space, which log their own errors as they fail), so that
    the error message is the last thing printed."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))


def exit_status(error: Exception, workdir: str) -> int | None:
    """Prints 'error: ...' for an error the exit statuses of the module docstring cover and
    returns its status; None for any other error (a bug: its traceback is shown)."""
    # pylint: disable=import-outside-toplevel
    from cmil_jax import checkpoint
    from cmil_jax import config_base
    from cmil_jax import disk
    from cmil_jax import faults

    if disk.is_disk_full(error):  # wherever it came from (a library's own write included)
        message = str(error) if isinstance(error, disk.DiskFullError) else (
            f"out of disk space ({(str(error).splitlines() or [''])[0][:300]})")
        _let_background_writes_end()
        directory = os.path.join(workdir, "checkpoints")
        steps = [int(e) for e in os.listdir(directory) if e.isdigit()] if os.path.isdir(
            directory) else []
        then = (f"run the same command again: it resumes from the newest complete checkpoint "
                f"(step {max(steps)})" if steps else
                f"no checkpoint was completed yet, so move {workdir} away (or remove its "
                "metrics.jsonl) and run the same command to start again")
        print(f"error: {message}\nFree some space on the disk of {workdir}; {then}.",
              file=sys.stderr)
        return 4
    if isinstance(error, (FileNotFoundError, faults.WorkdirError, faults.DataError,
                          config_base.ConfigError, checkpoint.CheckpointError)):
        print(f"error: {error}", file=sys.stderr)
        return 2
    if isinstance(error, faults.NonFiniteError):
        print(f"error: {error}", file=sys.stderr)
        return 3
    return None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
