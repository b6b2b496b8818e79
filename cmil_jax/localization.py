"""Where is the manipulation? Heatmaps from a CMIL model and localization metrics.

Maps live on the feature grid (B, h, w), N = h * w patches in row-major order, and are
brought to the image with ``upsample``:

* ``gradcam``: Grad-CAM [Selvaraju et al. 2017] of one logit, taken at the last backbone
  feature map A (B, h, w, c): weights w_c = mean_{y,x} d logit / d A[y, x, c],
  map = ReLU(sum_c w_c A[..., c]). The logit is a class logit (``logit='combined'`` uses
  z = (z^U + z^V) / 2, the decoding logit; 'class' z^U; 'patch' z^V) or the MIL fake logit
  ('fake'). The gradient is taken through a zero perturbation that ``nn.intercept_methods``
  adds to the backbone's output, so the model itself needs no change.
* ``similarity_map``: the MIL localization score a_i = mean_{j != i} e_i . e_j (method.md
  3.1; low = likely manipulated); ``dissimilarity_map`` = 1 - a_i, high = likely manipulated.
* ``patch_logit_maps``: the per-patch class logits q_{i,k} of the patch branch, (B, h, w, C).

Metrics (numpy) compare a score map (high = manipulated) with a ground-truth mask (the
synthetic data's manipulation masks, SBI blend masks; uint8 0..255 or float 0..1, > 0.5 =
manipulated). Only images whose mask has manipulated pixels count:

* ``pixel_auc``: ROC AUC of the pixel scores against the mask, per image, averaged over images
  (images whose mask covers every pixel are left out: no negatives).
* ``best_iou``: IoU of {normalised score >= t} with the mask, averaged over images, at the
  threshold t (one for the whole set, on per-image min-max normalised maps) that maximises it.
* ``pointing_game``: fraction of images whose highest-scoring pixel lies inside the mask
  (optionally within ``tolerance`` pixels of it).

``LocalizationMeter`` accumulates all three over batches (what an evaluation loop uses).
"""

from __future__ import annotations


import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmil_jax import losses
from cmil_jax import metrics as metrics_lib

# The logits Grad-CAM can explain, and what each is (z^U: class-token head, z^V: patch head).
GRADCAM_LOGIT_MEANINGS = {
    "combined": "(z^U + z^V) / 2",
    "class": "z^U",
    "patch": "z^V",
    "fake": "the MIL fake logit",
}
GRADCAM_LOGITS = tuple(GRADCAM_LOGIT_MEANINGS)
IOU_THRESHOLDS = tuple(np.round(np.linspace(0.05, 0.95, 19), 2))
BACKBONE_PATH = ("backbone",)


# ----------------------------------------------------------------------------------------------
# Maps


def grid_shape(outputs) -> tuple[int, int]:
    """(h, w) of the feature grid from model outputs ('feature_map' (B, h, w, c))."""
    return tuple(int(s) for s in outputs["feature_map"].shape[1:3])


def _to_grid(values, grid: tuple[int, int] | None):
    """(B, N, ...) -> (B, h, w, ...); a square grid is assumed when ``grid`` is None."""
    b, n = values.shape[:2]
    if grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"cannot infer a square grid from N={n} patches; pass grid=(h, w)")
        grid = (side, side)
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} does not hold N={n} patches")
    return values.reshape(b, grid[0], grid[1], *values.shape[2:])


def similarity_map(mil_emb, grid: tuple[int, int] | None = None):
    """a_i = mean_{j != i} S_ij on the grid: (B, N, E) -> (B, h, w); low = likely manipulated."""
    return _to_grid(losses.patch_similarity_map(mil_emb), grid)


def dissimilarity_map(mil_emb, grid: tuple[int, int] | None = None):
    """1 - a_i on the grid, (B, h, w) in [0, 2]; high = likely manipulated."""
    return 1.0 - similarity_map(mil_emb, grid)


def patch_logit_maps(patch_class_logits, grid: tuple[int, int] | None = None):
    """Patch-branch logits q_{i,k} on the grid: (B, N, C) -> (B, h, w, C)."""
    return _to_grid(patch_class_logits, grid)


