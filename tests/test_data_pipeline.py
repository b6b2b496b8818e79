"""Tests of the TFDS/ArrayRecord sources, weak augmentation and the grain pipelines (64 px)."""

import json

import numpy as np
import pytest

from cmil_jax.data import augment, landmarks68, pipeline, sbi, sources, synthetic, synthetic_dataset

SUBSET = "facial_components"
SIZE = 64
N_TRAIN, N_VAL, N_TEST = 24, 4, 7


@pytest.fixture(scope="module")
def synthetic_module():
    return synthetic


@pytest.fixture(scope="module")
def sbi_module():
    return sbi


@pytest.fixture(scope="module")
def built(tmp_path_factory, synthetic_module):
    data_dir = tmp_path_factory.mktemp("tfds")
    name = synthetic_dataset.build_synthetic(data_dir, SUBSET, SIZE, N_TRAIN, N_VAL, N_TEST,
                                             num_workers=1)
    return str(data_dir), name


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---- sources --------------------------------------------------------------------------------


def test_build_and_read_back(built, synthetic_module):
    data_dir, name = built
    assert name == synthetic_dataset.synthetic_name(SUBSET, SIZE, N_TRAIN, N_VAL, N_TEST)
    # A second call finds the complete dataset and does nothing.
    assert synthetic_dataset.build_synthetic(data_dir, SUBSET, SIZE, N_TRAIN, N_VAL,
                                             N_TEST) == name
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        src = sources.open_split(data_dir, name, split)
        assert len(src) == n
        for i in (0, n - 1):
            ex = src[i]
            ref = synthetic_module.generate_example(
                SUBSET, synthetic_dataset.SPLIT_OFFSETS[split] + i, seed=0, image_size=SIZE)
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (SIZE, SIZE, 3)
            assert ex["mask"].dtype == np.uint8 and ex["mask"].shape == (SIZE, SIZE)
            assert ex["label"].dtype == np.int32 and ex["label"].shape == (5,)
            assert ex["landmarks"].dtype == np.float32 and ex["landmarks"].shape == (68, 2)
            np.testing.assert_array_equal(ex["image"], ref["image"])  # PNG is lossless
            np.testing.assert_array_equal(ex["mask"], ref["mask"])
            np.testing.assert_array_equal(ex["label"], ref["label"])
            np.testing.assert_allclose(ex["landmarks"], ref["landmarks"], rtol=1e-6)
            assert ex["is_fake"] == int(np.any(ref["label"]))
        labels = src.labels()
        assert labels.shape == (n, 5) and labels.dtype == np.int32
        np.testing.assert_array_equal(labels[0], src[0]["label"])


