"""Runtime choices: how this machine computes the model, never what it computes.

Everything that makes the CPU fast lives in this package, apart from the method code:

  matmul.py       ResNet layers for XLA:CPU (1x1 convolutions as matrix products, ...)
  onednn.py       ResNet convolutions and BatchNorm (+ ReLU) as oneDNN custom calls
  host_memory.py  glibc settings that keep XLA:CPU from mapping fresh memory every step

``resolve(cfg)`` turns the config's ``runtime`` section into a ``Runtime`` once, at start-up:
the compute dtype (``model.dtype``, 'auto' resolved first), the ResNet layer set and the XLA
compiler options of the jitted steps. The choice depends on
the backend and the compute dtype, never on the number of devices, so a run on one device and
a run on several compute the same thing. ``apply_host_memory(cfg)`` must run before JAX starts.

config.runtime.kernels:
  'xla'     flax.linen Conv / BatchNorm / max_pool (models.resnet.FLAX_LAYERS);
  'matmul'  matmul.MATMUL_LAYERS;
  'onednn'  onednn.ONEDNN_LAYERS (CPU, float32; the `onednn` extra and a C++ compiler);
  'auto'    'xla' on GPU and TPU; on the CPU 'onednn' where it can be built and the compute
            dtype is float32, else 'matmul' (with a warning saying why).
config.runtime.xla_cpu_conv: XLA:CPU's convolution kernels, 'default' (XLA's choice) or
  'eigen' (Eigen convolutions, YNNPACK keeps the matrix products); ignored off the CPU.
config.runtime.host_malloc: 'auto' | 'keep' | 'default' (host_memory.apply).
config.runtime.batchnorm: 'flax' (the layer set's BatchNorm) | 'jnp' | 'pallas': the ResNet's
  BatchNorms, their ReLUs and the blocks' residual add + ReLU as fused_batchnorm.FusedBatchNorm
  (closed-form backward in jax.numpy, or Pallas kernels; 'pallas' on one device only).
config.model.dtype: 'auto' computes in bfloat16 on GPU and TPU and in float32 on the CPU;
  'float32' and 'bfloat16' are used as given (parameters stay float32 either way). 'float64'
  is for equivalence checks: parameters, statistics, optimizer and compute in float64 (JAX's
  x64 mode, switched on by `resolve`), XLA's own layers only.

This package is imported before JAX starts (host memory settings must come first), so it
imports JAX and the models inside its functions.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from cmil_jax.config_base import ConfigError

KERNELS = ("auto", "xla", "matmul", "onednn")
HOST_MALLOC = ("auto", "keep", "default")
BATCHNORM = ("flax", "jnp", "pallas")
# runtime.xla_cpu_conv -> XLA compiler options on the CPU backend.
XLA_CPU_CONV = {
    "default": {},
    # YNNPACK fusions for matrix products only: convolutions go to XLA's Eigen kernels.
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What resolve() chose: the ResNet layer set and the jitted steps' XLA options."""

    layers: Any  # models.resnet.Layers
    compiler_options: dict | None
    notes: tuple[str, ...] = ()  # why 'auto' chose what it did, when it fell back
    dtype: str = "float32"  # the model's compute dtype (model.dtype resolved)

    def describe(self) -> dict:
        """The resolved choices, for logs and config.json."""
        import jax  # pylint: disable=import-outside-toplevel

        return {
            "backend": jax.default_backend(),
            "dtype": self.dtype,
            "kernels": self.layers.name,
            "compiler_options": dict(self.compiler_options or {}),
            "notes": list(self.notes),
        }


def check(runtime_cfg) -> None:
    """Raises ConfigError on an unknown name in the runtime section."""
    for field, allowed in (("kernels", KERNELS), ("xla_cpu_conv", tuple(XLA_CPU_CONV)),
                           ("host_malloc", HOST_MALLOC), ("batchnorm", BATCHNORM)):
        value = runtime_cfg[field]
        if value not in allowed:
            raise ConfigError(
                f"config field runtime.{field}={value!r}: expected one of {', '.join(allowed)}"
            )