def _is_backbone_call(context) -> bool:
    scope = context.module.scope
    return (context.method_name == "__call__" and scope is not None
            and tuple(scope.path) == BACKBONE_PATH)


def _select_logit(outputs, class_index, logit: str, tau: float, num_lowest):
    """(B,) the logit Grad-CAM explains; class_index: int or (B,) int, 0-based."""
    if logit == "fake":
        return losses.mil_fake_logit(outputs["mil_emb"], outputs["mil_bias"], tau, num_lowest)
    if logit == "combined":
        z = 0.5 * (outputs["class_logits"] + outputs["patch_logits"])
    elif logit == "class":
        z = outputs["class_logits"]
    elif logit == "patch":
        z = outputs["patch_logits"]
    else:
        raise ValueError(f"logit must be one of {GRADCAM_LOGITS}, got {logit!r}")
    index = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), z.shape[:1])
    return jnp.take_along_axis(z, index[:, None], axis=1)[:, 0]


def gradcam_and_outputs(model, variables, images, class_index, *, logit: str = "combined",
                        tau: float = 0.2, num_lowest: int | None = None):
    """Grad-CAM maps and the model outputs from one forward/backward pass (eval mode).

    Args:
      model: a CMIL module.  variables: {'params', 'batch_stats'}.
      images: (B, H, W, 3) in [0, 255].
      class_index: int or (B,) int, 0-based class k (class id k + 1); ignored for 'fake'.
      logit: 'combined' | 'class' | 'patch' | 'fake' (see the module docstring).
      tau, num_lowest: of the MIL fake logit (logit='fake').
    Returns:
      ((B, h, w) float32 Grad-CAM, >= 0, unnormalised; dict of model outputs).
    Images are independent in eval mode, so the gradient of the summed logit is per image.
    """
    if logit not in GRADCAM_LOGITS:
        raise ValueError(f"logit must be one of {GRADCAM_LOGITS}, got {logit!r}")
    images = jnp.asarray(images)
    abstract = jax.eval_shape(lambda: model.apply(variables, images, train=False))
    fmap = abstract["feature_map"]

    def forward(delta):
        def add_delta(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if _is_backbone_call(context):
                y = y + delta.astype(y.dtype)
            return y

        with nn.intercept_methods(add_delta):
            outputs = model.apply(variables, images, train=False)
        selected = _select_logit(outputs, class_index, logit, tau, num_lowest)
        return jnp.sum(selected), outputs

    grads, outputs = jax.grad(forward, has_aux=True)(jnp.zeros(fmap.shape, jnp.float32))
    weights = jnp.mean(grads, axis=(1, 2), keepdims=True)  # (B, 1, 1, c)
    cam = jax.nn.relu(jnp.sum(weights * outputs["feature_map"], axis=-1))
    return cam, outputs


def gradcam(model, variables, images, class_index, *, logit: str = "combined",
            tau: float = 0.2, num_lowest: int | None = None):
    """Grad-CAM of one logit at the last backbone feature map: (B, h, w) float32, >= 0.

    See ``gradcam_and_outputs`` for the arguments.
    """
    return gradcam_and_outputs(model, variables, images, class_index, logit=logit, tau=tau,
                               num_lowest=num_lowest)[0]


def make_maps_fn(model, *, tau: float = 0.2, num_lowest: int | None = None,
                 logit: str = "combined"):
    """A jitted fn(variables, images, class_index=None) -> dict of predictions and maps.

    class_index: (B,) int, the class whose Grad-CAM is computed; None = each image's most
    probable class. The dict holds 'probs' (B, C) p_k = sigmoid((z^U + z^V) / 2),
    'fake_prob' (B,) MIL p(x), 'class_index' (B,), 'gradcam' (B, h, w),
    'dissimilarity' (B, h, w) 1 - a_i, 'patch_logits' (B, h, w, C).
    """

    def fn(variables, images, class_index=None):
        if class_index is None:
            first = model.apply(variables, images, train=False)
            z = 0.5 * (first["class_logits"] + first["patch_logits"])
            class_index = jnp.argmax(z, axis=1).astype(jnp.int32)
        cam, out = gradcam_and_outputs(model, variables, images, class_index, logit=logit,
                                       tau=tau, num_lowest=num_lowest)
        grid = grid_shape(out)
        z = 0.5 * (out["class_logits"] + out["patch_logits"])
        return {
            "probs": jax.nn.sigmoid(z),
            "fake_prob": losses.mil_fake_prob(out["mil_emb"], out["mil_bias"], tau, num_lowest),
            "class_index": jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), z.shape[:1]),
            "gradcam": cam,
            "dissimilarity": dissimilarity_map(out["mil_emb"], grid),
            "patch_logits": patch_logit_maps(out["patch_class_logits"], grid),
        }

    return jax.jit(fn)


