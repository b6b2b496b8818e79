"""ResNet-18/34/50 backbones in Flax Linen (NHWC), laid out like torchvision's ResNet v1.5.

The module returns the last feature map (B, h, w, c); there is no pooling or classifier.
Input: float images (B, H, W, 3), already normalised. Output stride 32, or 16 with
``dilate_last=True`` (torchvision's ``replace_stride_with_dilation=[False, False, True]``).
Channels of the output: ``8 * width`` (BasicBlock nets) or ``32 * width`` (ResNet-50).

Structure (identical to torchvision, so outputs match it in eval mode):
  stem: conv1 7x7/2 pad 3 -> bn1 -> relu -> max pool 3x3/2 pad 1
  layer1..layer4: BasicBlock (two 3x3) or Bottleneck (1x1, 3x3, 1x1, expansion 4), the stride
  on the 3x3 conv (v1.5), a 1x1 conv + BN "downsample" on the shortcut when shape changes.
  Stage widths: width * (1, 2, 4, 8), width = 64 for the torchvision nets.

Parameter names and the torchvision state_dict keys they correspond to:
  params/conv1/kernel                  conv1.weight
  params/bn1/{scale,bias}              bn1.{weight,bias}
  batch_stats/bn1/{mean,var}           bn1.{running_mean,running_var}
  params/layer{s}_{i}/conv{j}/kernel   layer{s}.{i}.conv{j}.weight          (j = 1, 2, (3))
  params/layer{s}_{i}/bn{j}/...        layer{s}.{i}.bn{j}.*                 (as bn1 above)
  params/layer{s}_{i}/downsample_conv/kernel   layer{s}.{i}.downsample.0.weight
  params/layer{s}_{i}/downsample_bn/...        layer{s}.{i}.downsample.1.*
Conv kernels are (kh, kw, in, out) here and (out, in, kh, kw) in PyTorch: transpose (2, 3, 1, 0).
``num_batches_tracked`` and ``fc.*`` have no counterpart.

BatchNorm: momentum 0.9 (PyTorch 0.1), eps 1e-5. In training, Flax updates the running variance
with the biased batch variance, PyTorch with the unbiased one; eval outputs are unaffected.
Under ``jax.jit`` over a sharded batch the statistics are those of the global batch (sync BN).

Convolutions: ``conv_impl`` picks how they are computed, not what (CONV_IMPLS below). On CPU
the default 'auto' computes the convolutions and the training-mode BatchNorm (+ ReLU) through
oneDNN custom calls where they can be built ('onednn'), else the 1x1 convs as matrix
products, which XLA runs about twice as fast as its convolutions, the stem over 4 input
channels and the stem max pool without reduce_window ('matmul'); GPUs and TPUs use lax
convolutions and reduce_window.

Dilation: torchvision's BasicBlock does not support it; here the dilated stage of a BasicBlock
net follows the Bottleneck rule: its first block keeps dilation 1 (and drops the stride), the
following blocks use dilation 2 in both 3x3 convs.
"""

import functools
import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# torchvision initialises convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# How the ResNet convolutions are computed (the variables are the same for all):
#   'xla'    lax.conv_general_dilated;
#   'matmul' 1x1 convs as one 2-D matrix product (stride 2: a strided slice first), which
#            XLA:CPU runs, forward and backward, in about half the time of its convolution;
#            the 7x7 stem over its input zero-padded from 3 to 4 channels (_STEM_CHANNELS);
#            other k x k convs stay lax.conv_general_dilated; the stem max pool as nine
#            strided slices with a closed-form gradient (max_pool_3x3_s2);
#   'im2col' every conv as a matrix product (k x k: over the k*k shifted windows of the input),
#            slower than 'matmul' on XLA:CPU (benchmarks/RESULTS.md), kept for measurements;
#   'onednn' every conv, and each BatchNorm with the ReLU after it, through oneDNN (the
#            library PyTorch uses on CPU) as XLA custom calls (cmil_jax.ops.onednn; CPU,
#            float32; needs the `onednn` extra and a C++ compiler): about 1.2x the train-step
#            rate of 'matmul' on ResNet-50 (benchmarks/RESULTS.md);
#   'auto'   'onednn' on CPU where it can be used (float32, one device), else 'matmul' on
#            CPU, 'xla' on GPU and TPU.
CONV_IMPLS = ("auto", "xla", "matmul", "im2col", "onednn")


