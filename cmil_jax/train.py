"""Training: the train state, the setup every entry point shares, the jitted steps and the loop.

One training step, top to bottom:
    host batch (uint8 images, labels; this process's share of the global batch)
        --jax.make_array_from_process_local_data, sharded over the 'data' mesh axis-->
    train_step: CMIL.apply (normalises, backbone, tokens, transformer, heads)
                -> losses.total_loss (L_CLS, L^U, L^V, L_Rank) -> grads -> AdamW update
                -> non-finite guard: a NaN/Inf loss or gradient keeps the old state.
The state is replicated over the mesh and donated; BatchNorm statistics are computed over the
global batch (jit over a sharded batch is synchronous BatchNorm), so results do not depend on
the number of devices or processes. `setup()` builds the model (with the layers that
cmil_jax.runtime chose for this machine), the state's shardings and the jitted steps; the loop,
evaluation, predict, the tools and the benchmarks all start from it. Faults (preemption,
non-finite steps, bad records) are handled by the small helpers of `faults.py`; see
docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from cmil_jax import checkpoint
from cmil_jax import config_base
from cmil_jax import disk
from cmil_jax import evaluation
from cmil_jax import faults
from cmil_jax import losses
from cmil_jax import models
from cmil_jax import optim
from cmil_jax import parallel
from cmil_jax import reporting
from cmil_jax import runtime as runtime_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    def variables(self):
        return {"params": self.params, "batch_stats": self.batch_stats}


# ----------------------------------------------------------------------------- setup


def build_model(cfg, layers=models.resnet.FLAX_LAYERS, dtype: str | None = None) -> models.CMIL:
    """The CMIL model of cfg.model, computing its ResNet layers with `layers` in `dtype`
    (default: model.dtype, 'auto' resolved by runtime.compute_dtype)."""
    dtype = dtype or runtime_lib.compute_dtype(cfg.model.dtype)
    param_dtype = jnp.float64 if dtype == "float64" else jnp.float32
    return models.CMIL(**{**cfg.model, "dtype": dtype}, param_dtype=param_dtype, layers=layers)


@dataclasses.dataclass
class Setup:
    """What every entry point needs to run the model of a config on a mesh.

    state_shardings / abstract_state: the TrainState's shardings (replicated) and shapes;
    variable_shardings / abstract_variables: the same for {'params', 'batch_stats'} (what
    best checkpoints hold); train_step(state, batch) -> (state, metrics) and
    eval_step(variables, batch) -> predictions, both jitted (compiled on first call).
    """

    cfg: Any
    runtime: runtime_lib.Runtime
    model: models.CMIL
    mesh: jax.sharding.Mesh
    batch_sharding: NamedSharding
    tx: optax.GradientTransformation
    abstract_state: TrainState
    state_shardings: TrainState
    train_step: Callable
    eval_step: Callable
    _init: Callable

    @property
    def variable_shardings(self) -> dict:
        return {"params": self.state_shardings.params,
                "batch_stats": self.state_shardings.batch_stats}

    @property
    def abstract_variables(self) -> dict:
        return {"params": self.abstract_state.params,
                "batch_stats": self.abstract_state.batch_stats}

    def init_state(self) -> TrainState:
        """A fresh state from cfg.seed, created directly with its shardings."""
        return self._init(jax.random.key(self.cfg.seed, impl="rbg"))


def setup(cfg, total_steps: int = 1, mesh=None, runtime=None) -> Setup:
    """Model, optimizer, shardings and jitted steps for `cfg` on `mesh` (default: every device).

    `runtime`: the resolved runtime choices (default: runtime.resolve(cfg)); `total_steps`
    sets the learning-rate schedule. Nothing is compiled or allocated here but shapes.
    """
    runtime = runtime or runtime_lib.resolve(cfg)
    mesh = mesh or parallel.make_mesh()
    batch_sharding = parallel.batch_sharding(mesh)
    model = build_model(cfg, runtime.layers, runtime.dtype)
    size = cfg.data.image_size
    dummy = jnp.zeros((1, size, size, 3), jnp.uint8)

    def init(rng):
        variables = model.init(rng, dummy, train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            # flax's BatchNorm makes its statistics float32 whatever param_dtype is.
            batch_stats=jax.tree.map(lambda x: x.astype(model.param_dtype),
                                     variables.get("batch_stats", {})),
            opt_state=optim.make_optimizer(cfg.train, total_steps, params).init(params),
        )

    shapes = jax.eval_shape(init, jax.random.key(0, impl="rbg"))
    replicated = NamedSharding(mesh, P())
    state_shardings = jax.tree.map(lambda _: replicated, shapes)
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
    tx = optim.make_optimizer(cfg.train, total_steps, shapes.params)
    options = runtime.compiler_options
    nan_steps = config_base.parse_steps(cfg.train.debug_nonfinite_steps)
    train_step = make_train_step(model, tx, cfg.loss, state_shardings, batch_sharding,
                                 nan_steps, options)
    variable_shardings = {"params": state_shardings.params,
                          "batch_stats": state_shardings.batch_stats}
    eval_step = make_eval_step(model, cfg.loss, variable_shardings, batch_sharding, options)
    return Setup(cfg, runtime, model, mesh, batch_sharding, tx, abstract_state,
                 state_shardings, train_step, eval_step,
                 jax.jit(init, out_shardings=state_shardings))


def load_backbone_weights(state: TrainState, init_from: str) -> TrainState:
    """Replaces the backbone's params/batch_stats by converted weights from `init_from`."""
    from cmil_jax import convert  # pylint: disable=import-outside-toplevel

    loaded = convert.load_backbone_variables(init_from)
    params = flax.core.unfreeze(state.params)
    batch_stats = flax.core.unfreeze(state.batch_stats)
    params["backbone"] = convert.match_tree(params["backbone"], loaded["params"], init_from)
    if "batch_stats" in loaded:
        batch_stats["backbone"] = convert.match_tree(
            batch_stats["backbone"], loaded["batch_stats"], init_from
        )
    return state.replace(params=params, batch_stats=batch_stats)


