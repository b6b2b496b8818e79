"""Weak augmentation (method.md, "Data and training"): random crop, horizontal flip, colour jitter, blur.

NumPy + OpenCV on the host, uint8 in and uint8 out, driven by one ``np.random.Generator`` so a
pipeline is deterministic per seed. Geometric ops (crop, flip) move the manipulation mask and
the 68 landmarks with the image; photometric ops touch the image only.

The magnitudes below are ours (the paper names the four operations only) [ours].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from cmil_jax.data import landmarks68


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Weak augmentation parameters. Probabilities in [0, 1]; fractions of the image side.

    crop_mode: 'resized' (random-resized crop: area fraction in ``crop_scale``, aspect ratio in
      ``crop_ratio``), 'pad' (pad by ``crop_pad`` * side on each border with reflection, then a
      random crop of the original size) or 'none'. All modes end at the requested output size.
    hue: maximal hue rotation as a fraction of the colour circle (0.02 = +-7.2 degrees).
    Colour jitter is one affine colour matrix (see ``color_jitter``).
    """

    flip_p: float = 0.5
    crop_mode: str = "resized"
    crop_p: float = 1.0
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.0 / 0.9)
    crop_pad: float = 0.0625
    jitter_p: float = 0.8
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.02
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.2)

    def __post_init__(self):
        if self.crop_mode not in ("resized", "pad", "none"):
            raise ValueError("crop_mode must be 'resized', 'pad' or 'none', "
                             f"got {self.crop_mode!r}")


def as_config(cfg: AugmentConfig | Mapping[str, Any] | None) -> AugmentConfig:
    """AugmentConfig from None (defaults), a dict / ConfigDict of overrides, or itself."""
    if cfg is None:
        return AugmentConfig()
    if isinstance(cfg, AugmentConfig):
        return cfg
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
        cfg = cfg.to_dict()
    cfg = dict(cfg)
    for key in ("crop_scale", "crop_ratio", "blur_sigma"):
        if key in cfg:
            cfg[key] = tuple(float(v) for v in cfg[key])
    return AugmentConfig(**cfg)


