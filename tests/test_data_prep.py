"""Tests of data_prep: the Seq-DeepFake and video-benchmark builders on small fixtures laid out
like the official releases (synthetic faces written as JPEG/PNG images and as short MPEG-4
videos with OpenCV), read back through the training reader (cmil_jax.data.sources)."""

import functools
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from cmil_jax import labels
from cmil_jax.data import pipeline, sources, synthetic
from data_prep import common, faces, seq_deepfake, videos
from data_prep import landmarks as lm_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACE = 96  # side of the synthetic face pasted into video frames
FRAME_W, FRAME_H = 176, 128
NUM_FRAMES = 6  # frames written per fixture video
SAMPLED = 3  # frames sampled per video by the builder
CROP = 96  # stored crop side for the video fixtures
MAGENTA = (255, 0, 255)


# ---- fixture faces and a detector that finds them ---------------------------------------------


@functools.cache
def _face(k: int):
    """(image uint8 (FACE,FACE,3), landmarks (68,2)) of fixture face k (6 distinct faces)."""
    ex = synthetic.generate_example("facial_components", 700 + k % 6, image_size=FACE,
                                    sequence=())
    return ex["image"], ex["landmarks"].astype(np.float64)


class SquareDetector:
    """Finds the pasted face square (pixels far from the corner colour) and reports the
    landmarks of the fixture face it shows; box = landmarks' bounding box (like dlib's)."""

    name = "fixture square detector"

    def __init__(self, with_points: bool = True):
        self.with_points = with_points

    def __call__(self, image):
        diff = np.abs(image.astype(np.int16) - image[0, 0].astype(np.int16)).max(-1) > 60
        ys, xs = np.nonzero(diff)
        if len(xs) < FACE * FACE // 4:
            return []
        x0, y0 = int(xs.min()), int(ys.min())
        patch = image[y0:y0 + FACE, x0:x0 + FACE].astype(np.float32)
        if patch.shape[:2] != (FACE, FACE):
            return []
        errs = [np.mean((patch - _face(k)[0]) ** 2) for k in range(6)]
        pts = _face(int(np.argmin(errs)))[1] + (x0, y0)
        box = np.concatenate([pts.min(0), pts.max(0)]).astype(np.float32)
        return [lm_lib.Face(box, pts.astype(np.float32) if self.with_points else None)]


def _offset(t: int):
    """Top-left corner of the face in frame t (the face moves right)."""
    return 12 + 6 * t, 14 + 2 * t


def _frame(k: int, t: int):
    frame = np.empty((FRAME_H, FRAME_W, 3), np.uint8)
    frame[:] = MAGENTA
    x, y = _offset(t)
    frame[y:y + FACE, x:x + FACE] = _face(k)[0]
    return frame


