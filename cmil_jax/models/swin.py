"""Swin Transformer (Swin-T/S/B) backbones in Flax Linen (NHWC), laid out like timm's.

The module returns the last feature map (B, H/32, W/32, 8 * embed_dim) after the final
LayerNorm (timm's ``forward_features``); there is no pooling or classifier.
Input: float images (B, H, W, 3), already normalised; H and W multiples of 32.

Structure (Liu et al. 2021; identical to timm's SwinTransformer, so outputs match it):
  patch_embed: 4x4/4 conv -> LayerNorm                                   (B, H/4, W/4, C)
  layers_0..layers_3: [PatchMerging for i > 0] then ``depths[i]`` blocks with
    x + W-MSA(LN(x)), x + MLP(LN(x)); odd blocks shift the windows by window // 2
    (cyclic roll + attention mask); attention has a learned relative position bias.
  PatchMerging: concatenate each 2x2 neighbourhood (order (0,0), (1,0), (0,1), (1,1) in
    (row, col)) -> LayerNorm(4C) -> Linear(4C, 2C, no bias).
  norm: final LayerNorm.
  Swin-T: C = 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24); Swin-S: C = 96, depths
  (2, 2, 18, 2); Swin-B: C = 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32). LayerNorm eps 1e-5,
  exact GELU, MLP ratio 4.

Window size. ``window_size=0`` (default) picks ``min(H, W) // 32``, the side of the last map:
7 at 224 px and 8 at 256 px (the released Swin and timm configurations), 12 at 384 px,
3 at the 96 px of the demo. Per stage the window is clamped to the map (timm's rule:
``window = min(window, side)``, and no shift where the map fits in one window), and the map
side must be a multiple of the window (no padding; a ValueError says so otherwise).
The relative position table has (2 * window - 1)^2 rows, so weights are tied to the window
size: see ``cmil_jax.convert --window-size`` to resample a 224 px checkpoint for 256 px.

Keywords shared with the ResNets (``build_backbone`` passes them):
  width: channels scale by ``width / 64`` like a ResNet's base width: 64 (the default, the one
    CMIL passes for a standard net) gives the released models; 16 gives a 4x thinner net with
    the same depth and heads (head dim 8 for Swin-T), e.g. for the CPU demo. Pretrained
    weights exist only for width 64.
  dilate_last: not supported (ValueError).
  train: unused (no BatchNorm, dropout or stochastic depth here).

Parameter names and the timm state_dict keys they correspond to (i: stage, j: block):
  params/patch_embed/proj/{kernel,bias}        patch_embed.proj.{weight,bias}
  params/patch_embed/norm/{scale,bias}         patch_embed.norm.{weight,bias}
  params/layers_{i}/downsample/norm/...        layers.{i}.downsample.norm.*       (i >= 1)
  params/layers_{i}/downsample/reduction/kernel  layers.{i}.downsample.reduction.weight
  params/layers_{i}/blocks_{j}/norm1, norm2    layers.{i}.blocks.{j}.norm1, norm2
  params/layers_{i}/blocks_{j}/attn/qkv, proj  layers.{i}.blocks.{j}.attn.qkv, proj
  params/layers_{i}/blocks_{j}/attn/relative_position_bias_table  (same key)
  params/layers_{i}/blocks_{j}/mlp/fc1, fc2    layers.{i}.blocks.{j}.mlp.fc1, fc2
  params/norm/{scale,bias}                     norm.{weight,bias}
Dense kernels are (in, out) here and (out, in) in PyTorch; the conv kernel is (kh, kw, in, out)
here and (out, in, kh, kw) there. The official release (and timm < 0.9) keeps each
PatchMerging at the end of the previous stage: its ``layers.{i-1}.downsample`` is our
``layers_{i}/downsample``. No variables besides ``params``.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LN_EPS = 1e-5
_dense_init = nn.initializers.truncated_normal(0.02)  # timm: trunc_normal_(std=0.02), zero bias
_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # PyTorch's default
_MASK_VALUE = -100.0  # added to the logits of token pairs from different regions (as timm)

SWIN_CONFIGS = {
    "swin_t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


# ----------------------------------------------------------------------------- window helpers


def relative_position_index(wh: int, ww: int) -> np.ndarray:
    """(T, T) int32 row of the bias table for each query/key pair of a wh x ww window, T = wh * ww.

    Row of pair (p, q) = (dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1), (dy, dx) = pos_p - pos_q.
    """
    ys, xs = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
    coords = np.stack([ys.ravel(), xs.ravel()])  # (2, T)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, T, T)
    return ((rel[0] + wh - 1) * (2 * ww - 1) + rel[1] + ww - 1).astype(np.int32)


def shifted_window_mask(h: int, w: int, window: tuple, shift: tuple) -> np.ndarray:
    """(nW, T, T) float32 additive mask for shifted windows: -100 between tokens that come from
    different regions of the un-rolled map, 0 elsewhere. nW windows in row-major order.
    """

    def region_ids(n, win, s):
        ids = np.zeros(n, np.int32)
        if s > 0:  # regions [0, n - win), [n - win, n - s), [n - s, n)
            ids[n - win : n - s] = 1
            ids[n - s :] = 2
        return ids

    regions = region_ids(h, window[0], shift[0])[:, None] * 3 + region_ids(w, window[1], shift[1])
    windows = window_partition(regions[None, :, :, None], window)[0, :, :, 0]  # (nW, T)
    differ = windows[:, :, None] != windows[:, None, :]
    return np.where(differ, _MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x, window: tuple):
    """(B, H, W, C) -> (B, nW, wh * ww, C), windows in row-major order. Works on numpy and jax."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows, window: tuple, h: int, w: int):
    """Inverse of ``window_partition``: (B, nW, wh * ww, C) -> (B, H, W, C)."""
    b, _, _, c = windows.shape
    wh, ww = window
    x = windows.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def stage_window(h: int, w: int, window_size: int, shifted: bool) -> tuple[tuple, tuple]:
    """(window, shift) per axis for an h x w map: window clamped to the map, no shift on an axis
    that fits in one window (timm's rule). Raises if the map is not a multiple of the window."""
    window = (min(window_size, h), min(window_size, w))
    shift = tuple(0 if (not shifted or n <= win) else win // 2 for n, win in zip((h, w), window))
    if h % window[0] or w % window[1]:
        raise ValueError(
            f"Swin: a {h}x{w} feature map is not a multiple of the window {window_size}; "
            "choose window_size (or an image size) so that it divides every stage's map"
        )
    return window, shift


# ----------------------------------------------------------------------------- modules


class PatchEmbed(nn.Module):
    """p x p / p conv -> LayerNorm: (B, H, W, 3) -> (B, H/p, W/p, C)."""

    features: int
    patch_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch_size
        x = nn.Conv(
            self.features,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=_conv_init,
            name="proj",
            **kw,
        )(x)
        return nn.LayerNorm(epsilon=LN_EPS, name="norm", **kw)(x)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with relative position bias.

    (B, nW, T, C) tokens of wh x ww windows, optional (nW, T, T) additive mask -> (B, nW, T, C).
    """

    num_heads: int
    window: tuple
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        b, nw, t, c = x.shape
        wh, ww = self.window
        heads = self.num_heads
        head_dim = c // heads
        dense = dict(kernel_init=_dense_init, dtype=self.dtype, param_dtype=self.param_dtype)

        qkv = nn.Dense(3 * c, name="qkv", **dense)(x).reshape(b, nw, t, 3, heads, head_dim)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # (B, nW, T, heads, hd)
        q = q * head_dim**-0.5
        logits = jnp.einsum("bnqhd,bnkhd->bnhqk", q, k).astype(jnp.float32)

        table = self.param(
            "relative_position_bias_table",
            _dense_init,
            ((2 * wh - 1) * (2 * ww - 1), heads),
            self.param_dtype,
        )
        index = relative_position_index(wh, ww)  # (T, T)
        bias = jnp.asarray(table, jnp.float32)[index].transpose(2, 0, 1)  # (heads, T, T)
        logits = logits + bias
        if mask is not None:
            logits = logits + jnp.asarray(mask)[None, :, None]  # (1, nW, 1, T, T)
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)

        out = jnp.einsum("bnhqk,bnkhd->bnqhd", attn, v).reshape(b, nw, t, c)
        return nn.Dense(c, name="proj", **dense)(out)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2: (..., C) -> (..., C)."""

    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = dict(kernel_init=_dense_init, dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = nn.Dense(self.hidden, name="fc1", **dense)(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(c, name="fc2", **dense)(x)


class SwinBlock(nn.Module):
    """x + (S)W-MSA(LN(x)), then x + MLP(LN(x)). (B, H, W, C) -> (B, H, W, C)."""

    num_heads: int
    window_size: int
    shifted: bool
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, h, w, c = x.shape
        window, shift = stage_window(h, w, self.window_size, self.shifted)

        y = nn.LayerNorm(epsilon=LN_EPS, name="norm1", **kw)(x)
        mask = None
        if any(shift):
            y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2))
            mask = shifted_window_mask(h, w, window, shift)
        y = WindowAttention(self.num_heads, window, name="attn", **kw)(
            window_partition(y, window), mask
        )
        y = window_reverse(y, window, h, w)
        if any(shift):
            y = jnp.roll(y, shift, axis=(1, 2))
        x = x + y

        y = nn.LayerNorm(epsilon=LN_EPS, name="norm2", **kw)(x)
        return x + Mlp(int(c * self.mlp_ratio), name="mlp", **kw)(y)


class PatchMerging(nn.Module):
    """2x2 neighbourhoods -> LayerNorm(4C) -> Linear to 2C. (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        # (B, H/2, 2, W/2, 2, C) -> (B, H/2, W/2, col offset, row offset, C): channel blocks in the
        # order (0,0), (1,0), (0,1), (1,1) of (row, col) offsets, as the reference implementation.
        x = (
            x.reshape(b, h // 2, 2, w // 2, 2, c)
            .transpose(0, 1, 3, 4, 2, 5)
            .reshape(b, h // 2, w // 2, 4 * c)
        )
        x = nn.LayerNorm(
            epsilon=LN_EPS, name="norm", dtype=self.dtype, param_dtype=self.param_dtype
        )(x)
        return nn.Dense(
            2 * c,
            use_bias=False,
            kernel_init=_dense_init,
            name="reduction",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


class SwinStage(nn.Module):
    """[PatchMerging] + ``depth`` blocks alternating regular and shifted windows."""

    depth: int
    num_heads: int
    window_size: int
    downsample: bool
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.downsample:
            x = PatchMerging(name="downsample", **kw)(x)
        for j in range(self.depth):
            x = SwinBlock(
                self.num_heads,
                self.window_size,
                shifted=j % 2 == 1,
                mlp_ratio=self.mlp_ratio,
                name=f"blocks_{j}",
                **kw,
            )(x)
        return x


class SwinTransformer(nn.Module):
    """Swin trunk without head: (B, H, W, 3) float -> final-normed map (B, H/32, W/32, 8 C).

    Attributes:
      embed_dim: C of the first stage at width 64 (96 for T/S, 128 for B).
      depths, num_heads: blocks and heads per stage.
      width: channel scale, C = embed_dim * width / 64 (see the module docstring).
      window_size: attention window; 0 = min(H, W) // 32.
      patch_size: side of the patch embedding (4).
      dilate_last: must be False (no dilated Swin).
    """

    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    width: int = 64
    window_size: int = 0
    patch_size: int = 4
    mlp_ratio: float = 4.0
    dilate_last: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def channels(self) -> int:
        """C of the first stage after the width scaling."""
        if self.width <= 0 or (self.embed_dim * self.width) % 64:
            raise ValueError(
                f"Swin: width {self.width} must make embed_dim * width / 64 an integer"
            )
        c = self.embed_dim * self.width // 64
        if c % self.num_heads[0]:
            raise ValueError(
                f"Swin: width {self.width} gives {c} channels, "
                f"not divisible by {self.num_heads[0]} heads"
            )
        return c

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no train-time behaviour
        if self.dilate_last:
            raise ValueError(
                "Swin backbones do not support dilate_last=True (output stride is 32); "
                "set model.dilate_last=False"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.channels()
        _, h, w, _ = x.shape
        total_stride = self.patch_size * 2 ** (len(self.depths) - 1)
        if h % total_stride or w % total_stride:
            raise ValueError(f"Swin: image size {h}x{w} must be a multiple of {total_stride}")
        window_size = self.window_size or min(h, w) // total_stride

        x = jnp.asarray(x, self.dtype)
        x = PatchEmbed(c, self.patch_size, name="patch_embed", **kw)(x)
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            x = SwinStage(
                depth,
                heads,
                window_size,
                downsample=i > 0,
                mlp_ratio=self.mlp_ratio,
                name=f"layers_{i}",
                **kw,
            )(x)
        return nn.LayerNorm(epsilon=LN_EPS, name="norm", **kw)(x)


def _builder(arch):
    def build(layers=None, **kwargs) -> SwinTransformer:
        del layers  # ResNet layer sets: Swin has no convolution stack or BatchNorm to swap
        return SwinTransformer(**SWIN_CONFIGS[arch], **kwargs)

    build.__name__ = arch
    build.__doc__ = (f"{arch}: {SWIN_CONFIGS[arch]}; keywords as SwinTransformer's attributes "
                     "(``layers`` is accepted and unused).")
    return build


swin_t = _builder("swin_t")
swin_s = _builder("swin_s")
swin_b = _builder("swin_b")
