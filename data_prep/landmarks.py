"""Face detection and 68-point landmarks for data preparation.

Two tiers:

* The ``landmarks`` extra (``pip install -e '.[landmarks]'``: dlib-bin and
  face-recognition-models, whose 68-point shape predictor ships inside the package, so it works
  offline): dlib's HOG face detector and the iBUG 68-point predictor, per image.
* Without it: a mean 68-point template, placed either by the alignment that a dataset's faces
  already share (Seq-DeepFake: FFHQ / CelebA-HQ alignment) or by a detector's box or five
  key points. The template is ours: the mean of the built-in synthetic faces' exact landmarks
  (``cmil_jax.data.synthetic``, 200 neutral faces), normalised to unit eye distance. It is an
  approximation: SBI masks built from it follow the average face, not each face.

Face detectors (``make_detector``): 'dlib' (extra), 'haar' (an OpenCV Haar cascade; the
OpenCV 4.x wheels ship them in ``cv2.data.haarcascades``, the 5.x wheels do not, so pass the
XML file), 'yunet' (``cv2.FaceDetectorYN`` with a user-supplied ONNX model; gives five key
points). Any callable ``image -> list[Face]`` works as a detector too.

Coordinates are (x, y) pixels with pixel centres at integer coordinates; boxes are
(x0, y0, x1, y1).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import cv2
import numpy as np

from cmil_jax.data.landmarks68 import (
    LEFT_EYE,
    MOUTH_LEFT,
    MOUTH_RIGHT,
    NOSE_TIP,
    NUM_LANDMARKS,
    RIGHT_EYE,
)

# Mean shape, iBUG 68-point order; origin at the midpoint of the eye centres, x to the image
# right, y down, unit = distance between the eye centres. [ours] (see module docstring)
MEAN_TEMPLATE = np.array([
    (-1.262, 0.113), (-1.242, 0.521), (-1.171, 0.843), (-1.058, 1.117),
    (-0.909, 1.346), (-0.731, 1.528), (-0.528, 1.661), (-0.298, 1.742),
    (0.000, 1.769), (0.298, 1.742), (0.528, 1.661), (0.731, 1.528),
    (0.909, 1.346), (1.058, 1.117), (1.171, 0.843), (1.242, 0.521),
    (1.262, 0.113), (-0.800, -0.235), (-0.676, -0.311), (-0.552, -0.314),
    (-0.428, -0.290), (-0.304, -0.257), (0.304, -0.257), (0.428, -0.290),
    (0.552, -0.314), (0.676, -0.311), (0.800, -0.235), (0.000, -0.016),
    (0.000, 0.170), (0.000, 0.356), (0.000, 0.542), (-0.283, 0.590),
    (-0.142, 0.637), (0.000, 0.648), (0.142, 0.637), (0.283, 0.590),
    (-0.720, 0.011), (-0.573, -0.091), (-0.427, -0.088), (-0.280, 0.021),
    (-0.427, 0.075), (-0.573, 0.071), (0.280, 0.021), (0.427, -0.088),
    (0.573, -0.091), (0.720, 0.011), (0.573, 0.071), (0.427, 0.075),
    (-0.420, 1.004), (-0.252, 0.931), (-0.105, 0.920), (0.000, 0.936),
    (0.105, 0.920), (0.252, 0.931), (0.420, 1.004), (0.252, 1.121),
    (0.126, 1.147), (0.000, 1.154), (-0.126, 1.147), (-0.252, 1.121),
    (-0.378, 1.005), (-0.147, 1.009), (0.000, 1.009), (0.147, 1.009),
    (0.378, 1.005), (0.147, 1.009), (0.000, 1.009), (-0.147, 1.009),
], np.float64)

# Where FFHQ-style alignment (used by FFHQ and CelebA-HQ, the sources of Seq-DeepFake's
# attribute and component subsets) puts the two eye centres and the mouth centre, as fractions
# of the image side, for a face whose eye distance equals its eye-to-mouth distance (as the
# template's): the crop side is 4x the eye distance and its centre lies 0.1 eye-to-mouth below
# the eye midpoint. [ours: derived from the published alignment procedure]
ALIGNED_ANCHORS = np.array([(0.375, 0.475), (0.625, 0.475), (0.5, 0.725)], np.float64)


def _anchor_points(landmarks: np.ndarray) -> np.ndarray:
    """(3,2) eye centres and mouth centre (mean of the mouth corners) of (68,2) landmarks."""
    lm = np.asarray(landmarks, np.float64)
    return np.stack([lm[LEFT_EYE].mean(0), lm[RIGHT_EYE].mean(0),
                     (lm[MOUTH_LEFT] + lm[MOUTH_RIGHT]) / 2])


def _five_points(landmarks: np.ndarray) -> np.ndarray:
    """(5,2) eye centres, nose tip, mouth corners of (68,2) landmarks (image-left first)."""
    lm = np.asarray(landmarks, np.float64)
    return np.stack([lm[LEFT_EYE].mean(0), lm[RIGHT_EYE].mean(0), lm[NOSE_TIP],
                     lm[MOUTH_LEFT], lm[MOUTH_RIGHT]])


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix of the least-squares similarity (scale, rotation, shift) taking src to dst.

    src, dst: (K,2) corresponding points, K >= 2. No reflection.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var = (s ** 2).sum()
    if var <= 0:
        raise ValueError("similarity_fit: source points coincide")
    a = (s * d).sum() / var  # scale * cos
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / var  # scale * sin
    rot = np.array([[a, -b], [b, a]])
    return np.concatenate([rot, (mu_d - rot @ mu_s)[:, None]], axis=1)


def apply_affine(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(K,2) points mapped by a 2x3 affine matrix."""
    pts = np.asarray(points, np.float64)
    return pts @ np.asarray(matrix, np.float64)[:, :2].T + np.asarray(matrix)[:, 2]


