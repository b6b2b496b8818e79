"""Training and inference images/s: cmil_jax against its PyTorch twin, in one process.

    python -m benchmarks.throughput --backbone resnet50 --image-size 256 --batch 128 \
        --json OUT.json \
        [--dtype bfloat16|float32] [--steps N] [--warmup N] [--windows N] [--no-compile] \
        [--kernels auto|xla|matmul|onednn] [--batchnorm flax|jnp|pallas] \
        [--malloc auto|keep|default] [--deadline-s S] \
        [--no-infer] [--only RUNNER,...] \
        [--end-to-end [--e2e-data triples|single] [--e2e-workers N] [--e2e-format raw|png]] \
        [--jax-variant SPEC ...] [--torch-threads N] [--torch-alt-threads N]
    python -m benchmarks.throughput --report OUT.json ...      # markdown tables

The config is cmil_jax.config_base.base_config() (the paper recipe) with the backbone, its
width, the compute dtype, the image size and the runtime choices of the command line; the JAX
model, state and jitted steps are those of training, `cmil_jax.train.setup(cfg)`, and the
resolved runtime (ResNet layer set, XLA options) is recorded with the results.

What is timed (device-resident batch, the same uint8 images and labels for both frameworks):
  jax train        Setup.train_step (jit, donated state, AdamW of cmil_jax.optim): forward,
                   total_loss, backward, optimizer update, BatchNorm statistics.
  jax infer        Setup.eval_step (eval forward, probabilities, MIL fake probability, patch
                   similarity map).
  torch eager / torch compiled train and infer
                   benchmarks/torch_twin.py: the same model, losses and AdamW (fused on GPU,
                   foreach on CPU), channels_last, bf16 autocast for --dtype bfloat16;
                   "compiled" = torch.compile of forward + loss (train) or of the eval forward.
Each runner is compiled / warmed up first (its first call, minus one steady step, is reported
as compile time), then the runners take turns, window by window (``--windows`` rounds of
``--steps`` steps each, starting at a different runner each round), so that a change of load
on a shared machine hits all of them alike. The device is synchronised before and after each
window (block_until_ready / cuda.synchronize); figures are medians over the windows.

--end-to-end adds the rate of the real input pipeline feeding the same jitted step: the
built-in synthetic TFDS data set (cmil_jax.data.synthetic_dataset, records in --e2e-format,
raw pixels by default or PNG, built in a temporary directory at --image-size), read as
training reads it (cmil_jax.data.inputs: grain workers, SBI pseudo-fakes synthesised on the
host for the training triples, weak augmentation) through parallel.DevicePrefetcher, in windows
alternating with that step on one fixed device-resident batch of the same shape (the
device-only rate). It needs grain and TFDS.

Experiments, alternated with the rest: ``--jax-variant SPEC`` times the train step of another
runtime: SPEC is '+'-joined parts, each a preset (PRESETS: 'conv_xla', 'conv_matmul',
'conv_onednn' = runtime.kernels, 'ynn_dot' = runtime.xla_cpu_conv 'eigen', 'bn_jnp',
'bn_pallas' = runtime.batchnorm, and the raw XLA:CPU options of past experiments 'no_ynn',
'onednn_custom_call'), a runtime field ('kernels=matmul', 'batchnorm=pallas') or a raw XLA
option ('xla_cpu_enable_fast_math=true', 'xla_gpu_enable_triton_gemm=false'); e.g.
'conv_onednn+ynn_dot'. A variant that fails to compile is reported, not fatal; variants with raw
XLA options are compiled last (after torch.compile). Every JAX train runner's first step
starts from the same state on the same batch: "numerics" in the results gives each variant's
relative difference from jax_train's loss, loss terms, gradient norm and updated BatchNorm
statistics. ``--deadline-s`` skips compiles that would end past it and stops the windows there. ``--torch-alt-threads 1`` times each torch runner again with
torch.set_num_threads(1) during its windows. Besides images/s, each runner reports the process
CPU time per step, which a shared machine's load disturbs much less than wall time.
SIGTERM (e.g. from ``timeout``) stops the timing and reports the windows measured so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time

import numpy as np

from cmil_jax import runtime as runtime_lib  # before JAX: nothing here starts it

TOTAL_STEPS = 100_000  # length of the LR schedule (only its shape matters here)
RUNNERS = (
    "jax_train",
    "torch_eager_train",
    "torch_compiled_train",
    "jax_infer",
    "torch_eager_infer",
    "torch_compiled_infer",
)
# --deadline-s: what a first call may take (H100, ResNet-50 256 px: JAX train 39-42 s cold,
# torch.compile train 51-70 s, benchmarks/RESULTS.md), with a margin.
COMPILE_ESTIMATE_S = {"jax": 50.0, "torch": 80.0}
# Fields of the config's runtime section that a --jax-variant may set.
RUNTIME_FIELDS = ("kernels", "xla_cpu_conv", "batchnorm")
# --jax-variant presets: (runtime fields, raw XLA compiler options).
PRESETS = {
    "conv_xla": ({"kernels": "xla"}, {}),
    "conv_matmul": ({"kernels": "matmul"}, {}),
    "conv_onednn": ({"kernels": "onednn"}, {}),
    "ynn_dot": ({"xla_cpu_conv": "eigen"}, {}),  # YNNPACK for dots only, Eigen convolutions
    # runtime.batchnorm: the fused BatchNorm (+ add + ReLU) of runtime/fused_batchnorm.py.
    "bn_jnp": ({"batchnorm": "jnp"}, {}),
    "bn_pallas": ({"batchnorm": "pallas"}, {}),
    # Past experiments (RESULTS.md): XLA's own kernels for everything YNNPACK would fuse; and
    # oneDNN custom calls, with which jaxlib 0.10 compiles the identical program.
    "no_ynn": ({}, {"xla_cpu_experimental_ynn_fusion_type": ""}),
    "onednn_custom_call": ({}, {"xla_cpu_experimental_onednn_custom_call": True}),
}
# Not a preset: {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type":
# "LIBRARY_FUSION_TYPE_DOT"} aborts the process in the ResNet-50 step ("partition compile failed").


@dataclasses.dataclass(frozen=True)
class Variant:
    """A --jax-variant: runtime fields set on the config and raw XLA options added."""

    name: str
    runtime: dict
    xla_options: dict


def parse_variant(spec: str) -> Variant:
    """'conv_onednn+ynn_dot', 'kernels=matmul+xla_cpu_enable_fast_math=true', ... -> Variant."""
    runtime, options = {}, {}
    for part in spec.split("+"):
        if part in PRESETS:
            runtime.update(PRESETS[part][0])
            options.update(PRESETS[part][1])
        elif "=" in part:
            key, value = part.split("=", 1)
            if key in RUNTIME_FIELDS:
                runtime[key] = value
            else:
                options[key] = {"true": True, "false": False}.get(value.lower(), value)
        else:
            raise SystemExit(f"unknown --jax-variant part {part!r}; presets: {sorted(PRESETS)}, "
                             f"or FIELD=VALUE for a runtime field {RUNTIME_FIELDS} or XLA option")
    return Variant(spec, runtime, options)


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop timing and report what was measured."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--backbone", default="resnet50")
    add("--backbone-width", type=int, default=None, help="ResNet base width (default: config)")
    add("--image-size", type=int, default=256)
    add("--batch", type=int, default=128)
    add("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    add("--steps", type=int, default=10, help="steps per timed window")
    add("--warmup", type=int, default=3, help="untimed steps after the first (compiling) call")
    add("--windows", type=int, default=5, help="timed windows per runner (median reported)")
    add("--no-compile", action="store_true", help="skip torch.compile")
    add("--torch-compile-mode", default=None, help="torch.compile mode (default: inductor's)")
    add("--torch-threads", type=int, default=None,
        help="torch.set_num_threads (default: torch's own default, one per core)")
    add("--kernels", choices=runtime_lib.KERNELS, default=None,
        help="runtime.kernels of the JAX runners (default: the config's, auto)")
    add("--batchnorm", choices=runtime_lib.BATCHNORM, default=None,
        help="runtime.batchnorm of the JAX runners (default: the config's, flax)")
    add("--malloc", choices=runtime_lib.HOST_MALLOC, default=None,
        help="runtime.host_malloc, the host memory of the process (both frameworks): 'keep' = "
        "reuse freed memory, 'default' = glibc's settings, 'auto' (the config's) = 'keep' where "
        "JAX runs on the CPU")
    add("--jax-variant", action="append", default=[], metavar="SPEC",
        help="also time the JAX train step of another runtime (repeatable; '+'-joined presets "
        f"{', '.join(PRESETS)}, or FIELD=VALUE for runtime.{{{','.join(RUNTIME_FIELDS)}}} or a "
        "raw XLA option)")
    add("--torch-alt-threads", type=int, default=None,
        help="CPU: also time each torch runner with this many threads (switched per window)")
    add("--no-infer", action="store_true", help="training step only")
    add("--only", default=None, help="comma list of runners to time (default: all)")
    add("--end-to-end", action="store_true", help="also time the training input pipeline")
    add("--e2e-data", choices=("triples", "single"), default="triples",
        help="end-to-end batches: training triples with host SBI, or single images")
    add("--e2e-workers", type=int, default=None, help="grain worker processes")
    add("--e2e-format", choices=("raw", "png"), default="raw",
        help="record format of the end-to-end data (cmil_jax.data.sources.IMAGE_FORMATS)")
    add("--e2e-examples", type=int, default=256, help="synthetic training records")
    add("--e2e-steps", type=int, default=None, help="steps per end-to-end window")
    add("--deadline-s", type=float, default=None,
        help="seconds this run may take from the first compile on: compiles that would end "
        "later are skipped (COMPILE_ESTIMATE_S), windows stop at it")
    add("--json", default=None, help="write the results here")
    add("--report", nargs="+", default=None, metavar="JSON",
        help="print the markdown tables of earlier --json results and exit")
    args = p.parse_args(argv)
    args.jax_variant = [parse_variant(v) for v in args.jax_variant]
    return args


# ---------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "grain"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed or no __version__
            out[name] = None
    out["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return out


def make_config(args):
    """base_config() with the command line's backbone, width, dtype, image size and runtime."""
    from cmil_jax import config_base  # pylint: disable=import-outside-toplevel

    cfg = config_base.base_config()
    cfg.model.backbone = args.backbone
    cfg.model.dtype = args.dtype
    if args.backbone_width:
        cfg.model.backbone_width = args.backbone_width
    cfg.data.image_size = args.image_size
    if args.kernels:
        cfg.runtime.kernels = args.kernels
    if args.malloc:
        cfg.runtime.host_malloc = args.malloc
    if getattr(args, "batchnorm", None):
        cfg.runtime.batchnorm = args.batchnorm
    return cfg


