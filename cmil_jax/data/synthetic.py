"""Procedural frontal faces with Seq-DeepFake style sequential manipulations.

No face data set can be downloaded where this project is developed and tested, so the
built-in data is drawn here with numpy and OpenCV:

* A face is a random set of parameters (head shape, skin tone, hair, brows, eyes, nose,
  lips, background, clothes, lighting, sensor noise, signs of age). It is drawn directly at
  the requested size; its 68 landmarks (dlib / iBUG layout, (x, y) pixels, pixel centres at
  integer coordinates) are computed from the same geometry that is drawn.
* ``facial_components`` (1 nose, 2 eye, 3 eyebrow, 4 lip, 5 hair): the part is transplanted
  from a donor face (another random face, forced to differ visibly in shape and colour), set
  at the target's part position, and blended into the target with a feathered mask.
* ``facial_attributes`` (1 Bangs, 2 Eyeglasses, 3 Beard, 4 Smiling, 5 Young): image edits
  (a fringe, glasses, a beard, mouth corners raised with teeth showing, wrinkles and age
  spots removed with smoother skin).

Each edit step j (1-based) of an n-step sequence works like one pass of a GAN editor:

1. the edited region is re-drawn from scratch and pasted with a feathered mask (Gaussian,
   sigma 2..3.5 px at 256); the pasted content carries a grey-level offset of +-5..10 against
   its surroundings, the blending seam that makes every edit detectable in its region;
2. the whole image is then "re-encoded": a per-channel gain and offset (red +2..4 % and
   +2..4 levels, blue the opposite, green about constant; magnitudes random per image and
   jittered per step) and a light 3x3 Gaussian blur (sigma 0.4..0.8 px at 256).

A region pasted at step j has had n - j + 1 re-encodings, the untouched rest of the image n,
so at its border it is j - 1 drift steps less warm (red minus blue) than its surroundings:
grey seams mark *where* edits are, warm/cool seams of growing size mark *when*. Originals get
no re-encoding. The ground-truth ``mask`` is the union of the edited regions where the
feathered blend weight exceeds ``MASK_THRESHOLD``.

Sequence types: the real release has 28 (components) and 26 (attributes) types including the
original; its exact type lists are not reproduced here, only the counts (see
``SEQUENCE_TYPES``). Originals are ``ORIGINAL_SHARE`` = 1/6 of the images. Component
sequences have lengths about uniform over images (length first, then a type of that length);
attribute sequences are uniform over the 25 types (more short than long ones).
"""

import math

import cv2
import numpy as np

from cmil_jax.labels import CLASS_NAMES, MAX_LEN, SUBSETS, sequence_name

# --------------------------------------------------------------------------------------
# Sequence types and labels
# --------------------------------------------------------------------------------------

SEQUENCE_TYPES = {
    # 1 nose, 2 eye, 3 eyebrow, 4 lip, 5 hair.  5 + 6 + 6 + 5 + 5 = 27 manipulated types.
    "facial_components": (
        (),
        (1,), (2,), (3,), (4,), (5,),
        (1, 2), (2, 1), (3, 4), (4, 3), (2, 5), (5, 4),
        (1, 2, 4), (4, 2, 1), (2, 3, 5), (5, 3, 2), (1, 4, 5), (3, 1, 4),
        (1, 2, 3, 4), (4, 3, 2, 1), (2, 4, 5, 1), (5, 1, 3, 2), (3, 5, 4, 2),
        (1, 2, 3, 4, 5), (5, 4, 3, 2, 1), (2, 4, 1, 5, 3), (3, 1, 5, 2, 4), (4, 5, 2, 3, 1),
    ),
    # 1 Bangs, 2 Eyeglasses, 3 Beard, 4 Smiling, 5 Young.  5 + 8 + 6 + 4 + 2 = 25 types.
    "facial_attributes": (
        (),
        (1,), (2,), (3,), (4,), (5,),
        (1, 2), (2, 1), (3, 4), (4, 3), (2, 5), (5, 3), (1, 4), (4, 5),
        (1, 2, 3), (3, 2, 1), (2, 4, 5), (5, 4, 2), (1, 3, 5), (4, 1, 2),
        (1, 2, 3, 4), (4, 3, 2, 1), (2, 3, 5, 1), (5, 1, 4, 3),
        (1, 2, 3, 4, 5), (5, 4, 3, 2, 1),
    ),
}

ORIGINAL_SHARE = 1.0 / 6.0  # probability that an index is an unmanipulated original

MASK_THRESHOLD = 0.25  # feathered blend weight above which a pixel counts as manipulated

# Strength of the traces (ranges sampled per image; see the module docstring).
SEAM_OFFSET = (10.0, 18.0)  # |grey-level offset| of pasted content (where)
DRIFT_GAIN = (0.02, 0.04)  # per re-encoding: red gain +, blue gain - (when)
DRIFT_OFFSET = (2.0, 4.0)  # per re-encoding: red offset +, blue offset - (grey levels)

_TYPES_BY_LENGTH = {
    subset: {n: tuple(t for t in types if len(t) == n) for n in range(1, MAX_LEN + 1)}
    for subset, types in SEQUENCE_TYPES.items()
}


def _check_subset(subset):
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; valid subsets: {', '.join(SUBSETS)}")
    return SUBSETS.index(subset)


def label_from_sequence(sequence):
    """Class ids in edit order -> int32 (5,) label, 0-padded."""
    label = np.zeros(MAX_LEN, np.int32)
    label[: len(sequence)] = sequence
    return label


def label_to_name(label, subset):
    """int (5,) label -> 'nose-eye-lip', or 'original' for all zeros (labels.sequence_name)."""
    return sequence_name(label, subset)


def _sample_sequence(subset, rng):
    if rng.random() < ORIGINAL_SHARE:
        return ()
    if subset == "facial_components":
        candidates = _TYPES_BY_LENGTH[subset][int(rng.integers(1, MAX_LEN + 1))]
    else:
        candidates = SEQUENCE_TYPES[subset][1:]
    return candidates[int(rng.integers(len(candidates)))]


def _streams(subset, index, seed):
    """Independent generators for (sequence, face, donor, edit steps) of one example."""
    subset_id = _check_subset(subset)
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    children = np.random.SeedSequence([int(seed), subset_id, int(index)]).spawn(4)
    return [np.random.Generator(np.random.PCG64(c)) for c in children]


def sequence_for_index(subset, index, seed=0):
    """The sequence (tuple of class ids, () = original) that generate_example draws."""
    return _sample_sequence(subset, _streams(subset, index, seed)[0])


# --------------------------------------------------------------------------------------
# Random face parameters (canonical units: pixels of a 256 x 256 image)
# --------------------------------------------------------------------------------------

_SKIN = np.array([
    (255, 224, 196), (246, 206, 178), (236, 188, 152), (224, 172, 138), (205, 145, 108),
    (180, 122, 88), (150, 98, 68), (118, 76, 52), (92, 60, 42), (250, 214, 186)], np.float32)
_HAIR = np.array([
    (28, 24, 22), (58, 40, 28), (102, 68, 44), (150, 108, 70), (140, 62, 32), (186, 98, 46),
    (214, 180, 118), (236, 224, 196), (140, 138, 136), (214, 214, 208)], np.float32)
_IRIS = np.array([
    (92, 56, 30), (52, 34, 22), (128, 104, 52), (78, 124, 70), (68, 118, 182), (112, 142, 162),
    (170, 120, 42)], np.float32)
_LIPSTICK = np.array([
    (186, 36, 50), (222, 108, 132), (118, 40, 72), (240, 112, 88), (104, 48, 50)], np.float32)
