"""Training and evaluation loops.

One training step, top to bottom:
    host batch (uint8 images, labels)  --device_put, sharded over the 'data' axis-->
    train_step: CMIL.apply (normalises, backbone, tokens, transformer, heads)
                            -> losses.total_loss (L_CLS, L^U, L^V, L_Rank) -> grads -> AdamW update.
The state is replicated over the mesh and donated; BatchNorm statistics are computed over the
global batch (jit over a sharded batch is synchronous BatchNorm).
"""

import collections
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from cmil_jax import checkpoint
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
        dtype=jnp.dtype(model_cfg.dtype),
    )


def resolve_data_dir(cfg, workdir: str) -> str:
    data_dir = cfg.data.data_dir or os.path.join(workdir, "data")
    return os.path.abspath(os.path.expanduser(data_dir))


def open_splits(cfg, workdir: str, splits) -> dict:
    """Opens the requested splits; builds the synthetic data set first when the config uses it.

    Raises FileNotFoundError naming the missing path (and the command that builds it) before any
    model is compiled.
    """
    data_dir = resolve_data_dir(cfg, workdir)
    name = cfg.data.name
    if name.startswith("cmil_synthetic"):
        syn = cfg.data.synthetic
        name = sources.build_synthetic(
            data_dir,
            cfg.data.subset,
            image_size=cfg.data.image_size,
            num_train=syn.num_train,
            num_val=syn.num_val,
            num_test=syn.num_test,
            seed=syn.seed,
            num_workers=os.cpu_count() or 1,
        )
    return {
        split: sources.open_split(data_dir, name, getattr(cfg.data, f"{split}_split"))
        for split in splits
    }


def _per_process(global_batch: int) -> int:
    if global_batch % jax.process_count():
        raise ValueError(
            f"batch size {global_batch} is not divisible by {jax.process_count()} processes"
        )
    return global_batch // jax.process_count()


def train_iterator(cfg, source):
    """Checkpointable iterator of training batches (single images, or triples when configured)."""
    make = pipeline.make_triple_train_dataset if cfg.data.triples else pipeline.make_train_dataset
    dataset = make(
        source,
        batch_size=_per_process(cfg.train.batch_size),
        seed=cfg.seed,
        image_size=cfg.data.image_size,
        augment_cfg=cfg.data.augment,
        num_workers=cfg.data.num_workers,
    )
    return iter(dataset)


def eval_batches(cfg, source):
    """One pass over `source` in record order, padded batches with a 'valid' flag."""
    return pipeline.make_eval_dataset(
        source,
        batch_size=_per_process(cfg.eval.batch_size),
        image_size=cfg.data.image_size,
        num_workers=min(cfg.data.num_workers, 2),
    )


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


def make_train_step(model, tx, loss_cfg, state_shardings, batch_sharding):
    """jit-compiled (state, batch) -> (state, metrics); state donated."""
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
            return loss, (terms, new_vars["batch_stats"])

        (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        step_metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **terms}
        return new_state, step_metrics

    replicated = NamedSharding(batch_sharding.mesh, P())
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def make_eval_step(model, loss_cfg, variables_shardings, batch_sharding):
    """jit-compiled (variables, batch) -> per-image predictions (sharded like the batch)."""
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
        eval_step, in_shardings=(variables_shardings, batch_sharding), out_shardings=batch_sharding
    )


# ----------------------------------------------------------------------------- evaluation


def evaluate(eval_step, variables, dataset, batch_sharding, cfg) -> dict:
    """Runs `eval_step` over a finite dataset and returns the metrics of method.md section 4."""
    collected = collections.defaultdict(list)
    iterator = iter(dataset)
    for batch in iterator:
        device_batch = parallel.to_global(
            {k: batch[k] for k in ("image", "label", "is_fake", "valid")}, batch_sharding
        )
        predictions = eval_step(variables, device_batch)
        out = parallel.to_host(
            {**predictions, **{k: device_batch[k] for k in ("label", "is_fake", "valid")}}
        )
        valid = out["valid"] > 0
        for key in ("probs", "fake_prob", "label", "is_fake"):
            collected[key].append(np.asarray(out[key])[valid])
    iterator.close()
    probs = np.concatenate(collected["probs"])
    fake_prob = np.concatenate(collected["fake_prob"])
    label = np.concatenate(collected["label"])
    is_fake = np.concatenate(collected["is_fake"])
    result = {"num_images": int(len(label))}
    if cfg.model.num_classes > 1:
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
        class_score = probs.max(axis=1)
    else:
        class_score = probs[:, 0]
    if 0 < is_fake.sum() < len(is_fake):
        result["auc"] = metrics_lib.binary_auc(class_score, is_fake)
        result["mil_auc"] = metrics_lib.binary_auc(fake_prob, is_fake)
        result["acc"] = metrics_lib.accuracy_at(class_score, is_fake, 0.5)
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