def variant_config(cfg, variant: Variant):
    """A copy of cfg with the variant's runtime fields."""
    out = cfg.copy_and_resolve_references()
    out.runtime.update(variant.runtime)
    return out


def host_batch(batch: int, size: int, seed: int = 0) -> dict:
    """A training batch as the pipeline yields it (contract keys and dtypes; no "mask", which
    training batches leave out unless asked for)."""
    from cmil_jax import labels  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    label = np.zeros((batch, labels.MAX_LEN), np.int32)
    for i in range(batch):
        n = int(rng.integers(0, 4))
        label[i, :n] = rng.permutation(np.arange(1, labels.NUM_CLASSES + 1))[:n]
    return {
        "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "label": label,
        "is_fake": label.any(1).astype(np.int32),
        "has_seq": np.ones((batch,), np.float32),
    }


# ---------------------------------------------------------------------------- runners


class Runner:
    """One thing to time: ``call()`` enqueues one step, ``sync()`` waits for the device.

    ``prepare()`` (optional) runs once before the first call (e.g. an ahead-of-time compile);
    ``enter()`` / ``leave()`` (optional) run around each window (e.g. a thread-count switch).
    """

    def __init__(self, name, call, sync, images_per_step, prepare=None, enter=None, leave=None):
        self.name, self.call, self.sync, self.images_per_step = name, call, sync, images_per_step
        self.prepare, self.enter, self.leave = prepare, enter, leave
        self.first_call_s = None
        self.rates = []
        self.cpu_s_per_step = []  # process CPU time (all threads) per step

    def first(self, warmup):
        if self.enter:
            self.enter()
        try:
            t = time.perf_counter()
            if self.prepare:
                self.prepare()
            self.call()
            self.sync()
            self.first_call_s = time.perf_counter() - t
            for _ in range(warmup):
                self.call()
            self.sync()
        finally:
            if self.leave:
                self.leave()

    def window(self, steps):
        if self.enter:
            self.enter()
        try:
            self.sync()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(steps):
                self.call()
            self.sync()
            dt = time.perf_counter() - t
            self.cpu_s_per_step.append((time.process_time() - c) / steps)
        finally:
            if self.leave:
                self.leave()
        self.rates.append(steps * self.images_per_step / dt)
        return dt

    def median(self):
        return statistics.median(self.rates) if self.rates else None

    def compile_s(self):
        """First call minus one steady-state step (trace + compile + autotuning)."""
        if self.first_call_s is None or not self.rates:
            return None
        return max(0.0, self.first_call_s - self.images_per_step / self.median())

    def summary(self):
        return {
            "images_per_sec": self.median(),
            "windows_images_per_sec": self.rates,
            "first_call_s": self.first_call_s,
            "compile_s": self.compile_s(),
            "process_cpu_s_per_step": statistics.median(self.cpu_s_per_step)
            if self.cpu_s_per_step
            else None,
        }


