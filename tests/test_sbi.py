"""Tests of cmil_jax.data.sbi: determinism, mask support, fake == real off the mask (with and
without JPEG), the 68-point flip permutation (landmarks68), robustness to odd landmarks, input
checks."""

import dataclasses
import functools

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmil_jax.data import landmarks68, sbi, synthetic

NO_JPEG = sbi.SBIConfig(jpeg_p=0.0)


@functools.cache
def _faces():
    """Four synthetic 256-px faces: (image uint8 (256, 256, 3), landmarks float32 (68, 2))."""
    out = []
    for subset in ("facial_components", "facial_attributes"):
        for index in (0, 7):
            ex = synthetic.generate_example(subset, index, seed=3)
            out.append((ex["image"], ex["landmarks"]))
    return out


def _check_pair(image, real, fake, mask):
    h, w = image.shape[:2]
    assert real.dtype == np.uint8 and real.shape == (h, w, 3)
    assert fake.dtype == np.uint8 and fake.shape == (h, w, 3)
    assert mask.dtype == np.float32 and mask.shape == (h, w)
    assert np.isfinite(mask).all() and mask.min() >= 0.0 and mask.max() <= 1.0


def _jpeg(img_rgb, quality):
    _, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_same_seed_gives_identical_bytes():
    for image, lm in _faces()[:3]:
        for seed in (0, 1):
            a = sbi.self_blend(image, lm, np.random.default_rng(seed))
            b = sbi.self_blend(image, lm, np.random.default_rng(seed))
            for x, y in zip(a, b):
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
        c = sbi.self_blend(image, lm, np.random.default_rng(2))
        assert c[1].tobytes() != a[1].tobytes()


def test_input_is_not_modified():
    image, lm = _faces()[0]
    image_copy, lm_copy = image.copy(), lm.copy()
    real, fake, _ = sbi.self_blend(image, lm, np.random.default_rng(0), config=NO_JPEG)
    assert np.array_equal(image, image_copy) and np.array_equal(lm, lm_copy)
    assert not np.shares_memory(real, image) and not np.shares_memory(fake, image)


@pytest.mark.parametrize("hull_type", sbi.HULL_TYPES)
def test_mask_range_and_support(hull_type):
    """Mask in [0, 1], non-empty, and zero beyond 15% of the face size from the hull."""
    for image, lm in _faces()[:2]:
        region = sbi.fill_hulls(
            sbi.hull_polygons(lm, hull_type, with_forehead=True), *image.shape[:2]
        )
        distance = cv2.distanceTransform(1 - region, cv2.DIST_L2, 5)
        face_size = float(np.hypot(*np.ptp(lm, axis=0)))  # landmark box diagonal
        for seed in range(6):
            real, fake, mask = sbi.self_blend(
                image, lm, np.random.default_rng(seed), hull_type=hull_type, config=NO_JPEG
            )
            _check_pair(image, real, fake, mask)
            assert mask.max() >= min(sbi.SBIConfig().blend_ratios) - 1e-6
            assert (mask[distance > 0.15 * face_size] == 0).all()


def test_fake_equals_real_where_mask_is_zero():
    for image, lm in _faces():
        for seed in range(8):
            real, fake, mask = sbi.self_blend(
                image, lm, np.random.default_rng(seed), config=NO_JPEG
            )
            assert np.array_equal(fake[mask == 0], real[mask == 0])
            strong = mask > 0.5 * mask.max()
            assert (fake[strong] != real[strong]).any()


