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
    cmd = [sys.executable, "-m", "benchmarks.input_pipeline", "--smoke", "--workers", "1,2"]
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
    assert {"date", "command", "machine", "args", "load_average_start", "sbi", "triples"} <= set(
        result
    )
    assert {"cpu_model", "vcpus", "numpy", "opencv", "grain"} <= set(result["machine"])
    for impl in ("ours", "reference"):
        assert result["sbi"][impl]["median"] > 0 and result["sbi"][impl]["cpu_ms_per_item"] > 0
        assert all(r > 0 for r in result["sbi"][impl]["windows"])
    configs = result["triples"]["configs"]
    assert sorted((c["impl"], c["workers"]) for c in configs) == [
        ("ours", 1),
        ("ours", 2),
        ("reference", 1),
        ("reference", 2),
    ]
    for c in configs:
        assert c["median"] > 0 and len(c["windows"]) == result["args"]["windows"]
        assert all(r > 0 for r in c["windows"])
    for impl in ("ours", "reference"):
        assert result["triples"]["scaling"][impl]["2w/1w"] > 0
    assert "pairs/s" in proc.stdout and "triples/s" in proc.stdout
