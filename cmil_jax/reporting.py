"""What a run writes and prints as it goes: metrics.jsonl records (and the same scalars as
TensorBoard event files), the window of per-step train metrics between two records, progress
bars and messages (process 0 only)."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np

from cmil_jax import checkpoint


TENSORBOARD_DIR = "tensorboard"


def tensorboard_tag(split: str, name: str, **extra) -> str:
    """The TensorBoard tag of one metrics.jsonl scalar: '<split>/<name>' ('train/loss',
    'val/auc'); a record with extra fields (test records: checkpoint, dataset) puts their
    values between, '/' in them replaced by '_': 'test/best_fixed_acc/cmil_synthetic_x/auc'."""
    parts = [split, *(str(v).replace("/", "_") for v in extra.values()), name]
    return "/".join(parts)


class TensorBoardWriter:
    """Scalars and images as TensorBoard event files in <workdir>/tensorboard (process 0 only),
    written with tensorboardX (no TensorFlow needed); opened on the first write, flushed after
    each one. ``purge_step``: after a resume, TensorBoard discards the events of earlier files
    at and after this step (the steps that are trained again)."""

    def __init__(self, workdir: str):
        self.logdir = os.path.join(workdir, TENSORBOARD_DIR)
        self.purge_step: int | None = None
        self._writer = None
        self._failed = False

    def _open(self):
        if self._writer is None and not self._failed:
            try:
                import tensorboardX  # pylint: disable=import-outside-toplevel
            except ImportError:
                self._failed = True
                log("TensorBoard event files not written: tensorboardX is not installed "
                    "(pip install tensorboardX, or set --config.train.tensorboard=False)")
                return None
            self._writer = tensorboardX.SummaryWriter(self.logdir, purge_step=self.purge_step,
                                                      flush_secs=30)
        return self._writer

    def scalars(self, step: int, split: str, values: dict, **extra) -> None:
        if not checkpoint.is_primary() or (writer := self._open()) is None:
            return
        for k, v in values.items():
            v = float(v)
            if math.isfinite(v):
                writer.add_scalar(tensorboard_tag(split, k, **extra), v, int(step))
        writer.flush()

    def images(self, step: int, tag: str, images) -> None:
        """(N, H, W, 3) uint8 RGB images under one tag."""
        if not checkpoint.is_primary() or (writer := self._open()) is None:
            return
        writer.add_images(tag, np.asarray(images, np.uint8), int(step), dataformats="NHWC")
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
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
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        return len(lines) - len(kept)

    def last_train_step(self) -> int:
        """The highest step of a 'train' record in metrics.jsonl (0 when there is none)."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            steps = [r["step"] for r in map(json.loads, filter(str.strip, f))
                     if r.get("split") == "train"]
        return max(steps, default=0)


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
