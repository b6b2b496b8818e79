"""How far a 4-device run of the triples recipe drifts from the 1-device run, and why.

    python -m benchmarks.device_count_drift [--steps 30] [--kernels matmul,onednn,xla] \
        [--perturb 1e-7] [--float64] [--json OUT] [--config configs/seqattr.py:demo] \
        [--config.x=y ...]

One process with 4 virtual CPU devices trains the same model from the same initial state on
the same batches (drawn once from the real triples pipeline) three ways, for each ResNet layer
set in --kernels:
  one       a mesh of 1 device (the reference);
  four      a mesh of 4 devices (batch split in 4, state replicated): the same program up to
            the order in which XLA adds partial sums (BatchNorm statistics, gradients);
  perturbed a mesh of 1 device whose initial parameters are multiplied by (1 + e * u), u
            uniform in [-1, 1], e = --perturb (about one float32 rounding, 6e-8 relative):
            the same program started from a state that differs by rounding noise alone.
Per step it prints the largest relative difference over parameter leaves (|a - b| / |b|,
Frobenius norms; the attention key bias left out: its gradient is zero in exact arithmetic,
so Adam turns rounding noise there into lr-sized steps) of `four` and `perturbed` against
`one`, and the loss. If the device count changed anything but the order of additions (data
order, which rows meet in a triple, BatchNorm over another set of rows, a random stream that
depends on the device count), `four` would differ from `one` by far more than rounding from
the first step on; if it is reassociation only, `four` starts at rounding level and then grows
as the rounding noise of `perturbed` grows: training amplifies any rounding difference, and
the two curves have the same shape.

--float64 runs the same comparison with the whole model, losses and optimizer in float64
(jax_enable_x64; XLA's own convolutions, `--kernels xla`, the only layers that take float64):
the same programs, the same data, rounding 2^29 times finer. A defect would survive that; a
difference made by the order of additions shrinks by about that factor.

The 4 virtual devices share this machine's cores; the batch is the recipe's (tiny sizes by
default so that all three runs of every layer set take a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)

if "--float64" in sys.argv:
    jax.config.update("jax_enable_x64", True)
import numpy as np  # noqa: E402

from cmil_jax import parallel, runtime as runtime_lib, train  # noqa: E402

# Small enough for 2 cores, the recipe's structure otherwise (triples, SBI, joint losses).
TINY = [
    "--config.data.synthetic.num_train=120",
    "--config.data.synthetic.num_val=40",
    "--config.data.synthetic.num_test=40",
    "--config.data.image_size=64",
    "--config.data.num_workers=0",
    "--config.model.backbone_width=8",
    "--config.model.width=48",
    "--config.train.batch_size=24",
]
KEY_BIAS = "['key']['bias']"


def load_config(spec: str, overrides) -> "ml_collections.ConfigDict":
    """configs/x.py[:arg] with --config.a.b=value overrides (cast to the field's type)."""
    import importlib.util  # pylint: disable=import-outside-toplevel

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("drift_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    for item in overrides:
        field, _, value = item.removeprefix("--config.").partition("=")
        node = cfg
        *parents, leaf = field.split(".")
        for part in parents:
            node = node[part]
        old = node[leaf]
        node[leaf] = (value.lower() in ("1", "true") if isinstance(old, bool)
                      else type(old)(value) if old is not None else value)
    return cfg


def relative_difference(a, b, skip: str = KEY_BIAS) -> tuple[float, str]:
    """(max over leaves of |a - b| / |b|, the path of that leaf), leaving out paths with `skip`."""
    worst, where = 0.0, ""
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        name = jax.tree_util.keystr(path)
        if skip and skip in name:
            continue
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        d = float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12))
        if d > worst:
            worst, where = d, name
    return worst, where


def draw_batches(cfg, steps: int, workdir: str) -> list[dict]:
    from cmil_jax.data import inputs  # pylint: disable=import-outside-toplevel

    data = inputs.open_splits(cfg, workdir, ("train",))
    it = inputs.train_iterator(cfg, data["train"])
    batches = [{k: np.array(v) for k, v in next(it).items()} for _ in range(steps)]
    it.close() if hasattr(it, "close") else None
    return batches


def train_run(cfg, runtime, devices, batches, init_params_fn=None) -> list[dict]:
    """Parameters (numpy) after each step and the losses, on a mesh of `devices`."""
    mesh = parallel.make_mesh(devices)
    run = train.setup(cfg, len(batches), mesh=mesh, runtime=runtime)
    state = run.init_state()
    if init_params_fn is not None:
        params = jax.device_put(init_params_fn(jax.device_get(state.params)),
                                run.state_shardings.params)
        state = state.replace(params=params)
    out = []
    for batch in batches:
        state, metrics = run.train_step(state, parallel.to_global(batch, run.batch_sharding))
        out.append({"params": jax.device_get(state.params),
                    "loss": float(jax.device_get(metrics["loss"]))})
    return out


