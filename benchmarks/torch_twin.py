"""PyTorch twin of cmil_jax: the CMIL model, its losses and its AdamW training step.

Written the way a PyTorch user would write it (torchvision-layout ResNet, channels_last,
bf16 autocast and fused AdamW on GPU, foreach AdamW on CPU, optional ``torch.compile``), and
computing exactly what ``cmil_jax.models.CMIL`` and ``cmil_jax.losses.total_loss`` compute, so
that the throughput comparison in ``benchmarks/throughput.py`` is like for like.

    model = CMIL('resnet50', image_size=256).to(device, memory_format=torch.channels_last)
    load_from_flax(model, flax_variables)            # optional: same weights as a Flax model
    out = model(images_nhwc_uint8)                    # dict, same keys and shapes as cmil_jax
    loss, terms = total_loss(out, batch, tau=0.2)     # same value as cmil_jax.losses.total_loss

Images are (B, H, W, 3) uint8 or float in [0, 255], as the cmil_jax data pipeline yields them;
``permute(0, 3, 1, 2)`` of that tensor is already channels_last NCHW, and the ImageNet
normalisation happens inside the model. The position embedding is created for the feature-map
size of ``image_size`` (as the Flax model does at init), so a model runs at one image size.

Parameter names follow torchvision for the backbone (``backbone.layer3.4.conv2.weight``) and
timm for the transformer layer (``encoder.attn.qkv``: q, k and v in one Linear).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LN_EPS = 1e-6
EMB_EPS = 1e-6
NO_DECAY_NAMES = ("pos_embed", "class_tokens", "mil_bias")

# ============================================================================ backbone


class BasicBlock(nn.Module):
    """Two 3x3 convs (torchvision layout), both with ``dilation`` (cmil_jax's rule, resnet.py)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 x4 (torchvision v1.5)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """torchvision ResNet trunk without pooling/fc: (B, 3, H, W) -> last map (B, c, h, w)."""

    def __init__(self, block, layers, width=64, dilate_last=False):
        super().__init__()
        self.inplanes, self.dilation = width, 1
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2, dilate=dilate_last)
        self.out_channels = width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


BACKBONES = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def build_backbone(name: str, width: int = 64, dilate_last: bool = False) -> ResNet:
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}")
    block, layers = BACKBONES[name]
    return ResNet(block, layers, width=width, dilate_last=dilate_last)


def feature_size(image_size: int, dilate_last: bool = False) -> int:
    """Side of the last feature map for a square image (PyTorch conv arithmetic)."""

    def out(n, kernel, stride, pad):
        return (n + 2 * pad - (kernel - 1) - 1) // stride + 1

    n = out(out(image_size, 7, 2, 3), 3, 2, 1)  # stem conv, max pool
    for _ in range(2 if dilate_last else 3):  # layer2..layer4 stride-2 3x3 convs
        n = out(n, 3, 2, 1)
    return n


# ============================================================================ CMIL


class Attention(nn.Module):
    """Multi-head self-attention, q/k/v in one Linear, scaled dot product (SDPA kernel)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (
            self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d/H)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + MHSA(LN(x)), then x + MLP(LN(x)), exact GELU."""

    def __init__(self, dim, num_heads=6, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ClassTokenHead(nn.Module):
    """One linear logit per class token: (B, K, d) -> (B, K)."""

    def __init__(self, num_tokens, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_tokens, dim) * dim**-0.5)
        self.bias = nn.Parameter(torch.zeros(num_tokens))

    def forward(self, u):
        return (u * self.weight).sum(-1) + self.bias


def pool_patches(q, pool: str = "mean", temperature: float = 1.0):
    """(B, N, C) -> (B, C): mean, max, or T logsumexp(q / T) - T log N."""
    if pool == "mean":
        return q.mean(1)
    if pool == "max":
        return q.amax(1)
    if pool == "lse":
        return temperature * torch.logsumexp(q / temperature, 1) - temperature * math.log(
            q.shape[1]
        )
    raise ValueError(f"patch_pool must be one of ('mean', 'lse', 'max'), got {pool!r}")


