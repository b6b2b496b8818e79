"""ResNet layers for XLA:CPU without oneDNN: 1x1 convolutions as matrix products, the stem
convolution over 4 input channels, the stem max pool as strided slices.

XLA:CPU runs a 1x1 convolution, forward and backward, slower than the same product written as
one 2-D matrix product, its 7x7 stem convolution over 3 input channels slower than over 4, and
``reduce_window`` / select-and-scatter (max pool and its gradient) on one thread
(benchmarks/RESULTS.md). ``MATMUL_LAYERS`` computes the same layers those faster ways, through
flax.linen.Conv with this module's ``conv_general_dilated``; other k x k convolutions stay
``lax.conv_general_dilated`` and BatchNorm stays flax's.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from cmil_jax.models import resnet

STEM_CHANNELS = 4  # the stem's input and kernel are zero-padded from 3 to this many channels


def _matmul(x, w):
    """(B, H, W, c) @ (c, o) -> (B, H, W, o) as one 2-D product (XLA:CPU runs a rank-4
    dot_general and its gradients slower than the same product on (B*H*W, c))."""
    b, h, wd, c = x.shape
    return (x.reshape(b * h * wd, c) @ w).reshape(b, h, wd, w.shape[-1])


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None):
    """lax.conv_general_dilated as flax.linen.Conv calls it (NHWC input, HWIO kernel), with
    unpadded 1x1 convolutions as one matrix product (a strided slice first) and convolutions
    over fewer than STEM_CHANNELS input channels over zero-padded channels. The same result
    within float32 rounding."""
    kh, kw, c, _ = rhs.shape
    plain = feature_group_count == 1 and tuple(lhs_dilation or (1, 1)) == (1, 1)
    if plain and (kh, kw) == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
        sh, sw = window_strides
        return _matmul(lhs[:, ::sh, ::sw] if (sh, sw) != (1, 1) else lhs, rhs[0, 0])
    if plain and c < STEM_CHANNELS:
        lhs = jnp.pad(lhs, ((0, 0), (0, 0), (0, 0), (0, STEM_CHANNELS - c)))
        rhs = jnp.pad(rhs, ((0, 0), (0, 0), (0, STEM_CHANNELS - c), (0, 0)))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision)


def _pool_windows(xp, ho, wo):
    """The nine (B, ho, wo, c) stride-2 windows of the padded xp, in row-major window order."""
    b, _, _, c = xp.shape
    return [
        lax.slice(xp, (0, i, j, 0), (b, i + 2 * ho - 1, j + 2 * wo - 1, c), (1, 2, 2, 1))
        for i in range(3)
        for j in range(3)
    ]


@jax.custom_vjp
def max_pool_3x3_s2(x):
    """torchvision's stem max pool (3x3, stride 2, padding 1): (B, H, W, c) -> (B, ho, wo, c),
    ho = (H - 1) // 2 + 1, as the maximum of nine strided slices.

    The gradient goes to the first maximum of each window in row-major order, as in
    lax.reduce_window's select-and-scatter, written as nine masked, stride-dilated pads.
    """
    return _max_pool_fwd(x)[0]


def _max_pool_fwd(x):
    b, h, w, c = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    out = functools.reduce(jnp.maximum, _pool_windows(xp, ho, wo))
    return out, (x, out)


def _max_pool_bwd(res, g):
    x, out = res
    b, h, w, c = x.shape
    ho, wo = out.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    taken = jnp.zeros(out.shape, bool)
    grad = jnp.zeros((b, h + 2, w + 2, c), g.dtype)
    zero = jnp.zeros((), g.dtype)
    for k, win in enumerate(_pool_windows(xp, ho, wo)):
        i, j = divmod(k, 3)
        first = (win == out) & ~taken
        taken = taken | first
        # Window element (i, j) of output (r, s) sits at padded row 2r + i, column 2s + j.
        grad = grad + lax.pad(
            jnp.where(first, g, zero),
            zero,
            ((0, 0, 0), (i, h + 2 - i - 2 * ho + 1, 1), (j, w + 2 - j - 2 * wo + 1, 1), (0, 0, 0)),
        )
    return (grad[:, 1:-1, 1:-1],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


MATMUL_LAYERS = resnet.Layers(
    "matmul",
    functools.partial(resnet.flax_conv, conv_general_dilated=conv_general_dilated),
    resnet.flax_norm,
    max_pool_3x3_s2,
)
