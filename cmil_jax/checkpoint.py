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
Every process calls save/restore (orbax coordinates them): array shards are written by the
processes that hold them, the JSON by process 0. The 'data' position is the same on every
process (each reads the same number of batches of its share), so one copy serves them all,
and a checkpoint written by N processes restores on any number of processes.
"""

import json
import os

import jax
import orbax.checkpoint as ocp


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True  # left by a kill mid-save
    )
    return ocp.CheckpointManager(os.path.join(_abs(workdir), "checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, loop_state: dict,
         wait: bool = False) -> None:
    """Saves `state` (a pytree of arrays) and `loop_state` (JSON-able); no-op if `step` exists.

    Asynchronous: returns once the arrays are copied off the devices; `wait` blocks until the
    checkpoint is on disk (before exiting).
    """
    if step not in manager.all_steps():
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop_state)
            ),
        )
    if wait:
        manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """Returns (step, state, loop_state) of the newest checkpoint, or None when there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore()
        ),
    )
    return step, restored["state"], restored["loop"]


class BestKeeper:
    """Keeps, for each selection metric, the variables of the best validation value so far."""

    def __init__(self, workdir: str, metric_names):
        self.managers = {}
        for name in metric_names:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda m, name=name: m[name], best_mode="max"
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
                manager.save(
                    step,
                    args=ocp.args.StandardSave(variables),
                    metrics={k: float(v) for k, v in metrics.items()},
                    force=True,
                )
                improved.append(name)
        return improved

    def wait(self):
        for manager in self.managers.values():
            manager.wait_until_finished()

    def close(self):
        for manager in self.managers.values():
            manager.close()


def _saved_metrics(manager: ocp.CheckpointManager, step: int) -> dict:
    for info in manager._checkpoints:  # pylint: disable=protected-access
        if info.step == step:
            return dict(info.metrics or {})
    return {}


def best_dir(workdir: str, metric: str) -> str:
    return os.path.join(_abs(workdir), "best", metric)


def restore_best(workdir: str, metric: str, abstract_variables):
    """Returns (step, variables) of the best checkpoint for `metric`; FileNotFoundError if none."""
    directory = best_dir(workdir, metric)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"no best checkpoint for metric {metric!r} under {directory}; train first "
            f"(python -m cmil_jax.main --config ... --workdir {workdir})"
        )
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            best_fn=lambda m: m[metric], best_mode="max", max_to_keep=1
        ),
    )
    step = manager.best_step()
    if step is None:
        raise FileNotFoundError(f"{directory} holds no checkpoint")
    variables = manager.restore(step, args=ocp.args.StandardRestore(abstract_variables))
    manager.close()
    return step, variables


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (temporary file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def is_primary() -> bool:
    return jax.process_index() == 0
