"""Fault handling for the training loop: small helpers, each testable on its own.

PreemptionWatcher  SIGTERM -> the loop saves a checkpoint at the next step boundary and exits 0.
                   With several processes, JAX's preemption sync point picks one step for all.
                   With one, an evaluation under way is abandoned between two batches
                   (Preempted) and redone on resume.
SigtermHook        testing hook (train.debug_sigterm_at): SIGTERM to this process during an
                   evaluation, a checkpoint write or the test of the best checkpoints.
NonFiniteMonitor   counts train steps in a row whose loss or gradients were NaN/Inf (the jitted
                   step already skipped their updates) and says when to stop the run.
SkipBadRecords     wraps a training source: a record that cannot be read or is malformed is
                   replaced by the next good one, logged to <workdir>/bad_records*.jsonl, counted.
check_example      validates one decoded record (shapes, dtypes, label values).
check_workdir      fails early, with the path and the reason, when the workdir is not writable.
DataError          what the data readers raise for a record they cannot use.
"""

from __future__ import annotations

import glob
import json
import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

from cmil_jax import config_base
from cmil_jax import disk
from cmil_jax.data.landmarks68 import NUM_LANDMARKS
from cmil_jax.labels import MAX_LEN, NUM_CLASSES

MIN_IMAGE_SIDE = 8


class DataError(ValueError):
    """A record that cannot be read or decoded, or bad input data; the message names the
    dataset, split and index (or the file)."""


# --------------------------------------------------------------------------------------------
# Preemption


class Preempted(Exception):
    """SIGTERM arrived during an evaluation, which was abandoned (PreemptionWatcher.check)."""


class PreemptionWatcher:
    """Tells the loop when to save and stop because the job got SIGTERM (preemption, scancel).

    One process: a Python SIGTERM handler sets a flag, read at each step boundary (no sync)
    and, through `check`, between the batches of an evaluation, so that a long evaluation does
    not outlast the grace period before SIGKILL.
    Several processes: `jax.distributed` installs its own SIGTERM notifier and
    `reached_preemption_sync_point(step)` returns True on every process at the same step, so
    all of them save the same checkpoint even when only one got the signal; an evaluation
    under way runs to its end first (every process must run the same batches).
    Use as a context manager; on exit the previous SIGTERM handler is restored.
    """

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self._requested = False
        self._previous = None  # the handler to put back on exit

    def __enter__(self):
        if not self.multi_process:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm) or signal.SIG_DFL
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._requested = True

    def should_stop(self, step: int) -> bool:
        """True when the run must save at `step` and exit (same answer on every process)."""
        if self.multi_process:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # jax_enable_preemption_service is off
                return False
        return self._requested

    @property
    def requested(self) -> bool:
        """SIGTERM arrived (one process; with several, always False: see should_stop)."""
        return self._requested

    def check(self) -> None:
        """Raises Preempted when SIGTERM arrived (one process; a no-op with several). Called
        between the batches of an evaluation."""
        if self._requested:
            raise Preempted()


class SigtermHook:
    """Testing hook (config field train.debug_sigterm_at): sends this process SIGTERM at
    chosen points, as a preemption would, to test what the loop does then.

    spec: comma-separated points, 'eval:N' (during the evaluation at step N, after its first
    batch), 'save:N' (while the checkpoint of step N is being written: right after its
    asynchronous write started) and 'test' (during the test of the best checkpoints, after
    the first batch). A point fires once, and only in a run that trained that step (for
    'test': that trained any step), so a resumed run that redoes the evaluation of step N does
    not fire it again.
    """

    def __init__(self, spec: str, start_step: int = 0):
        self.points = config_base.parse_sigterm_points(spec)
        self.start_step = start_step
        self.fired = set()

    def __call__(self, point: str, step: int) -> None:
        """Sends SIGTERM if (point, step) is one of the spec's points; `step`: the step being
        evaluated or saved, for 'test' the last step trained."""
        key = (point, None if point == "test" else step)
        if key in self.points and key not in self.fired and step > self.start_step:
            self.fired.add(key)
            os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------------------------
# Non-finite losses


class NonFiniteError(RuntimeError):
    """Too many train steps in a row had a non-finite loss or gradient."""


class NonFiniteMonitor:
    """Counts consecutive skipped (non-finite) steps from the per-step `nonfinite` flags.

    The host sees the flags when it reads the metrics, i.e. every `train.log_every` steps, so
    a run stops up to log_every steps after the limit is reached. Nothing is lost meanwhile:
    skipped steps leave the parameters, BatchNorm statistics and optimizer state unchanged.
    """

    def __init__(self, max_in_a_row: int, streak: int = 0):
        self.max_in_a_row = max_in_a_row  # 0 = never stop
        self.streak = streak  # skipped steps in a row, up to the last flag seen
        self.last_bad_step = None
        self.tripped = False

    def update(self, last_step: int, flags) -> bool:
        """Takes the flags (True = skipped) of steps last_step-len(flags)+1 .. last_step.

        Returns True (stop) once max_in_a_row flags in a row were True, even if finite steps
        followed in the same window; `message` then describes that streak.
        """
        step = last_step - len(flags)
        for bad in flags:
            step += 1
            if not bad:
                if self.tripped:
                    break  # keep the streak that reached the limit for the message
                self.streak = 0
                continue
            self.streak += 1
            self.last_bad_step = step
            self.tripped = self.tripped or 0 < self.max_in_a_row <= self.streak
        return self.tripped

    def message(self, checkpoint_step: int | None) -> str:
        first = self.last_bad_step - self.streak + 1
        kept = (f"the newest checkpoint (step {checkpoint_step}) holds the last good state"
                if checkpoint_step is not None else "no checkpoint was written yet")
        return (
            f"stopping: the loss or its gradients were NaN/Inf in {self.streak} steps in a row "
            f"(steps {first}-{self.last_bad_step}; train.max_nonfinite_steps="
            f"{self.max_in_a_row}). Their updates were skipped and {kept}. Lower train.lr, "
            f"set train.grad_clip, or check the input data."
        )


