"""Inference on images and videos: fake probability, manipulation sequence and heatmaps.

    python -m cmil_jax.predict --workdir runs/demo face.jpg clip.mp4 frames/ --out predictions/

For every readable image it writes ``<out>/<name>.json`` (schema in docs/evaluation.md) and
``<out>/<name>.png``, an overlay of the maps: the input, the MIL dissimilarity map 1 - a_i,
Grad-CAM of the top class and that class's patch-logit map. For every video (a file OpenCV
reads, or a folder of numbered frame images) it samples frames by the run's video protocol
(config section ``video``; overridable here), scores them in batches, and writes one record
``<out>/<name>.json`` with the video score, the voted sequence and a record per frame, and a
timeline figure ``<out>/<name>_timeline.png`` (``--overlay_video``: also an MP4 of the frames
with their heatmaps). ``<out>/summary.json`` lists the records written and the inputs
skipped. Folders are read non-recursively; unreadable, empty or truncated inputs, images larger
than ``--max_megapixels`` (refused from their header, before decoding) and files of other kinds
are listed in summary.json with the reason and skipped, never fatal. Grey, 16-bit, CMYK and
alpha images are read as 8-bit RGB (alpha dropped). Every file is written whole or not at all;
a full disk stops the command with exit status 4, the records written before it kept.

Exit status: 0 records written (or nothing to do), 1 every input skipped, 2 bad run directory,
checkpoint or option (the message names it), 4 out of disk space (the message names the file).

Model: ``<workdir>/config.json`` and the best checkpoint of ``--checkpoint`` (default: the
first selection metric of the config).

Faces: with a face detector (``data_prep.landmarks.make_detector('auto')``: dlib when the
landmarks extra is installed, ``pip install -e '.[landmarks]'``, else OpenCV's bundled
Haar cascade where the installed OpenCV ships one, or the file of ``--face_model``), the largest
detected face is cropped as the video builders of data_prep crop it (a square around the face
box with a 25 % margin) before resizing. Otherwise, with ``--face none``, or when no face is
found in an image, the whole image is resized to the model's input size and the record says so
in 'face'. Video frames without a face follow ``video.no_face``; without any detector, frames
are used whole, like images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from cmil_jax import checkpoint
from cmil_jax import config_base
from cmil_jax import disk
from cmil_jax import labels as labels_lib
from cmil_jax import localization
from cmil_jax import metrics as metrics_lib
from cmil_jax import parallel
from cmil_jax import train
from cmil_jax import video as video_lib
from cmil_jax import viz
from data_prep import faces as face_crops
from data_prep import landmarks as face_lib

FACE_MARGIN = 0.25  # face crop margin on each side, fraction of the box side (data_prep.videos)
SCHEMA_VERSION = 2  # 2: video records, 'kind' in every record, summary counts


# ----------------------------------------------------------------------------------------------
# Inputs


def list_inputs(paths: Sequence[str]) -> tuple[list[str], list[dict]]:
    """Expands folders (non-recursive, sorted, hidden files left out).

    Returns (files, skipped) where skipped holds {'path', 'reason'} for missing paths.
    """
    files, skipped = [], []
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if not name.startswith(".") and os.path.isfile(full):
                    files.append(full)
        elif os.path.isfile(path):
            files.append(path)
        else:
            skipped.append({"path": path, "reason": "no such file or directory"})
    return files, skipped


FOLDER_MODES = ("auto", "images", "frames")


def classify_inputs(paths: Sequence[str], folders: str = "auto"
                    ) -> tuple[list[tuple[str, str]], list[dict]]:
    """([(path, kind)], skipped) with kind 'image', 'video' (a file with a video extension,
    ``video.VIDEO_EXTS``) or 'frames' (a folder read as one video's frames).

    folders: 'frames' = every folder given is one video's frames; 'images' = a folder's files
    are inputs of their own (non-recursive); 'auto' = frames when the folder looks like one
    (``video.is_frame_folder``: numbered image files only), else its files.
    """
    if folders not in FOLDER_MODES:
        raise ValueError(f"unknown folder mode {folders!r}; expected one of {FOLDER_MODES}")
    items, skipped = [], []
    for path in paths:
        if os.path.isdir(path) and (folders == "frames" or (
                folders == "auto" and video_lib.is_frame_folder(path))):
            items.append((path, "frames"))
            continue
        files, missing = list_inputs([path])
        skipped += missing
        items += [(f, "video" if video_lib.is_video_file(f) else "image") for f in files]
    return items, skipped


def read_image(path: str, max_pixels: int | None = face_crops.MAX_IMAGE_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB; ValueError '<path>: <why>' if it is not a decodable image, is cut
    short or has more than `max_pixels` pixels (data_prep.faces.decode_image)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        return face_crops.decode_image(data, max_pixels)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Faces


def make_face_detector(face: str = "auto", model_path: str | None = None
                       ) -> tuple[Callable | None, str]:
    """(detector image -> list[Face], or None and why there is none).

    'auto': the detector data_prep uses (``data_prep.landmarks.make_detector``): the Haar
    cascade XML or YuNet ONNX file ``model_path`` when given, else dlib's detector and
    68-point predictor when the landmarks extra is installed, else OpenCV's bundled Haar
    cascade when this OpenCV ships one; 'none': no detection.
    """
    if face == "none":
        return None, "face detection off (--face none)"
    try:
        return face_lib.make_detector("auto", model_path), ""
    except face_lib.NoDetectorError:
        return None, "no face detector (pip install -e '.[landmarks]')"


@dataclasses.dataclass
class Prepared:
    """One input image ready for the model."""

    path: str
    image: np.ndarray  # (H, W, 3) original
    crop: np.ndarray  # (h, w, 3) the region fed to the model, for the overlay
    model_input: np.ndarray  # (S, S, 3) uint8
    face: dict


def prepare(path: str, image: np.ndarray, size: int, detector: Callable | None = None,
            no_face_reason: str = "", margin: float = FACE_MARGIN) -> Prepared:
    """Crops the largest detected face as the video builders do, or resizes the whole image.

    Face crop (``data_prep.faces.crop_face``): a square centred on the face box, side
    max(w, h) * (1 + 2 * margin), black outside the image, resized to (S, S).
    """
    found = face_lib.largest_face(detector(image)) if detector is not None else None
    if found is not None:
        return prepare_face(path, image, size, found, margin)
    reason = "no face found" if detector is not None else no_face_reason
    return prepare_whole(path, image, size, reason)


def prepare_face(path: str, image: np.ndarray, size: int, found,
                 margin: float = FACE_MARGIN) -> Prepared:
    """The crop of one detected face (``data_prep.landmarks.Face``), as ``prepare`` makes it."""
    model_input, offset, scale = face_crops.crop_face(image, found.box, margin, size)
    side = size / float(scale)
    display = int(min(max(size, round(side)), 512))
    crop = face_crops.crop_face(image, found.box, margin, display)[0]
    x0, y0 = (int(v) for v in offset)
    face = {"aligned": True, "box": [x0, y0, x0 + round(side), y0 + round(side)],
            "face_box": [round(float(v)) for v in found.box],
            "note": f"face found; square crop with margin {margin:g} resized to {size}x{size}"}
    return Prepared(path, image, crop, model_input, face)


def prepare_whole(path: str, image: np.ndarray, size: int, reason: str) -> Prepared:
    """The whole image resized to (S, S); ``reason`` says why no face crop was used."""
    h, w = image.shape[:2]
    if (w, h) == (size, size):
        what = f"whole image used as it is ({w}x{h})"
    else:
        what = f"whole image resized from {w}x{h} to {size}x{size}" + (
            " (aspect ratio changed)" if w != h else "")
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    model_input = cv2.resize(image, (size, size), interpolation=interp)
    face = {"aligned": False, "box": [0, 0, w, h], "note": f"{reason}; {what}"}
    return Prepared(path, image, image, model_input, face)


# ----------------------------------------------------------------------------------------------
# Model


def class_names(cfg) -> tuple[str, ...]:
    if cfg.model.num_classes == 1:
        return ("fake",)
    names = labels_lib.CLASS_NAMES.get(cfg.data.subset)
    if names is None or len(names) != cfg.model.num_classes:
        return tuple(f"class_{k + 1}" for k in range(cfg.model.num_classes))
    return names


def load_config(workdir: str):
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} the --workdir of a training run?")
    return config_base.load_recorded(path)


def load_model(workdir: str, metric: str | None = None):
    """(cfg, model, variables, checkpoint info) from a run directory's best checkpoint, on the
    first device."""
    cfg = load_config(workdir)
    metric = metric or next(m.strip() for m in cfg.eval.select_metrics.split(",") if m.strip())
    run = train.setup(cfg, mesh=parallel.make_mesh(jax.devices()[:1]))
    step, variables = checkpoint.restore_best(workdir, metric, run.abstract_variables)
    info = {"workdir": os.path.abspath(workdir), "metric": metric, "step": int(step)}
    return cfg, run.model, variables, info


# ----------------------------------------------------------------------------------------------
# Outputs


def _unique_stem(path: str, used: set) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(path))[0]) or "image"
    name, i = stem, 1
    while name in used:
        i += 1
        name = f"{stem}_{i}"
    used.add(name)
    return name


def _crop_maps(prep: Prepared, maps: dict, names, top: int, header: str) -> np.ndarray:
    """The overlay PNG: crop | 1 - a_i | Grad-CAM(top) | patch logits(top), all at crop size."""
    crop = prep.crop
    panels = [crop,
              viz.overlay(crop, maps["dissimilarity"]),
              viz.overlay(crop, maps["gradcam"]),
              viz.overlay(crop, maps["patch_logits"][..., top])]
    titles = ["input" + (" (aligned)" if prep.face["aligned"] else ""), "1 - similarity",
              f"Grad-CAM {names[top]}", f"patch logits {names[top]}"]
    return viz.labeled_row(panels, titles, header=header)


class Predictor:
    """A run's model applied to lists of model inputs in batches of ``batch_size`` (the last
    one padded, so one compiled shape serves every call)."""

    def __init__(self, cfg, model, variables, batch_size: int = 16,
                 gradcam_logit: str = "patch"):
        self.cfg, self.variables, self.batch_size = cfg, variables, max(1, int(batch_size))
        self.names = class_names(cfg)
        self.size = cfg.data.image_size
        self.maps_fn = localization.make_maps_fn(model, tau=cfg.loss.tau,
                                                 num_lowest=cfg.loss.num_lowest or None,
                                                 logit=gradcam_logit)

    def __call__(self, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Predictions and maps of make_maps_fn (Grad-CAM of each input's most probable
        class), one row per input."""
        outs, size, bs = [], self.size, self.batch_size
        for i in range(0, len(inputs), bs):
            chunk = np.stack(inputs[i:i + bs])
            n = len(chunk)
            padded = np.concatenate([chunk, np.zeros((bs - n, size, size, 3), np.uint8)])
            out = self.maps_fn(self.variables, jnp.asarray(padded))
            outs.append({k: np.asarray(v)[:n] for k, v in out.items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def sequences(self, out: dict) -> list[list[str]]:
        """The decoded manipulation sequence of every row (class names; [] = original)."""
        cfg = self.cfg
        if cfg.model.num_classes == 1:
            return [["fake"] if p[0] > cfg.eval.threshold else [] for p in out["probs"]]
        seqs = metrics_lib.decode(out["probs"], threshold=cfg.eval.threshold,
                                  order=cfg.loss.rank_order, fake_prob=out["fake_prob"],
                                  gate=cfg.eval.gate_by_fake_prob)
        return [[self.names[k - 1] for k in seq if k > 0] for seq in seqs]

    def class_score(self, probs: np.ndarray) -> np.ndarray:
        """The class heads' score, max_k p_k (p_1 for binary runs): evaluation's `class_*`
        figures; its headline is fake_prob, p(x)."""
        return metrics_lib.class_head_score(probs)


def resolve_protocol(cfg, overrides: dict | None = None):
    """The run's video section (older runs: the defaults) with non-None overrides applied;
    ConfigError naming the field when a value cannot work."""
    protocol = config_base.video_config()
    recorded = cfg.get("video")
    if recorded is not None:
        protocol.update(recorded.to_dict())
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in protocol:
            raise config_base.ConfigError(f"unknown video protocol field {key!r}; fields: "
                                          f"{sorted(protocol)}")
        protocol[key] = value
    config_base.check_video(protocol)
    return protocol


NUM_SUSPICIOUS = 4  # frames shown under a video's timeline
OVERLAY_VIDEO_FPS = 4.0  # sampled frames per second of the overlay MP4


def _image_record(prep: Prepared, out: dict, i: int, sequence, names, size, stem, info):
    probs = out["probs"][i]
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "image",
        "image": prep.path,
        "fake_prob": float(out["fake_prob"][i]),
        "sequence": sequence,
        "class_probs": {name: float(p) for name, p in zip(names, probs)},
        "image_size": [int(prep.image.shape[1]), int(prep.image.shape[0])],
        "model_input_size": size,
        "face": prep.face,
        "gradcam_class": names[int(out["class_index"][i])],
        "overlay": stem + ".png",
        "checkpoint": info,
    }


def predict_video(path: str, kind: str, predictor: Predictor, protocol, out_dir: str, stem: str,
                  *, detector: Callable | None, no_face_reason: str, info: dict,
                  overlay_video: bool = False) -> dict:
    """Samples, crops and scores one video (file or frame folder) and writes its record
    ``<stem>.json`` and timeline ``<stem>_timeline.png`` (and ``<stem>_overlay.mp4``).

    Returns the record. Raises ValueError (why) when no frame could be read.
    """
    frames = video_lib.read_frames(path, protocol.frames_per_video, is_folder=kind == "frames")
    size, names = predictor.size, predictor.names
    per_frame, preps, owner = [], [], []
    with_face = 0
    for index, image in frames.frames:
        entry = {"index": int(index),
                 "time_s": round(index / frames.fps, 3) if frames.fps else None}
        if frames.names is not None:
            entry["name"] = frames.names[index]
        if detector is None:
            entry["faces"] = None
            candidates = [prepare_whole(path, image, size, no_face_reason)]
        else:
            found = sorted((f for f in detector(image) if f.area > 0), key=lambda f: -f.area)
            entry["faces"] = len(found)
            if found:
                with_face += 1
                chosen = found[:1] if protocol.face == "largest" else found
                candidates = [prepare_face(path, image, size, f) for f in chosen]
            elif protocol.no_face == "full_frame":
                candidates = [prepare_whole(path, image, size, "no face found")]
            else:
                candidates = []
        for prep in candidates:
            preps.append(prep)
            owner.append(len(per_frame))
        per_frame.append(entry)
    out = predictor([p.model_input for p in preps]) if preps else None
    sequences = predictor.sequences(out) if preps else []
    class_scores = predictor.class_score(out["probs"]) if preps else []
    best: dict[int, int] = {}  # frame -> row of its highest-scoring input
    for row, f in enumerate(owner):
        if f not in best or out["fake_prob"][row] > out["fake_prob"][best[f]]:
            best[f] = row
    for f, entry in enumerate(per_frame):
        row = best.get(f)
        if row is None:
            entry.update(scored=False, face=None, fake_prob=None, class_score=None,
                         class_probs=None, sequence=None, gradcam_class=None)
            continue
        entry.update(
            scored=True, face=preps[row].face, fake_prob=float(out["fake_prob"][row]),
            class_score=float(class_scores[row]),
            class_probs={n: float(p) for n, p in zip(names, out["probs"][row])},
            sequence=sequences[row], gradcam_class=names[int(out["class_index"][row])])
        if protocol.face == "max":
            entry["faces_scored"] = owner.count(f)
    rows = [best[f] for f in sorted(best)]
    scores = [float(out["fake_prob"][r]) for r in rows]
    how = protocol.aggregate
    score = video_lib.aggregate(scores, how)
    sequence, votes = video_lib.vote_sequence([sequences[r] for r in rows], scores,
                                              protocol.sequence_vote)
    read, sampled = frames.read, frames.sampled
    notes = []
    if read < sampled:
        notes.append(f"only {read} of the {sampled} sampled frames could be decoded (the "
                     "video is truncated or damaged past that point)")
    if frames.unreadable:
        notes.append(f"{len(frames.unreadable)} frame images could not be decoded")
    if detector is None:
        notes.append(f"{no_face_reason}: whole frames resized to {size}x{size}")
    if not rows:
        notes.append(f"no face in any of the {read} frames read: no score "
                     f"(video.no_face={protocol.no_face!r})")
    record = {
        "schema_version": SCHEMA_VERSION,
        "kind": "video",
        "video": path,
        "source": "frames folder" if kind == "frames" else "file",
        "fake_prob": score,
        "class_score": video_lib.aggregate([float(class_scores[r]) for r in rows], how),
        "class_probs": ({n: video_lib.aggregate([float(out["probs"][r][k]) for r in rows], how)
                         for k, n in enumerate(names)} if rows else None),
        "sequence": sequence if rows else None,
        "sequence_votes": votes,
        "protocol": protocol.to_dict(),
        "frames": {"in_video": frames.in_video, "sampled": sampled, "read": read,
                   "with_face": with_face if detector is not None else 0,
                   "without_face": read - with_face if detector is not None else read,
                   "scored": len(rows), "unreadable": frames.unreadable},
        "complete": read == sampled and not frames.unreadable,
        "fps": frames.fps,
        "frame_size": [int(frames.frames[0][1].shape[1]), int(frames.frames[0][1].shape[0])],
        "model_input_size": size,
        "note": "; ".join(notes),
        "timeline": stem + "_timeline.png",
        "overlay_video": stem + "_overlay.mp4" if overlay_video else None,
        "checkpoint": info,
        "per_frame": per_frame,
    }
    top = sorted(best.items(), key=lambda kv: -float(out["fake_prob"][kv[1]]))[:NUM_SUSPICIOUS]
    suspicious = [{"index": per_frame[f]["index"], "fake_prob": float(out["fake_prob"][r]),
                   "crop": preps[r].crop, "dissimilarity": out["dissimilarity"][r],
                   "gradcam": out["gradcam"][r], "gradcam_class": names[int(out["class_index"][r])]}
                  for f, r in top]
    video_lib.plot_timeline(os.path.join(out_dir, record["timeline"]), per_frame, score,
                            sequence, how, suspicious, title=os.path.basename(path.rstrip("/")),
                            fps=frames.fps)
    if overlay_video:
        pictures = []
        for f, (index, image) in enumerate(frames.frames):
            row = best.get(f)
            if row is None:
                pictures.append(video_lib.annotate(image, f"frame {index}: no face"))
                continue
            painted = video_lib.paint_heat(image, out["dissimilarity"][row], preps[row].face["box"])
            text = (f"frame {index}  fake_prob {float(out['fake_prob'][row]):.2f}  "
                    f"video {score:.2f}")
            pictures.append(video_lib.annotate(painted, text, preps[row].face.get("face_box")))
        video_lib.write_overlay_video(os.path.join(out_dir, record["overlay_video"]), pictures,
                                      OVERLAY_VIDEO_FPS)
    disk.write_atomic(os.path.join(out_dir, stem + ".json"), json.dumps(record, indent=2))
    return record


def predict_files(paths: Sequence[str], workdir: str, out_dir: str, *,
                  metric: str | None = None, batch_size: int = 16, face: str = "auto",
                  detector: Callable | None = None, gradcam_logit: str = "patch",
                  video: dict | None = None, folders: str = "auto", face_model: str | None = None,
                  overlay_video: bool = False, progress: bool = False, log=print,
                  max_pixels: int | None = face_crops.MAX_IMAGE_PIXELS) -> dict:
    """Runs the model on image and video files and frame folders; writes JSON records,
    overlays and timelines to ``out_dir``.

    face: 'auto' (data_prep's detector when one is available) or 'none'.
    gradcam_logit: the logit the overlay's Grad-CAM explains (localization.GRADCAM_LOGITS);
      'patch' (z^V) localizes best on the demo models (docs/evaluation.md, Figure A2).
    detector: overrides it, a callable image -> list[data_prep.landmarks.Face].
    video: overrides of the run's video protocol, {field: value} (None values ignored).
    folders: how folders are read (classify_inputs). progress: a tqdm bar over the inputs.
    max_pixels: larger images are skipped unread (None: no limit).
    Returns the summary dict (also written to <out_dir>/summary.json). disk.DiskFullError when
    the disk fills up: the records written until then are complete, no summary is written.
    """
    from tqdm import auto as tqdm  # pylint: disable=import-outside-toplevel

    t_load = time.perf_counter()
    cfg, model, variables, info = load_model(workdir, metric)
    protocol = resolve_protocol(cfg, video)
    predictor = Predictor(cfg, model, variables, batch_size, gradcam_logit)
    names, size = predictor.names, predictor.size
    no_face_reason = ""
    if detector is None:
        detector, no_face_reason = make_face_detector(face, face_model)
    os.makedirs(out_dir, exist_ok=True)
    items, skipped = classify_inputs(paths, folders)
    bar = tqdm.tqdm(total=len(items), disable=not progress, unit="input", dynamic_ncols=True)
    say = tqdm.tqdm.write if (progress and log is print) else log
    for s in skipped:
        say(f"skipped {s['path']}: {s['reason']}")
    records, used = [], set()
    counts = {"images": 0, "videos": 0, "frames_read": 0, "frames_scored": 0,
              "videos_without_score": 0, "partial_videos": 0}
    t_start = time.perf_counter()
    load_seconds = t_start - t_load

    def run_batch(batch: list[tuple[Prepared, str]]):
        out = predictor([p.model_input for p, _ in batch])
        sequences = predictor.sequences(out)
        for i, (prep, stem) in enumerate(batch):
            sequence = sequences[i]
            top = int(out["class_index"][i])
            fake_prob = float(out["fake_prob"][i])
            header = (f"fake_prob {fake_prob:.2f}  sequence: "
                      + (" > ".join(sequence) if sequence else "none (original)"))
            maps = {k: out[k][i] for k in ("dissimilarity", "gradcam", "patch_logits")}
            viz.save_png(os.path.join(out_dir, stem + ".png"),
                         _crop_maps(prep, maps, names, top, header))
            record = _image_record(prep, out, i, sequence, names, size, stem, info)
            disk.write_atomic(os.path.join(out_dir, stem + ".json"), json.dumps(record, indent=2))
            records.append({"image": prep.path, "json": stem + ".json", "overlay": stem + ".png"})
            counts["images"] += 1
            say(f"{prep.path}: {header}")

    batch = []
    for path, kind in items:
        bar.set_postfix_str(os.path.basename(path.rstrip("/"))[-30:], refresh=False)
        if kind == "image":
            try:
                prep = prepare(path, read_image(path, max_pixels), size, detector,
                               no_face_reason)
            except (ValueError, cv2.error) as e:
                reason = (str(e)[len(path) + 2:] if str(e).startswith(f"{path}: ")
                          else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
                skipped.append({"path": path, "reason": reason})
                say(f"skipped {path}: {reason}")
                bar.update(1)
                continue
            # Names are given in input order (images wait for a full batch, videos do not).
            batch.append((prep, _unique_stem(path, used)))
            if len(batch) == predictor.batch_size:
                run_batch(batch)
                batch = []
            bar.update(1)
            continue
        t_video = time.perf_counter()
        stem = _unique_stem(path.rstrip("/"), used)
        try:
            record = predict_video(path, kind, predictor, protocol, out_dir, stem,
                                   detector=detector, no_face_reason=no_face_reason, info=info,
                                   overlay_video=overlay_video)
        except disk.DiskFullError:
            raise  # not the input's fault: stop (exit 4)
        except (ValueError, OSError, cv2.error) as e:
            used.discard(stem)
            skipped.append({"path": path, "reason": str(e)})
            say(f"skipped {path}: {e}")
            bar.update(1)
            continue
        seconds = time.perf_counter() - t_video
        fr = record["frames"]
        counts["videos"] += 1
        counts["frames_read"] += fr["read"]
        counts["frames_scored"] += fr["scored"]
        counts["videos_without_score"] += record["fake_prob"] is None
        counts["partial_videos"] += not record["complete"]
        records.append({"video": path, "json": stem + ".json", "timeline": record["timeline"],
                        **({"overlay_video": record["overlay_video"]} if overlay_video else {}),
                        "frames_read": fr["read"], "seconds": round(seconds, 3)})
        score = "-" if record["fake_prob"] is None else f"{record['fake_prob']:.2f}"
        seq = record["sequence"]
        say(f"{path}: video fake_prob {score} ({protocol.aggregate} of {fr['scored']} of "
            f"{fr['read']} frames read)  sequence: "
            + ("-" if seq is None else " > ".join(seq) if seq else "none (original)")
            + (f"  [{record['note']}]" if record["note"] else ""))
        bar.update(1)
    if batch:
        run_batch(batch)
    bar.close()
    seconds = time.perf_counter() - t_start
    frames = counts["images"] + counts["frames_read"]
    timing = {"seconds": round(seconds, 3), "model_load_seconds": round(load_seconds, 3),
              "frames_per_sec": round(frames / seconds, 2) if seconds > 0 else None}
    summary = {"schema_version": SCHEMA_VERSION, "checkpoint": info,
               "video_protocol": protocol.to_dict(), "counts": {**counts, "skipped": len(skipped)},
               "timing": timing, "written": records, "skipped": skipped}
    disk.write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    log(f"{counts['images']} image(s) and {counts['videos']} video(s) "
        f"({counts['frames_read']} frames read, {counts['frames_scored']} scored) written to "
        f"{out_dir}; {len(skipped)} skipped; {frames} frames in {seconds:.1f} s = "
        f"{timing['frames_per_sec'] or 0:.1f} frames/s (model loading {load_seconds:.1f} s "
        "not counted)")
    return summary


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cmil_jax.predict",
        description="Fake probability, manipulation sequence and heatmaps for images, videos "
                    "and folders of frames.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_VIDEO_OR_FOLDER")
    parser.add_argument("--workdir", required=True, help="directory of a training run")
    parser.add_argument("--out", default=None, help="output folder (default <workdir>/predictions)")
    parser.add_argument("--checkpoint", default=None,
                        help="selection metric whose best checkpoint to use (default: the first)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=16,
                        help="model inputs (images, video frames) per forward pass")
    parser.add_argument("--face", choices=("auto", "none"), default="auto",
                        help="auto: crop the largest face when a face detector is available")
    parser.add_argument("--face_model", "--face-model", default=None,
                        help="a Haar cascade XML or YuNet ONNX file to detect faces with")
    parser.add_argument("--gradcam_logit", choices=localization.GRADCAM_LOGITS, default="patch",
                        help="logit the Grad-CAM panel explains: " + ", ".join(
                            f"{k} = {v}" for k, v in localization.GRADCAM_LOGIT_MEANINGS.items()))
    parser.add_argument("--folders", choices=FOLDER_MODES, default="auto",
                        help="a folder is one video's frames (frames), a set of inputs (images), "
                             "or frames when its images are all numbered (auto)")
    parser.add_argument("--max_megapixels", "--max-megapixels", type=float,
                        default=face_crops.MAX_IMAGE_PIXELS / 1e6,
                        help="images with more pixels are skipped unread (their header says "
                             "their size); 0 = no limit")
    group = parser.add_argument_group("video protocol (default: the run's config section video)")
    group.add_argument("--frames_per_video", "--frames-per-video", type=int, default=None)
    group.add_argument("--video_face", "--video-face", choices=config_base.VIDEO_FACE,
                       default=None, help="score the largest face, or the max over faces")
    group.add_argument("--aggregate", choices=config_base.VIDEO_AGGREGATE, default=None,
                       help="frame scores -> video score")
    group.add_argument("--no_face", "--no-face", choices=config_base.VIDEO_NO_FACE, default=None,
                       help="frames without a face: skip them or score the full frame")
    group.add_argument("--sequence_vote", "--sequence-vote", type=float, default=None,
                       help="frames with fake_prob >= this vote for the video's sequence")
    group.add_argument("--overlay_video", "--overlay-video", action="store_true",
                       help="also write <name>_overlay.mp4: the sampled frames with the "
                            "1 - similarity map and the scores drawn on them")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.workdir, "predictions")
    overrides = {"frames_per_video": args.frames_per_video, "face": args.video_face,
                 "aggregate": args.aggregate, "no_face": args.no_face,
                 "sequence_vote": args.sequence_vote}
    if args.max_megapixels < 0:
        parser.error(f"--max_megapixels {args.max_megapixels:g}: must be >= 0 (0 = no limit)")
    try:
        summary = predict_files(args.inputs, args.workdir, out, metric=args.checkpoint,
                                batch_size=max(1, args.batch_size), face=args.face,
                                gradcam_logit=args.gradcam_logit, video=overrides,
                                folders=args.folders, face_model=args.face_model,
                                overlay_video=args.overlay_video, progress=True,
                                max_pixels=round(args.max_megapixels * 1e6) or None)
    except (FileNotFoundError, config_base.ConfigError, face_lib.NoDetectorError,
            checkpoint.CheckpointError) as e:
        if disk.is_disk_full(e):
            return _out_of_space(e, out)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # pylint: disable=broad-except
        if disk.is_disk_full(e):
            return _out_of_space(e, out)
        raise
    return 0 if summary["written"] or not summary["skipped"] else 1


def _out_of_space(error: Exception, out: str) -> int:
    message = str(error) if isinstance(error, disk.DiskFullError) else (
        f"out of disk space ({(str(error).splitlines() or [''])[0][:300]})")
    print(f"error: {message}\nThe records in {out} written before are complete; no "
          "summary.json was written. Free some space and run the command again.",
          file=sys.stderr)
    return 4


if __name__ == "__main__":
    raise SystemExit(main())
