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

Dilation: torchvision's BasicBlock does not support it; here the dilated stage of a BasicBlock
net follows the Bottleneck rule: its first block keeps dilation 1 (and drops the stride), the
following blocks use dilation 2 in both 3x3 convs.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# torchvision initialises convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features, kernel, stride=1, dilation=1, *, name, dtype, param_dtype):
    """Bias-free conv with PyTorch's explicit symmetric padding: dilation * (kernel - 1) / 2."""
    pad = dilation * (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=False,
        kernel_init=_conv_init,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def _bn(train, *, name, dtype, param_dtype, zero_scale=False):
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs; output channels = ``features``."""

    features: int
    stride: int = 1
    dilation: int = 1  # of both 3x3 convs
    zero_init_last_bn: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = _conv(self.features, 3, self.stride, self.dilation, name="conv1", **kw)(x)
        y = nn.relu(_bn(train, name="bn1", **kw)(y))
        y = _conv(self.features, 3, 1, self.dilation, name="conv2", **kw)(y)
        y = _bn(train, name="bn2", zero_scale=self.zero_init_last_bn, **kw)(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, name="downsample_conv", **kw)(x)
            x = _bn(train, name="downsample_bn", **kw)(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1; output channels = 4 * ``features``."""

    features: int
    stride: int = 1
    dilation: int = 1  # of the 3x3 conv
    zero_init_last_bn: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = self.features * self.expansion
        y = _conv(self.features, 1, name="conv1", **kw)(x)
        y = nn.relu(_bn(train, name="bn1", **kw)(y))
        y = _conv(self.features, 3, self.stride, self.dilation, name="conv2", **kw)(y)
        y = nn.relu(_bn(train, name="bn2", **kw)(y))
        y = _conv(out, 1, name="conv3", **kw)(y)
        y = _bn(train, name="bn3", zero_scale=self.zero_init_last_bn, **kw)(y)
        if self.stride != 1 or x.shape[-1] != out:
            x = _conv(out, 1, self.stride, name="downsample_conv", **kw)(x)
            x = _bn(train, name="downsample_bn", **kw)(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet trunk without head: (B, H, W, 3) float -> last feature map (B, h, w, c).

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
      block_cls: BasicBlock or Bottleneck.
      width: base width (64 in torchvision); stage widths are width * (1, 2, 4, 8).
      dilate_last: replace the stride of layer4 by dilation 2 (output stride 16 instead of 32).
      zero_init_last_bn: init the last BN scale of each block to 0 (torchvision default: False).
    """

    stage_sizes: Sequence[int]
    block_cls: Any
    width: int = 64
    dilate_last: bool = False
    zero_init_last_bn: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        x = _conv(self.width, 7, 2, name="conv1", **kw)(x)
        x = nn.relu(_bn(train, name="bn1", **kw)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

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
