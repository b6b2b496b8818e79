"""The evaluation suite: one pass of a model over a split (``evaluate``) under the video
protocol (``prepare_split``), binary detection metrics, localization metrics and the results
table.

Binary detection follows the metric set DeepfakeBench standardised: frame-level ROC AUC,
EER, average precision and accuracy at 0.5, and video-level AUC / EER / AP, computed from two
scores, each reported under its own name (docs/evaluation.md, "Binary detection"):

- the MIL fake probability p(x), the headline: ``auc``, ``eer``, ``ap``, ``acc``,
  ``video_auc``, ``video_eer``, ``video_ap`` (``mil_auc`` repeats ``auc``);
- the class heads' score max_k p_k (p_1 with one class): the same names prefixed ``class_``.

The video protocol (config section ``video``) decides which stored frames of each video are
evaluated (``video.frames_per_video``, ``video.select_stored_frames``) and how frame scores
make a video score (``video.aggregate``, ``metrics.video_level_scores``); videos are told apart
by the records' ``video_id``. The face of each frame and the frames without a face were fixed
when the dataset was built (data_prep); the build report's figures go into the metrics.

Localization (``localization_metrics``, ``LocalizationMeter``): pixel AUC, best-threshold IoU
and the pointing game of the MIL similarity map against the ground-truth masks (see
``cmil_jax.localization``).

Results table: every 'test' record of ``<workdir>/metrics.jsonl`` (one per best checkpoint,
test set and video protocol) as a markdown table, with the protocols spelled out below it,
printed and written to ``<workdir>/results.md``::

    python -m cmil_jax.evaluation --workdir runs/demo
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from cmil_jax import config_base
from cmil_jax import disk
from cmil_jax import metrics as metrics_lib
from cmil_jax import parallel
from cmil_jax.localization import LocalizationMeter

__all__ = [
    "EvalSplit",
    "LocalizationMeter",
    "binary_metrics",
    "evaluate",
    "localization_metrics",
    "prepare_split",
    "results_table",
    "test_records",
    "video_ids",
    "write_results",
]

# Column order of the results table (frame-level and video-level side by side, each score
# named by its source); other keys are kept in metrics.jsonl only.
COLUMNS = (
    "fixed_acc", "adaptive_acc", "exact_match", "map", "f1", "order_acc",
    "auc", "video_auc", "eer", "ap", "acc", "class_auc", "class_video_auc",
    "pixel_auc", "best_iou", "pointing_game",
)
# Values shown as plain numbers, not as percentages.
COUNT_COLUMNS = ("num_images", "num_videos", "num_localized", "best_iou_threshold", "step")
LABELS = {
    "fixed_acc": "Fixed-Acc", "adaptive_acc": "Adaptive-Acc", "exact_match": "exact match",
    "map": "mAP", "f1": "F1", "order_acc": "order acc",
    "auc": "AUC p(x)", "video_auc": "video AUC p(x)", "eer": "EER p(x)", "ap": "AP p(x)",
    "acc": "Acc p(x)", "class_auc": "AUC class heads", "class_video_auc": "video AUC class heads",
    "pixel_auc": "pixel AUC", "best_iou": "best IoU", "pointing_game": "pointing game",
    "num_images": "images",
}
# Record keys that describe how a video split was evaluated (numbers, in the metrics; the
# results spell them out under the table).
PROTOCOL_KEYS = (
    "frames_per_video",  # video.frames_per_video applied
    "frames_not_sampled",  # stored frames left out because their video had more
    "build_frames_per_video",  # frames the build sampled per video (prep_report.json)
    "build_frames_without_face",  # sampled frames the build left out: no face found
    "build_videos_without_face",  # videos the build left out: no face in any sampled frame
    "build_videos_skipped",  # videos the build left out for any reason (prep_skipped.tsv)
)
# Binary keys that old records (before p(x) became the headline) computed from the class heads.
_CLASS_HEAD_KEYS = ("auc", "eer", "ap", "acc", "video_auc", "video_eer", "video_ap")


# ----------------------------------------------------------------------------------------------
# The video protocol on a built split


class RecordSubset:
    """Records ``indices`` of a random-access source, in that order (``len``, ``[i]``,
    ``raw(i)``); picklable, so grain workers can read it."""

    def __init__(self, source, indices):
        self.source = source
        self.indices = np.asarray(indices, np.int64)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]

    def raw(self, i):
        return self.source.raw(int(self.indices[i]))

    def __repr__(self):
        return f"{self.source!r} ({len(self.indices)} records by the video protocol)"


@dataclasses.dataclass(frozen=True)
class EvalSplit:
    """A val or test split as evaluation reads it.

    source: the records evaluated, in record order (a ``RecordSubset`` when some videos hold
      more stored frames than video.frames_per_video).
    video_ids: (len(source),) the video of each evaluated record; None for single images.
    counts: ``PROTOCOL_KEYS`` values, added to the split's metrics ({} for single images).
    label: the protocol's name in test records and results ('32_frames_mean'); '' for
      single images.
    """

    source: object
    video_ids: np.ndarray | None = None
    counts: dict = dataclasses.field(default_factory=dict)
    label: str = ""


def video_protocol(cfg):
    """The config's video section (configs without one: the defaults)."""
    protocol = config_base.video_config()
    if cfg.get("video") is not None:
        protocol.update(cfg.video.to_dict())
    return protocol