class CMIL(nn.Module):
    """``forward(images (B, H, W, 3) in [0, 255])`` -> dict like cmil_jax.models.CMIL:

    'class_logits' (B, C), 'patch_class_logits' (B, N, C), 'patch_logits' (B, C),
    'mil_emb' (B, N, E) unit norm, 'mil_bias' (), all float32 (computed outside autocast), and
    'feature_map' (B, h, w, c) in the compute dtype (a view, no copy). Train/eval mode via
    ``model.train()`` / ``model.eval()`` (BatchNorm).
    """

    def __init__(
        self,
        backbone="resnet50",
        num_class_tokens=5,
        num_classes=5,
        width=384,
        num_heads=6,
        mlp_ratio=4.0,
        embed_dim=128,
        patch_pool="mean",
        pool_temperature=1.0,
        dilate_last=False,
        backbone_width=64,
        mil_bias_init=0.5,
        image_size=256,
    ):
        super().__init__()
        if num_class_tokens != num_classes:
            raise ValueError("num_class_tokens must equal num_classes")
        self.num_class_tokens, self.patch_pool, self.pool_temperature = (
            num_class_tokens,
            patch_pool,
            pool_temperature,
        )
        self.register_buffer(
            "mean", 255.0 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", 255.0 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False
        )
        self.backbone = build_backbone(backbone, backbone_width, dilate_last)
        s = feature_size(image_size, dilate_last)
        self.tokenizer = nn.Conv2d(self.backbone.out_channels, width, 1)
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(s, s, width), std=0.02))
        self.class_tokens = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(num_class_tokens, width), std=0.02)
        )
        self.encoder = EncoderLayer(width, num_heads, mlp_ratio)
        self.class_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.class_head = ClassTokenHead(num_class_tokens, width)
        self.patch_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.patch_head = nn.Linear(width, num_classes)
        self.mil_proj = nn.Linear(width, embed_dim)
        self.mil_bias = nn.Parameter(torch.tensor(float(mil_bias_init)))

    def forward(self, images):
        x = images.permute(0, 3, 1, 2).float()  # NHWC memory = channels_last NCHW
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        fm = self.backbone(x)  # (B, c, h, w)
        b = fm.shape[0]
        tokens = self.tokenizer(fm).flatten(2).transpose(1, 2)  # (B, N, d), row-major patches
        tokens = tokens + self.pos_embed.flatten(0, 1).to(tokens.dtype)
        cls = self.class_tokens.to(tokens.dtype).expand(b, -1, -1)
        x = self.encoder(torch.cat([cls, tokens], 1))

        with torch.autocast(x.device.type, enabled=False):  # heads in float32
            x = x.float()
            k = self.num_class_tokens
            u, v = x[:, :k], x[:, k:]
            class_logits = self.class_head(self.class_norm(u))
            patch_class_logits = self.patch_head(self.patch_norm(v))
            e = self.mil_proj(v)
            mil_emb = e * torch.rsqrt(e.square().sum(-1, keepdim=True).clamp_min(EMB_EPS**2))
            return {
                "class_logits": class_logits,
                "patch_class_logits": patch_class_logits,
                "patch_logits": pool_patches(
                    patch_class_logits, self.patch_pool, self.pool_temperature
                ),
                "mil_emb": mil_emb,
                "mil_bias": self.mil_bias,
                "feature_map": fm.permute(0, 2, 3, 1),
            }


# ============================================================================ losses
# Same definitions as cmil_jax.losses (see its docstrings); everything in float32.


def multi_hot(seq, num_classes: int):
    """(B, L) class ids 1..C (0 = padding) -> (B, C) float multi-hot."""
    return F.one_hot(seq.long(), num_classes + 1).amax(-2)[..., 1:].float()


def rank_grades(seq, num_classes: int, order: str = "first_high"):
    """(B, L) -> (B, C) grades: first edit highest ('first_high') or last edit highest."""
    present = (seq > 0).float()
    position = present.cumsum(-1)
    if order == "first_high":
        grade = present.sum(-1, keepdim=True) - position + 1.0
    elif order == "last_high":
        grade = position
    else:
        raise ValueError(f"order must be 'first_high' or 'last_high', got {order!r}")
    onehot = F.one_hot(seq.long(), num_classes + 1)[..., 1:].float()
    return torch.einsum("bl,blc->bc", grade * present, onehot)


def _weighted_mean(values, weights=None):
    if weights is None:
        return values.mean()
    w = weights.float().reshape(values.shape)
    total = w.sum()
    return torch.where(total > 0, (w * values).sum() / torch.where(total > 0, total, 1.0), 0.0)


def bce_loss(logits, targets, weights=None):
    """Mean BCE-with-logits: per-sample mean over classes, then (weighted) mean over B."""
    x = logits.float()
    per = F.binary_cross_entropy_with_logits(x, targets.float(), reduction="none")
    per = per.flatten(1).mean(-1) if x.ndim > 1 else per
    return _weighted_mean(per, weights)


def _resolve_num_lowest(num_lowest, n):
    pairs = n * (n - 1) // 2
    if pairs < 1:
        raise ValueError(f"need at least 2 patches, got N={n}")
    m = n if num_lowest is None else int(num_lowest)
    if m < 1:
        raise ValueError(f"num_lowest must be >= 1 or None, got {num_lowest}")
    return min(m, pairs)


