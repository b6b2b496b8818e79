"""Label vocabularies of the Seq-DeepFake subsets and helpers shared by data, losses and metrics.

A sequence label is an int array of length ``MAX_LEN`` (5) listing the manipulation classes
(1..5) in the order they were applied, padded with 0. The original image is all zeros.
"""

import numpy as np

MAX_LEN = 5
NUM_CLASSES = 5

# Class k (1-based in labels) has name CLASS_NAMES[subset][k - 1].
CLASS_NAMES = {
    "facial_components": ("nose", "eye", "eyebrow", "lip", "hair"),
    "facial_attributes": ("Bangs", "Eyeglasses", "Beard", "Smiling", "Young"),
}

SUBSETS = tuple(CLASS_NAMES)

ORIGINAL = "original"  # name of the all-zero sequence


def sequence_name(label, subset: str) -> str:
    """Class names of an int (5,) label in edit order, 'nose-eye-lip'; 'original' if all zero."""
    if subset not in CLASS_NAMES:
        raise ValueError(f"unknown subset {subset!r}; valid subsets: {', '.join(SUBSETS)}")
    seq = [int(k) for k in np.asarray(label).reshape(-1) if k]
    return "-".join(CLASS_NAMES[subset][k - 1] for k in seq) if seq else ORIGINAL
