"""benchmarks/step_floor.py (the step's FLOPs and minimum bytes) and benchmarks/gpu_report.py."""

import json

import pytest

from benchmarks import gpu_report, step_floor, throughput


def _config(backbone, size, width=None):
    args = throughput.parse_args(["--backbone", backbone, "--image-size", str(size)]
                                 + (["--backbone-width", str(width)] if width else []))
    return throughput.make_config(args)


def test_resnet50_layers_and_flops_match_torchvision():
    """torchvision's ResNet-50 at 224 px: 53 convolutions (49 in the blocks, 4 shortcuts) each
    followed by a BatchNorm, 4.09 GMAC per image forward (its documented GFLOPS, 4.09, counts
    multiply-adds; 2 MMAC of it are the classifier, which CMIL does not have)."""
    shapes = step_floor.record_shapes(_config("resnet50", 224), batch=2)
    assert len(shapes.convs) == 53 and len(shapes.norms) == 53
    assert sum(1 for _, relu, res in shapes.norms if res) == 16  # one per block
    assert shapes.pools == [((2, 112, 112, 64), (2, 56, 56, 64))]
    macs = sum(o[1] * o[2] * o[3] * k * k * i[-1] for i, o, k in shapes.convs)
    assert macs == pytest.approx(4.09e9 - 2.05e6, rel=0.01)
    # The backbone's 23.5 M convolution weights (torchvision: 25.56 M with fc and BatchNorm).
    assert shapes.conv_params == pytest.approx(23.45e6, rel=0.01)


def test_floor_counts_each_pass_once():
    """A one-layer network by hand: what each kind must move."""
    shapes = step_floor.Shapes(
        convs=[((2, 8, 8, 4), (2, 8, 8, 16), 3), ((2, 8, 8, 16), (2, 8, 8, 16), 1)],
        norms=[((2, 8, 8, 16), True, False), ((2, 8, 8, 16), True, True)],
        pools=[], image=(2, 16, 16, 3), params=1000, conv_params=3 * 3 * 4 * 16 + 16 * 16)
    n = 2 * 8 * 8 * 16
    out = step_floor.floor(shapes, act_bytes=2, copy_gbs=1.0, matmul_tflops=1e-3)
    # BatchNorm + ReLU: x | x -> y | dy, x | dy, x -> dx: 8 accesses; with the residual add,
    # 12 (the residual read three times, its gradient written once).
    assert out["batch norm"]["gbytes"] == pytest.approx(2 * n * (8 + 12) / 1e9)
    # The stem convolution has no input gradient: 2 passes; the second, 3.
    flops = 2 * n * 9 * 4 * 2 + 2 * n * 16 * 3
    assert out["convolutions"]["gflop"] == pytest.approx(flops / 1e9)
    assert out["optimizer"]["gbytes"] == pytest.approx(32 * 1000 / 1e9)
    # 1 GB/s: ms = bytes / 1e6 for the memory-bound kinds.
    assert out["batch norm"]["ms"] == pytest.approx(out["batch norm"]["gbytes"] * 1e3)
    assert out["total"]["ms"] == pytest.approx(sum(out[k]["ms"] for k in step_floor.KINDS))


def test_command_line_and_comparison_with_a_profile(tmp_path, capsys):
    out = tmp_path / "floor.json"
    step_floor.main(["--backbone", "resnet10", "--backbone-width", "8", "--image-size", "64",
                     "--batch", "4", "--dtype", "float32", "--json", str(out)])
    result = json.loads(out.read_text())
    assert "| total |" in capsys.readouterr().out
    assert result["inputs"]["batch_norms"] == 12 and result["inputs"]["convolutions"] == 12
    lines = step_floor.compare(result, {"convolution": 1.0, "matrix product": 0.5,
                                        "reduction": 2.0, "elementwise/fusion": 3.0})
    conv = next(line for line in lines if line.startswith("| convolutions |"))
    assert conv.split("|")[5].strip() == "1.50"
    total = next(line for line in lines if line.startswith("| total |"))
    assert total.split("|")[5].strip() == "6.50"


def test_gpu_report_picks_the_fastest_and_reports_missing_parts(tmp_path):
    runners = {"jax_train": {"images_per_sec": 3900.0},
               "jax_train@bn_pallas": {"images_per_sec": 4700.0},
               "jax_train@bn_jnp": {"images_per_sec": 4200.0},
               "torch_compiled_train": {"images_per_sec": 3500.0}}
    throughput_json = {"device": "gpu: H200", "backbone": "resnet50", "image_size": 256,
                       "batch": 128, "dtype": "bfloat16", "windows": 5, "steps_per_window": 20,
                       "runners": runners, "errors": {},
                       "numerics": {"jax_train@bn_pallas": {"loss": 1e-3, "grad_norm": 2e-3,
                                                            "batch_stats": 1e-4}}}
    (tmp_path / "throughput.json").write_text(json.dumps(throughput_json))
    assert gpu_report.best_variant(throughput_json) == "bn_pallas"
    lines = gpu_report.report(gpu_report.load_parts(str(tmp_path)))
    text = "\n".join(lines)
    assert "| jax_train@bn_pallas | 4700.0 |" in text and "1.34x" in text
    assert "target 5000: not met" in text
    assert "Ceilings: missing." in text and "memory_jax: missing." in text
