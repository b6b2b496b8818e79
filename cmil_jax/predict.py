"""Inference on image files: fake probability, manipulation sequence and heatmaps.

    python -m cmil_jax.predict --workdir runs/demo face.jpg photos/ --out predictions/

For every readable image it writes ``<out>/<name>.json`` (schema in docs/evaluation.md) and
``<out>/<name>.png``, an overlay of the maps: the input, the MIL dissimilarity map 1 - a_i,
Grad-CAM of the top class and that class's patch-logit map. ``<out>/summary.json`` lists the
records written and the inputs skipped. Folders are read non-recursively; files that are not
readable images are reported and skipped, never fatal.

Model: ``<workdir>/config.json`` and the best checkpoint of ``--checkpoint`` (default: the
first selection metric of the config).

Faces: with the landmarks extra installed (``pip install 'cmil_jax[landmarks]'``: dlib and its
68-point model), the largest detected face is cropped as the video builders of data_prep crop
it (a square around the face box with a 25 % margin) before resizing. Otherwise, with
``--face none``, or when no face is found, the whole image is resized to the model's input
size and the record says so in 'face'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from cmil_jax import checkpoint
from cmil_jax import config_base
from cmil_jax import labels as labels_lib
from cmil_jax import localization
from cmil_jax import metrics as metrics_lib
from cmil_jax import parallel
from cmil_jax import train
from cmil_jax import viz
from data_prep import faces as face_crops
from data_prep import landmarks as face_lib

FACE_MARGIN = 0.25  # face crop margin on each side, fraction of the box side (data_prep.videos)
SCHEMA_VERSION = 1


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


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB; ValueError naming the file if it is not a decodable image."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from e
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(f"{path}: not a decodable image (PNG, JPEG, BMP, TIFF, WebP, ...)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------------------------
# Faces


def make_face_detector(face: str = "auto") -> tuple[Callable | None, str]:
    """(detector image -> list[Face], or None and why there is none).

    'auto': dlib's detector and 68-point predictor when the landmarks extra is installed
    (``data_prep.landmarks.DlibFaces``); 'none': no detection.
    """
    if face == "none":
        return None, "face detection off (--face none)"
    if not face_lib.dlib_available():
        return None, "no face detector (pip install 'cmil_jax[landmarks]')"
    return face_lib.DlibFaces(), ""


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
    h, w = image.shape[:2]
    found = face_lib.largest_face(detector(image)) if detector is not None else None
    if found is not None:
        model_input, offset, scale = face_crops.crop_face(image, found.box, margin, size)
        side = size / float(scale)
        display = int(min(max(size, round(side)), 512))
        crop = face_crops.crop_face(image, found.box, margin, display)[0]
        x0, y0 = (int(v) for v in offset)
        face = {"aligned": True, "box": [x0, y0, x0 + round(side), y0 + round(side)],
                "face_box": [round(float(v)) for v in found.box],
                "note": f"face found; square crop with margin {margin:g} resized to {size}x{size}"}
        return Prepared(path, image, crop, model_input, face)
    reason = "no face found" if detector is not None else no_face_reason
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


def predict_files(paths: Sequence[str], workdir: str, out_dir: str, *,
                  metric: str | None = None, batch_size: int = 16, face: str = "auto",
                  detector: Callable | None = None, gradcam_logit: str = "patch",
                  log=print) -> dict:
    """Runs the model on image files and writes JSON records and overlays to ``out_dir``.

    face: 'auto' (detect when the landmarks extra is installed) or 'none'.
    gradcam_logit: the logit the overlay's Grad-CAM explains (localization.GRADCAM_LOGITS);
      'patch' (z^V) localizes best on the demo models (docs/evaluation.md, Figure A2).
    detector: overrides it, a callable image -> list[data_prep.landmarks.Face].
    Returns the summary dict (also written to <out_dir>/summary.json).
    """

    cfg, model, variables, info = load_model(workdir, metric)
    names = class_names(cfg)
    size = cfg.data.image_size
    no_face_reason = ""
    if detector is None:
        detector, no_face_reason = make_face_detector(face)
    maps_fn = localization.make_maps_fn(model, tau=cfg.loss.tau,
                                        num_lowest=cfg.loss.num_lowest or None,
                                        logit=gradcam_logit)
    os.makedirs(out_dir, exist_ok=True)
    files, skipped = list_inputs(paths)
    for s in skipped:
        log(f"skipped {s['path']}: {s['reason']}")
    records, used = [], set()

    def run_batch(batch: list[Prepared]):
        images = np.stack([p.model_input for p in batch])
        n = len(batch)
        padded = np.concatenate([images, np.zeros((batch_size - n, size, size, 3), np.uint8)])
        out = maps_fn(variables, jnp.asarray(padded))  # Grad-CAM of the most probable class
        out = {k: np.asarray(v)[:n] for k, v in out.items()}
        top = out["class_index"]
        seqs = metrics_lib.decode(out["probs"], threshold=cfg.eval.threshold,
                                  order=cfg.loss.rank_order, fake_prob=out["fake_prob"],
                                  gate=cfg.eval.gate_by_fake_prob)
        for i, prep in enumerate(batch):
            stem = _unique_stem(prep.path, used)
            probs = out["probs"][i]
            if cfg.model.num_classes == 1:
                sequence = ["fake"] if probs[0] > cfg.eval.threshold else []
            else:
                sequence = [names[k - 1] for k in seqs[i] if k > 0]
            fake_prob = float(out["fake_prob"][i])
            header = (f"fake_prob {fake_prob:.2f}  sequence: "
                      + (" > ".join(sequence) if sequence else "none (original)"))
            maps = {k: out[k][i] for k in ("dissimilarity", "gradcam", "patch_logits")}
            viz.save_png(os.path.join(out_dir, stem + ".png"),
                         _crop_maps(prep, maps, names, int(top[i]), header))
            record = {
                "schema_version": SCHEMA_VERSION,
                "image": prep.path,
                "fake_prob": fake_prob,
                "sequence": sequence,
                "class_probs": {name: float(p) for name, p in zip(names, probs)},
                "image_size": [int(prep.image.shape[1]), int(prep.image.shape[0])],
                "model_input_size": size,
                "face": prep.face,
                "gradcam_class": names[int(top[i])],
                "overlay": stem + ".png",
                "checkpoint": info,
            }
            with open(os.path.join(out_dir, stem + ".json"), "w") as f:
                json.dump(record, f, indent=2)
            records.append({"image": prep.path, "json": stem + ".json", "overlay": stem + ".png"})
            log(f"{prep.path}: {header}")

    batch = []
    for path in files:
        try:
            image = read_image(path)
        except ValueError as e:
            skipped.append({"path": path, "reason": str(e).split(": ", 1)[-1]})
            log(f"skipped {e}")
            continue
        batch.append(prepare(path, image, size, detector, no_face_reason))
        if len(batch) == batch_size:
            run_batch(batch)
            batch = []
    if batch:
        run_batch(batch)
    summary = {"schema_version": SCHEMA_VERSION, "checkpoint": info, "written": records,
               "skipped": skipped}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"{len(records)} image(s) written to {out_dir}; {len(skipped)} skipped")
    return summary


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cmil_jax.predict",
        description="Fake probability, manipulation sequence and heatmaps for image files.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--workdir", required=True, help="directory of a training run")
    parser.add_argument("--out", default=None, help="output folder (default <workdir>/predictions)")
    parser.add_argument("--checkpoint", default=None,
                        help="selection metric whose best checkpoint to use (default: the first)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--face", choices=("auto", "none"), default="auto",
                        help="auto: crop the largest face when the landmarks extra is installed")
    parser.add_argument("--gradcam_logit", choices=localization.GRADCAM_LOGITS, default="patch",
                        help="logit the Grad-CAM panel explains: " + ", ".join(
                            f"{k} = {v}" for k, v in localization.GRADCAM_LOGIT_MEANINGS.items()))
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.workdir, "predictions")
    try:
        summary = predict_files(args.inputs, args.workdir, out, metric=args.checkpoint,
                                batch_size=max(1, args.batch_size), face=args.face,
                                gradcam_logit=args.gradcam_logit)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary["written"] or not summary["skipped"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
