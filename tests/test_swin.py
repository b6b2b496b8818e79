"""Swin backbones: shapes, parameter counts, windows and masks, keywords, CMIL on top.

Shape and count checks use jax.eval_shape (no compute); only thin nets (width 16) run.
The numerical comparison with timm is in test_parity.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmil_jax.models import BACKBONES, CMIL, build_backbone, feature_stride, swin


def _key(seed=0):
    return jax.random.key(seed, impl="rbg")


def _shapes(module, image_shape):
    x = jax.ShapeDtypeStruct(image_shape, jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(_key(), x, train=False), x)
    out = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
    return variables, out


def _count(tree):
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def test_registered_with_stride_32():
    assert {"swin_t", "swin_s", "swin_b"} <= set(BACKBONES)
    assert all(feature_stride(name) == 32 for name in ("swin_t", "swin_s", "swin_b"))


# timm totals 28,288,354 / 49,606,258 / 87,768,224 minus the 1000-class head (769,000 / 769,000 /
# 1,025,000), at 224 px (window 7).
@pytest.mark.parametrize(
    "name, channels, count",
    [("swin_t", 768, 27_519_354), ("swin_s", 768, 48_837_258), ("swin_b", 1024, 86_743_224)],
)
def test_param_count_and_output_matches_timm(name, channels, count):
    variables, out = _shapes(build_backbone(name), (2, 224, 224, 3))
    assert set(variables) == {"params"}
    assert _count(variables["params"]) == count
    assert out.shape == (2, 7, 7, channels) and out.dtype == jnp.float32


@pytest.mark.parametrize("size, window", [(224, 7), (256, 8), (384, 12), (96, 3)])
def test_default_window_is_the_last_map_side(size, window):
    variables, out = _shapes(build_backbone("swin_t"), (1, size, size, 3))
    assert out.shape == (1, size // 32, size // 32, 768)
    table = variables["params"]["layers_0"]["blocks_1"]["attn"]["relative_position_bias_table"]
    assert table.shape == ((2 * window - 1) ** 2, 3)


def test_param_names_follow_timm():
    params = _shapes(build_backbone("swin_t"), (1, 224, 224, 3))[0]["params"]
    assert set(params) == {"patch_embed", "layers_0", "layers_1", "layers_2", "layers_3", "norm"}
    assert params["patch_embed"]["proj"]["kernel"].shape == (4, 4, 3, 96)
    assert "downsample" not in params["layers_0"]
    assert params["layers_1"]["downsample"]["reduction"]["kernel"].shape == (384, 192)
    assert "bias" not in params["layers_1"]["downsample"]["reduction"]
    assert set(params["layers_2"]) == {"downsample"} | {f"blocks_{j}" for j in range(6)}
    block = params["layers_2"]["blocks_5"]
    assert set(block) == {"norm1", "attn", "norm2", "mlp"}
    assert block["attn"]["qkv"]["kernel"].shape == (384, 3 * 384)
    assert block["mlp"]["fc1"]["kernel"].shape == (384, 4 * 384)


def test_explicit_window_is_clamped_per_stage():
    """window 7 at 96 px: 24 % 7 != 0 fails; window 6 runs with stage 4 (3x3) clamped to 3."""
    with pytest.raises(ValueError, match="not a multiple of the window"):
        _shapes(build_backbone("swin_t", window_size=7), (1, 96, 96, 3))
    params = _shapes(build_backbone("swin_t", window_size=6), (1, 96, 96, 3))[0]["params"]
    assert params["layers_0"]["blocks_0"]["attn"]["relative_position_bias_table"].shape == (121, 3)
    assert params["layers_3"]["blocks_0"]["attn"]["relative_position_bias_table"].shape == (25, 24)


def test_rejected_keywords_and_sizes():
    with pytest.raises(ValueError, match="dilate_last"):
        _shapes(build_backbone("swin_t", dilate_last=True), (1, 64, 64, 3))
    with pytest.raises(ValueError, match="multiple of 32"):
        _shapes(build_backbone("swin_t"), (1, 100, 100, 3))
    with pytest.raises(ValueError, match="width"):
        _shapes(build_backbone("swin_t", width=7), (1, 64, 64, 3))  # 96 * 7 / 64 channels


def test_width_scales_channels():
    variables, out = _shapes(build_backbone("swin_t", width=16), (1, 96, 96, 3))
    assert out.shape == (1, 3, 3, 192)
    assert variables["params"]["patch_embed"]["proj"]["kernel"].shape == (4, 4, 3, 24)


# ----------------------------------------------------------------------------- window helpers


def test_window_partition_round_trip():
    x = np.arange(2 * 12 * 8 * 3).reshape(2, 12, 8, 3)
    windows = swin.window_partition(x, (4, 2))
    assert windows.shape == (2, 3 * 4, 8, 3)
    np.testing.assert_array_equal(
        windows[0, 1, :, 0], x[0, 0:4, 2:4, 0].ravel()
    )  # row-major windows
    np.testing.assert_array_equal(swin.window_reverse(windows, (4, 2), 12, 8), x)


def test_relative_position_index():
    index = swin.relative_position_index(3, 3)
    assert index.shape == (9, 9) and index.min() == 0 and index.max() == 24
    assert np.all(np.diag(index) == 12)  # (0, 0) offset is the centre of the 5x5 table
    assert index[0, 8] == 0 and index[8, 0] == 24  # (-2, -2) and (+2, +2)


def test_shift_mask_separates_wrapped_regions():
    """Brute force: after rolling by -s, two tokens of a window may attend to each other iff
    they came from the same region of the (h, s)-split un-rolled map."""
    h = w = 8
    window, shift = (4, 4), (2, 2)
    mask = swin.shifted_window_mask(h, w, window, shift)
    assert mask.shape == (4, 16, 16)
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # position of each rolled token in the original map
    orig = np.stack([np.roll(ys, (-2, -2), (0, 1)), np.roll(xs, (-2, -2), (0, 1))], -1)
    wins = swin.window_partition(orig[None], window)[0]  # (nW, T, 2)
    # wrapped tokens are those whose original position lies in the last `shift` rows / cols
    region = (wins[..., 0] >= h - 2) * 2 + (wins[..., 1] >= w - 2)
    expected = np.where(region[:, :, None] != region[:, None, :], -100.0, 0.0)
    np.testing.assert_array_equal(mask, expected)
    assert not mask[0].any()  # the top-left window has no wrapped tokens


def test_stage_window_follows_timm_rule():
    assert swin.stage_window(56, 56, 7, True) == ((7, 7), (3, 3))
    assert swin.stage_window(7, 7, 7, True) == ((7, 7), (0, 0))  # one window: no shift
    assert swin.stage_window(3, 3, 7, True) == ((3, 3), (0, 0))  # clamped
    assert swin.stage_window(56, 56, 7, False) == ((7, 7), (0, 0))


def test_window_attention_commutes_with_whole_window_rolls():
    """Rolling the input of a (non-shifted) block by whole windows rolls its output."""
    block = swin.SwinBlock(num_heads=2, window_size=4, shifted=False)
    x = jax.random.normal(_key(1), (1, 8, 8, 8))
    variables = jax.jit(block.init)(_key(2), x)
    apply = jax.jit(block.apply)
    y, y_rolled = apply(variables, x), apply(variables, jnp.roll(x, (4, 4), (1, 2)))
    np.testing.assert_allclose(np.roll(y, (4, 4), (1, 2)), y_rolled, atol=1e-5)


# ----------------------------------------------------------------------------- runs


def test_thin_swin_runs_and_is_deterministic():
    module = swin.SwinTransformer(depths=(2, 2, 2, 2), width=16)  # Swin-T with 2 blocks in stage 3
    x = jax.random.normal(_key(1), (2, 64, 64, 3))

    @jax.jit
    def run(x):
        variables = module.init(_key(2), x, train=False)
        y1 = module.apply(variables, x, train=True)
        y2 = module.apply(variables, x, train=False)
        y3 = module.apply(variables, x.at[1].set(0.0), train=False)
        return y1, y2, y3

    y1, y2, y3 = run(x)
    assert y1.shape == (2, 2, 2, 192) and np.all(np.isfinite(y1))
    np.testing.assert_allclose(y1, y2, atol=1e-6)  # no train-time behaviour
    np.testing.assert_allclose(y1[0], y3[0], atol=1e-6)  # images do not mix


def test_bfloat16_compute():
    module = build_backbone("swin_t", width=16, dtype=jnp.bfloat16)
    _, out = _shapes(module, (1, 64, 64, 3))
    assert out.dtype == jnp.bfloat16


def test_cmil_on_swin_gives_patch_outputs():
    model = CMIL(backbone="swin_t", backbone_width=16, width=48, num_heads=6)
    x = jax.ShapeDtypeStruct((2, 96, 96, 3), jnp.uint8)
    variables = jax.eval_shape(lambda x: model.init(_key(), x, train=False), x)
    assert "batch_stats" not in variables
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out["feature_map"].shape == (2, 3, 3, 192)
    assert out["patch_class_logits"].shape == (2, 9, 5) and out["mil_emb"].shape == (2, 9, 128)
