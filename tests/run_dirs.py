"""Test helper: a run directory as training leaves it, without training."""

import os

import jax
import jax.numpy as jnp

from cmil_jax import checkpoint
from cmil_jax import train
from cmil_jax.config_base import seq_config


def random_init_run(workdir: str, size: int, subset: str = "facial_attributes") -> str:
    """`workdir` with config.json and a best checkpoint ('fixed_acc', step 5) of a random-init
    tiny model (ResNet-10 at width 8, transformer width 48) for `size` px inputs."""
    cfg = seq_config(subset, "demo")
    cfg.data.image_size = size
    cfg.model.backbone_width = 8
    cfg.model.width = 48
    checkpoint.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    model = train.build_model(cfg)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
        jnp.zeros((1, size, size, 3), jnp.uint8))
    keeper = checkpoint.BestKeeper(workdir, ["fixed_acc"])
    keeper.update(5, {k: variables[k] for k in ("params", "batch_stats")}, {"fixed_acc": 0.1})
    keeper.wait()
    keeper.close()
    return workdir
