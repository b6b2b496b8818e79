"""Backbones and the CMIL model: shapes, parameter counts, BatchNorm state, dtypes, jit.

Shape and parameter-count checks use jax.eval_shape (no compute); only small nets run for real.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmil_jax.models import BACKBONES, CMIL, build_backbone, feature_stride, resnet
from cmil_jax.models.cmil import normalize_images, pool_patches


def _key(seed=0):
    # The rbg generator compiles several times faster than threefry on CPU; values do not matter here.
    return jax.random.key(seed, impl="rbg")


def _shapes(module, image_shape, dtype=jnp.float32):
    """(variables, output) shape trees of module.init / module.apply, computed without running."""
    x = jax.ShapeDtypeStruct(image_shape, dtype)
    variables = jax.eval_shape(lambda x: module.init(_key(0), x, train=False), x)
    out = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
    return variables, out


def _count(tree):
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


# ---------------------------------------------------------------- backbones

@pytest.mark.parametrize("name, channels", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("dilate_last", [False, True])
def test_backbone_output_shape(name, channels, dilate_last):
    stride = feature_stride(name, dilate_last)
    assert stride == (16 if dilate_last else 32)
    _, out = _shapes(build_backbone(name, dilate_last=dilate_last), (2, 64, 64, 3))
    assert out.shape == (2, 64 // stride, 64 // stride, channels)
    assert out.dtype == jnp.float32


def _torch_out(n, kernel, stride, pad, dilation=1):
    return (n + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


@pytest.mark.parametrize("size", [70, 67])
def test_backbone_odd_size_follows_pytorch_arithmetic(size):
    n = _torch_out(size, 7, 2, 3)  # stem conv
    n = _torch_out(n, 3, 2, 1)  # max pool
    for _ in range(3):  # layer2..layer4, stride on the 3x3 conv
        n = _torch_out(n, 3, 2, 1)
    _, out = _shapes(build_backbone("resnet50"), (1, size, size, 3))
    assert out.shape[1:3] == (n, n)


# torchvision totals 11,689,512 / 21,797,672 / 25,557,032 minus fc 513,000 / 513,000 / 2,049,000.
@pytest.mark.parametrize(
    "name, count", [("resnet18", 11_176_512), ("resnet34", 21_284_672), ("resnet50", 23_508_032)]
)
def test_backbone_param_count_matches_torchvision(name, count):
    for dilate_last in (False, True):
        variables, _ = _shapes(build_backbone(name, dilate_last=dilate_last), (1, 64, 64, 3))
        assert _count(variables["params"]) == count


def test_backbone_param_names_and_layouts():
    variables, _ = _shapes(build_backbone("resnet50"), (1, 64, 64, 3))
    params, stats = variables["params"], variables["batch_stats"]
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert set(params["bn1"]) == {"scale", "bias"} and set(stats["bn1"]) == {"mean", "var"}
    blocks = {k for k in params if k.startswith("layer")}
    assert blocks == {f"layer{s}_{i}" for s, n in zip(range(1, 5), (3, 4, 6, 3)) for i in range(n)}
    assert set(params["layer2_0"]) == {
        "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn"
    }
    assert "downsample_conv" not in params["layer2_1"]
    assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert params["layer4_0"]["downsample_conv"]["kernel"].shape == (1, 1, 1024, 2048)

    variables, _ = _shapes(build_backbone("resnet18"), (1, 64, 64, 3))
    assert set(variables["params"]["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert "downsample_conv" in variables["params"]["layer2_0"]


def test_backbone_width_and_dtype():
    variables, out = _shapes(build_backbone("resnet10", width=16, dtype=jnp.bfloat16), (2, 64, 64, 3))
    assert out.shape == (2, 2, 2, 128) and out.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    _, out = _shapes(build_backbone("resnet50", width=8), (1, 64, 64, 3))
    assert out.shape == (1, 2, 2, 256)


def test_zero_init_last_bn():
    model = build_backbone("resnet10", width=8, zero_init_last_bn=True)
    params = jax.jit(lambda x: model.init(_key(0), x))(jnp.zeros((1, 32, 32, 3)))["params"]
    assert np.all(np.asarray(params["layer1_0"]["bn2"]["scale"]) == 0)
    assert np.all(np.asarray(params["layer1_0"]["bn1"]["scale"]) == 1)


def test_batch_stats_update_only_in_train_mode():
    model = build_backbone("resnet10", width=8, dilate_last=True)
    x = jax.random.normal(_key(1), (4, 32, 32, 3)) * 2.0 + 1.0
    variables = jax.jit(lambda x: model.init(_key(0), x))(x)

    @functools.partial(jax.jit, static_argnames="train")
    def run(variables, x, train):
        return model.apply(variables, x, train=train, mutable=["batch_stats"])

    out, new_train = run(variables, x, train=True)
    assert out.shape == (4, 2, 2, 64)  # stride 16
    out_eval, new_eval = run(variables, x, train=False)
    old = jax.tree.leaves(variables["batch_stats"])
    assert all(np.array_equal(a, b) for a, b in zip(old, jax.tree.leaves(new_eval["batch_stats"])))
    changed = [not np.allclose(a, b) for a, b in zip(old, jax.tree.leaves(new_train["batch_stats"]))]
    assert all(changed)
    assert np.all(np.isfinite(np.asarray(out_eval)))


def test_unknown_backbone_raises():
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("resnet101")
    with pytest.raises(ValueError, match="valid names"):
        feature_stride("vit_b16")
    with pytest.raises(ValueError, match="resnet50"):
        CMIL(backbone="nope").init(_key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    assert {"resnet18", "resnet34", "resnet50"} <= set(BACKBONES)


# ---------------------------------------------------------------- CMIL

# Demo-sized CMIL: 64 px, resnet10 at width 16, dilate_last -> 4 x 4 = 16 patches.
DEMO = dict(backbone="resnet10", backbone_width=16, width=48, embed_dim=16, dilate_last=True)


@pytest.fixture(scope="module")
def cmil_bf16():
    """(model, variables, images, outputs) for the demo CMIL with bfloat16 compute."""
    model = CMIL(**DEMO, dtype=jnp.bfloat16)
    images = jax.random.randint(_key(2), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
    variables = jax.jit(lambda x: model.init(_key(0), x, train=False))(images)
    outputs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    return model, variables, images, outputs


def test_cmil_shapes_and_dtypes(cmil_bf16):
    model, variables, _, out = cmil_bf16
    b, n, c = 2, 16, 5
    expected = {
        "class_logits": (b, c),
        "patch_class_logits": (b, n, c),
        "patch_logits": (b, c),
        "mil_emb": (b, n, 16),
        "mil_bias": (),
        "feature_map": (b, 4, 4, 128),
    }
    assert {k: v.shape for k, v in out.items()} == expected
    assert all(v.dtype == jnp.float32 for v in out.values())
    assert all(np.all(np.isfinite(np.asarray(v))) for v in out.values())
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    params = variables["params"]
    assert params["pos_embed"].shape == (4, 4, 48)
    assert params["class_tokens"].shape == (5, 48)
    assert params["class_head"]["kernel"].shape == (5, 48)
    assert params["class_head"]["bias"].shape == (5,)
    assert params["tokenizer"]["kernel"].shape == (1, 1, 128, 48)
    assert "conv1" in params["backbone"] and "batch_stats" in variables


def test_cmil_mil_emb_unit_norm_and_bias(cmil_bf16):
    _, _, _, out = cmil_bf16
    norms = np.linalg.norm(np.asarray(out["mil_emb"]), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert float(out["mil_bias"]) == pytest.approx(0.5)


def test_cmil_pool_options(cmil_bf16):
    model, variables, images, out = cmil_bf16
    q = out["patch_class_logits"]
    np.testing.assert_allclose(out["patch_logits"], q.mean(axis=1), rtol=1e-5, atol=1e-6)
    # The pooling has no parameters: the same variables serve every option.
    for pool in ("max", "lse"):
        other = model.clone(patch_pool=pool, pool_temperature=0.5)
        got = jax.jit(lambda v, x: other.apply(v, x, train=False))(variables, images)
        np.testing.assert_allclose(got["patch_class_logits"], q, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["patch_logits"], pool_patches(q, pool, 0.5), rtol=1e-5, atol=1e-6)


def test_pool_patches():
    q = jax.random.normal(_key(0), (3, 10, 4)) * 3
    mean, mx = q.mean(1), q.max(1)
    np.testing.assert_allclose(pool_patches(q, "mean"), mean, rtol=1e-6)
    np.testing.assert_allclose(pool_patches(q, "max"), mx, rtol=1e-6)
    for t in (0.1, 1.0, 10.0):
        lse = pool_patches(q, "lse", t)
        assert np.all(lse >= mean - 1e-5) and np.all(lse <= mx + 1e-5)
    np.testing.assert_allclose(pool_patches(q, "lse", 1e-3), mx, atol=1e-2)
    np.testing.assert_allclose(pool_patches(q, "lse", 1e4), mean, atol=1e-2)
    with pytest.raises(ValueError, match="patch_pool"):
        pool_patches(q, "median")


def test_cmil_binary_mode():
    model = CMIL(**DEMO, num_class_tokens=1, num_classes=1)
    variables, out = _shapes(model, (3, 64, 64, 3), jnp.uint8)
    assert out["class_logits"].shape == (3, 1)
    assert out["patch_logits"].shape == (3, 1)
    assert out["patch_class_logits"].shape == (3, 16, 1)
    assert variables["params"]["class_tokens"].shape == (1, 48)


def test_cmil_config_errors():
    x = jnp.zeros((1, 64, 64, 3), jnp.uint8)
    with pytest.raises(ValueError, match="num_class_tokens"):
        _shapes(CMIL(**DEMO, num_class_tokens=1, num_classes=5), x.shape)
    with pytest.raises(ValueError, match="patch_pool"):
        _shapes(CMIL(**DEMO, patch_pool="median"), x.shape)


def test_cmil_jit_train_step():
    model = CMIL(**DEMO)
    images = jax.random.randint(_key(3), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
    variables = jax.jit(lambda x: model.init(_key(0), x, train=False))(images)

    @jax.jit
    def step(params, batch_stats, x):
        def loss_fn(params):
            out, new_state = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = jnp.mean(out["class_logits"] ** 2) + jnp.mean(out["patch_logits"] ** 2)
            loss = loss - jnp.mean(out["mil_emb"][:, :1] * out["mil_emb"]) + out["mil_bias"]
            return loss, new_state["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, new_stats, grads

    loss, new_stats, grads = step(variables["params"], variables["batch_stats"], images)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["backbone"]["conv1"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["pos_embed"]).sum()) > 0
    assert float(grads["mil_bias"]) == pytest.approx(1.0)
    old_mean = variables["batch_stats"]["backbone"]["bn1"]["mean"]
    assert not np.allclose(new_stats["backbone"]["bn1"]["mean"], old_mean)


def test_normalize_images_uint8_equals_float():
    images = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3).astype(np.uint8) * 2
    a = normalize_images(images)
    np.testing.assert_allclose(a, normalize_images(images.astype(np.float32)), rtol=0, atol=0)
    expected = (images[1, 2, 3] / 255.0 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(a[1, 2, 3], expected, rtol=1e-5)
    assert normalize_images(images, jnp.bfloat16).dtype == jnp.bfloat16
