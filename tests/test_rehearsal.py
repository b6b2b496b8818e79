"""A dress rehearsal of the paper path on the CPU, test-sized.

configs/joint.py as shipped (supplementary Table A2: ResNet-50 from ImageNet weights, the
resolved compute dtype, genuine / SBI / fake triples of Seq-FaceComp with FF++ mixed in,
evaluation of FF++ by the video protocol, the results table) through `python -m cmil_jax.main`,
offline, on data built by the project's own builders from fixtures in the official layouts:
data_prep.seq_deepfake from synthetic faces, data_prep.videos from MPEG-4 videos of them. Only
sizes are overridden (64 px, a narrow transformer, 4 triples a step, 4 steps).
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_data_prep import CROP, SAMPLED, SquareDetector, _make_ffpp
from test_pretrained import _hub_cache, _weights_file, _write_seq_fixture, safetensors_bytes

from cmil_jax import labels
from data_prep import seq_deepfake, videos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow

STEPS = 4
FRAMES_PER_VIDEO = 2  # of the SAMPLED frames the builder stores per video


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Seq-FaceComp (24 / 6 / 6 images) and FF++ c23 (videos of 6 frames, 3 stored per video)
    built into one data directory."""
    seq_raw = tmp_path_factory.mktemp("seq_raw")
    ffpp_raw = tmp_path_factory.mktemp("ffpp_raw")
    out = tmp_path_factory.mktemp("tfds")
    _write_seq_fixture(seq_raw, {"train": 24, "val": 6, "test": 6})
    assert seq_deepfake.main(["--raw-dir", str(seq_raw), "--data-dir", str(out),
                              "--image-size", "64", "--num-workers", "0"]) == 0
    _make_ffpp(ffpp_raw)
    assert videos.build("ffpp", str(ffpp_raw), str(out), frames=SAMPLED, image_size=CROP,
                        detector=SquareDetector(), max_skipped=0.4) == "ffpp/c23"
    return out


