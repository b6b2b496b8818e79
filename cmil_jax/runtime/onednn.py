"""ResNet convolutions and training-mode BatchNorm (+ ReLU) through oneDNN on the CPU backend,
as XLA FFI custom calls (onednn_conv.cc).

XLA:CPU (jaxlib 0.10) runs convolutions through YNNPACK, whose kernels take longer than
oneDNN's (the library PyTorch uses on CPU), forward and backward, and spends several passes
over each activation on the BatchNorm statistics and their gradient (benchmarks/RESULTS.md).
This module compiles ``onednn_conv.cc`` against the oneDNN of the ``onednn`` extra
(``pip install -e '.[onednn]'``, or any oneDNN 3.x under ``$CMIL_ONEDNN_ROOT``) with the
system's C++ compiler (``$CXX``, default g++) on first use, caches the shared library under
``$CMIL_JAX_CACHE`` (default ``~/.cache/cmil_jax``) and registers its calls with XLA.

  conv2d(x, kernel, stride, dilation, pad)        NHWC x, HWIO kernel -> NHWC, float32
  conv_general_dilated(...)                       the same with lax's signature (flax Conv)
  batch_norm_train(x, scale, shift, eps, relu)    -> (y, batch mean, biased batch variance)

both differentiable (``jax.custom_vjp``: the backward passes are oneDNN calls too), and
``ONEDNN_LAYERS``, the ResNet layer set built on them. ``available()`` says whether they can be
used here and, if not, why; the functions raise ``OneDNNUnavailable`` with that reason.

On several devices XLA does not split a custom call: it gathers the operands and runs the call
on the whole batch on every device, so the results are those of one device (BatchNorm over the
global batch) at the cost of repeating the work.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import site
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cmil_jax.models import resnet
from cmil_jax.runtime import matmul

_SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
_TARGETS = (
    "cmil_onednn_conv_fwd",
    "cmil_onednn_conv_bwd_data",
    "cmil_onednn_conv_bwd_weights",
    "cmil_onednn_bn_fwd",
    "cmil_onednn_bn_bwd",
)


class OneDNNUnavailable(RuntimeError):
    """The oneDNN calls cannot be built or loaded here; the message says why."""


def _f32(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _prefixes():
    """Where pip puts the data files of the onednn wheels: this environment, the user base."""
    seen = []
    for p in (sys.prefix, site.getuserbase(), sys.base_prefix):
        if p and p not in seen:
            seen.append(p)
    return [pathlib.Path(p) for p in seen]


def _find_onednn():
    """(include dir, lib dir) of an installed oneDNN (pip `onednn-*cpu-gomp` or the system)."""
    env = os.environ.get("CMIL_ONEDNN_ROOT")
    roots = [pathlib.Path(env)] if env else _prefixes() + [pathlib.Path("/usr")]
    for root in roots:
        inc = root / "include"
        if not (inc / "oneapi" / "dnnl" / "dnnl.hpp").exists():
            continue
        for lib in (root / "lib", root / "lib64", root / "lib" / "x86_64-linux-gnu"):
            if list(lib.glob("libdnnl.so*")):
                return inc, lib
    raise OneDNNUnavailable(
        "oneDNN headers and library not found (looked under "
        f"{', '.join(str(r) for r in roots)}): pip install -e '.[onednn]' "
        "(onednn-cpu-gomp and onednn-devel-cpu-gomp) or set CMIL_ONEDNN_ROOT"
    )


def _build() -> pathlib.Path:
    inc, lib = _find_onednn()
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise OneDNNUnavailable(f"no C++ compiler ({cxx!r} not on PATH) to build {_SOURCE.name}")
    ffi_inc = jax.ffi.include_dir()
    digest = hashlib.sha256(
        _SOURCE.read_bytes() + f"{inc}{lib}{ffi_inc}{jax.__version__}".encode()
    ).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("CMIL_JAX_CACHE", pathlib.Path.home() / ".cache" / "cmil_jax"))
    out = cache / f"libcmil_onednn_{digest}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wno-attributes", "-w",
           f"-I{ffi_inc}", f"-I{inc}", str(_SOURCE), f"-L{lib}", "-ldnnl",
           f"-Wl,-rpath,{lib}", "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OneDNNUnavailable(f"building {_SOURCE.name} failed:\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    os.replace(tmp, out)
    return out


_loaded = {}  # "library" or "error", set by the first _load()


def _load():
    """Builds (once) and registers the custom calls; returns the library or raises
    OneDNNUnavailable (the same error on every later call)."""
    if not _loaded:
        try:
            library = ctypes.cdll.LoadLibrary(str(_build()))
            for name in _TARGETS:
                jax.ffi.register_ffi_target(
                    name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu"
                )
            _loaded["library"] = library
        except OneDNNUnavailable as err:
            _loaded["error"] = err
        except OSError as err:  # the library would not load (e.g. libgomp missing)
            _loaded["error"] = OneDNNUnavailable(f"loading the oneDNN calls failed: {err}")
    if "error" in _loaded:
        raise _loaded["error"]
    return _loaded["library"]


def available() -> tuple[bool, str]:
    """(True, '') when the oneDNN calls are usable, else (False, why)."""
    try:
        _load()
    except OneDNNUnavailable as err:
        return False, str(err)
    return True, ""


def _conv_attrs(stride, dilation, pad):
    (plh, phh), (plw, phw) = pad
    return dict(stride=np.int64(stride), dilation=np.int64(dilation), pad_lo_h=np.int64(plh),
                pad_hi_h=np.int64(phh), pad_lo_w=np.int64(plw), pad_hi_w=np.int64(phw))


def _conv_forward(x, kernel, stride, dilation, pad):
    b, h, w, _ = x.shape
    kh, kw = kernel.shape[:2]
    (plh, phh), (plw, phw) = pad
    oh = (h + plh + phh - dilation * (kh - 1) - 1) // stride + 1
    ow = (w + plw + phw - dilation * (kw - 1) - 1) // stride + 1
    out = _f32((b, oh, ow, kernel.shape[3]))
    return jax.ffi.ffi_call("cmil_onednn_conv_fwd", out)(x, kernel, **_conv_attrs(stride, dilation, pad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, stride, dilation, pad):
    return _conv_forward(x, kernel, stride, dilation, pad)


def _conv_fwd(x, kernel, stride, dilation, pad):
    return _conv_forward(x, kernel, stride, dilation, pad), (x, kernel)


def _conv_bwd(stride, dilation, pad, residuals, g):
    x, kernel = residuals
    attrs = _conv_attrs(stride, dilation, pad)
    dx = jax.ffi.ffi_call("cmil_onednn_conv_bwd_data", _f32(x.shape))(g, kernel, **attrs)
    dk = jax.ffi.ffi_call("cmil_onednn_conv_bwd_weights", _f32(kernel.shape))(x, g, **attrs)
    return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x, kernel, stride: int = 1, dilation: int = 1, pad=0):
    """oneDNN convolution: x (B, H, W, C) float32, kernel (kh, kw, C, O) float32, one stride
    and one dilation for both axes, pad an int (symmetric) or ((top, bottom), (left, right))
    -> (B, ho, wo, O). Differentiable in x and kernel."""
    _load()
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise TypeError(f"oneDNN conv2d takes float32, got {x.dtype} and {kernel.dtype}")
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    pad = tuple(tuple(int(p) for p in side) for side in pad)
    return _conv(x, kernel, int(stride), int(dilation), pad)


@functools.lru_cache(maxsize=None)
def _workspace_bytes(b, h, w, c):
    fn = _load().cmil_onednn_bn_workspace_bytes
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_int64] * 4
    n = fn(b, h, w, c)
    if n < 0:
        raise OneDNNUnavailable(f"oneDNN has no BatchNorm + ReLU for shape {(b, h, w, c)}")
    return max(int(n), 1)


def _bn_forward(x, scale, shift, eps, relu):
    b, h, w, c = x.shape
    ws = _workspace_bytes(b, h, w, c) if relu else 1
    return jax.ffi.ffi_call(
        "cmil_onednn_bn_fwd", (_f32(x.shape), _f32((c,)), _f32((c,)), jax.ShapeDtypeStruct((ws,), jnp.uint8))
    )(x, scale, shift, eps=np.float32(eps), relu=bool(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn(x, scale, shift, eps, relu):
    y, mean, var, _ = _bn_forward(x, scale, shift, eps, relu)
    return y, mean, var


def _bn_fwd(x, scale, shift, eps, relu):
    y, mean, var, ws = _bn_forward(x, scale, shift, eps, relu)
    return (y, mean, var), (x, mean, var, scale, ws)


def _bn_bwd(eps, relu, residuals, cotangents):
    x, mean, var, scale, ws = residuals
    dy = cotangents[0]  # mean and var leave through stop_gradient (batch_norm_train)
    c = x.shape[-1]
    dx, dscale, dshift = jax.ffi.ffi_call(
        "cmil_onednn_bn_bwd", (_f32(x.shape), _f32((c,)), _f32((c,)))
    )(x, dy, mean, var, scale, ws, eps=np.float32(eps), relu=bool(relu))
    return dx, dscale, dshift


_bn.defvjp(_bn_fwd, _bn_bwd)


def batch_norm_train(x, scale, shift, eps: float = 1e-5, relu: bool = False):
    """Training-mode BatchNorm over the batch statistics of x (B, H, W, C) float32, then a
    ReLU when ``relu``: -> (y, mean (C,), biased var (C,)). y is differentiable in x, scale
    and shift; mean and var are returned under stop_gradient (for the running averages)."""
    _load()
    if x.dtype != jnp.float32:
        raise TypeError(f"oneDNN batch_norm_train takes float32, got {x.dtype}")
    y, mean, var = _bn(x, scale.astype(jnp.float32), shift.astype(jnp.float32), float(eps), bool(relu))
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


class OneDNNBatchNorm(nn.Module):
    """flax.linen.BatchNorm's computation and variables (params scale, bias; batch_stats mean,
    var), then a ReLU when ``relu``; in training the normalisation and its gradient are one
    oneDNN call each way."""

    use_running_average: bool
    relu: bool = False
    scale_init: Any = nn.initializers.ones
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        if self.use_running_average:
            mul = scale * lax.rsqrt(ra_var.value + resnet.BN_EPS)
            y = (x - ra_mean.value) * mul + bias
            return nn.relu(y) if self.relu else y
        y, mean, var = batch_norm_train(x, scale, bias, resnet.BN_EPS, self.relu)
        if not self.is_initializing():
            m = resnet.BN_MOMENTUM
            ra_mean.value = m * ra_mean.value + (1 - m) * mean
            ra_var.value = m * ra_var.value + (1 - m) * var
        return y


def _norm_layer(train, *, relu=False, scale_init=nn.initializers.ones, name, dtype, param_dtype):
    del dtype  # float32 only
    return OneDNNBatchNorm(not train, relu, scale_init, param_dtype, name=name)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None):
    """lax.conv_general_dilated as flax.linen.Conv calls it (NHWC input, HWIO kernel), computed
    by conv2d: equal strides and dilations on both axes, no input dilation, no groups."""
    del dimension_numbers, precision  # NHWC / HWIO from flax.linen.Conv; float32
    (sh, sw), (dh, dw) = tuple(window_strides), tuple(rhs_dilation or (1, 1))
    if sh != sw or dh != dw or feature_group_count != 1 or tuple(lhs_dilation or (1, 1)) != (1, 1):
        raise ValueError("oneDNN conv2d: equal strides and dilations, no input dilation or groups")
    return conv2d(lhs, rhs, sh, dh, tuple(tuple(p) for p in padding))


ONEDNN_LAYERS = resnet.Layers(
    "onednn",
    functools.partial(resnet.flax_conv, conv_general_dilated=conv_general_dilated),
    _norm_layer,
    matmul.max_pool_3x3_s2,
)
