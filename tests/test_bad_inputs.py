"""Bad input to the user-facing commands: predict's readers on damaged and unusual files, and
config values and overrides that cannot work. Every bad input gets a message naming the file or
the field and what was expected (exit status 2 for the commands), never a traceback alone, and
nothing else of a batch is lost."""

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib

import cv2
import numpy as np
import pytest
from test_predict import SIZE, workdir  # noqa: F401  (the fixture: a tiny run directory)

from cmil_jax import config_base, predict
from data_prep import faces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RED = (220, 30, 40)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _huge_png(side=20000) -> bytes:
    """A well-formed PNG whose header says side x side RGB pixels (1.2 GB decoded at 20000),
    with the first rows of image data only: a few hundred bytes on disk."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + 3 * side) * 4)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows)
            + _png_chunk(b"IEND", b""))


def _encode(ext, array):
    ok, data = cv2.imencode(ext, array)
    assert ok
    return data.tobytes()


def _mp4_without_its_index(path):
    """An MP4 that a writer began (ftyp, mdat) but whose index, the moov box it writes last,
    is cut off after its first 16 bytes."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(10):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"moov":
            break
        pos += size
    assert pos < len(data), "no moov box written"
    path.write_bytes(data[:pos + 16])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    png, jpg = _encode(".png", face), _encode(".jpg", face)
    (d / "a_good.png").write_bytes(png)
    grey16 = np.full((40, 40), 0x8000, np.uint16)
    grey16[:, 20:] = 0xFFFF
    (d / "b_grey16.png").write_bytes(_encode(".png", grey16))
    (d / "c_grey.png").write_bytes(_encode(".png", np.full((40, 40), 77, np.uint8)))
    bgra = np.zeros((40, 40, 4), np.uint8)
    bgra[..., :3] = RED[::-1]
    bgra[:, :20, 3] = 255  # left half opaque, right half transparent
    (d / "d_alpha.png").write_bytes(_encode(".png", bgra))
    try:
        from PIL import Image
    except ImportError:
        pass  # the CMYK case is skipped, saying why
    else:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), RED).convert("CMYK").save(buffer, "JPEG", quality=95)
        (d / "e_cmyk.jpg").write_bytes(buffer.getvalue())
    (d / "f_truncated.png").write_bytes(png[:len(png) // 2])
    (d / "g_truncated.jpg").write_bytes(jpg[:len(jpg) * 2 // 3])
    (d / "h_empty.png").write_bytes(b"")
    (d / "i_huge.png").write_bytes(_huge_png())
    _mp4_without_its_index(d / "j_no_index.mp4")
    return d


EXPECTED_SKIPS = {
    "f_truncated.png": "truncated PNG: no IEND chunk at its end",
    "g_truncated.jpg": "truncated JPEG: no end-of-image marker after its image data",
    "h_empty.png": "empty file (0 bytes)",
    "i_huge.png": "20000x20000 pixels (400 megapixels) is more than the 100 megapixels "
                  "decoded at most; downscale it first",
}


def test_predict_reads_what_it_can_and_lists_the_rest(workdir, inputs, tmp_path,  # noqa: F811
                                                      monkeypatch):
    decoded = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: (
        decoded.append(len(buf)), real_imdecode(buf, flags))[1])
    out = tmp_path / "out"
    assert predict.main([str(inputs), "--workdir", workdir, "--out", str(out),
                         "--face", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    skipped = {os.path.basename(s["path"]): s["reason"] for s in summary["skipped"]}
    for name, reason in EXPECTED_SKIPS.items():
        assert skipped.pop(name) == reason, name
    assert skipped.pop("j_no_index.mp4").startswith(
        "OpenCV cannot open it as a video: an MP4/MOV file without its whole index")
    assert not skipped
    # The huge image was refused from its header: never handed to the decoder.
    assert os.path.getsize(inputs / "i_huge.png") not in decoded

    written = [os.path.basename(r["image"]) for r in summary["written"]]
    good = ["a_good.png", "b_grey16.png", "c_grey.png", "d_alpha.png"]
    assert written == good + (["e_cmyk.jpg"] if (inputs / "e_cmyk.jpg").exists() else [])
    assert summary["counts"]["images"] == len(written)
    assert summary["counts"]["skipped"] == len(EXPECTED_SKIPS) + 1
    for name in written:
        record = json.loads((out / (os.path.splitext(name)[0] + ".json")).read_text())
        assert 0.0 <= record["fake_prob"] <= 1.0 and record["model_input_size"] == SIZE
        assert cv2.imread(str(out / record["overlay"])) is not None


def test_predict_stops_with_status_4_when_the_disk_fills(workdir, inputs, tmp_path,  # noqa: F811
                                                         monkeypatch, capsys):
    """The disk fills while the second overlay is written: exit 4 naming the file; the first
    record and overlay are whole, nothing of the second is left, no summary is written."""
    import builtins
    import errno

    real_open = builtins.open

    def open_until_full(file, mode="r", *args, **kwargs):
        if "w" in mode and "b_grey16.png" in os.path.basename(str(file)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_until_full)
    out = tmp_path / "out"
    images = [str(inputs / n) for n in ("a_good.png", "b_grey16.png", "c_grey.png")]
    assert predict.main([*images, "--workdir", workdir, "--out", str(out), "--face", "none",
                         "--batch_size", "1"]) == 4
    err = capsys.readouterr().err
    assert f"error: out of disk space writing {out / 'b_grey16.png'}" in err
    assert "Traceback" not in err
    assert sorted(os.listdir(out)) == ["a_good.json", "a_good.png"]
    assert json.loads((out / "a_good.json").read_text())["overlay"] == "a_good.png"
    assert cv2.imread(str(out / "a_good.png")) is not None


def test_unusual_images_become_8_bit_rgb(inputs):
    grey16 = predict.read_image(str(inputs / "b_grey16.png"))
    assert grey16.dtype == np.uint8 and grey16.shape == (40, 40, 3)
    assert (grey16[:, :20] == 128).all() and (grey16[:, 20:] == 255).all()  # the high byte
    assert (predict.read_image(str(inputs / "c_grey.png")) == 77).all()
    alpha = predict.read_image(str(inputs / "d_alpha.png"))
    assert (alpha == RED).all()  # alpha dropped, transparent pixels keep their colour
    if not (inputs / "e_cmyk.jpg").exists():
        pytest.skip("CMYK JPEG not made: Pillow is not installed (it writes the test file)")
    cmyk = predict.read_image(str(inputs / "e_cmyk.jpg"))
    assert cmyk.shape == (40, 40, 3)
    assert np.abs(cmyk.astype(int) - RED).max() <= 6  # not inverted, not channel-swapped


def test_image_size_limit_is_read_from_the_header():
    assert faces.header_size(_huge_png(30000)) == (30000, 30000)
    with pytest.raises(ValueError, match="30000x30000 pixels .* more than the 100 megapixels"):
        faces.decode_image(_huge_png(30000))
    small = _encode(".png", np.zeros((50, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"40x50 pixels \(0 megapixels\) is more than the "
                                         r"0.001 megapixels"):
        faces.decode_image(small, max_pixels=1000)
    assert faces.decode_image(small, max_pixels=None).shape == (50, 40, 3)


def test_predict_on_a_run_with_a_broken_config_json(workdir, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": {"width": 48,')
    assert predict.main(["x.png", "--workdir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"error: {run / 'config.json'} is not valid JSON (line 1" in err
    (run / "config.json").write_text('["not", "a", "config"]')
    assert predict.main(["x.png", "--workdir", str(run)]) == 2
    assert "expected a JSON object with the config sections" in capsys.readouterr().err


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("field, value, expected", [
    ("data.image_size", -5, "must be an integer >= 32"),
    ("data.image_size", 0, "must be an integer >= 32"),
    ("data.image_size", 2.5, "must be an integer >= 32"),
    ("data.num_workers", -1, "must be an integer >= 0"),
    ("data.augment.flip_p", 1.5, "must be a number in [0, 1]"),
    ("data.augment.crop_scale", (0.5,), "must be a pair (lo, hi)"),
    ("data.augment.crop_scale", (0.9, 0.5), "must be a pair (lo, hi)"),
    ("data.synthetic.num_val", 0, "must be an integer >= 1"),
    ("model.width", 0, "must be an integer >= 1"),
    ("model.num_heads", 5, "must divide model.width=192"),
    ("model.dtype", "float16", "must be one of ('auto', 'float32', 'bfloat16', 'float64')"),
    ("loss.tau", 0.0, "must be a number > 0"),
    ("loss.lambda1", -1.0, "must be a number >= 0"),
    ("train.batch_size", 0, "must be an integer >= 1"),
    ("train.num_steps", -3, "must be an integer >= 0"),
    ("train.lr", 0.0, "must be a number > 0"),
    ("train.lr", float("nan"), "must be a number > 0"),
    ("train.b2", 1.0, "must be a number in [0, 1)"),
    ("train.keep_checkpoints", 0, "must be an integer >= 1"),
    ("train.log_every", 0, "must be an integer >= 1"),
    ("train.debug_sigterm_at", "eval", "'eval' is not 'eval:STEP'"),
    ("eval.batch_size", -16, "must be an integer >= 1"),
    ("eval.threshold", 2.0, "must be a number in [0, 1]"),
    ("eval.select_metrics", " , ", "must name at least one metric"),
])
def test_config_values_out_of_range_name_the_field(field, value, expected):
    cfg = config_base.seq_config("facial_attributes", "demo_single")
    config_base.check_values(cfg)
    config_base._set_field(cfg, field, value)  # pylint: disable=protected-access
    with pytest.raises(config_base.ConfigError) as info:
        config_base.check_values(cfg)
    assert str(info.value).startswith(f"config field {field}=")
    assert expected in str(info.value)


@pytest.mark.parametrize("name, variant", [
    ("seqattr", None), ("seqattr", "demo"), ("seqcomp", "demo_single"), ("ffpp", "c40"),
    ("ffpp", "demo"), ("binary", "celebdf,demo"), ("cross_eval", "celebdf"), ("joint", "demo"),
    ("sequences", "x,components"),
])
def test_every_shipped_config_passes_the_checks(name, variant):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config() if variant is None else module.get_config(variant)
    config_base.check_values(cfg)
    config_base.validate(cfg, devices=1, processes=1)


def test_config_values_that_depend_on_the_backbone_or_the_length():
    cfg = config_base.seq_config("facial_attributes", "demo_single")
    cfg.model.backbone = "swin_t"
    cfg.data.image_size = 72  # fine for ResNets (3x3 cells), not for Swin
    with pytest.raises(config_base.ConfigError,
                       match="data.image_size=72: the swin_t backbone needs a multiple of 32"):
        config_base.check_values(cfg)
    cfg.data.image_size = 96
    config_base.check_values(cfg)
    cfg.model.backbone = "resnet51"
    with pytest.raises(config_base.ConfigError, match="model.backbone='resnet51': must be one of"):
        config_base.validate(cfg, devices=1, processes=1)
    cfg = config_base.seq_config("facial_attributes", "demo_single")
    cfg.train.num_steps, cfg.train.num_epochs = 0, 0  # the length comes from the epochs
    with pytest.raises(config_base.ConfigError, match="train.num_epochs=0: must be an integer "
                                                      ">= 1 when train.num_steps is 0"):
        config_base.check_values(cfg)


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "cmil_jax.main", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    return result, time.time() - start


@pytest.mark.parametrize("override, expected", [
    ("--config.data.image_size=-5", "config field data.image_size=-5: must be an integer >= 32"),
    ("--config.data.image_size=abc", "flag --config.data.image_size=abc: invalid literal for "
                                     "int()"),
    ("--config.train.batch_size=0", "config field train.batch_size=0: must be an integer >= 1"),
    ("--config.data.imagesize=96", "--config.data.imagesize=96: config field data.imagesize "
                                   "does not exist (did you mean data.image_size?)"),
    ("--config=configs/seqattr.py:bogus", "unknown config variant 'bogus'"),
    ("--config=configs/nowhere.py", "cannot load --config"),
])
def test_bad_overrides_stop_at_once_with_status_2(tmp_path, override, expected):
    args = ["--config", "configs/seqattr.py:demo", "--workdir", str(tmp_path / "w"), override]
    result, seconds = _cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()  # stopped before anything started
    assert seconds < 60
