"""The data builders read only what they were pointed at: an annotation entry that resolves
outside the raw directory (an absolute path elsewhere, '..' components, a symbolic link out)
is skipped and reported; the authors' absolute paths still resolve inside it."""

import csv
import os

from data_prep import common
from data_prep import seq_deepfake
from data_prep import videos

SUBSET = "facial_components"


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff")  # scanning does not decode


def _csv(raw, split, rows):
    path = raw / SUBSET / "annotations" / f"{split}.csv"
    os.makedirs(path.parent, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_path", "label"])
        w.writerows(rows)


def test_seq_deepfake_rows_outside_the_raw_dir_are_skipped_and_reported(tmp_path):
    raw, private = tmp_path / "raw", tmp_path / "private"
    nose = "[1, 0, 0, 0, 0]"
    inside = f"{SUBSET}/images/train/nose/000001.jpg"
    _touch(raw / inside)
    _touch(private / "nose" / "secret.jpg")
    _touch(private / "nose" / "linked.jpg")
    os.symlink(private / "nose" / "linked.jpg", raw / SUBSET / "images/train/nose/link.jpg")
    _csv(raw, "train", [
        (inside, nose),                                              # kept
        (f"/Seq-DeepFake/{inside}", nose),                           # the authors' path: kept
        (str(private / "nose" / "secret.jpg"), nose),                # absolute, elsewhere
        (f"{SUBSET}/../../private/nose/secret.jpg", nose),           # '..' out of RAW
        (f"{SUBSET}/images/train/nose/link.jpg", nose),              # a symbolic link out
    ])
    for split in ("val", "test"):
        _touch(raw / f"{SUBSET}/images/{split}/nose/000002.jpg")
        _csv(raw, split, [(f"{SUBSET}/images/{split}/nose/000002.jpg", nose)])
    log = common.SkipLog(max_skipped=1.0)
    plan = seq_deepfake.scan_subset(str(raw), SUBSET, log)

    kept = [item.path for item in plan["train"]]
    assert kept == [str(raw / inside)]  # the authors' path is the same file: a duplicate
    reasons = [(s.reason, s.detail.split(":")[0]) for s in log.skipped]
    csv_rel = f"{SUBSET}/annotations/train.csv"
    assert reasons == [
        (common.DUPLICATE, csv_rel),
        (common.OUTSIDE_RAW_DIR, csv_rel),
        (common.OUTSIDE_RAW_DIR, csv_rel),
        (common.OUTSIDE_RAW_DIR, csv_rel),
    ]
    outside = [s for s in log.skipped if s.reason == common.OUTSIDE_RAW_DIR]
    assert all("outside" in s.detail and str(private) in s.detail for s in outside)


def test_video_lists_outside_the_raw_dir_are_skipped(tmp_path):
    raw, private = tmp_path / "raw", tmp_path / "private"
    _touch(raw / "videos" / "a.mp4")
    _touch(private / "b.mp4")
    os.symlink(private / "b.mp4", raw / "videos" / "link.mp4")
    log = common.SkipLog(max_skipped=1.0)
    found = {"test": []}
    for name in ("a.mp4", "../../private/b.mp4", "link.mp4", str(private / "b.mp4")):
        path = os.path.join(str(raw / "videos"), name)
        videos._add(found, log, str(raw), "test", path, name, 1, "m")  # pylint: disable=protected-access
    assert [v.rel for v in found["test"]] == ["videos/a.mp4"]
    assert [s.reason for s in log.skipped] == [common.OUTSIDE_RAW_DIR] * 3


def test_inside():
    assert common.inside("/data/raw/x/y.jpg", "/data/raw")
    assert common.inside("/data/raw/x/../y.jpg", "/data/raw/")
    assert not common.inside("/data/raw/../raw2/y.jpg", "/data/raw")
    assert not common.inside("/data/raw2/y.jpg", "/data/raw")
