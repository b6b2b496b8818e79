"""CMIL: backbone -> patch tokens + class tokens -> one transformer layer -> U/V heads + MIL embeddings.

Reading order of ``CMIL.__call__`` (method.md, "Model"):
  1. normalise the [0, 255] images with the ImageNet mean/std;
  2. backbone feature map (B, h, w, c);
  3. tokenize: 1x1 conv to width d + learned 2-D position embedding -> N = h*w patch tokens
     (row-major over (h, w));
  4. prepend K learnable class tokens;
  5. one pre-norm transformer encoder layer over the K + N tokens;
  6. heads on class tokens u_k and patch tokens v_i:
       class branch  z^U_k = w_k . LN(u_k) + b_k              (one linear per class token)
       patch branch  q_{i,k} = Dense(C)(LN(v_i)),  z^V = pool_i q_{i,:}
       MIL           e_i = normalize(W_e v_i)
     plus the learnable scalar bias b of the MIL fake logit.

Choices marked [ours] in method.md: pre-norm layer, 6 heads, MLP ratio 4, exact GELU,
LayerNorm eps 1e-6, no dropout, separate LayerNorms for the two heads, the patch pooling.
The position embedding is created for the feature-map size seen at init; the model then
runs at that image size only (another size fails with a parameter-shape error).

Precision: parameters in ``param_dtype``; backbone, tokenizer and transformer compute in
``dtype`` (e.g. 'bfloat16'); the heads, the MIL normalisation and all outputs are float32 (float64 when ``dtype`` is
float64).
``layers`` is how a ResNet backbone computes its convolutions and BatchNorms (resnet.Layers,
chosen at start-up by cmil_jax.runtime); it never changes the variables.

The attributes other than ``layers`` and ``param_dtype`` are the fields of the config's
``model`` section: ``CMIL(**cfg.model, layers=...)``.

Parameter names (top level of params): backbone, tokenizer, pos_embed (h, w, d),
class_tokens (K, d), encoder/{norm1, attn, norm2, fc1, fc2}, class_norm, class_head/{kernel (K, d),
bias (K,)}, patch_norm, patch_head, mil_proj, mil_bias ().
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmil_jax.models import build_backbone, resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_POOLS = ("mean", "lse", "max")
LN_EPS = 1e-6
EMB_EPS = 1e-6

_trunc_normal = nn.initializers.truncated_normal(0.02)


def normalize_images(images, dtype=jnp.float32):
    """(B, H, W, 3) uint8 or float in [0, 255] -> ImageNet-normalised ``dtype`` (computed in
    float32, or float64 for ``dtype`` float64)."""
    work = jnp.promote_types(dtype, jnp.float32)
    x = jnp.asarray(images, work)
    mean = 255.0 * jnp.asarray(IMAGENET_MEAN, work)
    std = 255.0 * jnp.asarray(IMAGENET_STD, work)
    return ((x - mean) / std).astype(dtype)


def pool_patches(q, pool: str = "mean", temperature: float = 1.0):
    """Image logits from patch logits: (B, N, C) -> (B, C).

    'mean': average over patches; 'max': maximum;
    'lse': T * logsumexp(q / T) - T * log N, a smooth maximum that always lies between the mean
    and the max (-> max as T -> 0, -> mean as T -> inf).
    """
    if pool == "mean":
        return q.mean(axis=1)
    if pool == "max":
        return q.max(axis=1)
    if pool == "lse":
        t = temperature
        return t * jax.nn.logsumexp(q / t, axis=1) - t * jnp.log(q.shape[1])
    raise ValueError(f"patch_pool must be one of {PATCH_POOLS}, got {pool!r}")


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + MHSA(LN(x)), then x + MLP(LN(x)). (B, T, d) -> (B, T, d)."""

    num_heads: int = 6
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = x.shape[-1]
        y = nn.LayerNorm(epsilon=LN_EPS, name="norm1", **kw)(x)
        # Softmax in float32 for 16-bit compute; flax would also cast a float64 model's to
        # float32, so it is asked only below 32 bits.
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, force_fp32_for_softmax=jnp.dtype(self.dtype).itemsize < 4,
            name="attn", **kw
        )(y)
        x = x + y
        y = nn.LayerNorm(epsilon=LN_EPS, name="norm2", **kw)(x)
        y = nn.Dense(int(d * self.mlp_ratio), name="fc1", **kw)(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(d, name="fc2", **kw)(y)
        return x + y


class ClassTokenHead(nn.Module):
    """One linear logit per class token: (B, K, d) -> (B, K), z_k = kernel[k] . u_k + bias[k]."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, u):
        k, d = u.shape[-2:]
        kernel_init = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)  # fan_in = d
        kernel = self.param("kernel", kernel_init, (k, d), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (k,), self.param_dtype)
        return jnp.einsum("bkd,kd->bk", u, kernel.astype(u.dtype)) + bias.astype(u.dtype)


class CMIL(nn.Module):
    """CMIL model. ``__call__(images (B, H, W, 3) in [0, 255], train)`` -> dict of float32 arrays:

    'class_logits' (B, C) z^U, 'patch_class_logits' (B, N, C) q, 'patch_logits' (B, C) z^V,
    'mil_emb' (B, N, E) unit-norm patch embeddings, 'mil_bias' () scalar b,
    'feature_map' (B, h, w, c) last backbone map. N = h * w, row-major over (h, w).
    Binary mode: num_class_tokens = num_classes = 1.
    """

    backbone: str = "resnet50"
    num_class_tokens: int = 5
    num_classes: int = 5
    width: int = 384
    num_heads: int = 6
    mlp_ratio: float = 4.0
    embed_dim: int = 128
    patch_pool: str = "mean"
    pool_temperature: float = 1.0
    dilate_last: bool = False
    backbone_width: int = 64
    mil_bias_init: float = 0.5
    dtype: Any = "float32"  # compute dtype (name or numpy dtype)
    param_dtype: Any = jnp.float32
    layers: resnet.Layers = resnet.FLAX_LAYERS

    def check_config(self):
        """Raises ValueError on attributes that cannot build a model (called by __call__)."""
        if self.num_class_tokens != self.num_classes:
            raise ValueError(
                f"each class token gives one class logit: num_class_tokens ({self.num_class_tokens}) "
                f"must equal num_classes ({self.num_classes})"
            )
        if self.patch_pool not in PATCH_POOLS:
            raise ValueError(f"patch_pool must be one of {PATCH_POOLS}, got {self.patch_pool!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")

    @nn.compact
    def __call__(self, images, train: bool):
        self.check_config()
        dtype = jnp.dtype(self.dtype)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        # Heads, MIL normalisation and outputs: float32, or float64 for a float64 model (as
        # benchmarks/device_count_drift.py builds to separate rounding from real differences).
        head_dtype = jnp.promote_types(dtype, jnp.float32)
        f32 = dict(dtype=head_dtype, param_dtype=self.param_dtype)
        d, k = self.width, self.num_class_tokens

        # 1-2. Normalise, backbone.
        x = normalize_images(images, dtype)
        feature_map = build_backbone(
            self.backbone,
            dilate_last=self.dilate_last,
            width=self.backbone_width,
            layers=self.layers,
            name="backbone",
            **kw,
        )(x, train=train)
        b, h, w, _ = feature_map.shape

        # 3. Patch tokens: 1x1 conv + 2-D position embedding, flattened row-major.
        tokens = nn.Conv(d, (1, 1), name="tokenizer", **kw)(feature_map)
        pos_embed = self.param("pos_embed", _trunc_normal, (h, w, d), self.param_dtype)
        tokens = (tokens + pos_embed.astype(dtype)).reshape(b, h * w, d)

        # 4. Prepend K class tokens.
        class_tokens = self.param("class_tokens", _trunc_normal, (k, d), self.param_dtype)
        class_tokens = jnp.broadcast_to(class_tokens.astype(dtype), (b, k, d))
        x = jnp.concatenate([class_tokens, tokens], axis=1)  # (B, K + N, d)

        # 5. One transformer layer.
        x = EncoderLayer(self.num_heads, self.mlp_ratio, name="encoder", **kw)(x)
        x = x.astype(head_dtype)
        u, v = x[:, :k], x[:, k:]  # (B, K, d), (B, N, d)

        # 6. Heads (float32).
        class_logits = ClassTokenHead(param_dtype=self.param_dtype, name="class_head")(
            nn.LayerNorm(epsilon=LN_EPS, name="class_norm", **f32)(u)
        )
        patch_class_logits = nn.Dense(self.num_classes, name="patch_head", **f32)(
            nn.LayerNorm(epsilon=LN_EPS, name="patch_norm", **f32)(v)
        )
        patch_logits = pool_patches(patch_class_logits, self.patch_pool, self.pool_temperature)
        e = nn.Dense(self.embed_dim, name="mil_proj", **f32)(v)
        mil_emb = e * jax.lax.rsqrt(jnp.maximum(jnp.sum(e * e, axis=-1, keepdims=True), EMB_EPS**2))
        mil_bias = self.param("mil_bias", nn.initializers.constant(self.mil_bias_init), (), self.param_dtype)

        return {
            "class_logits": class_logits,
            "patch_class_logits": patch_class_logits,
            "patch_logits": patch_logits,
            "mil_emb": mil_emb,
            "mil_bias": jnp.asarray(mil_bias, head_dtype),
            "feature_map": feature_map.astype(head_dtype),
        }