def _write_video(path, k: int | None, num_frames: int = NUM_FRAMES):
    """MPEG-4 video of fixture face k moving over magenta (k=None: no face at all)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 10, (FRAME_W, FRAME_H))
    assert writer.isOpened(), "OpenCV cannot write mp4v videos here"
    for t in range(num_frames):
        frame = _frame(k, t) if k is not None else np.full((FRAME_H, FRAME_W, 3), MAGENTA,
                                                            np.uint8)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def _expected_frame_landmarks(k: int, t: int):
    """Landmarks of face k in frame t, mapped into the stored crop as the builder does."""
    pts = _face(k)[1] + _offset(t)
    box = np.concatenate([pts.min(0), pts.max(0)])
    crop, offset, scale = faces.crop_face(_frame(k, t), box, 0.25, CROP)
    return faces.to_crop_coords(pts, offset, scale), crop


def _read_all(data_dir, name, split):
    src = sources.open_split(str(data_dir), name, split)
    return src, [src[i] for i in range(len(src))]


# ---- FaceForensics++ -------------------------------------------------------------------------

FFPP_PAIRS = {"train": [["000", "001"]], "val": [["002", "003"]], "test": [["004", "005"]]}


def _make_ffpp(raw):
    """FF++ download layout, c23, four methods; test split quirks: a missing fake, an
    unreadable original and an original in which no face can be found."""
    os.makedirs(raw / "splits")
    for split, pairs in FFPP_PAIRS.items():
        (raw / "splits" / f"{split}.json").write_text(json.dumps(pairs))
    for i in range(6):
        path = raw / "original_sequences/youtube/c23/videos" / f"{i:03d}.mp4"
        if i == 4:  # unreadable
            os.makedirs(path.parent, exist_ok=True)
            path.write_bytes(b"this is not a video")
        else:
            _write_video(str(path), None if i == 5 else i)
    for m in videos.FFPP_METHODS:
        for pairs in FFPP_PAIRS.values():
            for a, b in pairs:
                for name in (f"{a}_{b}", f"{b}_{a}"):
                    if m == "NeuralTextures" and name == "005_004":
                        continue  # missing
                    _write_video(str(raw / "manipulated_sequences" / m / "c23/videos"
                                     / f"{name}.mp4"), int(a))


@pytest.fixture(scope="module")
def ffpp_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("ffpp_raw")
    _make_ffpp(raw)
    return raw


def test_ffpp_builder_reads_back(ffpp_raw, tmp_path, capsys):
    out = tmp_path / "tfds"
    name = videos.build("ffpp", str(ffpp_raw), str(out), frames=SAMPLED, image_size=CROP,
                        detector=SquareDetector(), max_skipped=0.4)
    assert name == "ffpp/c23"
    printed = capsys.readouterr()
    text = printed.out + printed.err
    for quirk, reason in (("NeuralTextures/c23/videos/005_004.mp4", common.MISSING_VIDEO),
                          ("youtube/c23/videos/004.mp4", common.UNREADABLE_VIDEO),
                          ("youtube/c23/videos/005.mp4", common.NO_FACE)):
        assert any(quirk in line and reason in line for line in text.splitlines()), quirk

    expected_ids = {}
    for split, pairs in FFPP_PAIRS.items():
        ids = {f"youtube/{x}" for p in pairs for x in p}
        ids |= {f"{m}/{a}_{b}" for m in videos.FFPP_METHODS for a, b in pairs}
        ids |= {f"{m}/{b}_{a}" for m in videos.FFPP_METHODS for a, b in pairs}
        expected_ids[split] = ids
    expected_ids["test"] -= {"youtube/004", "youtube/005", "NeuralTextures/005_004"}

    for split in ("train", "val", "test"):
        src, recs = _read_all(out, name, split)
        assert len(src) == len(expected_ids[split]) * SAMPLED
        ids = sources.video_ids(src)
        assert set(ids) == expected_ids[split]
        for vid in expected_ids[split]:
            frames = sorted(int(r["frame_index"]) for r in recs if r["video_id"] == vid)
            assert frames == faces.sample_indices(NUM_FRAMES, SAMPLED)
        for r in recs:
            assert r["image"].shape == (CROP, CROP, 3)
            assert r["label"].tolist() == [0] * 5
            assert int(r["is_fake"]) == (0 if r["video_id"].startswith("youtube/") else 1)
            assert r["method"] == r["video_id"].split("/")[0]
            assert r["path"].endswith(f".mp4/{int(r['frame_index']):06d}")
        np.testing.assert_array_equal(src.is_fake(), [r["is_fake"] for r in recs])

    # Landmarks and pixels: the crop of frame t of a video of face k, as the builder makes it.
    src, recs = _read_all(out, name, "train")
    for r in recs[:6]:
        k = int(r["video_id"].split("/")[1][:3])
        lms, crop = _expected_frame_landmarks(k, int(r["frame_index"]))
        np.testing.assert_allclose(r["landmarks"], lms, atol=4.0)
        assert np.abs(r["image"].astype(np.float32) - crop).mean() < 12

    # The training reader takes them: batches with is_fake from the records.
    it = iter(pipeline.make_train_dataset(src, batch_size=4, seed=0, image_size=64, shard=False))
    batch = next(it)
    assert batch["image"].shape == (4, 64, 64, 3) and set(batch["is_fake"].tolist()) <= {0, 1}

    report = json.loads((out / "ffpp/c23/prep_report.json").read_text())
    assert report["ok"] and report["skipped"]["test"] == 3
    assert report["skipped_by_reason"]["test"] == {common.MISSING_VIDEO: 1,
                                                   common.UNREADABLE_VIDEO: 1, common.NO_FACE: 1}
    tsv = (out / "ffpp/c23/prep_skipped.tsv").read_text()
    assert "youtube/c23/videos/005.mp4" in tsv


def test_ffpp_too_many_skipped_fails_and_leaves_nothing(ffpp_raw, tmp_path, capsys):
    out = tmp_path / "tfds"
    # Found while listing (before any decoding): the missing NeuralTextures video.
    with pytest.raises(common.BuildError, match=r"split 'test': 1 of 4 inputs skipped .*"
                                                 r"missing video: 1"):
        videos.build("ffpp", str(ffpp_raw), str(out), frames=1, image_size=32,
                     detector=SquareDetector(), methods=("NeuralTextures",))
    # Found while decoding: test has an unreadable and a faceless original of 4 videos.
    with pytest.raises(common.BuildError, match=r"split 'test': 2 of 4 inputs skipped"):
        videos.build("ffpp", str(ffpp_raw), str(out), frames=1, image_size=32,
                     detector=SquareDetector(), methods=("Deepfakes",), max_skipped=0.25)
    assert "build FAILED" in capsys.readouterr().out
    for name in ("ffpp/c23_NeuralTextures", "ffpp/c23_Deepfakes"):
        assert common.existing_version_dir(str(out), name) is None
        with pytest.raises(FileNotFoundError, match="data_prep"):
            sources.open_split(str(out), name, "train")
    report = json.loads((out / "ffpp/c23_Deepfakes/prep_report.json").read_text())
    assert report["ok"] is False


# ---- Seq-DeepFake ----------------------------------------------------------------------------

LABEL_FORMATS = ("[{}]", "({})", " {} ")  # official, tuple-like, bare with spaces


def _label_text(label, fmt: int) -> str:
    vals = [int(v) for v in label]
    if fmt == 0:
        return LABEL_FORMATS[0].format(", ".join(map(str, vals)))
    if fmt == 1:
        return LABEL_FORMATS[1].format(",".join(map(str, vals)))
    return LABEL_FORMATS[2].format(" ".join(map(str, vals)))


def _write_image(path, image, ext):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    with open(path, "wb") as f:
        f.write(buf.tobytes())


def _make_seq_subset(raw, subset, sizes, quirks: bool, image_size: int = 128, start: int = 0):
    """RAW/<subset>/{annotations,images} in the official layout.

    Returns {split: [(path relative to RAW, label list)]} of the rows a build must keep, in
    CSV order. With quirks, train mixes label formats, paths relative to RAW and to the subset,
    .jpg and .png files (one listed with the wrong extension), one image already at 256 px,
    and six bad rows (missing, unreadable, malformed label, unknown sequence folder, label
    contradicting its folder, duplicate).
    """
    import csv

    expected = {}
    index = start
    for split, n in sizes.items():
        rows, keep = [], []
        for i in range(n):
            ex = synthetic.generate_example(subset, index, image_size=image_size)
            index += 1
            seq_name = labels.sequence_name(ex["label"], subset)
            ext = ".png" if quirks and i % 3 == 2 else ".jpg"
            image = ex["image"]
            if quirks and i == 1:
                image = cv2.resize(image, (256, 256), interpolation=cv2.INTER_CUBIC)
            rel = f"{subset}/images/{split}/{seq_name}/{index:06d}{ext}"
            _write_image(str(raw / rel), image, ext)
            listed = rel
            if quirks and i == 4:  # stored as .png, listed as .jpg
                os.replace(raw / rel, raw / rel.replace(ext, ".png"))
                rel = rel.replace(ext, ".png")
                listed = rel.replace(".png", ".jpg")
            if quirks and i % 2:
                listed = listed.split("/", 1)[1]  # relative to the subset folder
            rows.append((listed, _label_text(ex["label"], i % 3 if quirks else 0)))
            keep.append((rel, ex["label"].tolist()))
        if quirks and split == "train":
            d = f"images/{split}"
            good = synthetic.generate_example(subset, index, image_size=image_size)["image"]
            _write_image(str(raw / subset / d / "eye" / "broken.jpg"), good, ".jpg")
            (raw / subset / d / "eye" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
            _write_image(str(raw / subset / d / "nose-moustache" / "x.jpg"), good, ".jpg")
            _write_image(str(raw / subset / d / "nose" / "wrong.jpg"), good, ".jpg")
            _write_image(str(raw / subset / d / "nose" / "badlabel.jpg"), good, ".jpg")
            rows += [
                (f"{d}/nose/missing.jpg", "[1, 0, 0, 0, 0]"),
                (f"{d}/eye/broken.jpg", "[2, 0, 0, 0, 0]"),
                (f"{d}/nose/badlabel.jpg", "[1, 2, x]"),
                (f"{d}/nose-moustache/x.jpg", "[1, 0, 0, 0, 0]"),
                (f"{d}/nose/wrong.jpg", "[2, 0, 0, 0, 0]"),
                rows[0],
            ]
        os.makedirs(raw / subset / "annotations", exist_ok=True)
        with open(raw / subset / "annotations" / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_path", "label"])
            w.writerows(rows)
        expected[split] = keep
    return expected


SEQ_SIZES = {"train": 10, "val": 3, "test": 3}


@pytest.fixture(scope="module")
def seq_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("seq_raw")
    comp = _make_seq_subset(raw, "facial_components", SEQ_SIZES, quirks=True)
    attr = _make_seq_subset(raw, "facial_attributes", {"train": 3, "val": 2, "test": 2},
                            quirks=False)
    return raw, {"facial_components": comp, "facial_attributes": attr}


def test_seq_deepfake_builder_reads_back(seq_raw, tmp_path, capsys):
    raw, expected = seq_raw
    out = tmp_path / "tfds"
    rc = seq_deepfake.main(["--raw-dir", str(raw), "--data-dir", str(out), "--num-workers", "0",
                            "--max-skipped", "0.5"])
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert rc == 0, text
    bad = {"nose/missing.jpg": common.MISSING_IMAGE, "eye/broken.jpg": common.UNREADABLE_IMAGE,
           "nose/badlabel.jpg": common.MALFORMED_LABEL,
           "nose-moustache/x.jpg": common.UNKNOWN_SEQUENCE,
           "nose/wrong.jpg": common.LABEL_MISMATCH}
    for path, reason in bad.items():
        assert any(path in line and reason in line for line in text.splitlines()), path
    assert common.DUPLICATE in text
    assert "published: 35,166" in text and "published: 49,920" in text
    dlib = lm_lib.dlib_available()
    if not dlib:
        assert "the 'landmarks' extra is not installed" in text

    template = lm_lib.aligned_landmarks(256)
    for subset, splits in expected.items():
        name = f"seq_deepfake/{subset}"
        for split, keep in splits.items():
            src, recs = _read_all(out, name, split)
            assert [r["path"] for r in recs] == [rel for rel, _ in keep]
            assert [r["label"].tolist() for r in recs] == [lab for _, lab in keep]
            np.testing.assert_array_equal(src.labels(), [lab for _, lab in keep])
            for i, (r, (rel, _)) in enumerate(zip(recs, keep)):
                assert r["image"].shape == (256, 256, 3)
                assert int(r["is_fake"]) == int(any(r["label"]))
                assert not r["mask"].any()
                if not dlib:
                    np.testing.assert_allclose(r["landmarks"], template, atol=1e-4)
                original = cv2.cvtColor(cv2.imread(str(raw / rel)), cv2.COLOR_BGR2RGB)
                if original.shape[0] == 256:  # kept as it was, byte for byte
                    assert src.raw(i)["image"] == (raw / rel).read_bytes()
                else:
                    up = cv2.resize(original, (256, 256), interpolation=cv2.INTER_CUBIC)
                    assert np.abs(r["image"].astype(np.float32) - up).mean() < 4

    report = json.loads((out / "seq_deepfake/facial_components/prep_report.json").read_text())
    assert report["skipped"] == {"train": 6, "val": 0, "test": 0}
    assert sum(report["counts"]["train"].values()) == SEQ_SIZES["train"]

    # Built datasets are kept unless --overwrite.
    rc = seq_deepfake.main(["--raw-dir", str(raw), "--data-dir", str(out),
                            "--subsets", "facial_attributes", "--num-workers", "0"])
    assert rc == 0 and "already built" in capsys.readouterr().out


def test_seq_deepfake_fails_on_too_many_bad_rows(seq_raw, tmp_path, capsys):
    raw, _ = seq_raw
    out = tmp_path / "tfds"
    rc = seq_deepfake.main(["--raw-dir", str(raw), "--data-dir", str(out), "--num-workers", "0",
                            "--subsets", "facial_components"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "split 'train': 5 of 16 inputs skipped" in err  # the unreadable one needs decoding
    assert common.existing_version_dir(str(out), "seq_deepfake/facial_components") is None


@pytest.mark.parametrize("text,expected", [
    ("[1, 2, 4, 0, 0]", [1, 2, 4, 0, 0]), ("(1,2,4,0,0)", [1, 2, 4, 0, 0]),
    ("  [ 1 2 4 0 0 ] ", [1, 2, 4, 0, 0]), ("1, 2, 4", [1, 2, 4, 0, 0]),
    ("[5., 3., 0., 0., 0.]", [5, 3, 0, 0, 0]), ("[0, 0, 0, 0, 0]", [0, 0, 0, 0, 0]),
])
def test_parse_label(text, expected):
    assert seq_deepfake.parse_label(text).tolist() == expected


@pytest.mark.parametrize("text", ["", "[]", "[1, 2, x]", "[1, 0, 2, 0, 0]", "[1, 1, 0, 0, 0]",
                                  "[6, 0, 0, 0, 0]", "[1, 2, 3, 4, 5, 0]", "[-1, 0, 0, 0, 0]"])
def test_parse_label_rejects(text):
    with pytest.raises(ValueError):
        seq_deepfake.parse_label(text)


def test_sequence_names():
    assert seq_deepfake.parse_sequence_name("eyebrow-eye-hair-nose-lip",
                                            "facial_components") == (3, 2, 5, 1, 4)
    assert seq_deepfake.parse_sequence_name("Young-Smiling-Eyeglasses",
                                            "facial_attributes") == (5, 4, 2)
    assert seq_deepfake.parse_sequence_name("original", "facial_attributes") == ()
    assert seq_deepfake.parse_sequence_name("lips_eyes", "facial_components") == (4, 2)
    for bad in ("nose-moustache", "nose-nose", "Bangs", ""):
        with pytest.raises(ValueError):
            seq_deepfake.parse_sequence_name(bad, "facial_components")


# ---- Celeb-DF, DFDC, WildDeepfake, DFD -------------------------------------------------------


def _video_ids_by_split(out, name, splits):
    result = {}
    for split in splits:
        src, recs = _read_all(out, name, split)
        ids = sources.video_ids(src)
        assert len(ids) == len(recs) and len(recs) % SAMPLED == 0
        for r in recs:
            assert r["landmarks"].shape == (68, 2) and r["label"].tolist() == [0] * 5
            inside = (r["landmarks"] >= -1) & (r["landmarks"] <= CROP)
            assert inside.all(), r["path"]
        result[split] = {vid: int(r["is_fake"]) for vid, r in zip(ids, recs)}
    return result


def test_celebdf_builder(tmp_path, capsys):
    raw = tmp_path / "Celeb-DF-v2"
    for k, name in enumerate(("id0_0000", "id1_0000", "id2_0000")):
        _write_video(str(raw / "Celeb-real" / f"{name}.mp4"), k)
    for k, name in enumerate(("id0_id1_0000", "id1_id2_0000", "id2_id0_0000")):
        _write_video(str(raw / "Celeb-synthesis" / "videos" / f"{name}.mp4"), k + 3)  # SBI layout
    for k, name in enumerate(("00000", "00001")):
        _write_video(str(raw / "YouTube-real" / f"{name}.mp4"), k)
    (raw / "List_of_testing_videos.txt").write_text("\n".join([
        "1 YouTube-real/00001.mp4", "1 Celeb-real/id2_0000.mp4",
        "0 Celeb-synthesis/id2_id0_0000.mp4",
        "0 Celeb-real/id1_0000.mp4",  # label contradicts the folder
        "real Celeb-real/id0_0000.mp4",  # malformed
        "0 Celeb-synthesis/id9_id8_0000.mp4",  # missing
    ]) + "\n")
    out = tmp_path / "tfds"
    name = videos.build("celebdf", str(raw), str(out), frames=SAMPLED, image_size=CROP,
                        detector=SquareDetector(with_points=False), max_skipped=0.6)
    assert name == "celebdf/v2"
    got = _video_ids_by_split(out, name, ("train", "test"))
    assert got["test"] == {"YouTube-real/00001": 0, "Celeb-real/id2_0000": 0,
                           "Celeb-synthesis/id2_id0_0000": 1}
    assert got["train"] == {"Celeb-real/id0_0000": 0, "Celeb-synthesis/id0_id1_0000": 1,
                            "Celeb-synthesis/id1_id2_0000": 1, "YouTube-real/00000": 0}
    text = capsys.readouterr()
    text = text.out + text.err
    for quirk, reason in (("Celeb-real/id1_0000.mp4", common.LABEL_MISMATCH),
                          ("real Celeb-real/id0_0000.mp4", common.MALFORMED_LABEL),
                          ("id9_id8_0000.mp4", common.MISSING_VIDEO)):
        assert any(quirk in line and reason in line for line in text.splitlines()), quirk
    # Box-only detector: template landmarks fitted to the box, noted in the report.
    report = json.loads((out / "celebdf/v2/prep_report.json").read_text())
    assert report["landmark_sources"] == {"template-box": 7 * SAMPLED}


def test_dfdc_builder(tmp_path):
    raw = tmp_path / "DFDC"
    for k, (name, label) in enumerate((("aaa.mp4", 0), ("bbb.mp4", 1), ("ccc.mp4", 1))):
        _write_video(str(raw / "videos" / name), k)
    (raw / "labels.csv").write_text("filename,label\naaa.mp4,0\nbbb.mp4,1\nccc.mp4,1\n"
                                    "ddd.mp4,maybe\n")
    part = raw / "dfdc_train_part_0"
    _write_video(str(part / "eee.mp4"), 3)
    _write_video(str(part / "fff.mp4"), 4)
    _write_video(str(part / "ggg.mp4"), None)  # no face in any frame
    (part / "metadata.json").write_text(json.dumps({
        "eee.mp4": {"label": "REAL", "split": "train"},
        "fff.mp4": {"label": "FAKE", "split": "train", "original": "eee.mp4"},
        "ggg.mp4": {"label": "REAL", "split": "train"}}))
    out = tmp_path / "tfds"
    log = common.SkipLog(max_skipped=0.5)
    name = videos.build("dfdc", str(raw), str(out), frames=SAMPLED, image_size=CROP,
                        detector=SquareDetector(), log=log)
    got = _video_ids_by_split(out, name, ("train", "test"))
    assert got == {"train": {"eee": 0, "fff": 1}, "test": {"aaa": 0, "bbb": 1, "ccc": 1}}
    assert [(s.split, s.reason) for s in log.skipped] == [("test", common.MALFORMED_LABEL),
                                                          ("train", common.NO_FACE)]
    assert log.skipped[1].path == "dfdc_train_part_0/ggg.mp4"


def test_wilddeepfake_builder(tmp_path):
    raw = tmp_path / "WildDeepfake"
    layout = {"real_train": [("1/real/000", 0), ("1/real/001", 1)],
              "fake_train": [("2/fake/000", 2)],
              "real_test": [("3/real/000", 3)], "fake_test": [("4/fake/000", 4)]}
    for top, seqs in layout.items():
        for rel, k in seqs:
            for t in range(NUM_FRAMES):  # face crops: the face image itself
                _write_image(str(raw / top / rel / f"{t}.png"), _face(k)[0], ".png")
    (raw / "real_train/1/real/001/2.png").write_bytes(b"not a png")  # one unreadable frame
    bad = raw / "fake_test/4/fake/001"  # a sequence whose frames are all unreadable
    bad.mkdir(parents=True)
    for t in range(2):
        (bad / f"{t}.png").write_bytes(b"")
    out = tmp_path / "tfds"
    log = common.SkipLog(max_skipped=0.5)
    name = videos.build("wilddeepfake", str(raw), str(out), frames=SAMPLED, image_size=CROP,
                        detector=SquareDetector(), log=log)
    assert name == "wilddeepfake/default"
    _, recs = _read_all(out, name, "train")
    ids = [r["video_id"] for r in recs]
    assert sorted(set(ids)) == ["fake_train/2/fake/000", "real_train/1/real/000",
                                "real_train/1/real/001"]
    assert ids.count("real_train/1/real/001") == SAMPLED - 1  # the unreadable frame is left out
    assert {r["path"] for r in recs if r["video_id"] == "real_train/1/real/000"} == {
        f"real_train/1/real/000/{faces.list_frame_files(str(raw / 'real_train/1/real/000'))[i]}"
        for i in faces.sample_indices(NUM_FRAMES, SAMPLED)}
    assert log.notes[("train", "unreadable frame images")] == 1
    assert [(s.path, s.reason) for s in log.skipped] == [("fake_test/4/fake/001",
                                                          common.UNREADABLE_VIDEO)]
    # Frames are crops: the face is found after padding and the landmarks are the true ones.
    r = next(r for r in recs if r["video_id"] == "real_train/1/real/000")
    pts = _face(0)[1]
    box = np.concatenate([pts.min(0), pts.max(0)])
    _, offset, scale = faces.crop_face(_face(0)[0], box, 0.25, CROP)
    np.testing.assert_allclose(r["landmarks"], faces.to_crop_coords(pts, offset, scale),
                               atol=1e-3)


def test_dfd_builder(tmp_path):
    raw = tmp_path / "FF"
    _write_video(str(raw / "original_sequences/actors/c23/videos/01__walking.mp4"), 0)
    _write_video(str(raw / "original_sequences/actors/c23/videos/02__talking.mp4"), 1)
    _write_video(str(raw / "manipulated_sequences/DeepFakeDetection/c23/videos/"
                             "01_02__walking__4OJNJLOO.mp4"), 2)
    out = tmp_path / "tfds"
    name = videos.build("dfd", str(raw), str(out), frames=SAMPLED, image_size=CROP,
                        detector=SquareDetector())
    assert name == "dfd/c23"
    got = _video_ids_by_split(out, name, ("test",))
    assert got["test"] == {"actors/01__walking": 0, "actors/02__talking": 0,
                           "DeepFakeDetection/01_02__walking__4OJNJLOO": 1}


def test_layout_errors_name_the_path(tmp_path):
    (tmp_path / "raw").mkdir()
    raw = str(tmp_path / "raw")
    for dataset, expected in (("ffpp", "split files not found"),
                              ("celebdf", "List_of_testing_videos.txt"),
                              ("dfdc", "labels.csv"), ("wilddeepfake", "real_train"),
                              ("dfd", "original_sequences/actors/c23/videos")):
        with pytest.raises(common.BuildError, match=expected) as e:
            videos.build(dataset, raw, str(tmp_path / "out"), detector=SquareDetector())
        assert raw in str(e.value)
    with pytest.raises(common.BuildError, match="annotations/train.csv"):
        seq_deepfake.build(raw, str(tmp_path / "out"), "facial_components")


# ---- landmarks, crops, detectors -------------------------------------------------------------


def test_similarity_fit_recovers_a_transform():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(10, 2))
    a = 1.7 * np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    m = np.concatenate([a, [[5.0], [-2.0]]], axis=1)
    np.testing.assert_allclose(lm_lib.similarity_fit(src, lm_lib.apply_affine(src, m)), m,
                               atol=1e-9)


def test_aligned_template_sits_on_the_alignment_anchors():
    lms = lm_lib.aligned_landmarks(256)
    assert lms.shape == (68, 2) and lms.dtype == np.float32
    np.testing.assert_allclose((lm_lib._anchor_points(lms) + 0.5) / 256,  # pylint: disable=protected-access
                               lm_lib.ALIGNED_ANCHORS, atol=0.01)
    # Fitted to where the synthetic faces have their eyes and mouth, it lands near their
    # exact landmarks (the template is their mean shape).
    truth = np.stack([synthetic.generate_example("facial_attributes", i, image_size=128,
                                                 sequence=())["landmarks"] for i in range(8)])
    anchors = (lm_lib._anchor_points(truth.mean(0)) + 0.5) / 128  # pylint: disable=protected-access
    fitted = lm_lib.aligned_landmarks(128, anchors)
    assert np.abs(fitted - truth).mean() < 0.04 * 128


def test_template_from_points_and_box():
    five = lm_lib._five_points(lm_lib.MEAN_TEMPLATE * 40 + 100)  # pylint: disable=protected-access
    five[[0, 1]] = five[[1, 0]]  # YuNet order (subject's right eye first) is handled
    np.testing.assert_allclose(lm_lib.landmarks_from_points(five),
                               lm_lib.MEAN_TEMPLATE * 40 + 100, atol=1e-3)
    box_lms = lm_lib.landmarks_from_box((10, 20, 110, 140))
    np.testing.assert_allclose(box_lms.min(0), [10, 20], atol=1e-4)
    np.testing.assert_allclose(box_lms.max(0), [110, 140], atol=1e-4)


def test_crop_face_maps_points_and_pads_outside():
    image = np.zeros((60, 80, 3), np.uint8)
    image[20:30, 50:60] = 255  # a bright square; crop around it, partly outside the frame
    crop, offset, scale = faces.crop_face(image, (50, 20, 60, 30), margin=2.0, size=100)
    assert crop.shape == (100, 100, 3)
    centre = faces.to_crop_coords(np.array([[54.5, 24.5]]), offset, scale)[0]
    np.testing.assert_allclose(centre, [49.5, 49.5], atol=1.0)
    ys, xs = np.nonzero(crop[..., 0] > 128)
    assert abs(xs.mean() - centre[0]) < 1.5 and abs(ys.mean() - centre[1]) < 1.5


def test_sample_indices():
    assert faces.sample_indices(10, 3) == [0, 4, 9] or faces.sample_indices(10, 3) == [0, 5, 9]
    assert faces.sample_indices(2, 5) == [0, 1]
    assert faces.sample_indices(0, 5) == []


@pytest.mark.landmarks  # deselected by default; run with: pip install -e '.[landmarks]' && pytest -m landmarks
def test_dlib_extra_on_a_synthetic_face():
    ex = synthetic.generate_example("facial_components", 3, image_size=256, sequence=())
    face = lm_lib.largest_face(lm_lib.make_detector("dlib")(ex["image"]))
    assert face is not None and face.points.shape == (68, 2)
    assert np.abs(face.points - ex["landmarks"]).mean() < 0.1 * 256


def test_missing_detector_is_a_clear_error(tmp_path):
    if lm_lib.dlib_available() or lm_lib.haar_cascade_path():
        pytest.skip("a face detector is installed")
    raw = tmp_path / "DFDC"
    _write_video(str(raw / "videos" / "a.mp4"), 0)
    (raw / "labels.csv").write_text("filename,label\na.mp4,0\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "data_prep.videos", "--dataset", "dfdc", "--raw-dir", str(raw),
         "--data-dir", str(tmp_path / "out")],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "no face detector is available" in result.stderr
    assert "pip install -e '.[landmarks]'" in result.stderr


def _load_config(name, arg=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}",
                                                  os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_configs_point_at_the_built_names():
    c = _load_config("ffpp")
    assert (c.data.name, c.model.num_class_tokens, c.model.num_classes) == ("ffpp/c23", 1, 1)
    assert not c.loss.use_rank and c.data.triples and c.eval.select_metrics == "auc"
    assert _load_config("ffpp", "c40").data.name == "ffpp/c40"
    assert _load_config("ffpp", "demo").data.name.startswith("cmil_synthetic/")
    j = _load_config("joint")
    assert (j.data.name, j.data.joint_name, j.model.num_classes) == (
        "seq_deepfake/facial_components", "ffpp/c23", 5)
    e = _load_config("celebdf_eval")
    assert (e.data.name, e.data.test_split, e.model.num_classes) == ("celebdf/v2", "test", 1)
    assert _load_config("celebdf_eval", "joint").model.num_classes == 5


# ---- end to end: training reads built fixtures -----------------------------------------------


def _train_tiny(config, workdir, data_dir, *overrides):
    """Runs `python -m cmil_jax.main` with a tiny model at 32 px; returns metrics.jsonl."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "cmil_jax.main", "--config", config, "--workdir", str(workdir),
         f"--config.data.data_dir={data_dir}", "--config.data.image_size=32",
         "--config.model.dilate_last=True",  # stride 16: 2x2 patches at 32 px
         "--config.data.num_workers=0", "--config.model.backbone_width=8",
         "--config.model.width=48", "--config.eval.batch_size=8", *overrides],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_demo_training_reads_a_built_seq_deepfake_fixture(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "tfds"
    _make_seq_subset(raw, "facial_components", {"train": 24, "val": 8, "test": 8},
                     quirks=False, image_size=64, start=100)
    assert seq_deepfake.main(["--raw-dir", str(raw), "--data-dir", str(out),
                              "--image-size", "64", "--num-workers", "2"]) == 0  # process pool
    workdir = tmp_path / "run"
    records = _train_tiny(
        "configs/seqcomp.py:demo", workdir, out, "--config.data.name=seq_deepfake/facial_components",
        "--config.train.batch_size=8", "--config.train.num_steps=10", "--config.train.log_every=5",
        "--config.train.eval_every=10", "--config.train.checkpoint_every=10",
        "--config.eval.select_metrics=fixed_acc")
    train = [r for r in records if r["split"] == "train" and "loss" in r]
    assert [r["step"] for r in train] == [5, 10]
    test = [r for r in records if r["split"] == "test"]
    assert test and all(r["num_images"] == 8 for r in test)
    assert all(0.0 <= r["fixed_acc"] <= 1.0 for r in test)


@pytest.mark.slow
def test_binary_training_on_a_built_ffpp_fixture_reports_video_auc(ffpp_raw, tmp_path):
    out = tmp_path / "tfds"
    videos.build("ffpp", str(ffpp_raw), str(out), frames=SAMPLED, image_size=CROP,
                 detector=SquareDetector(), max_skipped=0.4)
    workdir = tmp_path / "run"
    records = _train_tiny(
        "configs/ffpp.py", workdir, out, "--config.model.backbone=resnet10",
        "--config.train.init_from=none",  # no ImageNet weights for ResNet-10
        "--config.data.test_split=val",  # the fixture's test split has no genuine video left
        "--config.train.batch_size=4", "--config.train.num_steps=6", "--config.train.log_every=3",
        "--config.train.eval_every=6", "--config.train.checkpoint_every=6")
    val = [r for r in records if r["split"] == "val"]
    n_videos = 2 + 2 * len(videos.FFPP_METHODS)  # two originals, both directions per method
    assert val and all(r["num_videos"] == n_videos for r in val)
    (test,) = [r for r in records if r["split"] == "test"]
    assert test["dataset"] == "ffpp/c23" and test["num_images"] == n_videos * SAMPLED
    for key in ("auc", "video_auc", "video_eer", "video_ap", "eer", "ap"):
        assert 0.0 <= test[key] <= 1.0, key
    assert "fixed_acc" not in test  # binary model: no sequence metrics
