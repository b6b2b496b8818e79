"""Losses of CMIL: contrastive MIL on sorted patch similarities, BCE on both branches, ranking.

All functions are pure, jit-able and compute in float32 (inputs are cast; float64 inputs stay
float64). Arguments that
change shapes or control flow (``num_classes``, ``num_lowest``, ``order``, ``use_rank`` and the
loss weights passed to ``total_loss``) must be Python values, i.e. static under ``jax.jit``.

Shapes: B images, N patches, E embedding size, C classes, L = 5 sequence slots,
P = N (N - 1) / 2 patch pairs, M <= P kept similarities.

Sequence labels are int arrays (B, L) with class ids 1..C in the order the edits were applied
and 0 as padding (an original image is all zeros).

Tags follow docs/method.md: [paper] stated by the paper, [ours] our reconstruction.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

RANK_ORDERS = ("first_high", "last_high")


def _f32(x) -> jax.Array:
    """x as float32 (float64 stays float64: a float64 model's losses keep its precision)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ----------------------------------------------------------------------------------------------
# Labels


def multi_hot(seq, num_classes: int) -> jax.Array:
    """Multi-hot targets from sequence labels.

    Args:
      seq: (B, L) int, class ids 1..num_classes, 0 = padding.
      num_classes: C.
    Returns:
      (B, C) float32, y[b, k] = 1 if class k + 1 occurs in seq[b].
    """
    seq = jnp.asarray(seq).astype(jnp.int32)
    onehot = jax.nn.one_hot(seq, num_classes + 1, dtype=jnp.float32)  # (B, L, C+1)
    return jnp.max(onehot, axis=-2)[..., 1:]


def rank_grades(seq, num_classes: int, order: str = "first_high") -> jax.Array:
    """Ranking grades of the classes of a sequence.

    For a sequence c_1..c_m: 'first_high' gives g(c_j) = m - j + 1 (first edit highest),
    'last_high' gives g(c_j) = j (last edit highest). Absent classes get 0. [ours]
    Positions are counted over the non-zero entries, so interior padding is tolerated.

    Args:
      seq: (B, L) int, class ids 1..C, 0 = padding.
      num_classes: C.
      order: 'first_high' or 'last_high'.
    Returns:
      (B, C) float32 grades.
    """
    if order not in RANK_ORDERS:
        raise ValueError(f"order must be one of {RANK_ORDERS}, got {order!r}")
    seq = jnp.asarray(seq).astype(jnp.int32)
    present = (seq > 0).astype(jnp.float32)  # (B, L)
    position = jnp.cumsum(present, axis=-1)  # j, 1-based among edits
    length = jnp.sum(present, axis=-1, keepdims=True)  # m
    grade = (length - position + 1.0) if order == "first_high" else position
    grade = grade * present  # (B, L)
    onehot = jax.nn.one_hot(seq, num_classes + 1, dtype=jnp.float32)[..., 1:]  # (B, L, C)
    return jnp.einsum("bl,blc->bc", grade, onehot)


# ----------------------------------------------------------------------------------------------
# Binary cross-entropy


def _weighted_mean(values: jax.Array, weights) -> jax.Array:
    """Mean of (B,) values, or sum(w v) / sum(w) with 0 when all weights are 0."""
    if weights is None:
        return jnp.mean(values)
    weights = _f32(weights).reshape(values.shape)
    total = jnp.sum(weights)
    safe_total = jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, jnp.sum(weights * values) / safe_total, 0.0)


def bce_loss(logits, targets, weights=None) -> jax.Array:
    """Binary cross-entropy from logits, numerically stable.

    Args:
      logits: (B,) or (B, C) float.
      targets: same shape as logits, values in [0, 1].
      weights: optional (B,) per-sample weights. The per-sample loss (mean over C) is averaged
        with these weights; all-zero weights give 0.
    Returns:
      scalar float32 mean loss (nats).
    """
    x = _f32(logits)
    t = _f32(targets)
    if t.shape != x.shape:
        raise ValueError(f"targets must have the shape of logits {x.shape}, got {t.shape}")
    # max(x, 0) - x t + log(1 + exp(-|x|))
    elementwise = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    per_sample = elementwise.reshape(x.shape[0], -1).mean(axis=-1) if x.ndim > 1 else elementwise
    return _weighted_mean(per_sample, weights)


# ----------------------------------------------------------------------------------------------
# Contrastive MIL on sorted patch similarities (L_CLS)


def _resolve_num_lowest(num_lowest: Optional[int], num_patches: int) -> int:
    num_pairs = num_patches * (num_patches - 1) // 2
    if num_pairs < 1:
        raise ValueError(f"emb must have at least 2 patches (N >= 2), got N={num_patches}")
    if num_lowest is None:
        num_lowest = num_patches  # method default M_k = N [ours]
    num_lowest = int(num_lowest)
    if num_lowest < 1:
        raise ValueError(f"num_lowest must be >= 1 or None, got {num_lowest}")
    return min(num_lowest, num_pairs)


