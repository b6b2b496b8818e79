"""Host memory reuse for CPU training (glibc's malloc settings).

XLA:CPU allocates one temporary buffer per step for all the activations the step keeps
(hundreds of MB for a ResNet-50 step). glibc serves a block that size with a fresh mmap from a
worker thread's arena and unmaps it when the step ends, so every step faults in and zeroes
every page of it again (the cost is measured in benchmarks/RESULTS.md).
``keep_freed_memory()`` makes every thread allocate from the main heap, never through mmap, and
keeps freed memory in the process, so the next step reuses the same pages. It must run before JAX starts its CPU backend (the backend's threads pick their
arena on their first allocation). The process keeps its peak heap size until it exits.

Equivalent environment, set before Python starts: MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP = 2**31 - 1  # bytes of free memory at the top of the heap kept before returning any


def keep_freed_memory() -> bool:
    """Sets glibc's M_ARENA_MAX 1, M_MMAP_MAX 0 and M_TRIM_THRESHOLD 2**31 - 1 through mallopt;
    True when all were accepted, False on other C libraries (nothing changed)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(
        mallopt(param, value) == 1
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP))
    )


# JAX's GPU plugins; where one is installed JAX may run on a GPU and the host settings stay.
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def jax_runs_on_cpu() -> bool:
    """True when JAX will run on the CPU: JAX_PLATFORMS=cpu, or no GPU plugin installed.
    Decided without starting JAX."""
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return True
    return not any(importlib.util.find_spec(name) is not None for name in _GPU_PLUGINS)


def apply(mode: str) -> bool:
    """mode 'keep' -> keep_freed_memory(); 'default' -> nothing; 'auto' -> 'keep' when
    jax_runs_on_cpu(). Returns whether the settings were applied."""
    if mode not in ("auto", "keep", "default"):
        raise ValueError(f"host malloc mode must be auto, keep or default, got {mode!r}")
    if mode == "default" or (mode == "auto" and not jax_runs_on_cpu()):
        return False
    if not keep_freed_memory():
        logging.warning("host memory: not glibc, malloc settings unchanged")
        return False
    return True