def test_missing_dataset_names_path_and_command(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        sources.open_split(tmp_path, "seq_deepfake/facial_components", "train")
    msg = str(e.value)
    assert str(tmp_path / "seq_deepfake" / "facial_components") in msg
    assert "python -m data_prep.seq_deepfake --raw-dir RAW --data-dir" in msg
    with pytest.raises(FileNotFoundError, match="built automatically"):
        sources.open_split(tmp_path, synthetic_dataset.synthetic_name(SUBSET, 64, 1, 1, 1),
                           "val")


def test_unknown_split_and_corrupt_record(built):
    data_dir, name = built
    with pytest.raises(ValueError, match="no split 'nope'"):
        sources.open_split(data_dir, name, "nope")
    src = sources.open_split(data_dir, name, "val")
    rec = dict(src.raw(1), image=b"not an image")
    src._ds = [src.raw(0), rec]  # simulate a damaged record 1
    with pytest.raises(sources.DataError, match=r"split 'val' record 1"):
        src[1]


# ---- augmentation ---------------------------------------------------------------------------


def test_augment_shapes_dtypes_and_flip():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
    mask = np.zeros((80, 80), np.uint8)
    mask[10:30, 5:20] = 255
    lm = rng.uniform(0, 79, (68, 2)).astype(np.float32)
    for mode in ("resized", "pad", "none"):
        cfg = augment.AugmentConfig(crop_mode=mode, jitter_p=1.0, blur_p=1.0)
        for _ in range(5):
            img, m, l2 = augment.weak_augment(image, rng, cfg, image_size=SIZE, mask=mask,
                                              landmarks=lm)
            assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
            assert m.shape == (SIZE, SIZE) and m.dtype == np.uint8
            assert l2.shape == (68, 2) and l2.dtype == np.float32
    flip_only = augment.AugmentConfig(flip_p=1.0, crop_mode="none", jitter_p=0.0, blur_p=0.0)
    img, m, l2 = augment.weak_augment(image, rng, flip_only, mask=mask, landmarks=lm)
    np.testing.assert_array_equal(img, image[:, ::-1])
    np.testing.assert_array_equal(m, mask[:, ::-1])
    np.testing.assert_allclose(l2[landmarks68.FLIP_PERMUTATION, 0], 79 - lm[:, 0])
    # Zero magnitudes are the identity; saturation and hue keep grey pixels grey.
    still = augment.AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0)
    np.testing.assert_array_equal(augment.color_jitter(image, rng, still), image)
    grey = np.full((4, 4, 3), 100, np.uint8)
    tint = augment.AugmentConfig(brightness=0, contrast=0, saturation=0.5, hue=0.2)
    np.testing.assert_array_equal(augment.color_jitter(grey, rng, tint), grey)
    # Same generator state -> same output.
    a = augment.weak_augment(image, np.random.default_rng(3), None, image_size=SIZE)[0]
    b = augment.weak_augment(image, np.random.default_rng(3), None, image_size=SIZE)[0]
    np.testing.assert_array_equal(a, b)
    # Dict overrides are accepted.
    assert augment.as_config({"blur_sigma": [0.5, 1.0]}).blur_sigma == (0.5, 1.0)


# ---- pipelines ------------------------------------------------------------------------------


def test_train_batches_contract_and_determinism(built):
    data_dir, name = built
    src = sources.open_split(data_dir, name, "train")
    kw = {"batch_size": 8, "image_size": 48, "augment_cfg": None, "shard": True}
    a = _take(iter(pipeline.make_train_dataset(src, seed=1, **kw)), 4)
    b = _take(iter(pipeline.make_train_dataset(src, seed=1, **kw)), 4)
    c = _take(iter(pipeline.make_train_dataset(src, seed=2, **kw)), 1)
    _assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    assert set(a[0]) == set(pipeline.TRAIN_KEYS) - {"mask"}  # no loss reads the masks
    # with_masks adds them and changes nothing else (the random draws do not depend on it).
    with_masks = _take(iter(pipeline.make_train_dataset(src, seed=1, with_masks=True, **kw)), 4)
    for got, ref in zip(with_masks, a):
        assert set(got) == set(pipeline.TRAIN_KEYS)
        _assert_batches_equal([{k: v for k, v in got.items() if k != "mask"}], [ref])
    batch = with_masks[0]
    assert batch["image"].shape == (8, 48, 48, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8, 5) and batch["label"].dtype == np.int32
    assert batch["is_fake"].shape == (8,) and batch["is_fake"].dtype == np.int32
    assert batch["mask"].shape == (8, 48, 48) and batch["mask"].dtype == np.uint8
    assert batch["has_seq"].shape == (8,) and batch["has_seq"].dtype == np.float32
    np.testing.assert_array_equal(batch["is_fake"], batch["label"].any(1))
    # One epoch (3 batches of 8 = 24) visits every record once.
    labels = src.labels()
    seen = np.concatenate([x["label"] for x in a[:3]])
    assert sorted(map(tuple, seen)) == sorted(map(tuple, labels))


