"""Videos: sampled frames, the video protocol's frame-to-video rules, and the pictures of a
video's prediction (the timeline figure and the overlay MP4).

The protocol is the config section ``video`` (``config_base.video_config``): how many frames
are sampled, which face of a frame is scored, how frame scores make the video score, what
happens to frames without a face, and the vote that gives the video's manipulation sequence.
Frames are sampled and decoded by ``data_prep.faces`` (the code that samples the training
frames of ``data_prep.videos``), so a video is read here as it is read for training.
Evaluation applies the same protocol to a built dataset's stored frames
(``select_stored_frames``, ``metrics.video_level_scores``; docs/evaluation.md).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import struct
from collections.abc import Sequence

import cv2
import numpy as np

from cmil_jax import disk
from cmil_jax import localization
from cmil_jax import metrics
from cmil_jax import viz
from data_prep import faces as frame_lib

# Files read as videos: data_prep.videos.VIDEO_EXTS and a few more containers OpenCV reads.
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
AGGREGATES = metrics.VIDEO_AGGREGATES


def is_video_file(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTS)


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def is_frame_folder(path: str) -> bool:
    """True when a folder holds the frames of one video: at least two image files
    (data_prep.faces.IMAGE_EXTS), no video file, and every image named by a number after one
    shared prefix ('000001.png', 'frame_0001.jpg')."""
    entries = [n for n in os.listdir(path) if not n.startswith(".")]
    if any(is_video_file(n) for n in entries):
        return False
    names = frame_lib.list_frame_files(path)
    if len(names) < 2:
        return False
    matches = [_NUMBERED.match(os.path.splitext(n)[0]) for n in names]
    return all(matches) and len({m.group(1) for m in matches}) == 1


# ----------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class Frames:
    """The sampled frames of one video file or frame folder.

    frames: [(frame index, RGB uint8 (H, W, 3))] in order; names: the frame file names of a
    folder (index -> name), else None; in_video: frames the file or folder holds (None when
    the container does not say); sampled: frames the protocol asked for; fps: the container's
    frame rate (None for folders or when unknown); unreadable: [{'name', 'reason'}] frame
    images of a folder that could not be decoded.
    """

    frames: list
    names: list | None
    in_video: int | None
    sampled: int
    fps: float | None
    unreadable: list

    @property
    def read(self) -> int:
        return len(self.frames)


def _probe(path: str) -> tuple[int, float | None]:
    """(frame count the container reports, 0 when unknown; frame rate or None)."""
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            return 0, None
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    finally:
        cap.release()
    return max(count, 0), (fps if np.isfinite(fps) and fps > 0 else None)


def read_frames(path: str, num: int, is_folder: bool = False) -> Frames:
    """``num`` evenly spaced frames of a video file or frame folder (data_prep.faces).

    Raises ValueError saying why when nothing could be decoded (unreadable, empty, truncated
    before its first sampled frame, a folder without a readable frame image). A video that
    stops decoding part way gives the frames read before that (``read < sampled``).
    """
    if is_folder:
        frames, bad, names = frame_lib.read_folder_frames(path, num)
        unreadable = [{"name": n, "reason": why} for n, why in bad]
        if not frames:
            raise ValueError(f"{len(bad)} unreadable frame images" if bad else
                             "no frame images (.jpg, .jpeg, .png)")
        return Frames(frames, names, len(names), len(frame_lib.sample_indices(len(names), num)),
                      None, unreadable)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError("empty file")
    count, fps = _probe(path)
    try:
        frames = frame_lib.read_video_frames(path, num)
    except ValueError as e:
        if missing_mp4_index(path):
            raise ValueError(f"{e}: an MP4/MOV file without its whole index (the 'moov' box is "
                             "missing or cut short); it was truncated, or its writer never "
                             "finished it") from e
        raise
    sampled = len(frame_lib.sample_indices(count, num)) if count else len(frames)
    return Frames(frames, None, count or None, sampled, fps, [])


def missing_mp4_index(path: str) -> bool:
    """True for an ISO media file (MP4, MOV, M4V, 3GP: an 'ftyp' box first) whose top-level
    boxes end without a whole 'moov' box, the index of its frames that writers add last."""
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            if f.read(8)[4:8] != b"ftyp":
                return False
            pos = 0
            while pos + 8 <= end:
                f.seek(pos)
                header = f.read(16)
                size, kind = struct.unpack(">I4s", header[:8])
                if size == 1 and len(header) == 16:  # 64-bit size
                    size = struct.unpack(">Q", header[8:16])[0]
                if kind == b"moov":
                    return size >= 8 and pos + size > end  # there, unless cut short
                if size < 8:  # 0: the box runs to the end of the file
                    break
                pos += size
            return True
    except OSError:
        return False


def select_stored_frames(video_ids, frame_index, num: int) -> np.ndarray:
    """The records a dataset of stored video frames is evaluated on: per video, ``num`` of its
    stored frames evenly spaced in frame order (``data_prep.faces.sample_indices``, the
    sampling of the build and of predict); all of them when it has ``num`` or fewer.

    Args:
      video_ids: (R,) the video of each record.
      frame_index: (R,) int, the frame's index in its video (ties keep record order).
      num: frames per video (``video.frames_per_video``).
    Returns:
      (K,) int64 record indices in ascending order (the same for the same records).
    """
    video_ids = np.asarray(video_ids)
    frame_index = np.asarray(frame_index, np.int64).reshape(-1)
    if video_ids.shape != frame_index.shape:
        raise ValueError(f"frame_index must have shape {video_ids.shape} like video_ids, "
                         f"got {frame_index.shape}")
    if num <= 0:
        raise ValueError(f"frames per video must be positive, got {num}")
    _, inverse = np.unique(video_ids.astype(str), return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.lexsort((np.arange(len(frame_index)), frame_index, inverse))  # video, frame
    counts = np.bincount(inverse)
    keep = []
    for group in np.split(order, np.cumsum(counts)[:-1]) if len(order) else []:
        keep.extend(group[frame_lib.sample_indices(len(group), num)])
    return np.sort(np.asarray(keep, np.int64))


# ----------------------------------------------------------------------------------------------
# Frame -> video


def aggregate(scores: Sequence[float], how: str = "mean") -> float | None:
    """The video score from its frame scores ('mean', 'max', 'median'; ``metrics.aggregate``,
    as evaluation's video-level metrics); None for no frame."""
    value = metrics.aggregate(scores, how)  # ValueError for an unknown aggregate
    return value if np.asarray(scores).size else None


def vote_sequence(sequences: Sequence[Sequence[str]], scores: Sequence[float],
                  threshold: float = 0.5) -> tuple[list[str], list[dict]]:
    """The video's manipulation sequence: the sequence predicted on the most frames among
    those whose score is >= threshold (all frames when none is, or threshold 0); a tie goes
    to the sequence whose voting frames have the higher mean score, then to the shorter one.

    Returns (sequence, votes) with votes [{'sequence', 'frames', 'mean_score'}], most voted
    first, counted over the voting frames.
    """
    scores = [float(s) for s in scores]
    voters = [i for i, s in enumerate(scores) if s >= threshold]
    if not voters:
        voters = list(range(len(scores)))
    groups: dict[tuple, list[float]] = collections.defaultdict(list)
    for i in voters:
        groups[tuple(sequences[i])].append(scores[i])
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), -float(np.mean(kv[1])),
                                                   len(kv[0]), kv[0]))
    votes = [{"sequence": list(seq), "frames": len(s), "mean_score": float(np.mean(s))}
             for seq, s in ranked]
    return (list(ranked[0][0]) if ranked else []), votes