def protocol_label(frames_per_video: int, aggregate: str) -> str:
    """'32_frames_mean': the name of what evaluation applies of the video protocol."""
    return f"{int(frames_per_video)}_frames_{aggregate}"


_LABEL = re.compile(r"^(\d+)_frames_(\w+)$")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def prepare_split(cfg, source, warn=_warn) -> EvalSplit:
    """The split `source` under the video protocol of `cfg` (config section video).

    Records sharing a ``video_id`` are frames of one video: at most video.frames_per_video of
    each video's stored frames are kept, evenly spaced in frame order
    (``video.select_stored_frames``). A split of single images is used whole. video.face and
    video.no_face cannot change stored frames: the build kept the largest face of each frame
    and left out frames without one; `warn` is told when the config asks otherwise.
    """
    from cmil_jax import video as video_lib  # pylint: disable=import-outside-toplevel

    ids, frames = _video_fields(source)
    if ids is None:
        return EvalSplit(source)
    protocol = video_protocol(cfg)
    keep = video_lib.select_stored_frames(ids, frames, protocol.frames_per_video)
    counts = {"frames_per_video": float(protocol.frames_per_video),
              "frames_not_sampled": float(len(ids) - len(keep)),
              **_build_counts(source, warn)}
    if protocol.face != "largest" or protocol.no_face != "skip":
        warn(f"{source!r}: video.face={protocol.face!r}, video.no_face={protocol.no_face!r} "
             "apply to predict only; the dataset's records are the largest face of each frame, "
             "frames without a face left out when it was built")
    view = source if len(keep) == len(ids) else RecordSubset(source, keep)
    return EvalSplit(view, ids[keep], counts,
                     protocol_label(protocol.frames_per_video, protocol.aggregate))


def _video_fields(source) -> tuple[np.ndarray | None, np.ndarray | None]:
    """((N,) video ids, (N,) frame indices) of a split's records, read without decoding images;
    (None, None) when no two records share a video."""
    from cmil_jax.data import sources  # pylint: disable=import-outside-toplevel

    ids, frames = [], []
    for i in range(len(source)):
        rec = source.raw(i)
        extra = sources.extra_fields(rec)
        path = rec.get("path", b"")
        ids.append(extra.get("video_id") or (path.decode("utf-8", "replace")
                                             if isinstance(path, bytes) else str(path)))
        frames.append(int(extra.get("frame_index", 0)))
    ids = np.array(ids, dtype=object)
    if len(ids) == 0 or len(np.unique(ids.astype(str))) == len(ids):
        return None, None
    return ids, np.array(frames, np.int64)


