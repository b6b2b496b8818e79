"""Training and evaluation loops.

One training step, top to bottom:
    host batch (uint8 images, labels; this process's share of the global batch)
        --jax.make_array_from_process_local_data, sharded over the 'data' mesh axis-->
    train_step: CMIL.apply (normalises, backbone, tokens, transformer, heads)
                -> losses.total_loss (L_CLS, L^U, L^V, L_Rank) -> grads -> AdamW update
                -> non-finite guard: a NaN/Inf loss or gradient keeps the old state.
The state is replicated over the mesh and donated; BatchNorm statistics are computed over the
global batch (jit over a sharded batch is synchronous BatchNorm), so results do not depend on
the number of devices or processes. Faults (preemption, non-finite steps, bad records) are
handled by the small helpers of `faults.py`; see docs/distributed.md.
"""

import collections
import functools
import json
import math
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from cmil_jax import checkpoint
from cmil_jax import evaluation
from cmil_jax import faults
from cmil_jax import losses
from cmil_jax import metrics as metrics_lib
from cmil_jax import models
from cmil_jax import optim
from cmil_jax import parallel
from cmil_jax.data import pipeline
from cmil_jax.data import sources


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    def variables(self):
        return {"params": self.params, "batch_stats": self.batch_stats}


# ----------------------------------------------------------------------------- model and data


def build_model(model_cfg) -> models.CMIL:
    return models.CMIL(
        backbone=model_cfg.backbone,
        num_class_tokens=model_cfg.num_class_tokens,
        num_classes=model_cfg.num_classes,
        width=model_cfg.width,
        num_heads=model_cfg.num_heads,
        mlp_ratio=model_cfg.mlp_ratio,
        embed_dim=model_cfg.embed_dim,
        patch_pool=model_cfg.patch_pool,
        pool_temperature=model_cfg.pool_temperature,
        dilate_last=model_cfg.dilate_last,
        backbone_width=model_cfg.backbone_width,
        mil_bias_init=model_cfg.mil_bias_init,
        conv_impl=model_cfg.conv_impl,
        dtype=jnp.dtype(model_cfg.dtype),
    )


def resolve_data_dir(cfg, workdir: str) -> str:
    data_dir = cfg.data.data_dir or os.path.join(workdir, "data")
    return os.path.abspath(os.path.expanduser(data_dir))


def open_splits(cfg, workdir: str, splits) -> dict:
    """Opens the requested splits; builds the synthetic data set first when the config uses it.

    `splits`: names among 'train', 'val', 'test' (data.name) and 'joint_train', 'joint_val',
    'joint_test' (data.joint_name, splits data.train_split / joint_eval_split /
    joint_test_split). Raises FileNotFoundError naming the missing path (and the command that
    builds it) before any model is compiled. The train splits skip bad records (logged and
    counted, see `faults.SkipBadRecords`) unless data.max_bad_records is 0; evaluation splits
    fail on them.
    """
    data_dir = resolve_data_dir(cfg, workdir)
    names = {}
    opened = {}
    for split in splits:
        joint = split.startswith("joint_")
        dataset = cfg.data.joint_name if joint else cfg.data.name
        if dataset not in names:
            names[dataset] = _prepared_name(cfg, data_dir, dataset)
        kind = split.removeprefix("joint_")
        field = {"train": "train_split", "val": "joint_eval_split" if joint else "val_split",
                 "test": "joint_test_split" if joint else "test_split"}[kind]
        source = sources.open_split(data_dir, names[dataset], getattr(cfg.data, field))
        strict = kind != "train" or cfg.data.max_bad_records == 0
        opened[split] = faults.SkipBadRecords(source, faults.bad_records_path(workdir), strict)
    return opened


def _prepared_name(cfg, data_dir: str, name: str) -> str:
    """The TFDS name to open for `name`; a built-in 'cmil_synthetic/<subset>' is built here."""
    if not name.startswith("cmil_synthetic"):
        return name
    subset = name.split("/")[1] if "/" in name else cfg.data.subset
    syn = cfg.data.synthetic
    build = functools.partial(
        sources.build_synthetic,
        data_dir,
        subset,
        image_size=cfg.data.image_size,
        num_train=syn.num_train,
        num_val=syn.num_val,
        num_test=syn.num_test,
        seed=syn.seed,
        num_workers=os.cpu_count() or 1,
    )
    if checkpoint.is_primary():  # one process builds, the others wait for it
        build()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"cmil_jax: synthetic {subset} built")
    return build()  # finds the complete build and returns its name


