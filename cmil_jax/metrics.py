"""Evaluation metrics (numpy): sequence accuracies, decoding, multi-label and binary scores.

Fixed-Acc and Adaptive-Acc follow the Seq-DeepFake release exactly [official]; the decoding of
class probabilities into a sequence and the other summaries are [ours] (see docs/method.md).

Sequences are int arrays (N, L) with class ids 1..C in edit order and 0 padding (L = 5).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from cmil_jax.labels import MAX_LEN

DECODE_ORDERS = ("first_high", "last_high")


# ----------------------------------------------------------------------------------------------
# Validation helpers


def _as_seq(name: str, x, like: Optional[np.ndarray] = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, L) (sequence labels), got {x.shape}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} must have shape {like.shape} to match, got {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.integer):
        if not np.all(x == np.round(x)):
            raise ValueError(f"{name} must hold integer class ids, got dtype {x.dtype}")
    if x.size and x.min() < 0:
        raise ValueError(f"{name} must hold class ids >= 0 (0 = padding)")
    return x.astype(np.int64)


def _as_matrix(name: str, x, like_name: Optional[str] = None,
               like: Optional[np.ndarray] = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, C), got {x.shape}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} must have shape {like.shape} (the shape of {like_name}), "
                         f"got {x.shape}")
    return x


def _as_vector(name: str, x, n: Optional[int] = None, like_name: str = "scores") -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got {x.shape}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) like {like_name}, got {x.shape}")
    return x


def _binary_labels(name: str, labels, n: int) -> np.ndarray:
    y = _as_vector(name, labels, n)
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"{name} must hold 0/1 values")
    return y.astype(bool)


def sequence_to_multi_hot(seq, num_classes: int) -> np.ndarray:
    """(N, L) int sequences -> (N, C) float 0/1, column k is class id k + 1."""
    seq = _as_seq("seq", seq)
    if seq.size and seq.max() > num_classes:
        raise ValueError(f"seq holds class id {seq.max()} > num_classes={num_classes}")
    out = np.zeros((seq.shape[0], num_classes + 1))
    np.put_along_axis(out, seq, 1.0, axis=1)
    return out[:, 1:]


# ----------------------------------------------------------------------------------------------
# Sequence accuracies [official]


def fixed_acc(pred, gt) -> float:
    """Fixed-Acc: matching slots over all N * L slots (micro-average).

    Args:
      pred: (N, L) int predicted sequences.  gt: (N, L) int ground truth.
    Returns:
      float in [0, 1].
    """
    gt = _as_seq("gt", gt)
    pred = _as_seq("pred", pred, gt)
    if gt.size == 0:
        return float("nan")
    return float(np.sum(pred == gt) / gt.size)


def adaptive_acc(pred, gt) -> float:
    """Adaptive-Acc: per image l = max(#nonzero gt, #nonzero pred); l = 0 counts 1 of 1,
    else #{j < l : pred_j == gt_j} of l. Total correct / total counted (micro-average).

    Args:
      pred: (N, L) int.  gt: (N, L) int.
    Returns:
      float in [0, 1].
    """
    gt = _as_seq("gt", gt)
    pred = _as_seq("pred", pred, gt)
    if gt.shape[0] == 0:
        return float("nan")
    length = np.maximum(np.count_nonzero(gt, axis=1), np.count_nonzero(pred, axis=1))  # (N,)
    within = np.arange(gt.shape[1])[None, :] < length[:, None]
    correct = np.sum((pred == gt) & within, axis=1)
    correct = np.where(length == 0, 1, correct)
    counted = np.where(length == 0, 1, length)
    return float(correct.sum() / counted.sum())


def exact_match(pred, gt) -> float:
    """Fraction of images whose whole sequence equals the ground truth. (N, L) int each."""
    gt = _as_seq("gt", gt)
    pred = _as_seq("pred", pred, gt)
    if gt.shape[0] == 0:
        return float("nan")
    return float(np.mean(np.all(pred == gt, axis=1)))


# ----------------------------------------------------------------------------------------------
# Decoding [ours]


def decode(probs, threshold: float = 0.5, order: str = "first_high", fake_prob=None,
           gate: bool = False, gate_threshold: float = 0.5) -> np.ndarray:
    """Class probabilities -> predicted sequences.

    The predicted set is {k : p_k > threshold}; it is ordered by descending p ('first_high')
    or ascending p ('last_high'), ties broken by the lower class id first, written into the
    first slots as class ids k + 1 and padded with 0 to length 5 (at most 5 classes kept).
    With gate=True, images whose MIL fake probability is below gate_threshold decode to all
    zeros.

    Args:
      probs: (N, C) class probabilities p_k = sigmoid(z_k).
      threshold: presence threshold.
      order: 'first_high' or 'last_high'.
      fake_prob: (N,) MIL fake probabilities p(x); required when gate=True.
      gate: apply the fake-probability gate.
      gate_threshold: gate threshold (0.5).
    Returns:
      (N, 5) int64 sequences.
    """
    if order not in DECODE_ORDERS:
        raise ValueError(f"order must be one of {DECODE_ORDERS}, got {order!r}")
    probs = _as_matrix("probs", probs)
    n, c = probs.shape
    present = probs > threshold
    key = -probs if order == "first_high" else probs
    key = np.where(present, key, np.inf)  # absent classes go last
    ranked = np.argsort(key, axis=1, kind="stable")  # (N, C), stable: lower id first on ties
    ids = np.where(np.take_along_axis(present, ranked, axis=1), ranked + 1, 0)
    out = np.zeros((n, MAX_LEN), dtype=np.int64)
    keep = min(c, MAX_LEN)
    out[:, :keep] = ids[:, :keep]
    if gate:
        if fake_prob is None:
            raise ValueError("fake_prob of shape (N,) is required when gate=True")
        fake_prob = _as_vector("fake_prob", fake_prob, n, "probs")
        out[fake_prob < gate_threshold] = 0
    return out


# ----------------------------------------------------------------------------------------------
# Ranking and multi-label summaries [ours]


def average_precision(scores, labels) -> float:
    """Average precision sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds.

    Tied scores form one threshold (the same definition as scikit-learn). NaN without positives.

    Args:
      scores: (N,) float.  labels: (N,) 0/1.
    """
    scores = _as_vector("scores", scores)
    y = _binary_labels("labels", labels, scores.shape[0])
    num_pos = int(y.sum())
    if num_pos == 0:
        return float("nan")
    idx = np.argsort(-scores, kind="stable")
    s, yy = scores[idx], y[idx]
    tp = np.cumsum(yy)
    fp = np.cumsum(~yy)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # end of each tie group
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / num_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_map(probs, targets01) -> float:
    """Mean over classes of the average precision; classes without positives are left out.

    Args:
      probs: (N, C) scores.  targets01: (N, C) 0/1.
    Returns:
      float, NaN if no class has a positive.
    """
    probs = _as_matrix("probs", probs)
    targets = _as_matrix("targets01", targets01, "probs", probs)
    aps = [average_precision(probs[:, k], targets[:, k]) for k in range(probs.shape[1])
           if targets[:, k].any()]
    return float(np.mean(aps)) if aps else float("nan")


def multilabel_f1(pred, targets01, threshold: float = 0.5, average: str = "micro") -> float:
    """Multi-label F1 of {pred > threshold} against 0/1 targets.

    'micro' pools TP/FP/FN over all classes; 'macro' averages per-class F1 over the classes
    that occur in the targets or the predictions (others are left out). NaN when nothing is
    predicted and nothing is present.

    Args:
      pred: (N, C) probabilities or 0/1 predictions.  targets01: (N, C) 0/1.
      threshold: presence threshold.  average: 'micro' or 'macro'.
    """
    if average not in ("micro", "macro"):
        raise ValueError(f"average must be 'micro' or 'macro', got {average!r}")
    p = _as_matrix("pred", pred) > threshold
    t = _as_matrix("targets01", targets01, "pred", p) > 0.5
    tp = np.sum(p & t, axis=0)
    fp = np.sum(p & ~t, axis=0)
    fn = np.sum(~p & t, axis=0)
    if average == "micro":
        tp, fp, fn = tp.sum(), fp.sum(), fn.sum()
        denom = 2 * tp + fp + fn
        return float(2 * tp / denom) if denom else float("nan")
    denom = 2 * tp + fp + fn
    valid = denom > 0
    if not valid.any():
        return float("nan")
    return float(np.mean(2 * tp[valid] / denom[valid]))


def order_accuracy(pred, gt) -> float:
    """Pairwise order accuracy among the classes present in both gt and pred.

    For each image, every pair of classes found in both sequences counts correct when the two
    sequences order it the same way. Micro-average over all such pairs; NaN if there are none.

    Args:
      pred: (N, L) int.  gt: (N, L) int.
    """
    gt = _as_seq("gt", gt)
    pred = _as_seq("pred", pred, gt)
    correct = total = 0
    for p_row, g_row in zip(pred, gt):
        p_pos = {c: j for j, c in enumerate(p_row) if c > 0}
        g_pos = {c: j for j, c in enumerate(g_row) if c > 0}
        common = sorted(set(p_pos) & set(g_pos))
        for a_i, a in enumerate(common):
            for b in common[a_i + 1:]:
                total += 1
                correct += (p_pos[a] < p_pos[b]) == (g_pos[a] < g_pos[b])
    return float(correct / total) if total else float("nan")


# ----------------------------------------------------------------------------------------------
# Binary detection


def binary_auc(scores, labels) -> float:
    """ROC AUC by the Mann-Whitney statistic, ties counting 0.5. NaN if one class only.

    Args:
      scores: (N,) float (higher = more likely fake).  labels: (N,) 0/1.
    """
    scores = _as_vector("scores", scores)
    y = _binary_labels("labels", labels, scores.shape[0])
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank per unique score
    ranks = mid_rank[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def accuracy_at(scores, labels, threshold: float = 0.5) -> float:
    """Accuracy of the decision score > threshold. scores, labels: (N,)."""
    scores = _as_vector("scores", scores)
    y = _binary_labels("labels", labels, scores.shape[0])
    if y.size == 0:
        return float("nan")
    return float(np.mean((scores > threshold) == y))


def eer(scores, labels) -> float:
    """Equal error rate: where FPR = FNR on the ROC curve, linearly interpolated.

    The ROC points are taken at each distinct score (predict fake when score >= t), plus the
    point where nothing is predicted fake. NaN if one class only.

    Args:
      scores: (N,) float.  labels: (N,) 0/1.
    """
    scores = _as_vector("scores", scores)
    y = _binary_labels("labels", labels, scores.shape[0])
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    idx = np.argsort(-scores, kind="stable")
    s, yy = scores[idx], y[idx]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tpr = np.r_[0.0, np.cumsum(yy)[last] / n_pos]
    fpr = np.r_[0.0, np.cumsum(~yy)[last] / n_neg]
    fnr = 1.0 - tpr
    diff = fpr - fnr  # rises from -1 to 1 as the threshold falls
    k = int(np.argmax(diff >= 0))
    if diff[k] == 0 or k == 0:
        return float(fpr[k])
    t = -diff[k - 1] / (diff[k] - diff[k - 1])
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def class_head_score(probs) -> np.ndarray:
    """The class heads' fake score of each image: max_k p_k, or p_1 with one class.

    Args:
      probs: (N, C) class probabilities p_k = sigmoid((z^U_k + z^V_k) / 2).
    Returns:
      (N,) float64.
    """
    probs = _as_matrix("probs", probs)
    return probs[:, 0] if probs.shape[1] == 1 else probs.max(axis=1)


# Frame scores -> video score (the video protocol's `aggregate`, config_base.video_config).
VIDEO_AGGREGATES = {"mean": np.mean, "max": np.max, "median": np.median}


def aggregate(scores, how: str = "mean") -> float:
    """One video's score from its frame scores: 'mean', 'max' or 'median'; NaN for none."""
    if how not in VIDEO_AGGREGATES:
        raise ValueError(f"unknown aggregate {how!r}; expected one of {tuple(VIDEO_AGGREGATES)}")
    scores = np.asarray(scores, np.float64).reshape(-1)
    return float(VIDEO_AGGREGATES[how](scores)) if scores.size else float("nan")


def video_level_scores(frame_scores, video_ids, frame_labels=None, how: str = "mean"):
    """Video-level scores: the `how` ('mean', 'max', 'median') of the frame scores of each
    video.

    Args:
      frame_scores: (F,) float.
      video_ids: (F,) video identifier per frame (any sortable type).
      frame_labels: optional (F,) 0/1; must be constant within a video.
      how: the aggregate (``aggregate``).
    Returns:
      (ids (V,), scores (V,)) with ids sorted, plus labels (V,) when frame_labels is given.
    """
    if how not in VIDEO_AGGREGATES:
        raise ValueError(f"unknown aggregate {how!r}; expected one of {tuple(VIDEO_AGGREGATES)}")
    frame_scores = _as_vector("frame_scores", frame_scores)
    video_ids = np.asarray(video_ids)
    if video_ids.shape != frame_scores.shape:
        raise ValueError(f"video_ids must have shape {frame_scores.shape} like frame_scores, "
                         f"got {video_ids.shape}")
    ids, inverse = np.unique(video_ids, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse, minlength=ids.size)
    if how == "mean":
        scores = np.bincount(inverse, weights=frame_scores, minlength=ids.size) / counts
    else:
        grouped = np.split(frame_scores[np.argsort(inverse, kind="stable")],
                           np.cumsum(counts)[:-1]) if ids.size else []
        scores = np.array([aggregate(g, how) for g in grouped], np.float64)
    if frame_labels is None:
        return ids, scores
    y = _binary_labels("frame_labels", frame_labels, frame_scores.shape[0], ).astype(np.float64)
    labels = np.bincount(inverse, weights=y, minlength=ids.size) / counts
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("frame_labels must be constant within each video")
    return ids, scores, labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# All sequence metrics at once


def sequence_metrics(probs, gt_seq, **decode_kw) -> dict[str, float]:
    """Decode probabilities and compute every sequence metric.

    Args:
      probs: (N, C) class probabilities.
      gt_seq: (N, L) int ground-truth sequences.
      **decode_kw: passed to ``decode`` (threshold, order, fake_prob, gate, gate_threshold).
    Returns:
      dict of floats: 'fixed_acc', 'adaptive_acc', 'exact_match', 'map' (on probs, ungated),
      'f1' (micro, on the decoded sets), 'f1_macro', 'order_acc'.
    """
    probs = _as_matrix("probs", probs)
    gt = _as_seq("gt_seq", gt_seq)
    if gt.shape[0] != probs.shape[0]:
        raise ValueError(f"gt_seq must have shape ({probs.shape[0]}, L) like probs, got {gt.shape}")
    pred = decode(probs, **decode_kw)
    if pred.shape[1] != gt.shape[1]:
        raise ValueError(f"gt_seq must have shape ({probs.shape[0]}, {pred.shape[1]}), got {gt.shape}")
    c = probs.shape[1]
    targets = sequence_to_multi_hot(gt, c)
    pred01 = sequence_to_multi_hot(pred, c)
    return {
        "fixed_acc": fixed_acc(pred, gt),
        "adaptive_acc": adaptive_acc(pred, gt),
        "exact_match": exact_match(pred, gt),
        "map": multilabel_map(probs, targets),
        "f1": multilabel_f1(pred01, targets, average="micro"),
        "f1_macro": multilabel_f1(pred01, targets, average="macro"),
        "order_acc": order_accuracy(pred, gt),
    }