def _build_counts(source, warn) -> dict[str, float]:
    """What the build fixed for this split (``PROTOCOL_KEYS`` 'build_*'), from the
    prep_report.json beside the dataset's version directory; {} when there is none."""
    version_dir = getattr(source, "version_dir", None)
    split = getattr(source, "split", None)
    if not version_dir or not split:
        return {}
    path = os.path.join(os.path.dirname(os.path.normpath(version_dir)), "prep_report.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        out = {"build_frames_per_video": float(report["frames_per_video"])}
        out["build_frames_without_face"] = float(
            report.get("notes", {}).get(f"{split}: frames without a face", 0))
        out["build_videos_without_face"] = float(
            report.get("skipped_by_reason", {}).get(split, {}).get("no detectable face", 0))
        out["build_videos_skipped"] = float(report.get("skipped", {}).get(split, 0))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warn(f"{path}: cannot read the build report ({type(e).__name__}: {e}); expected the "
             "JSON data_prep writes, with 'frames_per_video', 'notes', 'skipped_by_reason' and "
             "'skipped'. The results will not say what the build left out.")
        return {}


# ----------------------------------------------------------------------------------------------
# One pass over a split


def evaluate(eval_step, variables, dataset, batch_sharding, cfg, video_ids=None,
             sequence: bool = True, interrupt=None, split: EvalSplit | None = None) -> dict:
    """Runs `eval_step` (train.make_eval_step) over a finite dataset and returns the metrics of
    method.md, "Decoding and metrics".

    Sequence metrics (multi-class heads, unless `sequence` is False: binary-only data), binary
    detection metrics of p(x) (the headline) and of the class heads (``class_*``), at frame
    level and, when the records are video frames and eval.video_auc is on, at video level (the
    video.aggregate of each video's frame scores), and the localization of the MIL similarity
    map against the records' manipulation masks.
    `dataset`: the batches of `split.source` (``prepare_split``), or of a split whose (N,)
    record videos are `video_ids`. `interrupt`: called after each batch; what it raises
    (faults.Preempted on SIGTERM) ends the pass, the input pipeline closed.
    """
    if split is not None:
        video_ids = split.video_ids
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
    if 0 < is_fake.sum() < len(is_fake):
        frame_videos = None
        if video_ids is not None and cfg.eval.video_auc:
            frame_videos = np.asarray(video_ids)[np.concatenate(collected["index"])]
        how = video_protocol(cfg).aggregate
        result.update(binary_metrics(fake_prob, is_fake, video_ids=frame_videos, aggregate=how))
        result["mil_auc"] = result["auc"]
        heads = binary_metrics(metrics_lib.class_head_score(probs), is_fake,
                               video_ids=frame_videos, aggregate=how, prefix="class_")
        heads.pop("class_num_videos", None)
        result.update(heads)
    if split is not None:
        result.update(split.counts)
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
                   threshold: float = 0.5, prefix: str = "",
                   aggregate: str = "mean") -> dict[str, float]:
    """Frame-level AUC, EER, AP, accuracy, plus video-level AUC/EER/AP when video ids are given.

    Args:
      scores: (F,) fake scores (higher = fake; probabilities for ``acc``).
      labels: (F,) 0/1, 1 = fake.
      video_ids: optional (F,) video of each frame (labels must be constant per video).
      threshold: decision threshold of ``acc``.
      prefix: prepended to every key (e.g. 'class_').
      aggregate: frame scores -> video score: 'mean', 'max' or 'median'.
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
                                                               labels, how=aggregate)
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
    """The newest 'test' record of metrics.jsonl per (checkpoint, dataset, video protocol), in
    first-seen order, in today's metric names (``current_names``)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; train or evaluate first")
    latest: dict[tuple, dict] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number}: not a JSON record ({e.msg}); "
                                 "expected one JSON object per line") from e
            if not isinstance(record, dict) or record.get("split") != "test":
                continue
            key = (record.get("checkpoint", ""), record.get("dataset", ""),
                   record.get("video_protocol", ""))
            latest.pop(key, None)  # re-insert so a re-run moves to its new position
            latest[key] = current_names(record)
    return list(latest.values())


def current_names(record: dict) -> dict:
    """A test record in today's names. Records written before p(x) became the headline (they
    hold `mil_auc` but no `class_auc`) computed `auc`, `eer`, `ap`, `acc` and `video_*` from the
    class heads: those move to `class_*`, `auc` becomes their `mil_auc` (p(x)), and the record
    gets `recorded_before_headline_change` = True. Other records are returned as they are."""
    if "mil_auc" not in record or "class_auc" in record:
        return record
    out = {k: v for k, v in record.items() if k not in _CLASS_HEAD_KEYS}
    out.update({f"class_{k}": record[k] for k in _CLASS_HEAD_KEYS if k in record})
    out["auc"] = record["mil_auc"]
    out["recorded_before_headline_change"] = True
    return out