def jax_runners(cfg, args, batch_np, want):
    """The JAX runners on train.setup(cfg)'s jitted steps -> (runners, host variables, extra)."""
    import jax

    from cmil_jax import parallel, train

    run = train.setup(cfg, TOTAL_STEPS)
    t = time.perf_counter()
    state = run.init_state()
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t

    batch = parallel.to_global(batch_np, run.batch_sharding)
    eval_batch = {"image": batch["image"]}
    host_vars = jax.device_get(state.variables())
    # The train step donates its state: inference and each variant get their own copy (every
    # runtime's layers create the same variables).
    infer_vars = jax.tree.map(lambda x: x.copy(), state.variables())
    variant_states = {v.name: jax.tree.map(lambda x: x.copy(), state) for v in args.jax_variant}
    ctx = {"state": state, "metrics": None, "out": None}
    variant_runtimes = {}
    # Each train runner's first step starts from the same state on the same batch: its metrics
    # and BatchNorm statistics after it, on the host, for numerics() (fetched once, untimed).
    first_steps = {}

    def keep_first(name, new_state, metrics):
        if name not in first_steps:
            first_steps[name] = jax.device_get((metrics, new_state.batch_stats))

    def train_call():
        ctx["state"], ctx["metrics"] = run.train_step(ctx["state"], batch)
        keep_first("jax_train", ctx["state"], ctx["metrics"])

    def train_sync():
        jax.block_until_ready((ctx["state"], ctx["metrics"]))

    def infer_call():
        ctx["out"] = run.eval_step(infer_vars, eval_batch)

    def infer_sync():
        jax.block_until_ready(ctx["out"])

    runners = {}
    b = args.batch
    if "jax_train" in want:
        runners["jax_train"] = Runner("jax_train", train_call, train_sync, b)
        for variant in args.jax_variant:
            # The train step of the variant's runtime, compiled ahead of time (with its raw
            # XLA options added to the runtime's).
            v = {"state": variant_states[variant.name], "metrics": None, "exe": None}

            def prepare(v=v, variant=variant):
                vrun = train.setup(variant_config(cfg, variant), TOTAL_STEPS, mesh=run.mesh)
                described = vrun.runtime.describe()  # with the raw XLA options added
                described["compiler_options"].update(variant.xla_options)
                variant_runtimes[variant.name] = described
                lowered = vrun.train_step.lower(v["state"], batch)
                v["exe"] = lowered.compile(compiler_options=variant.xla_options or None)

            def call(v=v, name=f"jax_train@{variant.name}"):
                v["state"], v["metrics"] = v["exe"](v["state"], batch)
                keep_first(name, v["state"], v["metrics"])

            def sync(v=v):
                jax.block_until_ready((v["state"], v["metrics"]))

            name = f"jax_train@{variant.name}"
            runners[name] = Runner(name, call, sync, b, prepare=prepare)
    if "jax_infer" in want:
        runners["jax_infer"] = Runner("jax_infer", infer_call, infer_sync, b)
    extra = {
        "init_s": init_s,
        "run": run,
        "ctx": ctx,
        "variant_runtimes": variant_runtimes,
        "first_steps": first_steps,
    }
    return runners, host_vars, extra