_FRAMES = np.array([
    (20, 20, 22), (70, 40, 25), (200, 168, 82), (188, 190, 196), (170, 30, 40), (30, 60, 150)],
    np.float32)
_TEETH = np.array((236, 230, 214), np.float32)

# Component class k swaps the part face[COMPONENT_PARTS[k]]: the class names of labels.py.
COMPONENT_PARTS = dict(enumerate(CLASS_NAMES["facial_components"], start=1))


def _far(rng, value, lo, hi, gap):
    """Uniform in [lo, hi] at least ``gap`` away from ``value`` (or the farther end)."""
    left = max(0.0, value - gap - lo)
    right = max(0.0, hi - value - gap)
    if left + right <= 0:
        return lo if value - lo > hi - value else hi
    u = rng.uniform(0.0, left + right)
    return lo + u if u < left else value + gap + (u - left)


def _far_colour(rng, palette, colour, min_dist):
    dist = np.linalg.norm(palette - colour, axis=1)
    ok = np.flatnonzero(dist >= min_dist)
    if len(ok) == 0:
        return palette[int(np.argmax(dist))].copy()
    return palette[ok[int(rng.integers(len(ok)))]].copy()


def _clip(x, lo, hi):
    """np.clip without its per-call overhead (this module clips many tiny arrays)."""
    return np.minimum(np.maximum(x, lo), hi)


def _luma(c):
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _sample_face(rng):
    """All parameters of one random face, as nested dicts of floats / small arrays."""
    u = rng.uniform
    a = u(54, 66)
    b = a * u(1.2, 1.34)
    layout = dict(
        cx=128 + u(-7, 7), cy=126 + u(-3, 8), a=a, b=b, bt=b * u(0.95, 1.06),
        roll=u(-0.07, 0.07), jaw_n=u(2.0, 2.8), chin=u(0.0, 0.18),
        ye=-u(0.04, 0.14) * b, es=u(0.36, 0.43) * a, yn=u(0.19, 0.28) * b)
    layout["ym"] = layout["yn"] + u(0.25, 0.33) * b
    skin = _clip(_SKIN[rng.integers(len(_SKIN))] + u(-8, 8, 3), 0, 255).astype(np.float32)
    hair_colour = _clip(_HAIR[rng.integers(len(_HAIR))] + u(-6, 6, 3), 0, 255)
    face = dict(layout=layout, skin=skin)

    face["eye"] = dict(w=u(0.30, 0.40) * a, up=u(0.20, 0.34), lo=u(0.10, 0.20),
                       tilt=u(-0.05, 0.10), iris_r=u(0.19, 0.25), gaze=u(-0.08, 0.08),
                       iris=_IRIS[rng.integers(len(_IRIS))].copy(), liner=u(1.2, 2.4),
                       sclera=np.array((242, 238, 230), np.float32) - u(0, 14))
    brow_dark = u(0.35, 0.8) if _luma(hair_colour) > 90 else u(0.8, 1.1)
    face["eyebrow"] = dict(gap=u(0.13, 0.21) * b, arch=u(0.02, 0.07) * b, th_in=u(2.5, 7.0),
                        th_out=u(1.2, 3.0), out=u(0.55, 0.72), inner=u(0.0, 0.12),
                        colour=_clip(hair_colour * brow_dark, 0, 255))
    face["nose"] = dict(w=u(0.16, 0.29) * a, nostril=u(0.25, 0.5), shade=u(0.70, 0.90),
                        tip=u(0.35, 0.6), bridge=u(0.07, 0.14) * a, drop=u(0.05, 0.08) * b,
                        tint=u(0.97, 1.06))
    if rng.random() < 0.4:
        lip_colour = _LIPSTICK[rng.integers(len(_LIPSTICK))] + u(-8, 8, 3)
    else:
        lip_colour = skin * np.array((0.86, 0.58, 0.58)) + np.array((20, 8, 12)) + u(-8, 8, 3)
    face["lip"] = dict(w=u(0.26, 0.40) * a, tu=u(0.04, 0.085) * b, tl=u(0.06, 0.12) * b,
                        bow=u(0.1, 0.45), corner=u(-0.01, 0.015) * b, open=0.0,
                        colour=_clip(lip_colour, 0, 255).astype(np.float32))
    face["hair"] = dict(style=int(rng.choice(3, p=(0.35, 0.3, 0.35))), colour=hair_colour,
                        volume=u(0.05, 0.2), line=u(0.52, 0.72), temple=u(0.0, 0.08) * b,
                        part=u(-0.5, 0.5) * a, dip=u(0.0, 0.1) * b, sideburn=u(0.08, 0.22) * b,
                        flare=u(0.1, 0.3) * a, strands=u(-1, 1, (9, 2)))
    face["age"] = dict(level=u(0.45, 1.0), jitter=u(-1, 1, (4, 5)), spots=u(0, 1, (12, 3)),
                       lines=u(0.3, 0.45))
    face["scene"] = dict(
        bg=u(20, 235, (2, 3)), bg_angle=u(0, 2 * math.pi),
        blobs=u(0, 1, (3, 6)), n_blobs=int(rng.integers(0, 4)),
        cloth=u(15, 230, 3), light_angle=u(0, 2 * math.pi), light=u(0.06, 0.22),
        vignette=u(0.04, 0.14), noise=u(2.0, 4.5), ear=u(0.88, 0.95), neck=u(0.80, 0.9))
    # Attribute edits (used only when applied).
    sunglasses = rng.random() < 0.15
    face["bangs"] = dict(length=u(0.72, 0.95), slant=u(-0.12, 0.12) * b, jag=u(0.03, 0.07) * b,
                         n=int(rng.integers(6, 11)), colour=hair_colour * u(0.9, 1.05))
    face["glasses"] = dict(shape=u(2.0, 5.0), hw=u(0.62, 0.8), hh=u(0.40, 0.55),
                           th=u(1.6, 3.2), colour=_FRAMES[rng.integers(len(_FRAMES))].copy(),
                           tint=(u(0.3, 0.45) if sunglasses else u(0.78, 0.9)) * u(0.93, 1.0, 3))
    beard_colour = hair_colour * u(0.6, 0.9)
    if abs(_luma(beard_colour) - _luma(skin)) < 60:
        beard_colour = beard_colour * 0.45
    face["beard"] = dict(style=int(rng.integers(3)), colour=beard_colour, ext=u(0.02, 0.08) * b,
                         strands=u(0, 1, (28, 3)))
    face["smile"] = dict(lift=u(0.07, 0.11) * b, widen=u(0.1, 0.2), open=u(0.45, 0.8))
    face["young"] = dict(tone=u(1.01, 1.03), noise=u(0.3, 0.5))
    return face