def _fmt(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, str):
        return value
    if key in COUNT_COLUMNS:
        return f"{value:g}" if key == "best_iou_threshold" else f"{int(value)}"
    return f"{100.0 * value:.2f}"


def results_table(rows: Iterable[dict], columns: Sequence[str] | None = None,
                  label_columns: Sequence[str] = ("checkpoint", "dataset", "video_protocol",
                                                  "step")) -> str:
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
    header = [c.replace("_", " ") for c in labels] + [LABELS.get(c, c) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r.get(c, "")) for c in labels] + [_fmt(c, r.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _count(value) -> str:
    return f"{int(value):,}"


def protocol_notes(rows: Iterable[dict]) -> list[str]:
    """One line per (dataset, video protocol) of the rows: what evaluation applied and what
    the build fixed, in words."""
    notes, seen = [], set()
    for r in rows:
        label = r.get("video_protocol")
        key = (r.get("dataset", ""), label)
        if not label or key in seen:
            continue
        seen.add(key)
        match = _LABEL.match(str(label))
        n, how = (match.group(1), match.group(2)) if match else ("?", str(label))
        text = (f"`{label}`{' on ' + r['dataset'] if r.get('dataset') else ''}: at most {n} "
                "stored frames per video, evenly spaced in frame order; frame-level figures "
                f"over those frames, a video's score the {how} of its frame scores")
        if r.get("num_videos") is not None:
            text += f"; {_count(r['num_videos'])} videos"
        if r.get("num_images") is not None:
            text += f", {_count(r['num_images'])} frames"
        if r.get("frames_not_sampled"):
            text += f" ({_count(r['frames_not_sampled'])} stored frames not sampled)"
        if r.get("build_frames_per_video") is not None:
            text += (f". Fixed when the dataset was built (prep_report.json): "
                     f"{_count(r['build_frames_per_video'])} frames sampled per video, the "
                     "largest face of each frame; left out: sampled frames without a face "
                     f"{_count(r.get('build_frames_without_face') or 0)}, videos without a face "
                     f"in any sampled frame {_count(r.get('build_videos_without_face') or 0)}, "
                     f"videos for any reason {_count(r.get('build_videos_skipped') or 0)} "
                     "(listed in prep_skipped.tsv)")
        else:
            text += (". Fixed when the dataset was built: the largest face of each frame, "
                     "frames without a face left out (no build report found to count them)")
        notes.append(text + ".")
    return notes


def write_results(workdir: str, rows: Iterable[dict] | None = None,
                  title: str = "Test results", filename: str = "results.md") -> str:
    """Writes the results table to <workdir>/<filename> and prints it; returns the path.

    rows: default ``test_records(workdir)``. Rates are in percent. Below the table: which
    score each binary column comes from, the video protocol of each video dataset, and a note
    on rows recorded before p(x) became the headline.
    """
    rows = test_records(workdir) if rows is None else [current_names(r) for r in rows]
    table = results_table(rows)
    text = (f"# {title}\n\n`{os.path.abspath(workdir)}`; rates in %, each row the best "
            f"checkpoint on val for the metric named in 'checkpoint'.\n\n{table}")
    binary = any(k in r for r in rows for k in ("auc", "class_auc"))
    if binary:
        text += ("\nBinary scores: **p(x)**, the MIL fake probability, is the headline "
                 "(`auc`, `video_auc`, `eer`, `ap`, `acc` in metrics.jsonl); **class heads** is "
                 "max_k p_k (p_1 with one class), beside it (`class_*`). AUC is per frame (per "
                 "image), video AUC per video (docs/evaluation.md, \"Binary detection\").\n")
    notes = protocol_notes(rows)
    if notes:
        text += "\nVideo protocol:\n\n" + "".join(f"- {n}\n" for n in notes)
    old = sum(bool(r.get("recorded_before_headline_change")) for r in rows)
    if old:
        text += (f"\n{old} row(s) were recorded before p(x) became the headline: their "
                 "class-head figures are shown as class heads, their AUC p(x) is the "
                 "`mil_auc` they recorded, and p(x)'s other figures were not recorded ('-').\n")
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
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
