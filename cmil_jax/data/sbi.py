"""Self-blended images (SBI): pseudo-fakes made by blending a face with a copy of itself.

Follows method.md, "Data and training" [official: Shiohara & Yamasaki, CVPR 2022]. A face image and its
68 landmarks give a pair (real, fake) and the blend mask:

1. hull mask from the landmarks (one of four variants, ``HULL_TYPES``);
2. source = copy of the image; with p 0.5 the source, else the target, gets a quality change
   (RGB shift, brightness/contrast, then a 2x/4x down-up rescale or a sharpen);
3. source and mask jittered together (translate, per-axis scale); the mask alone elastic-warped;
4. blend mask: resize to 192-256 px per axis, blur, keep the maximum (erode), blur, normalise,
   resize back;
5. fake = r*mask*source + (1 - r*mask)*target, r drawn from ``blend_ratios``;
6. the same colour change and JPEG compression applied to real and fake.

Everything is numpy + OpenCV on uint8/float32 and driven by one ``np.random.Generator``, so a
pair is a pure function of (image, landmarks, generator state). All random draws are made in a
fixed order whatever branches are taken.

Speed (one core, 256 px: benchmarks/input_pipeline.py). Work is done on the box around the face
where the mask can be non-zero; outside it fake == real by construction. Results equal the
plain full-image recipe except in four details:

- the elastic displacement field (alpha 50, sigma 7 px) is drawn on a grid ``elastic_grid``
  times coarser with sigma / elastic_grid, its amplitude matched to the full-resolution field
  (same per-pixel standard deviation), then linearly upsampled; it is clipped to
  ``elastic_max_px`` (about 8 standard deviations), which bounds the box;
- the jitter affine and the elastic warp of the mask are composed into one nearest-neighbour
  remap instead of two;
- the resize to 192-256 px is done on the face box, so its scale factor is rounded to whole
  pixels of the box (relative error < 1 / box size) and its sampling phase differs;
- "keep the pixels where blur_k1(mask) is at its maximum" is computed as an erosion of
  {mask == 1} by the k1 x k1 window, the same set up to float rounding (a blur is used when
  the erosion is empty).
JPEG of the fake re-encodes only the 16-px MCUs around the box (plus one MCU of context) and
pastes them into the JPEG of the real; this is bit-identical to compressing the whole fake
(tested).

Choices of ours (method.md leaves them open): the hull shapes from 68 points (``hull_polygons``),
reflected borders when the jittered source reads outside the image, and JPEG on correctly
ordered channels (OpenCV expects BGR).

Conventions: images are RGB uint8 (H, W, 3); landmarks float (68, 2) as (x, y) pixels in the
dlib/iBUG 68-point layout (``landmarks68``), pixel centres at integers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import cv2
import numpy as np

from cmil_jax.data.landmarks68 import BROWS, CHIN, JAW, LEFT_BROW, NOSE, NUM_LANDMARKS, RIGHT_BROW

# Hull variants [official: four variants; ours: their exact shapes from 68 points].
HULL_TYPES = ("whole_face", "components", "extended", "full")

# "components" pieces, each joined with the chin (8): jaw sides, cheeks, brow centre, eye-to-nose
# wedges, nose. Image-left first.
# fmt: off
_COMPONENTS = (
    np.r_[0:9, 17], np.r_[8:17, 26],
    np.r_[17:20], np.r_[24:27],
    np.r_[19:25],
    np.r_[17:22, 27, 31:36], np.r_[22:27, 27, 31:36],
    np.r_[27:36],
)
# fmt: on


@dataclasses.dataclass(frozen=True)
class SBIConfig:
    """Constants of the SBI recipe. Tags as in method.md: [official] SBI release, [ours] ours."""

    # Mask [ours: 68-point reconstruction of the 81-point hulls].
    hull_types: tuple[str, ...] = HULL_TYPES  # drawn uniformly when hull_type is None
    forehead_drop_p: float = 0.25  # [official] p of using the 68 points only (no forehead)
    forehead_scale: float = 0.4  # forehead points: brows raised by this x brow-to-chin length
    extended_brow_scale: float = 0.2  # "extended" hull: brows raised by this x brow-to-chin
    # Quality change of source or target [official].
    transform_source_p: float = 0.5  # else the target is changed
    rgb_shift: float = 20.0  # +- per channel, in uint8 levels
    rgb_shift_p: float = 0.3
    brightness: float = 0.1  # +- fraction of 255
    contrast: float = 0.1  # +- gain - 1
    brightness_contrast_p: float = 1.0
    downscale_p: float = 0.5  # else sharpen
    downscale_factors: tuple[int, ...] = (2, 4)  # nearest down, linear up
    sharpen_alpha: tuple[float, float] = (0.2, 0.5)
    sharpen_lightness: tuple[float, float] = (0.5, 1.0)
    # Jitter of source and mask together [official].
    translate_x: float = 0.03  # +- fraction of the width
    translate_y: float = 0.015  # +- fraction of the height
    scale: tuple[float, float] = (0.95, 1 / 0.95)  # drawn per axis, about the image centre
    # Elastic warp of the mask only [official: alpha, sigma; ours: grid, clip].
    elastic_alpha: float = 50.0  # px
    elastic_sigma: float = 7.0  # px
    elastic_grid: int = 4  # field drawn on a grid this many times coarser (1 = full res)
    elastic_max_px: float = 10.0  # displacement clip
    # Blend mask [official].
    blend_size: tuple[int, int] = (192, 256)  # px per axis, inclusive
    blur1_kernel: tuple[int, int] = (5, 25)  # odd sizes, inclusive; sigma from the size
    blur2_kernel: tuple[int, int] = (5, 25)
    blur2_sigma: tuple[int, int] = (5, 45)  # integer, inclusive
    blend_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)
    # Post-augmentation shared by real and fake [official SBI training transforms].
    post_rgb_shift: float = 20.0
    post_rgb_shift_p: float = 0.3
    post_brightness: float = 0.3
    post_contrast: float = 0.3
    post_brightness_contrast_p: float = 0.3
    jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (40, 100)  # inclusive

    def __post_init__(self):
        for name in (
            "forehead_drop_p",
            "transform_source_p",
            "rgb_shift_p",
            "brightness_contrast_p",
            "downscale_p",
            "post_rgb_shift_p",
            "post_brightness_contrast_p",
            "jpeg_p",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"SBIConfig.{name} must be a probability in [0, 1], got {getattr(self, name)}"
                )
        if not self.hull_types or any(h not in HULL_TYPES for h in self.hull_types):
            raise ValueError(
                f"SBIConfig.hull_types must be a non-empty subset of {HULL_TYPES}, "
                f"got {self.hull_types}"
            )
        for name in ("blur1_kernel", "blur2_kernel"):
            lo, hi = getattr(self, name)
            if lo % 2 == 0 or hi % 2 == 0 or not 1 <= lo <= hi:
                raise ValueError(f"SBIConfig.{name} must be odd sizes lo <= hi, got {(lo, hi)}")
        if self.elastic_grid < 1 or self.elastic_sigma <= 0 or self.elastic_max_px < 0:
            raise ValueError(
                "SBIConfig: elastic_grid >= 1, elastic_sigma > 0 and elastic_max_px >= 0 required"
            )
        if not 1 <= self.blend_size[0] <= self.blend_size[1]:
            raise ValueError(f"SBIConfig.blend_size must be 1 <= lo <= hi, got {self.blend_size}")
        if not self.blend_ratios or not all(0.0 <= r <= 1.0 for r in self.blend_ratios):
            raise ValueError(
                f"SBIConfig.blend_ratios must be non-empty values in [0, 1], "
                f"got {self.blend_ratios}"
            )
        if not 0 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(
                f"SBIConfig.jpeg_quality must be 0 <= lo <= hi <= 100, got {self.jpeg_quality}"
            )
        if not self.downscale_factors or min(self.downscale_factors) < 1:
            raise ValueError(
                f"SBIConfig.downscale_factors must be integers >= 1, got {self.downscale_factors}"
            )


# ----------------------------------------------------------------------------------------------
# Input checks


def _check_image(image) -> np.ndarray:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
    ):
        desc = (
            f"{image.dtype} {image.shape}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(f"image must be a uint8 array of shape (H, W, 3) (RGB), got {desc}")
    if min(image.shape[:2]) < 8:
        raise ValueError(f"image must be at least 8x8 pixels, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _check_landmarks(landmarks, height: int, width: int) -> np.ndarray:
    lm = np.asarray(landmarks)
    if lm.shape != (NUM_LANDMARKS, 2) or not (
        np.issubdtype(lm.dtype, np.floating) or np.issubdtype(lm.dtype, np.integer)
    ):
        raise ValueError(
            f"landmarks must be a real array of shape (68, 2) as (x, y) pixels, "
            f"got {lm.dtype} {lm.shape}"
        )
    lm = lm.astype(np.float32)
    if not np.isfinite(lm).all():
        raise ValueError("landmarks contain NaN or inf")
    if float(np.ptp(lm, axis=0).max()) < 1.0:
        raise ValueError(
            "landmarks are degenerate: all 68 points coincide (they span less than one pixel)"
        )
    limit = 16 * max(height, width)
    if float(np.abs(lm).max()) > limit:
        raise ValueError(
            f"landmarks lie far outside the {width}x{height} image (|coordinate| > {limit})"
        )
    return lm


# ----------------------------------------------------------------------------------------------
# Hull mask


def hull_polygons(
    landmarks: np.ndarray,
    hull_type: str,
    *,
    with_forehead: bool = True,
    config: SBIConfig | None = None,
) -> list[np.ndarray]:
    """Point sets whose convex hulls, filled and united, form the SBI mask.

    landmarks: float (68, 2) (x, y) px. Returns a list of float32 (K, 2) arrays. The forehead,
    absent from the 68-point layout, is the brows raised along the chin-to-brow direction.
    """
    cfg = config or SBIConfig()
    lm = np.asarray(landmarks, np.float32)
    brows = lm[BROWS]
    up = brows.mean(axis=0) - lm[CHIN]  # chin -> brow centre
    length = float(np.hypot(*up))
    if length < 0.5:  # collapsed face: fall back to image-up and the landmark extent
        up, length = np.float32([0.0, -1.0]), float(np.ptp(lm, axis=0).max())
    else:
        up = up / length
    up = up.astype(np.float32)

    forehead = brows + up * (cfg.forehead_scale * length) if with_forehead else brows[:0]
    if hull_type == "full":
        return [np.concatenate([lm, forehead])]
    if hull_type == "extended":
        ext = lm.copy()
        ext[BROWS] += up * (cfg.extended_brow_scale * length)
        return [ext]
    if hull_type == "whole_face":
        half = len(forehead) // 2
        return [
            np.concatenate([lm[JAW[:CHIN + 1]], lm[LEFT_BROW], forehead[:half]]),
            np.concatenate([lm[JAW[CHIN:]], lm[RIGHT_BROW], forehead[half:]]),
            np.concatenate([brows, forehead, lm[NOSE], lm[CHIN:CHIN + 1]]),
        ]
    if hull_type == "components":  # convex pieces fanned from the chin: concave where they meet
        return [lm[np.r_[idx, CHIN]] for idx in _COMPONENTS]
    raise ValueError(f"hull_type must be one of {HULL_TYPES}, got {hull_type!r}")


_FILL_SHIFT = 4  # sub-pixel bits for polygon filling


def fill_hulls(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Union of the filled convex hulls of ``polygons``: uint8 (height, width), values 0/1."""
    mask = np.zeros((height, width), np.uint8)
    for pts in polygons:
        hull = cv2.convexHull(np.ascontiguousarray(pts, np.float32))
        cv2.fillConvexPoly(
            mask,
            np.round(hull * (1 << _FILL_SHIFT)).astype(np.int32),
            1,
            lineType=cv2.LINE_8,
            shift=_FILL_SHIFT,
        )
    return mask