def layer_set(name: str):
    """The layer set called `name` ('xla', 'matmul', 'onednn'); ConfigError for 'onednn' where
    its calls cannot be built (the message says why)."""
    if name == "xla":
        from cmil_jax.models import resnet  # pylint: disable=import-outside-toplevel

        return resnet.FLAX_LAYERS
    if name == "matmul":
        from cmil_jax.runtime import matmul  # pylint: disable=import-outside-toplevel

        return matmul.MATMUL_LAYERS
    if name == "onednn":
        from cmil_jax.runtime import onednn  # pylint: disable=import-outside-toplevel

        usable, why = onednn.available()
        if not usable:
            raise ConfigError(f"config field runtime.kernels='onednn' cannot be used here: {why}")
        return onednn.ONEDNN_LAYERS
    raise ConfigError(f"config field runtime.kernels={name!r}: expected one of xla, matmul, onednn")


def _auto_kernels(dtype) -> tuple[str, tuple[str, ...]]:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    if jax.default_backend() != "cpu":
        return "xla", ()
    if jnp.dtype(dtype) == jnp.float64:
        return "xla", ("runtime.kernels 'auto' uses 'xla': XLA's convolutions are the only "
                       "layers that compute in float64",)
    if jnp.dtype(dtype) != jnp.float32:
        return "matmul", (f"runtime.kernels 'auto' uses 'matmul': oneDNN layers are float32 "
                          f"only, the model computes in {jnp.dtype(dtype).name}",)
    from cmil_jax.runtime import onednn  # pylint: disable=import-outside-toplevel

    usable, why = onednn.available()
    if not usable:
        return "matmul", (f"runtime.kernels 'auto' uses 'matmul' on this CPU: {why}",)
    return "onednn", ()


def compute_dtype(name: str) -> str:
    """model.dtype -> the dtype the model computes in: 'auto' is 'bfloat16' on GPU and TPU and
    'float32' on the CPU (JAX's default backend); other names are returned as given."""
    import jax  # pylint: disable=import-outside-toplevel

    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def resolve(cfg, log: bool = True) -> Runtime:
    """The Runtime for `cfg` (its `runtime` section and `model.dtype`, resolved first: the
    kernels depend on it); `log` sends the reason for a fallback to the warning log."""
    import jax  # pylint: disable=import-outside-toplevel

    check(cfg.runtime)
    dtype = compute_dtype(cfg.model.dtype)
    name, notes = cfg.runtime.kernels, ()
    if name == "auto":
        name, notes = _auto_kernels(dtype)
    if dtype == "float64":
        if name != "xla" or cfg.runtime.batchnorm != "flax":
            raise ConfigError(
                f"config field model.dtype='float64' computes with XLA's own layers only: "
                f"runtime.kernels={cfg.runtime.kernels!r} and runtime.batchnorm="
                f"{cfg.runtime.batchnorm!r} must be 'auto' or 'xla', and 'flax'")
        # 64-bit arrays exist only with x64 on: set before the model, data or state are made.
        jax.config.update("jax_enable_x64", True)
    options = None
    if jax.default_backend() == "cpu":
        options = dict(XLA_CPU_CONV[cfg.runtime.xla_cpu_conv]) or None
    layers = layer_set(name)
    if cfg.runtime.batchnorm != "flax":
        if cfg.runtime.batchnorm == "pallas" and jax.device_count() > 1:
            raise ConfigError(f"config field runtime.batchnorm='pallas' runs on one device, "
                              f"this run has {jax.device_count()}: use 'jnp' or 'flax'")
        from cmil_jax.runtime import fused_batchnorm  # pylint: disable=import-outside-toplevel

        layers = fused_batchnorm.layers(layers, cfg.runtime.batchnorm)
    runtime = Runtime(layers, options, notes, dtype)
    if log:
        for note in notes:
            logging.warning(note)
    return runtime


def apply_host_memory(cfg) -> bool:
    """Applies cfg.runtime.host_malloc; call before JAX starts its CPU backend."""
    from cmil_jax.runtime import host_memory  # pylint: disable=import-outside-toplevel

    return host_memory.apply(cfg.runtime.host_malloc)