def first_gradients(cfg, runtime, devices, batch):
    """Gradients of the loss at the initial state for `batch`, on a mesh of `devices`."""
    from cmil_jax import losses  # pylint: disable=import-outside-toplevel

    mesh = parallel.make_mesh(devices)
    run = train.setup(cfg, 1, mesh=mesh, runtime=runtime)
    state = run.init_state()
    kwargs = losses.loss_kwargs(cfg.loss)

    def loss_fn(params, batch):
        outputs, _ = run.model.apply({"params": params, "batch_stats": state.batch_stats},
                                     batch["image"], train=True, mutable=["batch_stats"])
        return losses.total_loss(outputs, batch, **kwargs)[0]

    grad = jax.jit(jax.grad(loss_fn), in_shardings=(run.state_shardings.params,
                                                     run.batch_sharding))
    return jax.device_get(grad(state.params, parallel.to_global(batch, run.batch_sharding)))


def gradient_table(one, four, top: int = 8) -> list[dict]:
    """Per leaf: |g4 - g1| / |g1| and |g1| / (largest leaf's |g1|), the `top` worst first."""
    rows = []
    largest = max(float(np.linalg.norm(g)) for g in jax.tree.leaves(one))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(one)[0], jax.tree.leaves(four)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        norm = float(np.linalg.norm(a))
        rows.append({"leaf": jax.tree_util.keystr(path), "norm": norm / largest,
                     "difference": float(np.linalg.norm(b - a) / max(norm, 1e-300))})
    return sorted(rows, key=lambda r: -r["difference"])[:top]


def perturb(epsilon: float, seed: int = 1):
    def fn(params):
        rng = np.random.default_rng(seed)
        return jax.tree.map(
            lambda p: (p * (1 + epsilon * rng.uniform(-1, 1, p.shape))).astype(p.dtype), params)
    return fn


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--kernels", default="matmul,onednn,xla")
    parser.add_argument("--perturb", type=float, default=1e-7)
    parser.add_argument("--config", default="configs/seqattr.py:demo")
    parser.add_argument("--float64", action="store_true",
                        help="model, losses and optimizer in float64 (with --kernels xla)")
    parser.add_argument("--json", default="")
    args, overrides = parser.parse_known_args(argv)
    if args.float64 and args.kernels != "xla":
        parser.error("--float64 needs --kernels xla (the matmul and oneDNN layers are float32)")
    if len(jax.devices()) < 4:
        sys.exit("needs 4 devices: run in a fresh process (XLA_FLAGS is set at import)")
    devices = jax.devices()[:4]
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for kernels in args.kernels.split(","):
            cfg = load_config(args.config, [*TINY, *overrides,
                                             f"--config.runtime.kernels={kernels}"])
            if args.float64:
                cfg.model.dtype = "float64"
            runtime = runtime_lib.resolve(cfg)
            batches = draw_batches(cfg, args.steps, workdir)
            grads = gradient_table(first_gradients(cfg, runtime, devices[:1], batches[0]),
                                   first_gradients(cfg, runtime, devices, batches[0]))
            print(f"\nlayers {runtime.layers.name!r}, {cfg.model.dtype}: gradients of the first "
                  "batch, 4 devices against 1, the leaves that differ most")
            print(f"{'relative difference':>19} {'norm / largest':>14}  leaf")
            for r in grads:
                print(f"{r['difference']:19.2e} {r['norm']:14.2e}  {r['leaf']}")
            one = train_run(cfg, runtime, devices[:1], batches)
            four = train_run(cfg, runtime, devices, batches)
            perturbed = train_run(cfg, runtime, devices[:1], batches, perturb(args.perturb))
            rows = []
            print(f"\nlayers {runtime.layers.name!r}, {cfg.model.dtype}, {args.steps} steps, batch "
                  f"{batches[0]['image'].shape[0]} images "
                  f"(relative difference to the 1-device run, worst parameter leaf)")
            print(f"{'step':>4} {'4 devices':>10} {'perturbed':>10} {'loss':>9}  leaf (4 devices)")
            for step, (a, b, c) in enumerate(zip(one, four, perturbed), start=1):
                d4, leaf = relative_difference(b["params"], a["params"])
                dp, _ = relative_difference(c["params"], a["params"])
                rows.append({"step": step, "four": d4, "perturbed": dp, "leaf": leaf,
                             "loss_one": a["loss"], "loss_four": b["loss"]})
                print(f"{step:>4} {d4:10.2e} {dp:10.2e} {a['loss']:9.4f}  {leaf}")
            results[runtime.layers.name] = {"steps": rows, "gradients": grads}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
