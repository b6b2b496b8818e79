"""TFDS (ArrayRecord) face-record datasets: their schema, and a reader for any such dataset.

Record schema (``seq_deepfake_features()``), shared by all builders (the built-in synthetic
faces, ``cmil_jax.data.synthetic_dataset``; Seq-DeepFake and the video benchmarks, data_prep/):

  image      bytes    encoded PNG or JPEG (any colour image OpenCV decodes), or raw pixels
                      (``encode_raw``), RGB content
  label      int32 (5,)    manipulation sequence, 0-padded (all zeros = original)
  landmarks  float32 (68,2) (x, y) pixels in the stored image, iBUG 68-point order (landmarks68)
  mask       bytes    encoded PNG or raw pixels of a uint8 (H,W) manipulation mask (0..255);
                      b'' = no mask
  path       str      origin of the image (relative file name or synthetic id)

Images and masks are stored as encoded bytes in ``Tensor(shape=(), dtype=object)`` features, so
TFDS only (de)serialises bytes: building and reading need NumPy, array_record and OpenCV, not
TensorFlow. Decoding happens in ``RecordSource.__getitem__``, i.e. in the grain worker that
asks for the record. Synthetic images are PNG or raw (lossless, see ``synthetic_dataset``);
the data_prep builders keep a dataset's original JPEG bytes where they can, or store raw
pixels (``--image-format raw``).

Record formats (``IMAGE_FORMATS``), all read by the same ``decode_image`` / ``decode_mask``:
'png' / 'jpeg' (OpenCV codecs) and 'raw': ``RAW_MAGIC``, then height, width and channels as
little-endian uint32, then the uint8 pixels in (H, W, C) order, RGB. ArrayRecord already
compresses every record with zstd (level 3, TFDS's writer), so raw records are stored
losslessly compressed and read without any image codec: decoding is a copy. The pixels are
those the PNG/JPEG path decodes, bit for bit (tested).

Dataset names are ``<builder>/<config>`` directories under ``data_dir`` holding one version
directory each, e.g. ``cmil_synthetic/facial_components_112px_6000-600-1200_seed0/1.0.0``.
Splits are 'train', 'val' and 'test'.
"""

from __future__ import annotations

import inspect
import os
import re
import struct
from typing import Any

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cmil_jax.data.landmarks68 import NUM_LANDMARKS
from cmil_jax.faults import DataError
from cmil_jax.labels import MAX_LEN

SPLITS = ("train", "val", "test")
SYNTHETIC_BUILDER = "cmil_synthetic"  # builder name of cmil_jax.data.synthetic_dataset
SEQ_DEEPFAKE_BUILD_COMMAND = "python -m data_prep.seq_deepfake --raw-dir RAW --data-dir {data_dir}"


# --------------------------------------------------------------------------------------------
# Schema and encoding


def seq_deepfake_features():
    """The TFDS FeaturesDict of one face record (see module docstring)."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_,
                                      doc="encoded PNG/JPEG bytes, RGB"),
        "label": tfds.features.Tensor(shape=(MAX_LEN,), dtype=np.int32,
                                      doc="manipulation sequence, 0-padded"),
        "landmarks": tfds.features.Tensor(shape=(NUM_LANDMARKS, 2), dtype=np.float32,
                                          doc="68 (x, y) landmarks in pixels"),
        "mask": tfds.features.Tensor(shape=(), dtype=np.object_,
                                     doc="encoded PNG of a uint8 HxW mask; empty = none"),
        "path": tfds.features.Text(doc="origin of the image"),
    })


# How a builder stores pixels: 'png' (lossless, zlib), 'raw' (lossless, no codec; see above).
IMAGE_FORMATS = ("png", "raw")
RAW_MAGIC = b"CMILRAW\x00"
_RAW_HEADER = struct.Struct("<8sIII")  # magic, height, width, channels


def encode_raw(array: np.ndarray) -> bytes:
    """Raw record bytes of a uint8 (H,W) or RGB (H,W,3) array (header + pixels, see above)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
            array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"raw encoding takes uint8 (H,W) or (H,W,3) arrays, got "
                         f"{array.dtype} {array.shape}")
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else 3
    return _RAW_HEADER.pack(RAW_MAGIC, h, w, channels) + array.tobytes()


def decode_raw(data: bytes) -> np.ndarray | None:
    """uint8 (H,W) or (H,W,3) array (a writable copy) from raw record bytes; None when the
    bytes are not raw (no ``RAW_MAGIC``) or their length disagrees with the header."""
    if len(data) < _RAW_HEADER.size or not data.startswith(RAW_MAGIC):
        return None
    _, h, w, channels = _RAW_HEADER.unpack_from(data)
    if channels not in (1, 3) or len(data) != _RAW_HEADER.size + h * w * channels:
        return None
    shape = (h, w) if channels == 1 else (h, w, 3)
    return np.frombuffer(data, np.uint8, offset=_RAW_HEADER.size).reshape(shape).copy()


