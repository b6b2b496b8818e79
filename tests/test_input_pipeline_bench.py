"""The input pipeline benchmark in its smoke form, and the plain SBI reference it times."""

import json
import os
import subprocess
import sys

import numpy as np

from benchmarks.sbi_reference import reference_self_blend
from cmil_jax.data import sbi, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_sbi_outputs_are_valid():
    ex = synthetic.generate_example("facial_components", 1, seed=2, image_size=96)
    no_jpeg = sbi.SBIConfig(jpeg_p=0.0)
    for seed in range(4):
        real, fake, mask = reference_self_blend(
            ex["image"], ex["landmarks"], np.random.default_rng(seed), no_jpeg
        )
        assert real.dtype == fake.dtype == np.uint8 and real.shape == fake.shape == (96, 96, 3)
        assert mask.dtype == np.float32 and mask.shape == (96, 96)
        assert 0.0 <= mask.min() and 0.0 < mask.max() <= 1.0
        assert np.array_equal(fake[mask == 0], real[mask == 0])


def test_smoke_run_writes_all_figures(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.input_pipeline", "--smoke", "--workers", "1,2",
           "--formats", "png,raw"]
    proc = subprocess.run(
        [*cmd, "--json", str(out)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"date", "command", "machine", "args", "load_average_start", "sbi", "triples",
            "stages"} <= set(result)
    assert {"cpu_model", "vcpus", "numpy", "opencv", "grain"} <= set(result["machine"])
    for impl in ("ours", "reference"):
        assert result["sbi"][impl]["median"] > 0 and result["sbi"][impl]["cpu_ms_per_item"] > 0
        assert all(r > 0 for r in result["sbi"][impl]["windows"])
    configs = result["triples"]["configs"]
    assert sorted((c["impl"], c["format"], c["workers"]) for c in configs) == [
        ("ours", "png", 1),
        ("ours", "png", 2),
        ("ours", "raw", 1),
        ("ours", "raw", 2),
        ("reference", "png", 1),
        ("reference", "png", 2),
    ]
    for c in configs:
        assert c["median"] > 0 and len(c["windows"]) == result["args"]["windows"]
        assert all(r > 0 for r in c["windows"]) and c["cpu_ms_per_item"] > 0
    for name in ("ours png", "ours raw", "reference png"):
        assert result["triples"]["scaling"][name]["2w/1w"] > 0
    stages = result["stages"]["cpu_ms_per_triple"]
    assert set(stages) == {"png", "raw"}
    for per_stage in stages.values():
        assert {"read", "decode", "sbi", "augment", "triple", "batch"} <= set(per_stage)
        assert per_stage["triple"] > 0 and per_stage["sbi"] > 0
    assert "pairs/s" in proc.stdout and "triples/s" in proc.stdout
    assert "| ours raw |" in proc.stdout and "| stage | png | raw |" in proc.stdout


def test_before_tree_runs_another_trees_pipeline(tmp_path):
    """--before-tree times the pipeline of a given source tree (here this one) in a child
    process, alongside the others; 'raw-none' reads the raw records copied uncompressed."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.input_pipeline", "--smoke", "--workers", "0",
           "--formats", "raw-none", "--skip-sbi", "--skip-stages", "--before-tree", ROOT,
           "--json", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    configs = json.loads(out.read_text())["triples"]["configs"]
    assert sorted((c["impl"], c["format"], c["workers"]) for c in configs) == [
        ("before", "raw-none", 0),
        ("ours", "raw-none", 0),
        ("reference", "raw-none", 0),
    ]
    before = next(c for c in configs if c["impl"] == "before")
    assert before["median"] > 0 and before["worker_processes"] >= 1  # the child process