def joint_splits(cfg, kind: str) -> tuple[str, ...]:
    """('joint_<kind>',) when joint training is on and that split is used, else ()."""
    if not cfg.data.joint_name:
        return ()
    if kind == "val" and not cfg.data.joint_eval_split:
        return ()
    if kind == "test" and not cfg.data.joint_test_split:
        return ()
    return (f"joint_{kind}",)


def _per_process(global_batch: int) -> int:
    if global_batch % jax.process_count():
        raise ValueError(
            f"batch size {global_batch} is not divisible by {jax.process_count()} processes"
        )
    return global_batch // jax.process_count()


def joint_batch_size(cfg) -> int:
    """Per-process number of elements (images or triples) of each batch from data.joint_name."""
    return round(_per_process(cfg.train.batch_size) * cfg.data.joint_fraction)


def train_iterator(cfg, source, joint_source=None):
    """Checkpointable iterator of training batches (single images, or triples when configured),
    mixed with `joint_source` when joint training is on."""
    common = {
        "batch_size": _per_process(cfg.train.batch_size),
        "seed": cfg.seed,
        "image_size": cfg.data.image_size,
        "augment_cfg": cfg.data.augment,
        "num_workers": cfg.data.num_workers,
    }
    if joint_source is not None:
        return iter(pipeline.make_joint_train_dataset(
            source, joint_source, joint_batch_size=joint_batch_size(cfg),
            triples=cfg.data.triples, sbi_labels=cfg.data.sbi_labels, **common))
    if cfg.data.triples:
        return iter(pipeline.make_triple_train_dataset(
            source, sbi_labels=cfg.data.sbi_labels, **common))
    return iter(pipeline.make_train_dataset(source, **common))


def eval_batches(cfg, source):
    """One pass over `source` in record order, padded batches with a 'valid' flag."""
    return pipeline.make_eval_dataset(
        source,
        batch_size=_per_process(cfg.eval.batch_size),
        image_size=cfg.data.image_size,
        num_workers=min(cfg.data.num_workers, 2),
    )


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def validate_config(cfg) -> None:
    """Checks what lock_config cannot: values that fit the devices and processes of this run."""
    compiler_options(cfg.model)  # raises ConfigError on an unknown model.cpu_conv_library
    devices, processes = jax.device_count(), jax.process_count()
    images = cfg.train.batch_size * (3 if cfg.data.triples else 1)
    checks = [
        ("train.batch_size", images % devices == 0,
         f"the global batch ({images} images) must split evenly over the {devices} devices"),
        ("train.batch_size", cfg.train.batch_size % processes == 0,
         f"must be a multiple of the {processes} processes"),
        ("eval.batch_size", cfg.eval.batch_size % devices == 0,
         f"must be a multiple of the {devices} devices"),
        ("train.log_every", cfg.train.log_every > 0, "must be positive"),
        ("train.eval_every", cfg.train.eval_every > 0, "must be positive"),
        ("train.checkpoint_every", cfg.train.checkpoint_every > 0, "must be positive"),
        ("train.max_nonfinite_steps", cfg.train.max_nonfinite_steps >= 0, "must be >= 0"),
        ("data.max_bad_records", cfg.data.max_bad_records >= 0, "must be >= 0"),
    ]
    if cfg.data.joint_name:
        per_process = cfg.train.batch_size // processes
        checks.append((
            "data.joint_fraction", 0 < joint_batch_size(cfg) < per_process,
            f"must leave both datasets at least one of the {per_process} elements of each "
            "(per-process) batch",
        ))
    for field, ok, why in checks:
        if not ok:
            value = cfg[field.split(".")[0]][field.split(".")[1]]
            raise ConfigError(f"config field {field}={value}: {why}")
    parse_steps(cfg.train.debug_nonfinite_steps)


def parse_steps(spec: str) -> tuple[int, ...]:
    """'3,7-9' -> (3, 7, 8, 9); '' -> (). Used by train.debug_nonfinite_steps."""
    steps = []
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, _, hi = part.partition("-")
            steps.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError as e:
        raise ConfigError(
            f"config field train.debug_nonfinite_steps={spec!r}: expected steps like '3,7-9'"
        ) from e
    return tuple(steps)


# ----------------------------------------------------------------------------- state