def test_iterator_state_resumes_at_same_batch(built):
    """The training loop's checkpoint scheme: JSON of get_state(), set_state on a fresh iterator."""
    data_dir, name = built
    src = sources.open_split(data_dir, name, "train")

    def make():
        return iter(pipeline.make_train_dataset(src, batch_size=4, seed=0, image_size=32))

    it = make()
    _take(it, 5)  # crosses an epoch boundary (6 batches per epoch)
    state = json.dumps(it.get_state())
    expected = _take(it, 3)
    resumed = make()
    resumed.set_state(json.loads(state))
    _assert_batches_equal(_take(resumed, 3), expected)


def test_eval_pads_last_batch_with_valid_flag(built):
    data_dir, name = built
    src = sources.open_split(data_dir, name, "test")  # 7 records
    batches = list(pipeline.make_eval_dataset(src, batch_size=4, image_size=40))
    assert len(batches) == 2 == pipeline.eval_num_batches(7, 4)
    np.testing.assert_array_equal(batches[0]["valid"], [1, 1, 1, 1])
    np.testing.assert_array_equal(batches[1]["valid"], [1, 1, 1, 0])
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]),
                                  [0, 1, 2, 3, 4, 5, 6, -1])
    assert batches[1]["image"].shape == (4, 40, 40, 3) and batches[1]["image"].dtype == np.uint8
    assert batches[1]["has_seq"][3] == 0 and not batches[1]["image"][3].any()
    labels = np.concatenate([b["label"] for b in batches])[:7]
    np.testing.assert_array_equal(labels, src.labels())
    # Deterministic: a second pass is identical.
    _assert_batches_equal(batches, list(pipeline.make_eval_dataset(src, batch_size=4,
                                                                   image_size=40)))


def test_triples_composition_and_labels(built, sbi_module):
    data_dir, name = built
    src = sources.open_split(data_dir, name, "train")
    ds = pipeline.make_triple_train_dataset(src, batch_size=3, seed=0, image_size=48,
                                            with_masks=True)
    batch = next(iter(ds))
    plain = next(iter(pipeline.make_triple_train_dataset(src, batch_size=3, seed=0,
                                                         image_size=48)))
    assert set(plain) == set(pipeline.TRAIN_KEYS) - {"mask"}
    _assert_batches_equal([plain], [{k: v for k, v in batch.items() if k != "mask"}])
    assert batch["image"].shape == (9, 48, 48, 3) and batch["image"].dtype == np.uint8
    assert batch["mask"].shape == (9, 48, 48) and batch["mask"].dtype == np.uint8
    np.testing.assert_array_equal(batch["is_fake"], [0, 1, 1] * 3)
    genuine, sbi, fake = (slice(r, None, 3) for r in range(3))
    assert not batch["label"][genuine].any() and not batch["label"][sbi].any()
    assert batch["label"][fake].any(axis=1).all()  # fakes carry non-empty sequences
    assert not batch["mask"][genuine].any()
    assert batch["mask"][sbi].reshape(3, -1).max(1).min() > 0
    np.testing.assert_array_equal(batch["has_seq"], np.ones(9, np.float32))


def test_two_workers_match_in_process(built):
    data_dir, name = built
    src = sources.open_split(data_dir, name, "train")
    kw = {"batch_size": 4, "seed": 3, "image_size": 32}
    ref = _take(iter(pipeline.make_train_dataset(src, num_workers=0, **kw)), 4)
    it = iter(pipeline.make_train_dataset(src, num_workers=2, **kw))
    try:
        got = _take(it, 4)
        state = it.get_state()
    finally:
        it.close()
    _assert_batches_equal(got, ref)
    it = iter(pipeline.make_train_dataset(src, num_workers=2, **kw))
    it.set_state(state)
    try:
        _assert_batches_equal(_take(it, 1), _take(iter(pipeline.make_train_dataset(
            src, num_workers=0, **kw)), 5)[4:])
    finally:
        it.close()