def numerics(first_steps: dict) -> dict:
    """Each JAX variant's first training step against jax_train's (the same state and batch):
    relative differences of the loss, every loss term, the gradient norm and the updated
    BatchNorm statistics (the norm of the difference over the norm, all layers together)."""
    if "jax_train" not in first_steps:
        return {}
    import jax  # pylint: disable=import-outside-toplevel

    ref_metrics, ref_stats = first_steps["jax_train"]
    ref_leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(ref_stats)]
    out = {}
    for name, (metrics, stats) in first_steps.items():
        if name == "jax_train":
            continue
        row = {}
        for key, ref in ref_metrics.items():
            a, b = float(metrics[key]), float(ref)
            row[key] = abs(a - b) / max(abs(b), 1e-12)
        leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(stats)]
        diff = sum(float(np.sum((a - b) ** 2)) for a, b in zip(leaves, ref_leaves))
        norm = sum(float(np.sum(b ** 2)) for b in ref_leaves)
        row["batch_stats"] = (diff / max(norm, 1e-30)) ** 0.5
        row["loss_value"] = float(metrics["loss"])
        row["grad_norm_value"] = float(metrics["grad_norm"])
        out[name] = row
    out["jax_train"] = {"loss_value": float(ref_metrics["loss"]),
                        "grad_norm_value": float(ref_metrics["grad_norm"])}
    return out