# ----------------------------------------------------------------------------------------------
# Pictures


def paint_heat(frame: np.ndarray, heat: np.ndarray, box, alpha: float = 0.45) -> np.ndarray:
    """The frame with a map blended over ``box`` = [x0, y0, x1, y1] (the model's input region,
    which may reach past the frame), min-max normalised, jet colours."""
    out = np.array(frame, np.uint8, copy=True)
    h, w = out.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        return out
    heat = localization.normalize01(localization.upsample(heat, (y1 - y0, x1 - x0)))
    colour = viz.colorize(heat)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 <= sx0 or sy1 <= sy0:
        return out
    region = out[sy0:sy1, sx0:sx1].astype(np.float32)
    paint = colour[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0].astype(np.float32)
    out[sy0:sy1, sx0:sx1] = np.clip(np.rint((1 - alpha) * region + alpha * paint), 0, 255)
    return out


def annotate(frame: np.ndarray, text: str, box=None) -> np.ndarray:
    """The frame with a face rectangle and a line of text on a dark strip at the top."""
    out = np.array(frame, np.uint8, copy=True)
    scale = max(0.4, out.shape[1] / 900)
    if box is not None:
        x0, y0, x1, y1 = (int(v) for v in box)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), max(1, round(scale * 2)))
    strip = int(28 * scale) + 4
    out[:strip] = (out[:strip].astype(np.float32) * 0.35).astype(np.uint8)
    cv2.putText(out, text, (4, strip - 8), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                cv2.LINE_AA)
    return out