def _raw_problem(data: bytes) -> str:
    """'' for bytes that are not raw; else what is wrong with their header, for messages."""
    if not data.startswith(RAW_MAGIC):
        return ""
    if len(data) < _RAW_HEADER.size:
        return f" (raw record of {len(data)} bytes: shorter than its header)"
    _, h, w, c = _RAW_HEADER.unpack_from(data)
    return (f" (raw record of {len(data)} bytes; its header says {h}x{w}x{c}, expected "
            f"{_RAW_HEADER.size + h * w * c} bytes and 3 channels for images, 1 for masks)")


def encode_image(array: np.ndarray, image_format: str) -> bytes:
    """Record bytes of a uint8 (H,W) or RGB (H,W,3) array in ``image_format`` (IMAGE_FORMATS)."""
    if image_format == "png":
        return encode_png(array)
    if image_format == "raw":
        return encode_raw(array)
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")


def encode_mask(mask: np.ndarray, image_format: str) -> bytes:
    """Record bytes of a uint8 (H,W) mask in ``image_format``; raw masks that are all zero are
    stored as b'' (no mask: decoded as zeros of the image's shape)."""
    if image_format == "raw" and not np.any(mask):
        return b""
    return encode_image(mask, image_format)


def encode_png(array: np.ndarray, compression: int = 1) -> bytes:
    """PNG bytes of a uint8 (H,W) or RGB (H,W,3) array."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {array.shape}")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray | None:
    """uint8 RGB (H,W,3) from raw, PNG or JPEG bytes, or None if they cannot be decoded."""
    if not data:
        return None
    if data.startswith(RAW_MAGIC):
        img = decode_raw(data)
        if img is not None and img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        return img
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray | None:
    """uint8 (H,W) from raw or PNG bytes; zeros of ``shape`` for empty bytes; None if
    undecodable."""
    if not data:
        return np.zeros(shape, np.uint8)
    if data.startswith(RAW_MAGIC):
        mask = decode_raw(data)
        return mask if mask is not None and mask.ndim == 2 else None
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


# --------------------------------------------------------------------------------------------
# Builder base


class FaceRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the face-record builders (``synthetic_dataset.CmilSynthetic``, data_prep/).

    Declares ``seq_deepfake_features()`` and works around TFDS 4.9's ``code_path`` needing the
    ``importlib_resources`` backport on Python >= 3.9 (not installed, not otherwise needed).
    Subclasses define VERSION, configs, ``_split_generators`` and ``_generate_examples``;
    build with ``file_format="array_record"``.
    """

    DESCRIPTION = "Face images with manipulation-sequence labels, landmarks and masks."
    DISABLE_SHUFFLING = False

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(inspect.getfile(cls))

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=seq_deepfake_features(),
            disable_shuffling=self.DISABLE_SHUFFLING,
        )


# --------------------------------------------------------------------------------------------
# Reading

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def find_version_dir(dataset_dir: str) -> str | None:
    """Highest complete version directory (holding dataset_info.json) under dataset_dir."""
    if os.path.isfile(os.path.join(dataset_dir, "dataset_info.json")):
        return dataset_dir
    if not os.path.isdir(dataset_dir):
        return None
    versions = [v for v in os.listdir(dataset_dir) if _VERSION_RE.match(v)
                and os.path.isfile(os.path.join(dataset_dir, v, "dataset_info.json"))]
    if not versions:
        return None
    best = max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))
    return os.path.join(dataset_dir, best)


def _missing_message(data_dir: str, name: str, looked_at: str) -> str:
    msg = (f"dataset {name!r} not found: no complete TFDS dataset (dataset_info.json) "
           f"at {looked_at}. ")
    if name.startswith(SYNTHETIC_BUILDER + "/"):
        msg += ("Synthetic data is built automatically by the demo configs; to build it by hand "
                "call cmil_jax.data.synthetic_dataset.build_synthetic(data_dir, subset, "
                "image_size, ...).")
    elif name.startswith("seq_deepfake"):
        msg += "Build it with: " + SEQ_DEEPFAKE_BUILD_COMMAND.format(data_dir=data_dir)
    else:
        msg += "Build it with its data_prep builder (see data_prep/)."
    return msg


