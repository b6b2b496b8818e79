"""Your own data: folders of real and fake images or videos -> TFDS ArrayRecord dataset
``folders/<NAME>``, in the format every config reads.

    python -m data_prep.folders --real REAL_DIR --fake FAKE_DIR --name NAME --data-dir OUT
    python -m data_prep.folders --real REAL_DIR --fake FAKE_DIR --name NAME --data-dir OUT \\
        --sequences labels.csv --subset facial_components

Inputs: every image (.jpg, .jpeg, .png) and video (.mp4, .avi, .mov, .mkv, .webm) under each
--real / --fake folder (recursive; both flags may be repeated). An image is one record; a
video gives --frames evenly spaced frames, one record each, that share its video id (video-level
AUC averages them). --group-images-by-folder makes each folder of images one video instead.

Splits: a folder that holds train/, val/ and/or test/ subfolders gives those splits; otherwise
each video (or image, or image folder with --group-images-by-folder) goes to val or test with
probability --val-fraction / --test-fraction, by a hash of its path (--split-seed), and to train
otherwise, so the split does not change when files are added.

Faces: --faces detect (default) finds the largest face (dlib with the ``landmarks`` extra, else
OpenCV's Haar cascade, or --detector haar|yunet --detector-model FILE), crops it as a square
with --margin and stores --image-size pixels with 68 landmarks; --faces aligned keeps images
that are aligned face crops already (centre square, resized), with dlib's landmarks when the
extra is installed, else the mean template (Seq-DeepFake's alignment). Videos are always
detected.

Sequence labels (optional, --sequences CSV with the columns file_path, label): a label is a
manipulation sequence as in Seq-DeepFake ('[1, 3, 0, 0, 0]', '1 3') or a sequence name
('eye-nose', 'original') of --subset's classes. file_path is relative to --raw-dir (default:
the folder holding the CSV), absolute, or relative to one of the --fake / --real folders. With
--sequences every fake needs a row; reals get the empty sequence.

Bad inputs (unreadable image or video, no detectable face, a fake without a sequence row, a
malformed or contradicting row, a row naming no listed file) are skipped, printed with their
path and reason, summed up and listed in <OUT>/folders/<NAME>/prep_skipped.tsv; a split with
more than --max-skipped of its inputs skipped fails the build. Train with
`configs/binary.py:folders/NAME` (real / fake) or `configs/sequences.py:NAME,components`
(sequences); test a trained run with `configs/cross_eval.py:folders/NAME`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import os
import re
import sys
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from cmil_jax import labels as labels_lib
from cmil_jax.data import sources
from data_prep import common, faces
from data_prep import landmarks as lm_lib
from data_prep import seq_deepfake
from data_prep import videos as videos_lib

BUILDER_NAME = "folders"
NO_SEQUENCE = "fake without a sequence label"
UNLISTED = "sequence row names no listed file"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass
class Item:
    """One listed input: an image or a video file."""

    split: str
    path: str  # absolute
    rel: str  # relative to the raw dir, '/'-separated
    video_id: str
    is_fake: int
    method: str
    is_video: bool
    label: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(labels_lib.MAX_LEN, np.int32))
    frame_index: int = 0


def dataset_name(name: str) -> str:
    """The TFDS name a build with --name NAME writes (what configs select): 'folders/NAME'."""
    return f"{BUILDER_NAME}/{name}"


def _split_of(key: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """'train' | 'val' | 'test' from a stable hash of key (uniform in [0, 1))."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _files(directory: str) -> list[str]:
    exts = faces.IMAGE_EXTS + videos_lib.VIDEO_EXTS
    out = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        out += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(exts)]
    return out