def _total_steps(cfg, train_len: int) -> int:
    if cfg.train.num_steps > 0:
        return cfg.train.num_steps
    return max(1, cfg.train.num_epochs * train_len // cfg.train.batch_size)


def _select_metrics(cfg) -> list[str]:
    return [m.strip() for m in cfg.eval.select_metrics.split(",") if m.strip()]


def _progress(total, initial):
    from tqdm import auto as tqdm  # pylint: disable=import-outside-toplevel

    return tqdm.tqdm(
        total=total,
        initial=initial,
        disable=not checkpoint.is_primary(),
        dynamic_ncols=True,
        mininterval=2.0,
    )


# ----------------------------------------------------------------------------- entry points


def train_and_evaluate(cfg, workdir: str) -> dict:
    """Trains (resuming from <workdir>/checkpoints if present), then tests the best checkpoints.

    Returns the test metrics of the first selection metric's best checkpoint.
    """
    os.makedirs(workdir, exist_ok=True)
    data = open_splits(cfg, workdir, ("train", "val", "test"))
    if checkpoint.is_primary():
        checkpoint.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())

    mesh = parallel.make_mesh()
    batch_sharding = parallel.batch_sharding(mesh)
    model = build_model(cfg.model)
    total_steps = _total_steps(cfg, len(data["train"]))
    tx_fn = functools.partial(optim.make_optimizer, cfg.train, total_steps)
    state, state_shardings = create_state(cfg, model, tx_fn, mesh, cfg.data.image_size)
    tx = tx_fn(state.params)

    train_iter = train_iterator(cfg, data["train"])
    manager = checkpoint.make_manager(workdir, cfg.train.keep_checkpoints)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
    )
    restored = checkpoint.restore_latest(manager, abstract_state)
    start_step = 0
    if restored is not None:
        start_step, state, data_state = restored
        train_iter.set_state(data_state)
        print(f"Resumed from {manager.directory} at step {start_step}.", flush=True)
    elif cfg.model.init_from:
        state = load_backbone_weights(state, cfg.model.init_from)

    train_step = make_train_step(model, tx, cfg.loss, state_shardings, batch_sharding)
    var_shardings = {"params": state_shardings.params, "batch_stats": state_shardings.batch_stats}
    eval_step = make_eval_step(model, cfg.loss, var_shardings, batch_sharding)
    writer = MetricWriter(workdir)
    best = checkpoint.BestKeeper(workdir, _select_metrics(cfg))

    def run_eval(split, variables, step):
        ds = eval_batches(cfg, data[split])
        return evaluate(eval_step, variables, ds, batch_sharding, cfg)

    batches = parallel.DevicePrefetcher(train_iter, batch_sharding, size=cfg.data.prefetch)
    step = start_step
    pending = []  # per-step metrics kept on device until the next log
    t_log, images_since_log = time.perf_counter(), 0
    bar = _progress(total_steps, start_step)
    first_step_time = None
    t_start = time.perf_counter()
    while step < total_steps:
        batch = next(batches)
        state, step_metrics = train_step(state, batch)
        step += 1
        bar.update(1)
        pending.append(step_metrics)
        images_since_log += batch["image"].shape[0]
        if first_step_time is None:
            jax.block_until_ready(step_metrics)
            first_step_time = time.perf_counter() - t_start
            writer.write(step, "train", {"time_to_first_step_s": first_step_time})
        if step % cfg.train.log_every == 0 or step == total_steps:
            means = {
                k: float(np.mean(v))
                for k, v in jax.device_get(
                    jax.tree.map(lambda *xs: jnp.stack(xs), *pending)
                ).items()
            }
            elapsed = time.perf_counter() - t_log
            means["images_per_sec"] = images_since_log / elapsed
            means["lr"] = float(
                optim.lr_schedule(cfg.train.lr, cfg.train.warmup_steps, total_steps)(step)
            )
            writer.write(step, "train", means)
            bar.set_postfix(loss=f"{means['loss']:.3f}")
            pending, t_log, images_since_log = [], time.perf_counter(), 0
        if step % cfg.train.eval_every == 0 or step == total_steps:
            val = run_eval("val", state.variables(), step)
            writer.write(step, "val", val)
            improved = best.update(step, state.variables(), val)
            bar.write(
                f"step {step}: val "
                + " ".join(f"{k}={v:.4f}" for k, v in val.items() if k != "num_images")
                + (f" (best {', '.join(improved)})" if improved else "")
            )
            t_log = time.perf_counter()
        if step % cfg.train.checkpoint_every == 0 or step == total_steps:
            checkpoint.save(manager, step, state, batches.state())
    bar.close()
    train_iter.close()
    manager.wait_until_finished()
    best.wait()
    best.close()
    manager.close()
    results = evaluate_best(cfg, workdir, data=data, model=model, mesh=mesh)
    from cmil_jax import viz  # pylint: disable=import-outside-toplevel

    viz.plot_curves(workdir)
    return results


def evaluate_best(cfg, workdir: str, *, data=None, model=None, mesh=None) -> dict:
    """Evaluates the best checkpoint of every selection metric on the test split."""
    if data is None:
        data = open_splits(cfg, workdir, ("test",))
    mesh = mesh or parallel.make_mesh()
    model = model or build_model(cfg.model)
    batch_sharding = parallel.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    abstract = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            jnp.zeros((1, cfg.data.image_size, cfg.data.image_size, 3), jnp.uint8),
            train=False,
        )
    )
    abstract = {k: abstract[k] for k in ("params", "batch_stats") if k in abstract}
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
    )
    eval_step = make_eval_step(
        model, cfg.loss, jax.tree.map(lambda _: replicated, abstract), batch_sharding
    )
    writer = MetricWriter(workdir)
    first = None
    for metric in _select_metrics(cfg):
        step, variables = checkpoint.restore_best(workdir, metric, abstract)
        ds = eval_batches(cfg, data["test"])
        result = evaluate(eval_step, variables, ds, batch_sharding, cfg)
        writer.write(step, "test", result, checkpoint=f"best_{metric}")
        print(
            f"test (best {metric} on val, step {step}): "
            + " ".join(f"{k}={v:.4f}" for k, v in result.items() if k != "num_images"),
            flush=True,
        )
        first = first or result
    return first