def test_joint_batches_mix_two_streams_in_fixed_proportion(built):
    data_dir, name = built
    src = sources.open_split(data_dir, name, "train")
    kw = {"seed": 5, "image_size": 32}
    joint = _take(iter(pipeline.make_joint_train_dataset(
        src, src, batch_size=6, joint_batch_size=2, **kw)), 2)
    # The first 4 rows are the plain stream of `source`, the last 2 that of the joint source
    # (seeded with seed + 1, sequence labels masked by has_seq = 0).
    main_ref = _take(iter(pipeline.make_train_dataset(src, batch_size=4, **kw)), 2)
    joint_ref = _take(iter(pipeline.make_train_dataset(
        src, batch_size=2, seed=6, image_size=32, has_seq=False)), 2)
    for got, a, b in zip(joint, main_ref, joint_ref):
        assert got["image"].shape == (6, 32, 32, 3)
        assert set(got) == set(a)
        for k in got:
            np.testing.assert_array_equal(got[k], np.concatenate([a[k], b[k]]), err_msg=k)
        np.testing.assert_array_equal(got["has_seq"], [1, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="joint_batch_size"):
        pipeline.make_joint_train_dataset(src, src, batch_size=4, joint_batch_size=4, **kw)


def test_joint_triples_keep_triples_whole(built, sbi_module):
    data_dir, name = built
    src = sources.open_split(data_dir, name, "train")
    batch = next(iter(pipeline.make_joint_train_dataset(
        src, src, batch_size=3, joint_batch_size=1, seed=0, image_size=32, triples=True)))
    assert batch["image"].shape == (9, 32, 32, 3)
    np.testing.assert_array_equal(batch["is_fake"], [0, 1, 1] * 3)
    np.testing.assert_array_equal(batch["has_seq"], [1] * 6 + [0] * 3)


def test_triples_deterministic_for_seed_and_worker_count(built, sbi_module):
    data_dir, name = built
    src = sources.open_split(data_dir, name, "train")
    kw = {"batch_size": 2, "image_size": 32, "shard": False}
    ref = _take(iter(pipeline.make_triple_train_dataset(src, seed=5, **kw)), 3)
    _assert_batches_equal(_take(iter(pipeline.make_triple_train_dataset(src, seed=5, **kw)), 3),
                          ref)
    other = next(iter(pipeline.make_triple_train_dataset(src, seed=6, **kw)))
    assert not np.array_equal(other["image"], ref[0]["image"])
    it = iter(pipeline.make_triple_train_dataset(src, seed=5, num_workers=2, **kw))
    try:
        got = _take(it, 3)
    finally:
        it.close()
    _assert_batches_equal(got, ref)


_PREFETCH_SCRIPT = """
import sys
from cmil_jax import parallel
from cmil_jax.data import pipeline, sources

if __name__ == "__main__":
    data_dir, name = sys.argv[1], sys.argv[2]
    src = sources.open_split(data_dir, name, "train")
    it = iter(pipeline.make_train_dataset(src, batch_size=4, seed=0, image_size=32,
                                          num_workers=1))
    mesh = parallel.make_mesh()
    batches = parallel.DevicePrefetcher(it, parallel.batch_sharding(mesh), size=2)
    taken = [next(batches) for _ in range(3)]
    batches.close()
    print("took", len(taken), "batches")
"""


def test_device_prefetcher_leaves_no_shared_memory_behind(built, tmp_path):
    """Batches from grain workers live in shared memory. On CPU, JAX would use those host arrays
    as its device buffers, and the segments of the batches still held at exit were reported as
    leaked by the interpreter's resource tracker (with jaxlib 0.10.2, until parallel.to_global
    copied them on CPU)."""
    import os
    import subprocess
    import sys

    data_dir, name = built
    script = tmp_path / "prefetch.py"
    script.write_text(_PREFETCH_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), data_dir, name], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "took 3 batches" in proc.stdout
    assert "leaked shared_memory" not in proc.stderr, proc.stderr[-3000:]