def scan(roots: dict[int, list[str]], raw_dir: str, log: common.SkipLog, *,
         val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0,
         group_images_by_folder: bool = False) -> dict[str, list[Item]]:
    """Items per split of the real (roots[0]) and fake (roots[1]) folders; no decoding."""
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction <= 1):
        raise common.BuildError(f"--val-fraction {val_fraction} and --test-fraction "
                                f"{test_fraction} must be >= 0 and sum to at most 1")
    plan = {s: [] for s in sources.SPLITS}
    seen = {}
    for is_fake, dirs in roots.items():
        kind = "fake" if is_fake else "real"
        for root in dirs:
            root = os.path.abspath(os.path.expanduser(root))
            if not os.path.isdir(root):
                raise common.BuildError(f"--{kind} folder not found: {root}")
            split_dirs = {s: os.path.join(root, s) for s in sources.SPLITS
                          if os.path.isdir(os.path.join(root, s))}
            parts = list(split_dirs.items()) if split_dirs else [(None, root)]
            if split_dirs:
                others = [f for f in _files(root)
                          if not any(f.startswith(d + os.sep) for d in split_dirs.values())]
                if others:
                    log.note("all", f"files of {kind} folder {root} outside its "
                             f"{'/'.join(split_dirs)} subfolders, not read", len(others))
            found = 0
            for fixed_split, top in parts:
                folder_counts = collections.Counter()
                for path in _files(top):
                    found += 1
                    rel = os.path.relpath(path, raw_dir).replace(os.sep, "/")
                    below = os.path.relpath(path, top).replace(os.sep, "/").split("/")
                    method = below[0] if len(below) > 1 else kind
                    is_video = path.lower().endswith(videos_lib.VIDEO_EXTS)
                    stem = os.path.splitext(rel)[0]
                    frame_index = 0
                    video_id = stem
                    if group_images_by_folder and not is_video:
                        video_id = os.path.dirname(rel) or "."
                        frame_index = folder_counts[video_id]
                        folder_counts[video_id] += 1
                    split = fixed_split or _split_of(video_id, val_fraction, test_fraction,
                                                     split_seed)
                    log.listed(split)
                    if path in seen:
                        log.skip(split, rel, common.DUPLICATE,
                                 f"listed under both --real and --fake ({seen[path]})")
                        continue
                    seen[path] = kind
                    plan[split].append(Item(split, path, rel, video_id, is_fake, method,
                                            is_video, frame_index=frame_index))
            if not found:
                raise common.BuildError(f"--{kind} folder {root} holds no image "
                                        f"({', '.join(faces.IMAGE_EXTS)}) or video "
                                        f"({', '.join(videos_lib.VIDEO_EXTS)})")
    return plan


def apply_sequences(plan: dict[str, list[Item]], csv_path: str, subset: str, raw_dir: str,
                    roots: dict[int, list[str]], log: common.SkipLog) -> None:
    """Sets the label of every item named by the CSV; skips fakes without a row (NO_SEQUENCE),
    reals with a non-empty sequence and fakes with an empty one (LABEL_MISMATCH), and rows that
    are malformed or name no listed file (counted under the split 'sequences')."""
    rows = seq_deepfake._read_csv(csv_path)  # pylint: disable=protected-access
    by_path = {os.path.normcase(it.path): it for items in plan.values() for it in items}
    bases = [raw_dir] + [os.path.abspath(d) for ds in (roots[1], roots[0]) for d in ds]
    csv_rel = os.path.basename(csv_path)
    labelled = {}
    for line, file_path, label_text in rows:
        where = f"{csv_rel}:{line}"
        log.listed("sequences")
        shown = file_path.strip() or f"<empty file_path at {where}>"
        try:
            label = seq_deepfake.parse_label(label_text)
        except ValueError as label_error:
            try:
                seq = seq_deepfake.parse_sequence_name(label_text, subset)
            except ValueError as name_error:
                log.skip("sequences", shown, common.MALFORMED_LABEL,
                         f"{where}: {label_text!r}: {label_error}; nor a sequence name: "
                         f"{name_error}")
                continue
            label = np.zeros(labels_lib.MAX_LEN, np.int32)
            label[:len(seq)] = seq
        p = file_path.strip()
        candidates = [p] if os.path.isabs(p) else [os.path.join(b, p) for b in bases]
        item = next((by_path[k] for k in (os.path.normcase(os.path.abspath(c))
                                          for c in candidates) if k in by_path), None)
        if item is None:
            log.skip("sequences", shown, UNLISTED,
                     f"{where}: no image or video of the --real / --fake folders at "
                     f"{' or '.join(candidates)}")
            continue
        if item.path in labelled:
            log.skip("sequences", shown, common.DUPLICATE, f"{where}: labelled at "
                     f"{labelled[item.path]} before")
            continue
        labelled[item.path] = where
        item.label = label
    for split, items in plan.items():
        kept = []
        for it in items:
            has_seq = bool(it.label.any())
            if it.is_fake and it.path not in labelled:
                log.skip(split, it.rel, NO_SEQUENCE, f"no row in {csv_rel}")
            elif it.is_fake != has_seq:
                name = labels_lib.sequence_name(it.label, subset)
                log.skip(split, it.rel, common.LABEL_MISMATCH,
                         f"{labelled[it.path]}: sequence {name!r} for a "
                         f"{'fake' if it.is_fake else 'real'} input")
            else:
                kept.append(it)
        plan[split] = kept