def create_state(cfg, model, tx_fn, mesh, image_size: int):
    """Initialises the train state directly with replicated shardings (no host round trip)."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)

    def init(rng):
        variables = model.init(rng, dummy, train=False)
        params = variables["params"]
        tx = tx_fn(params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
        )

    abstract = jax.eval_shape(init, jax.random.key(0, impl="rbg"))
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda _: replicated, abstract)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(cfg.seed, impl="rbg"))
    return state, shardings


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


# model.cpu_conv_library -> XLA compiler options on the CPU backend (none elsewhere).
CPU_CONV_LIBRARIES = {
    "default": {},
    # YNNPACK fusions for matrix products only: convolutions go to XLA's Eigen kernels.
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


def compiler_options(model_cfg) -> dict | None:
    """XLA compiler options of the train and eval steps for `model_cfg.cpu_conv_library`."""
    library = model_cfg.cpu_conv_library
    if library not in CPU_CONV_LIBRARIES:
        raise ConfigError(
            f"model.cpu_conv_library must be one of {sorted(CPU_CONV_LIBRARIES)}, "
            f"got {library!r}"
        )
    if jax.default_backend() != "cpu":
        return None
    return dict(CPU_CONV_LIBRARIES[library]) or None


def make_train_step(model, tx, loss_cfg, state_shardings, batch_sharding, nan_steps=(),
                    options=None):
    """jit-compiled (state, batch) -> (state, metrics); state donated; `options`: XLA
    compiler options (compiler_options()).

    A step whose loss or gradient norm is NaN/Inf changes nothing but `step` and reports
    metrics['nonfinite'] = 1. `nan_steps` (1-based, testing only) multiplies the loss by NaN
    at those steps.
    """
    loss_kwargs = dict(
        alpha=loss_cfg.alpha,
        lambda1=loss_cfg.lambda1,
        lambda2=loss_cfg.lambda2,
        tau=loss_cfg.tau,
        num_lowest=loss_cfg.num_lowest or None,
        rank_order=loss_cfg.rank_order,
        use_rank=loss_cfg.use_rank,
    )

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
        # the new one (2-10% of a CPU training step, benchmarks/RESULTS.md).
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
    """jit-compiled (variables, batch) -> per-image predictions (sharded like the batch);
    `options`: XLA compiler options (compiler_options())."""
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


# ----------------------------------------------------------------------------- evaluation


def evaluate(eval_step, variables, dataset, batch_sharding, cfg, video_ids=None,
             sequence: bool = True) -> dict:
    """Runs `eval_step` over a finite dataset and returns the metrics of method.md section 4.

    Sequence metrics (multi-class heads, unless `sequence` is False: binary-only data), binary
    detection metrics (frame level, and video level when `video_ids`, the (N,) video of each
    record of the split, is given and eval.video_auc is on) and the localization of the MIL
    similarity map against the records' manipulation masks.
    """
    collected = collections.defaultdict(list)
    meter = evaluation.LocalizationMeter()
    iterator = iter(dataset)
    for batch in iterator:
        device_batch = parallel.to_global(
            {k: batch[k] for k in ("image", "label", "is_fake", "valid", "mask", "index")},
            batch_sharding,
        )
        predictions = eval_step(variables, device_batch)
        # Everything but the images back on every host (gathered over processes).
        out = parallel.to_host(
            {**predictions, **{k: v for k, v in device_batch.items() if k != "image"}}
        )
        valid = out["valid"] > 0
        for key in ("probs", "fake_prob", "label", "is_fake", "index"):
            collected[key].append(np.asarray(out[key])[valid])
        meter.add_similarity(out["similarity_map"], out["mask"], out["valid"])
    iterator.close()
    probs = np.concatenate(collected["probs"])
    fake_prob = np.concatenate(collected["fake_prob"])
    label = np.concatenate(collected["label"])
    is_fake = np.concatenate(collected["is_fake"])
    result = {"num_images": len(label)}
    if cfg.model.num_classes > 1 and sequence:
        result.update(
            metrics_lib.sequence_metrics(
                probs,
                label,
                threshold=cfg.eval.threshold,
                order=cfg.loss.rank_order,
                fake_prob=fake_prob,
                gate=cfg.eval.gate_by_fake_prob,
            )
        )
    class_score = probs.max(axis=1) if cfg.model.num_classes > 1 else probs[:, 0]
    if 0 < is_fake.sum() < len(is_fake):
        frame_videos = None
        if video_ids is not None and cfg.eval.video_auc:
            frame_videos = np.asarray(video_ids)[np.concatenate(collected["index"])]
        result.update(evaluation.binary_metrics(class_score, is_fake, video_ids=frame_videos))
        result["mil_auc"] = metrics_lib.binary_auc(fake_prob, is_fake)
    localization = meter.result()
    if localization["num_localized"] > 0:
        result.update(localization)
    return {k: float(v) for k, v in result.items()}


# ----------------------------------------------------------------------------- logging


class MetricWriter:
    """Appends one JSON object per event to <workdir>/metrics.jsonl (process 0 only)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")

    def write(self, step: int, split: str, values: dict, **extra) -> None:
        if not checkpoint.is_primary():
            return
        record = {"step": int(step), "split": split, **extra}
        for k, v in values.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else None  # JSON has no NaN
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> int:
        """Removes records of steps after `step` (re-run after a resume); returns how many."""
        if not checkpoint.is_primary() or not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        return len(lines) - len(kept)