def _donor_parts(rng, target):
    """Part parameters of a random donor face, pushed to differ visibly from the target's."""
    donor = _sample_face(rng)
    t, d = target, donor
    a, b = t["layout"]["a"], t["layout"]["b"]
    # Sizes are relative to the donor's own face; rescale to the target's.
    ra, rb = a / d["layout"]["a"], b / d["layout"]["b"]
    d["eye"]["w"] *= ra
    d["nose"]["w"] *= ra
    d["nose"]["bridge"] *= ra
    d["nose"]["drop"] *= rb
    d["lip"]["w"] *= ra
    for key in ("tu", "tl", "corner"):
        d["lip"][key] *= rb
    for key in ("gap", "arch"):
        d["eyebrow"][key] *= rb
    for key in ("temple", "dip", "sideburn"):
        d["hair"][key] *= rb
    d["hair"]["part"] *= ra
    d["hair"]["flare"] *= ra

    d["nose"]["w"] = _far(rng, t["nose"]["w"], 0.16 * a, 0.29 * a, 0.05 * a)
    d["nose"]["shade"] = _far(rng, t["nose"]["shade"], 0.70, 0.90, 0.07)
    d["nose"]["nostril"] = _far(rng, t["nose"]["nostril"], 0.25, 0.5, 0.1)
    d["eye"]["w"] = _far(rng, t["eye"]["w"], 0.30 * a, 0.40 * a, 0.04 * a)
    d["eye"]["up"] = _far(rng, t["eye"]["up"], 0.20, 0.34, 0.05)
    d["eye"]["iris"] = _far_colour(rng, _IRIS, t["eye"]["iris"], 50)
    d["eyebrow"]["th_in"] = _far(rng, t["eyebrow"]["th_in"], 2.5, 7.0, 2.0)
    d["eyebrow"]["gap"] = _far(rng, t["eyebrow"]["gap"], 0.13 * b, 0.21 * b, 0.03 * b)
    brow_colour = t["eyebrow"]["colour"]
    if np.linalg.norm(d["eyebrow"]["colour"] - brow_colour) < 50:
        d["eyebrow"]["colour"] = _clip(brow_colour + (60 if _luma(brow_colour) < 100 else -70),
                                       0, 255)
    d["lip"]["tl"] = _far(rng, t["lip"]["tl"], 0.06 * b, 0.12 * b, 0.02 * b)
    if np.linalg.norm(d["lip"]["colour"] - t["lip"]["colour"]) < 50:
        d["lip"]["colour"] = _far_colour(rng, _LIPSTICK, t["lip"]["colour"], 50)
    d["hair"]["colour"] = _far_colour(rng, _HAIR, t["hair"]["colour"], 80)
    if rng.random() < 0.7:
        d["hair"]["style"] = int((t["hair"]["style"] + rng.integers(1, 3)) % 3)
    d["hair"]["line"] = _far(rng, t["hair"]["line"], 0.52, 0.72, 0.06)
    return {name: d[name] for name in COMPONENT_PARTS.values()}


# --------------------------------------------------------------------------------------
# Geometry pieces (local coordinates: canonical pixels, origin at the face centre, y down)
# --------------------------------------------------------------------------------------


def _face_contour(lay, psi):
    """Points of the head outline at angles psi: superellipse jaw below, ellipse above."""
    c, s = np.cos(psi), np.sin(psi)
    lower = s >= 0
    n = lay["jaw_n"]
    x = np.where(lower, np.sign(c) * np.abs(c) ** (2 / n), c) * lay["a"]
    y = np.where(lower, np.sign(s) * np.abs(s) ** (2 / n) * lay["b"], s * lay["bt"])
    x = x * (1 - lay["chin"] * _clip(y / lay["b"], 0, 1) ** 2)
    return np.stack([x, y], -1)


def _ellipse(cx, cy, rx, ry, num=24, n=2.0, t0=0.0, t1=2 * math.pi):
    t = np.linspace(t0, t1, num, endpoint=(t1 - t0) < 2 * math.pi - 1e-6)
    c, s = np.cos(t), np.sin(t)
    e = 2.0 / n
    x = cx + rx * np.sign(c) * np.abs(c) ** e
    return np.stack([x, cy + ry * np.sign(s) * np.abs(s) ** e], -1)


_FLIP = np.array((-1.0, 1.0))


def _mirror(p):
    return p * _FLIP


def _base_piece(lay):
    """Head outline, jaw landmarks 0-16, neck, ears."""
    a, b = lay["a"], lay["b"]
    # Jaw point 0 sits a little below the eye line, at the side of the head.
    y0 = lay["ye"] + 0.06 * b
    s0 = (abs(y0) / b) ** (lay["jaw_n"] / 2) if y0 > 0 else abs(y0) / lay["bt"]
    delta = -math.copysign(math.asin(min(s0, 0.99)), y0)
    span = math.pi + 2 * delta
    jaw = _face_contour(lay, math.pi + delta - np.linspace(0, 1, 17) * span)
    psi = np.concatenate([np.linspace(math.pi + delta, -delta, 65),
                          np.linspace(-delta, -math.pi + delta, 34)[1:-1]])
    ear_y = 0.5 * (lay["ye"] + lay["yn"]) - 0.02 * b
    return dict(lm=jaw, face=_face_contour(lay, psi),
                neck=np.array([(-0.5 * a, 0.4 * b), (0.5 * a, 0.4 * b), (0.58 * a, 2.2 * b),
                               (-0.58 * a, 2.2 * b)]),
                ears=[_ellipse(sx * 0.97 * a, ear_y, 0.14 * a, 0.21 * b, 16) for sx in (-1, 1)])


def _eye_piece(lay, eye):
    """Both eyes: landmarks 36-47, outlines, lids, iris centres."""
    cx, cy, w = -lay["es"], lay["ye"], eye["w"]
    hu, hl, tilt = eye["up"] * w, eye["lo"] * w, eye["tilt"] * w
    outer = np.array((cx - w / 2, cy - tilt / 2))
    inner = np.array((cx + w / 2, cy + tilt / 2))

    def lid(tau, h, p):  # points along a lid, tau from the outer (0) to the inner (1) corner
        base = outer + (inner - outer) * tau[:, None]
        return base + np.stack([np.zeros_like(tau), h * np.sin(np.pi * tau) ** p], -1)

    tau = np.linspace(0, 1, 13)
    upper, lower = lid(tau, -hu, 0.8), lid(tau, hl, 1.0)
    third = np.array((1 / 3, 2 / 3))
    right = np.concatenate([outer[None], lid(third, -hu, 0.8), inner[None],
                            lid(third[::-1], hl, 1.0)])
    left = _mirror(right[[3, 2, 1, 0, 5, 4]])
    cover = eye["iris_r"] * w + 2  # lid bands hide the iris outside the eye opening
    band_up = np.concatenate([upper, (upper - (0, cover))[::-1]])
    band_lo = np.concatenate([lower, (lower + (0, cover))[::-1]])
    outline = np.concatenate([upper, lower[::-1][1:-1]])
    crease = lid(np.linspace(0.1, 0.95, 8), -hu - 0.12 * w, 0.8)
    iris = np.array([(cx + eye["gaze"] * w, cy - 0.2 * (hu - hl))])

    def both(p):
        return [p, _mirror(p)]

    return dict(lm=np.concatenate([right, left]), outlines=both(outline), uppers=both(upper),
                lowers=both(lower[2:-2]), creases=both(crease),
                bands=both(band_up) + both(band_lo), iris=np.concatenate([iris, _mirror(iris)]),
                iris_r=eye["iris_r"] * w, bags=both(lower[2:-2] + (0, 0.07 * lay["b"])),
                corners=np.stack([outer, _mirror(outer)]))


def _brow_piece(lay, brow):
    """Both brows: landmarks 17-26 (centre line) and filled outlines."""
    w = 0.35 * lay["a"]  # nominal eye width: brows do not move when only the eyes change
    x_out = -lay["es"] - w * brow["out"] - 0.05 * w
    x_in = -lay["es"] + w / 2 - brow["inner"] * w
    tau = np.linspace(0, 1, 9)  # outer -> inner
    x = x_out + (x_in - x_out) * tau
    y = (lay["ye"] - brow["gap"] - brow["arch"] * np.sin(np.pi * tau ** 0.66)
         + 0.3 * brow["arch"] * (1 - tau))
    half = (brow["th_out"] + (brow["th_in"] - brow["th_out"]) * tau) / 2
    centre = np.stack([x, y], -1)
    up, lo = centre - np.stack([0 * half, half], -1), centre + np.stack([0 * half, half], -1)
    outline = np.concatenate([up, lo[::-1]])
    right = centre[::2]
    return dict(lm=np.concatenate([right, _mirror(right[::-1])]),
                outlines=[outline, _mirror(outline)], top=float(np.min(up[:, 1])))