def resolve_conv_impl(impl: str, dtype=jnp.float32) -> str:
    """'auto' -> on the CPU backend 'onednn' when it can be used (float32, one device, the
    library built: cmil_jax.ops.onednn.available()), else 'matmul'; 'xla' on GPU and TPU.
    Checks the name."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "xla"
    # XLA does not split the custom calls over devices: several CPU devices keep 'matmul'.
    if jnp.dtype(dtype) != jnp.float32 or jax.device_count() > 1:
        return "matmul"
    from cmil_jax.ops import onednn

    usable, why = onednn.available()
    if not usable:
        _log_once(f"conv_impl 'auto' uses 'matmul' on this CPU: {why}")
        return "matmul"
    return "onednn"


@functools.lru_cache(maxsize=None)
def _log_once(message: str):
    logging.warning(message)


# XLA:CPU's convolution runs the 7x7 stem over 3 input channels at half its rate over 4: with
# the image and the kernel zero-padded to 4 channels (the same result), forward and weight
# gradient of the demo nets' stem take 19 ms instead of 40 (B 48, 72 px, 32 filters), also
# less than as an im2col product over the 49 shifted windows (benchmarks/RESULTS.md).
_STEM_CHANNELS = 4


def _matmul(x, w):
    """(B, H, W, c) @ (c, o) -> (B, H, W, o) as one 2-D product (XLA:CPU runs a rank-4
    dot_general and its gradients up to 4x slower than the same product on (B*H*W, c))."""
    b, h, wd, c = x.shape
    return (x.reshape(b * h * wd, c) @ w).reshape(b, h, wd, w.shape[-1])


def _shifted_inputs(x, kernel, stride, dilation, pad):
    """The kernel * kernel strided windows of the zero-padded x, each (B, ho, wo, c), in the
    (row, column) order of an HWIO kernel."""
    b, h, w, c = x.shape
    span = dilation * (kernel - 1)
    ho = (h + 2 * pad - span - 1) // stride + 1
    wo = (w + 2 * pad - span - 1) // stride + 1
    if pad:
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = []
    for i in range(kernel):
        for j in range(kernel):
            start = (0, i * dilation, j * dilation, 0)
            limit = (b, start[1] + (ho - 1) * stride + 1, start[2] + (wo - 1) * stride + 1, c)
            out.append(lax.slice(x, start, limit, (1, stride, stride, 1)))
    return out


def conv2d(x, kernel, stride=1, dilation=1, pad=0, impl="xla"):
    """Square bias-free convolution, NHWC input, HWIO kernel (k, k, c, o), symmetric zero
    padding ``pad``: (B, H, W, c) -> (B, ho, wo, o).

    ``impl`` (the same result within float32 rounding):
      'xla'     lax.conv_general_dilated;
      'matmul'  1x1 unpadded convs as a matrix product; convs over fewer than
                _STEM_CHANNELS input channels (the stem) as 'xla' over input and kernel
                zero-padded to _STEM_CHANNELS channels; others as 'xla';
      'im2col'  every conv as a matrix product: k x k convs over the k*k shifted windows of the
                input concatenated on channels (B, ho, wo, k*k*c) @ (k*k*c, o).
    """
    k = kernel.shape[0]
    if impl not in CONV_IMPLS[1:]:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS[1:]}, got {impl!r}")
    c = x.shape[-1]
    if impl == "onednn":
        from cmil_jax.ops import onednn  # builds its custom calls on first use

        return onednn.conv2d(x, kernel, stride, dilation, pad)
    if impl == "matmul" and (k > 1 or pad):
        if c < _STEM_CHANNELS:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, _STEM_CHANNELS - c)))
            kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, _STEM_CHANNELS - c), (0, 0)))
        impl = "xla"
    if impl == "xla":
        return lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            ((pad, pad), (pad, pad)),
            rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    if k == 1 and pad == 0:
        return _matmul(x[:, ::stride, ::stride] if stride > 1 else x, kernel[0, 0])
    cols = jnp.concatenate(_shifted_inputs(x, k, stride, dilation, pad), axis=-1)
    return _matmul(cols, kernel.reshape(-1, kernel.shape[-1]))


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
    lax.reduce_window's select-and-scatter, but is written as nine masked, stride-dilated
    pads: XLA:CPU runs select-and-scatter (and reduce_window) single-threaded and slowly.
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


class Conv(nn.Module):
    """Bias-free square conv with PyTorch's symmetric padding dilation * (kernel - 1) / 2.

    Parameter 'kernel' (k, k, in, out), initialised and named as flax.linen.Conv's, so the
    variables do not depend on ``impl``.
    """

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    impl: str = "xla"  # 'xla' | 'matmul' | 'im2col' (see conv2d)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param(
            "kernel", _conv_init, (k, k, x.shape[-1], self.features), self.param_dtype
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        pad = self.dilation * (k - 1) // 2
        return conv2d(x, kernel, self.stride, self.dilation, pad, self.impl)


def _conv(features, kernel, stride=1, dilation=1, *, name, dtype, param_dtype, impl="xla"):
    return Conv(
        features,
        kernel,
        stride,
        dilation,
        impl=impl,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class OneDNNBatchNorm(nn.Module):
    """flax.linen.BatchNorm's computation and variables (params scale, bias; batch_stats mean,
    var), optionally followed by a ReLU, with the training-mode normalisation and its gradient
    computed by oneDNN (cmil_jax.ops.onednn, CPU, float32) in one call each way."""

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    relu: bool = False
    scale_init: Any = nn.initializers.ones
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        from cmil_jax.ops import onednn

        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        if self.use_running_average:
            mul = scale * lax.rsqrt(ra_var.value + self.epsilon)
            y = (x - ra_mean.value) * mul + bias
            return nn.relu(y) if self.relu else y
        y, mean, var = onednn.batch_norm_train(x, scale, bias, self.epsilon, self.relu)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * mean
            ra_var.value = m * ra_var.value + (1 - m) * var
        return y


def _bn(train, *, name, dtype, param_dtype, zero_scale=False, relu=False, impl="xla"):
    """BatchNorm (momentum 0.9, eps 1e-5), then a ReLU when ``relu``; with impl 'onednn' both
    in one oneDNN call (same variables)."""
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    if impl == "onednn":
        return OneDNNBatchNorm(
            use_running_average=not train,
            relu=relu,
            scale_init=scale_init,
            param_dtype=param_dtype,
            name=name,
        )
    bn = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        scale_init=scale_init,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )
    return (lambda x: nn.relu(bn(x))) if relu else bn


class BasicBlock(nn.Module):
    """Two 3x3 convs; output channels = ``features``."""

    features: int
    stride: int = 1
    dilation: int = 1  # of both 3x3 convs
    zero_init_last_bn: bool = False
    conv_impl: str = "xla"  # 'xla' | 'matmul' | 'im2col' (see conv2d)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = {"impl": self.conv_impl, **kw}
        y = _conv(self.features, 3, self.stride, self.dilation, name="conv1", **ckw)(x)
        y = _bn(train, name="bn1", relu=True, **ckw)(y)
        y = _conv(self.features, 3, 1, self.dilation, name="conv2", **ckw)(y)
        y = _bn(train, name="bn2", zero_scale=self.zero_init_last_bn, **ckw)(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, name="downsample_conv", **ckw)(x)
            x = _bn(train, name="downsample_bn", **ckw)(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1; output channels = 4 * ``features``."""

    features: int
    stride: int = 1
    dilation: int = 1  # of the 3x3 conv
    zero_init_last_bn: bool = False
    conv_impl: str = "xla"  # 'xla' | 'matmul' | 'im2col' (see conv2d)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = {"impl": self.conv_impl, **kw}
        out = self.features * self.expansion
        y = _conv(self.features, 1, name="conv1", **ckw)(x)
        y = _bn(train, name="bn1", relu=True, **ckw)(y)
        y = _conv(self.features, 3, self.stride, self.dilation, name="conv2", **ckw)(y)
        y = _bn(train, name="bn2", relu=True, **ckw)(y)
        y = _conv(out, 1, name="conv3", **ckw)(y)
        y = _bn(train, name="bn3", zero_scale=self.zero_init_last_bn, **ckw)(y)
        if self.stride != 1 or x.shape[-1] != out:
            x = _conv(out, 1, self.stride, name="downsample_conv", **ckw)(x)
            x = _bn(train, name="downsample_bn", **ckw)(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet trunk without head: (B, H, W, 3) float -> last feature map (B, h, w, c).

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
      block_cls: BasicBlock or Bottleneck.
      width: base width (64 in torchvision); stage widths are width * (1, 2, 4, 8).
      dilate_last: replace the stride of layer4 by dilation 2 (output stride 16 instead of 32).
      zero_init_last_bn: init the last BN scale of each block to 0 (torchvision default: False).
      conv_impl: how the convolutions (and with 'onednn' the BatchNorms) are computed, 'auto' |
        'xla' | 'matmul' | 'im2col' | 'onednn' (CONV_IMPLS); the variables are the same.
    """

    stage_sizes: Sequence[int]
    block_cls: Any
    width: int = 64
    dilate_last: bool = False
    zero_init_last_bn: bool = False
    conv_impl: str = "auto"  # see CONV_IMPLS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        impl = resolve_conv_impl(self.conv_impl, self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = _conv(self.width, 7, 2, name="conv1", impl=impl, **kw)(x)
        x = _bn(train, name="bn1", relu=True, impl=impl, **kw)(x)
        if impl == "xla":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = max_pool_3x3_s2(x)

        dilation = 1
        for s, num_blocks in enumerate(self.stage_sizes):
            stride = 1 if s == 0 else 2
            first_dilation = dilation  # torchvision: the first block keeps the previous dilation
            if self.dilate_last and s == len(self.stage_sizes) - 1:
                dilation *= stride
                stride = 1
            for i in range(num_blocks):
                x = self.block_cls(
                    features=self.width * 2**s,
                    stride=stride if i == 0 else 1,
                    dilation=first_dilation if i == 0 else dilation,
                    zero_init_last_bn=self.zero_init_last_bn,
                    conv_impl=impl,
                    name=f"layer{s + 1}_{i}",
                    **kw,
                )(x, train=train)
        return x


def resnet10(**kwargs) -> ResNet:
    """Small demo net, BasicBlock (1, 1, 1, 1). Not a torchvision model: no pretrained weights.

    (timm's resnet10t is a different net with a three-conv stem.)
    """
    return ResNet(stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, **kwargs)


def resnet18(**kwargs) -> ResNet:
    return ResNet(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock, **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, **kwargs)
