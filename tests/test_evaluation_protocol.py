"""Binary headline score and the video protocol in evaluation: p(x) is what `auc` reads, the
class heads are reported beside it, stored frames are sampled and aggregated per video as the
config's video section says, and results.md names the protocol (no training)."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmil_jax import config_base
from cmil_jax import evaluation
from cmil_jax import metrics
from cmil_jax import parallel
from cmil_jax import video


def _pairwise_auc(scores, labels):
    """AUC as the share of (fake, real) pairs ranked right, ties counting one half."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def _batches(is_fake, batch_size=4, size=8):
    """Evaluation batches of len(is_fake) records (images unused by the stand-in step), the
    last one padded as the eval pipeline pads it."""
    n = len(is_fake)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = idx < n
        yield {
            "image": np.zeros((batch_size, size, size, 3), np.uint8),
            "label": np.zeros((batch_size, 5), np.int32),
            "is_fake": np.where(valid, np.asarray(is_fake)[np.minimum(idx, n - 1)], 0),
            "valid": valid.astype(np.float32),
            "mask": np.zeros((batch_size, size, size), np.uint8),
            "index": np.where(valid, idx, -1).astype(np.int32),
        }


def _stand_in_step(probs, fake_prob):
    """An eval step that returns fixed per-record outputs, looked up by the batch's 'index'."""
    probs, fake_prob = jnp.asarray(probs, jnp.float32), jnp.asarray(fake_prob, jnp.float32)

    def step(variables, batch):
        del variables
        i = jnp.clip(batch["index"], 0, probs.shape[0] - 1)
        return {"probs": probs[i], "fake_prob": fake_prob[i],
                "similarity_map": jnp.ones((i.shape[0], 4), jnp.float32)}

    return step


def _sharding():
    return parallel.batch_sharding(parallel.make_mesh(jax.devices()[:1]))


def test_headline_reads_p_x_not_the_class_heads_on_binary_only_data():
    # A joint run's sequence model on its binary-only dataset: 4 videos of 3 frames. p(x)
    # ranks the fakes mostly above the reals; the class heads, which never saw such data,
    # call the fakes genuine (low max_k p_k).
    cfg = config_base.seq_config("facial_components", "demo")
    cfg.data.joint_name = "cmil_synthetic/facial_attributes"
    is_fake = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1])
    vids = np.repeat(["real/a", "fake/b", "real/c", "fake/d"], 3).astype(object)
    fake_prob = np.array([.1, .7, .2, .8, .6, .9, .3, .4, .2, .5, .75, .65])
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.0, 0.3, (12, 5))
    probs[is_fake == 0, 2] = [.9, .8, .7, .95, .6, .85]  # the heads' score: max over classes
    split = evaluation.EvalSplit(source=None, video_ids=vids, counts={"frames_per_video": 32.0},
                                 label="32_frames_mean")
    result = evaluation.evaluate(_stand_in_step(probs, fake_prob), {}, _batches(is_fake),
                                 _sharding(), cfg, sequence=False, split=split)

    class_score = probs.max(axis=1)
    assert result["auc"] == pytest.approx(_pairwise_auc(fake_prob, is_fake))
    assert result["class_auc"] == pytest.approx(_pairwise_auc(class_score, is_fake))
    assert result["auc"] > 0.8 and result["class_auc"] < 0.2  # the two scores disagree
    assert result["auc"] != result["class_auc"] and result["mil_auc"] == result["auc"]
    video_means = [np.mean(fake_prob[vids == v]) for v in ("real/a", "fake/b", "real/c", "fake/d")]
    assert result["video_auc"] == pytest.approx(_pairwise_auc(video_means, [0, 1, 0, 1]))
    assert result["acc"] == pytest.approx(np.mean((fake_prob > 0.5) == is_fake))
    assert result["num_videos"] == 4 and result["frames_per_video"] == 32
    assert "fixed_acc" not in result and "class_num_videos" not in result

    # The aggregate of the protocol makes the video score: max over each video's frames.
    cfg.video.aggregate = "max"
    result = evaluation.evaluate(_stand_in_step(probs, fake_prob), {}, _batches(is_fake),
                                 _sharding(), cfg, sequence=False, split=split)
    video_max = [max(fake_prob[vids == v]) for v in ("real/a", "fake/b", "real/c", "fake/d")]
    assert result["video_auc"] == pytest.approx(_pairwise_auc(video_max, [0, 1, 0, 1]))


def test_video_level_scores_aggregates():
    scores = [0.2, 0.9, 0.4, 0.1, 0.6, 0.3]
    vids = ["b", "a", "b", "b", "a", "c"]
    for how, reduce in (("mean", np.mean), ("max", max), ("median", np.median)):
        ids, got = metrics.video_level_scores(scores, vids, how=how)
        expected = [reduce([s for s, v in zip(scores, vids) if v == i]) for i in ("a", "b", "c")]
        assert list(ids) == ["a", "b", "c"]
        np.testing.assert_allclose(got, expected)
    with pytest.raises(ValueError, match="aggregate"):
        metrics.video_level_scores(scores, vids, how="mode")
    assert video.aggregate([0.2, 0.9, 0.4], "median") == 0.4 and video.aggregate([]) is None