# --------------------------------------------------------------------------------------------
# Per-item work (module level: runs in worker processes)


def process(task):
    """(kind, faces task) -> a data_prep.faces result; kind 'image' | 'aligned' | 'video'."""
    kind, t = task
    if kind == "video":
        return faces.process_video(t)
    if kind == "aligned":
        return faces.process_aligned_image(t)
    return faces.process_image(t)


class FolderFaces(sources.FaceRecordBuilder, skip_registration=True):
    """Face records of the images and video frames of user folders (schema:
    ``common.video_frame_features``, with the sequence label when one was given)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    DISABLE_SHUFFLING = True

    def __init__(self, *, plan: dict, log: common.SkipLog, task: dict[str, Any],
                 faces_mode: str = "detect", num_workers: int = 0, **kwargs):
        self._plan = plan
        self._log = log
        self._task = task
        self._faces_mode = faces_mode
        self._num_workers = num_workers
        self.stats: dict[str, collections.Counter] = {}
        self.landmark_sources: collections.Counter = collections.Counter()
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description="Face crops of user folders",
                                     features=common.video_frame_features(),
                                     disable_shuffling=self.DISABLE_SHUFFLING)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {s: self._generate_examples(s) for s in sources.SPLITS if self._plan.get(s)}

    def _tasks(self, items):
        t = self._task
        for it in items:
            if it.is_video:
                yield ("video", faces.VideoTask(it.path, False, **t))
            elif self._faces_mode == "aligned":
                yield ("aligned", faces.AlignedImageTask(
                    it.path, t["image_size"], "dlib" if t["landmarks"] == "dlib" else "template",
                    None, t["jpeg_quality"]))
            else:
                yield ("image", faces.ImageTask(
                    it.path, t["image_size"], t["margin"], t["detector"], t["landmarks"],
                    t["pad"], jpeg_quality=t["jpeg_quality"]))

    def _generate_examples(self, split):
        items = self._plan[split]
        stats = self.stats.setdefault(split, collections.Counter())
        for it, result in zip(items, common.imap_ordered(
                process, list(self._tasks(items)), self._num_workers, chunksize=4)):
            if result[0] == "error":
                self._log.skip(split, it.rel, result[1], result[2])
                continue
            if it.is_video:
                frames, notes = result[1]
                for what, n in notes.items():
                    self._log.note(split, what, n)
            else:
                frames = [{**result[1], "frame_index": it.frame_index, "name": ""}]
            kind = "fake" if it.is_fake else "real"
            stats[f"{kind} inputs"] += 1
            stats[f"{kind} records"] += len(frames)
            for fr in frames:
                self.landmark_sources[fr["landmark_source"]] += 1
                path = f"{it.rel}/{fr['name']}" if it.is_video else it.rel
                yield path, {
                    "image": fr["image"], "label": it.label, "landmarks": fr["landmarks"],
                    "mask": b"", "path": path, "video_id": it.video_id,
                    "is_fake": np.int32(it.is_fake), "frame_index": np.int32(fr["frame_index"]),
                    "method": it.method,
                }
        self._log.check(split)


# --------------------------------------------------------------------------------------------
# Driver


def build(real: list[str], fake: list[str], name: str, data_dir: str, *,
          raw_dir: str | None = None, sequences: str | None = None,
          subset: str = "facial_components", faces_mode: str = "detect",
          val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0,
          group_images_by_folder: bool = False, frames: int = 32, image_size: int = 256,
          margin: float = 0.25, pad: float = 0.0, detector: Any = None,
          detector_model: str | None = None, landmarks: str = "auto",
          max_skipped: float = common.DEFAULT_MAX_SKIPPED, num_workers: int = 0,
          overwrite: bool = False, jpeg_quality: int = 95,
          log: common.SkipLog | None = None) -> str:
    """Builds ``folders/<name>`` under data_dir; returns that name.

    detector: None or a kind ('auto', 'dlib', 'haar', 'yunet'; with ``detector_model``), or a
    callable ``image -> list[landmarks.Face]`` (picklable when num_workers > 1).
    Raises BuildError naming the folder, file or row at fault.
    """
    if not _NAME_RE.match(name or ""):
        raise common.BuildError(f"--name {name!r}: use letters, digits, '_', '-' and '.', "
                                "starting with a letter or digit")
    if not real and not fake:
        raise common.BuildError("give at least one --real or --fake folder")
    if subset not in labels_lib.SUBSETS:
        raise common.BuildError(f"--subset {subset!r}: expected one of {labels_lib.SUBSETS}")
    if faces_mode not in ("detect", "aligned"):
        raise common.BuildError(f"--faces {faces_mode!r}: expected detect or aligned")
    roots = {0: list(real or []), 1: list(fake or [])}
    all_dirs = [os.path.abspath(os.path.expanduser(d)) for d in roots[0] + roots[1]]
    if raw_dir is None:
        raw_dir = os.path.dirname(os.path.abspath(sequences)) if sequences else \
            os.path.commonpath(all_dirs)
    raw_dir = os.path.abspath(os.path.expanduser(raw_dir))
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    full_name = dataset_name(name)
    existing = common.existing_version_dir(data_dir, full_name)
    if existing and not overwrite:
        print(f"{full_name} is already built at {existing}; pass --overwrite to rebuild.",
              flush=True)
        return full_name
    log = log or common.SkipLog(max_skipped)
    report_dir = common.dataset_dir(data_dir, BUILDER_NAME, name)
    try:
        plan = scan(roots, raw_dir, log, val_fraction=val_fraction, test_fraction=test_fraction,
                    split_seed=split_seed, group_images_by_folder=group_images_by_folder)
        if sequences:
            if not os.path.isfile(sequences):
                raise common.BuildError(f"--sequences file not found: {sequences}")
            apply_sequences(plan, os.path.abspath(sequences), subset, raw_dir, roots, log)
            log.check("sequences")
        if not any(plan.values()):
            raise common.BuildError(f"nothing usable in {', '.join(all_dirs)}")
        for split in plan:
            log.check(split)
    except common.BuildError:
        log.write(report_dir, {"ok": False, "stage": "scan"})
        print(f"skipped inputs:\n{log.summary()}", flush=True)
        raise

    uses_detector = faces_mode == "detect" or any(it.is_video for v in plan.values() for it in v)
    det_spec, det_name = ("auto", None), "none (aligned images)"
    if callable(detector):
        det_spec, det_name = detector, lm_lib.detector_name(detector)
    elif uses_detector:
        kind = detector or "auto"
        probe = lm_lib.make_detector(kind, detector_model)  # fails early with what to install
        det_spec, det_name = (kind, detector_model), lm_lib.detector_name(probe)
        del probe
    if landmarks == "auto":
        landmarks = "dlib" if lm_lib.dlib_available() else "template"
    elif landmarks == "dlib" and not lm_lib.dlib_available():
        raise common.BuildError("--landmarks dlib needs the landmarks extra: "
                                "pip install -e '.[landmarks]' (in the checkout)")
    counts = {s: len(v) for s, v in plan.items() if v}
    print(f"{full_name}: inputs per split {counts}; faces: {faces_mode}; detector: {det_name}; "
          f"landmarks: {landmarks}", flush=True)
    if existing and overwrite:
        common.remove_existing(data_dir, full_name)
    task = {"num_frames": frames, "image_size": image_size, "margin": margin,
            "detector": det_spec, "landmarks": landmarks, "pad": pad,
            "jpeg_quality": jpeg_quality}
    # TFDS wants one class per builder name with its configs.
    builder_cls = type(f"FolderFaces_{name}", (FolderFaces,), {"name": BUILDER_NAME},
                       skip_registration=True)
    builder_cls.BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=name)]
    builder = builder_cls(data_dir=data_dir, config=name, file_format="array_record", plan=plan,
                          log=log, task=task, faces_mode=faces_mode, num_workers=num_workers)
    version_dir = common.run_build(builder, log, report_dir, lambda: {
        "real": roots[0], "fake": roots[1], "raw_dir": raw_dir, "sequences": sequences,
        "subset": subset if sequences else None, "faces": faces_mode, "detector": det_name,
        "landmarks": landmarks, "image_size": image_size, "frames_per_video": frames,
        "landmark_sources": dict(builder.landmark_sources),
        "counts": {s: dict(c) for s, c in builder.stats.items()}})
    for split, c in builder.stats.items():
        print(f"  {split}: {c['real inputs']} real / {c['fake inputs']} fake inputs, "
              f"{c['real records']} / {c['fake records']} records", flush=True)
    print(f"built {full_name} -> {version_dir}", flush=True)
    return full_name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.folders",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--real", action="append", default=[], metavar="DIR",
                   help="folder of genuine images / videos (repeatable)")
    p.add_argument("--fake", action="append", default=[], metavar="DIR",
                   help="folder of manipulated images / videos (repeatable)")
    p.add_argument("--name", required=True, help="dataset name: writes folders/NAME")
    p.add_argument("--data-dir", required=True, help="TFDS data dir to write into")
    p.add_argument("--raw-dir", default=None,
                   help="base of the stored paths and of the CSV's file_path (default: the "
                        "CSV's folder, else the folders' common parent)")
    p.add_argument("--sequences", default=None, metavar="CSV",
                   help="CSV with the columns file_path, label: manipulation sequences")
    p.add_argument("--subset", choices=labels_lib.SUBSETS, default="facial_components",
                   help="class vocabulary of the sequence labels")
    p.add_argument("--faces", choices=("detect", "aligned"), default="detect",
                   help="detect and crop faces, or keep images that are aligned crops")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of videos / images hashed into val (no train/val/test folders)")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="share of videos / images hashed into test")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split hash")
    p.add_argument("--group-images-by-folder", action="store_true",
                   help="each folder of images is one video (one video id, one split)")
    p.add_argument("--frames", type=int, default=32, help="frames sampled per video")
    p.add_argument("--image-size", type=int, default=256, help="stored crop side in pixels")
    p.add_argument("--margin", type=float, default=0.25,
                   help="crop margin on each side, as a fraction of the face box side")
    p.add_argument("--pad", type=float, default=0.0,
                   help="black border (fraction of the side) added before detection, for "
                        "images that are tight face crops")
    p.add_argument("--detector", choices=lm_lib.DETECTOR_KINDS, default="auto",
                   help="face detector: auto = dlib (landmarks extra), else OpenCV's Haar cascade")
    p.add_argument("--detector-model", default=None,
                   help="Haar cascade XML (--detector haar) or YuNet ONNX (--detector yunet)")
    p.add_argument("--landmarks", choices=("auto", "dlib", "template"), default="auto",
                   help="auto = dlib when the landmarks extra is installed")
    p.add_argument("--max-skipped", type=float, default=common.DEFAULT_MAX_SKIPPED,
                   help="fail when more than this fraction of a split's inputs is skipped")
    p.add_argument("--num-workers", type=int, default=common.default_workers(),
                   help="decoding processes (0 or 1 = this process)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of stored crops")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
    args = p.parse_args(argv)
    if not args.real and not args.fake:
        p.error("give at least one --real or --fake folder")
    try:
        build(args.real, args.fake, args.name, args.data_dir, raw_dir=args.raw_dir,
              sequences=args.sequences, subset=args.subset, faces_mode=args.faces,
              val_fraction=args.val_fraction, test_fraction=args.test_fraction,
              split_seed=args.split_seed, group_images_by_folder=args.group_images_by_folder,
              frames=args.frames, image_size=args.image_size, margin=args.margin, pad=args.pad,
              detector=args.detector, detector_model=args.detector_model,
              landmarks=args.landmarks, max_skipped=args.max_skipped,
              num_workers=args.num_workers, overwrite=args.overwrite,
              jpeg_quality=args.jpeg_quality)
    except (common.BuildError, lm_lib.NoDetectorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
