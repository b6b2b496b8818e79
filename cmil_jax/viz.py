"""Plots written into <workdir>/plots/, heatmap overlays and the paper's figures."""

import json
import os

import cv2
import numpy as np

from cmil_jax import disk
from cmil_jax import localization


def plot_curves(workdir: str) -> str | None:
    """Training loss and validation metrics over steps, from metrics.jsonl -> plots/curves.png."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r["split"] == "train" and "loss" in r]
    val = [r for r in records if r["split"] == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("loss", "l_cls", "l_bce_u", "l_bce_v", "l_rank"):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            axes[0].plot(*zip(*pts), label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("training losses")
    axes[0].legend(fontsize=8)
    for key in ("fixed_acc", "adaptive_acc", "exact_match", "map", "auc"):
        pts = [(r["step"], r[key]) for r in val if key in r]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=key)
    axes[1].set_xlabel("step")
    axes[1].set_title("validation")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    out = os.path.join(workdir, "plots", "curves.png")
    disk.save_figure(fig, out, dpi=100)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------
# Heatmap overlays (numpy + OpenCV; RGB uint8 in and out)


def colorize(heat01) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB, jet colour map (blue low, red high)."""
    heat = np.clip(np.asarray(heat01, np.float32), 0.0, 1.0)
    bgr = cv2.applyColorMap(np.rint(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def overlay(image, heat, alpha: float = 0.45, normalize: bool = True) -> np.ndarray:
    """Blends a heatmap over an image.

    Args:
      image: (H, W, 3) uint8 RGB.
      heat: (h, w) float map of any size (bilinearly resized to (H, W)).
      alpha: weight of the colour map.
      normalize: min-max scale the map to [0, 1] first (else it is clipped to [0, 1]).
    Returns:
      (H, W, 3) uint8 RGB.
    """
    image = np.asarray(image, np.uint8)
    heat = localization.upsample(heat, image.shape[:2])
    if normalize:
        heat = localization.normalize01(heat)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colorize(heat).astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def labeled_row(panels, titles, header: str | None = None, height: int = 256) -> np.ndarray:
    """Panels side by side, each scaled to ``height`` (aspect kept), a title above each and an
    optional header line above all. Returns (H', W', 3) uint8 RGB."""

    font, scale, thick, strip, gap = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1, 22, 4
    columns = []
    for panel, title in zip(panels, titles):
        panel = np.asarray(panel, np.uint8)
        if panel.ndim == 2:
            panel = np.repeat(panel[..., None], 3, axis=-1)
        width = max(1, int(round(panel.shape[1] * height / panel.shape[0])))
        interp = cv2.INTER_AREA if height < panel.shape[0] else cv2.INTER_NEAREST
        panel = cv2.resize(panel, (width, height), interpolation=interp)
        label = np.full((strip, width, 3), 255, np.uint8)
        cv2.putText(label, str(title)[: max(4, width // 8)], (3, strip - 7), font, scale,
                    (0, 0, 0), thick, cv2.LINE_AA)
        columns.append(np.concatenate([label, panel], axis=0))
        columns.append(np.full((strip + height, gap, 3), 255, np.uint8))
    row = np.concatenate(columns[:-1], axis=1)
    if header:
        top = np.full((strip + 4, row.shape[1], 3), 255, np.uint8)
        cv2.putText(top, header, (3, strip - 4), font, 0.5, (0, 0, 0), thick, cv2.LINE_AA)
        row = np.concatenate([top, row], axis=0)
    return row


def save_png(path: str, rgb) -> str:
    """Writes an RGB uint8 image as PNG (directories created; whole or not at all:
    disk.write_atomic, DiskFullError on a full disk). Returns the path."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(np.asarray(rgb, np.uint8), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode {path} as PNG")
    with disk.writing(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    disk.write_atomic(path, encoded.tobytes())
    return path


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib)


def _pyplot():
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    return plt


def plot_map_grid(rows, column_titles, path: str, row_titles=None, title: str | None = None,
                  cell: float = 1.9, dpi: int = 80) -> str:
    """A grid of RGB images (e.g. image | mask | Grad-CAM overlays), as in Figure A2.

    Args:
      rows: list of rows, each a list of (H, W, 3) uint8 or (H, W) arrays (grey).
      column_titles: one title per column.  row_titles: optional, one per row (left side).
      path: PNG output path.  cell: inches per panel.
    """
    plt = _pyplot()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows + 0.4),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                ax.imshow(row[c], cmap="gray" if row[c].ndim == 2 else None, vmin=0, vmax=255)
            else:
                ax.axis("off")
            if r == 0 and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize=8)
            if c == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[r], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


PAIR_TYPES = ("genuine-genuine", "genuine-fake", "fake-fake")
_PAIR_COLOURS = {"genuine-genuine": "tab:blue", "genuine-fake": "tab:red", "fake-fake": "tab:orange"}


def plot_mil_evolution(snapshots, path: str, tau: float, title: str | None = None) -> str:
    """Figure A1: P(x;k) and the patch-similarity distributions over training.

    Args:
      snapshots: list (by step) of dicts with
        'step' int,
        'pair_sims' {pair type: 1-D array of patch-pair similarities},
        'weights' (M,) P(x;k) of the example fake image, k = 1..M,
        'weights_mean' (M,) P(x;k) averaged over the fake images of the batch,
        'gf_mass' float, P-weighted share of genuine-fake pairs among the M lowest,
        optional 'gf_chance' float, the share of genuine-fake pairs among all pairs.
      path: PNG output path.  tau: the temperature (for the caption).
    Top row: one histogram of the similarities per pair type for each snapshot.
    Bottom row: P(x;k) of the example image at every snapshot, the batch mean P(x;k) (log
    scale), and the mean similarity of each pair type and the genuine-fake share of P.
    """
    plt = _pyplot()
    n = len(snapshots)
    fig = plt.figure(figsize=(max(10, 2.6 * n), 6.4))
    grid = fig.add_gridspec(2, max(n, 3))
    bins = np.linspace(-1, 1, 51)
    for i, snap in enumerate(snapshots):
        ax = fig.add_subplot(grid[0, i])
        for name in PAIR_TYPES:
            values = np.asarray(snap["pair_sims"].get(name, []))
            if values.size:
                ax.hist(values, bins=bins, density=True, histtype="stepfilled", alpha=0.35,
                        color=_PAIR_COLOURS[name], label=f"{name} ({values.size})")
        ax.set_title(f"step {snap['step']}", fontsize=9)
        ax.set_xlabel("patch similarity", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.set_ylabel("density", fontsize=8)
            ax.legend(fontsize=6, loc="upper left")
    cmap = plt.get_cmap("viridis")
    colours = [cmap(i / max(1, n - 1)) for i in range(n)]
    ax = fig.add_subplot(grid[1, 0])
    for snap, colour in zip(snapshots, colours):
        w = np.asarray(snap["weights"])
        ax.plot(np.arange(1, w.size + 1), w, color=colour, label=f"step {snap['step']}")
    ax.set_xlabel("rank k (ascending similarity)", fontsize=8)
    ax.set_ylabel("P(x;k)", fontsize=8)
    ax.set_title("one fake image", fontsize=9)
    ax.legend(fontsize=6)
    ax.tick_params(labelsize=7)
    ax = fig.add_subplot(grid[1, 1])
    for snap, colour in zip(snapshots, colours):
        w = np.asarray(snap["weights_mean"])
        ax.semilogy(np.arange(1, w.size + 1), w, color=colour)
    ax.set_xlabel("rank k", fontsize=8)
    ax.set_title("batch mean P(x;k), log scale", fontsize=9)
    ax.tick_params(labelsize=7)
    ax = fig.add_subplot(grid[1, 2])
    steps = [s["step"] for s in snapshots]
    for name in PAIR_TYPES:
        means = [float(np.mean(s["pair_sims"][name])) if len(s["pair_sims"].get(name, []))
                 else np.nan for s in snapshots]
        ax.plot(steps, means, marker="o", color=_PAIR_COLOURS[name], label=f"mean {name}")
    ax.plot(steps, [s["gf_mass"] for s in snapshots], marker="s", color="k", linestyle="--",
            label="genuine-fake share of P")
    if "gf_chance" in snapshots[0]:
        ax.plot(steps, [s["gf_chance"] for s in snapshots], color="k", linestyle=":",
                label="genuine-fake share of all pairs")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=6)
    ax.tick_params(labelsize=7)
    fig.suptitle(title or f"contrastive MIL over training (tau = {tau})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