# ----------------------------------------------------------------------------- steps


def make_train_step(model, tx, loss_cfg, state_shardings, batch_sharding, nan_steps=(),
                    options=None):
    """jit-compiled (state, batch) -> (state, metrics); state donated; `options`: XLA
    compiler options (Runtime.compiler_options).

    A step whose loss or gradient norm is NaN/Inf changes nothing but `step` and reports
    metrics['nonfinite'] = 1. `nan_steps` (1-based, testing only) multiplies the loss by NaN
    at those steps.
    """
    loss_kwargs = losses.loss_kwargs(loss_cfg)

    def train_step(state: TrainState, batch):
        def loss_fn(params):
            outputs, new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
            )
            loss, terms = losses.total_loss(outputs, batch, **loss_kwargs)
            if nan_steps:  # testing hook: train.debug_nonfinite_steps
                injected = jnp.isin(state.step + 1, jnp.asarray(nan_steps))
                loss = loss * jnp.where(injected, jnp.nan, 1.0)
            return loss, (terms, new_vars["batch_stats"])

        (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        grad_norm = optax.global_norm(grads)

        # Non-finite guard: on a NaN/Inf loss or gradient, keep the old params, BatchNorm
        # statistics and optimizer state (the learning-rate schedule does not advance either).
        # A cond rather than a `where` over every leaf: only the branch taken runs, so a finite
        # step updates the donated buffers in place instead of copying the old state beside
        # the new one (benchmarks/RESULTS.md measures the difference).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply_update(operands):
            params, opt_state, batch_stats, grads = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, batch_stats

        def keep_old(operands):
            params, opt_state, _, _ = operands
            return params, opt_state, state.batch_stats

        params, opt_state, batch_stats = jax.lax.cond(
            finite,
            apply_update,
            keep_old,
            (state.params, state.opt_state, batch_stats, grads),
        )
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        step_metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            **terms,
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        return new_state, step_metrics

    replicated = NamedSharding(batch_sharding.mesh, P())
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
        compiler_options=options,
    )


