"""Plots written into <workdir>/plots/."""

import json
import os


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
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
