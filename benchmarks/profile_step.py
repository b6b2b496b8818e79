"""Where a training step's device time goes: cmil_jax (jax.profiler) next to its PyTorch twin.

    python -m benchmarks.profile_step --backbone resnet50 --image-size 256 --batch 128 \
        --dtype bfloat16 [--steps 5] [--warmup 3] [--kernels auto|xla|matmul|onednn] \
        [--variant SPEC] [--copy-gbs GB/s] [--matmul-tflops TFLOP/s] \
        [--no-torch] [--top 25] [--out DIR]

Traces ``--steps`` steps of the jitted train step of ``cmil_jax.train.setup`` for the config
that ``benchmarks.throughput`` builds (after compilation and ``--warmup`` steps), reads the
trace back with ``jax.profiler.ProfileData`` and sums the kernels' durations: on a GPU the
kernels of the device plane's streams, on the CPU the XLA thunks of the host plane (all threads
added up, so on several cores the sum exceeds the wall time). Then the twin's eager train step under
``torch.profiler`` (device kernels on a GPU, operators on the CPU). Prints, per framework, the
wall time per step, the summed kernel time per step, the top kernels and the time per kind of
kernel (convolution, matrix product, batch norm, fused elementwise/reduction, copies, ...),
then the JAX step's time per kind against the step's floor (benchmarks/step_floor.py: FLOPs
and minimum bytes per kind of kernel, at ``--copy-gbs`` and ``--matmul-tflops``, the device's
measured copy bandwidth and matrix rate); writes the tables to ``DIR/profile_<backbone>.md``,
the figures to ``DIR/profile_<backbone>.json`` (and the JAX trace under ``DIR/jax_trace`` with
``--keep-trace``). ``--variant SPEC`` profiles the train step of a ``benchmarks.throughput``
``--jax-variant`` (runtime fields such as ``batchnorm=pallas``, raw XLA options) instead.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import tempfile

from benchmarks import step_floor, throughput

# Kind of a kernel or thunk, from its name (first match wins; lower-case substrings).
KINDS = (
    ("YNNPACK fusion (XLA:CPU convolutions, products)", ("ynn_fusion",)),
    ("batch norm", ("fused_bn", "bn_fw", "bn_bw", "batch_norm", "batchnorm")),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "wgrad", "dgrad", "fprop")),
    ("matrix product", ("gemm", "cublas", "cutlass", "nvjet", "matmul", "dot", "aten::mm",
                        "addmm", "bmm")),
    ("copy/transpose", ("memcpy", "memset", "copy", "transpose")),
    ("reduction", ("reduce", "input_")),
    ("elementwise/fusion", ("fusion", "loop_", "triton", "elementwise", "vectorized", "add", "mul")),
)


# Lines of a device plane that repeat the kernels' time under other names.
DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "Framework Ops", "Framework Name Scope",
                 "Source code", "XLA TraceMe", "Launch Stats")


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def kinds_per_step(durations: dict[str, list[float]], steps: int) -> dict[str, float]:
    """durations: kernel name -> list of ms. -> kind -> ms per step."""
    kinds = collections.Counter()
    for name, ds in durations.items():
        kinds[kind_of(name)] += sum(ds) / steps
    return dict(kinds)


def summarize(durations: dict[str, list[float]], steps: int, top: int) -> tuple[float, list[str]]:
    """durations: kernel name -> list of ms. -> (ms per step, markdown lines)."""
    total = sum(sum(v) for v in durations.values())
    per_step = total / steps
    lines = ["| kernel | ms/step | % | calls/step |", "|---|---:|---:|---:|"]
    ranked = sorted(durations.items(), key=lambda kv: -sum(kv[1]))
    for name, ds in ranked[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        short = short.replace("|", "/")
        lines.append(
            f"| `{short}` | {sum(ds) / steps:.3f} | {100 * sum(ds) / max(total, 1e-9):.1f} | "
            f"{len(ds) / steps:.1f} |"
        )
    kinds = collections.Counter()
    for name, ds in durations.items():
        kinds[kind_of(name)] += sum(ds)
    lines += ["", "| kind | ms/step | % |", "|---|---:|---:|"]
    for kind, ms in kinds.most_common():
        lines.append(f"| {kind} | {ms / steps:.3f} | {100 * ms / max(total, 1e-9):.1f} |")
    return per_step, lines


def jax_kernel_times(trace_dir: str) -> tuple[dict[str, list[float]], str]:
    """Kernel (GPU) or thunk (CPU) name -> durations in ms, from the newest xplane.pb."""
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(paths[-1])
    out = collections.defaultdict(list)
    gpu = [p for p in data.planes if p.name.startswith("/device:GPU")]
    if gpu:
        for plane in gpu:
            lines = list(plane.lines)
            streams = [ln for ln in lines if "stream" in ln.name.lower()] or [
                ln for ln in lines if ln.name not in DERIVED_LINES
            ]
            for line in streams:
                for ev in line.events:
                    out[ev.name].append(ev.duration_ns / 1e6)
        return out, "GPU kernels (device plane streams)"
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name == "python" or "XLA" not in line.name and "Eigen" not in line.name:
                continue
            for ev in line.events:
                if not ev.name.startswith("ThunkExecutor"):  # wrappers around the thunks
                    out[ev.name].append(ev.duration_ns / 1e6)
    return out, "XLA:CPU thunks (host threads, summed)"


def ms_per_step(runner, steps: int) -> float:
    """Wall ms per step over one throughput.Runner window (device synchronised around it)."""
    return runner.window(steps) / steps * 1e3


def _section(what, wall, wall_untraced, times, args) -> dict:
    """One framework's profile: wall ms per step traced and untraced, kernel times per step."""
    per_step, lines = summarize(times, args.steps, args.top)
    return {
        "what": what,
        "wall_ms_per_step_traced": wall,
        "wall_ms_per_step": wall_untraced,
        "kernel_ms_per_step": per_step,
        "kinds_ms_per_step": kinds_per_step(times, args.steps),
        "lines": lines,
    }


