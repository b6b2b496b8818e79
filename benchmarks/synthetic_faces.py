"""How fast the built-in synthetic faces render: images per second of CPU time, one thread.

    python -m benchmarks.synthetic_faces [--image-size 256] [--num 60]

CPU time of this process (time.process_time), so other load on the machine counts little.
The demos build 7,500 faces per subset before their first step (cmil_jax.data.synthetic_dataset).
"""

import argparse
import time

import cv2

from cmil_jax import labels
from cmil_jax.data import synthetic


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num", type=int, default=60, help="faces timed per subset")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    for subset in labels.SUBSETS:
        synthetic.generate_example(subset, 0, image_size=args.image_size)  # warm-up
        start = time.process_time()
        for i in range(args.num):
            synthetic.generate_example(subset, i, seed=9, image_size=args.image_size)
        rate = args.num / (time.process_time() - start)
        print(f"{subset}: {rate:.0f} images/s of CPU time at {args.image_size} px, one thread")


if __name__ == "__main__":
    main()
