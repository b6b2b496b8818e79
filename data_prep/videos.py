"""Binary video benchmarks -> TFDS ArrayRecord datasets of face crops from sampled frames.

    python -m data_prep.videos --dataset ffpp --raw-dir RAW --data-dir OUT [--compression c23]
    python -m data_prep.videos --dataset celebdf|dfdc|wilddeepfake|dfd --raw-dir RAW --data-dir OUT

For every video listed by the benchmark's official split files, N frames (--frames, evenly
spaced) are decoded with OpenCV, the largest face is detected, cropped as a square with a
margin (--margin, a fraction of the box side on each side), resized (--image-size) and stored
with 68 landmarks, the video id and the fake flag (schema: ``common.video_frame_features``).

  --dataset     name                  splits            official split source
  ffpp          ffpp/<compression>    train, val, test  splits/{train,val,test}.json (pairs)
  celebdf       celebdf/v2            train, test       List_of_testing_videos.txt (1 = real)
  dfdc          dfdc/default          train, test       */metadata.json, labels.csv (test)
  wilddeepfake  wilddeepfake/default  train, test       {real,fake}_{train,test}/ frame folders
  dfd           dfd/<compression>     test              all videos (no official split)

Face detection: ``--detector auto`` uses dlib (the ``landmarks`` extra) when installed, else an
OpenCV Haar cascade when OpenCV ships one; ``--detector haar|yunet --detector-model FILE`` uses
a cascade XML / YuNet ONNX file you have. Landmarks come from dlib's 68-point predictor when the
extra is installed, else from the mean template fitted to the detector's box or key points.

Bad inputs (a listed video that is missing or unreadable, a video in which no sampled frame
shows a face, a malformed split-file line) are skipped, printed with their path and summed up;
a split with more than --max-skipped of its videos skipped fails the build.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from cmil_jax.data import sources
from cmil_jax.labels import MAX_LEN
from data_prep import common, faces
from data_prep import landmarks as lm_lib

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
FFPP_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
FFPP_ALL_METHODS = FFPP_METHODS + ("FaceShifter",)
COMPRESSIONS = ("raw", "c23", "c40")


@dataclasses.dataclass
class Video:
    """One listed video (a file, or a folder of frames)."""

    split: str
    path: str  # absolute
    rel: str  # relative to the raw dir, '/'-separated
    video_id: str
    is_fake: int
    method: str
    is_folder: bool = False


@dataclasses.dataclass
class Plan:
    """What a dataset lists: its config name, videos per split, frame-folder crop padding."""

    config: str
    videos: dict[str, list[Video]]
    pad: float = 0.0
    description: str = ""


def _rel(path: str, raw_dir: str) -> str:
    return os.path.relpath(path, raw_dir).replace(os.sep, "/")


def _find_dir(parent: str, name: str) -> str | None:
    """parent/name, matching name case-insensitively ('Youtube-real' vs 'YouTube-real')."""
    exact = os.path.join(parent, name)
    if os.path.isdir(exact):
        return exact
    if os.path.isdir(parent):
        for entry in os.listdir(parent):
            if entry.lower() == name.lower() and os.path.isdir(os.path.join(parent, entry)):
                return os.path.join(parent, entry)
    return None


def _videos_in(directory: str) -> list[str]:
    """Video files under directory (recursive), sorted."""
    out = []
    for root, _, files in os.walk(directory):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(VIDEO_EXTS)]
    return sorted(out)


def _add(videos, log, raw_dir, split, path, video_id, is_fake, method, where=""):
    """Lists one video; records it as missing when the file is not there, and skips a path
    that resolves outside the raw directory."""
    log.listed(split)
    if not common.inside(path, raw_dir):
        log.skip(split, path, common.OUTSIDE_RAW_DIR,
                 f"{where + ': ' if where else ''}resolves to {os.path.realpath(path)}")
        return
    if not os.path.isfile(path):
        log.skip(split, _rel(path, raw_dir), common.MISSING_VIDEO, where)
        return
    videos[split].append(Video(split, path, _rel(path, raw_dir), video_id, is_fake, method))


# --------------------------------------------------------------------------------------------
# FaceForensics++


def _ffpp_video_dir(raw_dir: str, kind: str, name: str, compression: str) -> str:
    d = os.path.join(raw_dir, kind, name, compression, "videos")
    if not os.path.isdir(d):
        raise common.BuildError(
            f"folder not found: {d} (expected the FaceForensics++ download layout "
            f"{kind}/{name}/<raw|c23|c40>/videos; check --raw-dir and --compression)")
    return d


def _read_pairs(path: str) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise common.BuildError(f"cannot read the FF++ split file {path}: {e}") from e
    if not isinstance(data, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in data):
        raise common.BuildError(f"{path}: expected a JSON list of [target, source] id pairs, "
                                'e.g. [["071", "054"], ...]')
    return [tuple(p) for p in data]


def ffpp_config(compression: str, methods=FFPP_METHODS) -> str:
    """Config name of an FF++ build: the compression ('c23'), followed by the methods when they
    are not the four standard ones ('c23_Deepfakes-FaceSwap'); the dataset is 'ffpp/<this>'."""
    methods = tuple(methods)
    return compression if methods == FFPP_METHODS else f"{compression}_{'-'.join(methods)}"


def parse_ffpp_config(config: str) -> tuple[str, tuple[str, ...]]:
    """(compression, methods) of an FF++ config name (the inverse of ffpp_config); ValueError
    naming what is wrong."""
    compression, _, rest = config.partition("_")
    methods = tuple(rest.split("-")) if rest else FFPP_METHODS
    if compression not in COMPRESSIONS:
        raise ValueError(f"FF++ config {config!r}: compression {compression!r} is not one of "
                         f"{COMPRESSIONS}")
    bad = [m for m in methods if m not in FFPP_ALL_METHODS]
    if bad:
        raise ValueError(f"FF++ config {config!r}: unknown methods {bad}; known: "
                         f"{FFPP_ALL_METHODS}")
    return compression, methods


def list_ffpp(raw_dir: str, log: common.SkipLog, compression: str = "c23",
              methods=FFPP_METHODS, splits_dir: str | None = None) -> Plan:
    """FF++: real 'youtube/<id>' and fake '<method>/<a>_<b>' (both orders) per split pair."""
    if compression not in COMPRESSIONS:
        raise common.BuildError(f"unknown compression {compression!r}; use one of {COMPRESSIONS}")
    bad = [m for m in methods if m not in FFPP_ALL_METHODS]
    if bad:
        raise common.BuildError(f"unknown FF++ methods {bad}; known: {FFPP_ALL_METHODS}")
    candidates = [splits_dir] if splits_dir else [os.path.join(raw_dir, "splits"), raw_dir]
    sdir = next((d for d in candidates if os.path.isfile(os.path.join(d, "train.json"))), None)
    if sdir is None:
        raise common.BuildError(
            f"FF++ split files not found in {' or '.join(candidates)}: put the official "
            "train.json, val.json and test.json (dataset/splits in the FaceForensics "
            "repository) in RAW/splits or pass --splits-dir")
    real_dir = _ffpp_video_dir(raw_dir, "original_sequences", "youtube", compression)
    fake_dirs = {m: _ffpp_video_dir(raw_dir, "manipulated_sequences", m, compression)
                 for m in methods}
    videos = {s: [] for s in sources.SPLITS}
    for split in sources.SPLITS:
        path = os.path.join(sdir, f"{split}.json")
        if not os.path.isfile(path):
            raise common.BuildError(f"FF++ split file not found: {path}")
        pairs = _read_pairs(path)
        ids = sorted({x for p in pairs for x in p})
        for i in ids:
            _add(videos, log, raw_dir, split, os.path.join(real_dir, f"{i}.mp4"),
                 f"youtube/{i}", 0, "youtube", f"{split}.json")
        for m in methods:
            for a, b in pairs:
                for name in (f"{a}_{b}", f"{b}_{a}"):
                    _add(videos, log, raw_dir, split, os.path.join(fake_dirs[m], f"{name}.mp4"),
                         f"{m}/{name}", 1, m, f"{split}.json")
    config = ffpp_config(compression, methods)
    return Plan(config, videos, description=f"FaceForensics++ {compression}, "
                f"methods {', '.join(methods)}")


# --------------------------------------------------------------------------------------------
# Celeb-DF v2

CELEBDF_FOLDERS = {"Celeb-real": 0, "YouTube-real": 0, "Celeb-synthesis": 1}


def list_celebdf(raw_dir: str, log: common.SkipLog) -> Plan:
    """Celeb-DF v2: test = List_of_testing_videos.txt ('1' real / '0' fake), train = the rest."""
    list_path = os.path.join(raw_dir, "List_of_testing_videos.txt")
    if not os.path.isfile(list_path):
        raise common.BuildError(f"Celeb-DF test list not found: {list_path} (it ships with "
                                "Celeb-DF v2 as List_of_testing_videos.txt)")
    folders = {}
    for name, fake in CELEBDF_FOLDERS.items():
        d = _find_dir(raw_dir, name)
        if d is None:
            raise common.BuildError(f"Celeb-DF folder {name} not found in {raw_dir}")
        folders[name.lower()] = (name, d, fake)
    videos = {"train": [], "test": []}
    test_keys = set()
    with open(list_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"List_of_testing_videos.txt:{n}"
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("0", "1"):
            log.listed("test")
            log.skip("test", line.strip(), common.MALFORMED_LABEL,
                     f"{where}: expected '<1 real | 0 fake> <folder>/<video>.mp4'")
            continue
        rel = parts[1].replace("\\", "/")
        folder_key = rel.split("/")[0].lower()
        if folder_key not in folders:
            log.listed("test")
            log.skip("test", rel, common.UNKNOWN_SEQUENCE,
                     f"{where}: folder is not one of {list(CELEBDF_FOLDERS)}")
            continue
        name, d, fake = folders[folder_key]
        stem = os.path.splitext(os.path.basename(rel))[0]
        test_keys.add((folder_key, stem))
        if int(parts[0]) != 1 - fake:
            log.listed("test")
            log.skip("test", rel, common.LABEL_MISMATCH,
                     f"{where}: listed as {'real' if parts[0] == '1' else 'fake'} in {name}")
            continue
        path = os.path.join(d, os.path.basename(rel))
        if not os.path.isfile(path):  # the SBI-style layout keeps the files in <folder>/videos
            path = os.path.join(d, "videos", os.path.basename(rel))
        _add(videos, log, raw_dir, "test", path, f"{name}/{stem}", fake, name, where)
    for folder_key, (name, d, fake) in folders.items():
        for path in _videos_in(d):
            stem = os.path.splitext(os.path.basename(path))[0]
            if (folder_key, stem) in test_keys:
                continue
            _add(videos, log, raw_dir, "train", path, f"{name}/{stem}", fake, name)
    return Plan("v2", videos, description="Celeb-DF v2")


# --------------------------------------------------------------------------------------------
# DFDC


def _fake_flag(value) -> int | None:
    v = str(value).strip().upper()
    return {"1": 1, "0": 0, "FAKE": 1, "REAL": 0, "1.0": 1, "0.0": 0}.get(v)


def list_dfdc(raw_dir: str, log: common.SkipLog) -> Plan:
    """DFDC: test from labels.csv (filename, label 1 = fake) next to its videos (or in
    videos/); train from the training parts' metadata.json files ({name: {label: FAKE|REAL}})."""
    videos = {"train": [], "test": []}
    labels_csv = next((p for p in (os.path.join(raw_dir, "labels.csv"),
                                   os.path.join(raw_dir, "test", "labels.csv"))
                       if os.path.isfile(p)), None)
    metadata = sorted(p for p in
                      [os.path.join(raw_dir, "metadata.json")]
                      + [os.path.join(raw_dir, d, "metadata.json") for d in
                         (os.listdir(raw_dir) if os.path.isdir(raw_dir) else [])]
                      if os.path.isfile(p))
    if labels_csv is None and not metadata:
        raise common.BuildError(f"no DFDC labels found in {raw_dir}: expected labels.csv (test "
                                "set) and/or dfdc_train_part_*/metadata.json (training set)")
    if labels_csv:
        base = os.path.dirname(labels_csv)
        with open(labels_csv, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [h.strip().lower() for h in (reader.fieldnames or [])]
            if "filename" not in fields or "label" not in fields:
                raise common.BuildError(f"{labels_csv}: expected the columns filename, label; "
                                        f"found {reader.fieldnames}")
            for row in reader:
                row = {k.strip().lower(): (v or "") for k, v in row.items() if k}
                where = f"{_rel(labels_csv, raw_dir)}:{reader.line_num}"
                name = row["filename"].strip()
                fake = _fake_flag(row["label"])
                if fake is None or not name:
                    log.listed("test")
                    log.skip("test", name or where, common.MALFORMED_LABEL,
                             f"{where}: label {row['label']!r}")
                    continue
                path = os.path.join(base, "videos", name)
                if not os.path.isfile(path):
                    path = os.path.join(base, name)
                _add(videos, log, raw_dir, "test", path, os.path.splitext(name)[0], fake,
                     "fake" if fake else "real", where)
    for meta in metadata:
        try:
            with open(meta, encoding="utf-8") as f:
                entries = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise common.BuildError(f"cannot read {meta}: {e}") from e
        if not isinstance(entries, dict):
            raise common.BuildError(f"{meta}: expected an object {{video name: {{label: ...}}}}")
        base = os.path.dirname(meta)
        for name, info in sorted(entries.items()):
            fake = _fake_flag(info.get("label")) if isinstance(info, dict) else None
            where = _rel(meta, raw_dir)
            if fake is None:
                log.listed("train")
                log.skip("train", name, common.MALFORMED_LABEL, f"{where}: {info!r}")
                continue
            _add(videos, log, raw_dir, "train", os.path.join(base, name),
                 os.path.splitext(name)[0], fake, "fake" if fake else "real", where)
    return Plan("default", videos, description="DeepFake Detection Challenge")


# --------------------------------------------------------------------------------------------
# WildDeepfake


def list_wilddeepfake(raw_dir: str, log: common.SkipLog) -> Plan:
    """WildDeepfake: every folder holding frame images under {real,fake}_{train,test} (as
    extracted from the release's archives) is one video; frames are face crops already."""
    root = raw_dir
    if not any(os.path.isdir(os.path.join(root, f"{c}_{s}"))
               for c in ("real", "fake") for s in ("train", "test")):
        root = os.path.join(raw_dir, "deepfake_in_the_wild")
    videos = {"train": [], "test": []}
    found = False
    for split in ("train", "test"):
        for cls, fake in (("real", 0), ("fake", 1)):
            top = os.path.join(root, f"{cls}_{split}")
            if not os.path.isdir(top):
                continue
            found = True
            sequences = []
            archives = []
            for d, _, files in os.walk(top):
                if any(f.lower().endswith(faces.IMAGE_EXTS) for f in files):
                    sequences.append(d)
                archives += [os.path.join(d, f) for f in files if f.endswith((".tar.gz", ".tgz",
                                                                             ".tar"))]
            if archives and not sequences:
                raise common.BuildError(f"{top} holds archives but no frame folders: extract "
                                        f"them first (e.g. tar -xzf {archives[0]} -C {top})")
            for d in sorted(sequences):
                rel = _rel(d, raw_dir)
                log.listed(split)
                videos[split].append(Video(split, d, rel, rel, fake, cls, is_folder=True))
    if not found:
        raise common.BuildError(f"no WildDeepfake folders real_train, fake_train, real_test, "
                                f"fake_test in {raw_dir} (or {raw_dir}/deepfake_in_the_wild)")
    return Plan("default", videos, pad=0.25, description="WildDeepfake (face-crop frames)")


# --------------------------------------------------------------------------------------------
# DeepFakeDetection (DFD)


def list_dfd(raw_dir: str, log: common.SkipLog, compression: str = "c23") -> Plan:
    """DFD (distributed with FF++): actors' originals and DeepFakeDetection fakes, all 'test'."""
    real_dir = _ffpp_video_dir(raw_dir, "original_sequences", "actors", compression)
    fake_dir = _ffpp_video_dir(raw_dir, "manipulated_sequences", "DeepFakeDetection",
                               compression)
    videos = {"test": []}
    for d, fake, method in ((real_dir, 0, "actors"), (fake_dir, 1, "DeepFakeDetection")):
        for path in _videos_in(d):
            stem = os.path.splitext(os.path.basename(path))[0]
            _add(videos, log, raw_dir, "test", path, f"{method}/{stem}", fake, method)
    return Plan(compression, videos, description=f"DeepFakeDetection {compression}")


DATASETS: dict[str, Callable[..., Plan]] = {
    "ffpp": list_ffpp, "celebdf": list_celebdf, "dfdc": list_dfdc,
    "wilddeepfake": list_wilddeepfake, "dfd": list_dfd,
}


# --------------------------------------------------------------------------------------------
# The TFDS builder


class VideoFrames(sources.FaceRecordBuilder, skip_registration=True):
    """Face crops of sampled frames of one video benchmark (builder name = the dataset key).

    Records are grouped by video in listing order (no shuffling at write time).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    DISABLE_SHUFFLING = True

    def __init__(self, *, plan: Plan, log: common.SkipLog, task: dict[str, Any],
                 num_workers: int = 0, **kwargs):
        self._plan = plan
        self._log = log
        self._task = task
        self._num_workers = num_workers
        self.stats: dict[str, collections.Counter] = {}
        self.landmark_sources: collections.Counter = collections.Counter()
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description=self._plan.description or self.name,
            features=common.video_frame_features(), disable_shuffling=self.DISABLE_SHUFFLING)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split)
                for split, vids in self._plan.videos.items() if vids}

    def _generate_examples(self, split):
        videos = self._plan.videos[split]
        tasks = [faces.VideoTask(v.path, v.is_folder, pad=self._plan.pad, **self._task)
                 for v in videos]
        stats = self.stats.setdefault(split, collections.Counter())
        label = np.zeros(MAX_LEN, np.int32)
        for video, result in zip(videos, common.imap_ordered(
                faces.process_video, tasks, self._num_workers, chunksize=1)):
            if result[0] == "error":
                self._log.skip(split, video.rel, result[1], result[2])
                continue
            frames, notes = result[1]
            for what, n in notes.items():
                self._log.note(split, what, n)
            stats["real videos" if video.is_fake == 0 else "fake videos"] += 1
            stats["real frames" if video.is_fake == 0 else "fake frames"] += len(frames)
            for fr in frames:
                self.landmark_sources[fr["landmark_source"]] += 1
                key = f"{video.video_id}#{fr['frame_index']:06d}"
                yield key, {
                    "image": fr["image"], "label": label, "landmarks": fr["landmarks"],
                    "mask": b"", "path": f"{video.rel}/{fr['name']}",
                    "video_id": video.video_id, "is_fake": np.int32(video.is_fake),
                    "frame_index": np.int32(fr["frame_index"]), "method": video.method,
                }
        self._log.check(split)


def _make_builder_class(dataset: str):
    """A VideoFrames subclass named after the dataset with its config (TFDS wants one class
    per builder name)."""
    return type(f"VideoFrames_{dataset}", (VideoFrames,), {"name": dataset},
                skip_registration=True)


# --------------------------------------------------------------------------------------------
# Driver


def build(dataset: str, raw_dir: str, data_dir: str, *, frames: int = 32, image_size: int = 256,
          margin: float = 0.25, detector: Any = None, detector_model: str | None = None,
          landmarks: str = "auto", compression: str = "c23", methods=FFPP_METHODS,
          splits_dir: str | None = None, limit: int = 0, max_skipped: float = 0.05,
          num_workers: int = 0, overwrite: bool = False, jpeg_quality: int = 95,
          log: common.SkipLog | None = None) -> str:
    """Builds one benchmark under data_dir; returns the dataset name ('ffpp/c23', ...).

    detector: None or a kind ('auto', 'dlib', 'haar', 'yunet'; with ``detector_model``), or a
    callable ``image -> list[landmarks.Face]`` (picklable when num_workers > 1).
    limit: keep at most this many (usable) videos per split (0 = all), for trial builds.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")
    raw_dir = os.path.abspath(os.path.expanduser(raw_dir))
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.isdir(raw_dir):
        raise common.BuildError(f"raw dir not found: {raw_dir}")
    log = log or common.SkipLog(max_skipped)
    kwargs = {}
    if dataset == "ffpp":
        kwargs = {"compression": compression, "methods": tuple(methods), "splits_dir": splits_dir}
    elif dataset == "dfd":
        kwargs = {"compression": compression}
    plan = DATASETS[dataset](raw_dir, log, **kwargs)
    name = f"{dataset}/{plan.config}"
    existing = common.existing_version_dir(data_dir, name)
    if existing and not overwrite:
        print(f"{name} is already built at {existing}; pass --overwrite to rebuild.", flush=True)
        return name
    if limit > 0:  # trial build: fractions count the kept videos and the skipped ones
        plan.videos = {s: v[:limit] for s, v in plan.videos.items()}
        for s, v in plan.videos.items():
            log.num_listed[s] = len(v) + len(log.skipped_in(s))
    report_dir = common.dataset_dir(data_dir, dataset, plan.config)
    if not any(plan.videos.values()):
        log.write(report_dir, {"ok": False, "stage": "scan"})
        raise common.BuildError(f"no usable video listed for {name} under {raw_dir}:\n"
                                + log.summary())
    try:
        for split in plan.videos:
            log.check(split)
    except common.BuildError:
        log.write(report_dir, {"ok": False, "stage": "scan"})
        print(f"skipped inputs:\n{log.summary()}", flush=True)
        raise

    if callable(detector):
        det_spec, det_name = detector, lm_lib.detector_name(detector)
    else:
        kind = detector or "auto"
        probe = lm_lib.make_detector(kind, detector_model)  # fails early with what to install
        det_spec, det_name = (kind, detector_model), lm_lib.detector_name(probe)
        del probe
    if landmarks == "auto":
        landmarks = "dlib" if lm_lib.dlib_available() else "template"
    elif landmarks == "dlib" and not lm_lib.dlib_available():
        raise common.BuildError("--landmarks dlib needs the landmarks extra: "
                                "pip install -e '.[landmarks]'")
    lm_text = ("dlib 68-point predictor" if landmarks == "dlib" else
               "the detector's 68 points, else the mean template fitted to each face (install "
               "the landmarks extra for per-face landmarks)")
    print(f"{name}: {sum(map(len, plan.videos.values()))} videos; face detector: {det_name}; "
          f"landmarks: {lm_text}", flush=True)
    if common.existing_version_dir(data_dir, name) and overwrite:
        common.remove_existing(data_dir, name)
    task = {"num_frames": frames, "image_size": image_size, "margin": margin,
            "detector": det_spec, "landmarks": landmarks, "jpeg_quality": jpeg_quality}
    builder_cls = _make_builder_class(dataset)
    builder_cls.BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=plan.config,
                                                           description=plan.description)]
    builder = builder_cls(data_dir=data_dir, config=plan.config, file_format="array_record",
                          plan=plan, log=log, task=task, num_workers=num_workers)
    version_dir = common.run_build(builder, log, report_dir, lambda: {
        "raw_dir": raw_dir, "frames_per_video": frames, "image_size": image_size,
        "margin": margin, "detector": det_name, "landmarks": landmarks,
        "landmark_sources": dict(builder.landmark_sources),
        "counts": {s: dict(c) for s, c in builder.stats.items()}})
    for split, c in builder.stats.items():
        print(f"  {split}: {c['real videos']} real / {c['fake videos']} fake videos, "
              f"{c['real frames']} / {c['fake frames']} frames", flush=True)
    print(f"built {name} -> {version_dir}", flush=True)
    return name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.videos",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS),
                   help="benchmark to build (the dataset names it writes: module docstring)")
    p.add_argument("--raw-dir", required=True, help="the benchmark as downloaded and unpacked")
    p.add_argument("--data-dir", required=True, help="TFDS data dir to write into")
    p.add_argument("--frames", type=int, default=32, help="frames sampled per video")
    p.add_argument("--image-size", type=int, default=256, help="stored crop side in pixels")
    p.add_argument("--margin", type=float, default=0.25,
                   help="crop margin on each side, as a fraction of the face box side")
    p.add_argument("--detector", choices=lm_lib.DETECTOR_KINDS, default="auto",
                   help="face detector: auto = dlib (landmarks extra), else OpenCV's Haar cascade")
    p.add_argument("--detector-model", default=None,
                   help="Haar cascade XML (--detector haar) or YuNet ONNX (--detector yunet)")
    p.add_argument("--landmarks", choices=("auto", "dlib", "template"), default="auto",
                   help="auto = dlib when the landmarks extra is installed, else the template")
    p.add_argument("--compression", choices=COMPRESSIONS, default="c23",
                   help="FF++ / DFD quality folder")
    p.add_argument("--methods", default=",".join(FFPP_METHODS),
                   help="FF++ manipulation methods (comma-separated); other than the four "
                        "standard ones the dataset is ffpp/<compression>_<A>-<B>, selected with "
                        "configs/ffpp.py:<compression>_<A>-<B>")
    p.add_argument("--splits-dir", default=None,
                   help="folder of FF++ train/val/test.json (default RAW/splits, then RAW)")
    p.add_argument("--limit", type=int, default=0, help="at most this many videos per split")
    p.add_argument("--max-skipped", type=float, default=common.DEFAULT_MAX_SKIPPED,
                   help="fail when more than this fraction of a split's videos is skipped")
    p.add_argument("--num-workers", type=int, default=common.default_workers(),
                   help="decoding processes (0 or 1 = this process)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of stored crops")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
    args = p.parse_args(argv)
    try:
        build(args.dataset, args.raw_dir, args.data_dir, frames=args.frames,
              image_size=args.image_size, margin=args.margin, detector=args.detector,
              detector_model=args.detector_model, landmarks=args.landmarks,
              compression=args.compression,
              methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
              splits_dir=args.splits_dir, limit=args.limit, max_skipped=args.max_skipped,
              num_workers=args.num_workers, overwrite=args.overwrite,
              jpeg_quality=args.jpeg_quality)
    except (common.BuildError, lm_lib.NoDetectorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