def _nose_piece(lay, nose):
    """Landmarks 27-35, drawing strokes and the region the nose may cover."""
    y0, yn = lay["ye"] - 0.02 * lay["b"], lay["yn"]
    nw, d, bw = nose["w"], nose["drop"], nose["bridge"]
    ridge = np.stack([np.zeros(4), np.linspace(y0, yn, 4)], -1)
    base = np.array([(-nw, yn + 0.45 * d), (-0.5 * nw, yn + 0.9 * d), (0, yn + d),
                     (0.5 * nw, yn + 0.9 * d), (nw, yn + 0.45 * d)])
    side = np.stack([np.array((0.55, 0.6, 0.7, 0.9)) * bw + np.array((0, 0, 0.1, 0.45)) * nw,
                     np.linspace(y0 + 0.25 * (yn - y0), yn - 0.2 * d, 4)], -1)
    alar = _ellipse(0.72 * nw, yn + 0.1 * d, 0.38 * nw, 0.55 * d, 9, t0=-2.2, t1=1.7)
    nostril = np.array([(0.48 * nw, yn + 0.6 * d)])
    region = np.array([(-1.15 * bw, y0 - 2), (1.15 * bw, y0 - 2), (1.1 * nw, yn - 1.2 * d),
                       (1.25 * nw, yn + 0.4 * d), (0.8 * nw, yn + 1.25 * d),
                       (-0.8 * nw, yn + 1.25 * d), (-1.25 * nw, yn + 0.4 * d),
                       (-1.1 * nw, yn - 1.2 * d)])
    return dict(lm=np.concatenate([ridge, base]), sides=[_mirror(side), side],
                alars=[_mirror(alar), alar], nostrils=np.concatenate([_mirror(nostril), nostril]),
                nostril_ax=(nose["nostril"] * nw * 0.55, 0.22 * d + 0.4),
                tip=_ellipse(0, yn - 0.25 * d, nose["tip"] * nw * 0.55, 0.45 * d, 16),
                region=region)


def _lips_piece(lay, lips, smile=None):
    """Landmarks 48-67 and lip polygons; ``smile`` raises the corners and opens the mouth."""
    mw, tu, tl, corner, opening = lips["w"], lips["tu"], lips["tl"], lips["corner"], lips["open"]
    if smile is not None:
        mw, corner = mw * (1 + smile["widen"]), corner + smile["lift"]
        opening = smile["open"] * (tu + tl) * 0.6
    ym = lay["ym"]

    def line(t):
        return ym - corner * t ** 2

    def outer_up(t):
        return line(t) - tu * (1 - t ** 2) ** 0.6 * (1 - lips["bow"] * np.exp(-(t / 0.22) ** 2))

    def outer_lo(t):
        return line(t) + tl * (1 - t ** 2) ** 0.55

    def inner(t, sign):
        return line(t) + sign * 0.5 * opening * _clip(1 - (t / 0.9) ** 2, 0, 1) ** 0.5

    def curve(t, fn, *args):
        return np.stack([t * mw, fn(t, *args)], -1)

    t, ti = np.linspace(-1, 1, 21), np.linspace(-0.9, 0.9, 15)
    up_out, lo_out = curve(t, outer_up), curve(t, outer_lo)
    up_in, lo_in = curve(ti, inner, -1), curve(ti, inner, 1)
    lm = np.concatenate([
        curve(np.array((-1, -0.6, -0.25, 0, 0.25, 0.6, 1)), outer_up),  # 48-54
        curve(np.array((0.6, 0.3, 0, -0.3, -0.6)), outer_lo),  # 55-59
        curve(np.array((-0.9, -0.35, 0, 0.35, 0.9)), inner, -1),  # 60-64
        curve(np.array((0.35, 0, -0.35)), inner, 1)])  # 65-67
    is_open = opening > 0
    return dict(lm=lm, upper=np.concatenate([up_out, up_in[::-1]]),
                lower=np.concatenate([lo_out, lo_in[::-1]]),
                outline=np.concatenate([up_out, lo_out[::-1][1:-1]]),
                inner=np.concatenate([up_in, lo_in[::-1]]) if is_open else None,
                teeth=(np.concatenate([up_in, (up_in + (0, 0.6 * opening))[::-1]]) if is_open
                       else None),
                mouth_line=up_in, w=mw, top=float(np.min(up_out[:, 1])))


def _hair_piece(lay, hair):
    """Hair cap (above the hairline), optional back layer (medium / long), strands."""
    a, bt = lay["a"], lay["bt"]
    v = hair["volume"]
    ax, ay = a * (1 + v), bt * (1 + 1.3 * v)
    yt = lay["ye"] - hair["temple"]
    dt = math.asin(min(0.99, -yt / ay)) if yt < 0 else 0.0
    psi = np.linspace(-dt, -math.pi + dt, 25)
    top = np.stack([ax * np.cos(psi), ay * np.sin(psi)], -1)  # right temple -> over -> left
    xs = np.linspace(0.93 * a, -0.93 * a, 21)
    ys = (yt + (-hair["line"] * bt - yt) * _clip(1 - (xs / (0.93 * a)) ** 2, 0, 1) ** 0.5
          - hair["dip"] * np.exp(-((xs - hair["part"]) / (0.15 * a)) ** 2))
    hairline = np.stack([xs, ys], -1)
    sb = yt + hair["sideburn"]
    # right temple (outer) -> sideburn -> hairline -> left sideburn -> back over the top
    cap = np.concatenate([top[:1], [(1.01 * a, sb), (0.88 * a, sb)], hairline,
                          [(-0.88 * a, sb), (-1.01 * a, sb)], top[::-1]])
    back = None
    if hair["style"] > 0:
        y_end = lay["yn"] + 0.25 * lay["b"] if hair["style"] == 1 else 1.7 * lay["b"]
        f = 0.03 * a if hair["style"] == 1 else hair["flare"]
        back = np.concatenate([top, [(-ax - f, y_end), (ax + f, y_end)]])
    crown = np.array((hair["part"] * 0.5, -ay * 0.96))
    ends = hairline[1:-1:2] - (0, 0.04 * bt)  # (10, 2)
    f = np.linspace(0.15, 0.95, 5)[None, :, None]  # (1, 5, 1)
    bend = hair["strands"][np.arange(len(ends)) % 9][:, None, :] * np.array((3.0, 1.0))
    strands = crown + (ends[:, None, :] - crown) * f + bend * f * (1 - f)
    return dict(cap=cap, back=back, strands=list(strands), hairline=hairline)


