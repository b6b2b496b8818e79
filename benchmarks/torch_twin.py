"""PyTorch twin of cmil_jax: the CMIL model, its losses and its AdamW training step.

Written the way a PyTorch user would write it (torchvision-layout ResNet, channels_last,
bf16 autocast and fused AdamW on GPU, foreach AdamW on CPU, optional ``torch.compile``), and
computing exactly what ``cmil_jax.models.CMIL`` and ``cmil_jax.losses.total_loss`` compute, so
that the throughput comparison in ``benchmarks/throughput.py`` is like for like.

    model = CMIL(image_size=256, backbone='resnet50')  # keywords of cmil_jax.models.CMIL
    model = model.to(device, memory_format=torch.channels_last)
    load_from_flax(model, flax_variables)            # optional: same weights as a Flax model
    out = model(images_nhwc_uint8)                    # dict, same keys and shapes as cmil_jax
    loss, terms = total_loss(out, batch, tau=0.2)     # same value as cmil_jax.losses.total_loss

Images are (B, H, W, 3) uint8 or float in [0, 255], as the cmil_jax data pipeline yields them;
``permute(0, 3, 1, 2)`` of that tensor is already channels_last NCHW, and the ImageNet
normalisation happens inside the model. The position embedding is created for the feature-map
size of ``image_size`` (as the Flax model does at init), so a model runs at one image size.

Parameter names follow torchvision for the backbone (``backbone.layer3.4.conv2.weight``) and
timm for the transformer layer (``encoder.attn.qkv``: q, k and v in one Linear). The
hyper-parameters and constants (model defaults, ImageNet statistics, LayerNorm and BatchNorm
settings, the backbones' stages, the weight-decay exclusions, the learning-rate schedule) are
cmil_jax's, and the weights are mapped with cmil_jax.convert's torchvision names; the model's
computation, the losses (as cmil_jax.losses) and the optimizer step are written again, in
PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmil_jax import convert, models
from cmil_jax.models import resnet
from cmil_jax.models.cmil import EMB_EPS, IMAGENET_MEAN, IMAGENET_STD, LN_EPS
from cmil_jax.optim import NO_DECAY_NAMES


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm2d with cmil_jax's settings (resnet.BN_EPS; PyTorch's momentum is 1 - Flax's)."""
    return nn.BatchNorm2d(channels, eps=resnet.BN_EPS, momentum=1.0 - resnet.BN_MOMENTUM)


# ============================================================================ backbone


class BasicBlock(nn.Module):
    """Two 3x3 convs (torchvision layout), both with ``dilation`` (cmil_jax's rule, resnet.py)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = batch_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = batch_norm(planes)
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
        self.bn1 = batch_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = batch_norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = batch_norm(planes * 4)
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
        self.bn1 = batch_norm(width)
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
                batch_norm(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build_backbone(name: str, width: int = 64, dilate_last: bool = False) -> ResNet:
    """The twin of cmil_jax.models.build_backbone(name): its stages and block type."""
    flax_net = models.build_backbone(name)
    if not isinstance(flax_net, resnet.ResNet):
        raise ValueError(f"the twin has the ResNet backbones only, not {name!r}")
    block = Bottleneck if flax_net.block_cls is resnet.Bottleneck else BasicBlock
    return ResNet(block, flax_net.stage_sizes, width=width, dilate_last=dilate_last)


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

    def __init__(self, image_size: int = 256, **model_fields):
        """The twin of ``cmil_jax.models.CMIL(**model_fields)`` (the fields of a config's model
        section, its defaults and checks; ``dtype`` and ``layers`` are the Flax model's business:
        the twin's compute dtype is the autocast of its steps) for ``image_size`` px images."""
        super().__init__()
        spec = models.CMIL(**model_fields)
        spec.check_config()
        width, k = spec.width, spec.num_class_tokens
        self.num_class_tokens, self.patch_pool, self.pool_temperature = (
            k,
            spec.patch_pool,
            spec.pool_temperature,
        )
        self.register_buffer(
            "mean", 255.0 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", 255.0 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False
        )
        self.backbone = build_backbone(spec.backbone, spec.backbone_width, spec.dilate_last)
        s = feature_size(image_size, spec.dilate_last)
        self.tokenizer = nn.Conv2d(self.backbone.out_channels, width, 1)
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(s, s, width), std=0.02))
        self.class_tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(k, width), std=0.02))
        self.encoder = EncoderLayer(width, spec.num_heads, spec.mlp_ratio)
        self.class_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.class_head = ClassTokenHead(k, width)
        self.patch_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.patch_head = nn.Linear(width, spec.num_classes)
        self.mil_proj = nn.Linear(width, spec.embed_dim)
        self.mil_bias = nn.Parameter(torch.tensor(float(spec.mil_bias_init)))

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


