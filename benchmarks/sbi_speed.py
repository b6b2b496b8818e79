"""SBI pairs per second on one core at 256 px: cmil_jax.data.sbi.self_blend vs a plain reference.

The reference below is the same recipe written straightforwardly: whole-image numpy/OpenCV,
float64 where numpy defaults to it, a full-resolution elastic field, separate affine and elastic
remaps, whole-image blend and JPEG of both images, one image at a time.

    python benchmarks/sbi_speed.py [--pairs 400] [--repeats 3] [--size 256]

Prints pairs/s of both (best and median over repeats; the reference runs a quarter of the
pairs) and the speed-up, with the CPU model.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cmil_jax.data import sbi


def _reference_colour(img, rng, shift, shift_p, brightness, contrast, bc_p):
    out = img.astype(np.float64)
    do_shift = rng.random() < shift_p
    offsets = rng.uniform(-shift, shift, size=3)
    do_bc = rng.random() < bc_p
    b, c = rng.uniform(-brightness, brightness), rng.uniform(-contrast, contrast)
    if do_shift:
        out = np.clip(out + offsets, 0, 255)
    if do_bc:
        out = np.clip(out * (1 + c) + 255 * b, 0, 255)
    return np.round(out).astype(np.uint8)


def _reference_quality(img, rng, cfg):
    img = _reference_colour(
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
        small = cv2.resize(img, (w // r, h // r), interpolation=cv2.INTER_NEAREST)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    alpha, lightness = rng.uniform(*cfg.sharpen_alpha), rng.uniform(*cfg.sharpen_lightness)
    effect = np.array([[-1, -1, -1], [-1, 8 + lightness, -1], [-1, -1, -1]])
    kernel = (1 - alpha) * np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]]) + alpha * effect
    return cv2.filter2D(img, -1, kernel)


def _reference_jpeg(img, quality):
    _, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def reference_self_blend(image, landmarks, rng, cfg=None):
    """Plain whole-image SBI: (real uint8, fake uint8, mask float32)."""
    cfg = cfg or sbi.SBIConfig()
    h, w = image.shape[:2]
    hull_type = cfg.hull_types[rng.integers(len(cfg.hull_types))]
    with_forehead = rng.random() >= cfg.forehead_drop_p
    mask = sbi.hull_mask(
        landmarks, h, w, hull_type, with_forehead=with_forehead, config=cfg
    ).astype(np.float64)

    source, target = image.copy(), image.copy()
    if rng.random() < cfg.transform_source_p:
        source = _reference_quality(source, rng, cfg)
    else:
        target = _reference_quality(target, rng, cfg)

    # jitter source and mask together, elastic-warp the mask
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
    k = 2 * int(np.ceil(4 * cfg.elastic_sigma)) + 1
    dx = cv2.GaussianBlur(rng.random((h, w)) * 2 - 1, (k, k), cfg.elastic_sigma) * cfg.elastic_alpha
    dy = cv2.GaussianBlur(rng.random((h, w)) * 2 - 1, (k, k), cfg.elastic_sigma) * cfg.elastic_alpha
    grid_x, grid_y = np.meshgrid(np.arange(w), np.arange(h))
    mask = cv2.remap(
        mask,
        (grid_x + dx).astype(np.float32),
        (grid_y + dy).astype(np.float32),
        cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_REFLECT_101,
    )

    # blend mask
    size_w = rng.integers(cfg.blend_size[0], cfg.blend_size[1] + 1)
    size_h = rng.integers(cfg.blend_size[0], cfg.blend_size[1] + 1)
    k1 = int(rng.choice(np.arange(cfg.blur1_kernel[0], cfg.blur1_kernel[1] + 1, 2)))
    k2 = int(rng.choice(np.arange(cfg.blur2_kernel[0], cfg.blur2_kernel[1] + 1, 2)))
    mask = cv2.resize(mask, (int(size_w), int(size_h)))
    blurred = cv2.GaussianBlur(mask, (k1, k1), 0)
    blurred = blurred / blurred.max()
    blurred[blurred < 1] = 0
    blurred = cv2.GaussianBlur(
        blurred, (k2, k2), int(rng.integers(cfg.blur2_sigma[0], cfg.blur2_sigma[1] + 1))
    )
    blurred = blurred / blurred.max()
    mask = cv2.resize(blurred, (w, h)) * cfg.blend_ratios[rng.integers(len(cfg.blend_ratios))]

    m = mask[..., None]
    fake = np.round(m * source + (1 - m) * target).astype(np.uint8)
    real = target

    # shared post-augmentation: one sampled colour change and JPEG quality for both
    state = rng.bit_generator.state
    real = _reference_colour(
        real,
        rng,
        cfg.post_rgb_shift,
        cfg.post_rgb_shift_p,
        cfg.post_brightness,
        cfg.post_contrast,
        cfg.post_brightness_contrast_p,
    )
    rng.bit_generator.state = state
    fake = _reference_colour(
        fake,
        rng,
        cfg.post_rgb_shift,
        cfg.post_rgb_shift_p,
        cfg.post_brightness,
        cfg.post_contrast,
        cfg.post_brightness_contrast_p,
    )
    if rng.random() < cfg.jpeg_p:
        quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        real, fake = _reference_jpeg(real, quality), _reference_jpeg(fake, quality)
    return real, fake, mask.astype(np.float32)


def _faces(n, size):
    try:
        from cmil_jax.data import synthetic
    except ImportError:
        sys.exit("benchmarks/sbi_speed.py needs cmil_jax.data.synthetic for its faces")
    examples = [
        synthetic.generate_example("facial_components", i, image_size=size) for i in range(n)
    ]
    return [(e["image"], e["landmarks"]) for e in examples]


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _rate(fn, faces, pairs, seed):
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for i in range(pairs):
        image, landmarks = faces[i % len(faces)]
        fn(image, landmarks, rng)
    return pairs / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400, help="pairs per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved")
    parser.add_argument("--size", type=int, default=256, help="image side, px")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    faces = _faces(16, args.size)
    _rate(sbi.self_blend, faces, 20, 0)  # warm-up
    _rate(reference_self_blend, faces, 20, 0)
    rates = {"sbi.self_blend": [], "reference": []}
    for r in range(args.repeats):
        rates["sbi.self_blend"].append(_rate(sbi.self_blend, faces, args.pairs, r))
        rates["reference"].append(_rate(reference_self_blend, faces, max(20, args.pairs // 4), r))
    print(
        f"SBI pairs/s, one core (cv2.setNumThreads(1)), {args.size}x{args.size}, "
        f"{args.pairs} pairs x "
        f"{args.repeats} runs, cv2 {cv2.__version__}, numpy {np.__version__}, CPU {_cpu_model()}"
    )
    for name, values in rates.items():
        print(f"  {name:16s} best {max(values):7.1f}   median {statistics.median(values):7.1f}")
    print(f"  speed-up (best)  {max(rates['sbi.self_blend']) / max(rates['reference']):.2f}x")


if __name__ == "__main__":
    main()
