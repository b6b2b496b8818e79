"""predict on videos: a clip of a synthetic face moving over a grey background, with a stretch
of frames without a face, a folder of its frames, a truncated clip, corrupt and empty files;
faces found by a detector that looks for what differs from the background."""

import collections
import json
import os
import shutil

import cv2
import jax
import numpy as np
import pytest

from cmil_jax import checkpoint
from cmil_jax import config_base
from cmil_jax import predict
from cmil_jax import video as video_lib
from cmil_jax.data import synthetic
from data_prep import landmarks as face_lib
from run_dirs import random_init_run

SIZE = 64
W, H, FACE = 160, 120, 64
NUM_FRAMES, FPS = 24, 10.0
BLANK = range(12, 18)  # frames without a face
BACKGROUND = 90


def face_box(i):
    """Where frame i's face is: [x0, y0, x1, y1], end-exclusive."""
    x0 = 10 + 3 * i
    return [x0, 24, x0 + FACE, 24 + FACE]


def frame(i, face):
    canvas = np.full((H, W, 3), BACKGROUND, np.uint8)
    if i not in BLANK:
        x0, y0, x1, y1 = face_box(i)
        canvas[y0:y1, x0:x1] = face
    return canvas


def background_detector(image):
    """The box of the pixels that differ clearly from the grey background ([] when none)."""
    diff = np.abs(image.astype(np.int16) - BACKGROUND).max(axis=-1) > 40
    ys, xs = np.nonzero(diff)
    if len(xs) < 50:
        return []
    return [face_lib.Face(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32))]


