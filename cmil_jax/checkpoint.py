"""Orbax checkpoints of a run.

<workdir>/checkpoints/<step>/   state: train state (params, batch_stats, optimizer, step)
                                 loop:  JSON with the input-iterator position ('data'), the
                                        per-step metrics not yet logged ('log_window') and the
                                        non-finite streak, so that a resumed run continues on
                                        the same batches and writes the same metrics records.
<workdir>/best/<metric>/<step>/  params and batch_stats of the best validation value of <metric>
                                 (one directory per selection metric, as SeqFakeFormer selects).

Saves are atomic: orbax writes into a temporary directory and renames it when every file (and,
with several processes, every process) is done; a directory left by a run killed mid-save is
never restored, and the next run removes it. So a kill at any moment keeps the previous
checkpoint.
Damage after the fact (a file truncated or lost in a node crash, a flipped bit) is caught on
restore: every checkpoint carries a fingerprint of its arrays (``fingerprint``: one 32-bit sum
per leaf that changes with any single flipped bit), and a checkpoint that fails to load or to
match it is passed over for the next older one, with a warning naming both; when none is good,
``CheckpointError`` names the directory (the command exits 2) rather than starting from step 0.
Best checkpoints keep the best two per metric for the same reason.
A full disk while writing (orbax writes in the background: the error may surface at the next
save or wait) raises ``disk.DiskFullError`` naming the directory and the newest complete
checkpoint, which the failed save left intact (its temporary directory is never restored).
Every process calls save/restore (orbax coordinates them): array shards are written by the
processes that hold them, the JSON by process 0. The 'data' position is the same on every
process (each reads the same number of batches of its share), so one copy serves them all,
and a checkpoint written by N processes restores on any number of processes.
"""

import contextlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax import lax

from cmil_jax import disk

FINGERPRINT_KEY = "fingerprint"
_WEIGHT = 2654435761  # odd (Knuth's multiplicative hash constant)


class CheckpointError(OSError):
    """No checkpoint in a directory that holds some can be restored; the message names it."""


