"""oneDNN custom calls (cmil_jax.runtime.onednn); skipped where they cannot be built (no
`onednn` extra or no C++ compiler), except the report of what is missing.

The convolutions are also checked against lax.conv_general_dilated in tests/test_runtime.py,
whole ResNets and CMIL models in train and eval mode there too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmil_jax.runtime import onednn

ONEDNN_OK, ONEDNN_WHY = onednn.available()
needs_onednn = pytest.mark.skipif(not ONEDNN_OK, reason=f"oneDNN calls unavailable: {ONEDNN_WHY}")


def _reference_bn(x, scale, shift, eps, relu):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    y = (x - mean) / jnp.sqrt(var + eps) * scale + shift
    return (jnp.maximum(y, 0) if relu else y), mean, var


@needs_onednn
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(4, 5, 6, 16), (2, 3, 3, 5), (1, 7, 7, 33)])
def test_batch_norm_train_matches_formula(shape, relu):
    """Output, batch mean, biased variance and the gradients in x, scale and shift equal
    those of the textbook formula differentiated by JAX."""
    rng = np.random.default_rng(sum(shape) + relu)
    x = jnp.asarray(rng.normal(1.0, 3.0, size=shape), jnp.float32)
    scale = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
    shift = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
    weights = jnp.asarray(rng.normal(size=shape), jnp.float32)

    got = jax.jit(lambda *a: onednn.batch_norm_train(*a, 1e-5, relu))(x, scale, shift)
    want = _reference_bn(x, scale, shift, 1e-5, relu)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, s, b: jnp.sum(weights * fn(x, s, b)[0])

    g_got = jax.jit(jax.grad(loss(lambda *a: onednn.batch_norm_train(*a, 1e-5, relu)), (0, 1, 2)))(
        x, scale, shift
    )
    g_want = jax.grad(loss(lambda *a: _reference_bn(*a, 1e-5, relu)), (0, 1, 2))(x, scale, shift)
    for g, w in zip(g_got, g_want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))


@needs_onednn
def test_batch_norm_statistics_carry_no_gradient():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), jnp.float32)
    ones, zeros = jnp.ones(3), jnp.zeros(3)
    grad = jax.grad(lambda x: jnp.sum(onednn.batch_norm_train(x, ones, zeros)[1]))(x)
    np.testing.assert_array_equal(grad, np.zeros_like(grad))


@needs_onednn
def test_float32_only():
    x = jnp.zeros((1, 4, 4, 2), jnp.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        onednn.conv2d(x, jnp.zeros((3, 3, 2, 2), jnp.bfloat16), 1, 1, 1)
    with pytest.raises(TypeError, match="float32"):
        onednn.batch_norm_train(x, jnp.ones(2), jnp.zeros(2))


def test_missing_library_is_reported(monkeypatch, tmp_path):
    """Without oneDNN's headers and library the error says where it looked and what to
    install."""
    monkeypatch.setenv("CMIL_ONEDNN_ROOT", str(tmp_path))
    with pytest.raises(onednn.OneDNNUnavailable, match=r"not found.*onednn") as err:
        onednn._find_onednn()
    assert str(tmp_path) in str(err.value)
