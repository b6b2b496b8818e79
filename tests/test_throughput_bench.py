"""benchmarks/throughput.py and benchmarks/profile_step.py in tiny forms on the CPU."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--backbone", "resnet10", "--backbone-width", "8", "--image-size", "64",
        "--dtype", "float32", "--warmup", "1"]


def _run(args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_import_train_without_tfds_keeps_the_real_grain_pipeline():
    """A GPU image without TFDS: sources is a stand-in, the pipeline (grain only) is real, and
    the stand-in answers probes (hasattr / getattr with a default) like any module."""
    code = (
        "import sys; sys.modules['tensorflow_datasets'] = None\n"
        "from benchmarks import throughput\n"
        "train, note = throughput.import_train()\n"
        "import cmil_jax.data.pipeline as p, cmil_jax.data.sources as s\n"
        "assert callable(p.make_triple_train_dataset), p\n"
        "assert not hasattr(s, 'open_split') and getattr(s, 'torch', 42) == 42\n"
        "assert issubclass(s.DataError, ValueError)\n"
        "assert 'tensorflow_datasets' in note and 'pipeline' not in note, note\n"
        "assert callable(train.make_train_step)\n"
        "print('ok')\n"
    )
    proc = _run(["-c", code], timeout=300)
    assert proc.stdout.strip().endswith("ok")


def test_end_to_end_on_triples_reports_both_rates(tmp_path):
    out = tmp_path / "t.json"
    _run(["-m", "benchmarks.throughput", *TINY, "--batch", "4", "--steps", "2", "--windows",
          "2", "--only", "jax_train", "--no-infer", "--end-to-end", "--e2e-workers", "0",
          "--e2e-examples", "12", "--e2e-steps", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    e2e = result["end_to_end"]
    # 2 triples make 6 images; the step takes the first 4, the shape it was compiled for.
    assert e2e["data"] == "triples" and e2e["triples_per_step"] == 2
    assert e2e["images_made_per_step"] == 6 and e2e["images_per_step"] == 4
    # No second compile: the device-only runner's first call is a plain step.
    assert e2e["device_only_first_call_s"] < 0.5 * result["runners"]["jax_train"]["first_call_s"]
    assert len(e2e["windows_images_per_sec"]) == len(e2e["device_only_windows_images_per_sec"])
    assert e2e["jax_train_end_to_end_images_per_sec"] > 0
    assert e2e["jax_train_device_only_images_per_sec"] > 0
    ratio = e2e["jax_train_end_to_end_images_per_sec"] / e2e["jax_train_device_only_images_per_sec"]
    assert abs(e2e["end_to_end_vs_device_only"] - ratio) < 1e-9


def test_profile_step_sums_kernels_of_both_frameworks(tmp_path):
    proc = _run(["-m", "benchmarks.profile_step", *TINY, "--batch", "2", "--steps", "2",
                 "--top", "5", "--out", str(tmp_path)])
    text = (tmp_path / "profile_resnet10.md").read_text()
    assert text.strip() in proc.stdout
    assert "### cmil_jax train step: XLA:CPU thunks" in text
    assert "### PyTorch twin eager train step: aten operators" in text
    # Each section: wall time, a positive kernel sum, 5 kernels and the kinds table.
    for section in text.split("### ")[1:]:
        summed = float(section.split("summed kernel time ")[1].split(" ms/step")[0])
        assert summed > 0
        assert section.count("\n| `") == 5
        assert "| kind | ms/step | % |" in section