def silent(*_):
    pass


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory: config.json and a best checkpoint of a random-init tiny model."""
    return random_init_run(str(tmp_path_factory.mktemp("run")), SIZE)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    face = synthetic.generate_example("facial_attributes", 7, image_size=FACE)["image"]
    writer = cv2.VideoWriter(str(d / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (W, H))
    assert writer.isOpened()
    (d / "frames").mkdir()
    for i in range(NUM_FRAMES):
        bgr = cv2.cvtColor(frame(i, face), cv2.COLOR_RGB2BGR)
        writer.write(bgr)
        if i % 3 == 0:
            cv2.imwrite(str(d / "frames" / f"frame_{i:04d}.png"), bgr)
    writer.release()
    (d / "frames" / "frame_0099.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    # MJPG in AVI decodes up to where the file stops: cut in half, the back half is lost.
    writer = cv2.VideoWriter(str(d / "long.avi"), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    for i in range(60):
        writer.write(cv2.cvtColor(frame(i % NUM_FRAMES, face), cv2.COLOR_RGB2BGR))
    writer.release()
    data = (d / "long.avi").read_bytes()
    (d / "cut.avi").write_bytes(data[:len(data) // 2])
    (d / "long.avi").unlink()
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 50)
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    cv2.imwrite(str(d / "photo.png"), cv2.cvtColor(frame(0, face), cv2.COLOR_RGB2BGR))
    return d


def expected_indices(count, num):
    """Evenly spaced frame indices (both ends included), all frames when there are fewer."""
    if num >= count:
        return list(range(count))
    return sorted({int(np.floor(k * (count - 1) / (num - 1) + 0.5)) for k in range(num)})


def test_videos_folders_and_bad_files_in_one_call(workdir, clips, tmp_path):
    out = tmp_path / "out"
    names = ["clip.mp4", "frames", "cut.avi", "corrupt.mp4", "empty.mp4", "notes.txt",
             "photo.png"]
    summary = predict.predict_files([str(clips / n) for n in names], workdir, str(out),
                                    detector=background_detector, batch_size=4,
                                    video={"frames_per_video": 8}, overlay_video=True,
                                    log=silent)
    skipped = {os.path.basename(s["path"]): s["reason"] for s in summary["skipped"]}
    assert set(skipped) == {"corrupt.mp4", "empty.mp4", "notes.txt"}
    assert "cannot open it as a video" in skipped["corrupt.mp4"]
    assert skipped["empty.mp4"] == "empty file"
    assert "not a decodable image" in skipped["notes.txt"]
    written = {os.path.basename(r.get("video", r.get("image", ""))): r
               for r in summary["written"]}
    assert set(written) == {"clip.mp4", "frames", "cut.avi", "photo.png"}
    assert summary["counts"]["videos"] == 3 and summary["counts"]["images"] == 1
    assert summary["counts"]["partial_videos"] == 2  # cut.avi, and the folder's broken frame
    assert summary["timing"]["frames_per_sec"] > 0

    clip = json.loads((out / "clip.json").read_text())
    assert clip["kind"] == "video" and clip["schema_version"] == predict.SCHEMA_VERSION
    assert clip["protocol"] == {**config_base.video_config().to_dict(), "frames_per_video": 8}
    indices = expected_indices(NUM_FRAMES, 8)
    frames = clip["per_frame"]
    assert [f["index"] for f in frames] == indices
    assert [f["time_s"] for f in frames] == pytest.approx([i / FPS for i in indices])
    blank = [i for i in indices if i in BLANK]
    assert blank, "the sample must include frames without a face"
    assert clip["frames"] == {"in_video": NUM_FRAMES, "sampled": 8, "read": 8,
                              "with_face": 8 - len(blank), "without_face": len(blank),
                              "scored": 8 - len(blank), "unreadable": []}
    assert clip["complete"] is True and clip["fps"] == pytest.approx(FPS)
    for f in frames:
        if f["index"] in BLANK:  # video.no_face = 'skip'
            assert f["scored"] is False and f["fake_prob"] is None and f["faces"] == 0
            continue
        assert f["scored"] and f["faces"] == 1 and f["face"]["aligned"]
        assert np.allclose(f["face"]["face_box"], face_box(f["index"]), atol=3)
        assert 0 <= f["fake_prob"] <= 1 and set(f["class_probs"]) == set(clip["class_probs"])
    scores = [f["fake_prob"] for f in frames if f["scored"]]
    assert clip["fake_prob"] == pytest.approx(np.mean(scores))
    assert clip["class_score"] == pytest.approx(
        np.mean([max(f["class_probs"].values()) for f in frames if f["scored"]]))
    # The sequence is the one most voting frames (fake_prob >= 0.5, else all) predicted.
    voters = [f for f in frames if f["scored"] and f["fake_prob"] >= 0.5] or \
        [f for f in frames if f["scored"]]
    counts = collections.Counter(tuple(f["sequence"]) for f in voters)
    top = max(counts.values())
    assert tuple(clip["sequence"]) in {s for s, c in counts.items() if c == top}
    assert sum(v["frames"] for v in clip["sequence_votes"]) == len(voters)

    timeline = cv2.imread(str(out / clip["timeline"]))
    assert timeline is not None and timeline.shape[0] > 300
    cap = cv2.VideoCapture(str(out / clip["overlay_video"]))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 8
    ok, first = cap.read()
    cap.release()
    assert ok and first.shape[1] == W

    folder = json.loads((out / "frames.json").read_text())
    assert folder["source"] == "frames folder" and folder["fps"] is None
    files = sorted(os.listdir(clips / "frames"))  # frame_0000 ... frame_0021, frame_0099
    assert folder["frames"]["in_video"] == len(files) == 9
    sampled = [files[i] for i in expected_indices(len(files), 8)]
    assert sampled[-1] == "frame_0099.png"  # the last image is always sampled
    assert [f["name"] for f in folder["per_frame"]] == sampled[:-1]
    assert folder["frames"]["read"] == 7 and folder["frames"]["sampled"] == 8
    assert folder["frames"]["unreadable"][0]["name"] == "frame_0099.png"
    assert folder["complete"] is False

    cut = json.loads((out / "cut.json").read_text())
    assert cut["frames"]["in_video"] == 60 and cut["frames"]["sampled"] == 8
    assert 0 < cut["frames"]["read"] < 8 and cut["complete"] is False
    assert f"only {cut['frames']['read']} of the 8 sampled frames" in cut["note"]

    photo = json.loads((out / "photo.json").read_text())
    assert photo["kind"] == "image" and photo["face"]["face_box"] == face_box(0)


def test_no_face_policy_and_max_over_faces(workdir, clips, tmp_path):
    def two_faces(image):
        found = background_detector(image)
        if not found:
            return []
        x0, y0, x1, y1 = found[0].box
        half = face_lib.Face(np.array([x0, y0, (x0 + x1) / 2, (y0 + y1) / 2], np.float32))
        return found + [half]  # the whole face and its top-left quarter

    runs = {}
    for name, video, detector in (("largest", {"no_face": "full_frame"}, two_faces),
                                  ("max", {"no_face": "full_frame", "face": "max"}, two_faces)):
        out = tmp_path / name
        predict.predict_files([str(clips / "clip.mp4")], workdir, str(out), detector=detector,
                              video={"frames_per_video": 12, **video}, log=silent)
        runs[name] = json.loads((out / "clip.json").read_text())
    largest, best = runs["largest"], runs["max"]
    assert largest["frames"]["scored"] == largest["frames"]["read"] == 12
    for a, b in zip(largest["per_frame"], best["per_frame"]):
        assert a["index"] == b["index"] and a["scored"] and b["scored"]
        if a["index"] in BLANK:  # full frame: the whole picture goes in
            assert a["face"] == b["face"] and a["face"]["aligned"] is False
            assert a["face"]["box"] == [0, 0, W, H] and a["faces"] == 0
            assert b["fake_prob"] == pytest.approx(a["fake_prob"], abs=1e-5)
        else:  # the larger face is one of the two scored; the max is at least its score
            assert a["faces"] == 2 and b["faces_scored"] == 2
            assert b["fake_prob"] >= a["fake_prob"] - 1e-5
    assert best["fake_prob"] >= largest["fake_prob"] - 1e-5


def test_protocol_from_config_json_older_runs_and_overrides(workdir, clips, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    config = json.loads((run / "config.json").read_text())
    config["video"] = {"frames_per_video": 5, "aggregate": "max"}  # older fields missing
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code = predict.main([str(clips / "clip.mp4"), "--workdir", str(run), "--out", str(out),
                         "--face", "none"])
    assert code == 0
    record = json.loads((out / "clip.json").read_text())
    assert record["protocol"] == {**config_base.video_config().to_dict(),
                                  "frames_per_video": 5, "aggregate": "max"}
    assert record["frames"]["read"] == 5 and record["frames"]["scored"] == 5
    assert "face detection off" in record["note"]
    assert record["fake_prob"] == pytest.approx(max(f["fake_prob"] for f in record["per_frame"]))

    del config["video"]  # a run recorded before the section: the defaults
    (run / "config.json").write_text(json.dumps(config))
    code = predict.main([str(clips / "clip.mp4"), "--workdir", str(run), "--out", str(out),
                         "--face", "none", "--aggregate", "median", "--frames-per-video", "7"])
    assert code == 0
    record = json.loads((out / "clip.json").read_text())
    assert record["protocol"]["aggregate"] == "median" and record["frames"]["read"] == 7
    assert record["fake_prob"] == pytest.approx(
        np.median([f["fake_prob"] for f in record["per_frame"]]))
    assert predict.main([str(clips / "clip.mp4"), "--workdir", str(run), "--out", str(out),
                         "--frames-per-video", "0"]) == 2


def test_frames_run_in_device_sized_batches(workdir, clips):
    cfg, model, variables, _ = predict.load_model(workdir)
    batched = predict.Predictor(cfg, model, variables, batch_size=4)
    calls = []
    inner = batched.maps_fn
    batched.maps_fn = lambda v, x: (calls.append(x.shape), inner(v, x))[1]
    face = synthetic.generate_example("facial_attributes", 7, image_size=FACE)["image"]
    inputs = [cv2.resize(frame(i, face), (SIZE, SIZE)) for i in range(10)]
    out = batched(inputs)
    assert calls == [(4, SIZE, SIZE, 3)] * 3  # 4 + 4 + 2 (padded)
    one = predict.Predictor(cfg, model, variables, batch_size=1)
    single = [one([x]) for x in inputs]
    for key in ("fake_prob", "probs", "dissimilarity"):
        expected = np.concatenate([s[key] for s in single])
        np.testing.assert_allclose(out[key], expected, rtol=1e-4, atol=1e-5)


def test_protocol_rules():
    assert video_lib.aggregate([0.2, 0.4, 0.9], "mean") == pytest.approx(0.5)
    assert video_lib.aggregate([0.2, 0.4, 0.9], "max") == 0.9
    assert video_lib.aggregate([0.2, 0.4, 0.9, 1.0], "median") == pytest.approx(0.65)
    assert video_lib.aggregate([], "mean") is None
    seqs = [["a"], ["a", "b"], ["a", "b"], [], ["a"]]
    # Voters (score >= 0.5): frames 0, 1, 2, 4 -> ['a'] twice (mean 0.8), ['a', 'b'] twice
    # (mean 0.6): the tie goes to the higher mean score.
    seq, votes = video_lib.vote_sequence(seqs, [0.9, 0.6, 0.6, 0.1, 0.7], 0.5)
    assert seq == ["a"] and [v["frames"] for v in votes] == [2, 2]
    seq, _ = video_lib.vote_sequence(seqs, [0.1, 0.2, 0.2, 0.3, 0.1], 0.5)  # no voter: all vote
    assert seq == ["a", "b"]
    bad = config_base.video_config()
    bad.no_face = "guess"
    with pytest.raises(config_base.ConfigError, match="video.no_face"):
        config_base.check_video(bad)
    # Every container data_prep.videos reads is read here too.
    assert set(video_lib.VIDEO_EXTS) >= {".mp4", ".avi", ".mov", ".mkv", ".webm"}


def test_frame_folder_detection(tmp_path):
    (tmp_path / "seq").mkdir()
    (tmp_path / "photos").mkdir()
    for i in range(3):
        (tmp_path / "seq" / f"{i:05d}.png").write_bytes(b"")
    for name in ("alice.jpg", "bob.jpg"):
        (tmp_path / "photos" / name).write_bytes(b"")
    assert video_lib.is_frame_folder(str(tmp_path / "seq"))
    assert not video_lib.is_frame_folder(str(tmp_path / "photos"))
    items, _ = predict.classify_inputs([str(tmp_path / "seq"), str(tmp_path / "photos")])
    assert items[0] == (str(tmp_path / "seq"), "frames")
    assert [k for _, k in items[1:]] == ["image", "image"]
    items, _ = predict.classify_inputs([str(tmp_path / "seq")], folders="images")
    assert [k for _, k in items] == ["image"] * 3
