"""A run's inputs from its config: which datasets and splits it opens, and the iterators over them.

    splits = open_splits(cfg, workdir, ("train", "val", "test"))
    batches = train_iterator(cfg, splits["train"])          # checkpointable (grain)
    for batch in eval_batches(cfg, splits["val"]): ...      # one padded pass

Split names: 'train', 'val', 'test' read data.name; 'joint_train', 'joint_val', 'joint_test'
read data.joint_name (joint training, method.md, "Data and training"). Batch sizes in the config are
global; each process reads its share (config_base.per_process).
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils

from cmil_jax import checkpoint
from cmil_jax import config_base
from cmil_jax import faults
from cmil_jax.data import pipeline
from cmil_jax.data import sources


def resolve_data_dir(cfg, workdir: str) -> str:
    """data.data_dir, or <workdir>/data when it is empty; absolute."""
    data_dir = cfg.data.data_dir or os.path.join(workdir, "data")
    return os.path.abspath(os.path.expanduser(data_dir))


def open_splits(cfg, workdir: str, splits) -> dict:
    """Opens the requested splits; builds the synthetic data set first when the config uses it.

    Raises FileNotFoundError naming the missing path (and the command that builds it) before
    any model is compiled. The train splits skip bad records (logged and counted, see
    `faults.SkipBadRecords`) unless data.max_bad_records is 0; evaluation splits fail on them.
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
    from cmil_jax.data import synthetic_dataset  # pylint: disable=import-outside-toplevel

    subset = name.split("/")[1] if "/" in name else cfg.data.subset
    syn = cfg.data.synthetic

    def build():
        return synthetic_dataset.build_synthetic(
            data_dir, subset, image_size=cfg.data.image_size, num_train=syn.num_train,
            num_val=syn.num_val, num_test=syn.num_test, seed=syn.seed,
            num_workers=os.cpu_count() or 1)

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


def train_iterator(cfg, source, joint_source=None):
    """Checkpointable iterator of this process's training batches (single images, or triples
    when data.triples), mixed with `joint_source` when joint training is on."""
    processes = jax.process_count()
    common = {
        "batch_size": config_base.per_process(cfg.train.batch_size, processes),
        "seed": cfg.seed,
        "image_size": cfg.data.image_size,
        "augment_cfg": cfg.data.augment,
        "num_workers": cfg.data.num_workers,
    }
    if joint_source is not None:
        return iter(pipeline.make_joint_train_dataset(
            source, joint_source, joint_batch_size=config_base.joint_batch_size(cfg, processes),
            triples=cfg.data.triples, sbi_labels=cfg.data.sbi_labels, **common))
    if cfg.data.triples:
        return iter(pipeline.make_triple_train_dataset(
            source, sbi_labels=cfg.data.sbi_labels, **common))
    return iter(pipeline.make_train_dataset(source, **common))


def eval_batches(cfg, source):
    """One pass over `source` in record order, padded batches with a 'valid' flag."""
    return pipeline.make_eval_dataset(
        source,
        batch_size=config_base.per_process(cfg.eval.batch_size, jax.process_count()),
        image_size=cfg.data.image_size,
        num_workers=min(cfg.data.num_workers, 2),
    )
