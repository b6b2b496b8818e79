"""The floor of a ResNet CMIL training step: FLOPs and the fewest bytes each kind of kernel
must move, and the time they take at a device's measured rates.

    python -m benchmarks.step_floor --backbone resnet50 --image-size 256 --batch 128 \
        --dtype bfloat16 [--copy-gbs 4300] [--matmul-tflops 790] [--json OUT]

The layer shapes are those of the model itself: the CMIL of ``benchmarks.throughput``'s
config is traced (jax.eval_shape, nothing computed) with a ResNet layer set that records every
convolution, BatchNorm and the stem's max pool. From them, per training step (forward,
backward, optimizer), with activations in the compute dtype and parameters, gradients and
optimizer moments in float32:

  convolutions  forward, input gradient (not for the stem) and weight gradient: each reads its
                two operands and writes its result once (2 * output * k * k * c_in FLOPs per
                pass); a pass takes max(FLOPs / matrix rate, bytes / copy bandwidth).
  batch norm    the separate passes a BatchNorm needs around library convolutions: statistics
                (read x), normalisation (+ residual add + ReLU: read x (and the residual),
                write y), backward reduction (read dy, x (and the residual where the ReLU
                mask needs it)) and backward element-wise pass (read dy, x (and the residual),
                write dx (and the residual's gradient)).
  element-wise  the stem's max pool and its gradient, the residual gradients' additions (one
                per block: the input's gradient is the sum of two), the image's uint8 ->
                compute-dtype normalisation, the parameters' cast to the compute dtype.
  optimizer     AdamW + the gradient norm: read parameters, gradients (twice) and both
                moments, write parameters and moments (8 float32 accesses per parameter).

The head (one transformer layer on at most a few hundred tokens) and the losses are left out:
their bytes and FLOPs are under 1% of the backbone's at 256 px. Minimum bytes: a kernel that
fused a BatchNorm into a convolution's epilogue would move less; the floor is that of this
design (library convolutions, separate BatchNorm passes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

KINDS = ("convolutions", "batch norm", "element-wise", "optimizer")


@dataclasses.dataclass
class Shapes:
    """What one forward pass of the backbone computes (shapes without dtype)."""

    convs: list  # (input shape, output shape, kernel size)
    norms: list  # (shape, relu, residual)
    pools: list  # (input shape, output shape)
    image: tuple
    params: int  # every parameter of the model (backbone and head)
    conv_params: int


def record_shapes(cfg, batch: int) -> Shapes:
    """Traces CMIL(cfg.model) at (batch, image_size, image_size, 3) with recording layers."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from cmil_jax import train  # pylint: disable=import-outside-toplevel
    from cmil_jax.models import resnet  # pylint: disable=import-outside-toplevel

    base = resnet.FLAX_LAYERS
    convs, norms, pools = [], [], []

    def conv(features, kernel_size, stride=1, dilation=1, **kw):
        module = base.conv(features, kernel_size, stride, dilation, **kw)

        def call(x):
            y = module(x)
            convs.append((tuple(x.shape), tuple(y.shape), kernel_size))
            return y

        return call

    def norm(train, *, relu=False, **kw):
        bn = base.norm(train, relu=relu, **kw)

        def call(x):
            norms.append((tuple(x.shape), relu, False))
            return bn(x)

        return call

    def norm_add_relu(train, **kw):
        bn = base.norm(train, **kw)

        def call(y, residual):
            norms.append((tuple(y.shape), True, True))
            return jax.nn.relu(residual + bn(y))

        return call

    def max_pool(x):
        y = base.max_pool(x)
        pools.append((tuple(x.shape), tuple(y.shape)))
        return y

    layers = resnet.Layers("recording", conv, norm, max_pool, norm_add_relu)
    model = train.build_model(cfg, layers)
    size = cfg.data.image_size
    image = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=True), image)
    params = sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))
    conv_params = sum(k * k * i[-1] * o[-1] for i, o, k in convs)
    return Shapes(convs, norms, pools, (batch, size, size, 3), params, conv_params)


