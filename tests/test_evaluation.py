"""Evaluation suite: binary metric set, video grouping, localization entry point, results
table and the Table A1 sweep tool (no training)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from cmil_jax import evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ binary


def test_binary_metrics_known_values():
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 1])
    r = evaluation.binary_metrics(scores, labels)
    assert r == {"auc": 1.0, "eer": 0.0, "ap": 1.0, "acc": 1.0}
    r = evaluation.binary_metrics(1 - scores, labels, prefix="mil_")
    assert r["mil_auc"] == 0.0 and r["mil_eer"] == 1.0 and r["mil_acc"] == 0.0
    one_class = evaluation.binary_metrics(scores, np.ones(6, int))
    assert np.isnan(one_class["auc"]) and np.isnan(one_class["eer"])


def test_video_level_metrics_average_frames():
    # Video a (real) has one confusing frame; averaged per video the ranking is perfect.
    scores = np.array([0.1, 0.95, 0.2, 0.8, 0.6, 0.7, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    vids = np.array(["a", "a", "a", "b", "b", "c", "c"])
    r = evaluation.binary_metrics(scores, labels, video_ids=vids)
    assert r["auc"] < 1.0
    assert r["video_auc"] == 1.0 and r["video_eer"] == 0.0 and r["video_ap"] == 1.0
    assert r["num_videos"] == 3
    with pytest.raises(ValueError, match="constant within each video"):
        evaluation.binary_metrics(scores, labels, video_ids=np.array(["a"] * 7))


def test_video_ids_of_a_split():
    class Source:
        def __init__(self, records):
            self.records = records

        def __len__(self):
            return len(self.records)

        def raw(self, i):
            return self.records[i]

    frames = Source([{"video_id": b"Deepfakes/000_003", "path": b"x/0.png"},
                     {"video_id": b"Deepfakes/000_003", "path": b"x/1.png"},
                     {"video_id": b"real/000", "path": b"y/0.png"}])
    np.testing.assert_array_equal(evaluation.video_ids(frames),
                                  ["Deepfakes/000_003", "Deepfakes/000_003", "real/000"])
    # Single images (no video_id: each record is its own video) get no video-level metrics.
    images = Source([{"path": f"synthetic/attr/test/{i:08d}".encode()} for i in range(4)])
    assert evaluation.video_ids(images) is None
    assert evaluation.video_ids(Source([])) is None


# ------------------------------------------------------------------------------ localization


def test_localization_metrics_accumulate_over_batches():
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 32, 32), np.uint8)
    for i, (y, x) in enumerate(rng.integers(0, 24, (6, 2))):
        masks[i, y:y + 8, x:x + 8] = 255
    masks[5] = 0  # a genuine image: left out
    sim = rng.random((6, 16)).astype(np.float32)  # (B, N) as the eval step returns
    once = evaluation.localization_metrics(sim, masks)
    meter = evaluation.LocalizationMeter()
    evaluation.localization_metrics(sim[:2], masks[:2], meter=meter)
    total = evaluation.localization_metrics(sim[2:], masks[2:], meter=meter)
    assert total == pytest.approx(once)
    assert once["num_localized"] == 5
    # Low similarity where the mask is: perfect localization.
    grid = np.ones((1, 4, 4), np.float32)
    grid[0, 1, 2] = 0.0
    mask = np.zeros((1, 32, 32), np.uint8)
    mask[0, 8:16, 16:24] = 255
    r = evaluation.localization_metrics(grid, mask, valid=np.array([1.0]))
    assert r["pixel_auc"] > 0.95 and r["pointing_game"] == 1.0


# ------------------------------------------------------------------------------ results table


def _write_metrics(workdir, records):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_test_records_keep_newest_per_checkpoint_and_dataset(tmp_path):
    _write_metrics(tmp_path, [
        {"step": 10, "split": "val", "fixed_acc": 0.1},
        {"step": 10, "split": "test", "checkpoint": "best_fixed_acc", "fixed_acc": 0.2},
        {"step": 10, "split": "test", "checkpoint": "best_auc", "auc": 0.5},
        {"step": 20, "split": "test", "checkpoint": "best_fixed_acc", "fixed_acc": 0.3},
        {"step": 20, "split": "test", "checkpoint": "best_fixed_acc", "dataset": "cdf:test",
         "auc": 0.7},
    ])
    rows = evaluation.test_records(str(tmp_path))
    assert [(r["checkpoint"], r.get("dataset", ""), r["step"]) for r in rows] == [
        ("best_auc", "", 10), ("best_fixed_acc", "", 20), ("best_fixed_acc", "cdf:test", 20)]
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        evaluation.test_records(str(tmp_path / "none"))


def test_results_table_format_and_file(tmp_path, capsys):
    rows = [
        {"checkpoint": "best_fixed_acc", "step": 600, "fixed_acc": 0.59678, "auc": 0.97,
         "eer": 0.081, "pixel_auc": None, "num_images": 1000.0, "f1_macro": 0.5},
        {"checkpoint": "best_auc", "dataset": "celeb_df:test", "step": 400, "auc": float("nan"),
         "num_images": 50.0},
    ]
    table = evaluation.results_table(rows)
    lines = table.strip().split("\n")
    assert lines[0] == ("| checkpoint | dataset | step | Fixed-Acc | AUC p(x) | EER p(x) "
                        "| pixel AUC | images |")
    assert lines[2] == "| best_fixed_acc |  | 600 | 59.68 | 97.00 | 8.10 | - | 1000 |"
    assert lines[3] == "| best_auc | celeb_df:test | 400 | - | - | - | - | 50 |"
    _write_metrics(tmp_path, [{"step": 1, "split": "test", "checkpoint": "best_x", "auc": 0.5}])
    path = evaluation.write_results(str(tmp_path))
    assert path == str(tmp_path / "results.md")
    with open(path) as f:
        text = f.read()
    assert text.startswith("# Test results") and "| best_x | 1 | 50.00 |" in text
    assert "| best_x | 1 | 50.00 |" in capsys.readouterr().out
    assert evaluation.main(["--workdir", str(tmp_path / "missing")]) == 2


# ------------------------------------------------------------------------------ Table A1 sweep


def test_sweep_commands_and_table(tmp_path, capsys):
    sweep = _load_tool("sweep_table_a1")
    assert list(sweep.SETTINGS) == ["I", "II", "III", "IV", "V", "VI", "VII"]
    assert sweep.main(["--base_workdir", str(tmp_path), "--ci", "--dry_run",
                       "--settings", "I,VI", "--", "--config.train.num_steps=7"]) == 0
    cmds = capsys.readouterr().out.strip().split("\n")
    assert len(cmds) == 2
    assert "--config.loss.tau=0.5" in cmds[1] and "--config.loss.lambda1=1.0" in cmds[1]
    assert cmds[1].endswith(f"--config.train.num_steps=7 --config.data.data_dir={tmp_path}/data")
    assert "--config.train.num_steps=40" in cmds[0]  # the --ci size comes first, then extras
    with pytest.raises(SystemExit):
        sweep.main(["--base_workdir", str(tmp_path), "--settings", "VIII", "--dry_run"])

    for s, acc in (("I", 0.5), ("IV", 0.45)):
        _write_metrics(tmp_path / f"setting_{s}", [
            {"step": 40, "split": "test", "checkpoint": "best_fixed_acc", "fixed_acc": acc,
             "adaptive_acc": 0.3, "auc": 0.9}])
    results = {s: sweep.setting_result(str(tmp_path / f"setting_{s}"), "fixed_acc")
               for s in ("I", "IV", "VII")}
    assert results["VII"] is None
    lines = sweep.table(results, "fixed_acc").strip().split("\n")
    assert lines[0].startswith("| Setting | lambda_1 | lambda_2 | tau | alpha | Fixed-Acc (vs I)")
    assert lines[2].startswith("| I | 1 | 1 | 0.2 | 1 | 50.00 (+0.00) | 30.00 | - | - | 90.00")
    assert lines[3].startswith("| IV | 1 | 0.5 | 0.2 | 1 | 45.00 (-5.00) |")
    assert lines[3].endswith("| 72.33 (-2.21) |")
    assert lines[4].startswith("| VII |") and "| - | - |" in lines[4]