def pairwise_similarities(emb):
    """(B, N, E) -> (B, N, N) cosine similarities (embeddings re-normalised)."""
    e = emb.float()
    e = e * torch.rsqrt(e.square().sum(-1, keepdim=True).clamp_min(1e-12))
    return e @ e.transpose(1, 2)


def lowest_similarities(emb, num_lowest: int | None = None):
    """(B, N, E) -> (B, M) the M lowest pairwise (i < j) similarities, ascending (via topk)."""
    sims = pairwise_similarities(emb)
    n = sims.shape[-1]
    m = _resolve_num_lowest(num_lowest, n)
    rows, cols = torch.triu_indices(n, n, 1, device=sims.device)
    return -torch.topk(-sims[:, rows, cols], m, dim=-1).values


def mil_fake_logit(emb, bias, tau: float = 0.2, num_lowest: int | None = None):
    """(b - m(x)) / tau with m(x) = sum_k softmax(-s/tau)_k s_(k). (B,)."""
    s = lowest_similarities(emb, num_lowest)
    soft_min = (torch.softmax(-s / tau, -1) * s).sum(-1)
    return (bias.float() - soft_min) / tau


def patch_similarity_map(emb):
    """(B, N, E) -> (B, N): a_i = mean_{j != i} S_ij."""
    sims = pairwise_similarities(emb)
    n = sims.shape[-1]
    return (sims.sum(-1) - sims.diagonal(dim1=-2, dim2=-1)) / max(n - 1, 1)


def rank_loss(logits, seq, order: str = "first_high", weights=None):
    """Graded pairwise log(1 + sum exp(z_a - z_b)) over pairs g(a) < g(b).

    Mean over the images that have pairs (times ``weights``), 0 when none has.
    """
    z = logits.float()
    g = rank_grades(seq, z.shape[-1], order)
    pair = g[:, :, None] < g[:, None, :]
    terms = (z[:, :, None] - z[:, None, :]).masked_fill(~pair, float("-inf")).flatten(1)
    loss = torch.logsumexp(torch.cat([terms.new_zeros(z.shape[0], 1), terms], 1), 1)
    w = pair.flatten(1).any(1).float()
    if weights is not None:
        w = w * weights.float().reshape(w.shape)
    return _weighted_mean(loss, w)


def total_loss(
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    *,
    alpha=1.0,
    lambda1=1.0,
    lambda2=1.0,
    tau=0.2,
    num_lowest=None,
    rank_order="first_high",
    use_rank=True,
):
    """alpha L_CLS + lambda1 (L^U + L^V) + lambda2 L_Rank, as cmil_jax.losses.total_loss.

    Returns (loss, dict 'l_cls', 'l_bce_u', 'l_bce_v', 'l_rank', 'mil_fake_prob').
    """
    z_u, z_v = outputs["class_logits"].float(), outputs["patch_logits"].float()
    is_fake = batch["is_fake"].float()
    binary = z_u.shape[-1] == 1
    fake_logit = mil_fake_logit(outputs["mil_emb"], outputs["mil_bias"], tau, num_lowest)
    l_cls = bce_loss(fake_logit, is_fake)
    if binary:
        targets, seq_weights = is_fake[:, None], None
    else:
        targets, seq_weights = multi_hot(batch["label"], z_u.shape[-1]), batch.get("has_seq")
    l_bce_u = bce_loss(z_u, targets, seq_weights)
    l_bce_v = bce_loss(z_v, targets, seq_weights)
    if use_rank and not binary:
        l_rank = rank_loss(0.5 * (z_u + z_v), batch["label"], rank_order, seq_weights)
    else:
        l_rank = z_u.new_zeros(())
    loss = alpha * l_cls + lambda1 * (l_bce_u + l_bce_v) + lambda2 * l_rank
    terms = {
        "l_cls": l_cls,
        "l_bce_u": l_bce_u,
        "l_bce_v": l_bce_v,
        "l_rank": l_rank,
        "mil_fake_prob": torch.sigmoid(fake_logit).mean(),
    }
    return loss, terms


# ============================================================================ optimizer and steps