def resize(image: np.ndarray, size: int, interpolation: int | None = None) -> np.ndarray:
    """Resize (H,W[,C]) to (size,size[,C]); area filter when shrinking, bilinear otherwise."""
    h, w = image.shape[:2]
    if h == size and w == size:
        return image
    if interpolation is None:
        interpolation = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 (H,W) mask to (size,size) (bilinear keeps soft SBI edges)."""
    return resize(mask, size)


def _crop_box(rng: np.random.Generator, h: int, w: int, cfg: AugmentConfig):
    """Random crop box (x0, y0, cw, ch) in pixels; may extend past the image in 'pad' mode."""
    if cfg.crop_mode == "none" or rng.random() >= cfg.crop_p:
        return 0.0, 0.0, float(w), float(h)
    if cfg.crop_mode == "pad":
        px, py = cfg.crop_pad * w, cfg.crop_pad * h
        return rng.uniform(-px, px), rng.uniform(-py, py), float(w), float(h)
    area = h * w
    log_ratio = np.log(cfg.crop_ratio)
    for _ in range(10):
        target = area * rng.uniform(*cfg.crop_scale)
        ratio = np.exp(rng.uniform(*log_ratio))
        cw, ch = np.sqrt(target * ratio), np.sqrt(target / ratio)
        if cw <= w and ch <= h:
            return rng.uniform(0, w - cw), rng.uniform(0, h - ch), cw, ch
    side = min(h, w) * np.sqrt(cfg.crop_scale[1])
    return (w - side) / 2, (h - side) / 2, side, side


def crop_and_resize(image, box, size, mask=None, landmarks=None):
    """Crop ``box`` = (x0, y0, cw, ch) (pixels, may leave the image) and resize to size x size.

    Returns (image (S,S,3) uint8, mask (S,S) uint8 or None, landmarks (68,2) float32 or None).
    Outside the image the content is reflected (image) or zero (mask).
    """
    h, w = image.shape[:2]
    x0, y0, cw, ch = box
    sx, sy = size / cw, size / ch
    inside = x0 >= 0 and y0 >= 0 and x0 + cw <= w and y0 + ch <= h
    if inside:
        # Integer crop then one resize: area filter when shrinking avoids aliasing.
        xi, yi = round(x0), round(y0)
        wi, hi = max(1, round(cw)), max(1, round(ch))
        xi, yi = min(xi, w - wi), min(yi, h - hi)
        sx, sy, x0, y0 = size / wi, size / hi, xi, yi
        out = image[yi:yi + hi, xi:xi + wi]
        interp = cv2.INTER_AREA if (wi > size and hi > size) else cv2.INTER_LINEAR
        out = cv2.resize(out, (size, size), interpolation=interp)
        if mask is not None:
            mask = cv2.resize(mask[yi:yi + hi, xi:xi + wi], (size, size), interpolation=interp)
    else:
        m = np.array([[sx, 0.0, -x0 * sx], [0.0, sy, -y0 * sy]], np.float32)
        out = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT_101)
        if mask is not None:
            mask = cv2.warpAffine(mask, m, (size, size), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if landmarks is not None:
        landmarks = ((landmarks - np.array([x0, y0], np.float32))
                     * np.array([sx, sy], np.float32)).astype(np.float32)
    return out, mask, landmarks


def hflip(image, mask=None, landmarks=None):
    """Mirror left-right; landmarks (68,2) are mirrored and re-indexed by
    ``landmarks68.FLIP_PERMUTATION`` (other point counts are only mirrored)."""
    w = image.shape[1]
    image = cv2.flip(image, 1)
    if mask is not None:
        mask = cv2.flip(mask, 1)
    if landmarks is not None:
        landmarks = landmarks.copy()
        landmarks[:, 0] = (w - 1) - landmarks[:, 0]
        if landmarks.shape[0] == landmarks68.NUM_LANDMARKS:
            landmarks = landmarks[landmarks68.FLIP_PERMUTATION]
    return image, mask, landmarks


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # Rec. 601, as torchvision


def _hue_matrix(theta: float) -> np.ndarray:
    """3x3 RGB hue rotation by ``theta`` radians about the grey axis (SVG feColorMatrix form)."""
    c, s = np.cos(theta), np.sin(theta)
    lum = np.array([0.213, 0.715, 0.072])
    cos_part = np.array([[0.787, -0.715, -0.072], [-0.213, 0.285, -0.072], [-0.213, -0.715, 0.928]])
    sin_part = np.array([[-0.213, -0.715, 0.928], [0.143, 0.140, -0.283], [-0.787, 0.715, 0.072]])
    return (lum[None, :] + c * cos_part + s * sin_part).astype(np.float32)


def color_jitter(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Brightness, contrast, saturation factors U(1-a, 1+a) and a hue rotation; uint8 RGB.

    All four are linear in RGB, so they are composed into one 3x4 affine colour matrix and
    applied in a single saturating pass (cv2.transform); clipping happens once, at the end.
    Contrast pivots on the mean luma of the image; hue rotates by U(-hue, hue) * 360 degrees.
    """
    b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness) if cfg.brightness > 0 else 1.0
    c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) if cfg.contrast > 0 else 1.0
    sat = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation) if cfg.saturation > 0 else 1.0
    hue = rng.uniform(-cfg.hue, cfg.hue) * 2 * np.pi if cfg.hue > 0 else 0.0
    # saturation: x -> sat * x + (1 - sat) * luma(x); it and the hue rotation keep grey grey.
    m = sat * np.eye(3, dtype=np.float32) + (1 - sat) * np.outer(np.ones(3, np.float32), _LUMA)
    if hue:
        m = _hue_matrix(hue) @ m
    mean_luma = float(np.dot(cv2.mean(image)[:3], _LUMA))
    affine = np.empty((3, 4), np.float32)
    affine[:, :3] = m * (b * c)                 # brightness, then contrast about the mean
    affine[:, 3] = (1 - c) * b * mean_luma
    return cv2.transform(image, affine)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` pixels (kernel size from sigma)."""
    return cv2.GaussianBlur(image, (0, 0), sigmaX=float(sigma))


def weak_augment(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig | None = None,
                 *, image_size: int | None = None, mask: np.ndarray | None = None,
                 landmarks: np.ndarray | None = None):
    """Crop (to image_size), flip, colour jitter, blur, in that order.

    image: uint8 (H,W,3) RGB; mask: uint8 (H,W) or None; landmarks: float32 (68,2) pixels or None.
    Returns (image uint8 (S,S,3), mask uint8 (S,S) or None, landmarks float32 or None), with
    S = image_size (default: H, images are expected square).
    """
    cfg = as_config(cfg)
    h, w = image.shape[:2]
    size = image_size or h
    box = _crop_box(rng, h, w, cfg)
    image, mask, landmarks = crop_and_resize(image, box, size, mask, landmarks)
    if rng.random() < cfg.flip_p:
        image, mask, landmarks = hflip(image, mask, landmarks)
    if rng.random() < cfg.jitter_p:
        image = color_jitter(image, rng, cfg)
    if rng.random() < cfg.blur_p:
        image = gaussian_blur(image, rng.uniform(*cfg.blur_sigma))
    return image, mask, landmarks