@pytest.mark.parametrize("quality", [40, 75, 100])
def test_jpeg_matches_whole_image_compression(quality):
    """With JPEG on, real and fake are the whole-image JPEGs of the JPEG-free pair, so they agree
    beyond the coding blocks that touch the blend region."""
    with_jpeg = sbi.SBIConfig(jpeg_p=1.0, jpeg_quality=(quality, quality))
    without = sbi.SBIConfig(jpeg_p=0.0, jpeg_quality=(quality, quality))
    image, lm = _faces()[0]
    cases = _faces() + [
        (image[:237, 6:], lm - np.float32([6, 0])),  # size not a multiple of 16
        (image, lm + np.float32([-100, 0])),  # face cut by the image border
        (image, lm + np.float32([90, 100])),
    ]
    for k, (image, lm) in enumerate(cases):
        seed = 10 * quality + k
        real_j, fake_j, mask_j = sbi.self_blend(
            image, lm, np.random.default_rng(seed), config=with_jpeg
        )
        real, fake, mask = sbi.self_blend(image, lm, np.random.default_rng(seed), config=without)
        assert np.array_equal(mask_j, mask)
        assert np.array_equal(real_j, _jpeg(real, quality))
        assert np.array_equal(fake_j, _jpeg(fake, quality))
        # Luma is coded in 8x8 blocks, chroma (4:2:0, OpenCV's default) in 16x16 MCUs whose
        # decoder upsampling reads one chroma sample (2 px) into the next MCU.
        h, w = mask.shape
        touched = cv2.dilate((mask > 0).astype(np.uint8), np.ones((3, 3), np.uint8))  # never empty
        mcu = (
            touched[: h // 16 * 16, : w // 16 * 16]
            .reshape(h // 16, 16, w // 16, 16)
            .max(axis=(1, 3))
        )
        affected = np.kron(mcu, np.ones((16, 16), np.uint8))
        affected = np.pad(
            affected, ((0, h - affected.shape[0]), (0, w - affected.shape[1])), mode="edge"
        )
        affected = cv2.dilate(affected, np.ones((5, 5), np.uint8))
        assert (mask[affected == 0] == 0).all()
        assert np.array_equal(fake_j[affected == 0], real_j[affected == 0])


def test_flip_permutation_pairs():
    perm = landmarks68.FLIP_PERMUTATION
    assert perm.shape == (68,) and sorted(perm.tolist()) == list(range(68))
    assert np.array_equal(perm[perm], np.arange(68))  # involution
    # fmt: off
    expected = {
        **{i: 16 - i for i in range(17)},  # jaw reversed
        **{17 + i: 26 - i for i in range(10)},  # brows
        27: 27, 28: 28, 29: 29, 30: 30,  # nose bridge
        **{31 + i: 35 - i for i in range(5)},  # nostrils
        36: 45, 37: 44, 38: 43, 39: 42, 40: 47, 41: 46,  # eye corners and lids
        42: 39, 43: 38, 44: 37, 45: 36, 46: 41, 47: 40,
        **{48 + i: 54 - i for i in range(7)},  # upper outer lip
        **{55 + i: 59 - i for i in range(5)},  # lower outer lip
        **{60 + i: 64 - i for i in range(5)},  # upper inner lip
        65: 67, 66: 66, 67: 65,
    }
    # fmt: on
    assert perm.tolist() == [expected[i] for i in range(68)]
    with pytest.raises(ValueError):
        perm[0] = 1  # read-only


def test_flip_permutation_restores_point_meaning():
    for image, lm in _faces():
        w = image.shape[1]
        mirrored = lm.copy()
        mirrored[:, 0] = w - 1 - mirrored[:, 0]
        flipped = mirrored[landmarks68.FLIP_PERMUTATION]
        x, y = flipped[:, 0], flipped[:, 1]
        # image-left eye 36-41: outer corner 36 left of inner corner 39, both left of 42 < 45
        assert x[36] < x[39] < x[42] < x[45]
        assert (
            y[37] < y[41] and y[38] < y[40] and y[43] < y[47] and y[44] < y[46]
        )  # upper lid above lower
        assert x[0] < x[8] < x[16] and x[17] < x[21] < x[22] < x[26]
        assert x[31] < x[33] < x[35] and x[48] < x[51] < x[54] and x[60] < x[64]
        # the image-left eye after the flip is the mirror of the image-right eye before it
        np.testing.assert_allclose(
            flipped[36:42].mean(0), [w - 1 - lm[42:48, 0].mean(), lm[42:48, 1].mean()], atol=1e-4
        )


def _valid_or_value_error(image, lm, seed=0):
    """Run self_blend; a ValueError is acceptable, any other error (cv2.error) is not."""
    try:
        real, fake, mask = sbi.self_blend(image, lm, np.random.default_rng(seed), config=NO_JPEG)
    except ValueError:
        return None
    _check_pair(image, real, fake, mask)
    assert np.array_equal(fake[mask == 0], real[mask == 0])
    return real, fake, mask


def test_face_on_the_image_border():
    image, lm = _faces()[0]
    h, w = image.shape[:2]
    for shift in ([-110, 0], [0, 120], [95, -100]):  # partly outside the image
        out = _valid_or_value_error(image, lm + np.float32(shift))
        assert out is not None and out[2].max() > 0
    clipped = np.clip(lm * 2 - 128, 0, [w - 1, h - 1]).astype(
        np.float32
    )  # points exactly on the border
    out = _valid_or_value_error(image, clipped)
    assert out is not None and out[2].max() > 0


@pytest.mark.parametrize("size", [2.0, 5.0, 12.0])
def test_tiny_face(size):
    image, lm = _faces()[1]
    centre = lm.mean(0)
    scale = size / np.ptp(lm, axis=0).max()
    for where in (centre, np.float32([3, 3]), np.float32([252, 250])):
        tiny = ((lm - centre) * scale + where).astype(np.float32)
        for seed in range(3):
            out = _valid_or_value_error(image, tiny, seed)
            assert out is not None and out[2].max() > 0


def test_degenerate_landmarks_raise_value_error():
    image, lm = _faces()[0]
    cases = {
        "coincide": np.full((68, 2), 100.0, np.float32),
        "NaN": np.where(np.arange(68)[:, None] == 5, np.nan, lm).astype(np.float32),
        "inf": np.where(np.arange(68)[:, None] == 9, np.inf, lm).astype(np.float32),
        "does not overlap": lm + np.float32(1000),
        "far outside": lm * np.float32(1e9),
    }
    for fragment, bad in cases.items():
        with pytest.raises(ValueError, match=fragment):
            sbi.self_blend(image, bad, np.random.default_rng(0))


def test_collinear_landmarks():
    image, _ = _faces()[0]
    line = np.stack([np.linspace(60, 200, 68), np.full(68, 128.0)], 1).astype(np.float32)
    _valid_or_value_error(image, line)
    _valid_or_value_error(image, line[:, ::-1].copy())


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(0.0, 4.0),
    dx=st.floats(-400, 400),
    dy=st.floats(-400, 400),
    jitter=st.floats(0.0, 30.0),
    seed=st.integers(0, 2**16),
)
def test_random_landmarks_never_crash(scale, dx, dy, jitter, seed):
    image, lm = _faces()[2]
    rng = np.random.default_rng(seed)
    moved = (lm - 128) * scale + 128 + [dx, dy] + rng.normal(0, jitter, lm.shape)
    _valid_or_value_error(image, moved.astype(np.float32), seed)


@settings(max_examples=30, deadline=None)
@given(
    height=st.integers(8, 80),
    width=st.integers(8, 80),
    scale=st.floats(0.02, 1.5),
    dx=st.floats(-0.5, 0.5),
    dy=st.floats(-0.5, 0.5),
    seed=st.integers(0, 2**16),
)
def test_small_images_never_crash(height, width, scale, dx, dy, seed):
    image, lm = _faces()[3]
    small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    moved = (lm - 128) * scale * min(height, width) / 256 + [
        (0.5 + dx) * width,
        (0.5 + dy) * height,
    ]
    for config in (NO_JPEG, sbi.SBIConfig(jpeg_p=1.0)):
        try:
            real, fake, mask = sbi.self_blend(
                small, moved.astype(np.float32), np.random.default_rng(seed), config=config
            )
        except ValueError:
            continue
        _check_pair(small, real, fake, mask)


def test_bad_inputs_name_the_argument():
    image, lm = _faces()[0]
    rng = np.random.default_rng(0)
    for bad in (
        image.astype(np.float32),
        image[..., 0],
        np.dstack([image, image[..., :1]]),
        image.tolist(),
        image[:4, :4],
    ):
        with pytest.raises(ValueError, match="image"):
            sbi.self_blend(bad, lm, rng)
    for bad in (lm[:5], np.zeros((68, 3)), lm.T, lm.astype(complex), lm.astype(str), "landmarks"):
        with pytest.raises(ValueError, match=r"landmarks.*\(68, 2\)"):
            sbi.self_blend(image, bad, rng)
    with pytest.raises(ValueError, match="hull_type"):
        sbi.self_blend(image, lm, rng, hull_type="forehead")
    with pytest.raises(TypeError, match="rng"):
        sbi.self_blend(image, lm, 0)
    # integer landmarks and non-contiguous images are fine
    _check_pair(image, *sbi.self_blend(image[:, ::-1], np.round(lm).astype(np.int64), rng))


def test_config_is_frozen_and_checked():
    cfg = sbi.SBIConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.jpeg_p = 0.0
    bad_configs = (
        {"jpeg_p": 1.5},
        {"blur1_kernel": (4, 25)},
        {"hull_types": ("oval",)},
        {"blend_ratios": ()},
    )
    for bad in bad_configs:
        with pytest.raises(ValueError):
            sbi.SBIConfig(**bad)


def test_elastic_field_matches_full_resolution_statistics():
    """The coarse-grid displacement has the std of alpha * GaussianBlur_sigma(U(-1, 1))."""
    cfg = sbi.SBIConfig()
    rng = np.random.default_rng(0)
    size, pad = 256, 4 * int(cfg.elastic_sigma)
    k = 2 * pad + 1
    full = [
        cv2.GaussianBlur(
            rng.random((size + 2 * pad, size + 2 * pad), dtype=np.float32) * 2 - 1,
            (k, k),
            cfg.elastic_sigma,
        )[pad:-pad, pad:-pad]
        * cfg.elastic_alpha
        for _ in range(4)
    ]
    std_full = np.std(full)
    assert 1.0 < std_full < 1.4  # about alpha * sqrt(1/3) / (2 sqrt(pi) sigma) = 1.16 px
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size)), -1).astype(np.float32)
    for elastic_grid in (1, 4):
        cfg_g = dataclasses.replace(cfg, elastic_grid=elastic_grid)
        fields = [
            sbi._mask_maps(rng, (0, 0, size, size), np.ones(2), np.zeros(2), cfg_g) - grid
            for _ in range(4)
        ]
        assert abs(np.std(fields) / std_full - 1) < 0.1
        assert np.abs(np.mean(fields)) < 0.1
