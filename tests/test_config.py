"""Configs: every config file's model section builds the model as it stands, runtime choices
have their own section, and recorded configs of older runs still load."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest

from cmil_jax import config_base
from cmil_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = [("seqattr.py", None), ("seqattr.py", "demo"), ("seqattr.py", "demo_single"),
            ("seqcomp.py", None), ("seqcomp.py", "demo"), ("seqcomp.py", "demo_triples"), ("ffpp.py", None), ("ffpp.py", "demo"),
            ("joint.py", None), ("joint.py", "demo"), ("celebdf_eval.py", None),
            ("seqcomp.py", "swin_t"), ("ffpp.py", "swin_b")]


def _config(name, arg):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name, arg", VARIANTS)
def test_model_section_builds_the_model(name, arg):
    """CMIL(**cfg.model) (train.build_model, which resolves model.dtype 'auto'): every field of
    the section is a model attribute, nothing else is."""
    cfg = _config(name, arg)
    model = train.build_model(cfg)
    size = cfg.data.image_size
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8),
                           train=False))
    assert variables["params"]["class_tokens"].shape == (cfg.model.num_classes, cfg.model.width)
    assert set(cfg.runtime) == {"kernels", "xla_cpu_conv", "host_malloc", "batchnorm"}
    config_base.validate(cfg, devices=1, processes=1)


def test_recorded_config_round_trip_and_older_runs(tmp_path):
    cfg = _config("seqattr.py", "demo")
    cfg.train.init_from = "/weights/r50"
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg.to_dict(), "resolved_runtime": {"kernels": "matmul"}}))
    as_json = json.loads(json.dumps(cfg.to_dict()))  # tuples are lists in JSON
    assert config_base.load_recorded(str(path)).to_dict() == as_json

    # A run recorded before the runtime section: its kernel fields leave the model section.
    old = cfg.to_dict()
    del old["runtime"]
    old["train"].pop("init_from")
    old["model"].update(conv_impl="matmul", cpu_conv_library="eigen", init_from="/weights/r50")
    path.write_text(json.dumps(old))
    loaded = config_base.load_recorded(str(path))
    assert loaded.to_dict() == as_json
    train.build_model(loaded)  # the model section builds the model again


def test_resume_counts_the_video_fields_that_change_val_figures():
    """A resume with another frames_per_video or aggregate would mix two protocols in one run's
    val records (and best-checkpoint choice): a change. Predict's own fields are not."""
    recorded = config_base.base_config()
    given = config_base.base_config()
    given.video.face, given.video.no_face, given.video.sequence_vote = "max", "full_frame", 0.0
    given.runtime.kernels, given.data.num_workers = "xla", 7
    assert config_base.config_changes(recorded, given) == {}
    given.video.frames_per_video, given.video.aggregate = 8, "max"
    assert config_base.config_changes(recorded, given) == {
        "video.aggregate": ("mean", "max"), "video.frames_per_video": (32, 8)}
