"""The 68-point facial landmark scheme (iBUG 300-W, as dlib's shape predictor outputs it).

Landmarks are float (68, 2) arrays of (x, y) pixels. The parts are index ranges (``range``
objects: ``lm[JAW]`` picks the part's points, ``JAW[:9]`` a sub-range). Left and right are
the image's: LEFT_EYE is the image-left eye, i.e. the subject's right one.

    JAW          0-16   image-left to image-right; CHIN = 8
    LEFT_BROW    17-21  outer to inner end                      BROWS = 17-26
    RIGHT_BROW   22-26  inner to outer end
    NOSE_BRIDGE  27-30  top to tip; NOSE_TIP = 30               NOSE = 27-35
    NOSTRILS     31-35  nose base, image-left to image-right
    LEFT_EYE     36-41  outer corner, upper lid, inner corner, lower lid   EYES = 36-47
    RIGHT_EYE    42-47  inner corner, upper lid, outer corner, lower lid
    OUTER_LIP    48-59  corners MOUTH_LEFT = 48 and MOUTH_RIGHT = 54, upper lip first
    INNER_LIP    60-67  corners 60 and 64, upper lip first      MOUTH = 48-67
"""

import numpy as np

NUM_LANDMARKS = 68

JAW = range(0, 17)
LEFT_BROW = range(17, 22)
RIGHT_BROW = range(22, 27)
BROWS = range(17, 27)
NOSE_BRIDGE = range(27, 31)
NOSTRILS = range(31, 36)
NOSE = range(27, 36)
LEFT_EYE = range(36, 42)
RIGHT_EYE = range(42, 48)
EYES = range(36, 48)
OUTER_LIP = range(48, 60)
INNER_LIP = range(60, 68)
MOUTH = range(48, 68)

CHIN = 8
NOSE_TIP = 30
MOUTH_LEFT, MOUTH_RIGHT = 48, 54  # mouth corners

# Index pairs that swap under a horizontal flip. Points on the vertical midline (8, 27-30, 33,
# 51, 57, 62, 66) map to themselves.
# fmt: off
_FLIP_PAIRS = (
    *((i, 16 - i) for i in range(8)),  # jaw 0-16 reversed
    *((17 + i, 26 - i) for i in range(5)),  # brows 17-21 <-> 26-22
    (31, 35), (32, 34),  # nostrils
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),  # eyes: outer, upper, inner, lower
    (48, 54), (49, 53), (50, 52), (55, 59), (56, 58),  # outer lip
    (60, 64), (61, 63), (65, 67),  # inner lip
)
# fmt: on


def _flip_permutation() -> np.ndarray:
    perm = np.arange(NUM_LANDMARKS)
    for a, b in _FLIP_PAIRS:
        perm[a], perm[b] = b, a
    perm.setflags(write=False)
    return perm


# After mirroring x -> W - 1 - x, ``mirrored[FLIP_PERMUTATION]`` restores the meaning of every
# index (point k is again "point k"). int (68,), read-only; its own inverse.
FLIP_PERMUTATION = _flip_permutation()