# ----------------------------------------------------------------------------------------------
# Map utilities (numpy)


def upsample(maps, size) -> np.ndarray:
    """Bilinear upsampling (pixel centres aligned) of (h, w) or (B, h, w) maps to size.

    Args:
      maps: (h, w) or (B, h, w) float.  size: int S (square) or (H, W).
    Returns:
      float32 (H, W) or (B, H, W).
    """
    maps = np.asarray(maps, np.float32)
    height, width = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if maps.ndim == 2:
        return cv2.resize(maps, (width, height), interpolation=cv2.INTER_LINEAR)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (h, w) or (B, h, w), got {maps.shape}")
    out = np.empty((maps.shape[0], height, width), np.float32)
    for i, m in enumerate(maps):
        out[i] = cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def normalize01(maps) -> np.ndarray:
    """Per-map min-max scaling to [0, 1] over the last two axes; a constant map gives 0."""
    maps = np.asarray(maps, np.float32)
    lo = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


def binarize_masks(masks, threshold: float = 0.5) -> np.ndarray:
    """Bool masks from uint8 0..255, float 0..1 or bool (H, W) / (B, H, W); > threshold."""
    masks = np.asarray(masks)
    if masks.dtype == bool:
        return masks
    if masks.dtype == np.uint8:
        return masks > threshold * 255.0
    return masks > threshold


# ----------------------------------------------------------------------------------------------
# Localization metrics (numpy)


def _prepare(scores, masks):
    """Checks shapes; -> (float32 (B, H, W) scores at the mask size, bool (B, H, W) masks)."""
    masks = binarize_masks(masks)
    if masks.ndim == 2:
        masks = masks[None]
    scores = np.asarray(scores, np.float32)
    if scores.ndim == 2:
        scores = scores[None]
    if scores.ndim != 3 or masks.ndim != 3 or scores.shape[0] != masks.shape[0]:
        raise ValueError(f"scores (B, h, w) and masks (B, H, W) must match in B, got "
                         f"{scores.shape} and {masks.shape}")
    if scores.shape[1:] != masks.shape[1:]:
        scores = upsample(scores, masks.shape[1:])
    return scores, masks


def _image_auc(score, mask) -> float:
    """Pixel ROC AUC of one image; NaN if the mask has no positives or no negatives."""
    pos = int(mask.sum())
    if pos == 0 or pos == mask.size:
        return float("nan")
    return metrics_lib.binary_auc(score.reshape(-1), mask.reshape(-1))


def _image_ious(score01, mask, thresholds) -> np.ndarray:
    """IoU of {score01 >= t} with the mask for each t: (T,)."""
    m = mask.reshape(-1)
    s = score01.reshape(-1)
    ious = np.empty(len(thresholds))
    for j, t in enumerate(thresholds):
        pred = s >= t
        union = np.count_nonzero(pred | m)
        ious[j] = np.count_nonzero(pred & m) / union if union else 0.0
    return ious


