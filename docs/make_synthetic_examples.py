"""Draw docs/images/synthetic_examples.png: synthetic faces of both subsets.

For each subset, one row of edited images (sequence name on top) and one row with the
manipulation mask in red and the 68 landmarks in green.

    python docs/make_synthetic_examples.py [--size 112] [--columns 8] [--seed 0]
"""

import argparse
import os

import cv2
import numpy as np

from cmil_jax.data import synthetic
from cmil_jax.labels import SUBSETS


def _caption(img, text):
    out = img.copy()
    cv2.rectangle(out, (0, 0), (img.shape[1], 13), (0, 0, 0), -1)
    cv2.putText(out, text, (2, 10), cv2.FONT_HERSHEY_SIMPLEX, 0.3, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _overlay(ex):
    img = ex["image"].astype(np.float32)
    red = np.zeros_like(img)
    red[..., 0] = 255
    alpha = (ex["mask"][..., None] > 0) * 0.45
    out = (img * (1 - alpha) + red * alpha).astype(np.uint8)
    for x, y in ex["landmarks"]:
        cv2.circle(out, (int(round(x)), int(round(y))), 1, (0, 255, 0), -1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=112, help="image side, px")
    parser.add_argument("--columns", type=int, default=8, help="examples per row")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "images",
                                                      "synthetic_examples.png"),
                        help="output PNG (the shipped figure)")
    args = parser.parse_args()
    rows = []
    for subset in SUBSETS:
        images, overlays = [], []
        index = 0
        while len(images) < args.columns:
            ex = synthetic.generate_example(subset, index, args.seed, args.size)
            index += 1
            if not ex["label"].any() and len(images) > 0:
                continue  # show one original per row
            images.append(_caption(ex["image"], synthetic.label_to_name(ex["label"], subset)))
            overlays.append(_overlay(ex))
        rows += [np.concatenate(images, 1), np.concatenate(overlays, 1)]
    grid = np.concatenate(rows, 0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    cv2.imwrite(args.out, grid[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    main()
