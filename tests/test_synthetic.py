"""Tests of the procedural Seq-DeepFake-style data (cmil_jax/data/synthetic.py)."""


import cv2
import numpy as np
import pytest

from cmil_jax.data import landmarks68 as lm68
from cmil_jax.data import synthetic as sy
from cmil_jax.labels import CLASS_NAMES, MAX_LEN, SUBSETS

COMP, ATTR = "facial_components", "facial_attributes"


def _first_index(subset, predicate, seed=0):
    for i in range(1000):
        if predicate(sy.sequence_for_index(subset, i, seed)):
            return i
    raise AssertionError("no index found")


# ---------------------------------------------------------------- sequence types and labels


def test_sequence_type_counts_and_validity():
    assert len(sy.SEQUENCE_TYPES[COMP]) == 28
    assert len(sy.SEQUENCE_TYPES[ATTR]) == 26
    for subset in SUBSETS:
        types = sy.SEQUENCE_TYPES[subset]
        assert types[0] == ()
        assert len(set(types)) == len(types)
        for t in types[1:]:
            assert 1 <= len(t) <= MAX_LEN
            assert len(set(t)) == len(t)
            assert all(1 <= k <= 5 for k in t)
        assert {len(t) for t in types[1:]} == {1, 2, 3, 4, 5}


def test_label_names():
    assert sy.label_to_name([1, 2, 4, 0, 0], COMP) == "nose-eye-lip"
    assert sy.label_to_name(np.zeros(5, np.int32), ATTR) == "original"
    assert sy.label_to_name([5, 1, 0, 0, 0], ATTR) == "Young-Bangs"
    for subset in SUBSETS:
        for t in sy.SEQUENCE_TYPES[subset]:
            label = sy.label_from_sequence(t)
            assert label.dtype == np.int32 and label.shape == (MAX_LEN,)
            assert tuple(label[: len(t)]) == t and not label[len(t):].any()


def test_invalid_subset_names_valid_ones():
    for call in (lambda: sy.generate_example("faces", 0),
                 lambda: sy.label_to_name([0] * 5, "faces")):
        with pytest.raises(ValueError) as err:
            call()
        assert COMP in str(err.value) and ATTR in str(err.value)
    with pytest.raises(ValueError):
        sy.generate_example(COMP, 0, sequence=(1, 1))


def test_sampling_shares_and_all_zero_baseline():
    n = 3000
    for subset in SUBSETS:
        seqs = [sy.sequence_for_index(subset, i, 0) for i in range(n)]
        assert all(s in sy.SEQUENCE_TYPES[subset] for s in seqs)
        share = np.mean([len(s) == 0 for s in seqs])
        assert abs(share - sy.ORIGINAL_SHARE) < 0.03
        labels = np.stack([sy.label_from_sequence(s) for s in seqs])
        fixed_acc_all_zeros = (labels == 0).mean()
        assert fixed_acc_all_zeros < 0.65, fixed_acc_all_zeros
        assert len(set(seqs)) == len(sy.SEQUENCE_TYPES[subset])  # every type occurs
    lengths = np.array([len(sy.sequence_for_index(COMP, i, 0)) for i in range(n)])
    counts = np.bincount(lengths[lengths > 0], minlength=6)[1:]
    assert counts.min() > 0.8 * counts.mean()  # about uniform over lengths 1..5


# ---------------------------------------------------------------- examples


@pytest.mark.parametrize("subset", SUBSETS)
def test_shapes_dtypes_and_labels(subset):
    for size in (64, 128):
        for i in range(12):
            ex = sy.generate_example(subset, i, seed=1, image_size=size)
            assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
            assert ex["label"].shape == (5,) and ex["label"].dtype == np.int32
            assert ex["landmarks"].shape == (68, 2) and ex["landmarks"].dtype == np.float32
            assert ex["mask"].shape == (size, size) and ex["mask"].dtype == np.uint8
            assert ex["face_mask"].shape == (size, size) and ex["face_mask"].dtype == np.uint8
            assert set(np.unique(ex["mask"])) <= {0, 255}
            label = ex["label"]
            seq = tuple(int(k) for k in label if k)
            n = len(seq)
            assert np.all(label[n:] == 0) and np.all(label[:n] > 0)  # 0-padded
            assert seq == sy.sequence_for_index(subset, i, 1)
            assert seq in sy.SEQUENCE_TYPES[subset]
            assert (ex["mask"].any()) == (n > 0)


def test_determinism():
    for subset in SUBSETS:
        a = sy.generate_example(subset, 5, seed=3, image_size=96)
        b = sy.generate_example(subset, 5, seed=3, image_size=96)
        for key in a:
            assert a[key].tobytes() == b[key].tobytes(), key
        c = sy.generate_example(subset, 6, seed=3, image_size=96)
        d = sy.generate_example(subset, 5, seed=4, image_size=96)
        assert a["image"].tobytes() != c["image"].tobytes()
        assert a["image"].tobytes() != d["image"].tobytes()
    # Same face in both subsets is not required, but each subset is self-consistent:
    e = sy.generate_example(COMP, 5, seed=3, image_size=96, sequence=(2, 4))
    f = sy.generate_example(COMP, 5, seed=3, image_size=96, sequence=(2, 4))
    assert e["image"].tobytes() == f["image"].tobytes()


def _bbox(mask, pad):
    ys, xs = np.nonzero(mask)
    return xs.min() - pad, xs.max() + pad, ys.min() - pad, ys.max() + pad


