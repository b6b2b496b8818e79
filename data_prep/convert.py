"""Copy a built dataset into another data dir with its pixels stored in another record format.

    python -m data_prep.convert --data-dir /data/tfds --out-dir /data/tfds_raw \
        --name seq_deepfake/facial_components [--name ffpp/c23 ...] [--image-format raw] \
        [--compression zstd|none]

Training then reads the copy with ``--config.data.data_dir=/data/tfds_raw`` (same dataset
names, versions, splits and record order). 'raw' (``cmil_jax.data.sources.IMAGE_FORMATS``)
stores every image and mask as its decoded uint8 pixels, which ArrayRecord compresses with
zstd: reading a record then needs no image codec, at the price of larger records (speed and
sizes: docs/datasets.md, "Faster reading"). Nothing else in a record changes, and the pixels
are those the original bytes decode to with this machine's OpenCV (PNG is lossless, so PNG
records give the same pixels everywhere; JPEG decoders of other OpenCV builds may differ in
the last bit). 'png' converts back (lossless).

``--compression`` is ArrayRecord's own, per record: 'zstd' (level 3, as TFDS writes) or
'none'. Uncompressed raw records take more disk (twice the zstd ones for the synthetic faces)
and skip the decompression (about 0.2 ms of CPU per 256 px record, docs/datasets.md). Readers
need no option: every ArrayRecord chunk names its compression.

A record whose image or mask does not decode is copied unchanged (training skips it as it
would have skipped the original; each is listed at the end). The copy is written next to its
final place and renamed when complete, so an interrupted conversion leaves nothing that
training could read; an existing copy is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

_SHARD_MARK = ".array_record-"
# ArrayRecord writer options per --compression; 'zstd' is what TFDS's own writer uses.
COMPRESSION_OPTIONS = {"zstd": "group_size:1", "none": "group_size:1,uncompressed"}


def _convert_record(rec: dict, image_format: str) -> tuple[dict, str | None]:
    """(the record with its image and mask re-encoded, None) or (the record unchanged, why)."""
    from cmil_jax.data import sources  # pylint: disable=import-outside-toplevel

    image = sources.decode_image(rec["image"])
    if image is None:
        return rec, "image does not decode"
    mask = sources.decode_mask(rec.get("mask", b""), image.shape[:2])
    if mask is None or mask.shape != image.shape[:2]:
        return rec, "mask does not decode to the image's shape"
    out = dict(rec)
    out["image"] = sources.encode_image(image, image_format)
    if "mask" in rec:
        out["mask"] = sources.encode_mask(mask, image_format) if rec["mask"] else b""
    return out, None


def convert(data_dir: str, name: str, out_dir: str, image_format: str = "raw",
            overwrite: bool = False, compression: str = "zstd") -> str:
    """Writes dataset ``name`` ('<builder>/<config>') of ``data_dir`` under ``out_dir`` in
    ``image_format``, its ArrayRecord files with ``compression`` (COMPRESSION_OPTIONS);
    returns the new version directory (module docstring)."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

    from cmil_jax.data import sources  # pylint: disable=import-outside-toplevel

    if image_format not in sources.IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sources.IMAGE_FORMATS}, "
                         f"got {image_format!r}")
    if compression not in COMPRESSION_OPTIONS:
        raise ValueError(f"compression must be one of {tuple(COMPRESSION_OPTIONS)}, "
                         f"got {compression!r}")
    src_dir = sources.find_version_dir(os.path.join(data_dir, name))
    if src_dir is None:
        raise FileNotFoundError(f"dataset {name!r} not found: no complete TFDS dataset "
                                f"(dataset_info.json) under {os.path.join(data_dir, name)}")
    dst_dir = os.path.join(out_dir, name, os.path.basename(src_dir))
    if os.path.realpath(dst_dir) == os.path.realpath(src_dir):
        raise ValueError(f"--out-dir must differ from --data-dir (both hold {src_dir})")
    if os.path.exists(dst_dir):
        if not overwrite:
            print(f"{name}: {dst_dir} exists; kept (--overwrite replaces it)", flush=True)
            return dst_dir
        shutil.rmtree(dst_dir)
    features = tfds.builder_from_directory(src_dir).info.features
    tmp_dir = dst_dir + ".incomplete"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    split_bytes: dict[str, int] = {}
    kept: list[str] = []
    for entry in sorted(os.listdir(src_dir)):
        src, dst = os.path.join(src_dir, entry), os.path.join(tmp_dir, entry)
        if _SHARD_MARK not in entry:
            if os.path.isfile(src):
                shutil.copy2(src, dst)
            continue
        split = entry.split(_SHARD_MARK)[0].rsplit("-", 1)[-1]
        reader = array_record_module.ArrayRecordReader(src, "readahead_buffer_size:0")
        writer = array_record_module.ArrayRecordWriter(dst, COMPRESSION_OPTIONS[compression])
        try:
            for i in range(reader.num_records()):
                rec = features.deserialize_example_np(reader.read([i])[0])
                rec, problem = _convert_record(rec, image_format)
                if problem:
                    kept.append(f"{entry} record {i}: {problem}")
                data = features.serialize_example(rec)
                split_bytes[split] = split_bytes.get(split, 0) + len(data)
                writer.write(data)
        finally:
            writer.close()
            reader.close()
    info_path = os.path.join(tmp_dir, "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    for split in info.get("splits", []):
        if split.get("name") in split_bytes:
            split["numBytes"] = str(split_bytes[split["name"]])
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    os.rename(tmp_dir, dst_dir)
    print(f"{name}: {image_format} copy ({compression}) -> {dst_dir}", flush=True)
    if kept:
        print(f"{name}: {len(kept)} records copied unchanged (training skips them):", flush=True)
        for line in kept:
            print(f"  {line}", flush=True)
    return dst_dir


def main(argv=None) -> int:
    from cmil_jax.data import sources  # pylint: disable=import-outside-toplevel

    p = argparse.ArgumentParser(prog="python -m data_prep.convert",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", required=True, help="TFDS data dir holding the dataset")
    p.add_argument("--out-dir", required=True, help="TFDS data dir to write the copy into")
    p.add_argument("--name", action="append", required=True, metavar="BUILDER/CONFIG",
                   help="dataset to convert, e.g. seq_deepfake/facial_components (repeatable)")
    p.add_argument("--image-format", choices=sources.IMAGE_FORMATS, default="raw",
                   help="how the copy stores images and masks")
    p.add_argument("--compression", choices=tuple(COMPRESSION_OPTIONS), default="zstd",
                   help="ArrayRecord compression of the copy's records ('none': larger files, "
                        "no decompression when reading)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing copy")
    args = p.parse_args(argv)
    try:
        for name in args.name:
            convert(args.data_dir, name, args.out_dir, args.image_format, args.overwrite,
                    args.compression)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
