"""A real face photograph through face detection, crop, SBI and predict, and a short video made
from it through predict's video path.

The photograph is scikit-image's astronaut (Eileen Collins, NASA, public domain; 512 x 512
RGB), which ships inside the scikit-image package: nothing is downloaded. Where her face is was
read off the picture by eye (pixels, 512 x 512):
  face (hairline to chin, cheek to cheek)  x 178-264, y 80-165
  eyes (200, 104) and (245, 104), nose tip (222, 128), mouth (225, 145).
Face detection uses predict's default detector (data_prep.landmarks.make_detector('auto')):
dlib when the landmarks extra is installed, else OpenCV's bundled Haar cascade when the
installed OpenCV ships one (OpenCV 5 wheels ship none). Without either, predict's default path
is the whole picture, which is what the default test then checks; the detector's box itself is
checked by the test marked 'landmarks' (pytest -m landmarks, with the extra installed).
"""

import json

import cv2
import jax
import numpy as np
import pytest

from cmil_jax import checkpoint
from cmil_jax import predict
from cmil_jax.data import sbi
from data_prep import faces as face_crops
from data_prep import landmarks as face_lib
from run_dirs import random_init_run

skimage_data = pytest.importorskip("skimage.data", reason="the test extra's scikit-image")

FACE = (178, 80, 264, 165)
EYES = ((200, 104), (245, 104))
NOSE, MOUTH = (222, 128), (225, 145)
SIZE = 64


def astronaut():
    return np.ascontiguousarray(skimage_data.astronaut())


def inside(point, box, margin=0):
    x, y = point
    return box[0] - margin <= x < box[2] + margin and box[1] - margin <= y < box[3] + margin