class RecordSource:
    """Random access to one split of a TFDS ArrayRecord face dataset, decoded with OpenCV.

    ``source[i]`` -> dict of numpy: image uint8 (H,W,3) RGB, mask uint8 (H,W), label int32 (5,),
    landmarks float32 (68,2), is_fake int32 () (from the record if present, else label != 0),
    path str. Picklable (grain workers reopen the files).
    """

    def __init__(self, version_dir: str, name: str, split: str):
        self.name = name
        self.split = split
        self.version_dir = version_dir
        builder = tfds.builder_from_directory(version_dir)
        if split not in builder.info.splits:
            raise ValueError(f"dataset {name!r} at {version_dir} has no split {split!r}; "
                             f"available: {sorted(builder.info.splits)}")
        self._ds = builder.as_data_source(split=split)
        self._len = len(self._ds)
        self._labels = None

    def __len__(self) -> int:
        return self._len

    def __repr__(self):
        return f"RecordSource({self.name!r}, split={self.split!r}, len={self._len})"

    def _where(self, index) -> str:
        return f"dataset {self.name!r} split {self.split!r} record {index} (of {self._len})"

    def raw(self, index: int) -> dict[str, Any]:
        """The stored record (encoded bytes undecoded)."""
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"{self._where(index)}: index out of range")
        try:
            return self._ds[index]
        except Exception as e:  # array_record / proto errors
            raise DataError(f"{self._where(index)}: cannot read the record: {e}") from e

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.raw(index)
        try:
            image = decode_image(rec["image"])
            if image is None:
                raise ValueError("image bytes are not a decodable PNG/JPEG"
                                 + _raw_problem(rec["image"]))
            mask = decode_mask(rec.get("mask", b""), image.shape[:2])
            if mask is None:
                raise ValueError("mask bytes are not a decodable PNG" + _raw_problem(rec["mask"]))
            if mask.shape != image.shape[:2]:
                raise ValueError(f"mask shape {mask.shape} != image shape {image.shape[:2]}")
            label = np.asarray(rec["label"], np.int32)
            if label.shape != (MAX_LEN,):
                raise ValueError(f"label shape {label.shape}, expected ({MAX_LEN},)")
            landmarks = np.asarray(rec.get("landmarks", np.zeros((NUM_LANDMARKS, 2))), np.float32)
            if "is_fake" in rec:
                is_fake = np.int32(rec["is_fake"])
            else:
                is_fake = np.int32(label.any())
        except Exception as e:
            raise DataError(f"{self._where(index)} ({_path_str(rec)}): {e}") from e
        return {"image": image, "mask": mask, "label": label, "landmarks": landmarks,
                "is_fake": is_fake, "path": _path_str(rec), **extra_fields(rec)}

    def labels(self) -> np.ndarray:
        """All labels, int32 (N,5), read without decoding images (cached)."""
        if self._labels is None:
            self._labels = np.stack([np.asarray(self.raw(i)["label"], np.int32)
                                     for i in range(self._len)]) if self._len else \
                np.zeros((0, MAX_LEN), np.int32)
        return self._labels

    def is_fake(self) -> np.ndarray:
        """int32 (N,) fake flags: the record's is_fake when stored, else label != 0."""
        first = self.raw(0) if self._len else {}
        if "is_fake" in first:
            return np.array([int(self.raw(i)["is_fake"]) for i in range(self._len)], np.int32)
        return self.labels().any(axis=1).astype(np.int32)


def _path_str(rec) -> str:
    p = rec.get("path", b"")
    return p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p)


def open_split(data_dir: str | os.PathLike, name: str, split: str) -> RecordSource:
    """Random-access source for ``split`` of dataset ``name`` ('<builder>/<config>[/<version>]').

    Raises FileNotFoundError naming the path looked at and how to build the dataset.
    """
    data_dir = os.fspath(data_dir)
    dataset_dir = os.path.join(data_dir, name)
    version_dir = find_version_dir(dataset_dir)
    if version_dir is None:
        raise FileNotFoundError(_missing_message(data_dir, name, dataset_dir))
    return RecordSource(version_dir, name, split)


# --------------------------------------------------------------------------------------------
# Video-frame records (data_prep.common.video_frame_features): extra keys.
# RecordSource.__getitem__ passes these through when a record has them (is_fake is read above).

EXTRA_TEXT_KEYS = ("video_id", "method")
EXTRA_INT_KEYS = ("frame_index",)


def extra_fields(rec) -> dict[str, Any]:
    """The extra keys a record holds: video_id, method (str), frame_index (int32 ())."""
    out = {}
    for k in EXTRA_TEXT_KEYS:
        if k in rec:
            v = rec[k]
            out[k] = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    for k in EXTRA_INT_KEYS:
        if k in rec:
            out[k] = np.int32(rec[k])
    return out


def video_ids(source: RecordSource) -> np.ndarray:
    """(N,) str: the video id of each record of a split, read without decoding images.

    Records without a video_id (single images) are their own video: their path is used.
    For video-level scores, average frame scores over equal ids.
    """
    ids = []
    for i in range(len(source)):
        rec = source.raw(i)
        ids.append(extra_fields(rec).get("video_id") or _path_str(rec))
    return np.array(ids, dtype=object)