def _age_piece(lay, face, brow_top, eyes, nose_w, lips_w):
    """Forehead lines, nasolabial folds, crow's feet and spots (removed by Young)."""
    a, b = lay["a"], lay["b"]
    age = face["age"]
    yhair = -face["hair"]["line"] * lay["bt"]
    n_lines = 2 + int(round(2 * age["level"]))
    lines = []
    for i in range(n_lines):
        y = brow_top - (0.15 + 0.5 * i / n_lines) * (brow_top - yhair)
        half = age["lines"] * a * (1 - 0.15 * i / n_lines)
        xs = np.linspace(-half, half, 5)
        ys = y + 0.8 * age["jitter"][i % 4] - 1.5 * (1 - (xs / half) ** 2)
        lines.append(np.stack([xs, ys], -1))
    folds, crows = [], []
    length = 0.25 * face["eye"]["w"]
    for sx, corner in zip((-1, 1), eyes["corners"]):
        start = np.array((sx * 1.25 * nose_w, lay["yn"] - 0.02 * b))
        end = np.array((sx * (lips_w + 0.07 * a), lay["ym"] + 0.08 * b))
        folds.append(np.stack([start, 0.5 * (start + end) + (sx * 0.04 * a, 0), end]))
        for ang in (-0.45, 0.0, 0.45):
            tip = corner + (sx * (3 + length * math.cos(ang)), length * math.sin(ang))
            crows.append(np.stack([corner + (sx * 3, 0), tip]))
    n_spots = 3 + int(round(9 * age["level"]))
    sx, sy, sr = age["spots"][:n_spots].T
    group = np.arange(n_spots) % 3  # 0 left cheek, 1 right cheek, 2 forehead
    side = np.where(group == 0, -1.0, 1.0)
    x = np.where(group == 2, (-0.4 + 0.8 * sx) * a, side * (0.35 + 0.35 * sx) * a)
    y = np.where(group == 2, brow_top - (0.1 + 0.15 * sy) * b, (0.05 + 0.4 * sy) * b)
    return dict(lines=lines, folds=folds, crows=crows, spots=np.stack([x, y], -1),
                spot_r=1.0 + 1.5 * sr)


def _bangs_piece(lay, bangs, hairline, brow_top):
    a, b = lay["a"], lay["b"]
    yh = float(np.min(hairline[:, 1]))
    yb = brow_top - 0.015 * b - (1 - bangs["length"]) * (brow_top - yh)
    n = bangs["n"]
    xs = np.linspace(0.92 * a, -0.92 * a, 2 * n + 1)
    ys = yb + bangs["slant"] * xs / a - bangs["jag"] * (np.arange(2 * n + 1) % 2)
    ys = np.minimum(ys, brow_top - 0.01 * b)
    ys[0] = min(ys[0], hairline[0, 1] + 0.05 * b)
    ys[-1] = min(ys[-1], hairline[-1, 1] + 0.05 * b)
    bottom = np.stack([xs, ys], -1)
    tops = np.interp(xs[1::2], hairline[::-1, 0], hairline[::-1, 1]) + 0.02 * b
    strands = [np.array([(x, y0), (x + 0.03 * a, y - 0.15 * (y - yh))])
               for x, y0, y in zip(xs[1::2], tops, ys[1::2])]
    return dict(poly=np.concatenate([hairline - (0, 0.04 * b), bottom[::-1]]), strands=strands)


def _glasses_piece(lay, gl, eye):
    a, w = lay["a"], eye["w"]
    hw, hh = gl["hw"] * w, gl["hh"] * w
    yc = lay["ye"] - 0.03 * w
    lens = _ellipse(-lay["es"], yc, hw, hh, 32, n=gl["shape"])
    bridge = np.array([(-lay["es"] + hw * 0.98, yc - 0.25 * hh), (0, yc - 0.25 * hh - 0.04 * a),
                       (lay["es"] - hw * 0.98, yc - 0.25 * hh)])
    temple = np.array([(-lay["es"] - hw * 0.98, yc - 0.3 * hh), (-0.99 * a, lay["ye"] - 0.04 * a)])
    return dict(lenses=[lens, _mirror(lens)], bridge=bridge, temples=[temple, _mirror(temple)])


def _beard_piece(lay, beard, jaw, nose_lm, lips):
    a, b = lay["a"], lay["b"]
    outward = jaw / np.maximum(np.linalg.norm(jaw, axis=1, keepdims=True), 1e-6)
    low = jaw + outward * beard["ext"] * _clip(jaw[:, 1:2] / b, 0, 1)
    y_nose = nose_lm[6, 1] + 0.015 * b  # just below the subnasale
    mw, ym = lips["w"], lay["ym"]
    moustache = np.array([(-0.55 * mw, y_nose), (0.55 * mw, y_nose)])  # left -> right
    if beard["style"] == 1:  # goatee and moustache
        right = np.array([(mw + 0.05 * a, ym - 0.02 * b), (mw + 0.03 * a, ym + 0.12 * b)])
        pts = np.concatenate([right[::-1], moustache[::-1], _mirror(right), low[6:11]])
    else:  # full beard (style 2 is drawn as stubble)
        cheek = np.array([(0.6 * a, lay["yn"] + 0.08 * b), (mw + 0.06 * a, lips["top"] - 0.01 * b)])
        # jaw right -> left, left cheek (outer -> inner), moustache, right cheek (inner -> outer)
        pts = np.concatenate([low[2:15][::-1], _mirror(cheek), moustache, cheek[::-1]])
    lo, hi = pts.min(0), pts.max(0)
    st = beard["strands"]
    starts = lo + st[:, :2] * (hi - lo)
    ends = starts + np.stack([1.5 * (st[:, 2] - 0.5), np.full(len(st), 3.0)], -1)
    return dict(poly=pts, strands=list(np.stack([starts, ends], 1)))


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------

_SHIFT = 4  # cv2 fixed-point bits: sub-pixel accurate polygons
_ONE = 1 << _SHIFT
_FLOAT_KEYS = ("lm", "iris", "nostrils", "spots")  # kept as float pixel coordinates


def _ipts(p):
    return np.round(p * _ONE).astype(np.int32)


def _col(c):
    """Colour as a tuple of floats (cv2 saturates out-of-range values)."""
    return tuple(c.tolist()) if isinstance(c, np.ndarray) else tuple(float(v) for v in c)


def _fill(img, pts, colour):
    cv2.fillPoly(img, [pts], _col(colour), cv2.LINE_AA, _SHIFT)


def _lines(img, polylines, colour, thickness, closed=False):
    cv2.polylines(img, polylines, closed, _col(colour), max(1, int(round(thickness))),
                  cv2.LINE_AA, _SHIFT)


def _disc(img, xy, r, colour):
    cv2.circle(img, (int(round(xy[0] * _ONE)), int(round(xy[1] * _ONE))),
               max(1, int(round(r * _ONE))), _col(colour), -1, cv2.LINE_AA, _SHIFT)


