"""Figure A2 of the supplementary: Grad-CAM of a class logit on test images with that edit.

    python tools/figure_a2.py --workdir runs/demo [--baseline_workdir runs/baseline] \
        [--classes Eyeglasses,Smiling] [--per_class 3] [--logit combined|class|patch] \
        [--out FILE]   # default <workdir>/figure_a2.png

Rows: test images whose sequence contains the class (single-edit images first). Columns:
image | ground-truth mask | Grad-CAM of the class (z = (z^U + z^V) / 2) | Grad-CAM of the
baseline run, if given (e.g. trained with --config.loss.alpha=0 --config.loss.lambda2=0) |
MIL dissimilarity 1 - a_i. The rows are the first images (by record index, single edits
first) on which the model detects the class (p > --min_prob), i.e. not hand-picked.

It also prints, over all test images containing each class (and over those detected), how much of the Grad-CAM lies
where it should: the pixel AUC against the manipulation mask, and for classes tied to a
landmark region (eyes, mouth, nose) the share of the map's mass inside that region's box
divided by the box's share of the image (1 = no concentration) and how often the map's peak
falls inside the box.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmil_jax import localization
from cmil_jax import predict
from cmil_jax import viz
from cmil_jax.data import inputs
from cmil_jax.data import landmarks68 as lm68
from cmil_jax.data import synthetic

# Landmarks (68-point scheme) of the face region each class edits.
REGIONS = {
    "eyeglasses": np.r_[lm68.BROWS, lm68.EYES],  # brows and eyes: where glasses sit
    "eye": np.asarray(lm68.EYES),
    "eyebrow": np.asarray(lm68.BROWS),
    "nose": np.asarray(lm68.NOSE),
    "lip": np.asarray(lm68.MOUTH),
    "smiling": np.asarray(lm68.MOUTH),
}
DEFAULT_CLASSES = {"facial_attributes": "Eyeglasses,Smiling", "facial_components": "lip,nose"}


def region_box(landmarks, names, size: int, pad: float = 0.05):
    """Bool (S, S) box around the landmarks of the class's region, padded by pad * S."""
    pts = np.asarray(landmarks)[names]
    p = pad * size
    x0, y0 = np.floor(pts.min(axis=0) - p).astype(int)
    x1, y1 = np.ceil(pts.max(axis=0) + p).astype(int)
    box = np.zeros((size, size), bool)
    box[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return box


def region_stats(cams, landmarks, names, size):
    """(mean mass share / area share, peak-inside rate) of (B, h, w) maps in the region box."""
    ratios, hits = [], []
    for cam, lm in zip(localization.upsample(cams, size), landmarks):
        box = region_box(lm, names, size)
        total = cam.sum()
        if total <= 0:
            continue
        ratios.append((cam[box].sum() / total) / box.mean())
        hits.append(box.flat[int(np.argmax(cam))])
    return float(np.mean(ratios)), float(np.mean(hits))


def mask_rgb(mask):
    return np.repeat(np.asarray(mask, np.uint8)[..., None], 3, axis=-1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="training run (its config.json and best checkpoint are read)")
    parser.add_argument("--baseline_workdir", default=None,
                        help="a second run shown beside it (None: no baseline column)")
    parser.add_argument("--checkpoint", default=None, help="selection metric (default: first)")
    parser.add_argument("--classes", default=None, help="comma-separated class names")
    parser.add_argument("--per_class", type=int, default=3, help="rows per class")
    parser.add_argument("--min_prob", type=float, default=0.5,
                        help="rows show images whose class probability exceeds this")
    parser.add_argument("--split", default="test", help="split the images come from")
    parser.add_argument("--logit", default="combined", choices=localization.GRADCAM_LOGITS,
                        help="the logit Grad-CAM explains: (z^U + z^V) / 2, z^U or z^V")
    parser.add_argument("--batch_size", type=int, default=50, help="images per forward pass")
    parser.add_argument("--out", default=None,
                        help="output PNG (None: <workdir>/figure_a2.png)")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(args.workdir, "figure_a2.png")

    cfg, model, variables, info = predict.load_model(args.workdir, args.checkpoint)
    names = list(predict.class_names(cfg))
    baseline = None
    if args.baseline_workdir:
        b_cfg, b_model, b_vars, _ = predict.load_model(args.baseline_workdir, args.checkpoint)
        baseline = (localization.make_maps_fn(b_model, tau=cfg.loss.tau, logit=args.logit),
                    b_vars)
        changed = [f"{k}={v:g}" for k, v in b_cfg.loss.items()
                   if isinstance(v, float) and v != cfg.loss.get(k)]
        baseline_title = "Grad-CAM, baseline" + ("\n" + ", ".join(changed) if changed else "")
    source = inputs.open_splits(cfg, args.workdir, (args.split,))[args.split]
    labels = source.labels()
    maps_fn = localization.make_maps_fn(model, tau=cfg.loss.tau, logit=args.logit)
    size = cfg.data.image_size
    classes = (args.classes or DEFAULT_CLASSES.get(cfg.data.subset, names[0])).split(",")
    lower = [n.lower() for n in names]

    rows, row_titles = [], []
    for cls in classes:
        k = lower.index(cls.strip().lower())
        with_class = [i for i in range(len(source)) if (k + 1) in labels[i]]
        # Single-edit images first: their mask is this class's region alone.
        with_class.sort(key=lambda i: (int(np.count_nonzero(labels[i])), i))
        cams, dis, probs, lms, masks, b_cams, exs_all = [], [], [], [], [], [], []
        for start in range(0, len(with_class), args.batch_size):
            exs = [source[i] for i in with_class[start:start + args.batch_size]]
            images = np.stack([e["image"] for e in exs])
            index = np.full((len(exs),), k, np.int32)
            out = {key: np.asarray(v) for key, v in maps_fn(variables, images, index).items()}
            cams.append(out["gradcam"])
            dis.append(out["dissimilarity"])
            probs.append(out["probs"][:, k])
            lms += [e["landmarks"] for e in exs]
            masks.append(np.stack([e["mask"] for e in exs]))
            if baseline is not None:
                b_cams.append(np.asarray(baseline[0](baseline[1], images, index)["gradcam"]))
            exs_all += [{key: e[key] for key in ("image", "mask", "label")} for e in exs]
        cams, dis, probs = np.concatenate(cams), np.concatenate(dis), np.concatenate(probs)
        masks = np.concatenate(masks)
        b_cams = np.concatenate(b_cams) if b_cams else None
        detected = probs > args.min_prob
        print(f"{names[k]}: {len(with_class)} test images with the class, "
              f"{int(detected.sum())} detected (p > {args.min_prob})", flush=True)
        for subset_name, sel in (("all", slice(None)), ("detected", detected)):
            stats = f"  {subset_name}: Grad-CAM pixel AUC vs mask {localization.pixel_auc(cams[sel], masks[sel]):.3f}"
            if b_cams is not None:
                stats += f" (baseline {localization.pixel_auc(b_cams[sel], masks[sel]):.3f})"
            stats += f"; 1 - similarity {localization.pixel_auc(dis[sel], masks[sel]):.3f}"
            region = REGIONS.get(names[k].lower())
            if region is not None:
                sel_lms = [lm for lm, keep in zip(lms, np.ones(len(lms), bool)[sel] if
                                                   isinstance(sel, slice) else sel) if keep]
                ratio, hit = region_stats(cams[sel], sel_lms, region, size)
                stats += (f"; Grad-CAM mass in the region box {ratio:.2f}x its area share, "
                          f"peak inside {hit:.0%}")
                if b_cams is not None:
                    b_ratio, b_hit = region_stats(b_cams[sel], sel_lms, region, size)
                    stats += f" (baseline {b_ratio:.2f}x, {b_hit:.0%})"
            print(stats, flush=True)

        # Shown: the first detected images (single-edit images come first).
        for j in np.flatnonzero(detected)[:args.per_class]:
            image = exs_all[j]["image"]
            row = [image, mask_rgb(exs_all[j]["mask"]), viz.overlay(image, cams[j])]
            if b_cams is not None:
                row.append(viz.overlay(image, b_cams[j]))
            row += [viz.overlay(image, dis[j])]
            rows.append(row)
            try:
                seq = synthetic.label_to_name(exs_all[j]["label"], cfg.data.subset)
            except ValueError:  # not a Seq-DeepFake subset
                seq = ""
            row_titles.append(f"{seq}\np({names[k]})={probs[j]:.2f}")

    columns = ["image", "mask", "Grad-CAM, CMIL"]
    if baseline is not None:
        columns.append(baseline_title)
    columns += ["1 - similarity\n(MIL map)"]
    logit = localization.GRADCAM_LOGIT_MEANINGS[args.logit]
    title = (f"Grad-CAM of the class logit {logit}, {cfg.data.subset} test images; "
             f"{info['metric']} checkpoint, step {info['step']}")
    viz.plot_map_grid(rows, columns, args.out, row_titles=row_titles, title=title)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