def _inside(points, mask, pad):
    x0, x1, y0, y1 = _bbox(mask, pad)
    return np.all((points[:, 0] >= x0) & (points[:, 0] <= x1)
                  & (points[:, 1] >= y0) & (points[:, 1] <= y1))


@pytest.mark.parametrize("size", [96, 256])
def test_landmarks_match_part_masks(size):
    pad = 1.5 * size / 256 + 1
    for subset in SUBSETS:
        for i in range(8):
            ex = sy.generate_example(subset, i, seed=2, image_size=size, return_parts=True)
            lm, parts = ex["landmarks"], ex["parts"]
            assert np.all((lm >= 0) & (lm <= size - 1))
            assert _inside(lm[lm68.JAW], ex["face_mask"], pad)
            assert _inside(lm[lm68.BROWS], parts["brows"], pad)
            assert _inside(lm[lm68.NOSE], parts["nose"], pad)
            assert _inside(lm[lm68.EYES], parts["eyes"], pad)
            assert _inside(lm[lm68.MOUTH], parts["lips"], pad)
            # Right eye (image left) and right brow are on the image-left side.
            assert lm[lm68.LEFT_EYE, 0].mean() < lm[27, 0] < lm[lm68.RIGHT_EYE, 0].mean()
            assert lm[lm68.LEFT_BROW, 0].mean() < lm[lm68.RIGHT_BROW, 0].mean()
            assert lm[0, 0] < lm[8, 0] < lm[16, 0] and lm[8, 1] > lm[57, 1] > lm[33, 1]
            # Landmarks lie on what is drawn: each point's pixel is in the part mask (eyes, lips).
            for idx, name in ((lm68.EYES, "eyes"), (lm68.OUTER_LIP, "lips")):
                xy = np.round(lm[idx]).astype(int)
                grown = cv2.dilate(parts[name], np.ones((3, 3), np.uint8))
                assert np.mean(grown[xy[:, 1], xy[:, 0]] > 0) > 0.9


@pytest.mark.parametrize("subset", SUBSETS)
def test_originals_have_empty_mask(subset):
    i = _first_index(subset, lambda s: len(s) == 0)
    ex = sy.generate_example(subset, i, image_size=96)
    assert not ex["mask"].any() and not ex["label"].any()
    assert ex["face_mask"].any()


@pytest.mark.parametrize("subset", SUBSETS)
def test_edits_stay_inside_mask_and_are_visible(subset):
    names = {COMP: ("nose", "eyes", "brows", "lips", "hair"),
             ATTR: ("bangs", "glasses", "beard", "lips", "skin")}[subset]
    for k in range(1, 6):
        for i in range(3):
            ex = sy.generate_example(subset, i, 0, 128, sequence=(k,), return_parts=True)
            ref = sy.generate_example(subset, i, 0, 128, sequence=(k,), apply_edits=False)
            assert not ref["mask"].any() and not ref["label"].any()
            diff = np.abs(ex["image"].astype(np.int32) - ref["image"]).sum(-1)
            inside = ex["mask"] > 0
            assert inside.any()
            assert diff[inside].sum() > 0.9 * diff.sum()
            assert diff[inside].mean() / 3 > 2.0  # visible: > 2 grey levels on average
            # The mask covers the edited part.
            part = ex["parts"][names[k - 1]] > 0
            assert (inside & part).sum() > 0.5 * part.sum()
    seq = sy.SEQUENCE_TYPES[subset][-1]  # length 5
    ex = sy.generate_example(subset, 1, 0, 128, sequence=seq)
    ref = sy.generate_example(subset, 1, 0, 128, sequence=seq, apply_edits=False)
    diff = np.abs(ex["image"].astype(np.int32) - ref["image"]).sum(-1)
    assert diff[ex["mask"] > 0].sum() > 0.9 * diff.sum()


def _warmth(img, region):
    px = img[region].astype(np.float64)
    return (px[:, 0] - px[:, 2]).mean()


@pytest.mark.parametrize("subset", SUBSETS)
def test_order_leaves_a_trace(subset):
    """a-b and b-a differ; the region edited later is less re-encoded (less red - blue)."""
    for i, (a, b) in enumerate([(1, 2), (2, 4), (3, 5), (4, 1)]):
        ab = sy.generate_example(subset, i, 0, 128, sequence=(a, b))
        ba = sy.generate_example(subset, i, 0, 128, sequence=(b, a))
        assert ab["label"][:2].tolist() == [a, b] and ba["label"][:2].tolist() == [b, a]
        assert ab["image"].tobytes() != ba["image"].tobytes()
        union, common = (ab["mask"] | ba["mask"]) > 0, (ab["mask"] & ba["mask"]) > 0
        assert common.sum() > 0.9 * union.sum()  # same regions, only the order differs
        only_b = sy.generate_example(subset, i, 0, 128, sequence=(b,))["mask"] > 0
        only_a = sy.generate_example(subset, i, 0, 128, sequence=(a,))["mask"] > 0
        near_a = cv2.dilate(only_a.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        region = only_b & ~near_a
        # In a-b, b was pasted at step 2 (1 re-encoding); in b-a at step 1 (2 re-encodings).
        assert _warmth(ab["image"], region) < _warmth(ba["image"], region) - 1.0


def test_class_names_match_labels_module():
    assert set(sy.SEQUENCE_TYPES) == set(SUBSETS)
    assert tuple(sy.COMPONENT_PARTS.values()) == CLASS_NAMES[COMP]
    assert CLASS_NAMES[COMP][:2] == ("nose", "eye")
