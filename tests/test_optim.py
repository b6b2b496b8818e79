"""Optimizer: parameter groups, weight-decay mask and schedule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cmil_jax import optim


def _params():
    return {
        "backbone": {
            "conv1": {"kernel": jnp.ones((3, 3, 3, 4))},
            "bn1": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))},
        },
        "tokenizer": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones((8,))},
        "pos_embed": jnp.ones((2, 2, 8)),
        "class_tokens": jnp.ones((5, 8)),
        "mil_bias": jnp.ones(()),
    }


def _cfg(**kw):
    c = ml_collections.ConfigDict(
        dict(
            lr=1e-2,
            backbone_lr_mult=0.1,
            weight_decay=0.5,
            warmup_steps=0,
            b1=0.9,
            b2=0.999,
            grad_clip=0.0,
        )
    )
    c.update(kw)
    return c


def test_decay_mask_only_weights():
    mask = optim.decay_mask(_params())
    assert mask["backbone"]["conv1"]["kernel"]
    assert mask["tokenizer"]["kernel"]
    assert not mask["backbone"]["bn1"]["scale"]
    assert not mask["backbone"]["bn1"]["bias"]
    assert not mask["tokenizer"]["bias"]
    assert not mask["pos_embed"]
    assert not mask["class_tokens"]
    assert not mask["mil_bias"]


def test_decay_mask_of_cmil_params():
    """Every kernel of the real model decays; no bias (attention q/k/v biases are rank 2),
    norm, class token, position embedding or MIL bias does."""
    from cmil_jax.models import CMIL

    model = CMIL(backbone="resnet10", backbone_width=8, width=48, num_heads=6)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )["params"]
    attn = shapes["encoder"]["attn"]
    assert attn["query"]["bias"].ndim == 2  # (heads, head_dim): not excluded by rank
    mask = optim.decay_mask(shapes)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    decayed = {k for k, v in flat.items() if v}
    assert decayed == {k for k in flat if k.endswith("/kernel")}
    for name in ("query", "key", "value", "out"):
        assert not mask["encoder"]["attn"][name]["bias"]
        assert mask["encoder"]["attn"][name]["kernel"]
    assert mask["class_head"]["kernel"]
    assert not mask["class_head"]["bias"]
    assert not mask["encoder"]["norm1"]["scale"]


def test_param_groups():
    groups = optim.param_groups(_params())
    assert groups["backbone"]["conv1"]["kernel"] == "backbone"
    assert groups["tokenizer"]["kernel"] == "head"
    assert groups["mil_bias"] == "head"


def test_backbone_learns_ten_times_slower():
    params = _params()
    tx = optim.make_optimizer(_cfg(weight_decay=0.0), total_steps=100, params=params)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    # First Adam step moves each weight by about lr (sign of the gradient), at step 0 of a
    # cosine schedule without warm-up the lr is the peak.
    np.testing.assert_allclose(updates["tokenizer"]["kernel"], -1e-2, rtol=1e-3)
    np.testing.assert_allclose(updates["backbone"]["conv1"]["kernel"], -1e-3, rtol=1e-3)


def test_weight_decay_applies_to_kernels_not_norms():
    params = _params()
    tx = optim.make_optimizer(_cfg(), total_steps=100, params=params)
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, state, params)
    # Zero gradient: only decoupled weight decay moves a parameter: -lr * wd * p.
    np.testing.assert_allclose(updates["tokenizer"]["kernel"], -1e-2 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(updates["backbone"]["conv1"]["kernel"], -1e-3 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(updates["backbone"]["bn1"]["scale"], 0.0)
    np.testing.assert_allclose(updates["class_tokens"], 0.0)
    np.testing.assert_allclose(updates["pos_embed"], 0.0)


def test_schedule_warmup_then_cosine():
    sched = optim.lr_schedule(1.0, warmup_steps=10, total_steps=110)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(60)), 0.5, rtol=1e-5)  # half-way through cosine
    assert float(sched(110)) < 1e-6


def test_grad_clip():
    params = {"head": {"kernel": jnp.ones((2, 2))}}
    cfg = _cfg(grad_clip=1.0, weight_decay=0.0)
    tx = optim.make_optimizer(cfg, 10, params)
    state = tx.init(params)
    grads = {"head": {"kernel": jnp.full((2, 2), 100.0)}}
    assert isinstance(tx, optax.GradientTransformation)
    updates, _ = tx.update(grads, state, params)
    assert np.all(np.isfinite(updates["head"]["kernel"]))
