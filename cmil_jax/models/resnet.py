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

Layers: the ResNet receives how it computes its convolutions, BatchNorms and stem max pool
as a ``Layers`` set (as flax's example ResNet receives ``conv`` and ``norm``). ``FLAX_LAYERS``
(flax.linen Conv, BatchNorm, max_pool) is the default; ``cmil_jax.runtime`` supplies other sets
for the CPU. Every set creates the same variables, so weights do not depend on it.

Dilation: torchvision's BasicBlock does not support it; here the dilated stage of a BasicBlock
net follows the Bottleneck rule: its first block keeps dilation 1 (and drops the stride), the
following blocks use dilation 2 in both 3x3 convs.
"""

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

# torchvision initialises convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1
BN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Layers:
    """How a ResNet computes its layers; every set creates the same variables.

    conv(features, kernel_size, stride, dilation, *, name, dtype, param_dtype) -> a module
        (B, H, W, c) -> (B, ho, wo, features): square, bias-free, zero padding
        dilation * (kernel_size - 1) // 2 on each side (PyTorch's), one parameter 'kernel'
        (k, k, c, features) initialised with CONV_INIT.
    norm(train, *, relu, scale_init, name, dtype, param_dtype) -> a callable (B, H, W, c) ->
        (B, H, W, c): BatchNorm (momentum BN_MOMENTUM, eps BN_EPS; params scale and bias,
        batch_stats mean and var, named as flax.linen.BatchNorm's), then a ReLU when ``relu``.
    max_pool(x): the stem's 3x3, stride 2, padding 1 max pool.
    norm_add_relu(train, *, scale_init, name, dtype, param_dtype) -> a callable
        (y, residual) -> relu(BatchNorm(y) + residual), the end of a residual block; None (the
        default): ``norm`` then the add and the ReLU in the compute dtype.
    """

    name: str
    conv: Callable[..., Callable]
    norm: Callable[..., Callable]
    max_pool: Callable[[Any], Any]
    norm_add_relu: Callable[..., Callable] | None = None


def flax_conv(features, kernel_size, stride=1, dilation=1, *, name, dtype, param_dtype,
              conv_general_dilated=None):
    """flax.linen.Conv as Layers.conv wants it; `conv_general_dilated` (default
    lax.conv_general_dilated) computes it."""
    pad = dilation * (kernel_size - 1) // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=dilation,
        use_bias=False,
        kernel_init=CONV_INIT,
        dtype=dtype,
        param_dtype=param_dtype,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def flax_norm(train, *, relu=False, scale_init=nn.initializers.ones, name, dtype, param_dtype):
    bn = nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPS,
        scale_init=scale_init,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )
    return (lambda x: nn.relu(bn(x))) if relu else bn


def flax_max_pool(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


FLAX_LAYERS = Layers("xla", flax_conv, flax_norm, flax_max_pool)


class BasicBlock(nn.Module):
    """Two 3x3 convs; output channels = ``features``."""

    features: int
    stride: int = 1
    dilation: int = 1  # of both 3x3 convs
    zero_init_last_bn: bool = False
    layers: Layers = FLAX_LAYERS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, norm, norm_add_relu = _bind(self)
        last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = conv(self.features, 3, self.stride, self.dilation, name="conv1")(x)
        y = norm(train, relu=True, name="bn1")(y)
        y = conv(self.features, 3, 1, self.dilation, name="conv2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(self.features, 1, self.stride, name="downsample_conv")(x)
            x = norm(train, name="downsample_bn")(x)
        return norm_add_relu(train, scale_init=last_init, name="bn2")(y, x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1; output channels = 4 * ``features``."""

    features: int
    stride: int = 1
    dilation: int = 1  # of the 3x3 conv
    zero_init_last_bn: bool = False
    layers: Layers = FLAX_LAYERS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, norm, norm_add_relu = _bind(self)
        last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        out = self.features * self.expansion
        y = conv(self.features, 1, name="conv1")(x)
        y = norm(train, relu=True, name="bn1")(y)
        y = conv(self.features, 3, self.stride, self.dilation, name="conv2")(y)
        y = norm(train, relu=True, name="bn2")(y)
        y = conv(out, 1, name="conv3")(y)
        if self.stride != 1 or x.shape[-1] != out:
            x = conv(out, 1, self.stride, name="downsample_conv")(x)
            x = norm(train, name="downsample_bn")(x)
        return norm_add_relu(train, scale_init=last_init, name="bn3")(y, x)


def _bind(module):
    """The module's conv, norm and norm_add_relu factories with its dtype and param_dtype
    filled in."""
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)

    def conv(*args, name):
        return module.layers.conv(*args, name=name, **kw)

    def norm(train, *, name, relu=False, scale_init=nn.initializers.ones):
        return module.layers.norm(train, relu=relu, scale_init=scale_init, name=name, **kw)

    def norm_add_relu(train, *, name, scale_init=nn.initializers.ones):
        if module.layers.norm_add_relu is not None:
            return module.layers.norm_add_relu(train, scale_init=scale_init, name=name, **kw)
        bn = norm(train, scale_init=scale_init, name=name)
        return lambda y, residual: nn.relu(residual + bn(y))

    return conv, norm, norm_add_relu


class ResNet(nn.Module):
    """ResNet trunk without head: (B, H, W, 3) float -> last feature map (B, h, w, c).

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
      block_cls: BasicBlock or Bottleneck.
      width: base width (64 in torchvision); stage widths are width * (1, 2, 4, 8).
      dilate_last: replace the stride of layer4 by dilation 2 (output stride 16 instead of 32).
      zero_init_last_bn: init the last BN scale of each block to 0 (torchvision default: False).
      layers: how convolutions, BatchNorms and the stem max pool are computed (Layers).
    """

    stage_sizes: Sequence[int]
    block_cls: Any
    width: int = 64
    dilate_last: bool = False
    zero_init_last_bn: bool = False
    layers: Layers = FLAX_LAYERS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, norm, _ = _bind(self)
        x = jnp.asarray(x, self.dtype)
        x = conv(self.width, 7, 2, name="conv1")(x)
        x = norm(train, relu=True, name="bn1")(x)
        x = self.layers.max_pool(x)

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
                    layers=self.layers,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{s + 1}_{i}",
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