def _leaf_fingerprint(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    # 64-bit values (model.dtype float64) become two 32-bit words each.
    words = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    u = lax.bitcast_convert_type(x, words).astype(jnp.uint32).ravel()
    # Odd weights, distinct per position: a flipped bit or two swapped words change the sum.
    weights = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(2 * _WEIGHT % 2**32) + jnp.uint32(1)
    return jnp.sum(u * weights, dtype=jnp.uint32)  # wraps modulo 2**32


_fingerprint_leaves = jax.jit(lambda leaves: [_leaf_fingerprint(x) for x in leaves])


def _path_name(path) -> str:
    """'params/backbone/conv1/kernel' for a leaf path, whatever the containers (a TrainState's
    attributes and the dict keys orbax restores into give the same name)."""
    names = []
    for entry in path:
        for attr in ("name", "key", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return "/".join(names)


def fingerprint(tree) -> dict[str, int]:
    """{leaf path: a 32-bit position-weighted sum of the leaf's bits} (computed where the
    arrays are; only the sums come to the host)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_fingerprint_leaves([leaf for _, leaf in flat]))
    return {_path_name(path): int(v) for (path, _), v in zip(flat, sums)}


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True  # left by a kill mid-save
    )
    return ocp.CheckpointManager(os.path.join(_abs(workdir), "checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, loop_state: dict,
         wait: bool = False) -> None:
    """Saves `state` (a pytree of arrays) and `loop_state` (JSON-able, with the state's
    fingerprint added); no-op if `step` exists.

    Asynchronous: returns once the arrays are copied off the devices; `wait` blocks until the
    checkpoint is on disk (before exiting). DiskFullError when the disk fills up, whether
    during this save or the previous one (still being written when this one starts).
    """
    with _writing(manager):
        # The previous save must end first anyway (orbax waits for it); waiting here makes its
        # error, if any, surface before this save starts rather than from inside it.
        manager.wait_until_finished()
        if step not in manager.all_steps():
            loop_state = {**loop_state, FINGERPRINT_KEY: fingerprint(state)}
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop_state)
                ),
            )
        if wait:
            manager.wait_until_finished()


def wait(manager: ocp.CheckpointManager) -> None:
    """Blocks until the manager's saves are on disk; DiskFullError when one ran out of space."""
    with _writing(manager):
        manager.wait_until_finished()


def close(manager: ocp.CheckpointManager) -> None:
    """manager.close(), which waits for its saves too: DiskFullError as `wait`."""
    with _writing(manager):
        manager.close()


@contextlib.contextmanager
def _writing(manager: ocp.CheckpointManager):
    """disk.writing for a checkpoint directory: the message names it and the newest complete
    checkpoint (a finished step directory; the failed save's temporary one does not count)."""
    directory = str(manager.directory)
    try:
        with disk.writing(f"a checkpoint under {directory}"):
            yield
    except disk.DiskFullError as e:
        steps = _step_dirs(directory)
        kept = (f"the newest complete checkpoint, {os.path.join(directory, str(steps[-1]))}, "
                "is intact" if steps else "no complete checkpoint there yet")
        raise disk.DiskFullError(f"{e}; {kept}") from e.__cause__


def _check_fingerprint(tree, expected, where: str) -> None:
    if isinstance(expected, dict) and fingerprint(tree) != expected:
        raise ValueError(f"{where}: the arrays read back differ from those saved (fingerprint)")


def _step_dirs(directory: str) -> list[int]:
    """Steps with a directory under `directory`, whether orbax can read them or not."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(e) for e in os.listdir(directory) if e.isdigit())


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """Returns (step, state, loop_state) of the newest good checkpoint, or None when the
    directory holds none. A damaged one (unreadable, or not matching its fingerprint) is passed
    over for the next older one with a warning; CheckpointError when none is good."""
    directory = str(manager.directory)
    steps = sorted(set(manager.all_steps()) | set(_step_dirs(directory)), reverse=True)
    damaged = []
    for step in steps:
        where = os.path.join(directory, str(step))
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore()
                ),
            )
            loop = dict(restored["loop"])
            _check_fingerprint(restored["state"], loop.pop(FINGERPRINT_KEY, None), where)
        except Exception as e:  # pylint: disable=broad-except  (any damage: try the next one)
            damaged.append(f"{where} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            continue
        if damaged:
            print(f"warning: damaged checkpoint(s) {'; '.join(damaged)}; resuming from {where}",
                  file=sys.stderr, flush=True)
        return step, restored["state"], loop
    if damaged:
        raise CheckpointError(
            f"no checkpoint under {directory} can be restored: {'; '.join(damaged)}. Move the "
            "directory away to start again from step 0")
    return None


class BestKeeper:
    """Keeps, for each selection metric, the variables of the best validation value so far."""

    def __init__(self, workdir: str, metric_names):
        self.managers = {}
        for name in metric_names:
            # The best two: the second is the fallback if the best is damaged.
            options = ocp.CheckpointManagerOptions(
                max_to_keep=2, create=True, best_fn=lambda m, name=name: m[name], best_mode="max"
            )
            self.managers[name] = ocp.CheckpointManager(
                os.path.join(_abs(workdir), "best", name), options=options
            )

    def update(self, step: int, variables, metrics: dict) -> list[str]:
        """Offers `variables` scored by `metrics`; returns the metric names it became best for."""
        improved = []
        for name, manager in self.managers.items():
            if name not in metrics:
                continue
            best_step = manager.best_step()
            best_value = None
            if best_step is not None:
                best_value = _saved_metrics(manager, best_step).get(name)
            if best_value is None or metrics[name] > best_value:
                scores = {k: float(v) for k, v in metrics.items()}
                scores[FINGERPRINT_KEY] = fingerprint(variables)
                with _writing(manager):
                    manager.save(step, args=ocp.args.StandardSave(variables), metrics=scores,
                                 force=True)
                improved.append(name)
        return improved

    def wait(self):
        for manager in self.managers.values():
            wait(manager)

    def close(self):
        for manager in self.managers.values():
            close(manager)


def _saved_metrics(manager: ocp.CheckpointManager, step: int) -> dict:
    for info in manager._checkpoints:  # pylint: disable=protected-access
        if info.step == step:
            return dict(info.metrics or {})
    return {}


def best_dir(workdir: str, metric: str) -> str:
    return os.path.join(_abs(workdir), "best", metric)


def restore_best(workdir: str, metric: str, abstract_variables):
    """Returns (step, variables) of the best checkpoint for `metric` (the runner-up, with a
    warning, when the best is damaged); FileNotFoundError if none, CheckpointError if none of
    them can be restored."""
    directory = best_dir(workdir, metric)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"no best checkpoint for metric {metric!r} under {directory}; train first "
            f"(python -m cmil_jax.main --config ... --workdir {workdir})"
        )
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            best_fn=lambda m: m[metric], best_mode="max", max_to_keep=2
        ),
    )
    ranked = sorted(manager.all_steps(),
                    key=lambda s: _saved_metrics(manager, s).get(metric, float("-inf")),
                    reverse=True)
    if not ranked:
        manager.close()
        if _step_dirs(directory):
            raise CheckpointError(f"no best checkpoint under {directory} can be read")
        raise FileNotFoundError(f"{directory} holds no checkpoint")
    damaged = []
    try:
        for step in ranked:
            where = os.path.join(directory, str(step))
            try:
                variables = manager.restore(step,
                                            args=ocp.args.StandardRestore(abstract_variables))
                _check_fingerprint(variables,
                                   _saved_metrics(manager, step).get(FINGERPRINT_KEY), where)
            except Exception as e:  # pylint: disable=broad-except  (any damage: the next one)
                damaged.append(f"{where} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                continue
            if damaged:
                print(f"warning: damaged best checkpoint(s) {'; '.join(damaged)}; using {where}",
                      file=sys.stderr, flush=True)
            return step, variables
    finally:
        manager.close()
    raise CheckpointError(f"no best checkpoint under {directory} can be restored: "
                          + "; ".join(damaged))


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (temporary file + rename; disk.write_atomic)."""
    disk.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def is_primary() -> bool:
    return jax.process_index() == 0
