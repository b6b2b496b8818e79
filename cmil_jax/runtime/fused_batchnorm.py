"""BatchNorm (+ residual add + ReLU) in training mode with a closed-form backward pass.

The same function as flax.linen.BatchNorm followed by ``relu(y + residual)``: statistics over
every axis but the last, in float32, with flax's single-pass variance (E[x^2] - E[x]^2,
clipped at 0); normalisation ``(x - mean) * (rsqrt(var + eps) * scale) + bias``, then the
residual add and the ReLU in float32, rounded once to the output dtype. Its backward pass is
written out (a ``jax.custom_vjp``) as one reduction pass and one element-wise pass over the
activation, instead of what autodiff of the forward leaves to the compiler:

  forward:  stats    read x                  -> sum x, sum x^2 per channel (float32)
            apply    read x (+ residual)     -> y = relu(xhat * scale + bias + residual)
  backward: reduce   read dy, x (+ residual) -> sum dz, sum dz * xhat   (dz = dy * [z > 0])
            apply    read dy, x (+ residual) -> dx (and d residual = dz)

Two implementations of these four passes, ``impl``:
  'jnp'     jax.numpy, left to XLA to fuse;
  'pallas'  Pallas kernels (Triton on GPU; ``interpret=True`` runs them anywhere, slowly, for
            tests). An activation viewed as (rows, channels) is cut into blocks of rows x
            channels; the reductions write per-block partial sums that jax.numpy adds up. Shapes
            that do not tile (the channel count not a multiple of a power of two of at least
            8, or too few rows) are computed by the 'jnp' passes, which give the same result.

``FusedBatchNorm`` is the flax module (the variables of flax.linen.BatchNorm: params
scale/bias, batch_stats mean/var; running averages updated as flax does, with the biased batch
variance); ``layers(impl)`` turns a ResNet layer set into one that uses it.

Pallas kernels run on one device: under jit over several devices the 'pallas' passes would
see each device's shard only, so runtime.resolve refuses 'pallas' with more than one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLS = ("jnp", "pallas")

# Pallas block sizes: rows of one element-wise block, and the largest channel block. A
# reduction program sums REDUCE_ROWS rows (in ROW_BLOCK-row steps) of one channel block.
ROW_BLOCK = 256
CHANNEL_BLOCK = 64
REDUCE_ROWS = 2048


# ----------------------------------------------------------------------------- 'jnp' passes


def _jnp_stats(x2):
    """x2 (M, C) -> (sum x, sum x^2), each (C,) float32."""
    xf = x2.astype(jnp.float32)
    return jnp.sum(xf, axis=0), jnp.sum(xf * xf, axis=0)


def _jnp_apply(x2, r2, mean, a, b, relu, dtype):
    """relu((x - mean) * a + b + r) -> dtype; x2, r2 (M, C) (r2 may be None); mean, a, b (C,)
    float32."""
    z = (x2.astype(jnp.float32) - mean) * a + b
    if r2 is not None:
        z = z + r2.astype(jnp.float32)
    if relu:
        z = jnp.maximum(z, 0.0)
    return z.astype(dtype)


def _jnp_grad_sums(dy2, x2, r2, mean, a, b, rstd, relu):
    """-> (sum dz, sum dz * xhat), each (C,) float32; dz = dy * [z > 0] with ReLU, else dy."""
    dz = _masked_grad(dy2, x2, r2, mean, a, b, relu)
    xhat = (x2.astype(jnp.float32) - mean) * rstd
    return jnp.sum(dz, axis=0), jnp.sum(dz * xhat, axis=0)


def _masked_grad(dy2, x2, r2, mean, a, b, relu):
    dz = dy2.astype(jnp.float32)
    if relu:
        z = (x2.astype(jnp.float32) - mean) * a + b
        if r2 is not None:
            z = z + r2.astype(jnp.float32)
        dz = jnp.where(z > 0, dz, 0.0)
    return dz


def _jnp_grad_apply(dy2, x2, r2, mean, a, b, p, q, o, relu, x_dtype, r_dtype):
    """dx = p * dz + q * (x - mean) + o (per-channel p, q, o); d residual = dz."""
    dz = _masked_grad(dy2, x2, r2, mean, a, b, relu)
    dx = p * dz + q * (x2.astype(jnp.float32) - mean) + o
    return dx.astype(x_dtype), (None if r2 is None else dz.astype(r_dtype))


# ----------------------------------------------------------------------------- Pallas passes


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How an (M, C) activation is cut into Pallas blocks."""

    rows: int  # rows per element-wise block (a power of two dividing M)
    channels: int  # channels per block (a power of two dividing C)
    reduce_steps: int  # row blocks summed by one reduction program (divides M // rows)


