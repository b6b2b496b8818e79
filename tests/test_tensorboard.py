"""TensorBoard event files: every metrics.jsonl scalar is found in them, read back with a
reader written here from the TFRecord framing (length, masked CRC, Event protobuf)."""

import glob
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from cmil_jax import reporting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_events(logdir):
    """[(file, Event)] of every event file under logdir, in file name order."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"),
                                 recursive=True)):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            assert len(payload) == length, f"{path}: truncated record at byte {pos}"
            event = event_pb2.Event()
            event.ParseFromString(payload)
            events.append((path, event))
            pos += 12 + length + 4
    return events


def scalars(logdir):
    """{(tag, step): value} of the scalar summaries (the last one wins)."""
    out = {}
    for _, event in read_events(logdir):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out[(value.tag, event.step)] = value.simple_value
    return out


def jsonl_scalars(workdir):
    """{(tag, step): value} expected from metrics.jsonl: every finite number of every record."""
    expected = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            extra = {k: record[k] for k in ("checkpoint", "dataset") if k in record}
            for key, value in record.items():
                if key in ("step", "split", *extra) or value is None:
                    continue
                tag = "/".join([record["split"], *(str(v).replace("/", "_")
                                                   for v in extra.values()), key])
                expected[(tag, record["step"])] = value
    return expected


def test_metric_writer_fans_out_to_tensorboard(tmp_path):
    writer = reporting.MetricWriter(str(tmp_path), tensorboard=True)
    writer.write(5, "train", {"loss": 1.25, "lr": np.float32(1e-3), "nonfinite": 0})
    writer.write(10, "train", {"loss": float("nan"), "lr": 2e-3})  # NaN: JSON null, no event
    writer.write(10, "val", {"auc": 0.75, "fixed_acc": 0.5})
    writer.write(10, "test", {"auc": 0.7}, checkpoint="best_auc", dataset="cmil_synthetic/x")
    writer.close()
    got = scalars(tmp_path / "tensorboard")
    expected = jsonl_scalars(tmp_path)
    assert ("test/best_auc/cmil_synthetic_x/auc", 10) in expected
    assert ("train/loss", 10) not in expected
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def test_resume_purges_the_steps_trained_again_and_switch_off(tmp_path):
    writer = reporting.MetricWriter(str(tmp_path), tensorboard=True)
    for step in (5, 10, 15):
        writer.write(step, "train", {"loss": float(step)})
    writer.close()
    resumed = reporting.MetricWriter(str(tmp_path), tensorboard=True)
    assert resumed.drop_after(10) == 1
    resumed.write(15, "train", {"loss": 99.0})
    resumed.close()
    # TensorBoard discards the earlier files' events from the purge step on: a SessionLog
    # START at step 11 opens the new file.
    starts = [(os.path.basename(p), e.step) for p, e in read_events(tmp_path / "tensorboard")
              if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert [step for _, step in starts] == [11]
    (tmp_path / "off").mkdir()
    off = reporting.MetricWriter(str(tmp_path / "off"), tensorboard=False)
    off.write(1, "train", {"loss": 1.0})
    off.close()
    assert not os.path.exists(tmp_path / "off" / "tensorboard")


@pytest.mark.slow
def test_training_run_writes_its_metrics_and_val_maps(tmp_path):
    workdir = str(tmp_path / "run")
    tiny = ["--config.data.synthetic.num_train=48", "--config.data.synthetic.num_val=16",
            "--config.data.synthetic.num_test=16", "--config.data.image_size=64",
            "--config.data.num_workers=0", "--config.model.backbone_width=8",
            "--config.model.width=48", "--config.train.batch_size=4",
            "--config.train.num_steps=6", "--config.train.log_every=3",
            "--config.train.eval_every=6", "--config.train.checkpoint_every=6",
            "--config.eval.batch_size=8"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "cmil_jax.main", "--config",
                          "configs/seqattr.py:demo", "--workdir", workdir,
                          f"--config.data.data_dir={tmp_path / 'data'}", *tiny],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = jsonl_scalars(workdir)
    splits = {tag.split("/")[0] for tag, _ in expected}
    assert splits == {"train", "val", "test"}
    got = scalars(os.path.join(workdir, "tensorboard"))
    missing = set(expected) - set(got)
    assert not missing, sorted(missing)[:10]
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-6), key
    images = [(e.step, v.image) for _, e in read_events(os.path.join(workdir, "tensorboard"))
              for v in e.summary.value if v.tag == "val/maps" and v.HasField("image")]
    assert [step for step, _ in images] == [6]
    # Four val images, each beside its map: 4 x (64 x 128) stacked by TensorBoard's grid.
    assert images[0][1].width > 0 and images[0][1].encoded_image_string[:4] == b"\x89PNG"