# --------------------------------------------------------------------------------------------
# Bad records


def check_example(ex: dict, where: str) -> dict:
    """Returns `ex` if it is a well-formed decoded record, else raises DataError naming `where`.

    image uint8 (H,W,3) with H,W >= 8; label integer (5,) with values 0..5, 0 only as
    trailing padding; mask, when present, uint8 (H,W); landmarks, when present, finite (68,2).
    """

    def bad(problem):
        raise DataError(f"{where}: {problem}")

    image = ex.get("image")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        bad(f"image must be a uint8 array, got {getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < MIN_IMAGE_SIDE:
        bad(f"image shape {image.shape}, expected (H,W,3) with H,W >= {MIN_IMAGE_SIDE}")
    label = np.asarray(ex.get("label"))
    if label.shape != (MAX_LEN,):
        bad(f"label shape {label.shape}, expected ({MAX_LEN},)")
    if not (np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.bool_)):
        bad(f"label dtype {label.dtype}, expected integers")
    if label.min() < 0 or label.max() > NUM_CLASSES:
        bad(f"label {label.tolist()} has values outside 0..{NUM_CLASSES}")
    length = int(np.count_nonzero(label))
    if label[:length].min(initial=1) == 0:
        bad(f"label {label.tolist()}: 0 (padding) before a class id")
    mask = ex.get("mask")
    if mask is not None and (np.asarray(mask).shape != image.shape[:2]
                             or np.asarray(mask).dtype != np.uint8):
        bad(f"mask {np.asarray(mask).dtype} {np.asarray(mask).shape}, "
            f"expected uint8 {image.shape[:2]}")
    landmarks = ex.get("landmarks")
    if landmarks is not None:
        landmarks = np.asarray(landmarks)
        if landmarks.shape != (NUM_LANDMARKS, 2) or not np.isfinite(landmarks).all():
            bad(f"landmarks must be finite ({NUM_LANDMARKS},2), got {landmarks.shape}")
    return ex


class SkipBadRecords:
    """Random-access source that replaces bad records by the next good one, and logs them.

    `source[i]` returns record i if it reads and passes `check_example`; otherwise it appends
    {"source", "index", "error"} to `log_path` (one JSON line, also printed) and tries i+1,
    i+2, ... (wrapping), up to `max_consecutive` records. With `strict`, the first bad record
    raises its DataError instead. Other attributes (len, labels(), is_fake(), ...) are the
    wrapped source's. Picklable, so grain worker processes can use it; each worker appends to
    the same log file, which `count_bad_records` reads.
    """

    def __init__(self, source, log_path: str, strict: bool = False, max_consecutive: int = 16):
        self.source = source
        self.log_path = log_path
        self.strict = strict
        self.max_consecutive = max_consecutive

    def __len__(self):
        return len(self.source)

    def __repr__(self):
        return repr(self.source)

    def __getattr__(self, name):
        if name == "source":  # not set yet (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.source, name)

    def __getitem__(self, index):
        n = len(self.source)
        for k in range(min(self.max_consecutive, n)):
            i = (int(index) + k) % n
            try:
                return check_example(self.source[i], f"{self.source!r} record {i}")
            except DataError as e:
                if self.strict:
                    raise
                self._log(i, e)
        raise DataError(
            f"{self.source!r}: records {index} to {i} (wrapping) are all bad; see "
            f"{self.log_path}. Is the dataset corrupt?"
        )

    def _log(self, index: int, error: Exception):
        entry = {"source": repr(self.source), "index": int(index), "error": str(error)}
        print(f"skipping bad record: {error}", flush=True)
        disk.append_line(self.log_path, json.dumps(entry))  # one line, whole or not at all


def bad_records_path(workdir: str) -> str:
    """Log file of skipped records of this process."""
    suffix = f".process{jax.process_index()}" if jax.process_count() > 1 else ""
    return os.path.join(workdir, f"bad_records{suffix}.jsonl")


def count_bad_records(workdir: str) -> int:
    """Distinct records skipped so far, over all bad_records*.jsonl files in `workdir`."""
    seen = set()
    for path in glob.glob(os.path.join(workdir, "bad_records*.jsonl")):
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", errors="replace").splitlines(keepends=True)
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                seen.add((entry["source"], entry["index"]))
            except (ValueError, TypeError, KeyError) as e:
                if number == len(lines) and not line.endswith("\n"):
                    continue  # a last line cut short by a crash: that record is logged again
                raise DataError(f"{path} line {number}: not a bad-record entry (a JSON object "
                                f"with 'source' and 'index'): {line.strip()[:80]!r}") from e
    return len(seen)


# --------------------------------------------------------------------------------------------
# Workdir


class WorkdirError(OSError):
    """The workdir cannot be created or written."""


def check_workdir(workdir: str) -> None:
    """Creates `workdir` and writes a probe file there; WorkdirError naming the path if not."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        if e.errno in disk.DISK_FULL_ERRNOS:
            raise disk.DiskFullError(f"out of disk space writing to --workdir {workdir} "
                                     f"({e.strerror})") from e
        raise WorkdirError(f"cannot write to --workdir {workdir}: {e.strerror or e}") from e