def make_optimizer(
    model,
    *,
    lr=1e-4,
    backbone_lr_mult=0.1,
    weight_decay=0.05,
    betas=(0.9, 0.999),
    warmup_steps=1000,
    total_steps=100_000,
):
    """AdamW (fused on GPU, foreach on CPU) in four groups (backbone/head x decay/no decay) and
    a per-step linear warm-up + cosine LambdaLR, as cmil_jax.optim.make_optimizer.

    Returns (optimizer, scheduler).
    """
    groups = {}
    for name, p in model.named_parameters():
        head = "backbone" if name.startswith("backbone.") else "head"
        decay = p.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)
        groups.setdefault((head, decay), []).append(p)
    param_groups = [
        {
            "params": ps,
            "lr": lr * (backbone_lr_mult if head == "backbone" else 1.0),
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (head, decay), ps in groups.items()
    ]
    cuda = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW(
        param_groups,
        lr=lr,
        betas=betas,
        eps=1e-8,
        fused=True if cuda else None,
        foreach=None if cuda else True,
    )
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    decay_steps = max(total_steps - warmup_steps, 1)

    def factor(step):
        if step < warmup_steps:
            return step / warmup_steps
        t = min(step - warmup_steps, decay_steps) / decay_steps
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _autocast(device_type, amp_dtype):
    """autocast to ``amp_dtype`` (e.g. torch.bfloat16), or a no-op when it is None."""
    return torch.autocast(
        device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    )


def _batch_tensors(batch):
    return {k: batch[k] for k in ("label", "is_fake", "has_seq") if k in batch}


def make_train_step(
    model, optimizer, scheduler, loss_kwargs, *, amp_dtype=None, compile=False, compile_kwargs=None
):
    """Returns step(batch) -> dict of 0-d tensors (no host sync).

    batch: dict of device tensors 'image' (B, H, W, 3) uint8, 'label' (B, 5), 'is_fake' (B,),
    optional 'has_seq' (B,). Forward under autocast(amp_dtype) when given, losses in float32;
    with ``compile`` the forward + loss is ``torch.compile``d (the optimizer stays eager: fused).
    """
    device_type = next(model.parameters()).device.type

    def forward_loss(images, labels):
        with _autocast(device_type, amp_dtype):
            out = model(images)
        return total_loss(out, labels, **loss_kwargs)

    fwd = torch.compile(forward_loss, **(compile_kwargs or {})) if compile else forward_loss
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch):
        model.train()
        loss, terms = fwd(batch["image"], _batch_tensors(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        optimizer.step()
        scheduler.step()
        return {
            "loss": loss.detach(),
            "grad_norm": grad_norm,
            **{k: v.detach() for k, v in terms.items()},
        }

    return step


def make_eval_step(
    model, *, tau=0.2, num_lowest=None, amp_dtype=None, compile=False, compile_kwargs=None
):
    """Returns infer(images) -> dict 'probs' (B, C), 'fake_prob' (B,), 'similarity_map' (B, N),
    as cmil_jax.train.make_eval_step, in eval mode under ``torch.inference_mode``."""
    device_type = next(model.parameters()).device.type

    def infer(images):
        with _autocast(device_type, amp_dtype):
            out = model(images)
        logits = (out["class_logits"] + out["patch_logits"]) / 2
        return {
            "probs": torch.sigmoid(logits),
            "fake_prob": torch.sigmoid(
                mil_fake_logit(out["mil_emb"], out["mil_bias"], tau, num_lowest)
            ),
            "similarity_map": patch_similarity_map(out["mil_emb"]),
        }

    fn = torch.compile(infer, **(compile_kwargs or {})) if compile else infer

    def run(images):
        model.eval()
        with torch.inference_mode():
            return fn(images)

    return run


# ============================================================================ from a config
# The fields of cmil_jax.config_base's model / train / loss sections (attribute access).

MODEL_FIELDS = (
    "backbone",
    "num_class_tokens",
    "num_classes",
    "width",
    "num_heads",
    "mlp_ratio",
    "embed_dim",
    "patch_pool",
    "pool_temperature",
    "dilate_last",
    "backbone_width",
    "mil_bias_init",
)


def model_from_config(model_cfg, image_size: int) -> CMIL:
    """The twin of ``cmil_jax.train.build_model(model_cfg)`` for ``image_size`` px inputs."""
    return CMIL(**{k: getattr(model_cfg, k) for k in MODEL_FIELDS}, image_size=image_size)


def optimizer_from_config(model, train_cfg, total_steps: int):
    """make_optimizer with the fields of a config's train section -> (optimizer, scheduler)."""
    t = train_cfg
    return make_optimizer(
        model,
        lr=t.lr,
        backbone_lr_mult=t.backbone_lr_mult,
        weight_decay=t.weight_decay,
        betas=(t.b1, t.b2),
        warmup_steps=t.warmup_steps,
        total_steps=total_steps,
    )


def loss_kwargs_from_config(loss_cfg) -> dict:
    """Keyword arguments of total_loss from a config's loss section (num_lowest 0 = None)."""
    c = loss_cfg
    return {
        "alpha": c.alpha,
        "lambda1": c.lambda1,
        "lambda2": c.lambda2,
        "tau": c.tau,
        "num_lowest": c.num_lowest or None,
        "rank_order": c.rank_order,
        "use_rank": c.use_rank,
    }


# ============================================================================ Flax weights


def _t(x):
    return torch.from_numpy(np.array(x, dtype=np.float32))


def flax_to_state_dict(flax_variables, num_batches_tracked=0) -> dict[str, torch.Tensor]:
    """cmil_jax CMIL variables {'params', 'batch_stats'} -> this module's state_dict.

    Conv kernels (kh, kw, in, out) -> (out, in, kh, kw); Dense (in, out) -> Linear (out, in);
    attention query/key/value kernels (d, H, d/H) -> rows of ``qkv`` (3d, d), out (H, d/H, d)
    -> ``proj`` (d, d); BatchNorm scale/bias/mean/var -> weight/bias/running_mean/running_var.
    """
    params, stats = flax_variables["params"], flax_variables.get("batch_stats", {})
    sd = {}

    def conv(prefix, p):
        sd[prefix + ".weight"] = _t(p["kernel"]).permute(3, 2, 0, 1).contiguous()
        if "bias" in p:
            sd[prefix + ".bias"] = _t(p["bias"])

    def dense(prefix, p):
        sd[prefix + ".weight"] = _t(p["kernel"]).T.contiguous()
        sd[prefix + ".bias"] = _t(p["bias"])

    def norm(prefix, p):
        sd[prefix + ".weight"], sd[prefix + ".bias"] = _t(p["scale"]), _t(p["bias"])

    def bn(prefix, p, s):
        norm(prefix, p)
        sd[prefix + ".running_mean"], sd[prefix + ".running_var"] = _t(s["mean"]), _t(s["var"])
        sd[prefix + ".num_batches_tracked"] = torch.tensor(num_batches_tracked, dtype=torch.long)

    bb, bbs = params["backbone"], stats["backbone"]
    conv("backbone.conv1", bb["conv1"])
    bn("backbone.bn1", bb["bn1"], bbs["bn1"])
    for block in (k for k in bb if k.startswith("layer")):
        stage, index = block[len("layer") :].split("_")
        prefix = f"backbone.layer{stage}.{index}"
        for name, p in bb[block].items():
            if name == "downsample_conv":
                conv(prefix + ".downsample.0", p)
            elif name == "downsample_bn":
                bn(prefix + ".downsample.1", p, bbs[block][name])
            elif name.startswith("conv"):
                conv(f"{prefix}.{name}", p)
            else:
                bn(f"{prefix}.{name}", p, bbs[block][name])

    conv("tokenizer", params["tokenizer"])
    sd["pos_embed"] = _t(params["pos_embed"])
    sd["class_tokens"] = _t(params["class_tokens"])
    enc = params["encoder"]
    norm("encoder.norm1", enc["norm1"])
    norm("encoder.norm2", enc["norm2"])
    attn = enc["attn"]
    d = np.shape(attn["query"]["kernel"])[0]
    sd["encoder.attn.qkv.weight"] = torch.cat(
        [_t(attn[n]["kernel"]).reshape(d, d).T for n in ("query", "key", "value")]
    ).contiguous()
    sd["encoder.attn.qkv.bias"] = torch.cat(
        [_t(attn[n]["bias"]).reshape(d) for n in ("query", "key", "value")]
    )
    sd["encoder.attn.proj.weight"] = _t(attn["out"]["kernel"]).reshape(d, d).T.contiguous()
    sd["encoder.attn.proj.bias"] = _t(attn["out"]["bias"])
    dense("encoder.fc1", enc["fc1"])
    dense("encoder.fc2", enc["fc2"])
    norm("class_norm", params["class_norm"])
    sd["class_head.weight"] = _t(params["class_head"]["kernel"])
    sd["class_head.bias"] = _t(params["class_head"]["bias"])
    norm("patch_norm", params["patch_norm"])
    dense("patch_head", params["patch_head"])
    dense("mil_proj", params["mil_proj"])
    sd["mil_bias"] = _t(params["mil_bias"]).reshape(())
    return sd


@torch.no_grad()
def load_from_flax(torch_model: CMIL, flax_variables) -> CMIL:
    """Copies cmil_jax CMIL params/batch_stats into ``torch_model`` in place (strict)."""
    sd = flax_to_state_dict(flax_variables)
    torch_model.load_state_dict(sd, strict=True)
    return torch_model