def torch_runners(cfg, args, batch_np, flax_vars, want):
    import torch

    from benchmarks import torch_twin as tt
    from cmil_jax import losses

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    default_threads = torch.get_num_threads()
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32, as XLA's default precision on GPU
    amp = torch.bfloat16 if args.dtype == "bfloat16" else None
    model = tt.model_from_config(cfg.model, args.image_size)
    tt.load_from_flax(model, flax_vars)
    model = model.to(device, memory_format=torch.channels_last)
    opt, sched = tt.make_optimizer(model, cfg.train, TOTAL_STEPS)
    loss_kwargs = losses.loss_kwargs(cfg.loss)
    batch = {k: torch.from_numpy(v).to(device) for k, v in batch_np.items()}
    compile_kwargs = {"mode": args.torch_compile_mode} if args.torch_compile_mode else {}
    ctx = {}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    fns = {}
    for compiled in (False, True):
        kind = "compiled" if compiled else "eager"
        if compiled and args.no_compile:
            continue
        if f"torch_{kind}_train" in want:
            step = tt.make_train_step(model, opt, sched, loss_kwargs, amp_dtype=amp,
                                      compile=compiled, compile_kwargs=compile_kwargs)
            fns[f"torch_{kind}_train"] = lambda step=step: ctx.__setitem__("m", step(batch))
        if f"torch_{kind}_infer" in want:
            infer = tt.make_eval_step(model, tau=loss_kwargs["tau"],
                                      num_lowest=loss_kwargs["num_lowest"], amp_dtype=amp,
                                      compile=compiled, compile_kwargs=compile_kwargs)
            fns[f"torch_{kind}_infer"] = lambda infer=infer: ctx.__setitem__(
                "o", infer(batch["image"]))

    runners = {}
    for name, fn in fns.items():
        runners[name] = Runner(name, fn, sync, args.batch)
        if args.torch_alt_threads and not cuda:
            n = args.torch_alt_threads
            runners[f"{name}@{n}t"] = Runner(
                f"{name}@{n}t", fn, sync, args.batch, enter=lambda n=n: torch.set_num_threads(n),
                leave=lambda: torch.set_num_threads(default_threads))
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    return runners, {"device": device_name, "threads": default_threads}


# ---------------------------------------------------------------------------- end to end


class FirstImages:
    """A batch iterator cut to the first n images of each batch (get_state / close kept)."""

    def __init__(self, iterator, n: int):
        self.iterator, self.n = iterator, n

    def __iter__(self):
        return self

    def __next__(self):
        return {k: v[: self.n] for k, v in next(self.iterator).items()}

    def get_state(self):
        return self.iterator.get_state()

    def close(self):
        self.iterator.close()


