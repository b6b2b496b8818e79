"""Device mesh, shardings and moving host batches onto the devices.

Every device of every process joins one mesh with a single 'data' axis: the train state is
replicated (P()), batches are split along their first dimension (P('data')). Each process
feeds its local share of the global batch; `jax.make_array_from_process_local_data`
assembles the global array.
"""

import collections

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
    """1-D mesh over `devices` (default: every device of every process) with axis 'data'."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def to_global(batch: dict, sharding: NamedSharding) -> dict:
    """Host-local numpy batch -> global jax.Arrays sharded along the batch axis.

    On CPU devices the host arrays are copied first: there JAX uses an aligned host array as the
    device buffer itself, and a batch in grain's shared memory would then keep its segment
    until the process exits (the interpreter's resource tracker reports such segments as
    leaked). A copy of one batch is small next to a CPU step.
    """
    on_cpu = all(d.platform == "cpu" for d in sharding.mesh.devices.flat)
    as_host = np.array if on_cpu else np.asarray
    return {
        k: jax.make_array_from_process_local_data(sharding, as_host(v)) for k, v in batch.items()
    }


def to_host(tree):
    """Global arrays -> numpy on every process (all-gather when there are several processes)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


class DevicePrefetcher:
    """Keeps `size` batches on the devices ahead of the training step.

    It records the input iterator's state before each batch it takes, so `state()` returns the
    state that resumes exactly at the first batch not yet handed to the training loop.
    """

    def __init__(self, iterator, sharding: NamedSharding, size: int = 2):
        self.iterator = iterator
        self.sharding = sharding
        self.size = max(1, size)
        self.queue = collections.deque()

    def _fill(self):
        while len(self.queue) < self.size:
            state = self.iterator.get_state()
            batch = next(self.iterator)
            self.queue.append((state, to_global(batch, self.sharding)))

    def __iter__(self):
        return self

    def __next__(self):
        self._fill()
        return self.queue.popleft()[1]

    def state(self):
        """Iterator state positioned at the next batch `__next__` will return."""
        if self.queue:
            return self.queue[0][0]
        return self.iterator.get_state()

    def close(self):
        """Drops the batches not yet taken, then closes the input iterator (its workers)."""
        self.queue.clear()
        self.iterator.close()