def make_optimizer(model, train_cfg, total_steps: int):
    """The AdamW of a config's train section, as cmil_jax.optim.make_optimizer: fused on GPU,
    foreach on CPU, four groups (backbone/head x decay/no decay; the backbone at lr *
    backbone_lr_mult), and optim.lr_schedule's warm-up + cosine decay over ``total_steps``
    (tabulated once, stepped per step by a LambdaLR). Returns (optimizer, scheduler).
    """
    import jax  # pylint: disable=import-outside-toplevel

    from cmil_jax import optim  # pylint: disable=import-outside-toplevel

    t = train_cfg
    if t.grad_clip:
        raise ValueError("the twin does not clip gradients: set train.grad_clip 0")
    groups = {}
    for name, p in model.named_parameters():
        head = "backbone" if name.startswith("backbone.") else "head"
        decay = p.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)
        groups.setdefault((head, decay), []).append(p)
    param_groups = [
        {
            "params": ps,
            "lr": t.lr * (t.backbone_lr_mult if head == "backbone" else 1.0),
            "weight_decay": t.weight_decay if decay else 0.0,
        }
        for (head, decay), ps in groups.items()
    ]
    cuda = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW(
        param_groups,
        lr=t.lr,
        betas=(t.b1, t.b2),
        eps=1e-8,  # optax.adamw's
        fused=True if cuda else None,
        foreach=None if cuda else True,
    )
    schedule = optim.lr_schedule(1.0, t.warmup_steps, total_steps)  # lr multiplier per step
    factors = np.asarray(jax.vmap(schedule)(np.arange(total_steps + 1)), np.float64)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: float(factors[min(step, total_steps)]))


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
# The sections of a cmil_jax config (cmil_jax.config_base).


def model_from_config(model_cfg, image_size: int) -> CMIL:
    """The twin of ``cmil_jax.train.build_model(cfg, layers)`` (``model_cfg`` = cfg.model) for
    ``image_size`` px inputs."""
    return CMIL(image_size=image_size, **model_cfg)


# ============================================================================ Flax weights


def flax_to_state_dict(flax_variables, num_batches_tracked=0) -> dict[str, torch.Tensor]:
    """cmil_jax CMIL variables {'params', 'batch_stats'} -> this module's state_dict.

    Every variable by cmil_jax.convert's torchvision names (convert.torch_tensor: conv and Dense
    kernels transposed, scale -> weight, mean/var -> running_mean/running_var), except the
    attention's query/key/value kernels (d, H, d/H), which become the rows of ``qkv`` (3d, d),
    and its out kernel (H, d/H, d), which becomes ``proj`` (d, d); ``class_head``'s kernel
    (K, d) holds one weight row per class token, not a Dense kernel, and is kept as it is.
    """
    sd = {}
    for path, leaf in convert.flatten(flax_variables).items():
        if path[1:3] == ("encoder", "attn"):
            continue
        key, value = convert.torch_tensor(path, leaf)
        if path[1:] == ("class_head", "kernel"):
            value = np.asarray(leaf)
        sd[key] = torch.from_numpy(np.array(value, dtype=np.float32))
        if key.endswith(".running_mean"):
            sd[key.replace(".running_mean", ".num_batches_tracked")] = torch.tensor(
                num_batches_tracked, dtype=torch.long)

    def t(x):
        return torch.from_numpy(np.array(x, dtype=np.float32))

    attn = flax_variables["params"]["encoder"]["attn"]
    d = np.shape(attn["query"]["kernel"])[0]
    sd["encoder.attn.qkv.weight"] = torch.cat(
        [t(attn[n]["kernel"]).reshape(d, d).T for n in ("query", "key", "value")]
    ).contiguous()
    sd["encoder.attn.qkv.bias"] = torch.cat(
        [t(attn[n]["bias"]).reshape(d) for n in ("query", "key", "value")]
    )
    sd["encoder.attn.proj.weight"] = t(attn["out"]["kernel"]).reshape(d, d).T.contiguous()
    sd["encoder.attn.proj.bias"] = t(attn["out"]["bias"])
    return sd


@torch.no_grad()
def load_from_flax(torch_model: CMIL, flax_variables) -> CMIL:
    """Copies cmil_jax CMIL params/batch_stats into ``torch_model`` in place (strict)."""
    sd = flax_to_state_dict(flax_variables)
    torch_model.load_state_dict(sd, strict=True)
    return torch_model