def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory: config.json and a best checkpoint of a random-init tiny model."""
    return random_init_run(str(tmp_path_factory.mktemp("run")), SIZE)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    d = tmp_path_factory.mktemp("photo")
    cv2.imwrite(str(d / "astronaut.jpg"), cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    return d / "astronaut.jpg"


@pytest.mark.landmarks
def test_the_detector_finds_her_face():
    detector, why = predict.make_face_detector("auto")
    assert detector is not None, f"the landmarks extra is needed here: {why}"
    face = face_lib.largest_face(detector(astronaut()))
    assert face is not None
    box = [float(v) for v in face.box]
    assert iou(box, FACE) > 0.5, box
    for point in (*EYES, NOSE, MOUTH):
        assert inside(point, box), (point, box)
    points, _ = face_lib.face_landmarks(face, astronaut())
    left_eye, right_eye = points[36:42].mean(0), points[42:48].mean(0)  # iBUG 68 layout
    assert np.hypot(*(left_eye - EYES[0])) < 10 and np.hypot(*(right_eye - EYES[1])) < 10


def test_crop_and_sbi_mask_lie_on_the_face():
    """The crop data_prep makes around the face box, then SBI on it with the landmarks that
    box gives (the template fitted to it, as data_prep does for box-only detectors)."""
    image = astronaut()
    crop, offset, scale = face_crops.crop_face(image, FACE, 0.25, 256)
    to_crop = lambda p: face_crops.to_crop_coords(np.asarray([p], np.float64), offset, scale)[0]
    for point in (*EYES, NOSE, MOUTH):  # the face is in the middle of the crop
        x, y = to_crop(point)
        assert 256 * 0.2 < x < 256 * 0.8 and 256 * 0.2 < y < 256 * 0.8
    # The crop is her face: skin tones around the nose, not the grey background.
    x, y = (int(v) for v in to_crop(NOSE))
    r, g, b = crop[y - 8:y + 8, x - 20:x - 8].reshape(-1, 3).mean(0)
    assert r > g > b and r - b > 40
    landmarks, source = face_lib.face_landmarks(face_lib.Face(np.array(FACE, np.float32)))
    assert source == "template-box"
    landmarks = face_crops.to_crop_coords(landmarks, offset, scale)
    face_in_crop = [*to_crop(FACE[:2]), *to_crop(FACE[2:])]
    rng = np.random.default_rng(0)
    for hull in ("whole_face", "extended", "full"):
        for _ in range(3):
            real, fake, mask = sbi.self_blend(crop, landmarks, rng, hull_type=hull)
            assert real.shape == fake.shape == crop.shape and mask.max() > 0
            weight = mask / mask.max()
            for point in (NOSE, MOUTH):  # the blend covers the middle of the face
                px, py = (int(round(v)) for v in to_crop(point))
                assert weight[py, px] > 0.5, (hull, point)
            # Nothing blended away from the face: the mask's mass lies within the face box
            # widened by a tenth of its side (half a side upwards: SBI's forehead), and the
            # crop's bottom corners (her suit) are untouched.
            x0, y0, x1, y1 = face_in_crop
            side = x1 - x0
            yy, xx = np.mgrid[0:256, 0:256]
            region = ((xx >= x0 - 0.1 * side) & (xx < x1 + 0.1 * side)
                      & (yy >= y0 - 0.5 * side) & (yy < y1 + 0.1 * side))
            assert mask[region].sum() / mask.sum() > 0.99, hull
            assert mask[230:, :30].max() == 0 and mask[230:, -30:].max() == 0, hull
            cx = (weight * xx).sum() / weight.sum()
            cy = (weight * yy).sum() / weight.sum()
            fx, fy = (x0 + x1) / 2, (y0 + y1) / 2
            assert abs(cx - fx) < 0.1 * side and abs(cy - fy) < 0.2 * side, (hull, cx, cy)


def test_predict_on_the_photo_and_a_video_of_it(workdir, photo, tmp_path):
    """predict's default path on the real photograph, and a six-frame video made from it."""
    detector, why = predict.make_face_detector("auto")
    clip = tmp_path / "astronaut_clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (448, 448))
    assert writer.isOpened()
    image = astronaut()
    shifts = [(4 * k, 3 * k) for k in range(6)]  # the camera drifts a few pixels per frame
    for dx, dy in shifts:
        writer.write(cv2.cvtColor(image[32 + dy:480 + dy, 32 + dx:480 + dx], cv2.COLOR_RGB2BGR))
    writer.release()
    out = tmp_path / "out"
    code = predict.main([str(photo), str(clip), "--workdir", workdir, "--out", str(out),
                         "--frames-per-video", "32"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == [] and len(summary["written"]) == 2
    record = json.loads((out / "astronaut.json").read_text())
    assert record["image_size"] == [512, 512] and 0 <= record["fake_prob"] <= 1
    assert cv2.imread(str(out / record["overlay"])) is not None
    video = json.loads((out / "astronaut_clip.json").read_text())
    assert video["frames"]["read"] == video["frames"]["sampled"] == video["frames"]["in_video"] == 6
    assert [f["index"] for f in video["per_frame"]] == list(range(6))
    if detector is None:  # predict's default without a detector: the whole picture
        assert record["face"]["aligned"] is False and record["face"]["box"] == [0, 0, 512, 512]
        assert why in record["face"]["note"]
        assert video["frames"]["scored"] == 6 and video["frames"]["with_face"] == 0
        assert all(f["face"]["box"] == [0, 0, 448, 448] for f in video["per_frame"])
    else:  # the face is found in the photo and in every frame, where the camera moved it
        assert record["face"]["aligned"] is True
        assert iou(record["face"]["face_box"], FACE) > 0.5
        assert video["frames"]["with_face"] == video["frames"]["scored"] == 6
        for f, (dx, dy) in zip(video["per_frame"], shifts):
            moved = (FACE[0] - 32 - dx, FACE[1] - 32 - dy, FACE[2] - 32 - dx, FACE[3] - 32 - dy)
            assert iou(f["face"]["face_box"], moved) > 0.5
    assert video["fake_prob"] == pytest.approx(np.mean([f["fake_prob"]
                                                        for f in video["per_frame"]]))
    assert cv2.imread(str(out / video["timeline"])) is not None

    # The crop predict makes around a face box on the real photograph: a square 1.5 times the
    # box's longer side, centred on it, with her eyes, nose and mouth inside.
    known = lambda img: [face_lib.Face(np.array(FACE, np.float32))] if img.shape[0] == 512 else []
    summary = predict.predict_files([str(photo)], workdir, str(tmp_path / "known"),
                                    detector=known, log=lambda *_: None)
    face = json.loads((tmp_path / "known" / summary["written"][0]["json"]).read_text())["face"]
    x0, y0, x1, y1 = face["box"]
    assert x1 - x0 == y1 - y0 == round(1.5 * (FACE[2] - FACE[0]))
    assert all(inside(p, face["box"]) for p in (*EYES, NOSE, MOUTH))
