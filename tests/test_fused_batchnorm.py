"""runtime/fused_batchnorm.py against flax.linen.BatchNorm (+ add + ReLU), on the CPU.

The Pallas kernels run in interpret mode here (the same kernel bodies the GPU compiles with
Triton); the block sizes are made small so that small inputs still cover several row and
channel blocks and the reduction's row loop.

Tolerances. float32: the fused passes sum in another order than XLA's reductions of flax's
autodiff (block partial sums, closed-form backward), so results differ by rounding: with at
most a few hundred terms per sum, relative errors stay near 1e-6; 2e-5 leaves room and still
fails on any wrong term (a missing ReLU mask, a dropped mean or variance gradient, a wrong
residual gradient is >= 1e-2). bfloat16 inputs: both are compared with a float32 reference on
the same (bf16-valued) inputs; bf16 outputs carry a rounding of 2^-9 relative per element, so
1e-2 of the norm; the statistics are float32 on both sides and must agree to 1e-5.
"""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from cmil_jax import config_base, parallel, runtime, train
from cmil_jax.models import resnet
from cmil_jax.runtime import fused_batchnorm as fbn

IMPLS = ["jnp", "pallas"]
# (relu, residual): a plain BatchNorm, BatchNorm + ReLU, the end of a residual block.
KINDS = [(False, False), (True, False), (True, True)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 16 channels and 32 rows, reductions over 64 rows (two row-loop steps)."""
    monkeypatch.setattr(fbn, "CHANNEL_BLOCK", 16)
    monkeypatch.setattr(fbn, "ROW_BLOCK", 32)
    monkeypatch.setattr(fbn, "REDUCE_ROWS", 64)


def _inputs(seed, shape=(2, 8, 8, 32), dtype=jnp.float32):
    """Fresh random inputs: activations with a non-zero mean, scale, bias, residual, and the
    output cotangent."""
    k = jax.random.split(jax.random.key(seed), 5)
    c = shape[-1]
    x = (jax.random.normal(k[0], shape) * 2.0 + 0.7).astype(dtype)
    residual = jax.random.normal(k[1], shape).astype(dtype)
    scale = jax.random.normal(k[2], (c,)) * 0.5 + 1.0
    bias = jax.random.normal(k[3], (c,)) * 0.3
    dy = jax.random.normal(k[4], shape)
    return x, scale, bias, residual, dy


def _flax(x, scale, bias, residual, relu, dtype):
    """flax.linen.BatchNorm (the model's momentum and eps) then the block's add and ReLU ->
    (y, updated batch_stats)."""
    bn = nn.BatchNorm(use_running_average=False, momentum=resnet.BN_MOMENTUM,
                      epsilon=resnet.BN_EPS, dtype=dtype)
    c = x.shape[-1]
    y, upd = bn.apply({"params": {"scale": scale, "bias": bias},
                       "batch_stats": {"mean": jnp.zeros(c), "var": jnp.ones(c)}},
                      x, mutable=["batch_stats"])
    if residual is not None:
        y = residual + y
    return (nn.relu(y) if relu else y), upd["batch_stats"]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a))
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _outputs_and_grads(fn, x, scale, bias, residual, dy):
    """fn(x, scale, bias, residual) -> (y, ...) ; -> (y, rest, grads of sum(y * dy))."""
    def loss(*args):
        out = fn(*args)
        return jnp.sum(out[0].astype(jnp.float32) * dy), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        x, scale, bias, residual)
    return out, grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("relu,with_residual", KINDS)
def test_float32_outputs_statistics_and_gradients_equal_flax(impl, relu, with_residual):
    x, scale, bias, residual, dy = _inputs(seed=hash((impl, relu, with_residual)) % 1000)
    residual = residual if with_residual else jnp.zeros_like(x)

    def fused(x, scale, bias, r):
        return fbn.batch_norm_train(x, scale, bias, r if with_residual else None, relu=relu,
                                    eps=resnet.BN_EPS, impl=impl)

    def reference(x, scale, bias, r):
        y, stats = _flax(x, scale, bias, r if with_residual else None, relu, jnp.float32)
        return y, stats

    (y, mean, var), grads = _outputs_and_grads(fused, x, scale, bias, residual, dy)
    (y0, stats0), grads0 = _outputs_and_grads(reference, x, scale, bias, residual, dy)
    assert _rel(y, y0) < 2e-5
    # flax's running averages after one step from (0, 1): 0.1 * batch value (+ 0.9).
    np.testing.assert_allclose(0.1 * mean, stats0["mean"], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(0.9 + 0.1 * var, stats0["var"], rtol=2e-5)
    names = ["x", "scale", "bias"] + (["residual"] if with_residual else [])
    for name, g, g0 in zip(names, grads, grads0):
        assert _rel(g, g0) < 2e-5, name
    if relu:  # the ReLU masks something, so the mask is exercised
        assert 0.1 < float(jnp.mean(y == 0)) < 0.9


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs_with_float32_statistics(impl):
    x, scale, bias, residual, dy = _inputs(seed=7, dtype=jnp.bfloat16)

    def fused(x, scale, bias, r):
        return fbn.batch_norm_train(x, scale, bias, r, relu=True, impl=impl)

    def flax_bf16(x, scale, bias, r):
        return _flax(x, scale, bias, r, True, jnp.bfloat16)

    def reference(x, scale, bias, r):  # float32 on the same bf16-valued inputs
        return _flax(x.astype(jnp.float32), scale, bias, r.astype(jnp.float32), True,
                     jnp.float32)

    (y, mean, var), grads = _outputs_and_grads(fused, x, scale, bias, residual, dy)
    (y1, _), grads1 = _outputs_and_grads(flax_bf16, x, scale, bias, residual, dy)
    (y0, stats0), grads0 = _outputs_and_grads(reference, x, scale, bias, residual, dy)
    assert y.dtype == jnp.bfloat16 and grads[0].dtype == grads[3].dtype == jnp.bfloat16
    assert mean.dtype == var.dtype == jnp.float32
    np.testing.assert_allclose(0.1 * mean, stats0["mean"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(0.9 + 0.1 * var, stats0["var"], rtol=1e-5)
    assert _rel(y, y0) < 1e-2
    assert _rel(y, y0) <= 2 * _rel(y1, y0) + 1e-3  # no worse than flax's own bf16 path
    for name, g, g1, g0 in zip(["x", "scale", "bias", "residual"], grads, grads1, grads0):
        assert _rel(g, g0) < 1e-2, name
        assert _rel(g, g0) <= 2 * _rel(g1, g0) + 1e-3, name


def test_pallas_blocks_cover_rows_channels_and_the_row_loop():
    """The shapes above tile into several blocks each way; an untileable shape falls back to
    the jax.numpy passes and gives the same result."""
    t = fbn.tiling(2 * 8 * 8, 32)
    assert t == fbn.Tiling(rows=32, channels=16, reduce_steps=2)
    assert fbn.tiling(3 * 5 * 5, 32) is None and fbn.tiling(128, 12) is None
    x, scale, bias, residual, _ = _inputs(seed=3, shape=(3, 5, 5, 12))
    a = fbn.batch_norm_train(x, scale, bias, residual, relu=True, impl="pallas")
    b = fbn.batch_norm_train(x, scale, bias, residual, relu=True, impl="jnp")
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("impl", IMPLS)
def test_module_variables_running_averages_and_eval_equal_flax(impl):
    """FusedBatchNorm has flax's variables (names, shapes, initial values), updates the
    running averages as flax does over several steps, and evaluates as flax does."""
    xs = [_inputs(seed=s)[0] for s in range(3)]
    ours = fbn.FusedBatchNorm(use_running_average=False, impl=impl, dtype=jnp.float32)
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                           dtype=jnp.float32)
    v = ours.init(jax.random.key(0), xs[0])
    v0 = flax_bn.init(jax.random.key(0), xs[0])
    assert jax.tree.structure(v) == jax.tree.structure(v0)
    assert jax.tree.all(jax.tree.map(np.array_equal, v, v0))
    params = {"scale": _inputs(5)[1], "bias": _inputs(5)[2]}
    stats, stats0 = v["batch_stats"], v0["batch_stats"]
    for x in xs:
        _, upd = ours.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        _, upd0 = flax_bn.apply({"params": params, "batch_stats": stats0}, x,
                                mutable=["batch_stats"])
        stats, stats0 = upd["batch_stats"], upd0["batch_stats"]
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    y = ours.clone(use_running_average=True).apply({"params": params, "batch_stats": stats}, xs[0])
    y0 = flax_bn.clone(use_running_average=True).apply({"params": params, "batch_stats": stats},
                                                        xs[0])
    np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)


def test_resnet_with_fused_layers_has_flax_variables():
    """The same variables (names, shapes, dtypes) as flax's layers, in a ResNet-50 (the initial
    values: test_module_...; whole-network outputs: test_100_training_steps_track_flax)."""
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    nets = {name: resnet.resnet50(width=8, layers=layers) for name, layers in (
        ("flax", resnet.FLAX_LAYERS), ("jnp", fbn.layers(resnet.FLAX_LAYERS, "jnp")))}
    v = {k: jax.eval_shape(lambda x, n=n: n.init(jax.random.key(0), x, train=True), x)
         for k, n in nets.items()}
    assert jax.tree.structure(v["jnp"]) == jax.tree.structure(v["flax"])
    assert jax.tree.leaves(v["jnp"]) == jax.tree.leaves(v["flax"])
    assert len(jax.tree.leaves(v["jnp"]["batch_stats"])) == 2 * 53
    assert nets["jnp"].layers.name == "xla+bn_jnp"


def test_runtime_field_selects_the_fused_layers():
    cfg = config_base.base_config()
    cfg.runtime.kernels = "xla"
    assert runtime.resolve(cfg).layers.name == "xla"
    cfg.runtime.batchnorm = "pallas"
    assert runtime.resolve(cfg).describe()["kernels"] == "xla+bn_pallas"
    cfg.runtime.batchnorm = "fused"
    with pytest.raises(config_base.ConfigError, match="runtime.batchnorm"):
        runtime.resolve(cfg)


def _tiny_cmil(batchnorm: str, steps: int):
    """train.setup of a tiny CMIL (ResNet-10 at width 8, 64 px, float32) with the given
    runtime.batchnorm and a `steps`-step schedule."""
    cfg = config_base.base_config()
    cfg.model.update(backbone="resnet10", backbone_width=8, width=48, dtype="float32")
    cfg.data.image_size = 64
    cfg.train.lr = 1e-3  # larger than the recipe's, so that 100 steps move the weights
    cfg.runtime.update(kernels="xla", batchnorm=batchnorm)
    return train.setup(cfg, steps)


def test_100_training_steps_track_flax():
    """Flax BatchNorm and the Pallas kernels (interpret mode) over 100 AdamW steps from the
    same initial state on the same random batches (batch 4): the losses agree to 1e-3 relative
    at every step (rounding differences only; the gradient norms too, to 1e-2, as the
    loss is flat in some directions). The 'jnp' variant computes the same passes (the tests
    above)."""
    from benchmarks import throughput  # pylint: disable=import-outside-toplevel

    steps = 100
    runs = {bn: _tiny_cmil(bn, steps) for bn in ("flax", "pallas")}
    state = runs["flax"].init_state()
    states = {bn: jax.tree.map(jnp.copy, state) for bn in runs}  # the steps donate them
    losses = {bn: [] for bn in runs}
    norms = {bn: [] for bn in runs}
    for i in range(steps):
        host = throughput.host_batch(4, 64, seed=i)
        for bn, run in runs.items():
            states[bn], metrics = run.train_step(
                states[bn], parallel.to_global(host, run.batch_sharding))
            losses[bn].append(float(metrics["loss"]))
            norms[bn].append(float(metrics["grad_norm"]))
    reference = np.array(losses["flax"])
    assert reference[-10:].mean() < 0.9 * reference[:10].mean()  # it trains
    # The first step (the initial weights): the whole network's outputs and gradients agree
    # to rounding.
    assert losses["pallas"][0] == pytest.approx(reference[0], rel=1e-5)
    assert norms["pallas"][0] == pytest.approx(norms["flax"][0], rel=1e-5)
    np.testing.assert_allclose(losses["pallas"], reference, rtol=1e-3)
    np.testing.assert_allclose(norms["pallas"], norms["flax"], rtol=1e-2)