def aligned_landmarks(size: int | tuple[int, int],
                      anchors: Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """float32 (68,2) template landmarks for a face aligned like FFHQ / CelebA-HQ.

    size: image side in pixels (or (width, height)). anchors: (3,2) fractions of the image
    (left eye centre, right eye centre, mouth centre); default ``ALIGNED_ANCHORS``.
    """
    w, h = (size, size) if np.isscalar(size) else size
    anchors = ALIGNED_ANCHORS if anchors is None else np.asarray(anchors, np.float64)
    if anchors.shape != (3, 2):
        raise ValueError(f"anchors must be 3 (x, y) pairs, got shape {anchors.shape}")
    dst = anchors * np.array([w, h]) - 0.5  # fractions of the extent -> pixel-centre coords
    m = similarity_fit(_anchor_points(MEAN_TEMPLATE), dst)
    return apply_affine(MEAN_TEMPLATE, m).astype(np.float32)


def landmarks_from_points(points: np.ndarray) -> np.ndarray:
    """float32 (68,2) template fitted to five key points (eyes, nose tip, mouth corners).

    Points may come in any left/right order (YuNet reports the subject's right eye first);
    pairs are sorted by x.
    """
    p = np.asarray(points, np.float64).reshape(5, 2)
    eyes = p[:2][np.argsort(p[:2, 0])]
    mouth = p[3:5][np.argsort(p[3:5, 0])]
    dst = np.concatenate([eyes, p[2:3], mouth])
    m = similarity_fit(_five_points(MEAN_TEMPLATE), dst)
    return apply_affine(MEAN_TEMPLATE, m).astype(np.float32)


def landmarks_from_box(box: Sequence[float]) -> np.ndarray:
    """float32 (68,2) template stretched so that its bounding box fills ``box`` (rough)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    t = MEAN_TEMPLATE
    lo, hi = t.min(0), t.max(0)
    unit = (t - lo) / (hi - lo)
    return (np.array([x0, y0]) + unit * np.array([x1 - x0, y1 - y0])).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Detectors


@dataclasses.dataclass
class Face:
    """One detected face: box (x0, y0, x1, y1) pixels; optional key points (K,2), K = 5 or 68."""

    box: np.ndarray
    points: np.ndarray | None = None
    score: float = 1.0

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class NoDetectorError(RuntimeError):
    """No face detector is available in this installation."""


def dlib_available() -> bool:
    """True when the ``landmarks`` extra (dlib + face_recognition_models) can be imported."""
    try:
        import dlib  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        import face_recognition_models  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return False
    return True


def haar_cascade_path() -> str | None:
    """The frontal-face Haar cascade shipped with OpenCV, or None (OpenCV 5.x wheels ship none)."""
    base = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if not base:
        return None
    path = os.path.join(base, "haarcascade_frontalface_default.xml")
    return path if os.path.isfile(path) else None


class DlibFaces:
    """dlib HOG detector + 68-point predictor from face_recognition_models (the extra).

    ``detect(image)`` -> list[Face] with 68 points; ``predict(image, box)`` -> (68,2).
    """

    def __init__(self, upsample: int = 1):
        import dlib  # pylint: disable=import-outside-toplevel
        import face_recognition_models  # pylint: disable=import-outside-toplevel

        self._dlib = dlib
        self.upsample = upsample
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(
            face_recognition_models.pose_predictor_model_location())

    def predict(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        shape = self.predictor(np.ascontiguousarray(image), self._dlib.rectangle(x0, y0, x1, y1))
        return np.array([(p.x, p.y) for p in shape.parts()], np.float32)

    def detect(self, image: np.ndarray) -> list[Face]:
        image = np.ascontiguousarray(image)
        faces = []
        for r in self.detector(image, self.upsample):
            box = np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32)
            faces.append(Face(box, self.predict(image, box)))
        return faces

    __call__ = detect


class HaarDetector:
    """OpenCV cascade detector (boxes only)."""

    def __init__(self, cascade_path: str | None = None, min_size_fraction: float = 0.1):
        path = cascade_path or haar_cascade_path()
        if path is None or not os.path.isfile(path):
            raise NoDetectorError(f"Haar cascade file not found: {path!r}")
        self.path = path
        self.min_size_fraction = min_size_fraction
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise NoDetectorError(f"OpenCV could not load the Haar cascade {path}")

    def __call__(self, image: np.ndarray) -> list[Face]:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        m = max(16, int(self.min_size_fraction * min(gray.shape)))
        rects = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                              minSize=(m, m))
        return [Face(np.array([x, y, x + w, y + h], np.float32)) for x, y, w, h in rects]


class YuNetDetector:
    """OpenCV's FaceDetectorYN with a YuNet ONNX model file; boxes plus five key points."""

    def __init__(self, model_path: str, score_threshold: float = 0.8):
        if not model_path or not os.path.isfile(model_path):
            raise NoDetectorError(f"YuNet model file not found: {model_path!r}")
        self.model_path = model_path
        self.net = cv2.FaceDetectorYN.create(model_path, "", (320, 320), score_threshold)

    def __call__(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        self.net.setInputSize((w, h))
        _, rows = self.net.detect(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        faces = []
        for r in (rows if rows is not None else []):
            x, y, bw, bh = (float(v) for v in r[:4])
            faces.append(Face(np.array([x, y, x + bw, y + bh], np.float32),
                              np.asarray(r[4:14], np.float32).reshape(5, 2), float(r[14])))
        return faces


DETECTOR_KINDS = ("auto", "dlib", "haar", "yunet")


def no_detector_message() -> str:
    return ("no face detector is available: install the landmarks extra "
            "(pip install -e '.[landmarks]', dlib + its 68-point model, works offline), "
            "or pass --detector haar --detector-model haarcascade_frontalface_default.xml "
            "(shipped by OpenCV 4.x; this OpenCV "
            f"{cv2.__version__} has none in cv2.data.haarcascades), or --detector yunet "
            "--detector-model face_detection_yunet.onnx")


def make_detector(kind: str = "auto", model_path: str | None = None):
    """A detector callable ``image (H,W,3) RGB uint8 -> list[Face]`` of the given kind.

    'auto': the model file when one is given (.onnx = YuNet, else a Haar cascade XML), else
    dlib when the extra is installed, else OpenCV's bundled Haar cascade when present, else
    NoDetectorError saying what to install or pass.
    """
    if kind not in DETECTOR_KINDS:
        raise ValueError(f"unknown detector {kind!r}; expected one of {DETECTOR_KINDS}")
    if kind == "auto":
        if model_path:
            return YuNetDetector(model_path) if model_path.endswith(".onnx") \
                else HaarDetector(model_path)
        if dlib_available():
            return DlibFaces()
        if haar_cascade_path():
            return HaarDetector()
        raise NoDetectorError(no_detector_message())
    if kind == "dlib":
        if not dlib_available():
            raise NoDetectorError("--detector dlib needs the landmarks extra: "
                                  "pip install -e '.[landmarks]'")
        return DlibFaces()
    if kind == "haar":
        if model_path is None and haar_cascade_path() is None:
            raise NoDetectorError(no_detector_message())
        return HaarDetector(model_path)
    return YuNetDetector(model_path)


def detector_name(detector) -> str:
    """Human-readable name of a detector for build summaries."""
    if isinstance(detector, DlibFaces):
        return "dlib HOG + 68-point predictor"
    if isinstance(detector, HaarDetector):
        return f"OpenCV Haar cascade ({os.path.basename(detector.path)}) + template landmarks"
    if isinstance(detector, YuNetDetector):
        return "OpenCV YuNet (5 key points) + template landmarks"
    return getattr(detector, "name", type(detector).__name__)


def face_landmarks(face: Face, image: np.ndarray | None = None,
                   predictor: DlibFaces | None = None) -> tuple[np.ndarray, str]:
    """float32 (68,2) landmarks of a detected face and where they came from.

    68 detector points are used as they are; otherwise the dlib predictor on the box when
    given; otherwise the template fitted to five key points, else to the box.
    Returns (landmarks, source) with source in 'detector', 'dlib', 'template-5pt', 'template-box'.
    """
    pts = None if face.points is None else np.asarray(face.points, np.float32)
    if pts is not None and pts.shape == (NUM_LANDMARKS, 2):
        return pts, "detector"
    if predictor is not None and image is not None:
        return predictor.predict(image, face.box), "dlib"
    if pts is not None and pts.shape == (5, 2):
        return landmarks_from_points(pts), "template-5pt"
    return landmarks_from_box(face.box), "template-box"


def largest_face(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box (the usual choice for one-subject benchmarks), or None."""
    faces = [f for f in faces if f.area > 0]
    return max(faces, key=lambda f: f.area) if faces else None
