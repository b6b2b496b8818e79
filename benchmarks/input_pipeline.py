"""Host input pipeline speed: SBI pairs/s on one core, training triples/s per grain worker
count and record format, and the CPU time of each stage of a triple.

    python -m benchmarks.input_pipeline [--image-size 256] [--workers 1,2] [--formats png,raw] \
        [--seconds 5] [--windows 3] [--warmup 3] [--batch 8] [--records 480] [--threads N] \
        [--before-tree DIR] [--data-dir DIR] [--json OUT] [--skip-sbi] [--skip-triples] \
        [--skip-stages] [--smoke]

1. SBI pairs per second on one core (OpenCV and BLAS single-threaded) at --image-size:
   ``cmil_jax.data.sbi.self_blend`` against ``benchmarks/sbi_reference.py`` (the same recipe
   written plainly, whole images, one at a time), in alternating windows.
2. Training triples per second (genuine, SBI pseudo-fake, dataset fake; weak augmentation of
   all three; batches of --batch triples) for each worker count in --workers:
   ours      ``cmil_jax.data.pipeline.make_triple_train_dataset`` on grain workers, reading
             the synthetic TFDS (ArrayRecord) dataset built once per record format in
             --formats (``sources.IMAGE_FORMATS``: 'png' PNG-encoded pixels, 'raw' raw
             pixels; the same pixels; 'raw-none': the raw records copied by
             ``data_prep.convert --compression none``, ArrayRecord without zstd) under --data-dir/<format>;
   before    with ``--before-tree DIR``: the same pipeline as the source tree DIR has it (e.g.
             ``git archive <commit> | tar -x -C DIR``), run in a child process that imports
             DIR's ``cmil_jax``, on the records of the first format: the code before a change,
             timed in the same windows as the code after it;
   reference a plain loop making one triple at a time with the reference SBI, from the
             records of the first format, in a ``multiprocessing`` pool of that many
             processes (0 = in this process), batched here.
   All configurations are started (worker start-up excluded), then take turns: per round each
   gets a --warmup drain of the buffers it filled while idle, then a timed window of
   --seconds, then a pause until its workers are idle again (so that its refill does not run
   during the next configuration's window).

Figures are medians over windows. Besides wall-clock rates, the CPU time (user + system) of
this process and of the configuration's worker processes is reported per item, and as "cores
busy" (CPU seconds per second). On a machine shared under the kernel's autogroup scheduling
every session gets a fair share of the cores, so while other sessions are busy more workers
cannot get more than that share: compare cores busy before reading a worker-scaling ratio.
The 1-minute load average is recorded before every timed window. Small --records make grain's
index shuffle costly (about 35 ms / number of genuine images per element).

3. Stages (in this process, one thread, per format, formats alternating window by window):
   CPU ms per triple of reading the two records (ArrayRecord read and TFDS parsing), decoding
   their pixels, SBI, the weak augmentation of the three images, the whole triple
   (``pipeline._TripleExample``: all of the above and the rest) and its copy into the batch
   (``pipeline._TripleBatch``). The stage figures are timed separately, each over the same
   triples.

``--smoke`` makes everything tiny (a few seconds; for tests).
"""

from __future__ import annotations

import os

# One thread for numpy/BLAS here and in every worker process (they inherit the environment);
# set before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import collections
import datetime
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np

from benchmarks.sbi_reference import reference_self_blend
from benchmarks.throughput import cpu_model
from cmil_jax import labels
from cmil_jax.data import augment, sbi

SUBSET = "facial_components"


# --------------------------------------------------------------------------------------------
# Machine and timing helpers


