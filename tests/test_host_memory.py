"""Host memory reuse for CPU steps (cmil_jax.runtime.host_memory)."""

import subprocess
import sys
import textwrap

import pytest

from cmil_jax.runtime import host_memory


def test_keep_freed_memory_reuses_pages():
    """A worker thread allocating, writing and freeing a 64 MB block again and again, as XLA:CPU
    does with a step's temporary buffer: glibc maps fresh pages each time (one fault per 4 KB
    page); after keep_freed_memory() the process reuses its pages (almost no faults)."""
    script = textwrap.dedent(
        """
        import ctypes, resource, sys, threading
        from cmil_jax.runtime import host_memory
        if sys.argv[1] == "keep":
            assert host_memory.keep_freed_memory()
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        size = 64 * 2**20
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        def rounds(n, out):
            before = faults()
            for _ in range(n):
                p = libc.malloc(size)
                ctypes.memset(p, 1, size)
                libc.free(p)
            out.append((faults() - before) / n)
        out = []
        for n in (1, 5):  # the first round touches the pages once
            t = threading.Thread(target=rounds, args=(n, out))
            t.start()
            t.join()
        print(out[-1])
        """
    )
    per_round = {}
    for mode in ("default", "keep"):
        out = subprocess.run(
            [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
        )
        per_round[mode] = float(out.stdout.strip())
    pages = 64 * 2**20 // 4096
    assert per_round["default"] > pages / 2, per_round
    assert per_round["keep"] < pages / 100, per_round


def test_apply_modes(monkeypatch):
    with pytest.raises(ValueError, match="auto, keep or default"):
        host_memory.apply("always")
    assert host_memory.apply("default") is False
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.jax_runs_on_cpu()
