"""Metrics against hand-worked examples and brute-force definitions."""

import itertools

import numpy as np
import pytest

from cmil_jax import metrics

Z = [0, 0, 0, 0, 0]


# ----------------------------------------------------------------------------------------------
# Fixed-Acc / Adaptive-Acc / exact match


def test_fixed_acc_hand_example():
    gt = [[1, 2, 0, 0, 0], [4, 3, 0, 0, 0]]
    pred = [[1, 2, 0, 0, 0], [3, 0, 0, 0, 0]]
    # row 0: 5 slots equal; row 1: slots 2..4 equal -> 8 / 10
    assert metrics.fixed_acc(pred, gt) == pytest.approx(0.8)
    assert metrics.fixed_acc(gt, gt) == 1.0


def test_adaptive_acc_hand_example():
    gt = [[1, 2, 0, 0, 0], [4, 3, 0, 0, 0]]
    pred = [[1, 2, 0, 0, 0], [3, 0, 0, 0, 0]]
    # row 0: l = 2, 2 correct; row 1: l = max(2, 1) = 2, 0 correct -> 2 / 4
    assert metrics.adaptive_acc(pred, gt) == pytest.approx(0.5)


def test_adaptive_acc_zero_length_counts_one_of_one():
    assert metrics.adaptive_acc([Z], [Z]) == 1.0
    # micro-average: row 0 counts 1/1, row 1 counts 1/3 (slot 0 right) -> 2/4, not (1 + 1/3) / 2
    gt = [Z, [1, 2, 3, 0, 0]]
    pred = [Z, [1, 3, 2, 0, 0]]
    assert metrics.adaptive_acc(pred, gt) == pytest.approx(0.5)
    # a genuine image predicted as one edit: l = 1, 0 correct
    assert metrics.adaptive_acc([[2, 0, 0, 0, 0]], [Z]) == 0.0
    # a fake predicted as genuine: l = 2 (from gt), 0 correct
    assert metrics.adaptive_acc([Z], [[2, 5, 0, 0, 0]]) == 0.0


def test_pred_longer_than_gt():
    gt = [[1, 0, 0, 0, 0]]
    pred = [[1, 2, 3, 0, 0]]
    # adaptive: l = 3, only slot 0 right -> 1/3; fixed: slots 0, 3, 4 -> 3/5
    assert metrics.adaptive_acc(pred, gt) == pytest.approx(1 / 3)
    assert metrics.fixed_acc(pred, gt) == pytest.approx(3 / 5)
    assert metrics.exact_match(pred, gt) == 0.0


def test_adaptive_acc_matches_loop_definition():
    rng = np.random.default_rng(0)
    gt = np.zeros((50, 5), int)
    pred = np.zeros((50, 5), int)
    for i in range(50):
        for arr in (gt, pred):
            m = rng.integers(0, 6)
            arr[i, :m] = rng.permutation(5)[:m] + 1
    correct = total = 0
    for p, g in zip(pred, gt):
        length = max(np.count_nonzero(g), np.count_nonzero(p))
        if length == 0:
            correct, total = correct + 1, total + 1
        else:
            correct += sum(int(p[j] == g[j]) for j in range(length))
            total += length
    assert metrics.adaptive_acc(pred, gt) == pytest.approx(correct / total)


def test_exact_match():
    gt = [[1, 2, 0, 0, 0], Z, [3, 0, 0, 0, 0]]
    pred = [[1, 2, 0, 0, 0], Z, [3, 1, 0, 0, 0]]
    assert metrics.exact_match(pred, gt) == pytest.approx(2 / 3)