def test_the_joint_paper_recipe_end_to_end(tmp_path, data_dir):
    state = _weights_file("resnet50", seed=2)
    data = safetensors_bytes(state)
    _hub_cache(tmp_path / "hf" / "hub", "timm/resnet50.tv_in1k", "model.safetensors", data)
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XLA_"))}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "cmil_jax.main", "--config", "configs/joint.py",
         "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
         f"--config.train.weights_cache={tmp_path / 'cache'}", "--config.data.image_size=64",
         "--config.data.num_workers=0", "--config.model.width=48",
         "--config.train.batch_size=4", f"--config.train.num_steps={STEPS}",
         "--config.train.log_every=2", f"--config.train.eval_every={STEPS}",
         f"--config.train.checkpoint_every={STEPS}", "--config.eval.batch_size=6",
         "--config.eval.select_metrics=fixed_acc", "--config.train.tensorboard=False",
         # the fixture's FF++ test split keeps no genuine video (its quirks): test on val
         "--config.data.joint_test_split=val",
         f"--config.video.frames_per_video={FRAMES_PER_VIDEO}"],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr

    # Weights loaded from the hub cache, checked; the dtype resolved and recorded.
    assert "backbone resnet50: weights resnet50.tv_in1k" in log
    assert "compute dtype float32 (model.dtype 'auto')" in log
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["model"]["backbone"] == "resnet50" and recorded["data"]["triples"]
    assert recorded["resolved_weights"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert recorded["resolved_weights"]["checked"] == "hub cache"
    assert recorded["resolved_runtime"]["dtype"] == "float32"

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    train = [r for r in records if r["split"] == "train" and "loss" in r]
    assert [r["step"] for r in train] == list(range(2, STEPS + 1, 2))
    assert all(np.isfinite(r["loss"]) for r in train)
    # Triples, read off the first batch: 4 a step, half of them FF++ (data.joint_fraction).
    assert "first batch: 12 images of 64 x 64 (4 triples: genuine, SBI, fake; 2 of them " \
        "from ffpp/c23)" in log

    # Each val pass scores Seq-FaceComp val and FF++ val; FF++ by the video protocol.
    (val,) = [r for r in records if r["split"] == "val"]
    n_videos = 2 + 2 * len(videos.FFPP_METHODS)  # two originals, both directions per method
    assert val["num_images"] == 6 and 0 <= val["fixed_acc"] <= 1
    assert val["joint_num_videos"] == n_videos
    assert val["joint_frames_per_video"] == FRAMES_PER_VIDEO
    assert val["joint_num_images"] == n_videos * FRAMES_PER_VIDEO
    assert val["joint_frames_not_sampled"] == n_videos * (SAMPLED - FRAMES_PER_VIDEO)

    # The best checkpoint tested on both datasets: one row each in metrics and results.md.
    test = {r["dataset"]: r for r in records if r["split"] == "test"}
    assert set(test) == {"seq_deepfake/facial_components", "ffpp/c23"}
    seq, ffpp = test["seq_deepfake/facial_components"], test["ffpp/c23"]
    assert seq["num_images"] == 6 and "fixed_acc" in seq
    assert ffpp["video_protocol"] == f"{FRAMES_PER_VIDEO}_frames_mean"
    for key in ("auc", "video_auc", "class_auc", "class_video_auc", "eer", "ap"):
        assert 0.0 <= ffpp[key] <= 1.0, key
    assert "fixed_acc" not in ffpp  # FF++ rows carry no sequence label
    results = (workdir / "results.md").read_text()
    for expected in ("seq_deepfake/facial_components", "ffpp/c23", "video AUC p(x)",
                     f"at most {FRAMES_PER_VIDEO} stored frames per video",
                     f"{n_videos} videos, {n_videos * FRAMES_PER_VIDEO} frames"):
        assert expected in results, expected
    assert f"{100 * ffpp['video_auc']:.2f}" in results

    # The backbone trained from the file's weights: conv1 moved by AdamW (lr 1e-5) only.
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / str(STEPS)
                                                      / "state"))
    kernel = np.asarray(restored["params"]["backbone"]["conv1"]["kernel"])
    expected = state["conv1.weight"].transpose(2, 3, 1, 0)
    assert np.abs(kernel - expected).max() < STEPS * 1.5e-5
    assert int(restored["step"]) == STEPS
    assert len(labels.CLASS_NAMES["facial_components"]) == restored["params"]["class_tokens"].shape[0]


def test_rehearsal_benchmark_reads_a_run(tmp_path):
    """benchmarks/rehearsal.py's summary of a metrics.jsonl: rates after the first window,
    the largest peak memory, first and last loss, every validation pass."""
    from benchmarks import rehearsal

    lines = [{"step": 1, "split": "train", "time_to_first_step_s": 40.0},
             {"step": 10, "split": "train", "loss": 4.0, "images_per_sec": 100.0},
             {"step": 20, "split": "train", "loss": 3.0, "images_per_sec": 900.0,
              "peak_memory_gb": 30.5},
             {"step": 20, "split": "val", "fixed_acc": 0.5, "auc": 0.7, "map": 0.6},
             {"step": 30, "split": "train", "loss": 2.5, "images_per_sec": 1000.0,
              "peak_memory_gb": 31.0},
             {"step": 30, "split": "train", "loss": 2.0, "images_per_sec": 1100.0,
              "peak_memory_gb": 30.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    got = rehearsal.summarize(str(tmp_path))
    assert got["images_per_sec_windows"] == [900.0, 1000.0, 1100.0]
    assert got["images_per_sec_median"] == 1000.0 and got["peak_memory_gb"] == 31.0
    assert (got["loss_first"], got["loss_last"], got["steps"]) == (4.0, 2.0, 30)
    assert got["val"] == [{"step": 20, "fixed_acc": 0.5, "auc": 0.7, "map": 0.6}]
    assert got["time_to_first_step_s"] == 40.0 and not got["tested"]
