"""1 and 4 devices on the training-triples recipe compute the same training, up to rounding.

benchmarks/device_count_drift.py trains the triples demo (tiny sizes) from one state on one
set of batches on meshes of 1 and 4 virtual CPU devices, and from a state perturbed by about
one float32 rounding. In float64 a defect tied to the device count (data order, rows of a
triple split apart, BatchNorm statistics over other rows, a random stream per device) would
show as in float32, while the order of additions changes results only at float64's rounding:
the 4-device parameters must stay within 1e-11 of the 1-device ones, far below the drift that
a 1e-7 perturbation of the initial weights causes in the same steps.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def test_four_devices_match_one_device_in_float64_on_triples(tmp_path):
    out = tmp_path / "drift.json"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_count_drift", "--steps", "4", "--kernels",
         "xla", "--float64", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["xla"]
    steps = result["steps"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["four"] < 1e-11, r
        assert r["loss_four"] == pytest.approx(r["loss_one"], rel=1e-12), r
    # The perturbation is visible from the first step on: the comparison can see differences.
    assert all(r["perturbed"] > 1e-8 for r in steps), steps
    # Gradients of the first batch: every leaf within float64 rounding except the attention key
    # bias, whose gradient is zero in exact arithmetic (its relative difference is noise/noise).
    for g in result["gradients"]:
        assert "['key']['bias']" in g["leaf"] or g["difference"] < 1e-11, g