def test_stored_frames_are_sampled_evenly_per_video():
    # Video 'x' stored 10 frames (indices 0, 3, ..., 27), written out of order; 'y' 3 frames.
    x_frames = [27, 0, 9, 3, 18, 6, 12, 24, 15, 21]
    vids = ["x"] * 10 + ["y"] * 3
    frames = x_frames + [5, 1, 3]
    keep = video.select_stored_frames(vids, frames, 4)
    # 4 of 10 in frame order: positions round(linspace(0, 9, 4)) of the sorted frames.
    positions = [round(p) for p in np.linspace(0, 9, 4)]
    wanted = [sorted(x_frames)[p] for p in positions]
    assert sorted(frames[i] for i in keep if vids[i] == "x") == wanted
    assert sorted(i for i in keep if vids[i] == "y") == [10, 11, 12]  # fewer than 4: all
    assert list(keep) == sorted(keep)
    np.testing.assert_array_equal(video.select_stored_frames(vids, frames, 4), keep)
    with pytest.raises(ValueError, match="frame_index"):
        video.select_stored_frames(vids, frames[:-1], 4)


class _Split:
    """A built split of video frames as sources.RecordSource shows it (raw records)."""

    def __init__(self, records, version_dir="", split="test"):
        self.records = records
        self.version_dir = version_dir
        self.split = split

    def __len__(self):
        return len(self.records)

    def raw(self, i):
        return self.records[i]

    def __getitem__(self, i):
        return {"index": i}


def test_prepare_split_applies_the_protocol_and_reads_the_build_report(tmp_path):
    version_dir = tmp_path / "ffpp" / "c23" / "1.0.0"
    version_dir.mkdir(parents=True)
    (tmp_path / "ffpp" / "c23" / "prep_report.json").write_text(json.dumps({
        "frames_per_video": 32, "notes": {"test: frames without a face": 7},
        "skipped": {"test": 3}, "skipped_by_reason": {"test": {"no detectable face": 2}}}))
    records = [{"video_id": f"v{v}".encode(), "frame_index": np.int32(f), "path": b"p"}
               for v in range(3) for f in range(6 if v else 2)]
    cfg = config_base.base_config()
    cfg.video.frames_per_video = 3
    warnings = []
    split = evaluation.prepare_split(cfg, _Split(records, str(version_dir)), warn=warnings.append)
    assert len(split.source) == 3 + 3 + 2 and list(split.video_ids).count("v0") == 2
    # v0 keeps both frames; v1 and v2 (records 2-7, 8-13) the positions round(linspace(0, 5, 3))
    # = 0, 2, 5 (2.5 rounds to even) of their six.
    assert [split.source[i]["index"] for i in range(len(split.source))] == [0, 1, 2, 4, 7, 8, 10,
                                                                            13]
    assert split.label == "3_frames_mean" and not warnings
    assert split.counts == {"frames_per_video": 3.0, "frames_not_sampled": 6.0,
                            "build_frames_per_video": 32.0, "build_frames_without_face": 7.0,
                            "build_videos_without_face": 2.0, "build_videos_skipped": 3.0}
    # What the build fixed cannot change here: said, not silently ignored.
    cfg.video.face = "max"
    evaluation.prepare_split(cfg, _Split(records), warn=warnings.append)
    assert len(warnings) == 1 and "largest face" in warnings[0]
    # Single images: used whole, no protocol.
    images = _Split([{"path": f"img/{i}.png".encode()} for i in range(4)])
    single = evaluation.prepare_split(cfg, images)
    assert single.source is images and single.video_ids is None and single.label == ""


def test_results_name_the_score_and_the_protocol(tmp_path):
    base = {"split": "test", "step": 40, "checkpoint": "best_auc", "dataset": "ffpp/c23"}
    records = [
        {**base, "video_protocol": "32_frames_mean", "auc": 0.91, "video_auc": 0.95,
         "class_auc": 0.52, "class_video_auc": 0.5, "mil_auc": 0.91, "num_images": 640.0,
         "num_videos": 20.0, "frames_per_video": 32.0, "frames_not_sampled": 0.0,
         "build_frames_per_video": 32.0, "build_frames_without_face": 5.0,
         "build_videos_without_face": 1.0, "build_videos_skipped": 1.0},
        # Written before p(x) became the headline: 'auc' was the class heads'.
        {**base, "dataset": "celebdf/v2", "auc": 0.61, "eer": 0.4, "video_auc": 0.63,
         "mil_auc": 0.88, "num_images": 100.0},
    ]
    os.makedirs(tmp_path, exist_ok=True)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    rows = evaluation.test_records(str(tmp_path))
    assert rows[1]["auc"] == 0.88 and rows[1]["class_auc"] == 0.61
    assert rows[1]["class_video_auc"] == 0.63 and "video_auc" not in rows[1]
    text = open(evaluation.write_results(str(tmp_path))).read()
    lines = text.split("\n")
    header = next(line for line in lines if line.startswith("| checkpoint"))
    assert header == ("| checkpoint | dataset | video protocol | step | AUC p(x) | "
                      "video AUC p(x) | AUC class heads | video AUC class heads | images |")
    assert "| best_auc | ffpp/c23 | 32_frames_mean | 40 | 91.00 | 95.00 | 52.00 | 50.00 | 640 |" \
        in lines
    assert "| best_auc | celebdf/v2 |  | 40 | 88.00 | - | 61.00 | 63.00 | 100 |" in lines
    assert rows[1]["class_eer"] == 0.4 and "eer" not in rows[1]  # moved, not lost
    protocol = next(line for line in lines if line.startswith("- `32_frames_mean` on ffpp/c23"))
    assert "at most 32 stored frames per video" in protocol and "the mean of its" in protocol
    assert "sampled frames without a face 5, videos without a face in any sampled frame 1" \
        in protocol and "20 videos, 640 frames" in protocol
    assert "1 row(s) were recorded before p(x) became the headline" in text
