"""Draw docs/images/sbi_examples.png: SBI real / blend mask / fake for 8 synthetic faces.

    python docs/make_sbi_examples.py [--out docs/images/sbi_examples.png] [--tile 160]

Columns are faces (each hull variant twice, labelled); rows are the real image, the blend
mask (white = source weight 1) and the self-blended fake.
"""

from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cmil_jax.data import sbi, synthetic


def make_grid(tile: int = 160, seed: int = 0) -> np.ndarray:
    """uint8 RGB grid (3 * tile + header, 8 * tile, 3)."""
    columns = []
    for i in range(8):
        subset = ("facial_components", "facial_attributes")[i % 2]
        example = synthetic.generate_example(subset, i, seed=seed)
        hull_type = sbi.HULL_TYPES[i % len(sbi.HULL_TYPES)]
        real, fake, mask = sbi.self_blend(
            example["image"],
            example["landmarks"],
            np.random.default_rng(seed + i),
            hull_type=hull_type,
        )
        mask_rgb = np.repeat(np.round(mask * 255).astype(np.uint8)[..., None], 3, axis=2)
        tiles = [
            cv2.resize(x, (tile, tile), interpolation=cv2.INTER_AREA)
            for x in (real, mask_rgb, fake)
        ]
        header = np.full((24, tile, 3), 255, np.uint8)
        cv2.putText(
            header, hull_type, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA
        )
        columns.append(np.concatenate([header, *tiles], axis=0))
    grid = np.concatenate(columns, axis=1)
    labels = np.full((grid.shape[0], 56, 3), 255, np.uint8)
    for row, name in enumerate(("real", "mask", "fake")):
        cv2.putText(
            labels,
            name,
            (6, 24 + row * tile + tile // 2),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    return np.concatenate([labels, grid], axis=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "images", "sbi_examples.png"),
                        help="output PNG (the shipped figure)")
    parser.add_argument("--tile", type=int, default=160, help="tile side, px")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    grid = make_grid(args.tile)
    if not cv2.imwrite(
        args.out, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9]
    ):
        sys.exit(f"could not write {args.out}")
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    main()
