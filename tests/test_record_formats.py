"""Record formats: raw pixel records decode to the PNG records' pixels, and give the same
training data for a seed (sources.IMAGE_FORMATS, data_prep.convert)."""

import os

import numpy as np
import pytest

from cmil_jax.data import pipeline, sources, synthetic_dataset
from data_prep import convert

SUBSET = "facial_components"
SIZE = 64
N_TRAIN, N_VAL, N_TEST = 24, 3, 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{format: (data_dir, name)}: the same synthetic dataset built in each format."""
    out = {}
    for fmt in sources.IMAGE_FORMATS:
        data_dir = str(tmp_path_factory.mktemp(fmt))
        name = synthetic_dataset.build_synthetic(data_dir, SUBSET, SIZE, N_TRAIN, N_VAL, N_TEST,
                                                 num_workers=1, image_format=fmt)
        out[fmt] = data_dir, name
    return out


def _open(built, fmt, split="train"):
    data_dir, name = built[fmt]
    return sources.open_split(data_dir, name, split)


def test_raw_round_trip_and_the_png_path_agree():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    raw = sources.encode_raw(image)
    assert raw.startswith(sources.RAW_MAGIC) and len(raw) > image.nbytes
    decoded = sources.decode_image(raw)
    np.testing.assert_array_equal(decoded, image)
    np.testing.assert_array_equal(decoded, sources.decode_image(sources.encode_png(image)))
    assert decoded.flags.writeable and decoded.dtype == np.uint8
    np.testing.assert_array_equal(sources.decode_mask(sources.encode_raw(mask), (37, 53)), mask)
    np.testing.assert_array_equal(sources.decode_mask(sources.encode_png(mask), (37, 53)), mask)
    # A grey raw image decodes to RGB like a grey PNG does.
    np.testing.assert_array_equal(sources.decode_image(sources.encode_raw(mask)),
                                  sources.decode_image(sources.encode_png(mask)))
    # An all-zero mask is stored as no mask at all in raw records, and reads back as zeros.
    zeros = np.zeros((37, 53), np.uint8)
    assert sources.encode_mask(zeros, "raw") == b""
    np.testing.assert_array_equal(sources.decode_mask(b"", (37, 53)), zeros)
    np.testing.assert_array_equal(sources.decode_mask(sources.encode_mask(zeros, "png"),
                                                      (37, 53)), zeros)


def test_damaged_raw_bytes_are_not_decoded():
    image = np.zeros((8, 9, 3), np.uint8)
    raw = sources.encode_raw(image)
    assert sources.decode_image(raw[:-1]) is None  # truncated
    assert sources.decode_image(raw + b"\0") is None  # too long
    assert sources.decode_image(raw[:12]) is None  # shorter than the header
    assert sources.decode_mask(raw, (8, 9)) is None  # 3 channels are not a mask
    with pytest.raises(ValueError, match="uint8"):
        sources.encode_raw(image.astype(np.float32))
    with pytest.raises(ValueError, match="image_format"):
        sources.encode_image(image, "jpeg2000")


def test_damaged_raw_record_names_record_and_header(built):
    src = _open(built, "raw", "val")
    rec = dict(src.raw(1))
    rec["image"] = rec["image"][:-5]
    src._ds = [src.raw(0), rec]  # record 1 damaged
    with pytest.raises(sources.DataError,
                       match=r"split 'val' record 1 .*raw record of \d+ bytes; its header says "
                             r"64x64x3, expected \d+ bytes"):
        src[1]


def test_formats_store_the_same_records(built):
    """Every record of every split decodes identically from both formats."""
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        png, raw = _open(built, "png", split), _open(built, "raw", split)
        assert len(png) == len(raw) == n
        assert png.raw(0)["image"].startswith(b"\x89PNG")
        assert raw.raw(0)["image"].startswith(sources.RAW_MAGIC)
        for i in range(n):
            a, b = png[i], raw[i]
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{split} {i} {k}")
                assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype
    with pytest.raises(ValueError, match="image_format"):
        synthetic_dataset.build_synthetic(built["raw"][0], SUBSET, SIZE, N_TRAIN, N_VAL, N_TEST,
                                          image_format="jpeg")


def _batches(it, n):
    batches = [next(it) for _ in range(n)]
    if hasattr(it, "close"):
        it.close()
    return batches


def _assert_same_batches(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_triples_and_batches_identical_for_a_seed(built):
    png, raw = _open(built, "png"), _open(built, "raw")
    kw = {"batch_size": 3, "seed": 5, "image_size": 48, "shard": False, "with_masks": True}
    a = _batches(iter(pipeline.make_triple_train_dataset(png, **kw)), 3)
    b = _batches(iter(pipeline.make_triple_train_dataset(raw, **kw)), 3)
    _assert_same_batches(a, b)
    assert a[0]["image"].shape == (9, 48, 48, 3) and a[0]["mask"].shape == (9, 48, 48)
    np.testing.assert_array_equal(a[0]["is_fake"], [0, 1, 1] * 3)
    assert not a[0]["mask"][0::3].any() and a[0]["mask"][1::3].any()  # genuine 0, SBI blend
    # The raw records through a grain worker process give the same batches.
    c = _batches(iter(pipeline.make_triple_train_dataset(raw, num_workers=1, **kw)), 3)
    _assert_same_batches(a, c)
    _assert_same_batches(_batches(iter(pipeline.make_train_dataset(png, **kw)), 2),
                         _batches(iter(pipeline.make_train_dataset(raw, **kw)), 2))


def test_convert_copies_a_dataset_into_raw_and_back(built, tmp_path):
    data_dir, name = built["png"]
    out_raw, out_png = str(tmp_path / "raw"), str(tmp_path / "png")
    assert convert.main(["--data-dir", data_dir, "--out-dir", out_raw, "--name", name]) == 0
    version = convert.convert(out_raw, name, out_png, image_format="png")
    assert version.startswith(out_png)
    for split in ("train", "val", "test"):
        original = sources.open_split(data_dir, name, split)
        copies = [sources.open_split(d, name, split) for d in (out_raw, out_png)]
        assert copies[0].raw(0)["image"].startswith(sources.RAW_MAGIC)
        assert copies[1].raw(0)["image"].startswith(b"\x89PNG")
        for i in range(len(original)):
            for copy in copies:
                a, b = original[i], copy[i]
                for k in a:
                    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{split} {i} {k}")
    # --compression none: the same records in larger files that hold every record's bytes.
    out_none = str(tmp_path / "raw_none")
    assert convert.main(["--data-dir", out_raw, "--out-dir", out_none, "--name", name,
                         "--compression", "none"]) == 0
    for split in ("train", "val", "test"):
        zstd, plain = (sources.open_split(d, name, split) for d in (out_raw, out_none))
        for i in range(len(zstd)):
            assert zstd.raw(i)["image"] == plain.raw(i)["image"]
            a, b = zstd[i], plain[i]
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{split} {i} {k}")

    def shard_bytes(root, split):
        version = sources.find_version_dir(os.path.join(root, name))
        return sum(os.path.getsize(os.path.join(version, f)) for f in os.listdir(version)
                   if f"-{split}.array_record-" in f)

    image_bytes = sum(len(sources.open_split(out_raw, name, "train").raw(i)["image"])
                      for i in range(len(sources.open_split(out_raw, name, "train"))))
    # (ArrayRecord files grow in 64 KiB blocks, so only the order is compared.)
    assert shard_bytes(out_none, "train") >= image_bytes
    assert shard_bytes(out_none, "train") > shard_bytes(out_raw, "train")
    with pytest.raises(SystemExit):  # argparse names the choices
        convert.main(["--data-dir", out_raw, "--out-dir", out_none, "--name", name,
                      "--compression", "lz4"])
    # A record that does not decode is copied as it is (training skips it as before).
    bad = {"image": b"not an image", "mask": b"", "label": np.zeros(5, np.int32)}
    assert convert._convert_record(bad, "raw") == (bad, "image does not decode")
    # An existing copy is kept; a missing dataset is named.
    assert convert.convert(data_dir, name, out_raw) == version.replace(out_png, out_raw)
    assert convert.main(["--data-dir", data_dir, "--out-dir", out_raw,
                         "--name", "seq_deepfake/nothing"]) == 1