def machine_info() -> dict:
    import grain

    return {
        "cpu_model": cpu_model(),
        "vcpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "grain": getattr(grain, "__version__", "unknown"),
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def child_pids() -> set[int]:
    """Process ids of this process's live descendants."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _cpu_seconds(pids) -> float:
    """User + system CPU seconds of this process and of the processes ``pids`` still alive."""
    import psutil

    total = 0.0
    for pid in (os.getpid(), *pids):
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:  # exited meanwhile
            pass
    return total


def timed_window(step, seconds: float, items_per_step: int, pids=()) -> dict:
    """Call ``step()`` until ``seconds`` have passed: items/s (wall) and CPU ms per item.

    CPU time is that of this process and of the worker processes ``pids``.
    """
    cpu0, t0, n = _cpu_seconds(pids), time.perf_counter(), 0
    while True:
        step()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    cpu = _cpu_seconds(pids) - cpu0
    items = n * items_per_step
    return {"rate": items / elapsed, "cpu_ms_per_item": 1e3 * cpu / items, "cores": cpu / elapsed}


def wait_idle(pids, limit_s: float = 10.0) -> float:
    """Sleep until this process and ``pids`` use < 5% of a core each (prefetch buffers full).

    Returns the seconds waited. Keeps one configuration's background refill out of the next
    one's timed window.
    """
    t0 = time.perf_counter()
    cpu = _cpu_seconds(pids)
    while time.perf_counter() - t0 < limit_s:
        time.sleep(0.2)
        now = _cpu_seconds(pids)
        if now - cpu < 0.2 * 0.05 * (1 + len(pids)):
            break
        cpu = now
    return time.perf_counter() - t0


def summarise(windows: list[dict]) -> dict:
    """Median wall rate, CPU ms per item and cores busy over windows; every window's rate."""
    rates = [w["rate"] for w in windows]
    cpu = statistics.median(w["cpu_ms_per_item"] for w in windows)
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "windows": rates,
        "cpu_ms_per_item": cpu,
        "cpu_rate": 1e3 / cpu if cpu > 0 else None,
        "cores": statistics.median(w["cores"] for w in windows),
    }


# --------------------------------------------------------------------------------------------
# 1. SBI pairs on one core