class _Renderer:
    """Draws states of one face at one size; caches geometry and state-independent layers.

    A state is (parts, attrs): parts maps each of COMPONENT_PARTS' names ('nose', 'eye',
    'eyebrow', 'lip', 'hair') to the target's or a donor's parameters; attrs is a frozenset of
    applied attribute ids.
    """

    def __init__(self, face, size, noise):
        self.face, self.size, self.s = face, size, size / 256.0
        lay, sc = face["layout"], face["scene"]
        cos, sin = math.cos(lay["roll"]), math.sin(lay["roll"])
        self._rot = np.array([[cos, sin], [-sin, cos]])  # rotation for row vectors
        self._centre = np.array((lay["cx"], lay["cy"]))
        self._cache = {}
        # Smooth layers are computed on a coarse grid and upsampled (fast).
        n = 33
        grid = np.linspace(-0.5, 0.5, n, dtype=np.float32)
        gx, gy = grid[None, :], grid[:, None]
        t = _clip(0.5 + gx * math.cos(sc["bg_angle"]) + gy * math.sin(sc["bg_angle"]), 0, 1)
        bg = (sc["bg"][0] + (sc["bg"][1] - sc["bg"][0]) * t[..., None]).astype(np.uint8)
        base = cv2.resize(bg, (size, size), interpolation=cv2.INTER_LINEAR)
        for i in range(sc["n_blobs"]):
            x, y, r, c1, c2, c3 = sc["blobs"][i]
            cv2.circle(base, (int(x * size), int(y * size)), int((0.05 + 0.15 * r) * size) + 1,
                       _col(_clip(sc["bg"][i % 2] * (0.7 + 0.6 * np.array((c1, c2, c3))), 0, 255)),
                       -1, cv2.LINE_AA)
        cloth = _ellipse(0, 2.0 * lay["b"], 2.1 * lay["a"], 0.8 * lay["b"], 32)
        _fill(base, _ipts(self._to_px(cloth)), sc["cloth"])
        self.base = base
        cx, cy = (lay["cx"] + 0.5) / 256 - 0.5, (lay["cy"] + 0.5) / 256 - 0.5
        light = 1 + sc["light"] * 2 * ((gx - cx) * math.cos(sc["light_angle"])
                                        + (gy - cy) * math.sin(sc["light_angle"]))
        vig = 1 - sc["vignette"] * (((gx - cx) / (1.6 * lay["a"] / 256)) ** 2
                                     + ((gy - cy) / (1.6 * lay["b"] / 256)) ** 2)
        shade = np.repeat((light * np.maximum(vig, 0.55)).astype(np.float32)[..., None], 3, 2)
        self.shade = cv2.resize(shade, (size, size), interpolation=cv2.INTER_LINEAR)
        self.noise = noise

    def _to_px(self, p):
        return ((p @ self._rot) + self._centre + 0.5) * self.s - 0.5

    def _convert(self, piece):
        """Local piece -> pixels: point arrays (n, 2) and lists of them, in one transform."""
        out = {"_local": piece}
        keys, arrays = [], []
        for key, v in piece.items():
            if isinstance(v, np.ndarray) and v.ndim == 2:
                keys.append((key, None))
                arrays.append(v)
            elif isinstance(v, list):
                out[key] = []
                keys.extend((key, i) for i in range(len(v)))
                arrays.extend(v)
            else:
                out[key] = v
        if not arrays:
            return out
        px = self._to_px(np.concatenate(arrays))
        fixed = _ipts(px)
        ends = np.cumsum([len(p) for p in arrays])
        starts = np.concatenate([[0], ends[:-1]])
        for (key, i), a, b in zip(keys, starts, ends):
            value = px[a:b] if key in _FLOAT_KEYS else fixed[a:b]
            if i is None:
                out[key] = value
            else:
                out[key].append(value)
        return out

    def piece(self, name, params=None, flag=False):
        """Geometry of one piece in pixels (int32 fixed-point polygons), cached."""
        key = (name, id(params), flag)
        if key not in self._cache:
            f, lay = self.face, self.face["layout"]
            if name == "base":
                p = _base_piece(lay)
            elif name == "eye":
                p = _eye_piece(lay, params)
            elif name == "eyebrow":
                p = _brow_piece(lay, params)
            elif name == "nose":
                p = _nose_piece(lay, params)
            elif name == "lip":
                p = _lips_piece(lay, params, f["smile"] if flag else None)
            elif name == "hair":
                p = _hair_piece(lay, params)
            elif name == "age":
                p = _age_piece(lay, f, self.local("eyebrow")["top"], self.local("eye"),
                               f["nose"]["w"], f["lip"]["w"])
            elif name == "bangs":
                p = _bangs_piece(lay, f["bangs"], self.local("hair")["hairline"],
                                 self.local("eyebrow")["top"])
            elif name == "glasses":
                p = _glasses_piece(lay, f["glasses"], f["eye"])
            elif name == "beard":
                p = _beard_piece(lay, f["beard"], self.local("base")["lm"],
                                 self.local("nose")["lm"], self.local("lip"))
            else:
                raise KeyError(name)
            self._cache[key] = self._convert(p)
        return self._cache[key]

    def local(self, name):
        """The target face's own piece in local coordinates."""
        params = None if name == "base" else self.face[name]
        return self.piece(name, params)["_local"]

    def state(self, parts, attrs):
        st = {name: self.piece(name, parts[name]) for name in ("eye", "eyebrow", "nose", "hair")}
        st["lip"] = self.piece("lip", parts["lip"], 4 in attrs)
        st["base"] = self.piece("base")
        st["age"] = self.piece("age")
        for k, name in ((1, "bangs"), (2, "glasses"), (3, "beard")):
            if k in attrs:
                st[name] = self.piece(name)
        return st

    @staticmethod
    def landmarks(st):
        return np.concatenate([st["base"]["lm"], st["eyebrow"]["lm"], st["nose"]["lm"],
                               st["eye"]["lm"], st["lip"]["lm"]]).astype(np.float32)

    def draw(self, st, parts, attrs):
        """Draw one state before lighting and noise: uint8 (S, S, 3)."""
        f, s = self.face, self.s
        img = self.base.copy()
        young = 5 in attrs
        skin = f["skin"] * (f["young"]["tone"] if young else 1.0)
        sc, hair, base, hp = f["scene"], parts["hair"], st["base"], st["hair"]
        if hp["back"] is not None:
            _fill(img, hp["back"], hair["colour"] * 0.85)
        _fill(img, base["neck"], skin * sc["neck"])
        cv2.fillPoly(img, base["ears"], _col(skin * sc["ear"]), cv2.LINE_AA, _SHIFT)
        _fill(img, base["face"], skin)
        if not young:
            self._draw_age(img, st["age"], skin)
        if 3 in attrs:
            self._draw_beard(img, st["beard"], f["beard"])
        self._draw_nose(img, st["nose"], parts["nose"], skin)
        self._draw_lips(img, st["lip"], parts["lip"])
        self._draw_eyes(img, st["eye"], parts["eye"], skin)
        if not young:
            _lines(img, st["eye"]["bags"], skin * (1 - 0.18 * f["age"]["level"]), 1.6 * s)
        brow_colour = _col(parts["eyebrow"]["colour"])
        cv2.fillPoly(img, st["eyebrow"]["outlines"], brow_colour, cv2.LINE_AA, _SHIFT)
        if 2 in attrs:
            self._draw_glasses(img, st["glasses"], f["glasses"])
        _fill(img, hp["cap"], hair["colour"])
        _lines(img, hp["strands"], hair["colour"] * 0.72, 1.2 * s)
        if 1 in attrs:
            _fill(img, st["bangs"]["poly"], f["bangs"]["colour"])
            _lines(img, st["bangs"]["strands"], f["bangs"]["colour"] * 0.7, 1.3 * s)
        return img

    def _draw_age(self, img, ag, skin):
        s, level = self.s, self.face["age"]["level"]
        dark = skin * (1 - 0.24 * level)
        _lines(img, ag["lines"], dark, 1.8 * s)
        _lines(img, ag["folds"], skin * (1 - 0.26 * level), 2.4 * s)
        _lines(img, ag["crows"], dark, 1.3 * s)
        spot = skin * np.array((0.78, 0.72, 0.68))
        for xy, r in zip(ag["spots"], ag["spot_r"]):
            _disc(img, xy, r * s, spot)

    def _crop(self, polys, pad=3):
        pts = np.concatenate(polys) >> _SHIFT
        x0, y0 = np.maximum(pts.min(0) - pad, 0)
        x1, y1 = np.minimum(pts.max(0) + pad + 1, self.size)
        if x1 <= x0 or y1 <= y0:
            return None
        return (slice(y0, y1), slice(x0, x1)), np.array((x0, y0), np.int32) * _ONE

    def _draw_beard(self, img, bp, beard):
        s, found = self.s, self._crop([bp["poly"]])
        if found is None:
            return
        sl, off = found
        crop = img[sl]
        layer = crop.copy()
        _fill(layer, bp["poly"] - off, beard["colour"])
        strands = [p - off for p in bp["strands"]]
        _lines(layer, strands[::2], beard["colour"] * 0.6, 1.2 * s)
        _lines(layer, strands[1::2], beard["colour"] * 1.3 + 10, 1.0 * s)
        m = np.zeros(crop.shape[:2], np.uint8)
        cv2.fillPoly(m, [bp["poly"] - off], 255, cv2.LINE_AA, _SHIFT)
        alpha = m.astype(np.float32) * ((0.55 if beard["style"] == 2 else 1.0) / 255)
        crop[:] = cv2.blendLinear(layer, crop, alpha, 1 - alpha)

    def _draw_nose(self, img, npc, nose, skin):
        s = self.s
        _fill(img, npc["tip"], skin * nose["tint"] * 1.05)
        _lines(img, npc["sides"], skin * (0.5 + 0.5 * nose["shade"]), 1.8 * s)
        _lines(img, npc["alars"], skin * nose["shade"], 1.8 * s)
        rx, ry = npc["nostril_ax"]
        axes = (max(1, int(round(rx * s * _ONE))), max(1, int(round(ry * s * _ONE))))
        angle = -math.degrees(self.face["layout"]["roll"])
        for c in npc["nostrils"]:
            cv2.ellipse(img, (int(round(c[0] * _ONE)), int(round(c[1] * _ONE))), axes, angle,
                        0, 360, _col(skin * 0.35), -1, cv2.LINE_AA, _SHIFT)

    def _draw_lips(self, img, lp, lips):
        if lp["inner"] is not None:
            _fill(img, lp["inner"], (70, 22, 28))
            _fill(img, lp["teeth"], _TEETH)
        _fill(img, lp["upper"], lips["colour"] * 0.9)
        _fill(img, lp["lower"], lips["colour"] * 1.05 + 6)
        _lines(img, [lp["mouth_line"]], lips["colour"] * 0.45, 1.4 * self.s)

    def _draw_eyes(self, img, ep, eye, skin):
        s = self.s
        r = ep["iris_r"] * s
        cv2.fillPoly(img, ep["outlines"], _col(eye["sclera"]), cv2.LINE_AA, _SHIFT)
        for xy in ep["iris"]:
            _disc(img, xy, r, eye["iris"])
            _disc(img, xy, 0.45 * r, (18, 14, 14))
            _disc(img, xy + (0.3 * r, -0.3 * r), max(0.6, 0.18 * r), (250, 250, 250))
        cv2.fillPoly(img, ep["bands"], _col(skin), cv2.LINE_AA, _SHIFT)
        _lines(img, ep["uppers"], (32, 24, 24), eye["liner"] * s)
        _lines(img, ep["lowers"], skin * 0.7, 0.9 * s)
        _lines(img, ep["creases"], skin * 0.8, 1.0 * s)

    def _draw_glasses(self, img, gp, gl):
        s, found = self.s, self._crop(gp["lenses"])
        if found is not None:
            sl, off = found
            crop = img[sl]
            m = np.zeros(crop.shape[:2], np.uint8)
            cv2.fillPoly(m, [p - off for p in gp["lenses"]], 255, cv2.LINE_AA, _SHIFT)
            alpha = m.astype(np.float32) * (1 / 255)
            tinted = cv2.multiply(crop, tuple(float(t) for t in gl["tint"]) + (0.0,))
            crop[:] = cv2.blendLinear(tinted, crop, alpha, 1 - alpha)
        _lines(img, gp["lenses"], gl["colour"], gl["th"] * s, closed=True)
        _lines(img, [gp["bridge"]] + gp["temples"], gl["colour"], gl["th"] * s)

    def finish(self, pre, sl=(slice(None), slice(None)), lum_offset=0.0, noise_scale=1.0):
        """pre[sl] x lighting + grey offset + scaled sensor noise -> uint8."""
        x = cv2.multiply(pre[sl], self.shade[sl], dtype=cv2.CV_32F)
        beta = float(noise_scale * self.face["scene"]["noise"])
        return cv2.addWeighted(x, 1.0, self.noise[sl], beta, float(lum_offset), dtype=cv2.CV_8U)