def end_to_end(args, cfg, jax_extra):
    """images/s of the training input pipeline -> DevicePrefetcher -> the jitted train step,
    against the same step on one fixed device-resident batch of the same shape (windows
    alternate).

    The data: the built-in synthetic data set ('cmil_synthetic/<subset>', ``--e2e-examples``
    training records at --image-size), opened and iterated by cmil_jax.data.inputs as training
    does. ``--e2e-data triples`` (default): training triples as the Seq-DeepFake configs train
    on them (genuine image, its SBI pseudo-fake synthesised on the host, a dataset fake),
    ceil(batch / 3) triples per step, cut to the first ``--batch`` images, so the step keeps
    the shape it was compiled for (batch 128: 43 triples, 129 images made, 128 used; the host
    does slightly more work than it delivers). ``single``: ``--batch`` single images.
    """
    import jax

    from cmil_jax import parallel

    try:
        from cmil_jax.data import inputs, synthetic_dataset
    except ImportError as e:
        return {"error": f"end-to-end needs the data stack (grain, tensorflow_datasets): {e}"}
    workers = args.e2e_workers
    if workers is None:
        workers = max(1, min(16, (os.cpu_count() or 2) - 2))
    triples = args.e2e_data == "triples"
    per_step = -(-args.batch // 3) if triples else args.batch
    e2e_cfg = cfg.copy_and_resolve_references()
    data = e2e_cfg.data
    data.name, data.data_dir, data.triples, data.num_workers = (
        f"cmil_synthetic/{data.subset}", "", triples, workers)
    data.synthetic.update(num_train=args.e2e_examples, num_val=0, num_test=0)
    e2e_cfg.train.batch_size = per_step
    workdir = tempfile.mkdtemp(prefix="cmil_e2e_")  # the records are built in <workdir>/data
    batches = None
    try:
        t = time.perf_counter()
        synthetic_dataset.build_synthetic(  # in --e2e-format; open_splits then finds it
            inputs.resolve_data_dir(e2e_cfg, workdir), data.subset, data.image_size,
            args.e2e_examples, 0, 0, seed=data.synthetic.seed, image_format=args.e2e_format)
        source = inputs.open_splits(e2e_cfg, workdir, ("train",))["train"]
        build_s = time.perf_counter() - t
        it = FirstImages(inputs.train_iterator(e2e_cfg, source), args.batch)
        batches = parallel.DevicePrefetcher(it, jax_extra["run"].batch_sharding, size=2)
        ctx, step = jax_extra["ctx"], jax_extra["run"].train_step
        t = time.perf_counter()
        fixed = next(batches)  # starts the workers; also the device-only runner's batch
        startup_s = time.perf_counter() - t

        def fed_call():
            ctx["state"], ctx["metrics"] = step(ctx["state"], next(batches))

        def fixed_call():
            ctx["state"], ctx["metrics"] = step(ctx["state"], fixed)

        def sync():
            jax.block_until_ready((ctx["state"], ctx["metrics"]))

        device_only = Runner("jax_train_device_only", fixed_call, sync, args.batch)
        fed = Runner("jax_train_end_to_end", fed_call, sync, args.batch)
        steps = args.e2e_steps or 2 * args.steps
        device_only.first(args.warmup)  # the step is compiled already (same shapes)
        # Every worker's first batches (on an H100 the first fed window after a shorter
        # warm-up ran at 5% of the later ones).
        fed.first(max(args.warmup, 2 * workers))
        for w in range(args.windows):
            for r in (fed, device_only) if w % 2 else (device_only, fed):
                r.window(steps)
    finally:
        if batches is not None:
            batches.close()
        shutil.rmtree(workdir, ignore_errors=True)
    rate, device_rate = fed.median(), device_only.median()
    return {
        "data": "triples" if triples else "single",
        "images_per_step": args.batch,
        "images_made_per_step": 3 * per_step if triples else per_step,
        ("triples_per_step" if triples else "records_per_step"): per_step,
        "jax_train_end_to_end_images_per_sec": rate,
        "jax_train_device_only_images_per_sec": device_rate,
        "end_to_end_vs_device_only": rate / device_rate if rate and device_rate else None,
        "windows_images_per_sec": fed.rates,
        "device_only_windows_images_per_sec": device_only.rates,
        "device_only_first_call_s": device_only.first_call_s,
        "process_cpu_s_per_step": fed.summary()["process_cpu_s_per_step"],
        "steps_per_window": steps,
        "grain_workers": workers,
        "records": args.e2e_examples,
        "record_format": args.e2e_format,
        "records_build_s": build_s,
        "pipeline_first_batch_s": startup_s,
        "pipeline": "cmil_jax.data.inputs.train_iterator on the synthetic TFDS records ("
        + (f"{args.e2e_format} records; "
           + ("triples: decode, SBI on the host" if triples else "single images: decode"))
        + ", weak augmentation)",
    }


# ---------------------------------------------------------------------------- main


def run(args) -> dict:
    # JAX and PyTorch share one GPU here: do not let JAX preallocate 75% of it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    cfg = make_config(args)
    try:
        for variant in args.jax_variant:
            runtime_lib.check(variant_config(cfg, variant).runtime)
    except runtime_lib.ConfigError as e:
        raise SystemExit(f"--jax-variant: {e}") from e
    malloc_kept = runtime_lib.apply_host_memory(cfg)  # before JAX starts its backend threads

    import jax

    want = set(args.only.split(",")) if args.only else set(RUNNERS)
    if args.no_infer:
        want -= {r for r in RUNNERS if r.endswith("_infer")}
    unknown = want - set(RUNNERS)
    if unknown:
        raise SystemExit(f"unknown runners {sorted(unknown)}; choose from {RUNNERS}")

    load_before = os.getloadavg()
    batch_np = host_batch(args.batch, args.image_size)

    log(
        f"building JAX state ({args.backbone}, {args.image_size}px, batch {args.batch}, "
        f"{args.dtype})"
    )
    runners, flax_vars, jax_extra = jax_runners(cfg, args, batch_np, want)
    torch_info, torch_error = {}, None
    if any(r.startswith("torch") for r in want):
        try:
            t_runners, torch_info = torch_runners(cfg, args, batch_np, flax_vars, want)
            runners.update(t_runners)
        except ImportError as e:
            torch_error = f"torch unavailable: {e}"
            log(torch_error)
    del flax_vars

    order = sorted(runners, key=lambda n: (RUNNERS.index(n.split("@")[0]), n))
    compile_errors = {}
    interrupted = None
    e2e = {"error": "not reached: run interrupted"}
    signal.signal(signal.SIGTERM, _raise_interrupted)  # `timeout` -> report what was measured
    started = time.monotonic()

    def past_deadline(extra_s=0.0):
        return args.deadline_s is not None and (
            time.monotonic() - started + extra_s > args.deadline_s)

    def warm(names):
        for name in names:
            r = runners[name]
            # A compile that would end past --deadline-s is skipped: a process killed inside
            # a compile could not report anything.
            if past_deadline(COMPILE_ESTIMATE_S["torch" if name.startswith("torch") else "jax"]):
                compile_errors[name] = (
                    f"skipped: its compile would pass --deadline-s {args.deadline_s}")
                log(f"{name}: {compile_errors[name]}")
                del runners[name]
                order.remove(name)
                continue
            log(f"{name}: first call (compile) ...")
            try:
                r.first(args.warmup)
            except Exception as e:  # torch.compile and variant failures are reported, not fatal
                if not (name.startswith("torch_compiled") or "@" in name):
                    raise
                compile_errors[name] = f"{type(e).__name__}: {e}"[:2000]
                log(f"{name} failed: {compile_errors[name][:500]}")
                del runners[name]
                order.remove(name)
                continue
            log(f"{name}: first call {r.first_call_s:.1f}s")

    def window_round(w):
        rotated = order[w % len(order) :] + order[: w % len(order)]
        ran = [n for n in rotated if len(runners[n].rates) < args.windows]
        for name in ran:
            runners[name].window(args.steps)
        log(
            f"window {w + 1}/{args.windows}: "
            + ", ".join(f"{n} {runners[n].rates[-1]:.2f}" for n in order if n in ran)
        )

    try:
        # torch.compile is slowest to compile: the other runners get one window first, so that
        # a run cut short by `timeout` still reports them. JAX variants with raw XLA options
        # (compiler experiments) come last of all.
        experiments = {f"jax_train@{v.name}" for v in args.jax_variant if v.xla_options}
        costly = [n for n in order if n.startswith("torch_compiled")]
        costly += [n for n in order if n in experiments]
        warm([n for n in order if n not in costly])
        if costly and args.windows > 1:
            for name in list(order):
                if name not in costly:
                    runners[name].window(args.steps)
        # The end-to-end figure before torch.compile too (it has its own device-only rate).
        if args.end_to_end:
            e2e = {"error": "needs the jax_train runner"}
            if "jax_train" in runners:
                log("end to end: building records and starting grain workers ...")
                e2e = end_to_end(args, cfg, jax_extra)
        warm(costly)
        for w in range(args.windows):
            if past_deadline(5.0):
                interrupted = f"--deadline-s {args.deadline_s} reached after {w} windows"
                log(interrupted)
                break
            window_round(w)
    except Interrupted as e:
        interrupted = str(e)
        log(f"interrupted ({e}); reporting the windows measured so far")
        for name in list(order):
            if not runners[name].rates:
                del runners[name]
                order.remove(name)

    def rate(name):
        return runners[name].median() if name in runners else None

    dev = jax.devices()[0]
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(
            [os.path.basename(sys.executable), "-m", "benchmarks.throughput"] + sys.argv[1:]
        ),
        "device": f"{dev.platform}: {dev.device_kind}"
        + (f" ({cpu_model()}, {os.cpu_count()} cores)" if dev.platform == "cpu" else ""),
        "torch_device": torch_info.get("device"),
        "torch_threads": torch_info.get("threads"),
        "versions": versions(),
        "backbone": args.backbone,
        "image_size": args.image_size,
        "batch": args.batch,
        "dtype": args.dtype,
        "steps_per_window": args.steps,
        "windows": args.windows,
        "warmup": args.warmup,
        "jax_init_s": jax_extra["init_s"],
        "malloc": "keep_freed_memory" if malloc_kept else "default",
        "runtime": jax_extra["run"].runtime.describe(),
        "config": cfg.to_dict(),
    }
    for name in RUNNERS:
        result[f"{name}_images_per_sec"] = rate(name)
    for name in RUNNERS:
        if name.startswith(("jax", "torch_compiled")):
            result[f"{name}_compile_s"] = runners[name].compile_s() if name in runners else None
    failed = {k: v for k, v in compile_errors.items() if k.startswith("torch_compiled")}
    result["torch_compile_error"] = "; ".join(f"{k}: {v}" for k, v in failed.items()) or None
    if args.no_compile:
        result["torch_compile_error"] = "skipped (--no-compile)"
    result["errors"] = compile_errors
    result["torch_error"] = torch_error
    result["jax_variants"] = {
        v.name: {"runtime_fields": v.runtime, "xla_options": v.xla_options,
                 "runtime": jax_extra["variant_runtimes"].get(v.name)}
        for v in args.jax_variant
    }
    result["runners"] = {n: runners[n].summary() for n in order}
    result["numerics"] = numerics(jax_extra["first_steps"])

    ratios = {}
    for kind in ("train", "infer"):
        j, e, c = rate(f"jax_{kind}"), rate(f"torch_eager_{kind}"), rate(f"torch_compiled_{kind}")
        if j and e:
            ratios[f"jax_vs_torch_eager_{kind}"] = j / e
        if j and c:
            ratios[f"jax_vs_torch_compiled_{kind}"] = j / c
        best = max([x for x in (e, c) if x] or [0])
        if j and best:
            ratios[f"jax_vs_torch_best_{kind}"] = j / best
        # Best of everything that ran (JAX compiler variants, torch thread variants).
        jax_all = [runners[n].median() for n in order if n.startswith(f"jax_{kind}")]
        torch_all = [
            runners[n].median() for n in order if n.startswith("torch") and f"_{kind}" in n
        ]
        if jax_all and torch_all and (len(jax_all) > 1 or len(torch_all) > 2):
            ratios[f"jax_best_variant_vs_torch_best_variant_{kind}"] = max(jax_all) / max(torch_all)
    result["ratios"] = ratios

    result["interrupted"] = interrupted
    if args.end_to_end:
        result["end_to_end"] = e2e
    result["loadavg_before"] = load_before
    result["loadavg_after"] = os.getloadavg()
    return result