def tiling(m: int, c: int) -> Tiling | None:
    """The blocks for an (m, c) activation, or None where it does not tile (see module doc)."""
    channels = CHANNEL_BLOCK
    while channels >= 8 and c % channels:
        channels //= 2
    rows = ROW_BLOCK
    while rows >= 8 and m % rows:
        rows //= 2
    if channels < 8 or rows < 8:
        return None
    steps = max(1, REDUCE_ROWS // rows)
    while (m // rows) % steps:
        steps //= 2
    return Tiling(rows, channels, steps)


def _compiler_params():
    """Triton launch parameters on GPU (None elsewhere: interpret mode ignores them)."""
    if jax.default_backend() != "gpu":
        return None
    try:
        # pylint: disable-next=import-outside-toplevel
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=8, num_stages=2)
    except (ImportError, AttributeError):  # another jax: Triton's defaults
        return None


def _vec_spec(t: Tiling):
    """A (1, C) per-channel vector, one channel block per program (grid (rows, channels))."""
    from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel

    return pl.BlockSpec((1, t.channels), lambda i, j: (0, j))


def _pallas_reduce(kernel, t: Tiling, m, c, mats, vecs, name, interpret):
    """Runs a reduction kernel over (m, c) matrices `mats` and (1, c) vectors `vecs`; the kernel
    writes two (1, channels) partial sums per program -> their totals, each (c,) float32."""
    from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel

    block_rows = t.rows * t.reduce_steps
    groups = m // block_rows
    mat_spec = pl.BlockSpec((block_rows, t.channels), lambda i, j: (i, j))
    part_spec = pl.BlockSpec((1, t.channels), lambda i, j: (i, j))
    part = jax.ShapeDtypeStruct((groups, c), jnp.float32)
    s1, s2 = pl.pallas_call(
        kernel,
        out_shape=(part, part),
        grid=(groups, c // t.channels),
        in_specs=[mat_spec] * len(mats) + [_vec_spec(t)] * len(vecs),
        out_specs=(part_spec, part_spec),
        interpret=interpret,
        compiler_params=_compiler_params(),
        name=name,
    )(*mats, *vecs)
    return jnp.sum(s1, axis=0), jnp.sum(s2, axis=0)


def _pallas_map(kernel, t: Tiling, m, c, mats, vecs, out_dtypes, name, interpret):
    """Runs an element-wise kernel over (m, c) matrices and (1, c) vectors -> (m, c) outputs."""
    from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel

    spec = pl.BlockSpec((t.rows, t.channels), lambda i, j: (i, j))
    return pl.pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct((m, c), d) for d in out_dtypes),
        grid=(m // t.rows, c // t.channels),
        in_specs=[spec] * len(mats) + [_vec_spec(t)] * len(vecs),
        out_specs=tuple(spec for _ in out_dtypes),
        interpret=interpret,
        compiler_params=_compiler_params(),
        name=name,
    )(*mats, *vecs)


def _row_loop(t: Tiling, body, init):
    """Sums body(row slice) over the reduce_steps row blocks of a reduction program."""
    from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel

    if t.reduce_steps == 1:
        return body(slice(None))

    def step(k, acc):
        part = body(pl.ds(pl.multiple_of(k * t.rows, t.rows), t.rows))
        return tuple(a + p for a, p in zip(acc, part))

    return jax.lax.fori_loop(0, t.reduce_steps, step, init)


def _pallas_stats(x2, t: Tiling, interpret):
    m, c = x2.shape

    def fused_bn_stats(x_ref, s1_ref, s2_ref):
        def body(rows):
            x = x_ref[rows, :].astype(jnp.float32)
            return jnp.sum(x, axis=0, keepdims=True), jnp.sum(x * x, axis=0, keepdims=True)

        zero = jnp.zeros((1, t.channels), jnp.float32)
        s1, s2 = _row_loop(t, body, (zero, zero))
        s1_ref[...] = s1
        s2_ref[...] = s2

    return _pallas_reduce(fused_bn_stats, t, m, c, [x2], [], "fused_bn_stats", interpret)


def _pallas_apply(x2, r2, mean, a, b, relu, dtype, t: Tiling, interpret):
    m, c = x2.shape

    def fused_bn_apply(*refs):
        if r2 is None:
            x_ref, mean_ref, a_ref, b_ref, y_ref = refs
        else:
            x_ref, r_ref, mean_ref, a_ref, b_ref, y_ref = refs
        z = (x_ref[...].astype(jnp.float32) - mean_ref[...]) * a_ref[...] + b_ref[...]
        if r2 is not None:
            z = z + r_ref[...].astype(jnp.float32)
        if relu:
            z = jnp.maximum(z, 0.0)
        y_ref[...] = z.astype(y_ref.dtype)

    mats = [x2] if r2 is None else [x2, r2]
    (y,) = _pallas_map(fused_bn_apply, t, m, c, mats, [mean[None], a[None], b[None]], [dtype],
                       "fused_bn_apply", interpret)
    return y


def _kernel_dz(dy_ref, x_ref, r_ref, mean_ref, a_ref, b_ref, rows, relu):
    """(dz, x - mean) of one block in a kernel (the rows `rows` of the refs), float32."""
    dz = dy_ref[rows, :].astype(jnp.float32)
    xc = x_ref[rows, :].astype(jnp.float32) - mean_ref[...]
    if relu:
        z = xc * a_ref[...] + b_ref[...]
        if r_ref is not None:
            z = z + r_ref[rows, :].astype(jnp.float32)
        dz = jnp.where(z > 0, dz, 0.0)
    return dz, xc


def _pallas_grad_sums(dy2, x2, r2, mean, a, b, rstd, relu, t: Tiling, interpret):
    m, c = x2.shape

    def fused_bn_grad_reduce(*refs):
        if r2 is None:
            dy_ref, x_ref, mean_ref, a_ref, b_ref, rstd_ref, s1_ref, s2_ref = refs
            r_ref = None
        else:
            dy_ref, x_ref, r_ref, mean_ref, a_ref, b_ref, rstd_ref, s1_ref, s2_ref = refs

        def body(rows):
            dz, xc = _kernel_dz(dy_ref, x_ref, r_ref, mean_ref, a_ref, b_ref, rows, relu)
            xhat = xc * rstd_ref[...]
            return jnp.sum(dz, axis=0, keepdims=True), jnp.sum(dz * xhat, axis=0, keepdims=True)

        zero = jnp.zeros((1, t.channels), jnp.float32)
        s1, s2 = _row_loop(t, body, (zero, zero))
        s1_ref[...] = s1
        s2_ref[...] = s2

    mats = [dy2, x2] if r2 is None else [dy2, x2, r2]
    vecs = [v[None] for v in (mean, a, b, rstd)]
    return _pallas_reduce(fused_bn_grad_reduce, t, m, c, mats, vecs, "fused_bn_grad_reduce",
                          interpret)


def _pallas_grad_apply(dy2, x2, r2, mean, a, b, p, q, o, relu, x_dtype, r_dtype, t: Tiling,
                       interpret):
    m, c = x2.shape

    def fused_bn_grad_apply(*refs):
        if r2 is None:
            dy_ref, x_ref, mean_ref, a_ref, b_ref, p_ref, q_ref, o_ref, dx_ref = refs
            r_ref = dr_ref = None
        else:
            (dy_ref, x_ref, r_ref, mean_ref, a_ref, b_ref, p_ref, q_ref, o_ref, dx_ref,
             dr_ref) = refs
        dz, xc = _kernel_dz(dy_ref, x_ref, r_ref, mean_ref, a_ref, b_ref, slice(None), relu)
        dx = p_ref[...] * dz + q_ref[...] * xc + o_ref[...]
        dx_ref[...] = dx.astype(dx_ref.dtype)
        if dr_ref is not None:
            dr_ref[...] = dz.astype(dr_ref.dtype)

    mats = [dy2, x2] if r2 is None else [dy2, x2, r2]
    vecs = [v[None] for v in (mean, a, b, p, q, o)]
    dtypes = [x_dtype] if r2 is None else [x_dtype, r_dtype]
    outs = _pallas_map(fused_bn_grad_apply, t, m, c, mats, vecs, dtypes, "fused_bn_grad_apply",
                       interpret)
    return outs[0], (outs[1] if r2 is not None else None)


# ----------------------------------------------------------------------------- the function


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of a call (hashable: custom_vjp's non-differentiable argument)."""

    eps: float
    relu: bool
    impl: str
    interpret: bool
    dtype: Any


def _passes(spec: _Spec, m: int, c: int):
    """(tiling or None): None means the 'jnp' passes compute this shape."""
    if spec.impl != "pallas":
        return None
    return tiling(m, c)


def _forward(spec: _Spec, x, scale, bias, residual):
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    m = x2.shape[0]
    r2 = None if residual is None else residual.reshape(-1, c)
    t = _passes(spec, m, c)
    s1, s2 = _jnp_stats(x2) if t is None else _pallas_stats(x2, t, spec.interpret)
    mean = s1 / m
    var = jnp.maximum(0.0, s2 / m - mean * mean)
    rstd = jax.lax.rsqrt(var + spec.eps)
    a = rstd * scale.astype(jnp.float32)  # flax: rsqrt(var + eps) * scale
    b = bias.astype(jnp.float32)
    if t is None:
        y2 = _jnp_apply(x2, r2, mean, a, b, spec.relu, spec.dtype)
    else:
        y2 = _pallas_apply(x2, r2, mean, a, b, spec.relu, spec.dtype, t, spec.interpret)
    return y2.reshape(x.shape), mean, var, (x2, r2, mean, a, b, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bn(spec: _Spec, x, scale, bias, residual):
    y, mean, var, _ = _forward(spec, x, scale, bias, residual)
    return y, mean, var


def _bn_fwd(spec: _Spec, x, scale, bias, residual):
    y, mean, var, saved = _forward(spec, x, scale, bias, residual)
    x2, r2, mean, a, b, rstd = saved
    return (y, mean, var), (x2, r2, mean, a, b, rstd, scale, bias)


def _bn_bwd(spec: _Spec, saved, cotangents):
    x2, r2, mean, a, b, rstd, scale, bias = saved
    dy, dmean, dvar = cotangents
    shape = dy.shape
    m, c = x2.shape
    dy2 = dy.reshape(m, c)
    t = _passes(spec, m, c)
    if t is None:
        sum_dz, sum_dz_xhat = _jnp_grad_sums(dy2, x2, r2, mean, a, b, rstd, spec.relu)
    else:
        sum_dz, sum_dz_xhat = _pallas_grad_sums(dy2, x2, r2, mean, a, b, rstd, spec.relu, t,
                                                spec.interpret)
    # dx = a (dz - mean(dz) - xhat mean(dz xhat)) + d mean / m + 2 d var (x - mean) / m,
    # as p dz + q (x - mean) + o per channel.
    p = a
    q = 2.0 * dvar.astype(jnp.float32) / m - a * rstd * sum_dz_xhat / m
    o = dmean.astype(jnp.float32) / m - a * sum_dz / m
    r_dtype = None if r2 is None else r2.dtype
    if t is None:
        dx2, dr2 = _jnp_grad_apply(dy2, x2, r2, mean, a, b, p, q, o, spec.relu, x2.dtype,
                                   r_dtype)
    else:
        dx2, dr2 = _pallas_grad_apply(dy2, x2, r2, mean, a, b, p, q, o, spec.relu, x2.dtype,
                                      r_dtype, t, spec.interpret)
    dscale = (sum_dz_xhat).astype(scale.dtype)
    dbias = sum_dz.astype(bias.dtype)
    dr = None if dr2 is None else dr2.reshape(shape)
    return dx2.reshape(shape), dscale, dbias, dr


_bn.defvjp(_bn_fwd, _bn_bwd)


def batch_norm_train(x, scale, bias, residual=None, *, relu=False, eps=1e-5, impl="jnp",
                     interpret=None, dtype=None):
    """Training-mode BatchNorm over every axis of x but the last, then + residual, then ReLU.

    x: (..., C) activations (any float dtype); scale, bias: (C,); residual: like x or None.
    impl: 'jnp' or 'pallas'; interpret: run Pallas kernels in interpret mode (default: when
    the backend is not a GPU). dtype: of the output (default x.dtype).
    -> (y like x in `dtype`, batch mean (C,) float32, biased batch variance (C,) float32).
    """
    if impl not in IMPLS:
        raise ValueError(f"fused BatchNorm impl {impl!r}: expected one of {', '.join(IMPLS)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"fused BatchNorm: residual shape {residual.shape} != input {x.shape}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    spec = _Spec(float(eps), bool(relu), impl, bool(interpret), jnp.dtype(dtype or x.dtype))
    return _bn(spec, x, scale, bias, residual)


# ----------------------------------------------------------------------------- flax module


class FusedBatchNorm(nn.Module):
    """flax.linen.BatchNorm (feature axis last) + optional residual add + optional ReLU.

    The variables, their names, initialisation and running-average updates are flax's: params
    'scale' and 'bias' (C,) in param_dtype, batch_stats 'mean' (zeros) and 'var' (ones),
    float32, ``ra = momentum * ra + (1 - momentum) * batch value`` with the biased batch
    variance, not updated while initialising. ``__call__(x, residual=None)`` -> like x in
    ``dtype``: relu(BN(x) + residual). Evaluation (use_running_average) is plain jax.numpy.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    relu: bool = False
    impl: str = "jnp"
    interpret: bool | None = None
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual=None):
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        dtype = self.dtype or x.dtype
        if self.use_running_average:
            # flax's _normalize, then the residual and the ReLU in float32.
            mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
            z = (x - ra_mean.value) * mul + bias
            if residual is not None:
                z = z + residual.astype(jnp.float32)
            if self.relu:
                z = jnp.maximum(z, 0.0)
            return z.astype(dtype)
        y, mean, var = batch_norm_train(
            x, scale, bias, residual, relu=self.relu, eps=self.epsilon, impl=self.impl,
            interpret=self.interpret, dtype=dtype)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
            ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
        return y


def layers(base, impl: str, interpret: bool | None = None):
    """The ResNet layer set `base` (models.resnet.Layers) with its BatchNorms, their ReLUs and
    the blocks' residual add + ReLU computed by FusedBatchNorm(impl); named
    '<base name>+bn_<impl>'."""
    from cmil_jax.models import resnet  # pylint: disable=import-outside-toplevel

    if impl not in IMPLS:
        raise ValueError(f"fused BatchNorm impl {impl!r}: expected one of {', '.join(IMPLS)}")

    def norm(train, *, relu=False, scale_init=nn.initializers.ones, name, dtype, param_dtype):
        return FusedBatchNorm(
            use_running_average=not train, momentum=resnet.BN_MOMENTUM, epsilon=resnet.BN_EPS,
            relu=relu, impl=impl, interpret=interpret, scale_init=scale_init, dtype=dtype,
            param_dtype=param_dtype, name=name)

    def norm_add_relu(train, *, scale_init=nn.initializers.ones, name, dtype, param_dtype):
        bn = norm(train, relu=True, scale_init=scale_init, name=name, dtype=dtype,
                  param_dtype=param_dtype)
        return lambda y, residual: bn(y, residual)

    return dataclasses.replace(base, name=f"{base.name}+bn_{impl}", norm=norm,
                               norm_add_relu=norm_add_relu)
