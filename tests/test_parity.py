"""Converted weights give the reference models' features: torchvision ResNets, timm Swins.

    pip install -e '.[parity]' && pytest -m parity -s tests/test_parity.py

Each reference net is randomly initialised and put in eval mode with non-trivial BatchNorm /
LayerNorm / bias / position-bias values; its state_dict is saved with torch.save and converted
with ``python -m cmil_jax.convert``; the Flax backbone then runs on the same random images
(float32) and must give the same last feature map: max |ours - ref| <= 1e-4 * max(1, max |ref|).
For the ResNets (whose calibrated BatchNorms amplify rounding: both float32 nets land about
1e-3 from a float64 run of the reference on ResNet-50 features of size ~15) the test also checks
that ours is no farther from the float64 reference than the float32 reference is (x2).
Deselected by default (marker parity); they fail, not skip, when selected without the extra.
"""

import numpy as np
import pytest

from cmil_jax import convert
from cmil_jax.models import build_backbone

try:  # the parity extra; without it these tests are deselected by default (see pyproject)
    import timm
    import torch
    import torchvision
except ImportError:
    timm = torch = torchvision = None

pytestmark = pytest.mark.parity


@pytest.fixture(autouse=True)
def _needs_parity_extra():
    if torchvision is None or timm is None:
        pytest.fail("pytest -m parity needs: pip install -e '.[parity]'")

TOL = 1e-4
TIMM_NAMES = {
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_s": "swin_small_patch4_window7_224",
    "swin_b": "swin_base_patch4_window7_224",
}


def _images(size, batch=2, seed=0):
    """(B, size, size, 3) float32 normalised-looking images."""
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _flax_features(arch, state_dict, tmp_path, extra_args=()):
    """torch.save -> convert CLI -> load_backbone_variables -> build_backbone(arch).apply."""
    ckpt, out = tmp_path / "ref.pth", tmp_path / "converted"
    torch.save(state_dict, ckpt)
    assert (
        convert.main(
            ["--arch", arch, "--torch-checkpoint", str(ckpt), "--out", str(out), *extra_args]
        )
        == 0
    )
    variables = convert.load_backbone_variables(str(out))
    return lambda x: np.asarray(build_backbone(arch).apply(variables, x, train=False))


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)))


def _compare(name, ours, ref, ref64=None):
    """Asserts max |ours - ref| <= TOL * max(1, max |ref|); with a float64 reference, also that
    ours is within twice the float32 reference's own distance from it."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err, scale = _max_diff(ours, ref), float(np.max(np.abs(ref)))
    line = f"\nPARITY {name}: shape {ref.shape}, max |ref| {scale:.3g}, max |ours - ref| {err:.2e}"
    if ref64 is not None:
        ours64, ref_err64 = _max_diff(ours, ref64), _max_diff(ref, ref64)
        line += f"; vs float64 reference: ours {ours64:.2e}, reference float32 {ref_err64:.2e}"
    print(line + f"; relative {err / max(1.0, scale):.1e}")
    assert err <= TOL * max(1.0, scale), f"{name}: max diff {err} (scale {scale})"
    if ref64 is not None:
        assert ours64 <= 2 * ref_err64 + 1e-6, (
            f"{name}: {ours64} from float64, reference {ref_err64}"
        )


# ----------------------------------------------------------------------------- ResNet


def _torchvision_resnet(arch):
    """Random torchvision ResNet, BN affine randomised and running stats calibrated, eval mode."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for i in range(2):  # running statistics of real magnitude
            model(torch.from_numpy(_images(112, 4, seed=10 + i)).permute(0, 3, 1, 2))
    return model.eval()


def _torchvision_features(model, x):
    """Last feature map (B, h, w, c) of a torchvision ResNet, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).to(dtype)
        t = model.maxpool(model.relu(model.bn1(model.conv1(t))))
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            t = layer(t)
        return t.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_resnet_matches_torchvision(arch, tmp_path):
    model = _torchvision_resnet(arch)
    flax_fn = _flax_features(arch, model.state_dict(), tmp_path)
    x = _images(224)
    ref = _torchvision_features(model, x)
    ref64 = _torchvision_features(model.double(), x)
    _compare(f"{arch} 224px", flax_fn(x), ref, ref64)


# ----------------------------------------------------------------------------- Swin


def _timm_swin(arch, image_size, window_size):
    """Random timm Swin (no head), biases / norms / position-bias tables randomised, eval mode."""
    torch.manual_seed(0)
    model = timm.create_model(
        TIMM_NAMES[arch],
        pretrained=False,
        num_classes=0,
        img_size=image_size,
        window_size=window_size,
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=gen))  # std 1 instead of 0.02
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return model.eval()


def _timm_features(model, x):
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def _official_layout(model):
    """timm state_dict -> the official release's layout (PatchMerging at the end of the previous
    stage, persistent relative_position_index / attn_mask buffers, 'head.*'), as {'model': ...}."""
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        out[".".join(parts)] = value
    for name, module in model.named_modules():
        for buf in ("relative_position_index", "attn_mask"):
            value = getattr(module, buf, None)
            if isinstance(value, torch.Tensor):
                out[f"{name}.{buf}"] = value
    return {"model": out}


SWIN_CASES = [
    ("swin_t", 224, 7),
    ("swin_t", 256, 8),
    ("swin_s", 224, 7),
    ("swin_b", 224, 7),
]


@pytest.mark.parametrize("arch, size, window", SWIN_CASES)
def test_swin_matches_timm(arch, size, window, tmp_path):
    model = _timm_swin(arch, size, window)
    flax_fn = _flax_features(arch, model.state_dict(), tmp_path)
    x = _images(size)
    _compare(f"{arch} {size}px window {window}", flax_fn(x), _timm_features(model, x))


def test_swin_official_layout_matches_timm(tmp_path):
    model = _timm_swin("swin_t", 224, 7)
    official = _official_layout(model)
    assert "layers.0.downsample.reduction.weight" in official["model"]
    assert any(k.endswith("attn_mask") for k in official["model"])
    flax_fn = _flax_features("swin_t", official, tmp_path)
    x = _images(224)
    _compare("swin_t 224px (official layout)", flax_fn(x), _timm_features(model, x))


def test_swin_window_resampling_matches_timm(tmp_path):
    """A window-7 checkpoint resampled to window 8 (256 px) matches timm's own resampling."""
    src = _timm_swin("swin_t", 224, 7)
    ckpt = tmp_path / "w7.pth"
    torch.save(src.state_dict(), ckpt)
    dst = timm.create_model(
        TIMM_NAMES["swin_t"], pretrained=False, num_classes=0, img_size=256, window_size=8
    )
    state = {k: v for k, v in src.state_dict().items()}
    for name, module in dst.named_modules():
        if hasattr(module, "relative_position_bias_table"):
            key = f"{name}.relative_position_bias_table"
            state[key] = timm.layers.resize_rel_pos_bias_table_simple(
                state[key], module.window_size, module.relative_position_bias_table.shape
            )
    dst.load_state_dict(state)
    dst.eval()
    flax_fn = _flax_features("swin_t", src.state_dict(), tmp_path, ("--window-size", "8"))
    x = _images(256)
    _compare("swin_t 224->256px resampled", flax_fn(x), _timm_features(dst, x))