def _image_hit(score, mask, tolerance: int) -> bool:
    """Pointing game: is the argmax pixel inside the mask (dilated by ``tolerance`` px)?"""
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    if tolerance <= 0:
        return bool(mask[y, x])
    y0, y1 = max(0, y - tolerance), y + tolerance + 1
    x0, x1 = max(0, x - tolerance), x + tolerance + 1
    yy, xx = np.mgrid[y0:min(y1, mask.shape[0]), x0:min(x1, mask.shape[1])]
    near = (yy - y) ** 2 + (xx - x) ** 2 <= tolerance**2
    return bool(np.any(mask[yy, xx] & near))


class LocalizationMeter:
    """Accumulates pixel AUC, best-threshold IoU and the pointing game over batches.

    meter.add(scores (B, h, w) or (B, N), masks (B, H, W), valid=(B,) optional)
    meter.result() -> {'pixel_auc', 'best_iou', 'best_iou_threshold', 'pointing_game',
                       'num_localized'} (floats; NaN when no image had a mask).
    Scores: high = manipulated (e.g. ``dissimilarity_map``; use ``add_similarity`` for a_i).
    """

    def __init__(self, thresholds=IOU_THRESHOLDS, tolerance: int = 0):
        self.thresholds = np.asarray(thresholds, np.float64)
        self.tolerance = int(tolerance)
        self.auc_sum = 0.0
        self.auc_count = 0
        self.iou_sums = np.zeros(len(self.thresholds))
        self.hits = 0
        self.count = 0

    def add(self, scores, masks, valid=None) -> None:
        scores = np.asarray(scores, np.float32)
        masks = np.asarray(masks)
        if scores.ndim == 2 and masks.ndim == 3 and scores.shape[0] == masks.shape[0]:
            scores = _to_grid(scores, None)  # (B, N) patch scores, square grid
        scores, masks = _prepare(scores, masks)
        keep = masks.reshape(masks.shape[0], -1).any(axis=1)
        if valid is not None:
            keep &= np.asarray(valid).reshape(-1) > 0
        for score, mask in zip(scores[keep], masks[keep]):
            auc = _image_auc(score, mask)
            if np.isfinite(auc):
                self.auc_sum += auc
                self.auc_count += 1
            self.iou_sums += _image_ious(normalize01(score), mask, self.thresholds)
            self.hits += _image_hit(score, mask, self.tolerance)
            self.count += 1

    def add_similarity(self, similarity, masks, valid=None) -> None:
        """Adds MIL similarity maps a_i ((B, N) or (B, h, w); low = manipulated)."""
        self.add(1.0 - np.asarray(similarity, np.float32), masks, valid)

    def result(self) -> dict[str, float]:
        nan = float("nan")
        if self.count:
            best = int(np.argmax(self.iou_sums))
            best_iou = float(self.iou_sums[best] / self.count)
            best_t = float(self.thresholds[best])
        else:
            best_iou = best_t = nan
        return {
            "pixel_auc": self.auc_sum / self.auc_count if self.auc_count else nan,
            "best_iou": best_iou,
            "best_iou_threshold": best_t,
            "pointing_game": self.hits / self.count if self.count else nan,
            "num_localized": float(self.count),
        }


def pixel_auc(scores, masks) -> float:
    """Mean per-image pixel ROC AUC. scores (B, h, w) any size (upsampled), masks (B, H, W)."""
    scores, masks = _prepare(scores, masks)
    aucs = [_image_auc(s, m) for s, m in zip(scores, masks)]
    aucs = [a for a in aucs if np.isfinite(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def best_iou(scores, masks, thresholds=IOU_THRESHOLDS) -> tuple[float, float]:
    """(mean IoU at the best threshold, that threshold) over images with a non-empty mask."""
    meter = LocalizationMeter(thresholds)
    meter.add(scores, masks)
    r = meter.result()
    return r["best_iou"], r["best_iou_threshold"]


def pointing_game(scores, masks, tolerance: int = 0) -> float:
    """Fraction of images with a non-empty mask whose argmax pixel hits the mask."""
    scores, masks = _prepare(scores, masks)
    keep = masks.reshape(masks.shape[0], -1).any(axis=1)
    hits = [_image_hit(s, m, tolerance) for s, m in zip(scores[keep], masks[keep])]
    return float(np.mean(hits)) if hits else float("nan")
