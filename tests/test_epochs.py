"""One definition of an epoch: in triples mode, a pass over the training split's genuine images.

The trainer's step count (train.training_steps) and the triple pipeline's epoch boundary (where
the order of the genuine images starts again) must agree; and the Swin variants of the paper
configs train for the supplementary's 400 epochs, the ResNet recipe for 200.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmil_jax import config_base
from cmil_jax import train
from cmil_jax.data import pipeline
from cmil_jax.data import sbi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8  # image side of the toy records


class ToySource:
    """Records whose image is filled with their index, so a batch row tells which record it is.

    `genuine` of the records are genuine (label 0s), the others fakes, interleaved."""

    def __init__(self, genuine: int, fake: int):
        kinds = [0] * genuine + [1] * fake
        np.random.default_rng(1).shuffle(kinds)
        self.kinds = np.array(kinds, np.int32)

    def __len__(self):
        return len(self.kinds)

    def labels(self):
        out = np.zeros((len(self), 5), np.int32)
        out[self.kinds == 1, 0] = 1
        return out

    def is_fake(self):
        return self.kinds.copy()

    def __getitem__(self, i):
        return {"image": np.full((SIZE, SIZE, 3), i, np.uint8),
                "label": self.labels()[i], "is_fake": np.int32(self.kinds[i]),
                "mask": np.zeros((SIZE, SIZE), np.uint8),
                "landmarks": np.zeros((68, 2), np.float32)}


NO_AUGMENT = {"flip_p": 0.0, "crop_mode": "none", "jitter_p": 0.0, "blur_p": 0.0}


def _paper_config(batch_size: int, num_epochs: int):
    cfg = config_base.seq_config("facial_components", None)  # the paper recipe: triples
    cfg.train.batch_size = batch_size
    cfg.train.num_epochs = num_epochs
    return cfg


def test_triples_epoch_is_one_pass_over_the_genuine_images(monkeypatch):
    # The SBI image is the genuine one here: only the order of the records matters.
    monkeypatch.setattr(sbi, "self_blend",
                        lambda image, landmarks, rng: (image, image, np.zeros(image.shape[:2])))
    genuine, fakes, batch = 12, 7, 4
    source = ToySource(genuine, fakes)
    genuine_ids = sorted(int(i) for i in np.flatnonzero(source.kinds == 0))
    steps_per_epoch = genuine // batch  # independent count: 3 steps of 4 triples

    cfg = _paper_config(batch, num_epochs=5)
    assert train.training_steps(cfg, source) == 5 * steps_per_epoch
    assert pipeline.epoch_size(source, triples=True) == genuine
    assert pipeline.epoch_size(source, triples=False) == genuine + fakes

    it = iter(pipeline.make_triple_train_dataset(
        source, batch_size=batch, seed=0, image_size=SIZE, augment_cfg=NO_AUGMENT, shard=False,
        num_workers=0))
    rows = []
    for _ in range(3 * steps_per_epoch):  # three epochs
        b = next(it)
        assert b["image"].shape[0] == 3 * batch
        rows += [int(v) for v in b["image"][0::3, 0, 0, 0]]  # row 3t: triple t's genuine image
        assert set(int(v) for v in b["image"][2::3, 0, 0, 0]) <= set(np.flatnonzero(source.kinds))
    epochs = [rows[k * genuine:(k + 1) * genuine] for k in range(3)]
    for e in epochs:  # each run of `steps_per_epoch` batches sees every genuine image once
        assert sorted(e) == genuine_ids
    assert epochs[0] != epochs[1]  # and the order is reshuffled at the boundary


def test_the_epoch_rounds_down_and_joint_training_counts_its_own_share():
    source = ToySource(genuine=10, fake=5)
    cfg = _paper_config(batch_size=4, num_epochs=3)
    assert train.training_steps(cfg, source) == 3 * 10 // 4  # 7: leftovers carry over
    cfg.data.joint_name, cfg.data.joint_fraction = "ffpp/c23", 0.25
    assert train.training_steps(cfg, source) == 3 * 10 // 3  # 3 Seq-FaceComp triples a step
    cfg.data.joint_name, cfg.data.triples = "", False
    assert train.training_steps(cfg, source) == 3 * 15 // 4  # single images: every record
    cfg.train.num_steps = 11
    assert train.training_steps(cfg, source) == 11


def _config(name, arg):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


SWIN = [(name, arg) for name in ("seqcomp.py", "seqattr.py", "ffpp.py", "joint.py")
        for arg in ("swin_t", "swin_s", "swin_b")]


@pytest.mark.parametrize("name, arg", SWIN)
def test_swin_variants_build_and_train_400_epochs(name, arg):
    cfg = _config(name, arg)
    assert cfg.model.backbone == arg
    assert cfg.train.num_epochs == 400 and cfg.train.num_steps == 0  # supplementary, sec. B
    assert cfg.data.triples
    config_base.validate(cfg, devices=1, processes=1)
    plain = _config(name, None)  # the ResNet recipe of the same file: 200 epochs
    assert plain.train.num_epochs == 200 and plain.model.backbone == "resnet50"
    assert {k: v for k, v in cfg.data.items() if k != "image_size"} == \
        {k: v for k, v in plain.data.items() if k != "image_size"}
    model = train.build_model(cfg)
    size = cfg.data.image_size
    variables = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8), train=False))
    assert variables["params"]["class_tokens"].shape == (cfg.model.num_classes, cfg.model.width)