def test_shape_validation_names_the_argument():
    with pytest.raises(ValueError, match=r"pred must have shape \(2, 5\)"):
        metrics.fixed_acc(np.zeros((2, 4), int), np.zeros((2, 5), int))
    with pytest.raises(ValueError, match=r"gt must have shape \(N, L\)"):
        metrics.adaptive_acc(np.zeros((2, 5), int), np.zeros(5, int))
    with pytest.raises(ValueError, match=r"probs must have shape \(N, C\)"):
        metrics.decode(np.zeros(5))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        metrics.binary_auc(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="targets01"):
        metrics.multilabel_map(np.zeros((3, 5)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="fake_prob"):
        metrics.decode(np.zeros((3, 5)), gate=True, fake_prob=np.zeros(2))


# ----------------------------------------------------------------------------------------------
# Decoding


def test_decode_orders_by_probability():
    probs = [[0.9, 0.2, 0.7, 0.6, 0.1],
             [0.1, 0.2, 0.3, 0.4, 0.5],  # 0.5 is not > 0.5
             [0.55, 0.6, 0.65, 0.7, 0.99]]
    np.testing.assert_array_equal(metrics.decode(probs),
                                  [[1, 3, 4, 0, 0], Z, [5, 4, 3, 2, 1]])
    np.testing.assert_array_equal(metrics.decode(probs, order="last_high"),
                                  [[4, 3, 1, 0, 0], Z, [1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(metrics.decode(probs, threshold=0.35),
                                  [[1, 3, 4, 0, 0], [5, 4, 0, 0, 0], [5, 4, 3, 2, 1]])
    assert metrics.decode(probs).dtype.kind == "i"


def test_decode_ties_lower_class_first():
    probs = [[0.8, 0.8, 0.3, 0.8, 0.1], [0.6, 0.9, 0.6, 0.2, 0.2]]
    np.testing.assert_array_equal(metrics.decode(probs), [[1, 2, 4, 0, 0], [2, 1, 3, 0, 0]])
    np.testing.assert_array_equal(metrics.decode(probs, order="last_high"),
                                  [[1, 2, 4, 0, 0], [1, 3, 2, 0, 0]])


def test_decode_gate():
    probs = [[0.9, 0.8, 0.1, 0.1, 0.1], [0.9, 0.8, 0.1, 0.1, 0.1]]
    fake_prob = [0.4, 0.6]
    np.testing.assert_array_equal(metrics.decode(probs, fake_prob=fake_prob, gate=True),
                                  [Z, [1, 2, 0, 0, 0]])
    # without gate=True the fake probability is ignored
    np.testing.assert_array_equal(metrics.decode(probs, fake_prob=fake_prob),
                                  [[1, 2, 0, 0, 0], [1, 2, 0, 0, 0]])
    with pytest.raises(ValueError, match="fake_prob"):
        metrics.decode(probs, gate=True)


def test_decode_more_classes_than_slots():
    probs = [[0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.51]]
    np.testing.assert_array_equal(metrics.decode(probs), [[6, 5, 4, 3, 2]])
    np.testing.assert_array_equal(metrics.decode(probs, order="last_high"), [[7, 1, 2, 3, 4]])


# ----------------------------------------------------------------------------------------------
# Multi-label and order metrics


def test_average_precision_hand_examples():
    # ranked labels 1, 0, 1, 0: precision at the hits 1/1 and 2/3
    assert metrics.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert metrics.average_precision([0.1, 0.2, 0.3], [0, 1, 1]) == pytest.approx(1.0)
    # a tie is one threshold: precision 1/2 at recall 1
    assert metrics.average_precision([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    # ranked labels 0, 1, 0, 1: 1/2 and 2/4
    assert metrics.average_precision([4, 3, 2, 1], [0, 1, 0, 1]) == pytest.approx(0.5)
    assert np.isnan(metrics.average_precision([0.1, 0.2], [0, 0]))


def test_multilabel_map_skips_classes_without_positives():
    probs = np.array([[0.9, 0.3, 0.1], [0.8, 0.2, 0.9], [0.7, 0.4, 0.2], [0.6, 0.1, 0.3]])
    targets = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    # class 1: AP 5/6, class 2: no positives (left out), class 3: AP 1
    assert metrics.multilabel_map(probs, targets) == pytest.approx((5 / 6 + 1.0) / 2)
    assert np.isnan(metrics.multilabel_map(probs, np.zeros_like(targets)))


def test_multilabel_f1_micro_and_macro():
    pred = np.array([[0.9, 0.9, 0.1], [0.9, 0.1, 0.1]])
    targets = np.array([[1, 0, 0], [1, 0, 1]])
    # class 1: tp 2; class 2: fp 1; class 3: fn 1 -> micro 2*2 / (4 + 1 + 1)
    assert metrics.multilabel_f1(pred, targets) == pytest.approx(4 / 6)
    # macro over classes 1 (F1 1), 2 (0), 3 (0)
    assert metrics.multilabel_f1(pred, targets, average="macro") == pytest.approx(1 / 3)
    # 0/1 predictions work with the default threshold
    assert metrics.multilabel_f1((pred > 0.5).astype(int), targets) == pytest.approx(4 / 6)
    # a class absent from both sides is left out of the macro average
    targets2 = np.array([[1, 1, 0], [1, 0, 0]])
    assert metrics.multilabel_f1(pred, targets2, average="macro") == pytest.approx(1.0)
    assert np.isnan(metrics.multilabel_f1(np.zeros((2, 3)), np.zeros((2, 3))))
    with pytest.raises(ValueError, match="average"):
        metrics.multilabel_f1(pred, targets, average="weighted")


def test_order_accuracy():
    gt = [[1, 2, 3, 0, 0], [1, 2, 0, 0, 0], [4, 5, 0, 0, 0]]
    pred = [[2, 1, 3, 0, 0], [2, 4, 0, 0, 0], [4, 5, 1, 0, 0]]
    # row 0: pairs (1,2) wrong, (1,3) right, (2,3) right; row 1: one common class, no pair;
    # row 2: (4,5) right -> 3 / 4
    assert metrics.order_accuracy(pred, gt) == pytest.approx(3 / 4)
    assert np.isnan(metrics.order_accuracy([Z], [[1, 2, 0, 0, 0]]))


def test_sequence_metrics():
    gt = np.array([[1, 3, 0, 0, 0], Z, [2, 0, 0, 0, 0]])
    probs = np.array([[0.9, 0.1, 0.8, 0.1, 0.1],
                      [0.1, 0.1, 0.1, 0.1, 0.1],
                      [0.1, 0.7, 0.1, 0.1, 0.6]])  # last row: extra class 5
    out = metrics.sequence_metrics(probs, gt)
    assert {"fixed_acc", "adaptive_acc", "exact_match", "map", "f1", "order_acc"} <= set(out)
    assert all(isinstance(v, float) for v in out.values())
    assert out["fixed_acc"] == pytest.approx(14 / 15)
    assert out["adaptive_acc"] == pytest.approx((2 + 1 + 1) / (2 + 1 + 2))
    assert out["exact_match"] == pytest.approx(2 / 3)
    assert out["order_acc"] == 1.0
    assert out["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1))
    assert out["map"] == pytest.approx(1.0)
    # decode options pass through: last_high flips the first row
    assert metrics.sequence_metrics(probs, gt, order="last_high")["order_acc"] == 0.0
    gated = metrics.sequence_metrics(probs, gt, fake_prob=[0.9, 0.1, 0.2], gate=True)
    assert gated["exact_match"] == pytest.approx(2 / 3)  # row 2 now decodes to zeros, wrong


# ----------------------------------------------------------------------------------------------
# Binary detection


def test_binary_auc_hand_examples():
    assert metrics.binary_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # pos {0.5, 0.9} vs neg {0.5, 0.1}: one tie (1/2) and three wins -> 3.5 / 4
    assert metrics.binary_auc([0.5, 0.5, 0.9, 0.1], [1, 0, 1, 0]) == pytest.approx(0.875)
    assert metrics.binary_auc([1, 1, 1], [0, 1, 0]) == pytest.approx(0.5)
    assert np.isnan(metrics.binary_auc([0.2, 0.3], [1, 1]))
    assert np.isnan(metrics.binary_auc([0.2, 0.3], [0, 0]))


def test_binary_auc_matches_pair_count():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=40) / 5.0  # many ties
    labels = rng.integers(0, 2, size=40)
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert metrics.binary_auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))


def test_accuracy_at():
    assert metrics.accuracy_at([0.2, 0.7, 0.5, 0.9], [0, 1, 1, 0]) == pytest.approx(0.5)
    assert metrics.accuracy_at([0.2, 0.7, 0.5, 0.9], [0, 1, 1, 0], 0.4) == pytest.approx(0.75)


def test_eer():
    assert metrics.eer([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 0.0
    assert metrics.eer([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 1.0
    # pos {0.9, 0.8, 0.3}, neg {0.6, 0.1}: FNR stays 1/3 while FPR goes 0 -> 1/2 around t = 0.6;
    # the interpolated crossing is at FPR = FNR = 1/3
    assert metrics.eer([0.9, 0.8, 0.3, 0.6, 0.1], [1, 1, 1, 0, 0]) == pytest.approx(1 / 3)
    # exact crossing on a ROC point: threshold 0.4 gives FPR = FNR = 1/2
    assert metrics.eer([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.5)
    assert np.isnan(metrics.eer([0.1, 0.4], [1, 1]))


def test_video_level_scores():
    ids, scores = metrics.video_level_scores([0.2, 0.6, 0.4, 1.0], ["b", "a", "b", "c"])
    assert list(ids) == ["a", "b", "c"]
    np.testing.assert_allclose(scores, [0.6, 0.3, 1.0])
    ids, scores, labels = metrics.video_level_scores([0.2, 0.6, 0.4], [7, 3, 7], [1, 0, 1])
    np.testing.assert_array_equal(ids, [3, 7])
    np.testing.assert_array_equal(labels, [0, 1])
    with pytest.raises(ValueError, match="constant within each video"):
        metrics.video_level_scores([0.2, 0.6], [1, 1], [0, 1])
    with pytest.raises(ValueError, match="video_ids"):
        metrics.video_level_scores([0.2, 0.6], [1, 1, 2])