def format_table(result) -> str:
    rows = [
        "| runner | images/s (median) | min | max | CPU s/step | compile s | first call s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x):
        return "" if x is None else f"{x:.2f}"

    for name, r in result["runners"].items():
        w = r["windows_images_per_sec"]
        rows.append(
            f"| {name} | {f(r['images_per_sec'])} | {f(min(w))} | {f(max(w))} | "
            f"{f(r['process_cpu_s_per_step'])} | "
            f"{f(None if name.startswith('torch_eager') else r['compile_s'])} | "
            f"{f(r['first_call_s'])} |"
        )
    e2e = result.get("end_to_end")
    if e2e and "jax_train_end_to_end_images_per_sec" in e2e:
        w = e2e["windows_images_per_sec"]
        d = e2e["device_only_windows_images_per_sec"]
        what = f"{e2e['data']}, {e2e['images_per_step']} images/step"
        if "triples_per_step" in e2e:
            what = f"{e2e['triples_per_step']} triples, {e2e['images_per_step']} images/step"
        rows.append(
            f"| jax_train_end_to_end ({what}, {e2e['grain_workers']} grain workers) | "
            f"{f(e2e['jax_train_end_to_end_images_per_sec'])} | {f(min(w))} | {f(max(w))} | "
            f"{f(e2e['process_cpu_s_per_step'])} | | |"
        )
        rows.append(
            f"| jax_train_device_only ({what}, alternating with the row above) | "
            f"{f(e2e['jax_train_device_only_images_per_sec'])} | {f(min(d))} | {f(max(d))} | "
            "| | |"
        )
    r = result
    header = (
        f"{r['device']}; torch {r.get('torch_device')} ({r.get('torch_threads')} threads); "
        f"{r['backbone']} {r['image_size']}px batch {r['batch']} {r['dtype']}; "
        f"loadavg {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}; "
        f"malloc {r.get('malloc', 'default')}"
    )
    if r.get("runtime"):  # results from before the runtime section have none
        options = r["runtime"]["compiler_options"]
        header += f"; JAX layers '{r['runtime']['kernels']}'" + (
            f", XLA options {options}" if options else "")
    lines = [header, *rows, ""]
    if e2e and "error" in e2e:
        lines.append(f"end to end: {e2e['error']}")
    elif e2e:
        lines.append(f"end to end / device only: {e2e['end_to_end_vs_device_only']:.2f}")
    for k, v in result.get("errors", {}).items():
        lines.append(f"{k} failed: {v[:300]}")
    for k, v in result["ratios"].items():
        lines.append(f"{k}: {v:.2f}x")
    twin = {k: result["runners"].get(f"torch_{k}_train", {}).get("images_per_sec")
            for k in ("eager", "compiled")}
    for name, r in result["runners"].items():
        if name.startswith("jax_train@") and r["images_per_sec"]:
            lines.append(f"{name}: " + ", ".join(
                f"{r['images_per_sec'] / t:.2f}x torch {k}" for k, t in twin.items() if t))
    for name, row in result.get("numerics", {}).items():
        if name != "jax_train":
            lines.append(
                f"numerics, first step of {name} against jax_train's (relative differences): "
                + ", ".join(f"{k} {v:.1e}" for k, v in row.items() if not k.endswith("_value")))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        for path in args.report:
            with open(path) as f:
                result = json.load(f)
            print(f"### {os.path.basename(path)}\n\n`{result['command']}` ({result['date']})\n")
            print(format_table(result) + "\n")
        return
    result = run(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(format_table(result), flush=True)


if __name__ == "__main__":
    main()
