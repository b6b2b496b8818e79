"""data_prep.folders: a user's folders of real and fake images (with a CSV of manipulation
sequences) built into the TFDS format, read back through the training reader, trained on with
the demo-sized config and tested with configs/cross_eval.py. Fixtures are synthetic faces
written as JPEG/PNG files with OpenCV."""

import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from cmil_jax import labels
from cmil_jax.data import sources, synthetic
from data_prep import common, folders
from data_prep import landmarks as lm_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAGENTA = (255, 0, 255)
FACE = 64


class BoxDetector:
    """Finds the face pasted on a magenta canvas: the box of the non-magenta pixels; no key
    points (the builder fits the landmark template to the box)."""

    name = "fixture box detector"

    def __call__(self, image):
        diff = np.abs(image.astype(np.int16) - np.array(MAGENTA, np.int16)).max(-1) > 60
        ys, xs = np.nonzero(diff)
        if len(xs) < 100:
            return []
        return [lm_lib.Face(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                                     np.float32))]


def _write(path, image_rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))


def _photo(face):
    """A 128 x 96 photo: the face at (20, 16) on magenta."""
    canvas = np.empty((96, 128, 3), np.uint8)
    canvas[:] = MAGENTA
    canvas[16:16 + FACE, 20:20 + FACE] = face
    return canvas


SEQUENCES = [(1,), (2, 4), (3, 1, 5), (4,), (5, 2), (1, 3)]


def _make_photos(root, n_real=8, n_fake=8):
    """real/ and fake/ photos, a CSV of the fakes' sequences; returns {rel path: label}."""
    expected = {}
    rows = []
    for i in range(n_real):
        ex = synthetic.generate_example("facial_components", i, image_size=FACE, sequence=())
        rel = f"real/person{i % 3}/r{i}.jpg"
        _write(root / rel, _photo(ex["image"]))
        expected[rel] = (0, ())
    for i in range(n_fake):
        seq = SEQUENCES[i % len(SEQUENCES)]
        ex = synthetic.generate_example("facial_components", 100 + i, image_size=FACE,
                                        sequence=seq)
        rel = f"fake/f{i}.png"
        _write(root / rel, _photo(ex["image"]))
        expected[rel] = (1, seq)
        # Labels in both accepted forms: class ids, and a sequence name.
        text = (str(list(seq)) if i % 2 else
                labels.sequence_name(np.array(list(seq) + [0] * (5 - len(seq))),
                                     "facial_components"))
        rows.append((f"fake/f{i}.png", text))
    return expected, rows


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_path", "label"])
        w.writerows(rows)


def _read_back(data_dir, name):
    records = {}
    for split in sources.SPLITS:
        try:
            src = sources.open_split(str(data_dir), name, split)
        except ValueError:  # split not written
            continue
        for i in range(len(src)):
            r = src[i]
            records[r["path"]] = (split, r)
    return records