def synthetic_faces(n: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n synthetic faces: (image uint8 (size, size, 3), landmarks float32 (68, 2))."""
    from cmil_jax.data import synthetic

    examples = (synthetic.generate_example(SUBSET, i, image_size=size) for i in range(n))
    return [(e["image"], e["landmarks"]) for e in examples]


def bench_sbi(args) -> dict:
    """Pairs/s of sbi.self_blend and of the reference, alternating windows, one thread."""
    cv2.setNumThreads(0)  # OpenCV runs every function in the calling thread
    faces = synthetic_faces(16, args.image_size)
    impls = {"ours": sbi.self_blend, "reference": reference_self_blend}
    state = {}
    for name, fn in impls.items():
        state[name] = [np.random.default_rng(0), 0]
        for image, landmarks in faces[:4]:  # warm-up
            fn(image, landmarks, state[name][0])

    def step_of(name):
        fn, (rng, _) = impls[name], state[name]

        def step():
            i = state[name][1]
            image, landmarks = faces[i % len(faces)]
            fn(image, landmarks, rng)
            state[name][1] = i + 1

        return step

    load_before = load_average()
    windows = {name: [] for name in impls}
    for _ in range(args.windows):
        for name in impls:
            windows[name].append(timed_window(step_of(name), args.seconds, 1))
    out = {name: summarise(w) for name, w in windows.items()}
    out.update(
        image_size=args.image_size,
        opencv_threads=cv2.getNumThreads(),
        load_before=load_before,
        load_after=load_average(),
        speedup=out["ours"]["median"] / out["reference"]["median"],
    )
    return out


# --------------------------------------------------------------------------------------------
# 2. Training triples


def open_train_sources(args) -> dict:
    """{format: the synthetic TFDS train split in that record format} for --formats (each
    built under --data-dir/<format> on first use)."""
    from cmil_jax.data import sources, synthetic_dataset

    from data_prep import convert

    out = {}
    for fmt in args.formats:
        image_format, _, compression = fmt.partition("-")
        data_dir = os.path.join(args.data_dir, image_format)
        name = synthetic_dataset.build_synthetic(
            data_dir, SUBSET, args.image_size, args.records, 1, 1, num_workers=1,
            image_format=image_format,
        )
        if compression:
            src_dir, data_dir = data_dir, os.path.join(args.data_dir, fmt)
            convert.convert(src_dir, name, data_dir, image_format, compression=compression)
        out[fmt] = sources.open_split(data_dir, name, "train")
    return out


def ours_stepper(source, args, workers: int):
    """(next-batch callable, close callable) for the grain triple pipeline."""
    from cmil_jax.data import pipeline

    it = iter(
        pipeline.make_triple_train_dataset(
            source,
            batch_size=args.batch,
            seed=0,
            image_size=args.image_size,
            shard=False,
            num_workers=workers,
            **({} if args.threads is None else {"num_threads": args.threads}),
        )
    )
    return (lambda: next(it)), (it.close if workers > 0 else (lambda: None))


# The reference keeps its inputs in module globals: set here for 0 workers, by the pool
# initialiser in worker processes.
_REF: dict = {}


def _ref_init(source, image_size: int, seed: int):
    cv2.setNumThreads(0)
    labels = np.asarray(source.labels())
    originals = np.flatnonzero(~labels.any(axis=1))
    _REF.update(
        source=source,
        image_size=image_size,
        seed=seed,
        order=np.random.default_rng(seed).permutation(originals),
        fakes=np.flatnonzero(labels.any(axis=1)),
        cfg=augment.AugmentConfig(),
    )


def reference_triple(j: int) -> dict[str, np.ndarray]:
    """Triple j, plainly: decode, reference SBI, weak augmentation; arrays with leading axis 3."""
    rng = np.random.default_rng([_REF["seed"], j])
    source, size = _REF["source"], _REF["image_size"]
    genuine = source[int(_REF["order"][j % len(_REF["order"])])]
    fake = source[int(_REF["fakes"][rng.integers(len(_REF["fakes"]))])]
    real, pseudo, blend = reference_self_blend(genuine["image"], genuine["landmarks"], rng)
    zeros = np.zeros(labels.MAX_LEN, np.int32)
    parts = [
        (real, np.zeros(real.shape[:2], np.uint8), zeros, 0),
        (pseudo, np.round(blend * 255).astype(np.uint8), zeros, 1),
        (fake["image"], fake["mask"], fake["label"], 1),
    ]
    out = collections.defaultdict(list)
    for image, mask, label, is_fake in parts:
        image, mask, _ = augment.weak_augment(image, rng, _REF["cfg"], image_size=size, mask=mask)
        out["image"].append(image)
        out["mask"].append(mask)
        out["label"].append(np.asarray(label, np.int32))
        out["is_fake"].append(np.int32(is_fake))
        out["has_seq"].append(np.float32(1.0))
    return {k: np.stack(v) for k, v in out.items()}


def reference_stepper(source, args, workers: int):
    """(next-batch callable, close callable) for the plain loop / process pool."""
    counter = iter(range(1 << 62))
    if workers == 0:
        _ref_init(source, args.image_size, 0)

        def make_triple():
            return reference_triple(next(counter))

        def close():
            pass
    else:
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(workers, initializer=_ref_init, initargs=(source, args.image_size, 0))
        pending = collections.deque(
            pool.apply_async(reference_triple, (next(counter),)) for _ in range(4 * workers)
        )

        def make_triple():
            result = pending.popleft()
            pending.append(pool.apply_async(reference_triple, (next(counter),)))
            return result.get()

        def close():
            pool.terminate()
            pool.join()

    def next_batch():
        triples = [make_triple() for _ in range(args.batch)]
        return {k: np.concatenate([t[k] for t in triples]) for k in triples[0]}

    return next_batch, close


# Runs the triple pipeline of another source tree (--before-tree) in its own process, one
# batch per line read from stdin; its grain workers are its children, so the CPU time of
# the whole configuration is that of this process's descendants, as for the others.
_BEFORE_DRIVER = """
import sys

from cmil_jax.data import pipeline, sources


def main():
    data_dir, name, batch, size, workers, threads = sys.argv[1:7]
    kwargs = {} if threads == "default" else {"num_threads": int(threads)}
    source = sources.open_split(data_dir, name, "train")
    it = iter(pipeline.make_triple_train_dataset(
        source, batch_size=int(batch), seed=0, image_size=int(size), shard=False,
        num_workers=int(workers), **kwargs))
    for line in sys.stdin:
        if line.strip() != "next":
            break
        next(it)
        sys.stdout.write("ok\\n")
        sys.stdout.flush()
    if int(workers) > 0:
        it.close()


if __name__ == "__main__":
    main()
"""


def before_stepper(source, args, workers: int):
    """(next-batch callable, close callable) for the pipeline of --before-tree, in a child
    process reading ``source``'s records."""
    import subprocess

    script = os.path.join(args.data_dir, "before_driver.py")
    with open(script, "w") as f:
        f.write(_BEFORE_DRIVER)
    tree = os.path.abspath(args.before_tree)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, script, os.path.join(args.data_dir, args.formats[0]), source.name,
         str(args.batch), str(args.image_size), str(workers),
         "default" if args.threads is None else str(args.threads)],
        cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )

    def step():
        proc.stdin.write("next\n")
        proc.stdin.flush()
        if proc.stdout.readline().strip() != "ok":
            raise RuntimeError(f"the --before-tree pipeline stopped (exit {proc.poll()})")

    def close():
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()

    return step, close


