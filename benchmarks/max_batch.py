"""The largest training batch that fits on one device, and the images/s at it.

    python -m benchmarks.max_batch --framework jax|torch --backbone resnet50 --image-size 256 \
        --dtype bfloat16 [--kernels xla] [--variant SPEC] [--budget-s 100] [--limit-gb G] \
        [--json OUT]

JAX: the jitted train step of ``cmil_jax.train.setup`` (``--variant``: a benchmarks.throughput
``--jax-variant``, e.g. ``bn_pallas``) is compiled at batch ``--start`` and XLA's memory
analysis of the compiled step (arguments + outputs - donated aliases + temporaries) split into
a part that does not grow with the batch (the train state) and a part per image; the batch
predicted to fill ``--fill`` of the device's memory limit (the allocator's ``bytes_limit``, or
``--limit-gb``), rounded down to a multiple of 8, is compiled and checked by the same analysis
and then run; a batch that does not fit (by the analysis or by an out-of-memory error) is
shrunk by 10% and tried again while the time budget lasts.
torch (the twin, eager; CUDA only): two steps at batch --start and at twice it give the peak
allocated memory per image and the rest; the predicted batch is run the same way, shrinking
by 10% on an out-of-memory error. torch.compile is not timed here (a new shape recompiles,
about a minute).

At the largest batch that ran: images/s over ``--steps`` steps after 2 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks import throughput


def _round8(n: float) -> int:
    return max(8, int(n) // 8 * 8)


def _jax_bytes(memory) -> dict:
    """CompiledMemoryStats -> the figures used (bytes)."""
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {f: int(getattr(memory, f, 0) or 0) for f in fields}
    out["total"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                    - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    return out


def _save(args, result: dict) -> None:
    """Writes what is known so far (a run stopped at its time limit still leaves it)."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


def run_jax(args, deadline) -> dict:
    import jax

    from cmil_jax import parallel, train

    cfg = throughput.make_config(args)
    variant = throughput.parse_variant(args.variant) if args.variant else None
    if variant:
        cfg = throughput.variant_config(cfg, variant)
    options = (variant.xla_options if variant else None) or None
    run = train.setup(cfg, throughput.TOTAL_STEPS)
    state = run.init_state()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    del state  # each attempt starts from a fresh one (the step donates it)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    limit = args.limit_gb * 1e9 if args.limit_gb else stats.get("bytes_limit")
    if not limit:
        return {"error": "no memory limit known on this device: give --limit-gb"}
    tried = []

    def compiled(b):
        shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=run.batch_sharding)
                  for k, v in throughput.host_batch(b, args.image_size).items()}
        t = time.perf_counter()
        exe = run.train_step.lower(abstract, shapes).compile(compiler_options=options)
        return exe, _jax_bytes(exe.memory_analysis()), time.perf_counter() - t

    result = {"framework": "jax", "device": f"{dev.platform}: {dev.device_kind}",
              "variant": args.variant, "limit_bytes": limit, "state_bytes": state_bytes,
              "tried": tried, "max_batch": None, "images_per_sec": None}
    exe, base, compile_s = compiled(args.start)
    tried.append({"batch": args.start, "memory": base, "compile_s": compile_s})
    per_image = (base["total"] - state_bytes) / args.start
    result["per_image_bytes_at_start"] = per_image
    _save(args, result)
    b = _round8((args.fill * limit - state_bytes) / per_image)
    while time.monotonic() < deadline:
        row = {"batch": b, "result": "compiling"}
        tried.append(row)
        _save(args, result)
        exe, mem, compile_s = compiled(b)
        row.update(memory=mem, compile_s=compile_s)
        if mem["total"] > limit:
            row["result"] = "over the limit by the memory analysis"
            b = _round8(b * 0.9)
            continue
        try:
            batch = parallel.to_global(throughput.host_batch(b, args.image_size, seed=1),
                                       run.batch_sharding)
            s = run.init_state()
            for _ in range(2):
                s, m = exe(s, batch)
            jax.block_until_ready(s)
            t = time.perf_counter()
            for _ in range(args.steps):
                s, m = exe(s, batch)
            jax.block_until_ready((s, m))
            dt = time.perf_counter() - t
            row["result"] = "trained"
            row["images_per_sec"] = args.steps * b / dt
            row["loss"] = float(m["loss"])
            result.update(max_batch=b, images_per_sec=row["images_per_sec"])
            break
        except Exception as e:  # out of memory at run time: smaller
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            row["result"] = f"out of memory: {str(e)[:300]}"
            b = _round8(b * 0.9)
    return result


