"""grain input pipelines: training (plain or triples) and evaluation.

Batches are dicts of numpy arrays (contract):
  image    uint8 (B,S,S,3)  RGB, 0..255; normalisation happens on the device, in the model
  label    int32 (B,5)      manipulation sequence, 0-padded
  is_fake  int32 (B,)
  mask     uint8 (B,S,S)    manipulation / SBI blend mask 0..255, 0 where genuine; evaluation
                            batches always, training batches only with ``with_masks=True`` (no
                            loss reads it: leaving it out saves its augmentation and a quarter
                            of the bytes a batch moves between processes and to the device)
  has_seq  float32 (B,)     1 where the sequence label is valid (Seq-DeepFake), 0 for binary-only
  valid    float32 (B,)     eval only: 0 marks padding examples in the last batch
  index    int32 (B,)       eval only: record index in the split (-1 for padding)

Decoding, SBI and augmentation run in ``num_workers`` grain worker processes (spawned; 0 = in
this process, on ``num_threads`` threads). Workers keep the memory they free (glibc's malloc:
``runtime.host_memory.keep_freed_memory``), so the buffers of one batch reuse the pages of the
last instead of mapping and zeroing fresh ones. Each element's randomness comes from grain's
per-index generator, and batching happens before the worker split, so a given seed yields the
same batches for any worker count. Spawned workers re-import the main module: scripts that use
workers need an ``if __name__ == "__main__"`` guard (absl apps have one). Close iterators
with workers (``it.close()``) when done.

Training checkpoints store the iterator's ``get_state()`` (``parallel.DevicePrefetcher.state``,
``cmil_jax/checkpoint.py``); a resumed run ``set_state``s a fresh iterator of the same pipeline.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import cv2
import grain
import numpy as np

from cmil_jax import child_processes
from cmil_jax.data import augment as augment_lib
from cmil_jax.labels import MAX_LEN
from cmil_jax.runtime import host_memory

TRAIN_KEYS = ("image", "label", "is_fake", "mask", "has_seq")  # "mask" with with_masks=True
# What the SBI row of a triple teaches the sequence losses [ours]: 'zeros' (the all-zero
# sequence, method.md, "Data and training") or 'masked' (has_seq 0: the SBI image trains L_CLS only).
SBI_LABELS = ("zeros", "masked")

_CV2_SINGLE_THREAD = False


def _cv2_single_thread():
    """Stop OpenCV from spawning its own threads (workers and reader threads do the parallelism)."""
    global _CV2_SINGLE_THREAD
    if not _CV2_SINGLE_THREAD:
        cv2.setNumThreads(0)
        _CV2_SINGLE_THREAD = True


def worker_init(worker_index: int, worker_count: int) -> None:
    """grain worker initialiser: OpenCV on one thread, freed memory kept for reuse (see the
    module docstring); the worker ends with its parent."""
    del worker_index, worker_count
    child_processes.exit_with_parent()
    host_memory.keep_freed_memory()
    _cv2_single_thread()


# --------------------------------------------------------------------------------------------
# Per-example transforms (picklable classes, run in the workers)


def _mask_uint8(mask, shape) -> np.ndarray:
    """uint8 (H,W) mask from None / bool / float [0,1] / uint8 input."""
    if mask is None:
        return np.zeros(shape, np.uint8)
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.dtype == np.uint8:
        return mask
    if mask.dtype == bool:
        return mask.astype(np.uint8) * 255
    scaled = np.multiply(mask, np.float32(255.0), dtype=np.float32)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def _out(image, mask, label, is_fake, has_seq) -> dict[str, np.ndarray]:
    """One example of the batch contract; no "mask" key when ``mask`` is None."""
    out = {
        "image": image,
        "label": np.asarray(label, np.int32).reshape(MAX_LEN),
        "is_fake": np.int32(is_fake),
        "mask": mask,
        "has_seq": np.float32(has_seq),
    }
    if mask is None:
        del out["mask"]
    return out


class _AugmentExample:
    """Decoded record -> weakly augmented training example at image_size."""

    def __init__(self, image_size: int, cfg: augment_lib.AugmentConfig, has_seq: bool,
                 with_masks: bool = False):
        self.image_size = image_size
        self.cfg = cfg
        self.has_seq = float(has_seq)
        self.with_masks = with_masks

    def __call__(self, ex: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        _cv2_single_thread()
        mask = _mask_uint8(ex.get("mask"), ex["image"].shape[:2]) if self.with_masks else None
        image, mask, _ = augment_lib.weak_augment(ex["image"], rng, self.cfg,
                                                  image_size=self.image_size, mask=mask)
        is_fake = ex.get("is_fake", np.any(ex["label"]))
        return _out(image, mask, ex["label"], is_fake, self.has_seq)


class _TripleExample:
    """Index j of the originals -> (genuine, SBI pseudo-fake, dataset fake): a dict of
    TRAIN_KEYS (no "mask" unless ``with_masks``), each a list of the three rows' values
    (``_TripleBatch`` stacks them). The random draws do not depend on ``with_masks``."""

    def __init__(self, source, originals: np.ndarray, fakes: np.ndarray, image_size: int,
                 cfg: augment_lib.AugmentConfig, has_seq: bool, sbi_labels: str = "zeros",
                 with_masks: bool = False):
        if sbi_labels not in SBI_LABELS:
            raise ValueError(f"sbi_labels must be one of {SBI_LABELS}, got {sbi_labels!r}")
        self.sbi_has_seq = float(has_seq) if sbi_labels == "zeros" else 0.0
        self.source = source
        self.originals = originals
        self.fakes = fakes
        self.image_size = image_size
        self.cfg = cfg
        self.has_seq = float(has_seq)
        self.with_masks = with_masks

    def __call__(self, j: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        from cmil_jax.data.sbi import self_blend

        _cv2_single_thread()
        index = int(self.originals[j])
        genuine = self.source[index]
        fake = self.source[int(self.fakes[rng.integers(len(self.fakes))])]
        try:
            real_img, sbi_img, sbi_mask = self_blend(genuine["image"], genuine["landmarks"], rng)
        except ValueError as e:  # e.g. degenerate landmarks
            raise ValueError(f"SBI failed on record {index} ({genuine.get('path', '?')}) "
                             f"of {self.source!r}: {e}") from e
        zeros = np.zeros(MAX_LEN, np.int32)
        masks = (None, None, None)
        if self.with_masks:  # the genuine row's mask (0) is made after the augmentation
            masks = (None, _mask_uint8(sbi_mask, real_img.shape[:2]),
                     _mask_uint8(fake.get("mask"), fake["image"].shape[:2]))
        parts = [(real_img, zeros, 0), (sbi_img, zeros, 1), (fake["image"], fake["label"], 1)]
        rows = {}
        for row, ((image, label, is_fake), mask) in enumerate(zip(parts, masks)):
            image, mask, _ = augment_lib.weak_augment(
                np.asarray(image, np.uint8), rng, self.cfg, image_size=self.image_size, mask=mask)
            if mask is None and self.with_masks:
                mask = np.zeros(image.shape[:2], np.uint8)
            has_seq = self.sbi_has_seq if row == 1 else self.has_seq
            for k, v in _out(image, mask, label, is_fake, has_seq).items():
                rows.setdefault(k, []).append(v)
        return rows


class _TripleBatch:
    """grain batch_fn: B triples (``_TripleExample`` dicts of 3-row lists) -> one batch of 3B
    images, triple-major.

    Every value is copied once, into the batch (grain then copies a worker's batch into shared
    memory; a batch allocated there directly would be lost, and reported as leaked at exit,
    whenever the worker stops with batches in its own prefetch buffer).
    """

    def __call__(self, elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        out = {}
        for k in elements[0]:
            first = np.asarray(elements[0][k][0])
            batch = np.empty((3 * len(elements), *first.shape), first.dtype)
            for t, e in enumerate(elements):
                for r, value in enumerate(e[k]):
                    batch[3 * t + r] = value
            out[k] = batch
        return out


class _EvalExample:
    """Position i of the (padded) evaluation order -> resized example with a 'valid' flag."""

    def __init__(self, source, indices: np.ndarray, image_size: int, has_seq: bool):
        self.source = source
        self.indices = indices
        self.image_size = image_size
        self.has_seq = float(has_seq)

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        _cv2_single_thread()
        s = self.image_size
        index = int(self.indices[i]) if i < len(self.indices) else -1
        if index < 0:
            out = _out(np.zeros((s, s, 3), np.uint8), np.zeros((s, s), np.uint8),
                       np.zeros(MAX_LEN, np.int32), 0, 0.0)
            out.update(valid=np.float32(0.0), index=np.int32(-1))
            return out
        ex = self.source[index]
        image = augment_lib.resize(ex["image"], s)
        mask = augment_lib.resize_mask(_mask_uint8(ex.get("mask"), ex["image"].shape[:2]), s)
        is_fake = ex.get("is_fake", np.any(ex["label"]))
        out = _out(image, mask, ex["label"], is_fake, self.has_seq)
        out.update(valid=np.float32(1.0), index=np.int32(index))
        return out


# --------------------------------------------------------------------------------------------
# Sharding and the grain tail


def process_shard(shard: bool = True) -> tuple[int, int]:
    """(shard_index, shard_count) of this JAX process; (0, 1) when not sharding."""
    if not shard:
        return 0, 1
    opts = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return opts.shard_index, opts.shard_count


def _ensure_absl_flags_parsed():
    """grain reads absl flags in mp_prefetch; outside an absl app (tests, notebooks): defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _to_iter(ds: grain.MapDataset, num_workers: int, num_threads: int,
             prefetch: int) -> grain.IterDataset:
    """``num_threads`` threads compute elements in this process when ``num_workers`` is 0;
    each worker uses one (two threads in a worker would take more than one core, so that
    throughput would no longer scale with the number of workers)."""
    threads = max(1, num_threads) if num_workers == 0 else 1
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                 prefetch_buffer_size=max(1, prefetch)))
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch),
            worker_init_fn=worker_init)
    return it_ds


