"""A device's two ceilings: copy bandwidth and dense matrix rate, measured through PyTorch.

    python -m benchmarks.ceilings [--copy-mib 4096] [--matmul-n 8192] [--json OUT]

copy: a device-to-device copy of ``--copy-mib`` MiB of random bytes, counting the bytes read
and written (GB/s = 2 * size / time). matmul: an n x n x n product of random normal matrices
in bfloat16 on a GPU (float32 on the CPU), 2 n^3 FLOPs. Each figure is the median of the timed
repetitions (device events on a GPU, a host clock around a synchronised loop elsewhere) after
warm-up repetitions. These are the rates benchmarks/step_floor.py turns bytes and FLOPs into
time with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _timer(torch, cuda):
    """-> time_ms(fn): one call of fn, in ms."""
    def time_ms(fn):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return time_ms


def measure(copy_mib: int, matmul_n: int, warmup: int = 3, reps: int = 10) -> dict:
    import torch  # pylint: disable=import-outside-toplevel

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    time_ms = _timer(torch, cuda)
    gen = torch.Generator(device=dev).manual_seed(0)

    nbytes = copy_mib * 2**20
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev, generator=gen)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    copy_ms = [time_ms(lambda: dst.copy_(src)) for _ in range(reps)]
    if not torch.equal(dst[:4096], src[:4096]):
        raise RuntimeError("the copy did not copy")
    del src, dst

    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(matmul_n, matmul_n, device=dev, dtype=dtype, generator=gen)
    b = torch.randn(matmul_n, matmul_n, device=dev, dtype=dtype, generator=gen)
    for _ in range(warmup):
        c = a @ b
    mm_ms = [time_ms(lambda: a @ b) for _ in range(reps)]
    assert torch.isfinite(c).all()
    copy_med, mm_med = statistics.median(copy_ms), statistics.median(mm_ms)
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "copy_bytes": nbytes,
        "copy_ms": copy_ms,
        "copy_gbs": 2 * nbytes / (copy_med * 1e-3) / 1e9,
        "matmul_n": matmul_n,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_ms": mm_ms,
        "matmul_tflops": 2 * matmul_n**3 / (mm_med * 1e-3) / 1e12,
        "method": f"median of {reps} after {warmup} warm-up repetitions; random data; "
        + ("CUDA events" if cuda else "host clock"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copy-mib", type=int, default=4096)
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = measure(args.copy_mib, args.matmul_n)
    print(f"{result['device']}: copy {result['copy_gbs']:.0f} GB/s (read + written, "
          f"{args.copy_mib} MiB); {result['matmul_dtype']} matmul {args.matmul_n}^3 "
          f"{result['matmul_tflops']:.3g} TFLOP/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
