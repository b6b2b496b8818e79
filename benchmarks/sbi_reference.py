"""Plain SBI: method.md section 6 written step by step, one whole image at a time.

The speed reference for ``cmil_jax.data.sbi.self_blend`` (benchmarks/input_pipeline.py): the
same recipe without its shortcuts. Every step works on the whole image, in float64 where numpy
defaults to it; the elastic field is drawn at full resolution; the jitter and the elastic warp
are two separate remaps; the blend and the JPEG round trips cover both whole images. The hull
shapes are those of ``cmil_jax.data.sbi.hull_mask`` (68-point reconstruction of the hulls).

Outputs follow the same distribution as ``self_blend`` but not the same bytes for a seed: the
random draws are made in another order.
"""

from __future__ import annotations

import cv2
import numpy as np

from cmil_jax.data import sbi


def colour_change(img, rng, shift, shift_p, brightness, contrast, bc_p):
    """RGB shift +-shift (p shift_p), then brightness/contrast (p bc_p); uint8 (H, W, 3)."""
    out = img.astype(np.float64)
    if rng.random() < shift_p:
        out = np.clip(out + rng.uniform(-shift, shift, size=3), 0, 255)
    if rng.random() < bc_p:
        b, c = rng.uniform(-brightness, brightness), rng.uniform(-contrast, contrast)
        out = np.clip(out * (1 + c) + 255 * b, 0, 255)
    return np.round(out).astype(np.uint8)


def quality_change(img, rng, cfg):
    """Step 3: colour change, then a 2x/4x down-up rescale or a sharpen; uint8 (H, W, 3)."""
    img = colour_change(
        img,
        rng,
        cfg.rgb_shift,
        cfg.rgb_shift_p,
        cfg.brightness,
        cfg.contrast,
        cfg.brightness_contrast_p,
    )
    h, w = img.shape[:2]
    if rng.random() < cfg.downscale_p:
        r = cfg.downscale_factors[rng.integers(len(cfg.downscale_factors))]
        small = cv2.resize(img, (max(1, w // r), max(1, h // r)), interpolation=cv2.INTER_NEAREST)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    alpha, lightness = rng.uniform(*cfg.sharpen_alpha), rng.uniform(*cfg.sharpen_lightness)
    identity = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float64)
    effect = np.array([[-1, -1, -1], [-1, 8 + lightness, -1], [-1, -1, -1]], np.float64)
    return cv2.filter2D(img, -1, (1 - alpha) * identity + alpha * effect)


def elastic_warp(mask, rng, alpha, sigma):
    """Displace every pixel by alpha * GaussianBlur_sigma(U(-1, 1)) per axis; nearest sampling."""
    h, w = mask.shape
    k = 2 * int(np.ceil(4 * sigma)) + 1
    dx = cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)), (k, k), sigma) * alpha
    dy = cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)), (k, k), sigma) * alpha
    grid_x, grid_y = np.meshgrid(np.arange(w), np.arange(h))
    return cv2.remap(
        mask,
        (grid_x + dx).astype(np.float32),
        (grid_y + dy).astype(np.float32),
        cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def jpeg(img, quality):
    """JPEG round trip of an RGB uint8 image (OpenCV encodes BGR)."""
    _, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def reference_self_blend(image, landmarks, rng, cfg=None):
    """One SBI pair, plainly. image uint8 (H, W, 3) RGB; landmarks (68, 2) (x, y) px.

    Returns (real uint8 (H, W, 3), fake uint8 (H, W, 3), mask float32 (H, W) in [0, 1]).
    """
    cfg = cfg or sbi.SBIConfig()
    h, w = image.shape[:2]

    # 1-2. hull mask of a random variant, 0/1
    hull_type = cfg.hull_types[rng.integers(len(cfg.hull_types))]
    with_forehead = rng.random() >= cfg.forehead_drop_p
    mask = sbi.hull_mask(landmarks, h, w, hull_type, with_forehead=with_forehead, config=cfg)
    mask = mask.astype(np.float64)

    # 3. quality change of the source or of the target
    source, target = image.copy(), image.copy()
    if rng.random() < cfg.transform_source_p:
        source = quality_change(source, rng, cfg)
    else:
        target = quality_change(target, rng, cfg)

    # 4. jitter source and mask together (about the image centre), elastic warp of the mask
    tx = rng.uniform(-cfg.translate_x, cfg.translate_x) * w
    ty = rng.uniform(-cfg.translate_y, cfg.translate_y) * h
    sx, sy = rng.uniform(*cfg.scale, size=2)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    affine = np.array([[sx, 0, cx - sx * cx + tx], [0, sy, cy - sy * cy + ty]])
    source = cv2.warpAffine(
        source, affine, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    mask = cv2.warpAffine(
        mask, affine, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT
    )
    mask = elastic_warp(mask, rng, cfg.elastic_alpha, cfg.elastic_sigma)

    # 5. blend mask: resize, blur, keep the maximum, blur, normalise, resize back
    size_w = int(rng.integers(cfg.blend_size[0], cfg.blend_size[1] + 1))
    size_h = int(rng.integers(cfg.blend_size[0], cfg.blend_size[1] + 1))
    k1 = int(rng.choice(np.arange(cfg.blur1_kernel[0], cfg.blur1_kernel[1] + 1, 2)))
    k2 = int(rng.choice(np.arange(cfg.blur2_kernel[0], cfg.blur2_kernel[1] + 1, 2)))
    sigma2 = int(rng.integers(cfg.blur2_sigma[0], cfg.blur2_sigma[1] + 1))
    small = cv2.resize(mask, (size_w, size_h))
    blurred = cv2.GaussianBlur(small, (k1, k1), 0)
    peak = blurred.max()
    kept = (blurred >= peak).astype(np.float64) if peak > 0 else blurred
    blurred = cv2.GaussianBlur(kept, (k2, k2), sigma2)
    if blurred.max() > 0:
        blurred = blurred / blurred.max()
    mask = cv2.resize(blurred, (w, h))

    # 6. blend
    ratio = cfg.blend_ratios[rng.integers(len(cfg.blend_ratios))]
    m = np.clip(mask * ratio, 0, 1)[..., None]
    fake = np.round(m * source + (1 - m) * target).astype(np.uint8)
    real = target

    # 7. the same post-augmentation for both: replay the generator for the second image
    state = rng.bit_generator.state
    post = (
        cfg.post_rgb_shift,
        cfg.post_rgb_shift_p,
        cfg.post_brightness,
        cfg.post_contrast,
        cfg.post_brightness_contrast_p,
    )
    real = colour_change(real, rng, *post)
    rng.bit_generator.state = state
    fake = colour_change(fake, rng, *post)
    if rng.random() < cfg.jpeg_p:
        quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        real, fake = jpeg(real, quality), jpeg(fake, quality)
    return real, fake, m[..., 0].astype(np.float32)
