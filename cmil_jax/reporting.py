"""What a run writes and prints as it goes: metrics.jsonl records, the window of per-step train
metrics between two records, progress bars and messages (process 0 only)."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np

from cmil_jax import checkpoint


class MetricWriter:
    """Appends one JSON object per event to <workdir>/metrics.jsonl (process 0 only)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")

    def write(self, step: int, split: str, values: dict, **extra) -> None:
        if not checkpoint.is_primary():
            return
        record = {"step": int(step), "split": split, **extra}
        for k, v in values.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else None  # JSON has no NaN
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> int:
        """Removes records of steps after `step` (re-run after a resume); returns how many."""
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