def bench_triples(args, sources_by_format: dict) -> dict:
    """Triples/s of ours (per record format) and of the reference for each worker count.

    All configurations are started first; then each round gives every configuration (in a
    rotating order) a drain window (buffers filled while it was idle) and a timed window, so
    that a change of load on a shared machine hits all of them alike.
    """
    ref_format = args.formats[0]
    keys = [("ours", fmt, w) for w in args.workers for fmt in args.formats]
    if args.before_tree:
        keys += [("before", ref_format, w) for w in args.workers]
    keys += [("reference", ref_format, w) for w in args.workers]
    makers = {"ours": ours_stepper, "before": before_stepper, "reference": reference_stepper}
    runs = {}
    try:
        for impl, fmt, workers in keys:
            before = child_pids()
            step, close = makers[impl](sources_by_format[fmt], args, workers)
            t0 = time.perf_counter()
            step()  # worker start-up
            runs[(impl, fmt, workers)] = {
                "step": step,
                "close": close,
                "pids": child_pids() - before,
                "startup_s": time.perf_counter() - t0,
                "windows": [],
                "loads": [],
            }
            wait_idle(runs[(impl, fmt, workers)]["pids"])
        for r in range(args.windows):
            for impl, fmt, workers in keys[r % len(keys) :] + keys[: r % len(keys)]:
                run = runs[(impl, fmt, workers)]
                timed_window(run["step"], args.warmup, args.batch)  # drain, reach steady state
                run["loads"].append(load_average()[0])
                run["windows"].append(
                    timed_window(run["step"], args.seconds, args.batch, run["pids"])
                )
                wait_idle(run["pids"])
                print(
                    f"  round {r}: {impl:9s} {fmt:4s} {workers} workers "
                    f"{run['windows'][-1]['rate']:7.1f} triples/s, "
                    f"{run['windows'][-1]['cpu_ms_per_item']:5.2f} CPU ms/triple "
                    f"(load {run['loads'][-1]:.2f})",
                    flush=True,
                )
    finally:
        for run in runs.values():
            run["close"]()
    configs = []
    for (impl, fmt, workers), run in runs.items():
        entry = {"impl": impl, "format": fmt, "workers": workers, **summarise(run["windows"])}
        entry.update(
            worker_processes=len(run["pids"]), startup_s=run["startup_s"], loads=run["loads"]
        )
        configs.append(entry)
    rates = {(c["impl"], c["format"], c["workers"]): c["median"] for c in configs}
    scaling = {}
    for impl, fmt, _ in keys:
        if (impl, fmt, 1) in rates:
            scaling[f"{impl} {fmt}"] = {
                f"{w}w/1w": rates[(impl, fmt, w)] / rates[(impl, fmt, 1)]
                for w in args.workers
                if w > 1
            }
    return {
        "image_size": args.image_size,
        "batch_triples": args.batch,
        "records": len(sources_by_format[ref_format]),
        "reference_format": ref_format,
        "configs": configs,
        "scaling": scaling,
    }


# --------------------------------------------------------------------------------------------
# 3. Stages of a triple, in this process

STAGES = ("read", "decode", "sbi", "augment", "triple", "batch")