class TrainWindow:
    """Per-step train metrics and the images trained on since the last train record.

    The metrics stay on the device until `summary` or `to_json` reads them: with evaluation
    and checkpoints, the loop's only host syncs. `to_json` goes into checkpoints, so a resumed
    run writes the same means as an uninterrupted one.
    """

    def __init__(self, saved=()):
        self.steps = [{k: np.float32(v) for k, v in m.items()} for m in saved]
        self.images = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Starts timing images_per_sec anew (after an evaluation, which is not training)."""
        self.start = time.perf_counter()

    def append(self, step_metrics: dict, num_images: int) -> None:
        self.steps.append(step_metrics)
        self.images += num_images

    def _on_host(self) -> list[dict]:
        self.steps = [
            {k: np.float32(v) for k, v in m.items()} for m in jax.device_get(self.steps)
        ]
        return self.steps

    def to_json(self) -> list[dict]:
        return [{k: float(v) for k, v in m.items()} for m in self._on_host()]

    def summary(self) -> tuple[dict, list[bool]]:
        """(means over the finite steps, 'nonfinite' count and images_per_sec; per-step
        non-finite flags), then starts a new window."""
        steps, self.steps = self._on_host(), []
        flags = [bool(m["nonfinite"]) for m in steps]
        finite = [m for m, bad in zip(steps, flags) if not bad]
        means = {
            k: np.mean(np.asarray([m[k] for m in finite], np.float32)) if finite else np.nan
            for k in steps[0] if k != "nonfinite"
        }
        means["nonfinite"] = sum(flags)
        means["images_per_sec"] = self.images / (time.perf_counter() - self.start)
        self.images = 0
        self.restart_clock()
        return means, flags


def _total_steps(cfg, train_len: int) -> int:
    if cfg.train.num_steps > 0:
        return cfg.train.num_steps
    return max(1, cfg.train.num_epochs * train_len // cfg.train.batch_size)


def _select_metrics(cfg) -> list[str]:
    return [m.strip() for m in cfg.eval.select_metrics.split(",") if m.strip()]


def _log(message: str) -> None:
    """Prints on process 0 only (tqdm-safe)."""
    if checkpoint.is_primary():
        from tqdm import auto as tqdm  # pylint: disable=import-outside-toplevel

        tqdm.tqdm.write(message)
        sys.stdout.flush()


def _progress(total, initial):
    from tqdm import auto as tqdm  # pylint: disable=import-outside-toplevel

    return tqdm.tqdm(
        total=total,
        initial=initial,
        disable=not checkpoint.is_primary(),
        dynamic_ncols=True,
        mininterval=2.0,
    )


def _bad_records(cfg, workdir: str) -> dict:
    """{'bad_records': distinct training records skipped so far} when any; DataError past the
    data.max_bad_records limit. The same answer on every process."""
    count = faults.count_bad_records(workdir)
    if jax.process_count() > 1:  # files may lag on some hosts: process 0 decides for all
        count = int(multihost_utils.broadcast_one_to_all(np.int32(count)))
    if count > cfg.data.max_bad_records:
        raise sources.DataError(
            f"{count} bad training records skipped, more than data.max_bad_records="
            f"{cfg.data.max_bad_records}; they are listed in {workdir}/bad_records*.jsonl"
        )
    return {"bad_records": count} if count else {}


# ----------------------------------------------------------------------------- entry points


def train_and_evaluate(cfg, workdir: str) -> dict:
    """Trains (resuming from <workdir>/checkpoints if present), then tests the best checkpoints.

    Returns the test metrics of the first selection metric's best checkpoint, or {} when the
    run was preempted (SIGTERM: checkpoint saved, run the same command again to resume).
    Raises faults.NonFiniteError after train.max_nonfinite_steps non-finite steps in a row.
    The first train record holds `time_to_first_step_s`: seconds from this call (data build,
    model init and compilation included) until the first step's results exist.
    """
    t_start = time.perf_counter()
    faults.check_workdir(workdir)
    validate_config(cfg)
    data = open_splits(cfg, workdir, ("train", "val", "test", *joint_splits(cfg, "train"),
                                      *joint_splits(cfg, "val"), *joint_splits(cfg, "test")))
    if checkpoint.is_primary():
        checkpoint.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())

    mesh = parallel.make_mesh()
    batch_sharding = parallel.batch_sharding(mesh)
    model = build_model(cfg.model)
    total_steps = _total_steps(cfg, len(data["train"]))
    tx_fn = functools.partial(optim.make_optimizer, cfg.train, total_steps)
    state, state_shardings = create_state(cfg, model, tx_fn, mesh, cfg.data.image_size)
    tx = tx_fn(state.params)

    train_iter = train_iterator(cfg, data["train"], data.get("joint_train"))
    manager = checkpoint.make_manager(workdir, cfg.train.keep_checkpoints)
    writer = MetricWriter(workdir)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
    )
    restored = checkpoint.restore_latest(manager, abstract_state)
    start_step, loop_state = 0, {}
    if restored is not None:
        start_step, state, loop_state = restored
        train_iter.set_state(loop_state["data"])
        dropped = writer.drop_after(start_step)
        _log(f"Resumed from {manager.directory} at step {start_step}"
             + (f" ({dropped} metrics records of later steps dropped)." if dropped else "."))
    elif cfg.model.init_from:
        state = load_backbone_weights(state, cfg.model.init_from)

    nan_steps = parse_steps(cfg.train.debug_nonfinite_steps)
    options = compiler_options(cfg.model)
    train_step = make_train_step(
        model, tx, cfg.loss, state_shardings, batch_sharding, nan_steps, options
    )
    var_shardings = {"params": state_shardings.params, "batch_stats": state_shardings.batch_stats}
    eval_step = make_eval_step(model, cfg.loss, var_shardings, batch_sharding, options)
    best = checkpoint.BestKeeper(workdir, _select_metrics(cfg))

    videos = {split: evaluation.video_ids(data[split])
              for split in ("val", *joint_splits(cfg, "val"))}

    def run_eval(variables):
        """Val metrics; with joint training also the joint dataset's, keys prefixed joint_."""
        result = evaluate(eval_step, variables, eval_batches(cfg, data["val"]), batch_sharding,
                          cfg, video_ids=videos["val"])
        for split in joint_splits(cfg, "val"):
            joint = evaluate(eval_step, variables, eval_batches(cfg, data[split]),
                             batch_sharding, cfg, video_ids=videos[split], sequence=False)
            result.update({f"joint_{k}": v for k, v in joint.items()})
        return result

    batches = parallel.DevicePrefetcher(train_iter, batch_sharding, size=cfg.data.prefetch)
    window = TrainWindow(loop_state.get("log_window", ()))  # per-step metrics until logged
    nonfinite = faults.NonFiniteMonitor(
        cfg.train.max_nonfinite_steps, loop_state.get("nonfinite_streak", 0)
    )

    def save(step, wait=False):
        loop = {"data": batches.state(), "log_window": window.to_json(),
                "nonfinite_streak": nonfinite.streak}
        checkpoint.save(manager, step, state, loop, wait=wait)

    lr_at = optim.lr_schedule(cfg.train.lr, cfg.train.warmup_steps, total_steps)
    step = start_step
    stop = None  # why the loop ended early: "preempted" or "nonfinite"
    bar = _progress(total_steps, start_step)
    first_step_time = None
    try:
        with faults.PreemptionWatcher() as preemption:
            while step < total_steps:
                batch = next(batches)
                state, step_metrics = train_step(state, batch)
                step += 1
                bar.update(1)
                window.append(step_metrics, batch["image"].shape[0])
                if first_step_time is None:
                    jax.block_until_ready(step_metrics)
                    first_step_time = time.perf_counter() - t_start
                    writer.write(step, "train", {"time_to_first_step_s": first_step_time})
                if step % cfg.train.log_every == 0 or step == total_steps:
                    means, nonfinite_flags = window.summary()
                    means.update(lr=lr_at(step), **_bad_records(cfg, workdir))
                    writer.write(step, "train", means)
                    bar.set_postfix(loss=f"{means['loss']:.3f}")
                    if nonfinite.update(step, nonfinite_flags):
                        stop = "nonfinite"
                        break
                if step % cfg.train.eval_every == 0 or step == total_steps:
                    val = run_eval(state.variables())
                    writer.write(step, "val", val)
                    improved = best.update(step, state.variables(), val)
                    _log(
                        f"step {step}: val "
                        + " ".join(f"{k}={v:.4f}" for k, v in val.items() if k != "num_images")
                        + (f" (best {', '.join(improved)})" if improved else "")
                    )
                    window.restart_clock()
                if step % cfg.train.checkpoint_every == 0 or step == total_steps:
                    save(step)
                if preemption.should_stop(step):
                    save(step, wait=True)
                    stop = "preempted"
                    break
    finally:
        bar.close()
        batches.close()
        manager.wait_until_finished()
        last_checkpoint = manager.latest_step()
        best.wait()
        best.close()
        manager.close()
    if stop == "preempted":
        _log(f"Preempted: checkpoint saved at step {step}; run the same command to resume.")
        return {}
    if stop == "nonfinite":
        raise faults.NonFiniteError(nonfinite.message(last_checkpoint))
    abstract_variables = {"params": abstract_state.params,
                          "batch_stats": abstract_state.batch_stats}
    results = evaluate_best(cfg, workdir, data=data, mesh=mesh, eval_step=eval_step,
                            abstract=abstract_variables)
    if checkpoint.is_primary():
        from cmil_jax import viz  # pylint: disable=import-outside-toplevel

        viz.plot_curves(workdir)
    return results


