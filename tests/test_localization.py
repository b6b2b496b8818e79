"""Localization maps (Grad-CAM, MIL similarity, patch logits) and metrics with known answers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmil_jax import localization
from cmil_jax import losses
from cmil_jax import viz
from cmil_jax.models import CMIL

SIZE = 64


@pytest.fixture(scope="module")
def tiny():
    """A random-init tiny CMIL (4 x 4 feature grid at 64 px), jitted once."""
    model = CMIL(backbone="resnet10", backbone_width=8, width=48, num_heads=6, embed_dim=16,
                 dilate_last=True)
    images = jax.random.uniform(jax.random.key(0), (3, SIZE, SIZE, 3)) * 255
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(images)
    plain = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    return model, variables, images, plain


# ------------------------------------------------------------------------------ maps


def _class_logit_with(model, variables, images, delta, k=2):
    """z^U_k (B,) with ``delta`` added to the backbone's feature map."""

    def add(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        return y + delta if localization._is_backbone_call(context) else y

    with nn.intercept_methods(add):
        return model.apply(variables, images, train=False)["class_logits"][:, k]


def test_gradcam_matches_manual_formula(tiny):
    model, variables, images, plain = tiny
    gradcam = jax.jit(lambda v, x, k: localization.gradcam_and_outputs(model, v, x, k,
                                                                        logit="class"))
    cam, outputs = gradcam(variables, images, jnp.array([2, 2, 2]))
    np.testing.assert_allclose(outputs["class_logits"], plain["class_logits"], rtol=1e-5)
    grid = localization.grid_shape(plain)
    assert cam.shape == (3, *grid) and grid == (4, 4)
    assert np.all(np.asarray(cam) >= 0)

    a = np.asarray(plain["feature_map"])
    logit_with = jax.jit(lambda d: _class_logit_with(model, variables, images, d))
    grad = np.asarray(jax.jit(jax.grad(lambda d: jnp.sum(logit_with(d))))(jnp.zeros_like(a)))
    # The interception really moves the logit: finite differences agree with the gradient.
    eps = 1e-2
    delta = np.zeros_like(a)
    delta[1, 2, 3, 4] = eps
    fd = (logit_with(delta)[1] - plain["class_logits"][1, 2]) / eps
    assert float(fd) == pytest.approx(float(grad[1, 2, 3, 4]), rel=0.05, abs=1e-4)
    manual = np.maximum((grad.mean(axis=(1, 2), keepdims=True) * a).sum(-1), 0)
    np.testing.assert_allclose(cam, manual, rtol=1e-4, atol=1e-6)

    # Per-image classes: row b equals the map of class k_b computed for the whole batch.
    per_image, _ = gradcam(variables, images, jnp.array([0, 3, 4]))
    for b, k in enumerate([0, 3, 4]):
        full, _ = gradcam(variables, images, jnp.array([k, k, k]))
        np.testing.assert_allclose(per_image[b], full[b], rtol=1e-4, atol=1e-6)


def test_select_logit_kinds():
    outputs = {
        "class_logits": jnp.array([[1.0, 2.0], [3.0, 4.0]]),
        "patch_logits": jnp.array([[5.0, 6.0], [7.0, 8.0]]),
        "mil_emb": jax.random.normal(jax.random.key(0), (2, 4, 3)),
        "mil_bias": jnp.array(0.5),
    }
    sel = localization._select_logit
    np.testing.assert_allclose(sel(outputs, jnp.array([0, 1]), "class", 0.2, None), [1.0, 4.0])
    np.testing.assert_allclose(sel(outputs, 1, "patch", 0.2, None), [6.0, 8.0])
    np.testing.assert_allclose(sel(outputs, 0, "combined", 0.2, None), [3.0, 5.0])
    np.testing.assert_allclose(
        sel(outputs, 0, "fake", 0.2, None),
        losses.mil_fake_logit(outputs["mil_emb"], outputs["mil_bias"], 0.2), rtol=1e-6)
    with pytest.raises(ValueError, match="logit must be one of"):
        sel(outputs, 0, "nope", 0.2, None)


def test_maps_fn_and_similarity_maps(tiny):
    model, variables, images, plain = tiny
    out = localization.make_maps_fn(model, tau=0.2)(variables, images)
    z = 0.5 * (plain["class_logits"] + plain["patch_logits"])
    np.testing.assert_array_equal(out["class_index"], np.argmax(z, axis=1))
    np.testing.assert_allclose(out["probs"], jax.nn.sigmoid(z), rtol=1e-5)
    np.testing.assert_allclose(
        out["fake_prob"], losses.mil_fake_prob(plain["mil_emb"], plain["mil_bias"], 0.2),
        rtol=1e-5)
    assert out["gradcam"].shape == (3, 4, 4)
    a = losses.patch_similarity_map(plain["mil_emb"])  # (B, N), row-major
    np.testing.assert_allclose(out["dissimilarity"], 1 - np.asarray(a).reshape(3, 4, 4),
                               rtol=1e-5, atol=1e-6)
    q = np.asarray(plain["patch_class_logits"])
    np.testing.assert_allclose(out["patch_logits"][:, 1, 2], q[:, 1 * 4 + 2], atol=1e-5)
    np.testing.assert_allclose(localization.similarity_map(plain["mil_emb"], (2, 8)),
                               np.asarray(a).reshape(3, 2, 8), rtol=1e-6)
    with pytest.raises(ValueError, match="square grid"):
        localization.similarity_map(jnp.ones((1, 6, 4)))


def test_upsample_and_normalize():
    grid = np.arange(4, dtype=np.float32).reshape(2, 2)
    up = localization.upsample(grid, 8)
    assert up.shape == (8, 8)
    assert up[0, 0] == 0 and up[-1, -1] == 3  # corners keep the corner cells' values
    assert np.all(np.diff(up, axis=1) >= 0)
    assert localization.upsample(np.stack([grid, grid]), (6, 10)).shape == (2, 6, 10)
    n = localization.normalize01(np.stack([grid, np.ones((2, 2))]))
    assert n[0].min() == 0 and n[0].max() == 1 and np.all(n[1] == 0)


# ------------------------------------------------------------------------------ metrics


def _square_mask(size=32, lo=8, hi=16):
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = 255
    return m


def test_metrics_perfect_inverted_and_constant_maps():
    mask = _square_mask()
    perfect = (mask > 0).astype(np.float32)
    assert localization.pixel_auc(perfect[None], mask[None]) == 1.0
    assert localization.pixel_auc(1 - perfect[None], mask[None]) == 0.0
    assert localization.pixel_auc(np.zeros((1, 32, 32)), mask[None]) == 0.5
    iou, t = localization.best_iou(perfect[None], mask[None])
    assert iou == 1.0 and 0 < t <= 1
    assert localization.pointing_game(perfect[None] + 0.0, mask[None]) == 1.0
    assert localization.pointing_game(1 - perfect[None], mask[None]) == 0.0


def test_metrics_on_low_res_maps_and_soft_masks():
    # A 4x4 map whose (1, 1) cell is hot, against a mask of exactly that cell at 32 px.
    cells = np.zeros((1, 4, 4), np.float32)
    cells[0, 1, 1] = 1.0
    mask = _square_mask(32, 8, 16)
    assert localization.pixel_auc(cells, mask[None]) > 0.95
    assert localization.pointing_game(cells, mask[None]) == 1.0
    iou, _ = localization.best_iou(cells, mask[None])
    assert 0.5 < iou <= 1.0
    soft = mask.astype(np.float32) / 255 * 0.7  # SBI-style soft mask in [0, 1]
    assert localization.pixel_auc(cells, soft[None]) == localization.pixel_auc(cells, mask[None])


def test_iou_known_value_and_pointing_tolerance():
    mask = _square_mask(20, 0, 10)[:, :]  # top-left 10x10
    score = np.zeros((20, 20), np.float32)
    score[:, :10] = 1.0  # left half: IoU = 100 / 200
    iou, _ = localization.best_iou(score[None], mask[None])
    assert iou == pytest.approx(0.5)
    miss = np.zeros((20, 20), np.float32)
    miss[11, 11] = 1.0  # 2 px down and right of the mask corner (9, 9)
    assert localization.pointing_game(miss[None], mask[None]) == 0.0
    assert localization.pointing_game(miss[None], mask[None], tolerance=3) == 1.0


def test_meter_skips_genuine_padding_and_full_masks():
    mask = _square_mask()
    perfect = (mask > 0).astype(np.float32)
    meter = localization.LocalizationMeter()
    scores = np.stack([perfect, perfect, 1 - perfect, perfect])
    masks = np.stack([mask, np.zeros_like(mask), mask, np.full_like(mask, 255)])
    meter.add(scores, masks, valid=np.array([1, 1, 0, 1]))
    r = meter.result()
    assert r["num_localized"] == 2  # genuine and padding left out; the full mask counts
    assert r["pixel_auc"] == 1.0  # the full mask has no negatives: no AUC
    assert r["pointing_game"] == 1.0
    # (B, N) patch scores and similarity maps (low = manipulated).
    patch = np.zeros((1, 16), np.float32)
    patch[0, 1 * 4 + 1] = 1.0
    meter = localization.LocalizationMeter()
    meter.add_similarity(1.0 - patch, mask[None])
    assert meter.result()["pixel_auc"] > 0.95
    empty = localization.LocalizationMeter().result()
    assert empty["num_localized"] == 0 and np.isnan(empty["pixel_auc"])


def test_random_maps_score_near_chance():
    rng = np.random.default_rng(0)
    masks = np.stack([_square_mask(32, int(a), int(a) + 10) for a in rng.integers(0, 20, 40)])
    scores = rng.random((40, 8, 8)).astype(np.float32)
    assert abs(localization.pixel_auc(scores, masks) - 0.5) < 0.06


# ------------------------------------------------------------------------------ viz


def test_overlay_and_row(tmp_path):
    image = np.full((30, 50, 3), 128, np.uint8)
    heat = np.zeros((3, 5), np.float32)
    heat[1, 4] = 1
    over = viz.overlay(image, heat)
    assert over.shape == image.shape and over.dtype == np.uint8
    assert over[15, 45, 0] > over[15, 5, 0]  # red where the map is hot (jet: high = red)
    row = viz.labeled_row([image, over], ["a", "b"], header="hdr", height=60)
    assert row.shape[0] > 60 and row.shape[2] == 3
    path = viz.save_png(str(tmp_path / "x" / "row.png"), row)
    assert (tmp_path / "x" / "row.png").exists() and path.endswith("row.png")