def _stage_steps(source, args) -> dict:
    """{stage: callable(j) doing that stage's work for triple j} on ``source``."""
    from cmil_jax.data import pipeline

    cfg = augment.AugmentConfig()
    is_fake = np.asarray(source.is_fake())
    originals, fakes = np.flatnonzero(is_fake == 0), np.flatnonzero(is_fake != 0)
    pick = np.random.default_rng(0)
    n = 32
    pairs = [(int(originals[j % len(originals)]), int(fakes[pick.integers(len(fakes))]))
             for j in range(n)]
    decoded = [(source[g], source[f]) for g, f in pairs]
    rng = np.random.default_rng(1)
    blended = []
    for g, _ in decoded:
        real, fake_sbi, mask = sbi.self_blend(g["image"], g["landmarks"], rng)
        blended.append((real, fake_sbi, pipeline._mask_uint8(mask, real.shape[:2])))
    triple = pipeline._TripleExample(source, originals, fakes, args.image_size, cfg, True)
    batch_fn = pipeline._TripleBatch()
    elements = [triple(j, rng) for j in range(args.batch)]

    def read(j):
        g, f = pairs[j % n]
        source.raw(g), source.raw(f)

    def decode(j):  # the whole record access; read is subtracted afterwards
        g, f = pairs[j % n]
        source[g], source[f]

    def blend(j):
        g = decoded[j % n][0]
        sbi.self_blend(g["image"], g["landmarks"], rng)

    def weak(j):  # the images only: training batches carry no masks (pipeline.with_masks)
        (real, fake_sbi, _), f = blended[j % n], decoded[j % n][1]
        for image in (real, fake_sbi, f["image"]):
            augment.weak_augment(image, rng, cfg, image_size=args.image_size)

    def whole(j):
        triple(j % len(originals), rng)

    def batch(j):
        if j % args.batch == 0:
            batch_fn(elements)

    return {"read": read, "decode": decode, "sbi": blend, "augment": weak,
            "triple": whole, "batch": batch}


def bench_stages(args, sources_by_format: dict) -> dict:
    """CPU ms per triple of each stage, per format (medians over windows; module docstring)."""
    cv2.setNumThreads(0)
    steps = {fmt: _stage_steps(src, args) for fmt, src in sources_by_format.items()}
    times = {fmt: {st: [] for st in STAGES} for fmt in steps}
    load_before = load_average()
    for _ in range(args.windows):
        for fmt, stage_steps in steps.items():
            for st, fn in stage_steps.items():
                fn(0)
                c0 = time.process_time()
                for j in range(args.stage_triples):
                    fn(j)
                times[fmt][st].append(1e3 * (time.process_time() - c0) / args.stage_triples)
    out = {}
    for fmt, per_stage in times.items():
        med = {st: statistics.median(v) for st, v in per_stage.items()}
        med["decode"] = max(0.0, med["decode"] - med["read"])
        med["triple_and_batch"] = med["triple"] + med["batch"]
        out[fmt] = med
    return {"cpu_ms_per_triple": out, "triples_per_window": args.stage_triples,
            "load_before": load_before, "load_after": load_average()}


# --------------------------------------------------------------------------------------------
# Report