def evaluate_best(cfg, workdir: str, *, data=None, mesh=None, eval_step=None,
                  abstract=None) -> dict:
    """Evaluates the best checkpoint of every selection metric on the test split.

    `eval_step` and `abstract` (variables as ShapeDtypeStructs with shardings) are built here
    unless the caller has them already (train_and_evaluate does).
    """
    if data is None:
        data = open_splits(cfg, workdir, ("test",))
    mesh = mesh or parallel.make_mesh()
    batch_sharding = parallel.batch_sharding(mesh)
    if eval_step is None:
        model = build_model(cfg.model)
        replicated = NamedSharding(mesh, P())
        abstract = jax.eval_shape(
            lambda: model.init(
                jax.random.key(0),
                jnp.zeros((1, cfg.data.image_size, cfg.data.image_size, 3), jnp.uint8),
                train=False,
            )
        )
        abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
        )
        eval_step = make_eval_step(
            model,
            cfg.loss,
            jax.tree.map(lambda _: replicated, abstract),
            batch_sharding,
            compiler_options(cfg.model),
        )
    writer = MetricWriter(workdir)
    # (split, dataset name, sequence metrics?) tested with every best checkpoint.
    tests = [("test", cfg.data.name, True)]
    tests += [(split, cfg.data.joint_name, False) for split in joint_splits(cfg, "test")]
    missing = [split for split, _, _ in tests if split not in data]
    if missing:
        data = {**data, **open_splits(cfg, workdir, missing)}
    videos = {split: evaluation.video_ids(data[split]) for split, _, _ in tests}
    first = None
    for metric in _select_metrics(cfg):
        step, variables = checkpoint.restore_best(workdir, metric, abstract)
        for split, dataset, sequence in tests:
            result = evaluate(eval_step, variables, eval_batches(cfg, data[split]),
                              batch_sharding, cfg, video_ids=videos[split], sequence=sequence)
            writer.write(step, "test", result, checkpoint=f"best_{metric}", dataset=dataset)
            _log(
                f"test on {dataset} (best {metric} on val, step {step}): "
                + " ".join(f"{k}={v:.4f}" for k, v in result.items() if k != "num_images")
            )
            first = first or result
    if checkpoint.is_primary():
        evaluation.write_results(workdir)
    return first