def make_eval_step(model, loss_cfg, variables_shardings, batch_sharding, options=None):
    """jit-compiled (variables, batch) -> per-image predictions (sharded like the batch):
    'probs' (B, C) sequence-class probabilities (mean of the z^U and z^V logits), 'fake_prob'
    (B,) the MIL p(x), 'similarity_map' (B, N); `options`: XLA compiler options."""
    num_lowest = loss_cfg.num_lowest or None

    def eval_step(variables, batch):
        outputs = model.apply(variables, batch["image"], train=False)
        logits = (outputs["class_logits"] + outputs["patch_logits"]) / 2
        fake_logit = losses.mil_fake_logit(
            outputs["mil_emb"], outputs["mil_bias"], loss_cfg.tau, num_lowest
        )
        return {
            "probs": jax.nn.sigmoid(logits),
            "fake_prob": jax.nn.sigmoid(fake_logit),
            "similarity_map": losses.patch_similarity_map(outputs["mil_emb"]),
        }

    return jax.jit(
        eval_step,
        in_shardings=(variables_shardings, batch_sharding),
        out_shardings=batch_sharding,
        compiler_options=options,
    )


# ----------------------------------------------------------------------------- the loop


def _main_batch(cfg) -> int:
    """Elements of data.name in each global batch (the rest come from data.joint_name)."""
    if not cfg.data.joint_name:
        return cfg.train.batch_size
    processes = jax.process_count()
    return cfg.train.batch_size - processes * config_base.joint_batch_size(cfg, processes)


def _describe_batch(cfg, shape) -> str:
    """'first batch: 12 images of 64 x 64 (4 triples: genuine, SBI, fake; 2 of them from
    ffpp/c23)' for the global image batch `shape` (N, H, W, 3)."""
    n, h, w = shape[:3]
    text = f"first batch: {n} images of {h} x {w}"
    if cfg.data.triples:
        text += f" ({n // 3} triples: genuine, SBI, fake"
        if cfg.data.joint_name:
            text += f"; {n // 3 - _main_batch(cfg)} of them from {cfg.data.joint_name}"
        text += ")"
    elif cfg.data.joint_name:
        text += f" ({n - _main_batch(cfg)} of them from {cfg.data.joint_name})"
    return text


