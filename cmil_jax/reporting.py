"""What a run writes and prints as it goes: metrics.jsonl records (and the same scalars as
TensorBoard event files), the window of per-step train metrics between two records, progress
bars and messages (process 0 only).

A full disk while writing any of them raises disk.DiskFullError naming the file: a metrics.jsonl
line is written whole or not at all (disk.append_line), TensorBoard events are written and
flushed in the calling thread so that their errors are not lost in a background one."""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time

import jax
import numpy as np

from cmil_jax import checkpoint
from cmil_jax import disk


TENSORBOARD_DIR = "tensorboard"


def tensorboard_tag(split: str, name: str, **extra) -> str:
    """The TensorBoard tag of one metrics.jsonl scalar: '<split>/<name>' ('train/loss',
    'val/auc'); a record with extra fields (test records: checkpoint, dataset) puts their
    values between, '/' in them replaced by '_': 'test/best_fixed_acc/cmil_synthetic_x/auc'."""
    parts = [split, *(str(v).replace("/", "_") for v in extra.values()), name]
    return "/".join(parts)


_EVENT_FILES = itertools.count()  # event files opened by this process: unique file names


class TensorBoardWriter:
    """Scalars and images as TensorBoard event files in <workdir>/tensorboard (process 0 only),
    written with tensorboardX's event writer and summaries (no TensorFlow needed); opened on
    the first write, written and flushed in the calling thread at each one (a full disk raises
    disk.DiskFullError here, rather than ending tensorboardX's writer thread unnoticed).
    ``purge_step``: after a resume, TensorBoard discards the events of earlier files at and
    after this step (the steps that are trained again)."""

    def __init__(self, workdir: str):
        self.logdir = os.path.join(workdir, TENSORBOARD_DIR)
        self.purge_step: int | None = None
        self._writer = None
        self._failed = False

    def _open(self):
        if self._writer is None and not self._failed:
            try:
                # pylint: disable=import-outside-toplevel
                from tensorboardX.event_file_writer import EventsWriter
                from tensorboardX.proto import event_pb2
            except ImportError:
                self._failed = True
                log("TensorBoard event files not written: tensorboardX is not installed "
                    "(pip install tensorboardX, or set --config.train.tensorboard=False)")
                return None
            with disk.writing(f"TensorBoard events in {self.logdir}"):
                os.makedirs(self.logdir, exist_ok=True)
                # <time>.<host>.<pid>.<n>: two files opened in the same second never clash.
                writer = EventsWriter(os.path.join(self.logdir, "events"),
                                      f".{os.getpid()}.{next(_EVENT_FILES)}")
                if self.purge_step is not None:  # what SummaryWriter(purge_step=...) writes
                    writer.write_event(event_pb2.Event(step=int(self.purge_step),
                                                       file_version="brain.Event:2"))
                    writer.write_event(event_pb2.Event(
                        step=int(self.purge_step),
                        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
                writer.flush()
            self._writer = writer
        return self._writer

    def _write(self, step: int, summaries) -> None:
        from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

        if not checkpoint.is_primary() or (writer := self._open()) is None:
            return
        with disk.writing(f"TensorBoard events in {self.logdir}"):
            for summary in summaries:
                writer.write_event(event_pb2.Event(summary=summary, step=int(step),
                                                   wall_time=time.time()))
            writer.flush()

    def scalars(self, step: int, split: str, values: dict, **extra) -> None:
        from tensorboardX.summary import scalar  # pylint: disable=import-outside-toplevel

        self._write(step, [scalar(tensorboard_tag(split, k, **extra), float(v))
                           for k, v in values.items() if math.isfinite(float(v))])

    def images(self, step: int, tag: str, images) -> None:
        """(N, H, W, 3) uint8 RGB images under one tag."""
        from tensorboardX.summary import image  # pylint: disable=import-outside-toplevel

        self._write(step, [image(tag, np.asarray(images, np.uint8), dataformats="NHWC")])

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with disk.writing(f"TensorBoard events in {self.logdir}"):
                writer.close()


class MetricWriter:
    """Appends one JSON object per event to <workdir>/metrics.jsonl and, with ``tensorboard``,
    writes its finite scalars to <workdir>/tensorboard as well (process 0 only)."""

    def __init__(self, workdir: str, tensorboard: bool = False):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard = TensorBoardWriter(workdir) if tensorboard else None

    def write(self, step: int, split: str, values: dict, **extra) -> None:
        if not checkpoint.is_primary():
            return
        record = {"step": int(step), "split": split, **extra}
        for k, v in values.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else None  # JSON has no NaN
        disk.append_line(self.path, json.dumps(record))  # whole, or not at all
        if self.tensorboard is not None:
            self.tensorboard.scalars(step, split, values, **extra)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def drop_after(self, step: int) -> int:
        """Removes records of steps after `step` (re-run after a resume); returns how many.
        TensorBoard's view drops them too (the event files' purge step)."""
        if self.tensorboard is not None:
            self.tensorboard.purge_step = int(step) + 1
        if not checkpoint.is_primary() or not os.path.exists(self.path):
            return 0
        records, partial = self._read()
        kept = [line for line, record in records if record["step"] <= step]
        if len(kept) < len(records) or partial:  # (never append after a partial line)
            disk.write_atomic(self.path, "".join(kept))
        return len(records) - len(kept)

    def last_train_step(self) -> int:
        """The highest step of a 'train' record in metrics.jsonl (0 when there is none)."""
        if not os.path.exists(self.path):
            return 0
        return max((r["step"] for _, r in self._read()[0] if r.get("split") == "train"),
                   default=0)

    def _read(self) -> tuple[list[tuple[str, dict]], bool]:
        """([(line, record)] of metrics.jsonl, whether it ended in a partial line). A partial
        last line (a write cut short by a crash; this writer never leaves one) is left out with
        a warning; any other line that is not a JSON record with a step raises DataError naming
        the file and the line."""
        from cmil_jax import faults  # pylint: disable=import-outside-toplevel

        with open(self.path, "rb") as f:
            lines = f.read().decode("utf-8", errors="replace").splitlines(keepends=True)
        partial = bool(lines) and not lines[-1].endswith("\n")
        if partial:
            log(f"warning: {self.path}: the last line is incomplete (a write cut short); it is "
                f"dropped: {lines[-1][:80]!r}")
            lines.pop()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                int(record["step"])
            except (ValueError, TypeError, KeyError) as e:
                raise faults.DataError(
                    f"{self.path} line {number}: not a metrics record (a JSON object with a "
                    f"'step'): {line.strip()[:80]!r}; fix or remove that line") from e
            records.append((line, record))
        return records, partial


class TrainWindow:
    """Per-step train metrics and the images trained on since the last train record.

    The metrics stay on the device until `summary` or `to_json` reads them: with evaluation
    and checkpoints, the loop's only host syncs. `to_json` goes into checkpoints, so a resumed
    run writes the same means as an uninterrupted one.
    """

    def __init__(self, saved=()):
        self.steps = [{k: np.float32(v) for k, v in m.items()} for m in saved]
        self.images = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Starts timing images_per_sec anew (after an evaluation, which is not training)."""
        self.start = time.perf_counter()

    def append(self, step_metrics: dict, num_images: int) -> None:
        self.steps.append(step_metrics)
        self.images += num_images

    def _on_host(self) -> list[dict]:
        self.steps = [
            {k: np.float32(v) for k, v in m.items()} for m in jax.device_get(self.steps)
        ]
        return self.steps

    def to_json(self) -> list[dict]:
        return [{k: float(v) for k, v in m.items()} for m in self._on_host()]

    def summary(self) -> tuple[dict, list[bool]]:
        """(means over the finite steps, 'nonfinite' count and images_per_sec; per-step
        non-finite flags), then starts a new window."""
        steps, self.steps = self._on_host(), []
        flags = [bool(m["nonfinite"]) for m in steps]
        finite = [m for m, bad in zip(steps, flags) if not bad]
        means = {
            k: np.mean(np.asarray([m[k] for m in finite], np.float32)) if finite else np.nan
            for k in steps[0] if k != "nonfinite"
        }
        means["nonfinite"] = sum(flags)
        means["images_per_sec"] = self.images / (time.perf_counter() - self.start)
        self.images = 0
        self.restart_clock()
        return means, flags


def log(message: str) -> None:
    """Prints on process 0 only (safe beside a tqdm bar)."""
    if checkpoint.is_primary():
        from tqdm import auto as tqdm  # pylint: disable=import-outside-toplevel

        tqdm.tqdm.write(message)
        sys.stdout.flush()


def progress(total, initial):
    """A progress bar on process 0 (disabled elsewhere)."""
    from tqdm import auto as tqdm  # pylint: disable=import-outside-toplevel

    return tqdm.tqdm(
        total=total,
        initial=initial,
        disable=not checkpoint.is_primary(),
        dynamic_ncols=True,
        mininterval=2.0,
    )


def format_metrics(values: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items() if k != "num_images")
