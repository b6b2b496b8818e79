"""Seq-DeepFake -> TFDS ArrayRecord datasets ``seq_deepfake/facial_components`` and
``seq_deepfake/facial_attributes`` (splits train, val, test).

    python -m data_prep.seq_deepfake --raw-dir RAW --data-dir OUT

RAW is the official release as unpacked (see docs/datasets.md):

    RAW/<subset>/annotations/{train,val,test}.csv     columns file_path, label
    RAW/<subset>/images/<split>/<SEQ-NAME>/<image>.jpg   SEQ-NAME e.g. 'nose-eye-lip', 'original'

Labels are read from '[1, 2, 4, 0, 0]', '(1,2,4,0,0)', '1 2 4 0 0' and the like (shorter lists
are 0-padded); ``file_path`` may be relative to RAW or to RAW/<subset> (or absolute), and a
.jpg listed as .png (or the reverse) is found. Each record holds the image bytes at 256 px
(kept as they are when the image already has that size), the label int32 (5,), 68 landmarks
float32 (68, 2) and the path relative to RAW (features: ``sources.seq_deepfake_features``).

Landmarks: with the ``landmarks`` extra, dlib's detector and 68-point predictor per image;
without it the images, which are aligned like FFHQ / CelebA-HQ, all get the mean template
fitted to that alignment (``landmarks.aligned_landmarks``) and the build says so.

Bad rows (missing or unreadable image, malformed label, unknown sequence folder, label that
contradicts its folder, duplicate) are skipped, printed with their path and summed up; a split
with more than --max-skipped of its rows skipped fails the build.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import os
import re
import sys
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from cmil_jax.data import sources
from cmil_jax.labels import CLASS_NAMES, MAX_LEN, NUM_CLASSES, ORIGINAL, SUBSETS, sequence_name
from data_prep import common, faces
from data_prep import landmarks as lm_lib

BUILDER_NAME = "seq_deepfake"
PUBLISHED_TOTALS = {"facial_components": 35_166, "facial_attributes": 49_920}
PUBLISHED_TYPES = {"facial_components": 28, "facial_attributes": 26}


# --------------------------------------------------------------------------------------------
# Labels and sequence names

_TOKEN = re.compile(r"^[+-]?\d+(\.0*)?$")


def parse_label(text: str) -> np.ndarray:
    """int32 (5,) sequence from a label string; ValueError saying what is wrong.

    Accepts brackets or parentheses (or none), commas and/or spaces, integer-valued floats
    ('1.0'), and fewer than 5 entries (0-padded). Rejects values outside 0..5, a class after a
    0, and repeated classes.
    """
    s = str(text).strip()
    if len(s) >= 2 and (s[0], s[-1]) in (("[", "]"), ("(", ")")):
        s = s[1:-1]
    tokens = [t for t in re.split(r"[,\s]+", s.strip()) if t]
    if not tokens:
        raise ValueError("empty label")
    bad = [t for t in tokens if not _TOKEN.match(t)]
    if bad:
        raise ValueError(f"not an integer: {bad[0]!r}")
    values = [int(float(t)) for t in tokens]
    if len(values) > MAX_LEN:
        raise ValueError(f"{len(values)} entries, at most {MAX_LEN} expected")
    if any(v < 0 or v > NUM_CLASSES for v in values):
        raise ValueError(f"values must be in 0..{NUM_CLASSES}")
    seq = [v for v in values if v]
    if values[:len(seq)] != seq:
        raise ValueError("a class follows a 0 (padding must come last)")
    if len(set(seq)) != len(seq):
        raise ValueError("a class occurs twice")
    label = np.zeros(MAX_LEN, np.int32)
    label[:len(seq)] = seq
    return label


def parse_sequence_name(name: str, subset: str) -> tuple[int, ...]:
    """Class ids of a sequence folder name ('eyebrow-eye-lip', 'Bangs-Smiling', 'original').

    Case-insensitive; '-', '_' or '+' separate steps; a plural 's' is tolerated ('lips').
    ValueError for anything else.
    """
    vocab = {n.lower(): i + 1 for i, n in enumerate(CLASS_NAMES[subset])}
    key = name.strip().lower()
    if key == ORIGINAL:
        return ()
    seq = []
    for tok in re.split(r"[-_+]", key):
        if tok in vocab:
            seq.append(vocab[tok])
        elif tok.endswith("s") and tok[:-1] in vocab:
            seq.append(vocab[tok[:-1]])
        else:
            raise ValueError(f"{name!r} is not a sequence of {subset} classes "
                             f"({', '.join(CLASS_NAMES[subset])}) or 'original'")
    if not seq or len(seq) > MAX_LEN or len(set(seq)) != len(seq):
        raise ValueError(f"{name!r} is not a valid sequence name")
    return tuple(seq)


# --------------------------------------------------------------------------------------------
# Scanning the release (no decoding)


@dataclasses.dataclass
class Item:
    """One listed image that passed the checks that need no decoding."""

    split: str
    path: str  # absolute
    rel: str  # relative to the raw dir, '/'-separated
    label: np.ndarray
    where: str  # 'annotations/train.csv:12'


def _alternatives(path: str):
    yield path
    stem, ext = os.path.splitext(path)
    for e in faces.IMAGE_EXTS + tuple(x.upper() for x in faces.IMAGE_EXTS):
        if e != ext:
            yield stem + e


class OutsideRawDir(ValueError):
    """A CSV file_path whose only existing candidates lie outside the raw directory."""


def _candidates(raw_dir: str, subset: str, p: str):
    if os.path.isabs(p):
        yield from _alternatives(p)
    parts = [x for x in p.split("/") if x]
    roots = (raw_dir, os.path.join(raw_dir, subset), os.path.join(raw_dir, subset, "images"))
    for drop in range(min(3, len(parts))):
        rel = os.path.join(*parts[drop:])
        for root in roots:
            yield from _alternatives(os.path.join(root, rel))


def resolve_image(raw_dir: str, subset: str, file_path: str) -> str | None:
    """Absolute path of a CSV ``file_path`` or None when no candidate exists.

    Tries, in order: the path as given (absolute), relative to RAW, to RAW/<subset> and to
    RAW/<subset>/images, then the same with up to two leading folders removed (so the authors'
    absolute paths resolve inside RAW); each with the listed extension first, then the other
    image extensions. Only files inside RAW count ('..' and symbolic links resolved):
    OutsideRawDir when the only files found lie outside it.
    """
    p = file_path.strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    outside = None
    for c in _candidates(raw_dir, subset, p):
        if os.path.isfile(c):
            if common.inside(c, raw_dir):
                return c
            outside = outside or c
    if outside is not None:
        raise OutsideRawDir(f"{file_path!r} resolves to {os.path.realpath(outside)}, outside "
                            f"{raw_dir}")
    return None


def _read_csv(csv_path: str) -> list[tuple[int, str, str]]:
    """[(line number, file_path, label)] rows of an annotation CSV; BuildError if unusable."""
    if not os.path.isfile(csv_path):
        raise common.BuildError(f"annotation file not found: {csv_path} (expected the official "
                                "layout RAW/<subset>/annotations/{train,val,test}.csv)")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise common.BuildError(f"{csv_path} is empty")
        names = [h.strip().lower() for h in header]
        if "file_path" not in names or "label" not in names:
            raise common.BuildError(f"{csv_path}: header {header} lacks the columns "
                                    "'file_path' and 'label'")
        i_path, i_label = names.index("file_path"), names.index("label")
        rows = []
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            cells = row + [""] * len(names)
            rows.append((reader.line_num, cells[i_path], cells[i_label]))
    return rows


def scan_subset(raw_dir: str, subset: str, log: common.SkipLog,
                check_sequence_names: bool = True) -> dict[str, list[Item]]:
    """Items per split after the checks that need no decoding; skips go to ``log``."""
    raw_dir = os.path.abspath(raw_dir)
    plan = {}
    for split in sources.SPLITS:
        csv_path = os.path.join(raw_dir, subset, "annotations", f"{split}.csv")
        rows = _read_csv(csv_path)
        csv_rel = os.path.relpath(csv_path, raw_dir)
        if not rows:
            raise common.BuildError(f"{csv_path} lists no images")
        seen = set()
        items = []
        for line, file_path, label_text in rows:
            log.listed(split)
            where = f"{csv_rel}:{line}"
            shown = file_path.strip() or f"<empty file_path at {where}>"
            try:
                label = parse_label(label_text)
            except ValueError as e:
                log.skip(split, shown, common.MALFORMED_LABEL, f"{where}: {label_text!r}: {e}")
                continue
            try:
                path = resolve_image(raw_dir, subset, file_path) if file_path.strip() else None
            except OutsideRawDir as e:
                log.skip(split, shown, common.OUTSIDE_RAW_DIR, f"{where}: {e}")
                continue
            if path is None:
                log.skip(split, shown, common.MISSING_IMAGE,
                         f"{where}: not found under {raw_dir} or {raw_dir}/{subset}")
                continue
            rel = os.path.relpath(path, raw_dir).replace(os.sep, "/")
            if check_sequence_names:
                folder = os.path.basename(os.path.dirname(path))
                try:
                    seq = parse_sequence_name(folder, subset)
                except ValueError as e:
                    log.skip(split, rel, common.UNKNOWN_SEQUENCE, f"{where}: {e}")
                    continue
                if seq != tuple(int(k) for k in label if k):
                    log.skip(split, rel, common.LABEL_MISMATCH,
                             f"{where}: label {label.tolist()} "
                             f"({sequence_name(label, subset)}) in folder {folder!r}")
                    continue
            if path in seen:
                log.skip(split, rel, common.DUPLICATE, f"{where}: listed before")
                continue
            seen.add(path)
            items.append(Item(split, path, rel, label, where))
        plan[split] = items
    return plan


# --------------------------------------------------------------------------------------------
# The TFDS builder


class SeqDeepfake(sources.FaceRecordBuilder, skip_registration=True):
    """Seq-DeepFake (Shao et al., ECCV 2022) from a local copy of the official release.

    Record i of a split is the i-th usable row of its CSV (no shuffling at write time).
    """

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    BUILDER_CONFIGS: ClassVar[list] = [
        tfds.core.BuilderConfig(name=s, description=f"Seq-DeepFake {s}") for s in SUBSETS]
    DESCRIPTION = ("Seq-DeepFake sequential facial manipulations: images, manipulation "
                   "sequences (0-padded, length 5) and 68 landmarks.")
    DISABLE_SHUFFLING = True

    def __init__(self, *, plan: dict | None = None, log: common.SkipLog | None = None,
                 image_size: int = 256, landmarks: str = "template", anchors=None,
                 num_workers: int = 0, **kwargs):
        self._plan = plan or {}
        self._log = log or common.SkipLog()
        self._image_size = image_size
        self._landmarks = landmarks
        self._anchors = None if anchors is None else tuple(float(a) for a in
                                                           np.asarray(anchors).reshape(-1))
        self._num_workers = num_workers
        self.counts: dict[str, collections.Counter] = {}
        self.landmark_sources: collections.Counter = collections.Counter()
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in sources.SPLITS
                if self._plan.get(split)}

    def _generate_examples(self, split):
        subset = self.builder_config.name
        items = self._plan[split]
        tasks = [faces.AlignedImageTask(it.path, self._image_size, self._landmarks,
                                        self._anchors) for it in items]
        counts = self.counts.setdefault(split, collections.Counter())
        for item, result in zip(items, common.imap_ordered(
                faces.process_aligned_image, tasks, self._num_workers, chunksize=16)):
            if result[0] == "error":
                self._log.skip(split, item.rel, result[1], f"{item.where}: {result[2]}")
                continue
            rec = result[1]
            if rec["landmark_source"] != "dlib":
                self._log.note(split, "landmarks from " + rec["landmark_source"])
            self.landmark_sources[rec["landmark_source"]] += 1
            counts[sequence_name(item.label, subset)] += 1
            yield item.rel, {"image": rec["image"], "label": item.label,
                             "landmarks": rec["landmarks"], "mask": b"", "path": item.rel}
        self._log.check(split)


# --------------------------------------------------------------------------------------------
# Driver


def count_table(subset: str, counts: dict[str, collections.Counter]) -> str:
    """Images per sequence type and split, with the total compared to the published one."""
    splits = [s for s in sources.SPLITS if s in counts]
    names = sorted({n for c in counts.values() for n in c},
                   key=lambda n: (n != ORIGINAL, n.count("-"), n))
    width = max([len(n) for n in names] + [20])
    head = f"{'sequence type':<{width}} " + " ".join(f"{s:>7}" for s in splits) + "   total"
    lines = [f"{subset}: images per sequence type", head]
    for n in names:
        row = [counts[s][n] for s in splits]
        lines.append(f"{n:<{width}} " + " ".join(f"{v:>7}" for v in row) + f" {sum(row):>7}")
    totals = [sum(counts[s].values()) for s in splits]
    total = sum(totals)
    lines.append(f"{'total':<{width}} " + " ".join(f"{v:>7}" for v in totals) + f" {total:>7}")
    published = PUBLISHED_TOTALS[subset]
    diff = total - published
    lines.append(f"{len(names)} sequence types (published: {PUBLISHED_TYPES[subset]}); "
                 f"{total:,} images (published: {published:,}"
                 + (", matches)" if diff == 0 else f", differs by {diff:+,})"))
    return "\n".join(lines)


def _landmark_mode(requested: str) -> str:
    if requested == "auto":
        return "dlib" if lm_lib.dlib_available() else "template"
    if requested == "dlib" and not lm_lib.dlib_available():
        raise common.BuildError("--landmarks dlib needs the landmarks extra: "
                                "pip install -e '.[landmarks]'")
    return requested


def build(raw_dir: str, data_dir: str, subset: str, *, image_size: int = 256,
          landmarks: str = "auto", anchors=None, max_skipped: float = 0.05,
          num_workers: int = 0, overwrite: bool = False, check_sequence_names: bool = True,
          log: common.SkipLog | None = None) -> str:
    """Builds ``seq_deepfake/<subset>`` under data_dir; returns the dataset name.

    A complete existing build is kept unless ``overwrite``. Raises BuildError (printed summary,
    no dataset left behind) when the raw data is unusable or too much of it was skipped.
    """
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; expected one of {SUBSETS}")
    name = f"{BUILDER_NAME}/{subset}"
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    raw_dir = os.path.abspath(os.path.expanduser(raw_dir))
    existing = common.existing_version_dir(data_dir, name)
    if existing and not overwrite:
        print(f"{name} is already built at {existing}; pass --overwrite to rebuild.", flush=True)
        return name
    mode = _landmark_mode(landmarks)
    if mode == "dlib":
        print("landmarks: dlib face detector + 68-point predictor (face_recognition_models)",
              flush=True)
    else:
        print("landmarks: the mean 68-point template fitted to the FFHQ / CelebA-HQ alignment "
              "of the Seq-DeepFake faces, the same for every image"
              + ("" if landmarks == "template" else
                 " (the 'landmarks' extra is not installed; for per-image landmarks: "
                 "pip install -e '.[landmarks]' and rebuild with --overwrite)"), flush=True)
    log = log or common.SkipLog(max_skipped)
    report_dir = common.dataset_dir(data_dir, BUILDER_NAME, subset)
    try:
        plan = scan_subset(raw_dir, subset, log, check_sequence_names)
        for split in sources.SPLITS:
            log.check(split)
    except common.BuildError:
        log.write(report_dir, {"ok": False, "stage": "scan"})
        print(f"skipped inputs:\n{log.summary()}", flush=True)
        raise
    if overwrite:
        common.remove_existing(data_dir, name)
    builder = SeqDeepfake(data_dir=data_dir, config=subset, file_format="array_record",
                          plan=plan, log=log, image_size=image_size, landmarks=mode,
                          anchors=anchors, num_workers=num_workers)
    version_dir = common.run_build(builder, log, report_dir, lambda: {
        "raw_dir": raw_dir, "image_size": image_size, "landmarks": mode,
        "landmark_sources": dict(builder.landmark_sources),
        "counts": {s: dict(c) for s, c in builder.counts.items()}})
    print(count_table(subset, builder.counts), flush=True)
    print(f"built {name} -> {version_dir}", flush=True)
    return name


def _parse_anchors(text: str | None):
    if not text:
        return None
    vals = [float(v) for v in text.split(",")]
    if len(vals) != 6:
        raise argparse.ArgumentTypeError("--template-anchors takes 6 comma-separated numbers")
    return np.array(vals).reshape(3, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.seq_deepfake",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--raw-dir", required=True, help="the unpacked Seq-DeepFake release")
    p.add_argument("--data-dir", required=True, help="TFDS data dir to write into")
    p.add_argument("--subsets", default="",
                   help="comma-separated subsets (default: those present in --raw-dir)")
    p.add_argument("--image-size", type=int, default=256, help="stored side in pixels")
    p.add_argument("--landmarks", choices=("auto", "dlib", "template"), default="auto",
                   help="auto = dlib when the landmarks extra is installed, else the template")
    p.add_argument("--template-anchors", default=None,
                   help="template placement: left-eye x,y, right-eye x,y, mouth x,y as "
                        "fractions of the image (default: FFHQ alignment, "
                        "0.375,0.475,0.625,0.475,0.5,0.725)")
    p.add_argument("--max-skipped", type=float, default=common.DEFAULT_MAX_SKIPPED,
                   help="fail when more than this fraction of a split is skipped")
    p.add_argument("--sequence-names", choices=("check", "ignore"), default="check",
                   help="check that each image's folder names the sequence of its label")
    p.add_argument("--num-workers", type=int, default=common.default_workers(),
                   help="decoding processes (0 or 1 = this process)")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
    args = p.parse_args(argv)
    raw_dir = os.path.abspath(os.path.expanduser(args.raw_dir))
    if args.subsets:
        subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
        unknown = [s for s in subsets if s not in SUBSETS]
        if unknown:
            p.error(f"unknown subsets {unknown}; expected some of {list(SUBSETS)}")
    else:
        subsets = [s for s in SUBSETS if os.path.isdir(os.path.join(raw_dir, s))]
        if not subsets:
            print(f"error: neither {' nor '.join(SUBSETS)} is a folder of {raw_dir} "
                  "(expected RAW/<subset>/annotations and RAW/<subset>/images)", file=sys.stderr)
            return 2
    status = 0
    for subset in subsets:
        try:
            build(raw_dir, args.data_dir, subset, image_size=args.image_size,
                  landmarks=args.landmarks, anchors=_parse_anchors(args.template_anchors),
                  max_skipped=args.max_skipped, num_workers=args.num_workers,
                  overwrite=args.overwrite,
                  check_sequence_names=args.sequence_names == "check")
        except common.BuildError as e:
            print(f"error: {subset}: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
