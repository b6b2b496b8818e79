"""The evaluation suite: one pass of a model over a split (``evaluate``), binary detection
metrics, localization metrics and the results table.

Binary detection follows the metric set DeepfakeBench standardised: frame-level ROC AUC,
EER, average precision and accuracy at 0.5, and video-level AUC / EER / AP where the score of
a video is the mean of its frame scores (``metrics.video_level_scores``), videos told apart by
the records' ``video_id`` (``video_ids``).

Localization (``localization_metrics``, ``LocalizationMeter``): pixel AUC, best-threshold IoU
and the pointing game of the MIL similarity map against the ground-truth masks (see
``cmil_jax.localization``).

Results table: every 'test' record of ``<workdir>/metrics.jsonl`` (one per best checkpoint
and test set) as a markdown table, printed and written to ``<workdir>/results.md``::

    python -m cmil_jax.evaluation --workdir runs/demo
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

from cmil_jax import disk
from cmil_jax import metrics as metrics_lib
from cmil_jax import parallel
from cmil_jax.localization import LocalizationMeter

__all__ = [
    "LocalizationMeter",
    "binary_metrics",
    "evaluate",
    "localization_metrics",
    "results_table",
    "test_records",
    "video_ids",
    "write_results",
]

# Column order of the results table; other numeric keys follow in sorted order.
COLUMNS = (
    "fixed_acc", "adaptive_acc", "exact_match", "map", "f1", "order_acc",
    "auc", "video_auc", "eer", "ap", "acc", "mil_auc",
    "pixel_auc", "best_iou", "pointing_game",
)
# Values shown as plain numbers, not as percentages.
COUNT_COLUMNS = ("num_images", "num_videos", "num_localized", "best_iou_threshold", "step")
LABELS = {
    "fixed_acc": "Fixed-Acc", "adaptive_acc": "Adaptive-Acc", "exact_match": "exact match",
    "map": "mAP", "f1": "F1", "order_acc": "order acc", "auc": "AUC", "video_auc": "video AUC",
    "eer": "EER", "ap": "AP", "acc": "Acc", "mil_auc": "MIL AUC", "pixel_auc": "pixel AUC",
    "best_iou": "best IoU", "pointing_game": "pointing game", "num_images": "images",
}
HIDDEN = ("f1_macro", "video_eer", "video_ap", "best_iou_threshold", "num_videos",
          "num_localized")


# ----------------------------------------------------------------------------------------------
# One pass over a split


def evaluate(eval_step, variables, dataset, batch_sharding, cfg, video_ids=None,
             sequence: bool = True, interrupt=None) -> dict:
    """Runs `eval_step` (train.make_eval_step) over a finite dataset and returns the metrics of
    method.md, "Decoding and metrics".

    Sequence metrics (multi-class heads, unless `sequence` is False: binary-only data), binary
    detection metrics (frame level, and video level when `video_ids`, the (N,) video of each
    record of the split, is given and eval.video_auc is on) and the localization of the MIL
    similarity map against the records' manipulation masks.
    `interrupt`: called after each batch; what it raises (faults.Preempted on SIGTERM) ends
    the pass, the input pipeline closed.
    """
    collected = collections.defaultdict(list)
    meter = LocalizationMeter()
    iterator = iter(dataset)
    try:
        for batch in iterator:
            device_batch = parallel.to_global(
                {k: batch[k] for k in ("image", "label", "is_fake", "valid", "mask", "index")},
                batch_sharding,
            )
            predictions = eval_step(variables, device_batch)
            # Everything but the images back on every host (gathered over processes).
            out = parallel.to_host(
                {**predictions, **{k: v for k, v in device_batch.items() if k != "image"}}
            )
            valid = out["valid"] > 0
            for key in ("probs", "fake_prob", "label", "is_fake", "index"):
                collected[key].append(np.asarray(out[key])[valid])
            meter.add_similarity(out["similarity_map"], out["mask"], out["valid"])
            if interrupt is not None:
                interrupt()
    finally:
        iterator.close()
    probs = np.concatenate(collected["probs"])
    fake_prob = np.concatenate(collected["fake_prob"])
    label = np.concatenate(collected["label"])
    is_fake = np.concatenate(collected["is_fake"])
    result = {"num_images": len(label)}
    if cfg.model.num_classes > 1 and sequence:
        result.update(
            metrics_lib.sequence_metrics(
                probs,
                label,
                threshold=cfg.eval.threshold,
                order=cfg.loss.rank_order,
                fake_prob=fake_prob,
                gate=cfg.eval.gate_by_fake_prob,
            )
        )
    class_score = probs.max(axis=1) if cfg.model.num_classes > 1 else probs[:, 0]
    if 0 < is_fake.sum() < len(is_fake):
        frame_videos = None
        if video_ids is not None and cfg.eval.video_auc:
            frame_videos = np.asarray(video_ids)[np.concatenate(collected["index"])]
        result.update(binary_metrics(class_score, is_fake, video_ids=frame_videos))
        result["mil_auc"] = metrics_lib.binary_auc(fake_prob, is_fake)
    localization = meter.result()
    if localization["num_localized"] > 0:
        result.update(localization)
    return {k: float(v) for k, v in result.items()}


# ----------------------------------------------------------------------------------------------
# Binary detection


def video_ids(source) -> np.ndarray | None:
    """(N,) video id of each record of a split (``sources.video_ids``), or None when no two
    records share a video (single images, e.g. Seq-DeepFake: no video-level metrics)."""
    from cmil_jax.data import sources  # pylint: disable=import-outside-toplevel

    ids = sources.video_ids(source)
    if len(ids) == 0 or len(np.unique(ids.astype(str))) == len(ids):
        return None
    return ids


def binary_metrics(scores, labels, video_ids: Sequence | None = None,
                   threshold: float = 0.5, prefix: str = "") -> dict[str, float]:
    """Frame-level AUC, EER, AP, accuracy, plus video-level AUC/EER/AP when video ids are given.

    Args:
      scores: (F,) fake scores (higher = fake; probabilities for ``acc``).
      labels: (F,) 0/1, 1 = fake.
      video_ids: optional (F,) video of each frame (labels must be constant per video).
      threshold: decision threshold of ``acc``.
      prefix: prepended to every key (e.g. 'mil_').
    Returns:
      dict with 'auc', 'eer', 'ap', 'acc' and, with video ids, 'video_auc', 'video_eer',
      'video_ap', 'num_videos'. NaN where a class is missing.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    out = {
        "auc": metrics_lib.binary_auc(scores, labels),
        "eer": metrics_lib.eer(scores, labels),
        "ap": metrics_lib.average_precision(scores, labels),
        "acc": metrics_lib.accuracy_at(scores, labels, threshold),
    }
    if video_ids is not None:
        _, v_scores, v_labels = metrics_lib.video_level_scores(scores, np.asarray(video_ids),
                                                               labels)
        out.update(
            video_auc=metrics_lib.binary_auc(v_scores, v_labels),
            video_eer=metrics_lib.eer(v_scores, v_labels),
            video_ap=metrics_lib.average_precision(v_scores, v_labels),
            num_videos=float(len(v_scores)),
        )
    return {prefix + k: float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Localization


def localization_metrics(similarity_map, masks, valid=None,
                         meter: LocalizationMeter | None = None) -> dict[str, float]:
    """Localization of the MIL similarity map a_i against manipulation masks.

    Args:
      similarity_map: (B, N) or (B, h, w) a_i (low = manipulated), as the eval step returns.
      masks: (B, H, W) uint8 0..255 ground truth (0 where genuine).
      valid: optional (B,) 0/1; 0 marks padding.
      meter: accumulate into this meter (one per evaluation pass) instead of a new one.
    Returns:
      the meter's result so far: 'pixel_auc', 'best_iou', 'best_iou_threshold',
      'pointing_game', 'num_localized'.
    """
    meter = meter if meter is not None else LocalizationMeter()
    meter.add_similarity(similarity_map, masks, valid)
    return meter.result()


# ----------------------------------------------------------------------------------------------
# Results table


def test_records(workdir: str) -> list[dict]:
    """The newest 'test' record of metrics.jsonl per (checkpoint, dataset), in first-seen order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; train or evaluate first")
    latest: dict[tuple, dict] = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("split") != "test":
                continue
            key = (record.get("checkpoint", ""), record.get("dataset", ""))
            latest.pop(key, None)  # re-insert so a re-run moves to its new position
            latest[key] = record
    return list(latest.values())


def _fmt(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, str):
        return value
    if key in COUNT_COLUMNS:
        return f"{value:g}" if key == "best_iou_threshold" else f"{int(value)}"
    return f"{100.0 * value:.2f}"


def results_table(rows: Iterable[dict], columns: Sequence[str] | None = None,
                  label_columns: Sequence[str] = ("checkpoint", "dataset", "step")) -> str:
    """A markdown table, one row per result dict.

    Rates are shown in percent with two decimals, counts as integers, missing values as '-'.
    Args:
      rows: dicts of metric name -> value (plus the label columns).
      columns: metric columns in order; default: those of ``COLUMNS`` present in any row, then
        'num_images'.
      label_columns: leading text columns, kept when present in any row.
    """
    rows = list(rows)
    labels = [c for c in label_columns if any(c in r for r in rows)]
    if columns is None:
        present = set().union(*(r.keys() for r in rows)) if rows else set()
        columns = [c for c in COLUMNS if c in present]
        if "num_images" in present:
            columns.append("num_images")
    header = labels + [LABELS.get(c, c) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r.get(c, "")) for c in labels] + [_fmt(c, r.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(workdir: str, rows: Iterable[dict] | None = None,
                  title: str = "Test results", filename: str = "results.md") -> str:
    """Writes the results table to <workdir>/<filename> and prints it; returns the path.

    rows: default ``test_records(workdir)``. Rates are in percent.
    """
    rows = test_records(workdir) if rows is None else list(rows)
    table = results_table(rows)
    text = (f"# {title}\n\n`{os.path.abspath(workdir)}`; rates in %, each row the best "
            f"checkpoint on val for the metric named in 'checkpoint'.\n\n{table}")
    path = os.path.join(workdir, filename)
    disk.write_atomic(path, text)
    print(table, end="", flush=True)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmil_jax.evaluation",
                                     description="Print and write <workdir>/results.md.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="training run whose metrics.jsonl holds test records")
    args = parser.parse_args(argv)
    try:
        path = write_results(args.workdir)
    except FileNotFoundError as e:
        print(f"error: {e}")
        return 2
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
