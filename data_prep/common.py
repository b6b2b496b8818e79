"""Pieces shared by the data_prep builders: bad-data bookkeeping, the video-frame schema, the
TFDS build runner and a process pool. (TensorFlow Datasets is imported lazily, so worker
processes that only decode images do not pay for it.)

Bad inputs never stop a build one at a time and are never dropped silently: each is recorded by
``SkipLog.skip`` with its path and a reason, printed (the first few of each reason), written to
``<data_dir>/<builder>/<config>/prep_skipped.tsv`` and summed up at the end. A split fails the
build when more than ``max_skipped`` (a fraction) of what it lists was skipped; TFDS then
removes the incomplete dataset, so a failed build leaves nothing that training could read.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from cmil_jax import child_processes

# Reasons for skipping an input (one word group each, used as summary keys).
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
MALFORMED_LABEL = "malformed label"
UNKNOWN_SEQUENCE = "unknown sequence name"
LABEL_MISMATCH = "label disagrees with sequence folder"
DUPLICATE = "duplicate entry"
MISSING_VIDEO = "missing video"
UNREADABLE_VIDEO = "unreadable video"
NO_FACE = "no detectable face"
OUTSIDE_RAW_DIR = "path outside the raw directory"

DEFAULT_MAX_SKIPPED = 0.05


def inside(path: str, raw_dir: str) -> bool:
    """Whether `path`, with '..' and symbolic links resolved, lies inside `raw_dir`.

    The builders read only files inside the directory they were pointed at, so an annotation
    file cannot pull other files of the machine into a dataset that may later be shared.
    """
    root = os.path.realpath(raw_dir)
    return os.path.realpath(path).startswith(root.rstrip(os.sep) + os.sep)


class BuildError(RuntimeError):
    """The raw data cannot be turned into a dataset; the message says which file and why."""


@dataclasses.dataclass
class Skipped:
    split: str
    path: str
    reason: str
    detail: str = ""


class SkipLog:
    """Skipped inputs and informational counts of one build, per split.

    ``listed(split, n)`` counts inputs named by the raw data (rows, videos); ``skip`` records
    one that is left out; ``note`` counts things worth knowing that skip nothing (frames without
    a face inside a kept video, template landmarks). ``check(split)`` raises BuildError when the
    skipped fraction of a split exceeds ``max_skipped``.
    """

    def __init__(self, max_skipped: float = DEFAULT_MAX_SKIPPED, print_limit: int = 20,
                 stream=None):
        if not 0.0 <= max_skipped <= 1.0:
            raise ValueError(f"max_skipped must be a fraction in [0, 1], got {max_skipped}")
        self.max_skipped = max_skipped
        self.print_limit = print_limit
        self.stream = stream
        self.num_listed: collections.Counter = collections.Counter()
        self.skipped: list[Skipped] = []
        self.notes: collections.Counter = collections.Counter()  # (split, what) -> n
        self._printed: collections.Counter = collections.Counter()

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def listed(self, split: str, n: int = 1) -> None:
        self.num_listed[split] += n

    def skip(self, split: str, path: str, reason: str, detail: str = "") -> None:
        self.skipped.append(Skipped(split, str(path), reason, detail))
        self._printed[reason] += 1
        if self._printed[reason] <= self.print_limit:
            self._print(f"skipped [{split}] {path}: {reason}" + (f" ({detail})" if detail else ""))
        elif self._printed[reason] == self.print_limit + 1:
            self._print(f"... more inputs skipped for '{reason}' (all listed in the summary "
                        "and in prep_skipped.tsv)")

    def note(self, split: str, what: str, n: int = 1) -> None:
        self.notes[(split, what)] += n

    def skipped_in(self, split: str) -> list[Skipped]:
        return [s for s in self.skipped if s.split == split]

    def fraction(self, split: str) -> float:
        n = self.num_listed[split]
        return len(self.skipped_in(split)) / n if n else 0.0

    def check(self, split: str) -> None:
        """Raises BuildError when more than ``max_skipped`` of ``split`` was skipped."""
        n, k = self.num_listed[split], len(self.skipped_in(split))
        if n and k / n > self.max_skipped:
            reasons = collections.Counter(s.reason for s in self.skipped_in(split))
            raise BuildError(
                f"split {split!r}: {k} of {n} inputs skipped ({100 * k / n:.1f}% > "
                f"--max-skipped {100 * self.max_skipped:g}%): "
                + ", ".join(f"{r}: {c}" for r, c in reasons.most_common())
                + ". Fix the data or raise --max-skipped.")

    def summary(self) -> str:
        """Several lines: per split, what was listed, skipped (by reason) and noted."""
        lines = []
        splits = list(dict.fromkeys(list(self.num_listed) + [s.split for s in self.skipped]))
        for split in splits:
            skipped = self.skipped_in(split)
            lines.append(f"  {split}: {self.num_listed[split]} listed, {len(skipped)} skipped"
                         f" ({100 * self.fraction(split):.2f}%)")
            for reason, c in collections.Counter(s.reason for s in skipped).most_common():
                lines.append(f"    skipped, {reason}: {c}")
            for (sp, what), c in sorted(self.notes.items()):
                if sp == split:
                    lines.append(f"    note, {what}: {c}")
        return "\n".join(lines) if lines else "  nothing listed"

    def to_dict(self) -> dict:
        return {
            "max_skipped": self.max_skipped,
            "listed": dict(self.num_listed),
            "skipped": {split: len(self.skipped_in(split)) for split in self.num_listed},
            "skipped_by_reason": {
                split: dict(collections.Counter(s.reason for s in self.skipped_in(split)))
                for split in self.num_listed},
            "notes": {f"{sp}: {what}": c for (sp, what), c in sorted(self.notes.items())},
        }

    def write(self, directory: str, extra: dict | None = None) -> None:
        """Writes prep_skipped.tsv (split, reason, path, detail) and prep_report.json."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "prep_skipped.tsv"), "w", encoding="utf-8") as f:
            f.write("split\treason\tpath\tdetail\n")
            for s in self.skipped:
                clean = [str(v).replace("\t", " ").replace("\n", " ")
                         for v in (s.split, s.reason, s.path, s.detail)]
                f.write("\t".join(clean) + "\n")
        with open(os.path.join(directory, "prep_report.json"), "w", encoding="utf-8") as f:
            json.dump({**self.to_dict(), **(extra or {})}, f, indent=1, sort_keys=True)