def sbi_table(result: dict) -> list[str]:
    s = result["sbi"]
    lines = [
        (
            f"SBI pairs/s, one core (OpenCV/BLAS single-threaded), {s['image_size']} px; "
            f"median of {result['args']['windows']} x {result['args']['seconds']} s windows, "
            f"load {s['load_before'][0]:.2f} -> {s['load_after'][0]:.2f}"
        ),
        "| implementation | pairs/s | min | max | CPU ms/pair |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (("ours", "cmil_jax.data.sbi.self_blend"), ("reference", "reference")):
        r = s[name]
        lines.append(
            f"| {label} | {r['median']:.1f} | {r['min']:.1f} | {r['max']:.1f} | "
            f"{r['cpu_ms_per_item']:.2f} |"
        )
    return [*lines, f"speed-up: {s['speedup']:.2f}x"]


def triples_table(result: dict) -> list[str]:
    t = result["triples"]
    lines = [
        (
            f"Training triples/s, {t['image_size']} px, batches of {t['batch_triples']} "
            f"triples ({3 * t['batch_triples']} images), {t['records']} records; reference "
            f"on the {t['reference_format']} records"
        ),
        (
            "| workers | configuration | triples/s | CPU ms/triple | CPU ms/image | "
            "/ reference (rate) | cores busy | load (1 min) |"
        ),
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    by = {(c["impl"], c["format"], c["workers"]): c for c in t["configs"]}
    for w in result["args"]["workers"]:
        ref = by[("reference", t["reference_format"], w)]
        for (impl, fmt, workers), c in by.items():
            if workers != w:
                continue
            lines.append(
                f"| {w} | {impl} {fmt} | {c['median']:.1f} | {c['cpu_ms_per_item']:.2f} | "
                f"{c['cpu_ms_per_item'] / 3:.2f} | {c['median'] / ref['median']:.2f}x | "
                f"{c['cores']:.2f} | {min(c['loads']):.2f}-{max(c['loads']):.2f} |"
            )
    for name, ratios in t["scaling"].items():
        for key, value in ratios.items():
            lines.append(f"{name} {key}: {value:.2f}x")
    return lines


def stages_table(result: dict) -> list[str]:
    st = result["stages"]
    fmts = list(st["cpu_ms_per_triple"])
    lines = [
        (
            f"CPU ms per triple by stage, one process, one thread; median of "
            f"{result['args']['windows']} windows of {st['triples_per_window']} triples, load "
            f"{st['load_before'][0]:.2f} -> {st['load_after'][0]:.2f}"
        ),
        "| stage | " + " | ".join(fmts) + " |",
        "|---|" + "---:|" * len(fmts),
    ]
    for stage in (*STAGES, "triple_and_batch"):
        lines.append(
            f"| {stage} | "
            + " | ".join(f"{st['cpu_ms_per_triple'][f][stage]:.3f}" for f in fmts)
            + " |"
        )
    return lines


def table(result: dict) -> str:
    parts = []
    for key, fn in (("sbi", sbi_table), ("triples", triples_table), ("stages", stages_table)):
        if key in result:
            parts.append("\n".join(fn(result)))
    return "\n\n".join(parts)


def record_formats() -> list[str]:
    """--formats choices: each image format (zstd records, as TFDS writes them) and
    '<format>-none' (the same records uncompressed, data_prep.convert --compression none)."""
    from cmil_jax.data import sources

    return [*sources.IMAGE_FORMATS, *(f"{f}-none" for f in sources.IMAGE_FORMATS)]


def parse_args(argv=None):

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=256, help="image side, px")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (0 = inline)")
    p.add_argument(
        "--formats",
        default="png,raw",
        help=f"comma-separated record formats of ours ({', '.join(record_formats())}); "
        "the reference reads the first",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="length of a timed window, s")
    p.add_argument("--windows", type=int, default=3, help="timed windows per configuration")
    p.add_argument("--warmup", type=float, default=3.0, help="untimed seconds after start-up")
    p.add_argument(
        "--threads", type=int, default=None, help="grain read threads (default: the pipeline's)"
    )
    p.add_argument("--batch", type=int, default=8, help="triples per batch")
    p.add_argument("--records", type=int, default=480, help="synthetic train records")
    p.add_argument(
        "--stage-triples", type=int, default=200, help="triples per window of the stage timing"
    )
    p.add_argument(
        "--before-tree",
        default=None,
        help="another source tree (e.g. an export of an earlier commit) whose triple pipeline "
        "is timed too, as configuration 'before', on the records of the first format",
    )
    p.add_argument("--data-dir", default=None, help="TFDS dir (default: a temporary one)")
    p.add_argument("--json", default=None, help="write all figures here")
    p.add_argument("--skip-sbi", action="store_true", help="no SBI pairs")
    p.add_argument("--skip-triples", action="store_true", help="no training triples")
    p.add_argument("--skip-stages", action="store_true", help="no stage timing")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and windows (for tests)")
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in record_formats()]
    if bad or not args.formats:
        p.error(f"--formats takes {', '.join(record_formats())}, got {bad or 'nothing'}")
    if args.smoke:
        args.image_size = min(args.image_size, 64)
        args.seconds, args.windows, args.warmup = 0.2, 2, 0.1
        args.batch, args.records, args.stage_triples = 2, 12, 4
    return args


def main(argv=None):
    args = parse_args(argv)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.input_pipeline " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items() if k != "data_dir"},
        "load_average_start": load_average(),
    }
    print(
        f"{result['machine']['cpu_model']}, {result['machine']['vcpus']} vCPUs, "
        f"load {result['load_average_start']}",
        flush=True,
    )
    if not args.skip_sbi:
        result["sbi"] = bench_sbi(args)
        print(
            f"  SBI: ours {result['sbi']['ours']['median']:.1f} pairs/s, reference "
            f"{result['sbi']['reference']['median']:.1f} pairs/s",
            flush=True,
        )
    if not (args.skip_triples and args.skip_stages):
        with tempfile.TemporaryDirectory() as tmp:
            args.data_dir = args.data_dir or tmp
            sources_by_format = open_train_sources(args)
            if not args.skip_triples:
                result["triples"] = bench_triples(args, sources_by_format)
            if not args.skip_stages:
                result["stages"] = bench_stages(args, sources_by_format)
    result["load_average_end"] = load_average()
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