def training_steps(cfg, train_source) -> int:
    """train.num_steps, or the steps of train.num_epochs epochs of `train_source` (at least 1).

    One epoch is one pass over data.pipeline.epoch_size(train_source, data.triples) elements:
    the genuine images with data.triples (one triple each), else every record. Each global
    batch takes _main_batch(cfg) of them, so num_epochs epochs take
    num_epochs * epoch_size // _main_batch steps (a partial batch at an epoch's end carries
    over into the next epoch). The derivation is logged.
    """
    if cfg.train.num_steps > 0:
        return cfg.train.num_steps
    from cmil_jax.data import pipeline  # pylint: disable=import-outside-toplevel

    epochs, per_step = cfg.train.num_epochs, _main_batch(cfg)
    size = pipeline.epoch_size(train_source, cfg.data.triples)
    steps = max(1, epochs * size // per_step)
    reporting.log(f"{steps} training steps: {epochs} epoch{'s' * (epochs != 1)} of {size} "
                  f"{'genuine images (one triple each)' if cfg.data.triples else 'records'}, "
                  f"{per_step} a step")
    return steps


def _tensorboard(cfg) -> bool:
    """train.tensorboard (configs recorded before the field existed: on)."""
    return bool(cfg.train.get("tensorboard", True))


def _select_metrics(cfg) -> list[str]:
    return [m.strip() for m in cfg.eval.select_metrics.split(",") if m.strip()]


def _peak_memory() -> dict:
    """{'peak_memory_gb': the largest peak allocation of this process's devices since the run
    started (GB)} where the backend reports it (GPU, TPU; not the CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return {"peak_memory_gb": max(peaks) / 1e9} if peaks else {}


def _bad_records(cfg, workdir: str) -> dict:
    """{'bad_records': distinct training records skipped so far} when any; DataError past the
    data.max_bad_records limit. The same answer on every process."""
    count = faults.count_bad_records(workdir)
    if jax.process_count() > 1:  # files may lag on some hosts: process 0 decides for all
        count = int(multihost_utils.broadcast_one_to_all(np.int32(count)))
    if count > cfg.data.max_bad_records:
        raise faults.DataError(
            f"{count} bad training records skipped, more than data.max_bad_records="
            f"{cfg.data.max_bad_records}; they are listed in {workdir}/bad_records*.jsonl"
        )
    return {"bad_records": count} if count else {}


def write_config(cfg, workdir: str, runtime: runtime_lib.Runtime,
                 weights: dict | None = None) -> None:
    """<workdir>/config.json: the config as given, the runtime choices it resolved to and, as
    'resolved_weights', where the backbone started from (weights_record)."""
    if checkpoint.is_primary():
        record = {**cfg.to_dict(), "resolved_runtime": runtime.describe()}
        if weights is not None:
            record["resolved_weights"] = weights
        checkpoint.write_json(os.path.join(workdir, "config.json"), record)


def resolve_weights(cfg, workdir: str) -> tuple[Any, dict | None]:
    """(pretrained.Resolved or None, its config.json record). The weights are fetched and
    converted only for a run that starts (pretrained.resolve: WeightsError, exit 2, when they
    cannot be had); a resumed run keeps the record config.json holds."""
    from cmil_jax import pretrained  # pylint: disable=import-outside-toplevel

    if _has_checkpoint(workdir):
        try:
            with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
                return None, json.load(f).get("resolved_weights")
        except (OSError, ValueError):
            return None, None
    resolved = pretrained.resolve(cfg)
    reporting.log(pretrained.describe(resolved, cfg))
    record = resolved.describe() if resolved else {"spec": pretrained.NONE}
    return resolved, {**record, "random_init": resolved is None}


def _has_checkpoint(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(e.isdigit() for e in os.listdir(directory))


def check_resume_config(cfg, workdir: str, accept_changes: bool = False) -> dict:
    """Compares `cfg` with the config recorded in <workdir>/config.json when the workdir holds
    a checkpoint to resume from; returns the changes ({field: (recorded, given)}).

    Fields of config_base.RESUME_FREE_FIELDS (runtime, data location, workers, logging and
    checkpoint cadence) are never a change. Any other difference raises ConfigError listing the
    fields, unless `accept_changes`, in which case the changes are appended to
    <workdir>/config_changes.jsonl (with the step resumed from) and the run goes on.
    """
    path = os.path.join(workdir, "config.json")
    if not (os.path.isfile(path) and _has_checkpoint(workdir)):
        return {}
    changes = config_base.config_changes(config_base.load_recorded(path), cfg)
    if not changes:
        return {}
    if not accept_changes:
        raise config_base.ConfigError(
            f"--workdir {workdir} holds a run recorded with a different config ({path}); "
            f"differing fields: {config_base.format_changes(changes)}. Resume with the recorded "
            "config (omit --config to use it), start a new --workdir, or pass "
            "--accept_config_changes to resume with these changes")
    if checkpoint.is_primary():
        steps = [int(e) for e in os.listdir(os.path.join(workdir, "checkpoints")) if e.isdigit()]
        disk.append_line(os.path.join(workdir, "config_changes.jsonl"),
                         json.dumps({"time": time.time(), "resumed_from_step": max(steps),
                                     "changes": {k: list(v) for k, v in changes.items()}}))
    reporting.log(f"resuming with config changes (accepted, recorded in "
                  f"{workdir}/config_changes.jsonl): {config_base.format_changes(changes)}")
    return changes


def start(cfg, workdir: str) -> runtime_lib.Runtime:
    """Checks the workdir and the config, resolves and logs the runtime choices."""
    faults.check_workdir(workdir)
    config_base.validate(cfg, jax.device_count(), jax.process_count())
    runtime = runtime_lib.resolve(cfg)
    described = runtime.describe()
    reporting.log(f"runtime: {described['backend']}, {jax.device_count()} device(s), "
                  f"compute dtype {described['dtype']} (model.dtype '{cfg.model.dtype}'), "
                  f"ResNet layers '{described['kernels']}'"
                  + (f", XLA options {described['compiler_options']}"
                     if described["compiler_options"] else ""))
    return runtime


def train_and_evaluate(cfg, workdir: str, accept_config_changes: bool = False) -> dict:
    """Trains (resuming from <workdir>/checkpoints if present), then tests the best checkpoints.

    Returns the test metrics of the first selection metric's best checkpoint, or {} when the
    run was preempted (SIGTERM: checkpoint saved, run the same command again to resume).
    SIGTERM during an evaluation (one process) abandons it between two batches and saves the
    checkpoint of that step marked 'pending_eval', so the resumed run evaluates it first and
    writes the records an uninterrupted run writes; during the test of the best checkpoints,
    nothing of the test is recorded and the same command tests them again.
    Raises faults.NonFiniteError after train.max_nonfinite_steps non-finite steps in a row,
    disk.DiskFullError when the disk fills up (the previous checkpoint and metrics.jsonl stay
    intact; the same command resumes once there is space).
    The first train record holds `time_to_first_step_s`: seconds from this call (data build,
    model init and compilation included) until the first step's results exist.
    Resuming with a config that differs from <workdir>/config.json raises ConfigError unless
    `accept_config_changes` (check_resume_config).
    """
    from cmil_jax.data import inputs  # pylint: disable=import-outside-toplevel

    t_start = time.perf_counter()
    runtime = start(cfg, workdir)
    check_resume_config(cfg, workdir, accept_config_changes)
    joint = inputs.joint_splits
    data = inputs.open_splits(cfg, workdir, ("train", "val", "test", *joint(cfg, "train"),
                                             *joint(cfg, "val"), *joint(cfg, "test")))
    weights, weights_record = resolve_weights(cfg, workdir)
    write_config(cfg, workdir, runtime, weights_record)

    total_steps = training_steps(cfg, data["train"])
    run = setup(cfg, total_steps, runtime=runtime)
    state = run.init_state()

    train_iter = inputs.train_iterator(cfg, data["train"], data.get("joint_train"))
    manager = checkpoint.make_manager(workdir, cfg.train.keep_checkpoints)
    writer = reporting.MetricWriter(workdir, tensorboard=_tensorboard(cfg))
    restored = checkpoint.restore_latest(manager, run.abstract_state)
    start_step, loop_state = 0, {}
    if restored is not None:
        start_step, state, loop_state = restored
        train_iter.set_state(loop_state["data"])
        dropped = writer.drop_after(start_step)
        reporting.log(f"Resumed from {manager.directory} at step {start_step}"
                      + (f" ({dropped} metrics records of later steps dropped)." if dropped
                         else "."))
    elif writer.last_train_step() > 0:  # progress recorded, but nothing to resume from
        raise checkpoint.CheckpointError(
            f"{writer.path} records training up to step {writer.last_train_step()} but "
            f"{manager.directory} holds no checkpoint; move {workdir} away (or remove its "
            "metrics.jsonl) to start again from step 0")
    elif weights is not None:
        state = load_backbone_weights(state, weights.directory)

    best = checkpoint.BestKeeper(workdir, _select_metrics(cfg))
    videos = {split: evaluation.prepare_split(cfg, data[split])  # the video protocol
              for split in ("val", *joint(cfg, "val"))}
    sigterm_hook = faults.SigtermHook(cfg.train.get("debug_sigterm_at", ""), start_step)

    def run_eval(variables, interrupt=None):
        """Val metrics; with joint training also the joint dataset's, keys prefixed joint_."""
        result = evaluation.evaluate(run.eval_step, variables,
                                     inputs.eval_batches(cfg, videos["val"].source),
                                     run.batch_sharding, cfg, split=videos["val"],
                                     interrupt=interrupt)
        for split in joint(cfg, "val"):
            joint_result = evaluation.evaluate(
                run.eval_step, variables, inputs.eval_batches(cfg, videos[split].source),
                run.batch_sharding, cfg, split=videos[split], sequence=False,
                interrupt=interrupt)
            result.update({f"joint_{k}": v for k, v in joint_result.items()})
        return result

    val_preview = ValPreview(cfg, data["val"]) if writer.tensorboard is not None else None
    batches = parallel.DevicePrefetcher(train_iter, run.batch_sharding, size=cfg.data.prefetch)
    window = reporting.TrainWindow(loop_state.get("log_window", ()))  # until logged
    nonfinite = faults.NonFiniteMonitor(
        cfg.train.max_nonfinite_steps, loop_state.get("nonfinite_streak", 0)
    )

    def save(step, wait=False, pending_eval=False):
        loop = {"data": batches.state(), "log_window": window.to_json(),
                "nonfinite_streak": nonfinite.streak}
        if pending_eval:  # preempted during this step's evaluation: it is redone on resume
            loop["pending_eval"] = True
        checkpoint.save(manager, step, state, loop, wait=wait)
        sigterm_hook("save", step)

    def validate(step, preemption):
        """Evaluates on val at `step` and records it: metrics.jsonl, TensorBoard, best
        checkpoints. With one process, SIGTERM during it abandons it between two batches
        (faults.Preempted, nothing recorded), so that the checkpoint is saved in time."""

        def interrupt():
            sigterm_hook("eval", step)
            preemption.check()

        val = run_eval(state.variables(), interrupt)
        writer.write(step, "val", val)
        if writer.tensorboard is not None:
            write_val_maps(writer.tensorboard, step, run, state.variables(), val_preview)
        improved = best.update(step, state.variables(), val)
        reporting.log(f"step {step}: val {reporting.format_metrics(val)}"
                      + (f" (best {', '.join(improved)})" if improved else ""))
        window.restart_clock()

    lr_at = optim.lr_schedule(cfg.train.lr, cfg.train.warmup_steps, total_steps)
    step = start_step
    stop = None  # why the loop ended early: "preempted" or "nonfinite"
    bar = reporting.progress(total_steps, start_step)
    first_step_time = None
    with faults.PreemptionWatcher() as preemption:
        failed = True
        try:
            if loop_state.get("pending_eval"):  # preempted during this step's evaluation
                try:
                    validate(step, preemption)
                except faults.Preempted:
                    stop = "preempted"  # the checkpoint still says the evaluation is due
            while stop is None and step < total_steps:
                batch = next(batches)
                state, step_metrics = run.train_step(state, batch)
                step += 1
                bar.update(1)
                window.append(step_metrics, batch["image"].shape[0])
                if first_step_time is None:
                    jax.block_until_ready(step_metrics)
                    first_step_time = time.perf_counter() - t_start
                    writer.write(step, "train", {"time_to_first_step_s": first_step_time})
                    reporting.log(_describe_batch(cfg, batch["image"].shape))
                if step % cfg.train.log_every == 0 or step == total_steps:
                    means, nonfinite_flags = window.summary()
                    means.update(lr=lr_at(step), **_bad_records(cfg, workdir), **_peak_memory())
                    writer.write(step, "train", means)
                    bar.set_postfix(loss=f"{means['loss']:.3f}")
                    if nonfinite.update(step, nonfinite_flags):
                        stop = "nonfinite"
                        break
                if step % cfg.train.eval_every == 0 or step == total_steps:
                    try:
                        validate(step, preemption)
                    except faults.Preempted:  # saved with the evaluation due: redone on resume
                        save(step, wait=True, pending_eval=True)
                        stop = "preempted"
                        break
                if step % cfg.train.checkpoint_every == 0 or step == total_steps:
                    save(step)
                if preemption.should_stop(step):
                    save(step, wait=True)
                    stop = "preempted"
                    break
            failed = False
        finally:
            bar.close()
            last_checkpoint = _close_run(failed, batches, manager, best, writer)
        if stop == "nonfinite":
            raise faults.NonFiniteError(nonfinite.message(last_checkpoint))
        if stop is None and preemption.requested:  # SIGTERM while the last save was written
            stop = "preempted"
        if stop == "preempted":
            reporting.log(f"Preempted: checkpoint saved at step {step}; run the same command to "
                          "resume.")
            return {}

        def test_interrupt():
            sigterm_hook("test", step)
            preemption.check()

        try:
            results = evaluate_best(cfg, workdir, data=data, run=run, interrupt=test_interrupt)
        except faults.Preempted:
            reporting.log(f"Preempted while testing the best checkpoints: training is complete "
                          f"(checkpoint saved at step {step}) and no test result was recorded; "
                          "run the same command to test them.")
            return {}
    if checkpoint.is_primary():
        from cmil_jax import viz  # pylint: disable=import-outside-toplevel

        viz.plot_curves(workdir)
    return results


def _close_run(failed: bool, batches, manager, best, writer) -> int | None:
    """Waits for the checkpoint writes under way and closes what the loop opened; returns the
    newest checkpoint step. Every part runs even if another fails; the first error is raised
    at the end (an asynchronous save that ran out of disk space surfaces here), unless
    `failed`: an error is on its way already, so these are printed as warnings instead."""
    errors = []

    def attempt(fn):
        try:
            return fn()
        except Exception as e:  # pylint: disable=broad-except  (reported below)
            errors.append(e)
            return None

    attempt(batches.close)
    attempt(lambda: checkpoint.wait(manager))
    last = attempt(manager.latest_step)
    attempt(best.wait)
    attempt(best.close)
    attempt(lambda: checkpoint.close(manager))
    attempt(writer.close)
    for e in errors[0 if failed else 1:]:
        print(f"warning: while closing the run: {type(e).__name__}: "
              f"{(str(e).splitlines() or [''])[0][:300]}", file=sys.stderr, flush=True)
    if errors and not failed:
        raise errors[0]
    return last


class ValPreview:
    """The first val batch, kept on the host (read on first use) for the localization maps
    that TensorBoard shows at each evaluation."""

    NUM_IMAGES = 4

    def __init__(self, cfg, source):
        self.cfg, self.source, self._batch = cfg, source, None

    def batch(self) -> dict:
        if self._batch is None:
            from cmil_jax.data import inputs  # pylint: disable=import-outside-toplevel

            iterator = iter(inputs.eval_batches(self.cfg, self.source))
            try:
                self._batch = {"image": np.asarray(next(iterator)["image"])}
            finally:
                iterator.close()
        return self._batch


def write_val_maps(tb: reporting.TensorBoardWriter, step: int, run: Setup, variables,
                   preview: ValPreview | None) -> None:
    """TensorBoard image 'val/maps': the first val images beside their MIL dissimilarity map
    1 - a_i (what predict's overlays show). Single-process runs only (process 0 writes; the
    others would have to join the forward pass)."""
    if preview is None or jax.process_count() > 1:
        return
    from cmil_jax import viz  # pylint: disable=import-outside-toplevel

    images = preview.batch()["image"]
    out = parallel.to_host(run.eval_step(variables,
                                         parallel.to_global({"image": images}, run.batch_sharding)))
    sim = np.asarray(out["similarity_map"])[:ValPreview.NUM_IMAGES]
    side = int(round(np.sqrt(sim.shape[1])))
    if side * side != sim.shape[1]:
        return  # a non-square grid: no picture
    rows = [np.concatenate([img, viz.overlay(img, 1.0 - m.reshape(side, side))], axis=1)
            for img, m in zip(images, sim)]
    tb.images(step, "val/maps", np.stack(rows))


def evaluate_best(cfg, workdir: str, *, data=None, run: Setup | None = None,
                  interrupt=None) -> dict:
    """Evaluates the best checkpoint of every selection metric on the test split(s); returns
    the first one's metrics. `data` (opened splits) and `run` (setup()) are built here unless
    the caller has them already (train_and_evaluate does). `interrupt`: called between
    batches (evaluation.evaluate); what it raises ends the test with no record written, so
    that running it again records each result once."""
    from cmil_jax.data import inputs  # pylint: disable=import-outside-toplevel

    if run is None:
        run = setup(cfg, runtime=start(cfg, workdir))
    data = dict(data or {})
    # (split, dataset name, sequence metrics?) tested with every best checkpoint.
    tests = [("test", cfg.data.name, True)]
    tests += [(split, cfg.data.joint_name, False) for split in inputs.joint_splits(cfg, "test")]
    missing = [split for split, _, _ in tests if split not in data]
    if missing:
        data.update(inputs.open_splits(cfg, workdir, missing))
    videos = {split: evaluation.prepare_split(cfg, data[split]) for split, _, _ in tests}
    first, records = None, []
    for metric in _select_metrics(cfg):
        step, variables = checkpoint.restore_best(workdir, metric, run.abstract_variables)
        for split, dataset, sequence in tests:
            result = evaluation.evaluate(run.eval_step, variables,
                                         inputs.eval_batches(cfg, videos[split].source),
                                         run.batch_sharding, cfg, split=videos[split],
                                         sequence=sequence, interrupt=interrupt)
            labels = {"checkpoint": f"best_{metric}", "dataset": dataset}
            if videos[split].label:  # video frames: the protocol names the row
                labels["video_protocol"] = videos[split].label
            records.append((step, result, labels))
            reporting.log(f"test on {dataset} (best {metric} on val, step {step}): "
                          + reporting.format_metrics(result))
            first = first or result
    writer = reporting.MetricWriter(workdir, tensorboard=_tensorboard(cfg))
    try:
        for step, result, extra in records:  # all together, once every test has run
            writer.write(step, "test", result, **extra)
    finally:
        writer.close()
    if checkpoint.is_primary():
        evaluation.write_results(workdir)
    return first
