"""Figure A1 of the supplementary: how P(x;k) and the patch similarities evolve over training.

    python tools/figure_a1.py --workdir runs/demo [--out FILE]   # default <workdir>/figure_a1.png

Uses every train-state checkpoint kept in <workdir>/checkpoints (train with e.g.
--config.train.checkpoint_every=100 --config.train.keep_checkpoints=7 to keep several) plus
step 0, which is re-created from the config's seed exactly as training starts. On a fixed
batch of manipulated test images (the first --num_images with a non-empty mask) it labels each
patch genuine (mask covers < 5 % of its cell) or fake (> 50 %; patches in between are left
out) and computes, per snapshot:

* the cosine similarities S_ij = e_i . e_j of all patch pairs, by pair type
  (genuine-genuine, genuine-fake, fake-fake);
* P(x;k) = softmax_k(-s_(k) / tau) over the M lowest similarities (losses.mil_rank_weights),
  for one example image and averaged over the batch;
* the share of P(x;k) that falls on genuine-fake pairs, against their share of all pairs.

The supplementary reports that genuine-fake similarities move towards 0 while the others stay
high, and P(x;k) concentrates on the lowest ranks.
"""

import argparse
import os
import sys

import cv2
import jax
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmil_jax import checkpoint
from cmil_jax import losses
from cmil_jax import predict
from cmil_jax import train
from cmil_jax import viz
from cmil_jax.data import inputs

GENUINE_MAX, FAKE_MIN = 0.05, 0.5  # mask fraction of a patch's cell
PAIR_CODES = {(0, 0): "genuine-genuine", (0, 1): "genuine-fake", (1, 0): "genuine-fake",
              (1, 1): "fake-fake"}


def patch_labels(masks, grid):
    """(B, H, W) uint8 masks -> (B, N) int: 0 genuine, 1 fake, -1 ambiguous (row-major)."""
    out = []
    for mask in masks:
        frac = cv2.resize((mask > 127).astype(np.float32), (grid[1], grid[0]),
                          interpolation=cv2.INTER_AREA).reshape(-1)
        out.append(np.where(frac < GENUINE_MAX, 0, np.where(frac > FAKE_MIN, 1, -1)))
    return np.stack(out)


def snapshot(step, emb, plabels, tau, num_lowest, example):
    """Figure data of one checkpoint (see viz.plot_mil_evolution)."""
    sims = np.asarray(losses.pairwise_similarities(emb))  # (B, N, N)
    lowest = np.asarray(losses.lowest_similarities(emb, num_lowest))  # (B, M)
    weights = np.asarray(losses.mil_rank_weights(lowest, tau))
    n, m = sims.shape[1], lowest.shape[1]
    rows, cols = np.triu_indices(n, k=1)
    pair_sims = {name: [] for name in viz.PAIR_TYPES}
    gf_mass, gf_chance = [], []
    for b in range(sims.shape[0]):
        upper = sims[b, rows, cols]
        la, lb = plabels[b, rows], plabels[b, cols]
        known = (la >= 0) & (lb >= 0)
        for (a, c), name in PAIR_CODES.items():
            if a <= c:
                pair_sims[name].append(upper[known & (np.minimum(la, lb) == a)
                                             & (np.maximum(la, lb) == c)])
        order = np.argsort(upper, kind="stable")[:m]  # the M lowest pairs, ascending
        np.testing.assert_allclose(upper[order], lowest[b], atol=1e-4)
        is_gf = (la[order] >= 0) & (lb[order] >= 0) & (la[order] != lb[order])
        gf_mass.append(float(np.sum(weights[b] * is_gf)))
        gf_chance.append(float(np.mean((la >= 0) & (lb >= 0) & (la != lb))))
    return {
        "step": int(step),
        "pair_sims": {k: np.concatenate(v) for k, v in pair_sims.items()},
        "weights": weights[example],
        "weights_mean": weights.mean(axis=0),
        "gf_mass": float(np.mean(gf_mass)),
        "gf_chance": float(np.mean(gf_chance)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="training run (its config.json and checkpoints are read)")
    parser.add_argument("--num_images", type=int, default=32,
                        help="manipulated test images in the fixed batch")
    parser.add_argument("--max_snapshots", type=int, default=5,
                        help="checkpoints shown (spread over the kept ones, step 0 included)")
    parser.add_argument("--split", default="test", help="split the images come from")
    parser.add_argument("--out", default=None,
                        help="output PNG (None: <workdir>/figure_a1.png)")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(args.workdir, "figure_a1.png")

    cfg = predict.load_config(args.workdir)
    run = train.setup(cfg, max(1, cfg.train.num_steps))
    model, init_state, abstract = run.model, run.init_state(), run.abstract_state
    manager = checkpoint.make_manager(args.workdir, keep=1000)
    steps = sorted(manager.all_steps())
    if steps and len(steps) + 1 > args.max_snapshots:  # the steps nearest to even spacing
        targets = np.linspace(0, steps[-1], args.max_snapshots)[1:]
        steps = sorted({min(steps, key=lambda s, t=t: abs(s - t)) for t in targets})
    print(f"snapshots at steps {[0] + steps}", flush=True)

    source = inputs.open_splits(cfg, args.workdir, (args.split,))[args.split]
    fakes = np.flatnonzero(source.labels().any(axis=1))
    exs = []
    for i in fakes:
        ex = source[int(i)]
        if (ex["mask"] > 127).any():
            exs.append(ex)
        if len(exs) == args.num_images:
            break
    images = np.stack([e["image"] for e in exs])
    masks = np.stack([e["mask"] for e in exs])
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    num_lowest = cfg.loss.num_lowest or None

    snapshots, plabels, example = [], None, 0
    for step in [0] + steps:
        if step == 0:
            state = init_state
        else:
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            state = restored["state"]
        out = apply(state.variables(), images)
        if plabels is None:
            grid = out["feature_map"].shape[1:3]
            plabels = patch_labels(masks, grid)
            # The example: the image with the most fake patches that still has genuine ones.
            counts = [(np.sum(p == 1) if np.any(p == 0) else -1) for p in plabels]
            example = int(np.argmax(counts))
        snap = snapshot(step, out["mil_emb"], plabels, cfg.loss.tau, num_lowest, example)
        means = {k: f"{np.mean(v):.3f}" for k, v in snap["pair_sims"].items() if len(v)}
        print(f"step {step}: mean similarity {means}; genuine-fake share of P(x;k) "
              f"{snap['gf_mass']:.3f} (share of all pairs {snap['gf_chance']:.3f}); P(x;1) of the example {snap['weights'][0]:.3f}",
              flush=True)
        snapshots.append(snap)
    manager.close()
    viz.plot_mil_evolution(
        snapshots, args.out, cfg.loss.tau,
        title=f"Contrastive MIL over training on {len(exs)} fixed manipulated test images "
              f"({cfg.data.subset}, tau = {cfg.loss.tau}, M = "
              f"{snapshots[0]['weights'].size} lowest of the patch-pair similarities)")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