_NOISE_BANKS = {}


def _noise(rng, size):
    """Unit luminance noise (S, S, 3) float32: a random window of a fixed per-size bank."""
    if size not in _NOISE_BANKS:
        bank_rng = np.random.Generator(np.random.PCG64([20240, size]))
        bank = bank_rng.standard_normal((2 * size, 2 * size), dtype=np.float32)
        _NOISE_BANKS[size] = np.repeat(bank[..., None], 3, 2)
    y, x = rng.integers(0, size, 2)
    return _NOISE_BANKS[size][y:y + size, x:x + size]


# --------------------------------------------------------------------------------------
# Masks (uint8 0/255, (S, S))
# --------------------------------------------------------------------------------------


def _fill_each(m, polys, value):
    """Fill polygons one by one (one fillPoly call would XOR where they overlap)."""
    for p in polys:
        if p is not None:
            cv2.fillPoly(m, [p], value, cv2.LINE_8, _SHIFT)


def _mask(size, polys, grow=0.0):
    """Filled polygons (int32 fixed-point), grown by ``grow`` pixels."""
    m = np.zeros((size, size), np.uint8)
    polys = [p for p in polys if p is not None]
    _fill_each(m, polys, 255)
    if grow >= 0.5:
        cv2.polylines(m, polys, True, 255, int(round(2 * grow)), cv2.LINE_8, _SHIFT)
    return m


def _hair_mask(size, st):
    """Visible hair: back layer minus face and neck, plus the cap."""
    hp, base = st["hair"], st["base"]
    m = _mask(size, [hp["back"]])
    if hp["back"] is not None:
        _fill_each(m, [base["face"], base["neck"]], 0)
    _fill_each(m, [hp["cap"]], 255)
    return m


def _glasses_mask(size, gp, grow, s):
    m = _mask(size, gp["lenses"], grow)
    th = max(1, int(round(2 * grow + 4 * s)))
    cv2.polylines(m, [gp["bridge"]] + gp["temples"], False, 255, th, cv2.LINE_8, _SHIFT)
    return m


def _skin_mask(size, st, attrs, s):
    """Face skin left visible: head outline minus eyes, brows, lips, hair and attributes."""
    m = _mask(size, [st["base"]["face"]])
    features = st["eye"]["outlines"] + st["eyebrow"]["outlines"] + [st["lip"]["outline"]]
    _fill_each(m, features + [st["hair"]["cap"]], 0)
    cv2.polylines(m, features, True, 0, max(1, int(round(3 * s))), cv2.LINE_8, _SHIFT)
    if 1 in attrs:
        cv2.fillPoly(m, [st["bangs"]["poly"]], 0, cv2.LINE_8, _SHIFT)
    if 3 in attrs:
        cv2.fillPoly(m, [st["beard"]["poly"]], 0, cv2.LINE_8, _SHIFT)
    if 2 in attrs:
        m[_glasses_mask(size, st["glasses"], 1.5 * s, s) > 0] = 0
    return m


def _part_masks(size, st, attrs, s):
    masks = {
        "face": _mask(size, [st["base"]["face"]]),
        "skin": _skin_mask(size, st, attrs, s),
        "nose": _mask(size, [st["nose"]["region"]]),
        "eyes": _mask(size, st["eye"]["outlines"]),
        "brows": _mask(size, st["eyebrow"]["outlines"]),
        "lips": _mask(size, [st["lip"]["outline"]]),
        "hair": _hair_mask(size, st),
    }
    if 1 in attrs:
        masks["bangs"] = _mask(size, [st["bangs"]["poly"]])
    if 2 in attrs:
        masks["glasses"] = _glasses_mask(size, st["glasses"], 0, s)
    if 3 in attrs:
        masks["beard"] = _mask(size, [st["beard"]["poly"]])
    return masks


