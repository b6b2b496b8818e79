"""predict: a run directory with a random-init tiny model, a folder with good, non-square,
corrupt and non-image files, face crops from a given detector."""

import json
import os

import cv2
import jax
import numpy as np
import pytest

from cmil_jax import checkpoint
from cmil_jax import predict
from cmil_jax.data import synthetic
from cmil_jax.labels import CLASS_NAMES
from data_prep import landmarks as face_lib
from run_dirs import random_init_run

SIZE = 64
KEYS = {"schema_version", "kind", "image", "fake_prob", "sequence", "class_probs", "image_size",
        "model_input_size", "face", "gradcam_class", "overlay", "checkpoint"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory: config.json and a best checkpoint of a random-init tiny model."""
    return random_init_run(str(tmp_path_factory.mktemp("run")), SIZE)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    face = synthetic.generate_example("facial_attributes", 3, image_size=SIZE)["image"]
    cv2.imwrite(str(d / "face.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    wide = cv2.resize(face, (80, 50))
    cv2.imwrite(str(d / "wide.jpg"), cv2.cvtColor(wide, cv2.COLOR_RGB2BGR))
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden.png").write_bytes(b"")
    return d


def test_folder_with_corrupt_and_non_square_files(workdir, folder, tmp_path):
    out = tmp_path / "out"
    code = predict.main([str(folder), str(tmp_path / "missing.png"), "--workdir", workdir,
                         "--out", str(out), "--batch_size", "4"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [os.path.basename(r["image"]) for r in summary["written"]] == ["face.png", "wide.jpg"]
    skipped = {os.path.basename(s["path"]): s["reason"] for s in summary["skipped"]}
    assert set(skipped) == {"broken.jpg", "notes.txt", "missing.png"}
    assert "not a decodable image" in skipped["broken.jpg"]
    assert "no such file" in skipped["missing.png"]
    assert summary["checkpoint"]["metric"] == "fixed_acc" and summary["checkpoint"]["step"] == 5

    names = CLASS_NAMES["facial_attributes"]
    for stem, size in (("face", [SIZE, SIZE]), ("wide", [80, 50])):
        record = json.loads((out / f"{stem}.json").read_text())
        assert set(record) == KEYS
        assert 0.0 <= record["fake_prob"] <= 1.0
        assert list(record["class_probs"]) == list(names)
        assert all(0.0 <= p <= 1.0 for p in record["class_probs"].values())
        assert set(record["sequence"]) <= set(names)
        # The sequence lists the classes above the threshold by descending probability.
        above = sorted((n for n, p in record["class_probs"].items() if p > 0.5),
                       key=lambda n: -record["class_probs"][n])
        assert record["sequence"] == above
        assert record["image_size"] == size and record["model_input_size"] == SIZE
        assert record["face"]["aligned"] is False
        assert "whole image" in record["face"]["note"]
        assert record["gradcam_class"] in names
        overlay = cv2.imread(str(out / record["overlay"]))
        assert overlay is not None and overlay.shape[0] > 256
    wide = json.loads((out / "wide.json").read_text())
    assert "aspect ratio changed" in wide["face"]["note"]
    assert wide["face"]["box"] == [0, 0, 80, 50]
    # The overlay keeps the input's aspect ratio: 4 panels of 256 * 80 / 50 px plus gaps.
    assert cv2.imread(str(out / "wide.png")).shape[1] == 4 * 410 + 3 * 4


def test_face_crop_with_a_detector_and_name_clashes(workdir, tmp_path):
    ex = synthetic.generate_example("facial_attributes", 5, image_size=SIZE)
    canvas = np.full((100, 140, 3), 90, np.uint8)
    canvas[20:84, 50:114] = ex["image"]
    for sub in ("a", "b"):
        os.makedirs(tmp_path / sub)
        cv2.imwrite(str(tmp_path / sub / "img.png"), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    calls = []

    def detector(image):
        calls.append(image.shape)
        if len(calls) == 2:
            return []  # the second image: no face found
        return [face_lib.Face(np.array([60, 30, 104, 80], np.float32)),
                face_lib.Face(np.array([0, 0, 10, 10], np.float32))]  # the largest one wins

    out = tmp_path / "out"
    summary = predict.predict_files([str(tmp_path / "a"), str(tmp_path / "b")], workdir,
                                    str(out), detector=detector, log=lambda *_: None)
    assert calls == [(100, 140, 3), (100, 140, 3)]
    assert [r["json"] for r in summary["written"]] == ["img.json", "img_2.json"]
    first = json.loads((out / "img.json").read_text())
    assert first["face"]["aligned"] is True and first["face"]["face_box"] == [60, 30, 104, 80]
    x0, y0, x1, y1 = first["face"]["box"]
    assert x1 - x0 == y1 - y0 == 75  # side 50 * (1 + 2 * 0.25), centred on the box
    assert (x0 + x1) / 2 == pytest.approx(82, abs=1) and (y0 + y1) / 2 == pytest.approx(55, abs=1)
    second = json.loads((out / "img_2.json").read_text())
    assert second["face"]["aligned"] is False and "no face found" in second["face"]["note"]


def test_missing_run_and_no_detector(tmp_path):
    assert predict.main(["x.png", "--workdir", str(tmp_path)]) == 2
    detector, reason = predict.make_face_detector("none")
    assert detector is None and "off" in reason
