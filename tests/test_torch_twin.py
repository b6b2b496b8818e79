"""The PyTorch twin (benchmarks/torch_twin.py) computes what cmil_jax computes.

Same weights (random, in the Flax model's shapes, with random BatchNorm statistics, scales and
biases so that a wrong mapping shows) copied with load_from_flax, same uint8 batch: outputs,
every loss term, the total loss, the BatchNorm running means and the parameter gradients agree
in float32 (1e-4).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_twin as tt
from cmil_jax import config_base, losses, optim
from cmil_jax.models import CMIL

OUTPUT_KEYS = ("class_logits", "patch_class_logits", "patch_logits", "mil_emb", "mil_bias")
TERMS = ("l_cls", "l_bce_u", "l_bce_v", "l_rank", "mil_fake_prob")
TOL = dict(rtol=1e-4, atol=1e-4)

# (name, backbone, backbone width, dilate_last, width, num heads)
CASES = {
    "resnet10": dict(
        backbone="resnet10", backbone_width=16, dilate_last=True, width=48, num_heads=6
    ),
    "resnet50": dict(
        backbone="resnet50", backbone_width=64, dilate_last=False, width=96, num_heads=6
    ),
}
SIZE = 64


def _batch(b=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (b, SIZE, SIZE, 3), dtype=np.uint8)
    label = np.zeros((b, 5), np.int32)
    for i in range(b):
        n = i % 4  # lengths 0, 1, 2, 3
        label[i, :n] = rng.permutation(np.arange(1, 6))[:n]
    return {
        "image": images,
        "label": label,
        "is_fake": (label.any(1)).astype(np.int32),
        "has_seq": np.array([1, 1, 0, 1, 1, 0, 1, 1][:b], np.float32),
    }


def _random_variables(shapes, seed=1):
    """numpy-filled variables of the given shape tree (no init compile); every BatchNorm statistic,
    scale and bias is random so that a wrong mapping shows."""
    rng = np.random.default_rng(seed)

    def f(path, x):
        names = [str(getattr(p, "key", p)) for p in path]
        name, shape = names[-1], x.shape
        if name == "kernel":
            if names[-2] in ("query", "key", "value"):
                fan_in = shape[0]
            elif names[-2] == "class_head":
                fan_in = shape[-1]
            else:
                fan_in = int(np.prod(shape[:-1]))
            return rng.normal(0, np.sqrt(2.0 / fan_in), shape)
        if name in ("pos_embed", "class_tokens"):
            return rng.normal(0, 0.02, shape)
        if name == "bias":
            return rng.normal(0, 0.1, shape)
        if name == "scale":
            return rng.uniform(0.5, 1.0, shape)
        if name == "mean":
            return rng.normal(0, 0.2, shape)
        if name == "var":
            return rng.uniform(0.5, 2.0, shape)
        if name == "mil_bias":
            return np.full(shape, 0.3)
        raise ValueError(f"unexpected variable {'/'.join(names)}")

    return jax.tree_util.tree_map_with_path(lambda p, x: f(p, x).astype(np.float32), shapes)


@functools.cache
def _models(case):
    kw = CASES[case]
    flax_model = CMIL(**kw)
    shapes = jax.eval_shape(
        lambda: flax_model.init(
            jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8), train=False
        )
    )
    variables = _random_variables(shapes)
    torch.manual_seed(0)
    twin = tt.CMIL(**kw, image_size=SIZE).to(memory_format=torch.channels_last)
    tt.load_from_flax(twin, variables)
    return flax_model, variables, twin


def _torch_batch(batch):
    return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}


def _np(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


LOSS_CONFIGS = [
    dict(num_lowest=None, rank_order="first_high"),
    dict(num_lowest=3, rank_order="last_high", alpha=0.5, lambda2=2.0, tau=0.5),
]


def _check_losses(jax_out, torch_out, batch):
    for cfg in LOSS_CONFIGS:
        j_loss, j_terms = losses.total_loss(jax_out, batch, **cfg)
        t_loss, t_terms = tt.total_loss(torch_out, _torch_batch(batch), **cfg)
        np.testing.assert_allclose(_np(t_loss), np.asarray(j_loss), **TOL, err_msg=str(cfg))
        for k in TERMS:
            np.testing.assert_allclose(
                _np(t_terms[k]), np.asarray(j_terms[k]), **TOL, err_msg=f"{k} {cfg}"
            )


@pytest.mark.parametrize(
    "case, train", [("resnet10", False), ("resnet10", True), ("resnet50", False)]
)
def test_outputs_and_losses_match(case, train):
    flax_model, variables, twin = _models(case)
    batch = _batch()
    if train:
        apply = jax.jit(lambda v, x: flax_model.apply(v, x, train=True, mutable=["batch_stats"]))
        jax_out, _ = apply(variables, batch["image"])
        twin.train()
    else:
        jax_out = jax.jit(lambda v, x: flax_model.apply(v, x, train=False))(
            variables, batch["image"]
        )
        twin.eval()
    with torch.no_grad():
        torch_out = twin(torch.from_numpy(batch["image"]))
    if train:  # restore the loaded running statistics for the other tests
        tt.load_from_flax(twin, variables)

    n = jax_out["mil_emb"].shape[1]
    assert n >= 4
    for k in OUTPUT_KEYS:
        assert torch_out[k].shape == jax_out[k].shape, k
        np.testing.assert_allclose(_np(torch_out[k]), np.asarray(jax_out[k]), **TOL, err_msg=k)
    fm_j = np.asarray(jax_out["feature_map"])
    np.testing.assert_allclose(
        _np(torch_out["feature_map"]), fm_j, rtol=1e-4, atol=1e-4 * np.abs(fm_j).max()
    )
    _check_losses(jax_out, torch_out, batch)


def test_train_mode_running_means_match():
    flax_model, variables, twin = _models("resnet10")
    batch = _batch()
    _, new_vars = jax.jit(lambda v, x: flax_model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, batch["image"]
    )
    twin.train()
    with torch.no_grad():
        twin(torch.from_numpy(batch["image"]))
    expected = tt.flax_to_state_dict(
        {"params": variables["params"], "batch_stats": new_vars["batch_stats"]}
    )
    got = {k: v.clone() for k, v in twin.state_dict().items()}
    tt.load_from_flax(twin, variables)
    means = [k for k in expected if k.endswith("running_mean")]
    assert len(means) == 12  # stem + 4 blocks x 2 + 3 downsample
    for k in means:
        np.testing.assert_allclose(got[k].numpy(), expected[k].numpy(), **TOL, err_msg=k)


def test_gradients_match():
    flax_model, variables, twin = _models("resnet10")
    batch = _batch()
    cfg = LOSS_CONFIGS[0]

    def loss_fn(params):
        out, _ = flax_model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        return losses.total_loss(out, batch, **cfg)[0]

    grads = jax.jit(jax.grad(loss_fn))(variables["params"])
    expected = tt.flax_to_state_dict({"params": grads, "batch_stats": variables["batch_stats"]})
    twin.train()
    twin.zero_grad()
    loss, _ = tt.total_loss(twin(torch.from_numpy(batch["image"])), _torch_batch(batch), **cfg)
    loss.backward()
    tt.load_from_flax(twin, variables)
    for name, p in twin.named_parameters():
        g = p.grad.numpy()
        scale = max(np.abs(expected[name].numpy()).max(), 1e-3)
        np.testing.assert_allclose(
            g, expected[name].numpy(), rtol=1e-3, atol=1e-4 * scale, err_msg=name
        )


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("with_has_seq", [False, True])
def test_losses_match_on_same_outputs(binary, with_has_seq):
    rng = np.random.default_rng(3)
    b, n, e, c = 6, 9, 16, 1 if binary else 5
    emb = rng.normal(size=(b, n, e)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    out = {
        "class_logits": rng.normal(size=(b, c)).astype(np.float32),
        "patch_logits": rng.normal(size=(b, c)).astype(np.float32),
        "mil_emb": emb,
        "mil_bias": np.float32(0.2),
    }
    batch = _batch(b)
    del batch["image"]
    if not with_has_seq:
        del batch["has_seq"]
    t_out = {k: torch.from_numpy(np.asarray(v)) for k, v in out.items()}
    for cfg in LOSS_CONFIGS + [dict(num_lowest=1000, use_rank=False)]:
        j_loss, j_terms = losses.total_loss(out, batch, **cfg)
        t_loss, t_terms = tt.total_loss(t_out, _torch_batch(batch), **cfg)
        np.testing.assert_allclose(_np(t_loss), np.asarray(j_loss), rtol=1e-5, atol=1e-6)
        for k in TERMS:
            np.testing.assert_allclose(
                _np(t_terms[k]), np.asarray(j_terms[k]), rtol=1e-5, atol=1e-6, err_msg=k
            )
    np.testing.assert_allclose(
        _np(tt.patch_similarity_map(t_out["mil_emb"])),
        np.asarray(losses.patch_similarity_map(emb)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_twin_train_and_eval_steps_run():
    _, variables, _ = _models("resnet10")
    twin = tt.CMIL(**CASES["resnet10"], image_size=SIZE).to(memory_format=torch.channels_last)
    tt.load_from_flax(twin, variables)
    train_cfg = config_base.base_config().train
    train_cfg.update(lr=1e-3, warmup_steps=1)
    opt, sched = tt.make_optimizer(twin, train_cfg, total_steps=10)
    step = tt.make_train_step(twin, opt, sched, dict(tau=0.2))
    batch = _torch_batch(_batch())
    before = twin.tokenizer.weight.detach().clone()
    m1, m2 = step(batch), step(batch)
    assert all(np.isfinite(_np(v)) for v in {**m1, **m2}.values())
    assert not torch.equal(before, twin.tokenizer.weight)  # lr > 0 from the second step
    # After two steps, the learning rates of step 2 of optim.lr_schedule (head, backbone).
    expected = [float(optim.lr_schedule(1e-3 * m, 1, 10)(2)) for m in (1.0, 0.1)]
    lrs = sorted({g["lr"] for g in opt.param_groups}, reverse=True)
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    out = tt.make_eval_step(twin)(batch["image"])
    assert out["probs"].shape == (4, 5) and out["similarity_map"].shape == (4, 16)
    assert out["fake_prob"].shape == (4,)