def write_overlay_video(path: str, frames: Sequence[np.ndarray], fps: float = 4.0,
                        max_width: int = 640) -> str:
    """Writes RGB frames as an MP4 (cv2.VideoWriter, 'mp4v'), scaled to at most ``max_width``
    wide and even sides. Raises OSError when OpenCV cannot write it."""
    if not frames:
        raise OSError(f"{path}: no frame to write")
    h, w = frames[0].shape[:2]
    scale = min(1.0, max_width / w)
    size = (max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2))
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), size)
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot write an MP4 video here (no 'mp4v' encoder)")
    try:
        for frame in frames:
            frame = cv2.resize(np.asarray(frame, np.uint8), size, interpolation=cv2.INTER_AREA)
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path


def plot_timeline(path: str, per_frame: Sequence[dict], score: float | None, sequence: list,
                  aggregate_name: str, suspicious: Sequence[dict], title: str,
                  fps: float | None = None) -> str:
    """The timeline figure of one video.

    Top: the fake probability of each sampled frame (dots; frames without a scored face as
    grey ticks at the bottom), the video score as a dashed line, 0.5 dotted. Below: the most
    suspicious frames, each as its input, 1 - similarity and Grad-CAM overlays.
    per_frame: dicts with 'index' and 'fake_prob' (None when not scored).
    suspicious: dicts with 'index', 'fake_prob', 'crop', 'dissimilarity', 'gradcam',
    'gradcam_class'.
    """
    plt = viz._pyplot()  # pylint: disable=protected-access
    cols = max(1, len(suspicious))
    width = max(6.0, 1.5 * cols)
    cell = width / cols  # the side of one map panel, in inches
    fig = plt.figure(figsize=(width, 2.4 + (3 * cell if suspicious else 0)), dpi=80,
                     layout="constrained")
    grid = fig.add_gridspec(1 + (3 if suspicious else 0), cols,
                            height_ratios=[2.4] + ([cell] * 3 if suspicious else []))
    ax = fig.add_subplot(grid[0, :])
    unit = (lambda i: i / fps) if fps else (lambda i: i)
    scored = [(unit(f["index"]), f["fake_prob"]) for f in per_frame if f["fake_prob"] is not None]
    missing = [unit(f["index"]) for f in per_frame if f["fake_prob"] is None]
    if scored:
        ax.plot(*zip(*scored), "-o", color="tab:red", ms=3, lw=1, label="frame fake_prob")
    if missing:
        ax.plot(missing, [0.0] * len(missing), "|", color="grey", ms=10, label="no face")
    if score is not None:
        ax.axhline(score, color="black", ls="--", lw=1, label=f"video ({aggregate_name}) "
                   f"{score:.2f}")
    ax.axhline(0.5, color="grey", ls=":", lw=0.8)
    for f in suspicious:
        ax.plot([unit(f["index"])], [f["fake_prob"]], "o", mfc="none", mec="black", ms=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("time (s)" if fps else "frame")
    ax.set_ylabel("fake probability")
    seq = " > ".join(sequence) if sequence else "none (original)"
    ax.set_title(f"{title}\nvideo score {'-' if score is None else f'{score:.2f}'}; "
                 f"sequence: {seq}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    for c, f in enumerate(suspicious):
        panels = [(f["crop"], f"frame {f['index']}  p={f['fake_prob']:.2f}"),
                  (viz.overlay(f["crop"], f["dissimilarity"]), "1 - similarity"),
                  (viz.overlay(f["crop"], f["gradcam"]), f"Grad-CAM {f['gradcam_class']}")]
        for r, (img, label) in enumerate(panels):
            a = fig.add_subplot(grid[1 + r, c])
            a.imshow(img)
            a.set_title(label, fontsize=7)
            a.axis("off")
    try:
        disk.save_figure(fig, path)  # whole or not at all
    finally:
        plt.close(fig)
    return path
