"""cmil_jax.convert without torchvision or timm: key maps, checks, files, train.init_from.

State dicts in the reference layouts are made from random Flax variables through the inverse
map and converted back (as numpy; through torch.save and the command line where torch is
installed); one ResNet-18 forward is checked against a hand-written torch.nn.functional
forward over the torchvision-layout tensors. Tests marked needs_torch skip without torch.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmil_jax import convert
from cmil_jax.models import build_backbone
from cmil_jax.models.swin import relative_position_index, shifted_window_mask

try:
    import torch
except ImportError:  # the default test extra has no torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")


def _random_variables(arch, window_size=7, seed=0):
    """Random float32 numpy variables with the shapes of build_backbone(arch) (no compute)."""
    rng = np.random.default_rng(seed)
    flat = {
        path: rng.standard_normal(shape).astype(np.float32)
        for path, shape in convert.template(arch, window_size).items()
    }
    for path in flat:  # running variances must be positive
        if path[-1] == "var":
            flat[path] = np.abs(flat[path]) + 0.5
    return convert.unflatten(flat)


def _reference_state(variables, arch, layout=None):
    """Inverse map to a state_dict (numpy), plus the extra tensors a real checkpoint carries."""
    state = convert.to_torch_state_dict(variables, arch, layout)
    if arch.startswith("resnet"):
        state["fc.weight"] = np.zeros((1000, 2048 if arch == "resnet50" else 512), np.float32)
        state["fc.bias"] = np.zeros(1000, np.float32)
        for key in [k for k in state if k.endswith("running_var")]:
            state[key.replace("running_var", "num_batches_tracked")] = np.array(7)
    elif layout == "official":
        state["layers.0.blocks.0.attn.relative_position_index"] = relative_position_index(
            7, 7
        ).astype(np.int64)
        state["layers.0.blocks.1.attn_mask"] = shifted_window_mask(56, 56, (7, 7), (3, 3))
        state["head.weight"], state["head.bias"] = (
            np.zeros((1000, 768), np.float32),
            np.zeros(1000, np.float32),
        )
    else:
        state["head.fc.weight"] = np.zeros((1000, 768), np.float32)
    return state


def _torch_state(state):
    return {k: torch.tensor(v) for k, v in state.items()}


def _assert_trees_equal(a, b):
    fa, fb = convert.flatten(a), convert.flatten(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=str(path))


def _convert_cli(state, arch, tmp_path, *args):
    """torch.save(state) -> python -m cmil_jax.convert -> (exit code, output dir)."""
    ckpt, out = tmp_path / "in.pth", tmp_path / "out"
    torch.save(state, ckpt)
    rc = convert.main(["--arch", arch, "--torch-checkpoint", str(ckpt), "--out", str(out), *args])
    return rc, out


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_resnet_round_trip(arch):
    variables = _random_variables(arch)
    converted = convert.convert_state_dict(_reference_state(variables, arch), arch)
    assert set(converted) == {"params", "batch_stats"}
    _assert_trees_equal(converted, variables)


def test_resnet_key_names_follow_torchvision():
    state = convert.to_torch_state_dict(_random_variables("resnet50"), "resnet50")
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer1.0.downsample.1.running_var"].shape == (256,)
    assert state["layer4.2.bn3.weight"].shape == (2048,)
    assert len(state) == 265  # torchvision resnet50 state_dict: 320 keys - 53 counters - fc (2)


def test_torch_tensor_maps_a_backbone_inside_a_model():
    """The per-variable map keeps module prefixes (benchmarks/torch_twin.py maps its CMIL)."""
    key, value = convert.torch_tensor(
        ("params", "backbone", "layer1_0", "downsample_conv", "kernel"), np.ones((1, 1, 4, 8)))
    assert key == "backbone.layer1.0.downsample.0.weight" and value.shape == (8, 4, 1, 1)
    key, value = convert.torch_tensor(("params", "mil_proj", "kernel"), np.ones((3, 5)))
    assert key == "mil_proj.weight" and value.shape == (5, 3)
    key, _ = convert.torch_tensor(("batch_stats", "backbone", "bn1", "var"), np.ones(4))
    assert key == "backbone.bn1.running_var"


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_swin_round_trip(layout):
    variables = _random_variables("swin_t")
    state = _reference_state(variables, "swin_t", layout)
    if layout == "official":  # merging at the end of the previous stage
        assert (
            "layers.0.downsample.reduction.weight" in state
            and "layers.3.downsample.norm.weight" not in state
        )
    else:
        assert (
            "layers.1.downsample.reduction.weight" in state
            and "layers.0.downsample.norm.weight" not in state
        )
    assert convert.detect_layout(state, "swin_t") == layout
    converted = convert.convert_state_dict(state, "swin_t")
    assert set(converted) == {"params"}
    _assert_trees_equal(converted, variables)


@needs_torch
def test_cli_round_trip_and_files(tmp_path, capsys):
    variables = _random_variables("resnet18")
    rc, out = _convert_cli(
        _torch_state(_reference_state(variables, "resnet18")), "resnet18", tmp_path
    )
    assert rc == 0, capsys.readouterr().err
    assert "resnet18: 100 tensors" in capsys.readouterr().out
    _assert_trees_equal(convert.load_backbone_variables(str(out)), variables)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["arch"] == "resnet18" and meta["layout"] == "torchvision"
    assert "fc.weight" in meta["ignored"]


@needs_torch
def test_cli_unwraps_the_official_swin_release(tmp_path):
    variables = _random_variables("swin_t")
    state = {"model": _torch_state(_reference_state(variables, "swin_t", "official"))}
    rc, out = _convert_cli(state, "swin_t", tmp_path)
    assert rc == 0
    loaded = convert.load_backbone_variables(str(out))
    assert set(loaded) == {"params"}
    _assert_trees_equal(loaded, variables)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["layout"] == "official" and meta["window_size"] == 7


@needs_torch
def test_swin_window_resampling_changes_only_the_tables():
    variables = _random_variables("swin_t", window_size=7)
    state = convert.to_torch_state_dict(variables, "swin_t")
    converted = convert.flatten(convert.convert_state_dict(state, "swin_t", window_size=8))
    for path, value in convert.flatten(variables).items():
        if path[-1] == "relative_position_bias_table":
            assert converted[path].shape == (15 * 15, value.shape[1])
        else:
            np.testing.assert_array_equal(converted[path], value)


@needs_torch
def test_resize_bias_table_keeps_a_constant_table():
    table = np.full((13 * 13, 3), 0.25, np.float32)
    np.testing.assert_allclose(convert.resize_bias_table(table, 8), 0.25, atol=1e-6)
    assert convert.resize_bias_table(table, 7) is table


# ----------------------------------------------------------------------------- numerics


def _torch_resnet18_features(state, x):
    """torchvision's ResNet-18 forward written with torch.nn.functional over its state_dict."""
    F = torch.nn.functional

    def bn(t, prefix):
        return F.batch_norm(
            t,
            state[f"{prefix}.running_mean"],
            state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"],
            state[f"{prefix}.bias"],
            training=False,
            eps=1e-5,
        )

    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    t = F.relu(bn(F.conv2d(t, state["conv1.weight"], stride=2, padding=3), "bn1"))
    t = F.max_pool2d(t, 3, stride=2, padding=1)
    for s in range(1, 5):
        for i in range(2):
            p = f"layer{s}.{i}"
            stride = 2 if (s > 1 and i == 0) else 1
            y = F.relu(
                bn(F.conv2d(t, state[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1")
            )
            y = bn(F.conv2d(y, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in state:
                t = bn(
                    F.conv2d(t, state[f"{p}.downsample.0.weight"], stride=stride),
                    f"{p}.downsample.1",
                )
            t = F.relu(t + y)
    return t.permute(0, 2, 3, 1).numpy()


@needs_torch
def test_converted_resnet18_matches_a_functional_torch_forward():
    rng = np.random.default_rng(2)
    variables = _random_variables("resnet18")
    for path, value in convert.flatten(variables).items():  # He-scaled kernels, small biases
        if path[-1] == "kernel":
            value *= np.sqrt(2.0 / np.prod(value.shape[:-1]))
        elif path[-1] in ("bias", "mean"):
            value *= 0.1
        elif path[-1] == "scale":
            value[:] = rng.uniform(0.5, 1.5, value.shape)
    state = {
        k: torch.tensor(v) for k, v in convert.to_torch_state_dict(variables, "resnet18").items()
    }
    converted = convert.convert_state_dict(state, "resnet18")
    x = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
    ours = np.asarray(build_backbone("resnet18").apply(converted, x, train=False))
    ref = _torch_resnet18_features(state, x)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# ----------------------------------------------------------------------------- failures


def test_missing_tensor_is_named():
    state = _reference_state(_random_variables("resnet18"), "resnet18")
    del state["layer3.1.bn2.running_mean"]
    with pytest.raises(ValueError, match=r"no tensor 'layer3\.1\.bn2\.running_mean'"):
        convert.convert_state_dict(state, "resnet18")


@needs_torch
def test_cli_reports_errors(tmp_path, capsys):
    state = _torch_state(_reference_state(_random_variables("resnet18"), "resnet18"))
    del state["layer3.1.bn2.running_mean"]
    rc, out = _convert_cli(state, "resnet18", tmp_path)
    assert rc == 1 and not out.exists()
    assert "'layer3.1.bn2.running_mean'" in capsys.readouterr().err


def test_wrong_shape_is_named():
    state = _reference_state(_random_variables("resnet18"), "resnet18")
    state["layer2.0.conv1.weight"] = np.zeros((128, 64, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"'layer2\.0\.conv1\.weight' has shape \(128, 64, 1, 1\)"):
        convert.convert_state_dict(state, "resnet18")


def test_unmapped_tensor_is_named():
    state = _reference_state(_random_variables("resnet18"), "resnet18")
    state["layer5.0.conv1.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"'layer5\.0\.conv1\.weight'.*maps to no variable"):
        convert.convert_state_dict(state, "resnet18")


def test_wrong_arch_fails():
    state = _reference_state(_random_variables("resnet18"), "resnet18")
    with pytest.raises(ValueError, match=r"no tensor 'layer1\.2\.bn1\.running_mean'"):
        convert.convert_state_dict(state, "resnet34")  # resnet34 has 3 blocks in layer1
    with pytest.raises(ValueError, match=r"no tensor 'layer1\.0\.bn3"):
        convert.convert_state_dict(state, "resnet50")
    with pytest.raises(ValueError, match="not a Swin checkpoint"):
        convert.convert_state_dict(state, "swin_t")


def test_bad_relative_position_index_fails():
    state = convert.to_torch_state_dict(_random_variables("swin_t"), "swin_t")
    state["layers.0.blocks.0.attn.relative_position_index"] = relative_position_index(7, 7).T + 1
    with pytest.raises(ValueError, match="relative_position_index differs"):
        convert.convert_state_dict(state, "swin_t")


def test_load_missing_dir_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m cmil_jax.convert"):
        convert.load_backbone_variables(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- match_tree


def test_match_tree_returns_loaded_with_current_dtypes():
    current = {"a": {"kernel": jnp.zeros((2, 3), jnp.bfloat16)}, "b": np.zeros((4,), np.float32)}
    loaded = {"a": {"kernel": np.ones((2, 3), np.float32)}, "b": np.arange(4.0)}
    out = convert.match_tree(current, loaded, "src")
    assert isinstance(out["a"]["kernel"], jax.Array) and out["a"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out["b"], np.arange(4.0, dtype=np.float32))


@pytest.mark.parametrize(
    "loaded, message",
    [
        (
            {"a": {"kernel": np.ones((3, 3))}, "b": np.ones(4)},
            r"'a/kernel': the model expects \(2, 3\), the weights have \(3, 3\)",
        ),
        ({"a": {"kernel": np.ones((2, 3))}}, r"'b': the model expects \(4,\), the weights lack it"),
        (
            {"a": {"kernel": np.ones((2, 3)), "x": np.ones(1)}, "b": np.ones(4)},
            r"'a/x': the model has no such variable",
        ),
    ],
)
def test_match_tree_names_first_mismatch(loaded, message):
    current = {"a": {"kernel": np.zeros((2, 3))}, "b": np.zeros(4)}
    with pytest.raises(ValueError, match=message):
        convert.match_tree(current, loaded, "src")


def test_init_from_loads_the_backbone_and_rejects_another_arch(tmp_path):
    """train.load_backbone_weights on an abstract CMIL state (shapes only, nothing runs)."""
    from cmil_jax import train  # pylint: disable=import-outside-toplevel
    from cmil_jax.models import CMIL  # pylint: disable=import-outside-toplevel

    model = CMIL(backbone="resnet18", width=48, num_heads=6)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    state = train.TrainState(
        step=0, params=abstract["params"], batch_stats=abstract["batch_stats"], opt_state=None
    )
    good, bad = tmp_path / "r18", tmp_path / "r34"
    variables = _random_variables("resnet18")
    convert.save_variables(variables, str(good), {"arch": "resnet18"})
    convert.save_variables(_random_variables("resnet34"), str(bad), {"arch": "resnet34"})

    new = train.load_backbone_weights(state, str(good))
    _assert_trees_equal(new.params["backbone"], variables["params"])
    _assert_trees_equal(new.batch_stats["backbone"], variables["batch_stats"])
    assert new.params["tokenizer"] == state.params["tokenizer"]  # heads keep their init

    with pytest.raises(ValueError, match=r"\(converted for resnet34\).*'layer1_2/bn1/bias'"):
        train.load_backbone_weights(state, str(bad))


def test_without_torch_the_command_names_the_extra(tmp_path, monkeypatch, capsys):
    """PyTorch is an optional extra: its absence is an error naming it, not a traceback."""
    import sys

    checkpoint_file = tmp_path / "r50.pth"
    checkpoint_file.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    code = convert.main(["--arch", "resnet50", "--torch-checkpoint", str(checkpoint_file),
                         "--out", str(tmp_path / "out")])
    assert code == 1
    assert "pip install -e '.[torch]'" in capsys.readouterr().err
    assert not (tmp_path / "out" / convert.VARIABLES_FILE).exists()