def floor(shapes: Shapes, act_bytes: int, copy_gbs: float, matmul_tflops: float) -> dict:
    """-> {kind: {'gflop', 'gbytes', 'ms'}} and 'total', per training step. `act_bytes`: bytes
    per activation element (2 for bfloat16); copy_gbs: GB/s counting bytes read + written;
    matmul_tflops: the dense matrix rate in the compute dtype."""
    bw = copy_gbs * 1e9
    rate = matmul_tflops * 1e12
    out = {k: {"gflop": 0.0, "gbytes": 0.0, "ms": 0.0} for k in KINDS}

    def add(kind, flop, nbytes, time_s=None):
        out[kind]["gflop"] += flop / 1e9
        out[kind]["gbytes"] += nbytes / 1e9
        out[kind]["ms"] += 1e3 * (nbytes / bw if time_s is None else time_s)

    s = act_bytes
    for i, (x_shape, y_shape, k) in enumerate(shapes.convs):
        n_in, n_out = math.prod(x_shape), math.prod(y_shape)
        w = k * k * x_shape[-1] * y_shape[-1]
        flop = 2.0 * n_out * k * k * x_shape[-1]
        passes = [s * (n_in + w + n_out),  # forward
                  s * (n_in + n_out) + 4 * w]  # weight gradient (float32)
        if i > 0:  # the stem's input (the image) needs no gradient
            passes.append(s * (n_out + w + n_in))
        for nbytes in passes:
            add("convolutions", flop, nbytes, max(flop / rate, nbytes / bw))
    for shape, relu, residual in shapes.norms:
        n = math.prod(shape)
        r = 1 if residual else 0
        reads_mask = 1 if (relu and residual) else 0
        nbytes = s * n * (1  # statistics: x
                          + 2 + r  # normalisation: x (+ residual) -> y
                          + 2 + reads_mask  # backward reduction: dy, x (+ residual)
                          + 3 + 2 * r)  # backward element-wise: dy, x (+ residual) -> dx (+ dr)
        add("batch norm", 8.0 * n, nbytes)
    for x_shape, y_shape in shapes.pools:
        n_in, n_out = math.prod(x_shape), math.prod(y_shape)
        add("element-wise", 9.0 * n_out, s * (n_in + n_out))  # forward
        add("element-wise", 9.0 * n_out, s * (2 * n_in + n_out))  # gradient: dy, x -> dx
    # One gradient sum per residual block, of the block input's size.
    for shape, _, residual in shapes.norms:
        if residual:
            n = math.prod(shape)  # the block output; its input has the same size or 2x it
            add("element-wise", n, 3 * s * n)
    n_img = math.prod(shapes.image)
    add("element-wise", 2.0 * n_img, n_img * (1 + s))
    add("element-wise", 0.0, shapes.conv_params * (4 + s))  # float32 weights -> compute dtype
    add("optimizer", 12.0 * shapes.params, 4 * 8 * shapes.params)
    total = {key: sum(out[k][key] for k in KINDS) for key in ("gflop", "gbytes", "ms")}
    out["total"] = total
    return out


# Kernel kinds of benchmarks.profile_step -> the floor's kind they are compared with.
PROFILE_KINDS = {
    "convolution": "convolutions",
    "matrix product": "convolutions",
    "batch norm": "batch norm",
    "reduction": "batch norm",
}


def compare(result: dict, profile_kinds: dict | None) -> list[str]:
    """Markdown lines: the floor per kind, next to the profile's ms per step where given
    (profile_kinds: profile_step kind -> ms per step)."""
    lines = ["| kind | GFLOP | GB moved (min) | floor ms | profiled ms | profiled / floor |",
             "|---|---:|---:|---:|---:|---:|"]
    profiled = {k: 0.0 for k in (*KINDS, "total")}
    if profile_kinds:
        for kind, ms in profile_kinds.items():
            # Everything else (element-wise fusions, copies, the optimizer's fused loops) is
            # memory-bound element-wise work: compared with element-wise + optimizer.
            profiled[PROFILE_KINDS.get(kind, "element-wise")] += ms
            profiled["total"] += ms
    rows = list(KINDS) + ["total"]
    for kind in rows:
        r = result[kind]
        p = profiled[kind] if profile_kinds else None
        if kind == "optimizer" and profile_kinds:
            continue  # XLA fuses it into element-wise kernels: compared with those
        if kind == "element-wise" and profile_kinds:
            r = {key: r[key] + result["optimizer"][key] for key in r}
            kind = "element-wise + optimizer"
        ratio = f"{p / r['ms']:.2f}" if p and r["ms"] else ""
        lines.append(f"| {kind} | {r['gflop']:.1f} | {r['gbytes']:.2f} | {r['ms']:.2f} | "
                     f"{'' if p is None else f'{p:.2f}'} | {ratio} |")
    return lines


def floor_for(cfg, batch: int, dtype: str, copy_gbs: float, matmul_tflops: float) -> dict:
    shapes = record_shapes(cfg, batch)
    act_bytes = 2 if dtype == "bfloat16" else 4
    result = floor(shapes, act_bytes, copy_gbs, matmul_tflops)
    result["inputs"] = {"batch": batch, "image_size": cfg.data.image_size, "dtype": dtype,
                        "backbone": cfg.model.backbone, "copy_gbs": copy_gbs,
                        "matmul_tflops": matmul_tflops, "convolutions": len(shapes.convs),
                        "batch_norms": len(shapes.norms), "parameters": shapes.params}
    return result


def main(argv=None):
    from benchmarks import throughput  # pylint: disable=import-outside-toplevel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--backbone-width", type=int, default=None)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--copy-gbs", type=float, default=4300.0,
                   help="device copy bandwidth, GB/s read + written (default: an H200's)")
    p.add_argument("--matmul-tflops", type=float, default=790.0,
                   help="dense matrix rate in the compute dtype (default: an H200's, bf16)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.kernels = args.malloc = None
    cfg = throughput.make_config(args)
    result = floor_for(cfg, args.batch, args.dtype, args.copy_gbs, args.matmul_tflops)
    i = result["inputs"]
    print(f"floor of one training step: {i['backbone']} {i['image_size']} px batch {i['batch']} "
          f"{i['dtype']}, {i['convolutions']} convolutions, {i['batch_norms']} BatchNorms, "
          f"{i['parameters']} parameters; at {i['copy_gbs']:.0f} GB/s and "
          f"{i['matmul_tflops']:.0f} TFLOP/s\n")
    print("\n".join(compare(result, None)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
