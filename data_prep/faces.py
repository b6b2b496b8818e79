"""Per-item work of the builders, run in worker processes: read and encode face images, read
video frames, detect, crop and landmark faces. NumPy and OpenCV only (no TFDS).

A task is a plain tuple or dataclass (picklable); its result is either ``("ok", payload)`` or
``("error", reason, detail)`` with a reason from ``data_prep.common``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import cv2
import numpy as np

from data_prep import common
from data_prep import landmarks as lm_lib

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------------------------
# Images


def image_format(data: bytes) -> str | None:
    """'jpeg', 'png' or None, from the file's magic bytes."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def encode(image: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Bytes of an RGB uint8 (H,W,3) image as 'jpeg' (quality 1..100) or 'png'."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if fmt == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"{fmt} encoding failed for an image of shape {image.shape}")
    return buf.tobytes()


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre square of an (H,W,3) image resized to (size,size,3) (area filter when shrinking)."""
    h, w = image.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    image = image[y0:y0 + side, x0:x0 + side]
    if side == size:
        return image
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


# Images with more pixels than this are refused before decoding (3 bytes a pixel decoded: 300 MB
# at this limit, 1.2 GB for 20000 x 20000).
MAX_IMAGE_PIXELS = 100_000_000


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that an image file's header declares, read without decoding the pixels
    (PIL's lazy open); None when PIL does not know the format."""
    import io  # pylint: disable=import-outside-toplevel

    from PIL import Image  # pylint: disable=import-outside-toplevel

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # only the header is read
    try:
        with Image.open(io.BytesIO(data)) as im:
            return tuple(int(v) for v in im.size)
    except Exception:  # pylint: disable=broad-except  (unknown or broken: OpenCV decides)
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def check_image_bytes(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
    """ValueError saying why the bytes of an image file will not be decoded: empty, more than
    `max_pixels` pixels by its header (None: no limit), or a JPEG or PNG cut short (no
    end-of-image marker after the last scan; no IEND chunk)."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    size = header_size(data) if max_pixels is not None else None
    if size is not None and size[0] * size[1] > max_pixels:
        raise ValueError(f"{size[0]}x{size[1]} pixels ({size[0] * size[1] / 1e6:.0f} "
                         f"megapixels) is more than the {max_pixels / 1e6:g} megapixels "
                         "decoded at most; downscale it first")
    fmt = image_format(data)
    if fmt == "jpeg":
        scan = data.rfind(b"\xff\xda")  # the last start-of-scan; entropy data has no 0xFFD9
        if scan >= 0 and data.find(b"\xff\xd9", scan) < 0:
            raise ValueError("truncated JPEG: no end-of-image marker after its image data")
    elif fmt == "png" and data.rfind(b"IEND") < 0:
        raise ValueError("truncated PNG: no IEND chunk at its end")


def decode_image(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """RGB uint8 (H,W,3) of an image file's bytes: grey, 16-bit, CMYK and alpha images become
    8-bit RGB (alpha dropped). ValueError saying why otherwise (check_image_bytes)."""
    check_image_bytes(data, max_pixels)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("not a decodable image (PNG, JPEG, BMP, TIFF, WebP, ...)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image(path: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[bytes, np.ndarray]:
    """(file bytes, RGB uint8 (H,W,3)); ValueError saying why when unreadable (decode_image)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the file: {e.strerror or e}") from e
    return data, decode_image(data, max_pixels)


# Per-process caches of landmark/detector objects (built on first use in each worker).
_CACHE: dict[Any, Any] = {}


def _cached(key, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


@dataclasses.dataclass(frozen=True)
class AlignedImageTask:
    """One Seq-DeepFake image: its file, the stored size and how to get landmarks.

    landmarks: 'dlib' (the extra) or 'template' (mean template at ``anchors``).
    """

    path: str
    image_size: int = 256
    landmarks: str = "template"
    anchors: tuple | None = None
    jpeg_quality: int = 95


def process_aligned_image(task: AlignedImageTask):
    """-> ("ok", dict(image bytes, landmarks float32 (68,2), landmark_source str)) | error tuple.

    Keeps the original bytes when the image is already image_size square; otherwise takes the
    centre square, resizes and re-encodes in the original format (JPEG stays JPEG).
    """
    try:
        data, image = read_image(task.path)
    except ValueError as e:
        return ("error", common.UNREADABLE_IMAGE, str(e))
    size = task.image_size
    fmt = image_format(data)
    if image.shape[:2] != (size, size) or fmt is None:
        image = resize_square(image, size)
        data = encode(image, fmt or "png", task.jpeg_quality)
    source = "template"
    points = None
    if task.landmarks == "dlib":
        dlib_faces = _cached("dlib", lm_lib.DlibFaces)
        face = lm_lib.largest_face(dlib_faces.detect(image))
        if face is not None:
            points, source = face.points, "dlib"
        else:
            source = "template (dlib found no face)"
    if points is None:
        anchors = None if task.anchors is None else np.asarray(task.anchors).reshape(3, 2)
        points = _cached(("template", size, task.anchors),
                         lambda: lm_lib.aligned_landmarks(size, anchors))
    return ("ok", {"image": data, "landmarks": np.asarray(points, np.float32),
                   "landmark_source": source})


# --------------------------------------------------------------------------------------------
# Frames


def sample_indices(num_frames: int, num: int) -> list[int]:
    """``num`` frame indices spread evenly over [0, num_frames) (all frames when fewer)."""
    if num_frames <= 0:
        return []
    if num >= num_frames:
        return list(range(num_frames))
    return sorted({round(float(x)) for x in np.linspace(0, num_frames - 1, num)})


def read_video_frames(path: str, num: int) -> list[tuple[int, np.ndarray]]:
    """[(frame index, RGB uint8 (H,W,3))] of ``num`` evenly spaced frames of a video file.

    Reads sequentially (grab / retrieve), which is exact for every codec. Raises ValueError
    when OpenCV cannot open the file or decodes no frame.
    """
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise ValueError("OpenCV cannot open it as a video")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if count <= 0:  # unknown length: decode everything once to count
            count = 0
            while cap.grab():
                count += 1
            cap.release()
            cap = cv2.VideoCapture(path)
        wanted = sample_indices(count, num)
        frames, i = [], 0
        for target in wanted:
            while i < target and cap.grab():
                i += 1
            if i < target:
                break
            ok, bgr = cap.read()
            i += 1
            if not ok or bgr is None:
                break
            frames.append((target, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    finally:
        cap.release()
    if not frames:
        raise ValueError("no frame could be decoded")
    return frames


def list_frame_files(directory: str) -> list[str]:
    """Sorted image file names in a frame folder (numeric order when the names are numbers)."""
    names = [n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTS)]

    def key(n):
        stem = os.path.splitext(n)[0]
        return (0, int(stem), n) if stem.isdigit() else (1, 0, n)

    return sorted(names, key=key)


def read_folder_frames(directory: str, num: int
                       ) -> tuple[list[tuple[int, np.ndarray]], list, list[str]]:
    """(frames, unreadable, names) of ``num`` evenly spaced images of a frame folder.

    frames: [(index in the sorted folder, RGB uint8)]; unreadable: [(file name, why)];
    names: the sorted file names (index -> name).
    """
    names = list_frame_files(directory)
    frames, bad = [], []
    for idx in sample_indices(len(names), num):
        try:
            _, image = read_image(os.path.join(directory, names[idx]))
        except ValueError as e:
            bad.append((names[idx], str(e)))
            continue
        frames.append((idx, image))
    return frames, bad, names


def crop_face(image: np.ndarray, box, margin: float, size: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Square crop around a face box, resized to (size, size, 3).

    The crop is centred on the box with side max(w, h) * (1 + 2 * margin); parts outside the
    frame are black. Returns (crop, offset (2,) of the crop's top-left pixel in the frame,
    scale = size / side) so that p_crop = (p - offset + 0.5) * scale - 0.5.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    side_px = max(2, round(side))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left = round(cx - side_px / 2.0)
    top = round(cy - side_px / 2.0)
    h, w = image.shape[:2]
    window = np.zeros((side_px, side_px, 3), np.uint8)
    sx0, sy0 = max(left, 0), max(top, 0)
    sx1, sy1 = min(left + side_px, w), min(top + side_px, h)
    if sx1 > sx0 and sy1 > sy0:
        window[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = image[sy0:sy1, sx0:sx1]
    interp = cv2.INTER_AREA if side_px > size else cv2.INTER_LINEAR
    crop = cv2.resize(window, (size, size), interpolation=interp)
    return crop, np.array([left, top], np.float64), np.float64(size / side_px)


def to_crop_coords(points: np.ndarray, offset: np.ndarray, scale: float) -> np.ndarray:
    """Frame (x, y) pixels -> crop pixels (pixel-centre convention of cv2.resize)."""
    return ((np.asarray(points, np.float64) - offset + 0.5) * scale - 0.5).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class VideoTask:
    """One video (file) or frame folder to sample, detect and crop.

    detector: a (kind, model path) pair for ``landmarks.make_detector`` (built once per worker),
    or a picklable callable ``image -> list[Face]``. landmarks: 'dlib' = run the dlib predictor
    on boxes from detectors without 68 points; 'template' = fit the mean template.
    pad: for frame folders that are already face crops, a border of pad * side added before
    detection so that a face filling the frame is still found.
    """

    path: str
    is_folder: bool
    num_frames: int = 32
    image_size: int = 256
    margin: float = 0.25
    detector: Any = ("auto", None)
    landmarks: str = "template"
    pad: float = 0.0
    fmt: str = "jpeg"
    jpeg_quality: int = 95


def _detector(spec):
    if callable(spec):
        return spec
    return _cached(("detector",) + tuple(spec), lambda: lm_lib.make_detector(*spec))


def _detect(detector, image: np.ndarray, pad: float) -> lm_lib.Face | None:
    if pad <= 0:
        return lm_lib.largest_face(detector(image))
    p = round(pad * max(image.shape[:2]))
    padded = cv2.copyMakeBorder(image, p, p, p, p, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    face = lm_lib.largest_face(detector(padded))
    if face is None:
        return None
    points = None if face.points is None else np.asarray(face.points, np.float32) - p
    return lm_lib.Face(np.asarray(face.box, np.float32) - p, points, face.score)


def _predictor(detector, landmarks: str):
    """dlib's 68-point predictor when `landmarks` is 'dlib' and the detector gives no points."""
    if landmarks == "dlib" and not isinstance(detector, lm_lib.DlibFaces):
        return _cached("dlib", lm_lib.DlibFaces)
    return None


def crop_largest_face(image: np.ndarray, detector, predictor, *, pad: float = 0.0,
                      margin: float = 0.25, image_size: int = 256, fmt: str = "jpeg",
                      jpeg_quality: int = 95) -> dict | None:
    """The largest face of an RGB image, cropped (``crop_face``) and landmarked:
    dict(image bytes, landmarks float32 (68,2) in the crop, landmark_source str), or None when
    the detector finds no face."""
    face = _detect(detector, image, pad)
    if face is None:
        return None
    points, source = lm_lib.face_landmarks(face, image, predictor)
    crop, offset, scale = crop_face(image, face.box, margin, image_size)
    return {"image": encode(crop, fmt, jpeg_quality),
            "landmarks": to_crop_coords(points, offset, scale), "landmark_source": source}


@dataclasses.dataclass(frozen=True)
class ImageTask:
    """One photo to detect, crop and landmark (fields as in ``VideoTask``)."""

    path: str
    image_size: int = 256
    margin: float = 0.25
    detector: Any = ("auto", None)
    landmarks: str = "template"
    pad: float = 0.0
    fmt: str = "jpeg"
    jpeg_quality: int = 95


def process_image(task: ImageTask):
    """-> ("ok", dict(image, landmarks, landmark_source)) | ("error", reason, detail): an
    unreadable file is UNREADABLE_IMAGE, a photo without a detectable face NO_FACE."""
    try:
        _, image = read_image(task.path)
    except ValueError as e:
        return ("error", common.UNREADABLE_IMAGE, str(e))
    detector = _detector(task.detector)
    rec = crop_largest_face(image, detector, _predictor(detector, task.landmarks), pad=task.pad,
                            margin=task.margin, image_size=task.image_size, fmt=task.fmt,
                            jpeg_quality=task.jpeg_quality)
    if rec is None:
        return ("error", common.NO_FACE, f"the face detector found no face in the "
                f"{image.shape[1]}x{image.shape[0]} image")
    return ("ok", rec)


def process_video(task: VideoTask):
    """-> ("ok", (frames, notes)) | ("error", reason, detail).

    frames: list of dict(image bytes, landmarks float32 (68,2), frame_index int, name str
    (the frame's file name in a folder, else the zero-padded index), landmark_source str).
    notes: {what: count} (frames without a face, unreadable frame images).
    A video none of whose sampled frames shows a face is an error (NO_FACE).
    """
    notes: dict[str, int] = {}
    try:
        if task.is_folder:
            frames, bad, names = read_folder_frames(task.path, task.num_frames)
            if bad:
                notes["unreadable frame images"] = len(bad)
            if not frames:
                why = f"{len(bad)} unreadable frame images" if bad else "no frame images"
                return ("error", common.UNREADABLE_VIDEO, why)
        else:
            frames = read_video_frames(task.path, task.num_frames)
    except (ValueError, OSError) as e:
        return ("error", common.UNREADABLE_VIDEO, str(e))
    detector = _detector(task.detector)
    predictor = _predictor(detector, task.landmarks)
    out = []
    for index, image in frames:
        rec = crop_largest_face(image, detector, predictor, pad=task.pad, margin=task.margin,
                                image_size=task.image_size, fmt=task.fmt,
                                jpeg_quality=task.jpeg_quality)
        if rec is None:
            notes["frames without a face"] = notes.get("frames without a face", 0) + 1
            continue
        name = names[index] if task.is_folder else f"{index:06d}"
        out.append({**rec, "frame_index": int(index), "name": name})
    if not out:
        return ("error", common.NO_FACE, f"no face in any of {len(frames)} sampled frames")
    return ("ok", (out, notes))