def _component_region(size, part, old, new, s):
    """Pixels a component swap may change: the old and the new part, grown a little."""
    if part == "nose":
        return _mask(size, [old["nose"]["region"], new["nose"]["region"]], 3 * s)
    if part == "eye":  # grown to cover lids and creases
        grow = 0.18 * new["eye"]["_local"]["iris_r"] / 0.22 * s + 2 * s
        return _mask(size, old["eye"]["outlines"] + new["eye"]["outlines"], grow)
    if part == "eyebrow":
        return _mask(size, old["eyebrow"]["outlines"] + new["eyebrow"]["outlines"], 2.5 * s)
    if part == "lip":
        return _mask(size, [old["lip"]["outline"], new["lip"]["outline"]], 3 * s)
    m = np.maximum(_hair_mask(size, old), _hair_mask(size, new))
    k = max(1, int(round(3 * s)))
    return cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))


def _attribute_region(size, attr, old, new, attrs, s):
    """Pixels an attribute edit may change (``new``/``attrs``: the state after the edit)."""
    if attr == 1:
        return _mask(size, [new["bangs"]["poly"]], 2 * s)
    if attr == 2:
        return _glasses_mask(size, new["glasses"], 2 * s, s)
    if attr == 3:
        m = _mask(size, [new["beard"]["poly"]], 2 * s)
        cv2.fillPoly(m, [new["lip"]["outline"]], 0, cv2.LINE_8, _SHIFT)
        return m
    if attr == 4:
        grow = 0.06 * new["lip"]["_local"]["w"] * s + 3 * s
        return _mask(size, [old["lip"]["outline"], new["lip"]["outline"]], grow)
    return _skin_mask(size, new, attrs, s)


def _bbox(m, pad, size):
    x, y, w, h = cv2.boundingRect(m)
    if w == 0 or h == 0:
        return None
    return (slice(max(0, y - pad), min(size, y + h + pad)),
            slice(max(0, x - pad), min(size, x + w + pad)))


# --------------------------------------------------------------------------------------
# Re-encoding trace
# --------------------------------------------------------------------------------------

_RAMP = np.arange(256, dtype=np.float32)[:, None]


def _reencode(img, gains, offsets, sigma):
    """One light global pass: per-channel gain and offset (LUT), then a 3x3 Gaussian blur."""
    lut = _RAMP * (1 + gains.astype(np.float32)) + offsets.astype(np.float32) + 0.5
    lut = _clip(lut, 0, 255).astype(np.uint8)
    out = cv2.LUT(img, lut.reshape(1, 256, 3))
    if sigma > 0.25:
        out = cv2.GaussianBlur(out, (3, 3), sigma)
    return out


def _sample_steps(rng):
    """Per-image trace parameters for MAX_LEN steps (always drawn in full)."""
    u = rng.uniform
    gain = np.array((u(*DRIFT_GAIN), u(-0.005, 0.01), -u(*DRIFT_GAIN)))
    offset = np.array((u(*DRIFT_OFFSET), u(-0.5, 1.0), -u(*DRIFT_OFFSET)))
    sign = rng.choice((-1.0, 1.0), MAX_LEN)
    return dict(
        gains=gain[None, :] * rng.uniform(0.8, 1.2, (MAX_LEN, 3)),
        offsets=offset[None, :] * rng.uniform(0.8, 1.2, (MAX_LEN, 3)),
        blur=rng.uniform(0.4, 0.8, MAX_LEN),
        lum_offset=sign * rng.uniform(*SEAM_OFFSET, MAX_LEN),
        feather=rng.uniform(2.0, 3.5, MAX_LEN))


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def generate_example(subset, index, seed=0, image_size=256, *, sequence=None, apply_edits=True,
                     return_parts=False):
    """One synthetic example, deterministic in (subset, index, seed).

    Args:
      subset: 'facial_components' or 'facial_attributes'.
      index, seed: non-negative ints.
      image_size: output side S in pixels (>= 32; drawn directly at this size).
      sequence: optional tuple of class ids to apply instead of the sampled one (tests, demos).
      apply_edits: False gives the same face with the same number of re-encoding passes but
        no region edits (label and mask all zero); for tests and visualisation.
      return_parts: also return 'parts', a dict of part masks (S, S) uint8 0/255 of the final
        image: 'face', 'skin', 'nose', 'eyes', 'brows', 'lips', 'hair' (+ 'bangs', 'glasses',
        'beard' when applied).

    Returns:
      dict(image uint8 (S, S, 3) RGB, label int32 (5,) class ids in edit order, 0-padded,
           landmarks float32 (68, 2) (x, y) pixels of the final image, mask uint8 (S, S)
           0/255 union of edited regions (zeros for originals), face_mask uint8 (S, S) 0/255
           inside the head outline).
    """
    seq_rng, face_rng, donor_rng, step_rng = _streams(subset, index, seed)
    sampled = _sample_sequence(subset, seq_rng)
    seq = tuple(int(k) for k in (sampled if sequence is None else sequence))
    if len(set(seq)) != len(seq) or len(seq) > MAX_LEN or any(k < 1 or k > 5 for k in seq):
        raise ValueError(f"sequence {seq} must hold distinct class ids in 1..5, at most {MAX_LEN}")
    size = int(image_size)
    if size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    components = subset == "facial_components"
    face = _sample_face(face_rng)
    noise = _noise(face_rng, size)
    donor = _donor_parts(donor_rng, face) if components and seq else None
    steps = _sample_steps(step_rng)

    r = _Renderer(face, size, noise)
    s = r.s
    parts = {name: face[name] for name in COMPONENT_PARTS.values()}
    attrs = frozenset()
    st = r.state(parts, attrs)
    image = r.finish(r.draw(st, parts, attrs))
    mask = np.zeros((size, size), np.uint8)
    noise_scale = 1.0
    for j, k in enumerate(seq):
        if apply_edits:
            new_parts, new_attrs = dict(parts), attrs
            if components:
                new_parts[COMPONENT_PARTS[k]] = donor[COMPONENT_PARTS[k]]
            else:
                new_attrs = attrs | {k}
                if k == 5:  # Young: smoother skin from here on
                    noise_scale = face["young"]["noise"]
            new_st = r.state(new_parts, new_attrs)
            if components:
                region = _component_region(size, COMPONENT_PARTS[k], st, new_st, s)
            else:
                region = _attribute_region(size, k, st, new_st, new_attrs, s)
            sigma = steps["feather"][j] * s
            sl = _bbox(region, int(math.ceil(3 * sigma)) + 1, size)
            if sl is not None:
                fresh = r.finish(r.draw(new_st, new_parts, new_attrs), sl,
                                 steps["lum_offset"][j], noise_scale)
                w = cv2.GaussianBlur(region[sl], (0, 0), sigma).astype(np.float32) * (1 / 255)
                mask[sl][w > MASK_THRESHOLD] = 255
                image[sl] = cv2.blendLinear(fresh, image[sl], w, 1 - w)
            parts, attrs, st = new_parts, new_attrs, new_st
        image = _reencode(image, steps["gains"][j], steps["offsets"][j], steps["blur"][j] * s)

    out = dict(image=image,
               label=label_from_sequence(seq if apply_edits else ()),
               landmarks=r.landmarks(st),
               mask=mask,
               face_mask=_mask(size, [st["base"]["face"]]))
    if return_parts:
        out["parts"] = _part_masks(size, st, attrs, s)
    return out