def hull_mask(
    landmarks,
    height: int,
    width: int,
    hull_type: str = "full",
    *,
    with_forehead: bool = True,
    config: SBIConfig | None = None,
) -> np.ndarray:
    """SBI hull mask of one variant: uint8 (height, width), values 0/1."""
    lm = _check_landmarks(landmarks, height, width)
    return fill_hulls(
        hull_polygons(lm, hull_type, with_forehead=with_forehead, config=config), height, width
    )


# ----------------------------------------------------------------------------------------------
# Boxes: (x0, y0, x1, y1), half-open, integer pixels.


def _grow(box, margin_x, margin_y, height, width, align=1):
    """``box`` grown by the margins, its edges rounded out to multiples of ``align``, clipped to
    the image; never empty."""
    x0, y0, x1, y1 = box
    x0 = min(max(0, (math.floor(x0 - margin_x) // align) * align), width - 1)
    y0 = min(max(0, (math.floor(y0 - margin_y) // align) * align), height - 1)
    x1 = min(width, -(-math.ceil(x1 + margin_x) // align) * align)
    y1 = min(height, -(-math.ceil(y1 + margin_y) // align) * align)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


# ----------------------------------------------------------------------------------------------
# Random parameters. Every draw is made whatever the outcome, in this order.


def _draw_colour(rng, shift, shift_p, brightness, contrast, bc_p):
    """Per-channel (gain, offset) of an RGB shift then brightness/contrast, or None for identity."""
    do_shift = rng.random() < shift_p
    offsets = rng.uniform(-shift, shift, size=3)
    do_bc = rng.random() < bc_p
    b = rng.uniform(-brightness, brightness)
    c = rng.uniform(-contrast, contrast)
    if not (do_shift or do_bc):
        return None
    return (offsets if do_shift else None), ((1.0 + c, 255.0 * b) if do_bc else None)


def _draw_degrade(rng, cfg):
    use_down = rng.random() < cfg.downscale_p
    factor = int(cfg.downscale_factors[rng.integers(len(cfg.downscale_factors))])
    alpha = rng.uniform(*cfg.sharpen_alpha)
    lightness = rng.uniform(*cfg.sharpen_lightness)
    if use_down:
        return ("down", factor)
    kernel = np.full((3, 3), -alpha, np.float32)
    kernel[1, 1] = 1.0 - alpha + alpha * (8.0 + lightness)
    return ("sharpen", kernel)


def _odd(rng, lo, hi):
    return int(lo + 2 * rng.integers((hi - lo) // 2 + 1))


# ----------------------------------------------------------------------------------------------
# Pixel operations


def _apply_colour(img, colour):
    """RGB shift (saturating) then x*gain + offset (saturating), on uint8 (..., 3)."""
    if colour is None:
        return img
    offsets, bc = colour
    if offsets is not None:
        m = np.zeros((3, 4), np.float32)
        m[:, :3] = np.eye(3)
        m[:, 3] = offsets
        img = cv2.transform(img, m)
    if bc is not None:
        gain, offset = bc
        m = np.zeros((3, 4), np.float32)
        m[:, :3] = gain * np.eye(3)
        m[:, 3] = offset
        img = cv2.transform(img, m)
    return img


def _apply_degrade(img, degrade):
    kind, arg = degrade
    if kind == "down":
        h, w = img.shape[:2]
        small = cv2.resize(
            img, (max(1, w // arg), max(1, h // arg)), interpolation=cv2.INTER_NEAREST
        )
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.filter2D(img, -1, arg)


@functools.lru_cache(maxsize=16)
def _elastic_gain(sigma: float, grid: int) -> float:
    """Factor matching the std of coarse-grid smoothed noise to the full-resolution one.

    Smoothed white noise has variance var(noise) * sum(k^2) for the 2-D kernel k, and a 2-D
    Gaussian kernel's sum of squares is the 1-D one squared; kernels truncated at 4 sigma.
    """

    def sumsq_1d(s):
        x = np.arange(-math.ceil(4 * s), math.ceil(4 * s) + 1, dtype=np.float64)
        k = np.exp(-0.5 * (x / s) ** 2)
        k /= k.sum()
        return float((k * k).sum())

    return sumsq_1d(sigma) / sumsq_1d(sigma / grid)


def _mask_maps(rng, box, inv_gain, inv_offset, cfg):
    """Sampling map of the jittered, elastic-warped mask on ``box``: float32 (h, w, 2) as (x, y).

    Box pixel p (image coordinates) samples the hull mask at ``inv_gain * (p + d(p)) +
    inv_offset``: the inverse jitter after the elastic displacement d = alpha *
    GaussianBlur_sigma(U(-1, 1)) (kernel truncated at 4 sigma). d is drawn on a grid
    ``elastic_grid`` times coarser, with sigma / elastic_grid and the same per-pixel standard
    deviation, and clipped to ``elastic_max_px``; the jitter is affine, so the map is formed on
    that grid and upsampled linearly in one step.
    """
    x0, y0, x1, y1 = box
    g = cfg.elastic_grid
    sigma_c = cfg.elastic_sigma / g
    rad = math.ceil(4 * sigma_c)
    # cv2.resize(fx=g) puts coarse sample j at fine (j + 0.5) * g - 0.5; one extra coarse cell
    # before and after the box keeps it clear of the edge clamping.
    gh, gw = -(-(y1 - y0) // g) + 2, -(-(x1 - x0) // g) + 2
    noise = rng.random(
        (gh + 2 * rad, gw + 2 * rad, 2), dtype=np.float32
    )  # padded: no border effect
    field = cv2.GaussianBlur(noise, (2 * rad + 1, 2 * rad + 1), sigma_c)[
        rad : rad + gh, rad : rad + gw
    ]
    # field has mean 0.5 and the std of smoothed U(0, 1): map to smoothed U(-1, 1) * alpha
    field = (field - np.float32(0.5)) * np.float32(
        2.0 * cfg.elastic_alpha * _elastic_gain(cfg.elastic_sigma, g)
    )
    np.clip(field, -cfg.elastic_max_px, cfg.elastic_max_px, out=field)
    field[..., 0] += (np.arange(gw, dtype=np.float32) * g + np.float32(x0 - g + (g - 1) / 2))[
        None, :
    ]
    field[..., 1] += (np.arange(gh, dtype=np.float32) * g + np.float32(y0 - g + (g - 1) / 2))[
        :, None
    ]
    field = field * np.float32(inv_gain) + np.float32(inv_offset)
    if g == 1:
        return field[1:-1, 1:-1]
    return cv2.resize(field, None, fx=g, fy=g, interpolation=cv2.INTER_LINEAR)[
        g : g + y1 - y0, g : g + x1 - x0
    ]


def _blend_mask(mask01, size_x, size_y, k1, k2, sigma2):
    """SBI blend mask of a float32 0/1 mask resampled by (size_x, size_y): float32, same shape.

    SBI keeps the pixels where blur_k1(mask) reaches its maximum. When some pixel has its whole
    k1 x k1 window at 1 that set is the erosion of {mask == 1} by the window, computed so;
    otherwise (a tiny mask) the blur is used.
    """
    h, w = mask01.shape
    sw, sh = max(1, round(w * size_x)), max(1, round(h * size_y))
    small = cv2.resize(mask01, (sw, sh), interpolation=cv2.INTER_LINEAR)
    kept = cv2.erode(
        (small >= 1).view(np.uint8), np.ones((k1, k1), np.uint8), borderType=cv2.BORDER_REFLECT_101
    )
    if cv2.countNonZero(kept) == 0:
        blurred = cv2.GaussianBlur(small, (k1, k1), 0)
        peak = blurred.max()
        if peak <= 0:
            return np.zeros_like(mask01)
        kept = (blurred >= peak).view(np.uint8)
    blurred = cv2.GaussianBlur(kept.astype(np.float32), (k2, k2), sigma2)
    blurred *= np.float32(1.0) / blurred.max()
    return cv2.resize(blurred, (w, h), interpolation=cv2.INTER_LINEAR)


_MCU = 16  # JPEG minimum coded unit with 4:2:0 chroma (OpenCV default)


def _jpeg(img_rgb, quality):
    """JPEG round trip (OpenCV defaults: 4:2:0 chroma) of a uint8 RGB image."""
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)


def _jpeg_pair(real, fake_box, box, quality):
    """JPEG of real and of the fake = real with ``box`` replaced by ``fake_box``.

    Only the fake's MCUs that touch ``box`` change. The decoder's chroma upsampling carries a
    change 1 px into the neighbouring MCUs, so the fake is encoded on those MCUs plus one MCU
    of unchanged context, and the changed MCUs plus 2 px are pasted into the real's JPEG. This
    equals compressing the whole fake (tested bit for bit).
    """
    h, w = real.shape[:2]
    x0, y0, x1, y1 = box
    paste = px0, py0, px1, py1 = _grow(_grow(box, 0, 0, h, w, align=_MCU), 2, 2, h, w)
    ox0, oy0, ox1, oy1 = _grow(paste, _MCU, _MCU, h, w, align=_MCU)
    patch = real[oy0:oy1, ox0:ox1].copy()
    patch[y0 - oy0 : y1 - oy0, x0 - ox0 : x1 - ox0] = fake_box
    patch = _jpeg(patch, quality)
    real = _jpeg(real, quality)
    fake = real.copy()
    fake[py0:py1, px0:px1] = patch[py0 - oy0 : py1 - oy0, px0 - ox0 : px1 - ox0]
    return real, fake


# ----------------------------------------------------------------------------------------------
# The pair


def self_blend(
    image,
    landmarks,
    rng: np.random.Generator,
    *,
    hull_type: str | None = None,
    config: SBIConfig | None = None,
):
    """One SBI pair from a face image.

    image: uint8 (H, W, 3) RGB. landmarks: float (68, 2) (x, y) px, dlib layout.
    rng: drives every random choice. hull_type: one of HULL_TYPES, or None to draw it.
    Returns (real uint8 (H, W, 3), fake uint8 (H, W, 3), mask float32 (H, W) in [0, 1]); mask
    is the weight of the source in the fake (blend ratio included), 0 where fake == real before
    the shared JPEG step.
    Raises ValueError for bad shapes/dtypes, non-finite or degenerate landmarks, or a face hull
    outside the image.
    """
    cfg = config or SBIConfig()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    image = _check_image(image)
    h, w = image.shape[:2]
    lm = _check_landmarks(landmarks, h, w)
    if hull_type is not None and hull_type not in HULL_TYPES:
        raise ValueError(f"hull_type must be one of {HULL_TYPES} or None, got {hull_type!r}")

    # --- all scalar draws, in a fixed order
    drawn_hull = cfg.hull_types[rng.integers(len(cfg.hull_types))]
    hull_type = hull_type or drawn_hull
    with_forehead = rng.random() >= cfg.forehead_drop_p
    transform_source = rng.random() < cfg.transform_source_p
    colour = _draw_colour(
        rng, cfg.rgb_shift, cfg.rgb_shift_p, cfg.brightness, cfg.contrast, cfg.brightness_contrast_p
    )
    degrade = _draw_degrade(rng, cfg)
    tx = rng.uniform(-cfg.translate_x, cfg.translate_x) * w
    ty = rng.uniform(-cfg.translate_y, cfg.translate_y) * h
    sx, sy = rng.uniform(*cfg.scale, size=2)
    size_x = int(rng.integers(cfg.blend_size[0], cfg.blend_size[1] + 1)) / w
    size_y = int(rng.integers(cfg.blend_size[0], cfg.blend_size[1] + 1)) / h
    k1 = _odd(rng, *cfg.blur1_kernel)
    k2 = _odd(rng, *cfg.blur2_kernel)
    sigma2 = int(rng.integers(cfg.blur2_sigma[0], cfg.blur2_sigma[1] + 1))
    ratio = float(cfg.blend_ratios[rng.integers(len(cfg.blend_ratios))])
    post = _draw_colour(
        rng,
        cfg.post_rgb_shift,
        cfg.post_rgb_shift_p,
        cfg.post_brightness,
        cfg.post_contrast,
        cfg.post_brightness_contrast_p,
    )
    do_jpeg = rng.random() < cfg.jpeg_p
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))

    # --- 1. hull mask and its box (from the polygon points, clipped to the image)
    polygons = hull_polygons(lm, hull_type, with_forehead=with_forehead, config=cfg)
    hull = fill_hulls(polygons, h, w)
    if cv2.countNonZero(hull) == 0:
        raise ValueError(f"the face hull of the landmarks does not overlap the {w}x{h} image")
    pts = np.concatenate(polygons)
    lo, hi = np.floor(pts.min(axis=0)), np.ceil(pts.max(axis=0)) + 1
    hull_box = (max(0.0, lo[0]), max(0.0, lo[1]), min(float(w), hi[0]), min(float(h), hi[1]))

    # --- 2. quality change of the target (whole image) now, of the source later on its box
    target = image if transform_source else _apply_degrade(_apply_colour(image, colour), degrade)

    # --- 3. jitter p' = c + s * (p - c) + t per axis, of source and mask; elastic warp of the mask
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    gain, shift = np.array([sx, sy]), np.array([tx, ty])
    inv_gain = 1.0 / gain  # p = inv_gain * p' + inv_offset
    inv_offset = centre - (centre + shift) / gain
    x0, y0, x1, y1 = hull_box
    moved_lo = gain * (np.array([x0, y0]) - centre) + centre + shift
    moved_hi = gain * (np.array([x1, y1]) - centre) + centre + shift
    # box where the blend mask can be non-zero: elastic clip + interpolation + blur2 radius
    margin_x = cfg.elastic_max_px + 2 + (k2 // 2 + 2) / size_x
    margin_y = cfg.elastic_max_px + 2 + (k2 // 2 + 2) / size_y
    bx0, by0, bx1, by1 = big_box = _grow((*moved_lo, *moved_hi), margin_x, margin_y, h, w)
    warped = cv2.remap(
        hull,
        _mask_maps(rng, big_box, inv_gain, inv_offset, cfg),
        None,
        cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    if cv2.countNonZero(warped) == 0:  # a face of a few pixels can vanish: keep it unwarped
        warped = hull[by0:by1, bx0:bx1]

    # --- 4. blend mask, then the work box shrinks to where it is non-zero
    weight = _blend_mask(warped.astype(np.float32), size_x, size_y, k1, k2, sigma2)
    tx0, ty0, tw, th = cv2.boundingRect((weight > 0).view(np.uint8))
    if tw == 0:  # resampling can miss a mask of a few pixels: blend 0 on one pixel, fake == real
        tw, th = 1, 1
    box = x0, y0, x1, y1 = tx0 + bx0, ty0 + by0, tx0 + tw + bx0, ty0 + th + by0
    weight = weight[ty0 : ty0 + th, tx0 : tx0 + tw]
    weight *= np.float32(ratio)
    mask = np.zeros((h, w), np.float32)
    mask[y0:y1, x0:x1] = weight

    # source: quality change on the box it is sampled from (aligned so that the 2x/4x
    # rescale sees the same pixel grid as on the whole image), then the jitter, bilinear
    (ix0, iy0), (ix1, iy1) = inv_gain * (x0, y0) + inv_offset, inv_gain * (x1, y1) + inv_offset
    if transform_source:
        ux0, uy0, ux1, uy1 = _grow((ix0, iy0, ix1, iy1), 8, 8, h, w, align=4)
        source = _apply_degrade(_apply_colour(image[uy0:uy1, ux0:ux1], colour), degrade)
    else:
        ux0, uy0, source = 0, 0, image
    affine = np.float32([[inv_gain[0], 0.0, ix0 - ux0], [0.0, inv_gain[1], iy0 - uy0]])
    source = cv2.warpAffine(
        source,
        affine,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )

    # --- 5. blend: fake = r*m*source + (1 - r*m)*target, on the box only
    fake_box = cv2.blendLinear(
        source, np.ascontiguousarray(target[y0:y1, x0:x1]), weight, 1.0 - weight
    )

    # --- 6. shared post-augmentation (pointwise colour, so the fake needs it on the box only)
    real = _apply_colour(target, post)
    fake_box = _apply_colour(fake_box, post)
    if do_jpeg:
        real, fake = _jpeg_pair(real, fake_box, box, quality)
    else:
        real = real.copy() if real is image else real
        fake = real.copy()
        fake[y0:y1, x0:x1] = fake_box
    return real, fake, mask
