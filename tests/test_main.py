"""End to end through the command line: train on tiny synthetic data, resume, eval, bad data."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config.data.synthetic.num_train=120",
    "--config.data.synthetic.num_val=40",
    "--config.data.synthetic.num_test=40",
    "--config.data.image_size=64",
    "--config.data.num_workers=0",
    "--config.model.backbone_width=8",
    "--config.model.width=48",
    "--config.train.batch_size=8",
    "--config.train.log_every=5",
    "--config.train.eval_every=10",
    "--config.train.checkpoint_every=10",
    "--config.eval.batch_size=16",
]


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "cmil_jax.main", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_train_resume_and_eval(tmp_path):
    workdir = str(tmp_path / "run")
    data_dir = str(tmp_path / "data")
    common = ["--config", "configs/seqattr.py:demo", "--workdir", workdir,
              f"--config.data.data_dir={data_dir}", *TINY]

    first = _run(*common, "--config.train.num_steps=20")
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("config.json", "metrics.jsonl", "plots/curves.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, "config.json")) as f:
        recorded = json.load(f)
    assert recorded["train"]["num_steps"] == 20
    # The runtime choice is resolved once and recorded beside the config ('auto' as given).
    from cmil_jax import config_base, runtime

    assert recorded["runtime"]["kernels"] == "auto"
    assert recorded["resolved_runtime"]["kernels"] == runtime.resolve(
        config_base.base_config(), log=False).layers.name
    log = first.stdout + first.stderr
    assert "runtime: cpu, 1 device(s), compute dtype float32 (model.dtype 'auto'), ResNet layers" in log
    records = _records(workdir)
    train_steps = [r["step"] for r in records if r["split"] == "train" and "loss" in r]
    assert train_steps == [5, 10, 15, 20]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [10, 20]
    test = [r for r in records if r["split"] == "test"]
    assert {r["checkpoint"] for r in test} == {"best_fixed_acc", "best_adaptive_acc"}
    for r in test:
        assert r["num_images"] == 40
        for key in ("fixed_acc", "adaptive_acc", "exact_match", "map", "auc", "eer", "ap",
                    "pixel_auc", "best_iou", "pointing_game"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert r["dataset"] == "cmil_synthetic/facial_attributes"
        assert 0 < r["num_localized"] <= 40  # fakes with a manipulation mask
        assert "video_auc" not in r  # single images: no video-level metrics
    with open(os.path.join(workdir, "results.md")) as f:
        table = f.read()
    assert "pixel AUC" in table and "best_fixed_acc" in table
    assert all(r["loss"] > 0 for r in records if r["split"] == "train" and "loss" in r)

    # Resuming with a config that differs from the recorded one stops, naming the fields...
    changed = _run(*common, "--config.train.num_steps=30", "--config.model.width=96",
                   "--config.runtime.xla_cpu_conv=default")  # runtime fields never count
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert "model.width: 48 -> 96" in changed.stderr
    assert "train.num_steps: 20 -> 30" in changed.stderr
    differing = changed.stderr.split("differing fields:", 1)[1].split("\n", 1)[0]
    assert "runtime." not in differing and "--accept_config_changes" in changed.stderr
    assert not os.path.exists(os.path.join(workdir, "config_changes.jsonl"))
    assert len(_records(workdir)) == len(records)  # nothing ran
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["width"] == 48  # the recording is kept

    # ... and the same command with more steps and the flag resumes at step 20, recording the
    # accepted change.
    second = _run(*common, "--config.train.num_steps=30", "--accept_config_changes")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resumed from" in second.stdout + second.stderr
    with open(os.path.join(workdir, "config_changes.jsonl")) as f:
        (accepted,) = [json.loads(line) for line in f]
    assert accepted["changes"] == {"train.num_steps": [20, 30]}
    assert accepted["resumed_from_step"] == 20
    new_train = [r["step"] for r in _records(workdir)[len(records):]
                 if r["split"] == "train" and "loss" in r]
    assert new_train == [25, 30]

    # --mode eval tests the best checkpoints again, without training, with the model of the
    # recorded config: no --config (nor any training override) needed.
    n_before = len(_records(workdir))
    third = _run("--workdir", workdir, "--mode", "eval")
    assert third.returncode == 0, third.stderr[-3000:]
    added = _records(workdir)[n_before:]
    assert added and all(r["split"] == "test" for r in added)
    last_test = {r["checkpoint"]: r for r in _records(workdir)[:n_before] if r["split"] == "test"}
    for r in added:  # the same checkpoints on the same data give the same metrics
        assert r["step"] == last_test[r["checkpoint"]]["step"]
        assert r["fixed_acc"] == pytest.approx(last_test[r["checkpoint"]]["fixed_acc"])
        assert r["num_images"] == 40

    # With --config, eval takes only the datasets from it; a model override is refused.
    refused = _run("--config", "configs/seqattr.py:demo", "--workdir", workdir, "--mode", "eval",
                   "--config.model.width=64")
    assert refused.returncode == 2 and "model.width" in refused.stderr
    assert "recorded with model.width=48" in refused.stderr


def test_missing_data_fails_fast_with_path_and_command(tmp_path):
    missing = str(tmp_path / "nowhere")
    start = time.time()
    result = _run("--config", "configs/seqattr.py", "--workdir", str(tmp_path / "w"),
                  f"--config.data.data_dir={missing}", timeout=120)
    elapsed = time.time() - start
    assert result.returncode != 0
    assert missing in result.stderr
    assert "python -m data_prep.seq_deepfake" in result.stderr
    assert elapsed < 60


def test_config_typo_fails(tmp_path):
    result = _run("--config", "configs/seqattr.py:demo", "--workdir", str(tmp_path / "w"),
                  "--config.train.num_stepz=3", timeout=120)
    assert result.returncode != 0
    assert "num_stepz" in result.stderr


def test_unwritable_workdir_fails_fast_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = _run("--config", "configs/seqattr.py:demo", "--workdir", str(blocker / "run"),
                  timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot write to --workdir {blocker}/run" in result.stderr


def test_joint_training_mixes_a_binary_dataset_and_tests_both(tmp_path):
    workdir = str(tmp_path / "joint")
    result = _run("--config", "configs/joint.py:demo", "--workdir", workdir,
                  f"--config.data.data_dir={tmp_path / 'data'}", *TINY,
                  "--config.train.batch_size=4", "--config.train.num_steps=10",
                  "--config.eval.select_metrics=fixed_acc")
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(workdir)
    val = [r for r in records if r["split"] == "val"]
    assert val and all(0.0 <= r["joint_auc"] <= 1.0 and "joint_fixed_acc" not in r for r in val)
    test = {r["dataset"]: r for r in records if r["split"] == "test"}
    assert set(test) == {"cmil_synthetic/facial_components", "cmil_synthetic/facial_attributes"}
    assert "fixed_acc" in test["cmil_synthetic/facial_components"]
    binary_only = test["cmil_synthetic/facial_attributes"]
    assert "fixed_acc" not in binary_only and 0.0 <= binary_only["auc"] <= 1.0
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["joint_name"] == "cmil_synthetic/facial_attributes"


def test_peak_memory_is_the_largest_device_peak_where_reported(monkeypatch):
    import jax

    from cmil_jax import train

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    monkeypatch.setattr(jax, "local_devices", lambda: [Device({"peak_bytes_in_use": 3e9}),
                                                       Device({"peak_bytes_in_use": 5e9}),
                                                       Device({"bytes_in_use": 1})])
    assert train._peak_memory() == {"peak_memory_gb": 5.0}
    monkeypatch.setattr(jax, "local_devices", lambda: [Device(None)])  # the CPU reports none
    assert train._peak_memory() == {}