def _labels_and_fake(source) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,5), is_fake (N,)) without decoding images when the source allows it."""
    if hasattr(source, "labels"):
        labels = np.asarray(source.labels(), np.int32)
        is_fake = np.asarray(source.is_fake(), np.int32) if hasattr(source, "is_fake") \
            else labels.any(axis=1).astype(np.int32)
        return labels, is_fake
    exs = [source[i] for i in range(len(source))]
    labels = np.stack([np.asarray(e["label"], np.int32) for e in exs])
    is_fake = np.array([int(e.get("is_fake", np.any(e["label"]))) for e in exs], np.int32)
    return labels, is_fake


def epoch_size(source, triples: bool) -> int:
    """Elements of ``source`` in one training epoch (the definition train.training_steps uses).

    Triples: the genuine images. Each triple is built around one genuine image (it and its SBI
    pseudo-fake) with a fake drawn at random, and the triple stream is a shuffled pass over the
    genuine images repeated, so an epoch is one pass over them (every genuine image, and every
    SBI pseudo-fake made from it, seen once). Single images: all records.
    """
    if not triples:
        return len(source)
    _, is_fake = _labels_and_fake(source)
    return int(np.count_nonzero(is_fake == 0))


# --------------------------------------------------------------------------------------------
# Public pipelines


def make_train_dataset(source, *, batch_size: int, seed: int, image_size: int,
                       augment_cfg=None, shard: bool = True, num_workers: int = 0,
                       num_threads: int = 2, prefetch: int = 4,
                       has_seq: bool = True, with_masks: bool = False) -> grain.IterDataset:
    """Infinite shuffled training batches of single images (contract keys, see module doc;
    "mask" only with ``with_masks``, which changes no other value).

    source: random-access dataset (``open_split``) of decoded records. batch_size: per process.
    With ``shard`` and P JAX processes, process p takes batches p, p+P, p+2P, ... of one shuffled
    stream, so global batch g is the concatenation of batch g*P+q of every process q: the global
    batch sequence does not depend on P, and every process reads a disjoint 1/P of the records.
    ``iter(...)`` gives a checkpointable ``grain.DatasetIterator``.
    """
    ds = _plain_elements(source, seed, image_size, augment_lib.as_config(augment_cfg), has_seq,
                         with_masks)
    index, count = process_shard(shard)
    ds = ds.batch(batch_size, drop_remainder=True)
    return _to_iter(ds[index::count], num_workers, num_threads, prefetch)


def make_triple_train_dataset(source, *, batch_size: int, seed: int, image_size: int,
                              augment_cfg=None, shard: bool = True, num_workers: int = 0,
                              num_threads: int = 2, prefetch: int = 4,
                              has_seq: bool = True, sbi_labels: str = "zeros",
                              with_masks: bool = False) -> grain.IterDataset:
    """Infinite batches of training triples (method.md, "Data and training"), 3*batch_size images each.

    One epoch = one pass over the shuffled genuine images (``epoch_size``): the order of the
    genuine images is reshuffled after every ``epoch_size(source, True)`` triples. Triple t fills
    rows 3t, 3t+1, 3t+2:
      3t    genuine x_r (the 'real' output of self_blend), label 0s, is_fake 0, [mask 0]
      3t+1  SBI(x_r) (cmil_jax.data.sbi.self_blend), label 0s, is_fake 1, [mask = blend mask]
      3t+2  a uniformly drawn manipulated image, its label, is_fake 1, [its manipulation mask]
    Each image is weakly augmented independently. Genuine / fake index lists come from the
    stored labels (no image decoding). ``has_seq`` is the same for all three rows, except that
    ``sbi_labels='masked'`` sets it to 0 on the SBI row (see SBI_LABELS). The masks are in the
    batch only with ``with_masks`` (which changes no other value).
    """
    ds = _triple_elements(source, seed, image_size, augment_lib.as_config(augment_cfg), has_seq,
                          sbi_labels, with_masks)
    index, count = process_shard(shard)
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_TripleBatch())
    return _to_iter(ds[index::count], num_workers, num_threads, prefetch)


def make_joint_train_dataset(source, joint_source, *, batch_size: int, joint_batch_size: int,
                             seed: int, image_size: int, triples: bool = False,
                             augment_cfg=None, shard: bool = True, num_workers: int = 0,
                             num_threads: int = 2, prefetch: int = 4,
                             sbi_labels: str = "zeros",
                             with_masks: bool = False) -> grain.IterDataset:
    """Infinite batches mixing two datasets in a fixed proportion (joint training, method.md 5).

    Every batch holds batch_size - joint_batch_size elements of ``source`` (has_seq 1: its
    sequence labels train L^U, L^V and L_Rank) followed by joint_batch_size elements of
    ``joint_source`` (has_seq 0: a binary-only dataset such as FF++, which only L_CLS sees).
    Elements are single images, or triples (3 rows each) when ``triples``; both streams are
    shuffled independently (the joint one with seed + 1) and repeat forever. An epoch is one
    pass over ``source`` (``epoch_size``: batch_size - joint_batch_size of its elements a
    batch); the joint stream wraps around at its own length.
    """
    if not 0 < joint_batch_size < batch_size:
        raise ValueError(f"joint_batch_size must be in (0, {batch_size}), got {joint_batch_size}")
    cfg = augment_lib.as_config(augment_cfg)
    if triples:
        elements = functools.partial(_triple_elements, sbi_labels=sbi_labels,
                                     with_masks=with_masks)
    else:
        elements = functools.partial(_plain_elements, with_masks=with_masks)
    batch_fn = _TripleBatch() if triples else None
    main = elements(source, seed, image_size, cfg, True).batch(
        batch_size - joint_batch_size, drop_remainder=True, batch_fn=batch_fn)
    joint = elements(joint_source, seed + 1, image_size, cfg, False).batch(
        joint_batch_size, drop_remainder=True, batch_fn=batch_fn)
    ds = grain.MapDataset.range(min(len(main), len(joint))).map(_ConcatBatches(main, joint))
    index, count = process_shard(shard)
    return _to_iter(ds[index::count], num_workers, num_threads, prefetch)


class _ConcatBatches:
    """Batch i -> batch i of the first dataset followed by batch i of the second."""

    def __init__(self, first: grain.MapDataset, second: grain.MapDataset):
        self.first = first
        self.second = second

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        a, b = self.first[i], self.second[i]
        return {k: np.concatenate([a[k], b[k]]) for k in a}


def _plain_elements(source, seed: int, image_size: int, cfg, has_seq: bool,
                    with_masks: bool = False) -> grain.MapDataset:
    """Infinite shuffled single weakly augmented training images."""
    return (grain.MapDataset.source(source).seed(seed).shuffle().repeat()
            .random_map(_AugmentExample(image_size, cfg, has_seq, with_masks)))


def _triple_elements(source, seed: int, image_size: int, cfg, has_seq: bool,
                     sbi_labels: str = "zeros", with_masks: bool = False) -> grain.MapDataset:
    """Infinite shuffled training triples, each with a leading axis of 3 (see above)."""
    _, is_fake = _labels_and_fake(source)
    originals = np.flatnonzero(is_fake == 0)
    fakes = np.flatnonzero(is_fake != 0)
    if len(originals) == 0 or len(fakes) == 0:
        raise ValueError(f"triples need genuine and fake images; {source!r} has "
                         f"{len(originals)} genuine and {len(fakes)} fake")
    return (grain.MapDataset.range(len(originals)).seed(seed).shuffle().repeat()
            .random_map(_TripleExample(source, originals, fakes, image_size, cfg, has_seq,
                                       sbi_labels, with_masks)))


def eval_num_batches(num_examples: int, batch_size: int, shard: bool = True) -> int:
    """Batches per process of ``make_eval_dataset`` (equal on all processes)."""
    _, count = process_shard(shard)
    return math.ceil(math.ceil(num_examples / count) / batch_size)


def make_eval_dataset(source, *, batch_size: int, image_size: int, shard: bool = True,
                      num_workers: int = 0, num_threads: int = 2, prefetch: int = 4,
                      has_seq: bool = True) -> grain.IterDataset:
    """One deterministic pass in record order, resized to image_size, no augmentation.

    The last batch is padded to batch_size with zero examples whose 'valid' is 0 (and
    'index' -1). With several JAX processes each takes records p, p+P, ... and all get the
    same number of batches (``eval_num_batches``).
    """
    n = len(source)
    index, count = process_shard(shard)
    indices = np.arange(index, n, count, dtype=np.int64)
    padded = eval_num_batches(n, batch_size, shard) * batch_size
    ds = (grain.MapDataset.range(padded)
          .map(_EvalExample(source, indices, image_size, has_seq))
          .batch(batch_size, drop_remainder=False))
    return _to_iter(ds, num_workers, num_threads, prefetch)