def pairwise_similarities(emb) -> jax.Array:
    """Cosine similarity matrix of the patches of each image.

    Args:
      emb: (B, N, E) patch embeddings (L2-normalised here again, so any scale is fine).
    Returns:
      (B, N, N) float32, S[b, i, j] = e_i . e_j.
    """
    e = _f32(emb)
    if e.ndim != 3:
        raise ValueError(f"emb must have shape (B, N, E), got {e.shape}")
    e = e * jax.lax.rsqrt(jnp.maximum(jnp.sum(e * e, axis=-1, keepdims=True), 1e-12))
    return jnp.einsum("bie,bje->bij", e, e, precision=jax.lax.Precision.HIGHEST)


def lowest_similarities(emb, num_lowest: Optional[int] = None) -> jax.Array:
    """The lowest pairwise cosine similarities s_(1) <= ... <= s_(M) of each image.

    Uses the pairs i < j only, selected with ``jax.lax.top_k`` on -S (no full sort).

    Args:
      emb: (B, N, E) patch embeddings.
      num_lowest: M. None means M = N (the method's default M_k = N) [ours]; values above
        P = N (N - 1) / 2 are clamped to P (all pairs).
    Returns:
      (B, M) float32, ascending.
    """
    sims = pairwise_similarities(emb)
    n = sims.shape[-1]
    m = _resolve_num_lowest(num_lowest, n)
    rows, cols = np.triu_indices(n, k=1)
    upper = sims[:, rows, cols]  # (B, P)
    neg_lowest, _ = jax.lax.top_k(-upper, m)  # descending in -S
    return -neg_lowest


def mil_rank_weights(sims, tau: float = 0.2) -> jax.Array:
    """Weights over ranks P(x; k) = softmax_k(-s_(k) / tau). [paper: eq. 14]

    Args:
      sims: (B, M) sorted similarities from ``lowest_similarities``.
      tau: temperature.
    Returns:
      (B, M) float32, rows sum to 1.
    """
    return jax.nn.softmax(-_f32(sims) / tau, axis=-1)


def soft_min_similarity(emb, tau: float = 0.2, num_lowest: Optional[int] = None) -> jax.Array:
    """m(x) = sum_k P(x; k) s_(k), a soft minimum of the patch similarities.

    Args:
      emb: (B, N, E).  tau: temperature.  num_lowest: M, see ``lowest_similarities``.
    Returns:
      (B,) float32.
    """
    sims = lowest_similarities(emb, num_lowest)
    return jnp.sum(mil_rank_weights(sims, tau) * sims, axis=-1)


def mil_fake_logit(emb, bias, tau: float = 0.2, num_lowest: Optional[int] = None) -> jax.Array:
    """Fake logit (b - m(x)) / tau; p(x) = sigmoid of it. [ours: form]

    Args:
      emb: (B, N, E) patch embeddings.
      bias: scalar b (learnable).
      tau: temperature.
      num_lowest: M, see ``lowest_similarities``.
    Returns:
      (B,) float32 logits.
    """
    return (_f32(bias) - soft_min_similarity(emb, tau, num_lowest)) / tau


def mil_fake_prob(emb, bias, tau: float = 0.2, num_lowest: Optional[int] = None) -> jax.Array:
    """p(x) = sigmoid(mil_fake_logit), (B,) float32 in [0, 1]."""
    return jax.nn.sigmoid(mil_fake_logit(emb, bias, tau, num_lowest))


def cls_loss(emb, is_fake, bias, tau: float = 0.2, num_lowest: Optional[int] = None,
             weights=None) -> jax.Array:
    """L_CLS: BCE of p(x) against the fake label.

    Args:
      emb: (B, N, E) patch embeddings.
      is_fake: (B,) 0/1.
      bias: scalar b.  tau: temperature.  num_lowest: M.
      weights: optional (B,) per-sample weights.
    Returns:
      scalar float32.
    """
    logits = mil_fake_logit(emb, bias, tau, num_lowest)
    return bce_loss(logits, _f32(is_fake).reshape(logits.shape), weights)


def patch_similarity_map(emb) -> jax.Array:
    """Localization score a_i = mean_{j != i} S_ij (low = likely manipulated).

    The self-similarity S_ii = 1 is left out [ours]; including it would only rescale the map.

    Args:
      emb: (B, N, E).
    Returns:
      (B, N) float32; reshape to (B, h, w) with row-major patch order.
    """
    sims = pairwise_similarities(emb)
    n = sims.shape[-1]
    diag = jnp.diagonal(sims, axis1=-2, axis2=-1)
    return (jnp.sum(sims, axis=-1) - diag) / max(n - 1, 1)


# ----------------------------------------------------------------------------------------------
# Multi-label ranking (L_Rank)