# --------------------------------------------------------------------------------------------
# Video-frame schema


def video_frame_features():
    """FeaturesDict of a face crop taken from a video (or a frame folder).

    The face-record schema (``sources.seq_deepfake_features``: image, label, landmarks, mask,
    path) plus:
      video_id     str    unique id of the source video within the dataset, e.g. 'Deepfakes/000_003'
      is_fake      int32  1 = manipulated video, 0 = genuine
      frame_index  int32  index of the frame in the video (or in the sorted frame folder)
      method       str    manipulation method or source folder ('youtube', 'Deepfakes', ...)
    ``label`` is all zeros (binary benchmarks have no sequence labels) and ``mask`` is empty;
    ``path`` is '<video path relative to the raw dir>/<frame>' where <frame> is the frame's
    file name for frame folders and the zero-padded frame index for video files
    ('original_sequences/youtube/c23/videos/000.mp4/000012'), so the directory of a path
    names its video too.
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    from cmil_jax.data import sources  # pylint: disable=import-outside-toplevel

    feats = dict(sources.seq_deepfake_features())
    feats.update({
        "video_id": tfds.features.Text(doc="source video id"),
        "is_fake": tfds.features.Tensor(shape=(), dtype=np.int32, doc="1 = fake video"),
        "frame_index": tfds.features.Tensor(shape=(), dtype=np.int32, doc="frame in the video"),
        "method": tfds.features.Text(doc="manipulation method or source folder"),
    })
    return tfds.features.FeaturesDict(feats)


# --------------------------------------------------------------------------------------------
# Building


def dataset_dir(data_dir: str, builder_name: str, config_name: str) -> str:
    """<data_dir>/<builder>/<config>: holds the version directory and the prep reports."""
    return os.path.join(os.fspath(data_dir), builder_name, config_name)


def existing_version_dir(data_dir: str, name: str) -> str | None:
    """The complete version directory of dataset ``name`` ('<builder>/<config>'), or None."""
    from cmil_jax.data import sources  # pylint: disable=import-outside-toplevel

    return sources.find_version_dir(os.path.join(os.fspath(data_dir), name))


def run_build(builder, log: SkipLog, report_dir: str, extra_report=None) -> str:
    """``download_and_prepare`` (nothing is downloaded) as ArrayRecord; writes the reports.

    extra_report: a dict, or a callable returning one after the build, added to the report.
    Returns the version directory. Raises BuildError (with the summary printed) on failure;
    TFDS then deletes its incomplete output.
    """
    start = time.time()
    ok = False
    try:
        with tempfile.TemporaryDirectory(prefix="cmil_prep_") as tmp:
            builder.download_and_prepare(download_dir=tmp)
        ok = True
    finally:
        extra = extra_report() if callable(extra_report) else (extra_report or {})
        report = {"seconds": round(time.time() - start, 1), "ok": ok, **extra}
        log.write(report_dir, report)
        print(("build finished" if ok else "build FAILED") + f" in {report['seconds']}s; "
              f"skipped inputs:\n{log.summary()}\n(report: {report_dir}/prep_report.json, "
              f"skipped list: {report_dir}/prep_skipped.tsv)", flush=True)
    return os.fspath(builder.data_dir)


def remove_existing(data_dir: str, name: str) -> None:
    """Deletes every version of dataset ``name`` under data_dir (for --overwrite)."""
    path = os.path.join(os.fspath(data_dir), name)
    if os.path.isdir(path):
        for entry in os.listdir(path):
            full = os.path.join(path, entry)
            if os.path.isdir(full):
                shutil.rmtree(full)


def _worker_init():
    import cv2  # pylint: disable=import-outside-toplevel

    child_processes.exit_with_parent()
    cv2.setNumThreads(1)


def imap_ordered(fn: Callable, items: Iterable, num_workers: int,
                 chunksize: int = 4) -> Iterator:
    """``map(fn, items)`` in order; in ``num_workers`` spawned processes when > 1.

    ``fn`` and the items must be picklable then (module-level functions, plain data).
    """
    if num_workers <= 1:
        yield from map(fn, items)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers, initializer=_worker_init) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))