def test_folders_build_skips_bad_inputs_and_keeps_the_rest(tmp_path, capsys):
    raw = tmp_path / "mine"
    expected, rows = _make_photos(raw)
    # Bad inputs: a corrupt image, a photo without a face, a fake without a CSV row, a CSV row
    # naming a file that is not there, a real photo listed with a non-empty sequence.
    (raw / "fake" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    rows.append(("fake/corrupt.jpg", "[1, 2]"))
    _write(raw / "real" / "no_face.png", np.full((96, 128, 3), MAGENTA, np.uint8))
    unlabelled = synthetic.generate_example("facial_components", 300, image_size=FACE,
                                            sequence=(2,))
    _write(raw / "fake" / "unlabelled.jpg", _photo(unlabelled["image"]))
    rows.append(("fake/gone.png", "[1]"))
    rows.append(("real/person0/r0.jpg", "[2]"))
    expected.pop("real/person0/r0.jpg")
    _write_csv(raw / "labels.csv", rows)

    out = tmp_path / "tfds"
    name = folders.build([str(raw / "real")], [str(raw / "fake")], "mine", str(out),
                         sequences=str(raw / "labels.csv"), detector=BoxDetector(),
                         image_size=48, max_skipped=0.5, val_fraction=0.25, test_fraction=0.25)
    assert name == "folders/mine"
    printed = capsys.readouterr()
    text = printed.out + printed.err
    for path, reason in [("fake/corrupt.jpg", common.UNREADABLE_IMAGE),
                         ("real/no_face.png", common.NO_FACE),
                         ("fake/unlabelled.jpg", folders.NO_SEQUENCE),
                         ("fake/gone.png", folders.UNLISTED),
                         ("real/person0/r0.jpg", common.LABEL_MISMATCH)]:
        assert f"{path}: {reason}" in text, (path, reason)
    with open(out / "folders" / "mine" / "prep_skipped.tsv") as f:
        skipped = {tuple(line.rstrip("\n").split("\t")[1:3]) for line in list(f)[1:]}
    assert skipped == {(common.UNREADABLE_IMAGE, "fake/corrupt.jpg"),
                       (common.NO_FACE, "real/no_face.png"),
                       (folders.NO_SEQUENCE, "fake/unlabelled.jpg"),
                       (folders.UNLISTED, "fake/gone.png"),
                       (common.LABEL_MISMATCH, "real/person0/r0.jpg")}
    with open(out / "folders" / "mine" / "prep_report.json") as f:
        report = json.load(f)
    assert report["ok"] and sum(report["skipped"].values()) == 5

    records = _read_back(out, name)
    assert set(records) == set(expected)  # every good photo, and nothing else
    assert {split for split, _ in records.values()} <= set(sources.SPLITS)
    for path, (split, r) in records.items():
        fake, seq = expected[path]
        assert r["is_fake"] == fake, path
        assert r["label"].tolist() == list(seq) + [0] * (5 - len(seq)), path
        assert r["image"].shape == (48, 48, 3)
        assert r["video_id"] == os.path.splitext(path)[0]
        # The detected box is the pasted 64 px square; with the 0.25 margin the crop side is
        # 96 px, so the box maps to [16, 80) / 96 * 48 = [8, 40) of the 48 px crop, and the
        # landmarks fitted to the box lie within it.
        pts = r["landmarks"]
        assert pts.min() > 8 - 1 and pts.max() < 40 + 1, path
        assert pts.max() - pts.min() > 16  # spread over the face, not collapsed
        centre = r["image"][20:28, 20:28].astype(int)
        assert np.abs(centre - np.array(MAGENTA)).max() > 60  # face, not background
    # The real photos keep their folder as method; the split hash is stable across builds.
    assert records["real/person1/r1.jpg"][1]["method"] == "person1"
    again = folders.build([str(raw / "real")], [str(raw / "fake")], "again", str(out),
                          sequences=str(raw / "labels.csv"), detector=BoxDetector(),
                          image_size=48, max_skipped=0.5, val_fraction=0.25,
                          test_fraction=0.25)
    assert {p: s for p, (s, _) in _read_back(out, again).items()} == \
        {p: s for p, (s, _) in records.items()}


def test_folders_too_many_skipped_fails_naming_the_reason(tmp_path, capsys):
    raw = tmp_path / "mine"
    _make_photos(raw, n_real=3, n_fake=0)
    for i in range(3):
        (raw / "fake" / f"bad{i}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (raw / "fake" / f"bad{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(common.BuildError, match="unreadable image"):
        folders.build([str(raw / "real")], [str(raw / "fake")], "bad", str(tmp_path / "out"),
                      detector=BoxDetector(), val_fraction=0, test_fraction=0)
    assert common.existing_version_dir(str(tmp_path / "out"), "folders/bad") is None
    with pytest.raises(common.BuildError, match="--fake folder not found"):
        folders.build([str(raw / "real")], [str(raw / "nowhere")], "x", str(tmp_path / "out"),
                      detector=BoxDetector())


def _run(module, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_folders_cli_builds_aligned_faces_that_train_and_cross_evaluate(tmp_path):
    # Aligned face crops in train/val/test folders, labelled by a CSV of sequences.
    raw = tmp_path / "crops"
    rows, counts = [], {}
    k = 0
    for split, n in (("train", 16), ("val", 6), ("test", 6)):
        for i in range(n):
            fake = i % 2
            seq = SEQUENCES[k % len(SEQUENCES)] if fake else ()
            ex = synthetic.generate_example("facial_attributes", 500 + k, image_size=64,
                                            sequence=seq)
            rel = f"{'fake' if fake else 'real'}/{split}/{k}.jpg"
            _write(raw / rel, ex["image"])
            if fake:
                rows.append((rel, " ".join(map(str, seq))))
            k += 1
        counts[split] = n
    _write_csv(raw / "seq.csv", rows)
    data = tmp_path / "tfds"
    built = _run("data_prep.folders", "--real", str(raw / "real"), "--fake", str(raw / "fake"),
                 "--sequences", str(raw / "seq.csv"), "--subset", "facial_attributes",
                 "--faces", "aligned", "--landmarks", "template", "--image-size", "64",
                 "--name", "crops", "--data-dir", str(data), "--num-workers", "0")
    assert built.returncode == 0, built.stderr[-3000:]
    for split, n in counts.items():
        assert len(sources.open_split(str(data), "folders/crops", split)) == n

    workdir = tmp_path / "run"
    trained = _run("cmil_jax.main", "--config", "configs/sequences.py:crops,attributes,demo",
                   "--workdir", str(workdir), f"--config.data.data_dir={data}",
                   "--config.data.image_size=32", "--config.model.dilate_last=True",
                   "--config.data.num_workers=0", "--config.model.backbone_width=8",
                   "--config.model.width=48", "--config.eval.batch_size=6",
                   "--config.train.batch_size=4", "--config.train.num_steps=6",
                   "--config.train.log_every=3", "--config.train.eval_every=6",
                   "--config.train.checkpoint_every=6", "--config.eval.select_metrics=fixed_acc")
    assert trained.returncode == 0, trained.stderr[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    (test,) = [r for r in records if r["split"] == "test"]
    assert test["dataset"] == "folders/crops" and test["num_images"] == counts["test"]
    assert 0.0 <= test["fixed_acc"] <= 1.0

    # The trained run tested on another build (here the same crops as a binary dataset):
    # the model comes from the run's config.json, the dataset from cross_eval.py.
    crossed = _run("cmil_jax.main", "--config", "configs/cross_eval.py:folders/crops",
                   "--workdir", str(workdir), "--mode", "eval",
                   f"--config.data.data_dir={data}")
    assert crossed.returncode == 0, crossed.stderr[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        added = [json.loads(line) for line in f][len(records):]
    assert [r["dataset"] for r in added] == ["folders/crops"]
    assert added[0]["num_images"] == counts["test"] and 0.0 <= added[0]["auc"] <= 1.0