def profile_jax(args, cfg, batch_np, work_dir: str) -> dict:
    import jax

    runners, host_vars, extra = throughput.jax_runners(cfg, args, batch_np, {"jax_train"})
    r = runners[f"jax_train@{args.variant}" if args.variant else "jax_train"]
    r.first(args.warmup)
    trace_dir = os.path.join(work_dir, "jax_trace")
    jax.profiler.start_trace(trace_dir)
    wall = ms_per_step(r, args.steps)
    jax.profiler.stop_trace()
    wall_untraced = ms_per_step(r, args.steps)  # the profiler's overhead
    times, what = jax_kernel_times(trace_dir)
    return {
        **_section(what, wall, wall_untraced, times, args),
        "trace_dir": trace_dir,
        "host_vars": host_vars,
        "runtime": (extra["variant_runtimes"][args.variant] if args.variant
                    else extra["run"].runtime.describe()),
    }


def profile_torch(args, cfg, batch_np, flax_vars) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    runners, _ = throughput.torch_runners(cfg, args, batch_np, flax_vars, {"torch_eager_train"})
    r = runners["torch_eager_train"]
    r.first(args.warmup)
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        wall = ms_per_step(r, args.steps)
    wall_untraced = ms_per_step(r, args.steps)
    times = collections.defaultdict(list)
    if cuda:
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                times[ev.name].append(ev.time_range.elapsed_us() / 1e3)
        what = "CUDA kernels"
    else:
        for ev in prof.key_averages():
            if ev.self_cpu_time_total > 0 and ev.key.startswith("aten::"):
                times[ev.key] = [ev.self_cpu_time_total / 1e3 / max(ev.count, 1)] * ev.count
        what = "aten operators, self CPU time (all threads of one op counted once)"
    return _section(what, wall, wall_untraced, times, args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--backbone-width", type=int, default=None)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--steps", type=int, default=5, help="traced steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=25, help="kernels listed per framework")
    p.add_argument("--no-torch", action="store_true", help="profile the JAX step only")
    p.add_argument(
        "--kernels",
        choices=throughput.runtime_lib.KERNELS,
        default=None,
        help="runtime.kernels: the JAX ResNet's layer set (default: the config's, auto)",
    )
    p.add_argument("--variant", default=None, metavar="SPEC",
                   help="profile this benchmarks.throughput --jax-variant's train step")
    p.add_argument("--copy-gbs", type=float, default=4300.0,
                   help="copy bandwidth for the floor, GB/s read + written (default: KINDS.md's "
                   "H200 figure; gpu.sh passes the one it measures)")
    p.add_argument("--matmul-tflops", type=float, default=790.0,
                   help="dense matrix rate for the floor, TFLOP/s (default: an H200's in bf16)")
    p.add_argument("--keep-trace", action="store_true", help="keep the JAX trace under --out")
    p.add_argument("--out", default=None, help="write profile_<backbone>.md here")
    args = p.parse_args(argv)
    # Fields that throughput.make_config / jax_runners / torch_runners read.
    args.malloc = None
    args.jax_variant = [throughput.parse_variant(args.variant)] if args.variant else []
    args.torch_threads = None
    args.torch_alt_threads = None
    args.torch_compile_mode = None
    args.no_compile = True
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    cfg = throughput.make_config(args)
    throughput.runtime_lib.apply_host_memory(cfg)  # before JAX starts, as cmil_jax.main does
    import jax

    batch_np = throughput.host_batch(args.batch, args.image_size)
    work = tempfile.mkdtemp(prefix="cmil_profile_")
    dev = jax.devices()[0]
    title = (
        f"{args.backbone} {args.image_size}px batch {args.batch} {args.dtype}, "
        f"{args.steps} traced steps; JAX on {dev.platform}: {dev.device_kind}"
    )
    throughput.log("profiling the JAX train step ...")
    jax_res = profile_jax(args, cfg, batch_np, work)
    sections = [("cmil_jax train step", jax_res)]
    if not args.no_torch:
        throughput.log("profiling the PyTorch twin's eager train step ...")
        twin = profile_torch(args, cfg, batch_np, jax_res.pop("host_vars"))
        sections.append(("PyTorch twin eager train step", twin))
    described = jax_res["runtime"]
    title += f", layers '{described['kernels']}'" + (
        f", XLA options {described['compiler_options']}" if described["compiler_options"] else "")
    out = [f"## Step profile: {title}", ""]
    for name, res in sections:
        out += [
            f"### {name}: {res['what']}",
            "",
            f"wall {res['wall_ms_per_step']:.2f} ms/step untraced "
            f"({res['wall_ms_per_step_traced']:.2f} traced); summed kernel time "
            f"{res['kernel_ms_per_step']:.2f} ms/step",
            "",
            *res["lines"],
            "",
        ]
    floor = step_floor.floor_for(cfg, args.batch, args.dtype, args.copy_gbs, args.matmul_tflops)
    out += [
        f"### cmil_jax train step against its floor (benchmarks/step_floor.py; at "
        f"{args.copy_gbs:.0f} GB/s and {args.matmul_tflops:.0f} TFLOP/s)",
        "",
        *step_floor.compare(floor, jax_res["kinds_ms_per_step"]),
        "",
        f"floor {floor['total']['ms']:.2f} ms/step = "
        f"{args.batch / floor['total']['ms'] * 1e3:.0f} images/s; measured wall "
        f"{jax_res['wall_ms_per_step']:.2f} ms/step = "
        f"{args.batch / jax_res['wall_ms_per_step'] * 1e3:.0f} images/s",
        "",
    ]
    text = "\n".join(out)
    print(text, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"profile_{args.backbone}.md"), "w") as f:
            f.write(text + "\n")
        figures = {name: {k: v for k, v in res.items()
                          if k not in ("lines", "host_vars", "trace_dir")}
                   for name, res in sections}
        with open(os.path.join(args.out, f"profile_{args.backbone}.json"), "w") as f:
            json.dump({"title": title, "variant": args.variant, "sections": figures,
                       "floor": floor}, f, indent=1)
        if args.keep_trace:
            shutil.copytree(jax_res["trace_dir"], os.path.join(args.out, "jax_trace"),
                            dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