def rank_loss_per_image(logits, seq, order: str = "first_high") -> tuple[jax.Array, jax.Array]:
    """Per-image graded pairwise log-sum-exp loss and whether the image has pairs.

    loss_b = log(1 + sum_{(a, b): g(a) < g(b)} exp(z_a - z_b)), computed as a logsumexp over
    the pair terms and one 0 term, with masked pairs at -inf. [ours: form]

    Args:
      logits: (B, C) ranking logits z.
      seq: (B, L) int sequence labels.
      order: 'first_high' or 'last_high' (see ``rank_grades``).
    Returns:
      ((B,) float32 loss, (B,) bool has_pairs).
    """
    z = _f32(logits)
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (B, C), got {z.shape}")
    grades = rank_grades(seq, z.shape[-1], order)  # (B, C)
    pair = grades[:, :, None] < grades[:, None, :]  # (B, C_a, C_b): g(a) < g(b)
    diff = z[:, :, None] - z[:, None, :]  # z_a - z_b
    terms = jnp.where(pair, diff, -jnp.inf).reshape(z.shape[0], -1)
    terms = jnp.concatenate([jnp.zeros((z.shape[0], 1), jnp.float32), terms], axis=-1)
    loss = jax.nn.logsumexp(terms, axis=-1)
    return loss, jnp.any(pair, axis=(1, 2))


def rank_loss(logits, seq, order: str = "first_high", weights=None) -> jax.Array:
    """L_Rank averaged over the images that have at least one pair (0 if none).

    Args:
      logits: (B, C) ranking logits z = (z^U + z^V) / 2.
      seq: (B, L) int sequence labels (all-zero rows have no pairs and are left out).
      order: 'first_high' or 'last_high'.
      weights: optional (B,) per-sample weights (e.g. has_seq).
    Returns:
      scalar float32.
    """
    loss, has_pairs = rank_loss_per_image(logits, seq, order)
    w = has_pairs.astype(jnp.float32)
    if weights is not None:
        w = w * _f32(weights).reshape(w.shape)
    return _weighted_mean(loss, w)


# ----------------------------------------------------------------------------------------------
# Total


def loss_kwargs(loss_cfg) -> dict:
    """Keyword arguments of total_loss from a config's ``loss`` section (num_lowest 0 = all N)."""
    return {
        "alpha": loss_cfg.alpha,
        "lambda1": loss_cfg.lambda1,
        "lambda2": loss_cfg.lambda2,
        "tau": loss_cfg.tau,
        "num_lowest": loss_cfg.num_lowest or None,
        "rank_order": loss_cfg.rank_order,
        "use_rank": loss_cfg.use_rank,
    }


def total_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *,
               alpha: float = 1.0, lambda1: float = 1.0, lambda2: float = 1.0,
               tau: float = 0.2, num_lowest: Optional[int] = None,
               rank_order: str = "first_high", use_rank: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_Total = alpha L_CLS + lambda1 (L^U + L^V) + lambda2 L_Rank. [paper: weights; ours: composition]

    Args:
      outputs: model outputs with 'class_logits' (B, C), 'patch_logits' (B, C),
        'mil_emb' (B, N, E), 'mil_bias' ().
      batch: 'label' (B, L) int, 'is_fake' (B,) int, optional 'has_seq' (B,) float
        (1 = sequence labels valid; masks L^U, L^V and L_Rank per sample, not L_CLS) [ours].
      alpha, lambda1, lambda2, tau: loss hyper-parameters (paper defaults 1, 1, 1, 0.2).
      num_lowest: M for L_CLS (None = N).
      rank_order: 'first_high' or 'last_high'.
      use_rank: include L_Rank.
    Binary mode (C == 1): BCE targets are is_fake, has_seq is ignored and L_Rank is skipped.
    Returns:
      (scalar loss, dict of scalars 'l_cls', 'l_bce_u', 'l_bce_v', 'l_rank', 'mil_fake_prob'
      (batch mean of p(x))).
    """
    z_u = _f32(outputs["class_logits"])
    z_v = _f32(outputs["patch_logits"])
    is_fake = _f32(batch["is_fake"])
    binary = z_u.shape[-1] == 1

    fake_logit = mil_fake_logit(outputs["mil_emb"], outputs["mil_bias"], tau, num_lowest)
    l_cls = bce_loss(fake_logit, is_fake)

    if binary:
        targets = is_fake[:, None]
        seq_weights = None
    else:
        targets = multi_hot(batch["label"], z_u.shape[-1])
        seq_weights = batch.get("has_seq")
    l_bce_u = bce_loss(z_u, targets, seq_weights)
    l_bce_v = bce_loss(z_v, targets, seq_weights)

    if use_rank and not binary:
        l_rank = rank_loss(0.5 * (z_u + z_v), batch["label"], rank_order, seq_weights)
    else:
        l_rank = jnp.zeros((), jnp.float32)

    loss = alpha * l_cls + lambda1 * (l_bce_u + l_bce_v) + lambda2 * l_rank
    aux = {
        "l_cls": l_cls,
        "l_bce_u": l_bce_u,
        "l_bce_v": l_bce_v,
        "l_rank": l_rank,
        "mil_fake_prob": jnp.mean(jax.nn.sigmoid(fake_logit)),
    }
    return loss, aux
