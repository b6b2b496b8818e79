"""Label vocabularies of the Seq-DeepFake subsets and helpers shared by data, losses and metrics.

A sequence label is an int array of length ``MAX_LEN`` (5) listing the manipulation classes
(1..5) in the order they were applied, padded with 0. The original image is all zeros.
"""

MAX_LEN = 5
NUM_CLASSES = 5

# Class k (1-based in labels) has name CLASS_NAMES[subset][k - 1].
CLASS_NAMES = {
    "facial_components": ("nose", "eye", "eyebrow", "lip", "hair"),
    "facial_attributes": ("Bangs", "Eyeglasses", "Beard", "Smiling", "Young"),
}

SUBSETS = tuple(CLASS_NAMES)
