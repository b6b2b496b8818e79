"""benchmarks/throughput.py and benchmarks/profile_step.py in tiny forms on the CPU."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--backbone", "resnet10", "--backbone-width", "8", "--image-size", "64",
        "--dtype", "float32", "--warmup", "1"]


def _run(args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_variants_parse_into_runtime_fields_and_xla_options():
    from benchmarks import throughput

    v = throughput.parse_variant("conv_onednn+ynn_dot+xla_cpu_enable_fast_math=true")
    assert v.runtime == {"kernels": "onednn", "xla_cpu_conv": "eigen"}
    assert v.xla_options == {"xla_cpu_enable_fast_math": True}
    assert throughput.parse_variant("kernels=matmul").runtime == {"kernels": "matmul"}


def test_end_to_end_on_triples_reports_both_rates(tmp_path):
    """The real synthetic TFDS data through the training pipeline, feeding train.setup's step:
    the config is base_config() with the command line's fields, and the recorded runtime is
    what runtime.resolve gives for it (as training would resolve it)."""
    from benchmarks import throughput
    from cmil_jax import config_base, runtime

    out = tmp_path / "t.json"
    args = [*TINY, "--batch", "4", "--steps", "2", "--windows", "2", "--only", "jax_train",
            "--no-infer", "--kernels", "xla", "--end-to-end", "--e2e-workers", "0",
            "--e2e-examples", "12", "--e2e-steps", "2", "--json", str(out)]
    _run(["-m", "benchmarks.throughput", *args])
    result = json.loads(out.read_text())

    expected = config_base.base_config()
    expected.model.update(backbone="resnet10", backbone_width=8, dtype="float32")
    expected.data.image_size = 64
    expected.runtime.kernels = "xla"
    assert result["config"] == json.loads(json.dumps(expected.to_dict()))  # tuples: lists
    cfg = throughput.make_config(throughput.parse_args(args))
    assert cfg.to_dict() == expected.to_dict()
    assert result["runtime"] == runtime.resolve(cfg).describe()
    assert result["runtime"]["kernels"] == "xla"

    e2e = result["end_to_end"]
    assert "error" not in e2e, e2e
    # 2 triples make 6 images; the step takes the first 4, the shape it was compiled for.
    assert e2e["data"] == "triples" and e2e["triples_per_step"] == 2
    assert e2e["images_made_per_step"] == 6 and e2e["images_per_step"] == 4
    assert e2e["records"] == 12
    # No second compile: the device-only runner's first call is a plain step.
    assert e2e["device_only_first_call_s"] < 0.5 * result["runners"]["jax_train"]["first_call_s"]
    assert len(e2e["windows_images_per_sec"]) == len(e2e["device_only_windows_images_per_sec"])
    assert e2e["jax_train_end_to_end_images_per_sec"] > 0
    assert e2e["jax_train_device_only_images_per_sec"] > 0
    ratio = e2e["jax_train_end_to_end_images_per_sec"] / e2e["jax_train_device_only_images_per_sec"]
    assert abs(e2e["end_to_end_vs_device_only"] - ratio) < 1e-9


def test_profile_step_sums_kernels_of_both_frameworks(tmp_path):
    proc = _run(["-m", "benchmarks.profile_step", *TINY, "--batch", "2", "--steps", "2",
                 "--top", "5", "--kernels", "matmul", "--out", str(tmp_path)])
    text = (tmp_path / "profile_resnet10.md").read_text()
    assert text.strip() in proc.stdout
    assert "layers 'matmul'" in text.splitlines()[0]
    assert "### cmil_jax train step: XLA:CPU thunks" in text
    assert "### PyTorch twin eager train step: aten operators" in text
    jax_section, twin_section, floor_section = text.split("### ")[1:]
    # Each framework's section: wall time, a positive kernel sum, 5 kernels and the kinds table.
    sums = []
    for section in (jax_section, twin_section):
        summed = float(section.split("summed kernel time ")[1].split(" ms/step")[0])
        assert summed > 0
        assert section.count("\n| `") == 5
        assert "| kind | ms/step | % |" in section
        sums.append(summed)
    # The floor table's profiled total is the JAX step's kernel sum, split by kind.
    assert floor_section.startswith("cmil_jax train step against its floor")
    total_row = next(line for line in floor_section.splitlines() if line.startswith("| total |"))
    assert float(total_row.split("|")[5]) == pytest.approx(sums[0], abs=0.02)
