"""TFDS builder of the built-in synthetic faces (``cmil_jax.data.synthetic``), as ArrayRecord.

``build_synthetic(data_dir, subset, image_size, num_train, num_val, num_test)`` writes the
dataset ``cmil_synthetic/<config>`` (``synthetic_name``) once, in the face-record schema of
``cmil_jax.data.sources``; read it with ``sources.open_split``. The config name encodes every
parameter ('facial_components_112px_6000-600-1200_seed0'), so builds never collide.

Images and masks are stored losslessly: the synthetic manipulations leave faint
re-processing traces that a lossy codec would blur and that the model is meant to learn, and
stored images equal ``synthetic.generate_example`` exactly (tested). ``image_format`` 'raw'
(the default: uint8 pixels, compressed by ArrayRecord's zstd; no image codec to run when
reading) or 'png' (OpenCV compression level 1; smaller records, slower to decode); both decode
to the same pixels (``sources.IMAGE_FORMATS``). The format is not part of the dataset's name:
an existing build is reused whatever its format.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from typing import Any, ClassVar

import cv2
import numpy as np
import tensorflow_datasets as tfds

from cmil_jax import child_processes
from cmil_jax.data import sources, synthetic
from cmil_jax.data.landmarks68 import NUM_LANDMARKS
from cmil_jax.labels import MAX_LEN, SUBSETS

# Index offsets so that the three splits draw disjoint examples; val/test do not change when
# num_train changes.
SPLIT_OFFSETS = {"train": 0, "val": 10_000_000, "test": 20_000_000}


def synthetic_config_name(subset: str, image_size: int, num_train: int, num_val: int,
                          num_test: int, seed: int = 0) -> str:
    """Name that identifies a synthetic build: 'facial_components_112px_6000-600-1200_seed0'."""
    return f"{subset}_{image_size}px_{num_train}-{num_val}-{num_test}_seed{seed}"


def synthetic_name(subset: str, image_size: int, num_train: int, num_val: int, num_test: int,
                   seed: int = 0) -> str:
    """Dataset name for ``sources.open_split``: 'cmil_synthetic/<config>'."""
    return f"{sources.SYNTHETIC_BUILDER}/" + synthetic_config_name(
        subset, image_size, num_train, num_val, num_test, seed)


def _synthetic_record(args) -> dict[str, Any]:
    """One encoded synthetic record. Module level so a process pool can pickle it."""
    subset, split, index, seed, image_size, image_format = args
    ex = synthetic.generate_example(subset, index, seed=seed, image_size=image_size)
    return {
        "image": sources.encode_image(np.asarray(ex["image"], np.uint8), image_format),
        "label": np.asarray(ex["label"], np.int32).reshape(MAX_LEN),
        "landmarks": np.asarray(ex["landmarks"], np.float32).reshape(NUM_LANDMARKS, 2),
        "mask": sources.encode_mask(np.asarray(ex["mask"], np.uint8), image_format),
        "path": f"synthetic/{subset}/{split}/{index:08d}",
    }


def _worker_init():
    child_processes.exit_with_parent()
    cv2.setNumThreads(1)  # the pool's processes are the parallelism


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """Synthetic faces of one subset at one size; split sizes in examples."""

    subset: str = "facial_components"
    image_size: int = 128
    num_train: int = 6000
    num_val: int = 600
    num_test: int = 1200
    seed: int = 0


def make_synthetic_config(subset: str, image_size: int = 128, num_train: int = 6000,
                          num_val: int = 600, num_test: int = 1200,
                          seed: int = 0) -> SyntheticConfig:
    """SyntheticConfig whose name encodes all of its fields (so builds never collide)."""
    return SyntheticConfig(
        name=synthetic_config_name(subset, image_size, num_train, num_val, num_test, seed),
        subset=subset, image_size=image_size, num_train=num_train, num_val=num_val,
        num_test=num_test, seed=seed,
        description=f"synthetic Seq-DeepFake-style faces, {subset}, {image_size} px")


class CmilSynthetic(sources.FaceRecordBuilder):
    """Procedural faces with Seq-DeepFake-style manipulation sequences (cmil_jax.data.synthetic).

    ``num_workers`` > 1 generates and encodes examples in a process pool; TFDS writes them.
    ``image_format``: how pixels are stored (``sources.IMAGE_FORMATS``; module docstring).
    Record i of a split is generated index SPLIT_OFFSETS[split] + i (no shuffling at write).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    BUILDER_CONFIGS: ClassVar[list] = [make_synthetic_config(s) for s in SUBSETS]
    DESCRIPTION = "Synthetic faces with sequential manipulations for cmil_jax."
    DISABLE_SHUFFLING = True

    def __init__(self, *, num_workers: int = 0, image_format: str = "raw", **kwargs):
        if image_format not in sources.IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sources.IMAGE_FORMATS}, "
                             f"got {image_format!r}")
        self._num_workers = num_workers
        self._image_format = image_format
        self._pool = None
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        sizes = {"train": c.num_train, "val": c.num_val, "test": c.num_test}
        return {s: self._generate_examples(s, n) for s, n in sizes.items() if n > 0}

    def _generate_examples(self, split, num):
        c = self.builder_config
        offset = SPLIT_OFFSETS[split]
        jobs = [(c.subset, split, offset + i, c.seed, c.image_size, self._image_format)
                for i in range(num)]
        if self._num_workers > 1:
            if self._pool is None:
                ctx = multiprocessing.get_context("spawn")  # safe when JAX threads are running
                self._pool = ctx.Pool(self._num_workers, initializer=_worker_init)
            records = self._pool.imap(_synthetic_record, jobs, chunksize=8)
        else:
            records = map(_synthetic_record, jobs)
        for job, record in zip(jobs, records):
            yield job[2], record

    def close_pool(self):
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


def build_synthetic(data_dir: str | os.PathLike, subset: str, image_size: int = 128,
                    num_train: int = 6000, num_val: int = 600, num_test: int = 1200,
                    num_workers: int | None = None, seed: int = 0,
                    image_format: str = "raw") -> str:
    """Build the synthetic dataset once under data_dir (no-op if complete); returns its name.

    Examples are generated by ``num_workers`` spawned processes (default: all cores; 0 or 1 =
    in this process) and written by TFDS as ArrayRecord, with TFDS progress bars. Spawned
    workers re-import the main module, so call this under ``if __name__ == "__main__"`` (absl
    apps do). ``image_format``: 'raw' or 'png' (module docstring; a complete build in the
    other format is reused). Pass the returned name to ``sources.open_split``.
    """
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; expected one of {SUBSETS}")
    if image_format not in sources.IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sources.IMAGE_FORMATS}, "
                         f"got {image_format!r}")
    name = synthetic_name(subset, image_size, num_train, num_val, num_test, seed)
    if sources.find_version_dir(os.path.join(os.fspath(data_dir), name)) is not None:
        return name
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    config = make_synthetic_config(subset, image_size, num_train, num_val, num_test, seed)
    builder = CmilSynthetic(data_dir=os.fspath(data_dir), config=config,
                            file_format="array_record", num_workers=num_workers,
                            image_format=image_format)
    start = time.time()
    try:
        builder.download_and_prepare()
    finally:
        builder.close_pool()
    n = num_train + num_val + num_test
    print(f"built {name}: {n} examples in {time.time() - start:.1f}s -> {builder.data_dir}",
          flush=True)
    return name