def run_torch(args, deadline) -> dict:
    import torch

    from benchmarks import torch_twin as tt
    from cmil_jax import losses

    if not torch.cuda.is_available():
        return {"framework": "torch", "error": "the twin's memory is measured on CUDA only"}
    torch.backends.cudnn.benchmark = True
    cfg = throughput.make_config(args)
    dev = torch.device("cuda")
    model = tt.model_from_config(cfg.model, args.image_size).to(
        dev, memory_format=torch.channels_last)
    opt, sched = tt.make_optimizer(model, cfg.train, throughput.TOTAL_STEPS)
    amp = torch.bfloat16 if args.dtype == "bfloat16" else None
    step = tt.make_train_step(model, opt, sched, losses.loss_kwargs(cfg.loss), amp_dtype=amp)
    total = torch.cuda.mem_get_info()[1]
    tried = []

    def steps(b, n_timed):
        batch = {k: torch.from_numpy(v).to(dev)
                 for k, v in throughput.host_batch(b, args.image_size, seed=1).items()}
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            m = step(batch)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n_timed):
            m = step(batch)
        torch.cuda.synchronize()
        rate = n_timed * b / (time.perf_counter() - t) if n_timed else None
        return torch.cuda.max_memory_allocated(), rate, float(m["loss"])

    result = {"framework": "torch eager", "device": torch.cuda.get_device_name(),
              "limit_bytes": total, "tried": tried, "max_batch": None, "images_per_sec": None}
    peaks = {}
    for b in (args.start, 2 * args.start):
        peaks[b], _, _ = steps(b, 0)
        tried.append({"batch": b, "peak_bytes": peaks[b], "result": "trained"})
        _save(args, result)
    per_image = (peaks[2 * args.start] - peaks[args.start]) / args.start
    fixed = peaks[args.start] - per_image * args.start
    result.update(fixed_bytes=fixed, per_image_bytes=per_image)
    b = _round8((args.fill * total - fixed) / per_image)
    while time.monotonic() < deadline:
        row = {"batch": b, "result": "running"}
        tried.append(row)
        _save(args, result)
        try:
            row["peak_bytes"], row["images_per_sec"], row["loss"] = steps(b, args.steps)
            row["result"] = "trained"
            result.update(max_batch=b, images_per_sec=row["images_per_sec"])
            break
        except torch.cuda.OutOfMemoryError as e:
            row["result"] = f"out of memory: {str(e)[:300]}"
            torch.cuda.empty_cache()
            b = _round8(b * 0.9)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", choices=("jax", "torch"), required=True)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--backbone-width", type=int, default=None)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--kernels", default=None, help="runtime.kernels (default: the config's)")
    p.add_argument("--variant", default=None, help="a benchmarks.throughput --jax-variant")
    p.add_argument("--start", type=int, default=128, help="the batch the prediction starts from")
    p.add_argument("--fill", type=float, default=0.95, help="fraction of the limit to fill")
    p.add_argument("--limit-gb", type=float, default=None)
    p.add_argument("--steps", type=int, default=5, help="timed steps at the largest batch")
    p.add_argument("--budget-s", type=float, default=100.0,
                   help="no new attempt starts after this many seconds")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.malloc = None
    deadline = time.monotonic() + args.budget_s
    run = run_jax if args.framework == "jax" else run_torch
    result = run(args, deadline)
    result.update(backbone=args.backbone, image_size=args.image_size, dtype=args.dtype,
                  command=" ".join([os.path.basename(sys.executable), "-m",
                                    "benchmarks.max_batch"] + sys.argv[1:]))
    _save(args, result)
    if "error" in result:
        print(f"{args.framework}: {result['error']}", flush=True)
    else:
        rate = result["images_per_sec"]
        print(f"{result['framework']}{' ' + args.variant if args.variant else ''}: largest batch "
              f"that trained {result['max_batch']} "
              f"({'' if rate is None else f'{rate:.1f} images/s; '}"
              f"limit {result['limit_bytes'] / 1e9:.1f} GB; tried "
              + ", ".join(f"{t['batch']} {t.get('result', '')[:20]}" for t in result["tried"])
              + ")", flush=True)


if __name__ == "__main__":
    main()
