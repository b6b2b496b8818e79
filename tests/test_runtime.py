"""Runtime choices (cmil_jax.runtime): the ResNet layer sets compute the same model, 'auto'
picks by backend and dtype only, and a missing oneDNN build falls back cleanly."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax import lax

from cmil_jax import config_base
from cmil_jax import runtime
from cmil_jax.models import CMIL, build_backbone, resnet
from cmil_jax.runtime import matmul
from cmil_jax.runtime import onednn

ONEDNN_OK, ONEDNN_WHY = onednn.available()
needs_onednn = pytest.mark.skipif(not ONEDNN_OK, reason=f"oneDNN calls unavailable: {ONEDNN_WHY}")
LAYER_SETS = ["xla", "matmul", pytest.param("onednn", marks=needs_onednn)]
REFERENCE = os.path.join(os.path.dirname(__file__), "data", "cmil_outputs_24814b0.npz")
REFERENCE_MODELS = {"r10": dict(backbone="resnet10"),
                    "r50": dict(backbone="resnet50", dilate_last=True)}


def _key(seed=0):
    return jax.random.key(seed, impl="rbg")


def _config(**runtime_fields):
    cfg = config_base.base_config()
    cfg.runtime.update(runtime_fields)
    return cfg


@pytest.mark.parametrize("layers", LAYER_SETS)
@pytest.mark.parametrize("tag", sorted(REFERENCE_MODELS))
def test_outputs_equal_those_recorded_before_the_layer_sets(layers, tag):
    """The model computes what it computed before ResNet received its layers as a set: the
    outputs (eval and train mode) and updated BatchNorm statistics recorded with commit
    24814b0 (tests/data/make_cmil_outputs.py) for the same variables. 'xla' was then
    conv_impl 'xla'; 'matmul' and 'onednn' are compared with their own former outputs."""
    ref = np.load(REFERENCE)
    images = jnp.asarray(ref["images"])
    model = CMIL(backbone_width=8, width=48, num_heads=6, embed_dim=16,
                 layers=runtime.layer_set(layers), **REFERENCE_MODELS[tag])
    flat = {k[len(f"{tag}/var/"):]: ref[k] for k in ref.files if k.startswith(f"{tag}/var/")}
    variables = traverse_util.unflatten_dict(flat, sep="/")
    shapes = jax.eval_shape(lambda: model.init(_key(1), images, train=False))
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(np.shape, variables)

    outputs = {"eval": model.apply(variables, images, train=False)}
    outputs["train"], stats = model.apply(variables, images, train=True, mutable=["batch_stats"])
    prefix = tag if layers == "xla" else f"{tag}/{layers}"
    for mode, out in outputs.items():
        for key in ("class_logits", "mil_emb", "feature_map"):
            want = ref[f"{prefix}/{mode}/{key}"]
            scale = float(np.abs(want).max())
            # Recorded on an AMD EPYC (Zen 4); XLA:CPU and oneDNN sum in another order on other
            # CPUs: on an Intel Xeon the outputs moved by up to 5.6e-5 of the largest (ResNet-50,
            # train mode, whose BatchNorm over 2 images amplifies rounding). A changed layer
            # moves them by a sizeable fraction of it.
            np.testing.assert_allclose(out[key], want, rtol=1e-5, atol=1e-4 * scale,
                                       err_msg=f"{mode} {key}")
            # ... and every layer set computes what 'xla' computes, within float32 rounding.
            np.testing.assert_allclose(out[key], ref[f"{tag}/{mode}/{key}"], rtol=1e-3,
                                       atol=2e-4 * scale, err_msg=f"{mode} {key} vs xla")
    for k, v in traverse_util.flatten_dict(stats, sep="/").items():
        np.testing.assert_allclose(v, ref[f"{tag}/train_stats/{k}"], rtol=1e-4, atol=1e-4)


# (kernel, stride, dilation, in, out, size): 1x1 and strided 1x1 (the matrix-product path),
# 3x3 plain / strided / dilated, 7x7 strided (stem: 3 and 1 input channels), odd sizes.
CONV_CASES = [
    (1, 1, 1, 8, 12, 6),
    (1, 2, 1, 8, 12, 7),
    (3, 1, 1, 6, 5, 6),
    (3, 2, 1, 6, 5, 7),
    (3, 1, 2, 6, 5, 9),
    (7, 2, 1, 3, 4, 11),
    (7, 2, 1, 1, 4, 10),
]
CONVS = {"matmul": matmul.conv_general_dilated, "onednn": onednn.conv_general_dilated}


@pytest.mark.parametrize("impl", ["matmul", pytest.param("onednn", marks=needs_onednn)])
@pytest.mark.parametrize("kernel, stride, dilation, cin, cout, size", CONV_CASES)
def test_conv_equals_lax_conv(impl, kernel, stride, dilation, cin, cout, size):
    """Forward and both gradients equal lax.conv_general_dilated's, called as flax's Conv
    calls it."""
    rng = np.random.default_rng(kernel * 100 + stride * 10 + dilation)
    x = jnp.asarray(rng.normal(size=(2, size, size, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)), jnp.float32)
    pad = dilation * (kernel - 1) // 2

    def run(conv):
        def loss(x, k):
            y = conv(x, k, (stride, stride), [(pad, pad), (pad, pad)], lhs_dilation=(1, 1),
                     rhs_dilation=(dilation, dilation), feature_group_count=1,
                     dimension_numbers=lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1),
                                                                (0, 3, 1, 2)))
            return jnp.sum(jnp.sin(y)), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, k)
        return y, grads

    y_ref, (gx_ref, gk_ref) = run(lax.conv_general_dilated)
    y, (gx, gk) = run(CONVS[impl])
    n = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    assert y.shape == y_ref.shape == (2, n, n, cout)
    tol = {"rtol": 1e-5, "atol": 1e-5 * kernel * kernel * cin}
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(gx, gx_ref, **tol)
    np.testing.assert_allclose(gk, gk_ref, **tol)


@pytest.mark.parametrize("shape", [(2, 12, 12, 3), (2, 11, 9, 4), (1, 5, 6, 2), (1, 2, 2, 1)])
def test_stem_max_pool_equals_flax_max_pool(shape):
    """max_pool_3x3_s2 and its closed-form gradient equal flax's reduce_window max pool and
    its select-and-scatter gradient, ties included (after a ReLU most windows tie at 0; a
    constant block ties everywhere)."""
    rng = np.random.default_rng(sum(shape))
    x = np.maximum(rng.normal(size=shape), 0).astype(np.float32)
    x[:, : shape[1] // 2, : shape[2] // 2] = 0.5  # a tied block
    x = jnp.asarray(x)

    def reference(x):
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    y_ref, vjp_ref = jax.vjp(reference, x)
    y, vjp = jax.vjp(jax.jit(matmul.max_pool_3x3_s2), x)
    assert y.shape == y_ref.shape == (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, shape[3])
    np.testing.assert_array_equal(y, y_ref)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layers", ["matmul", pytest.param("onednn", marks=needs_onednn)])
def test_layer_sets_train_like_flax(layers):
    """The same variables, loss, parameter gradients and updated BatchNorm statistics as
    flax's layers in train mode."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 40, 40, 3)), jnp.float32)
    grads, losses, stats, trees = {}, {}, {}, {}
    for name in ("xla", layers):
        net = build_backbone("resnet10", width=8, layers=runtime.layer_set(name))
        variables = net.init(_key(0), x, train=False)
        trees[name] = variables

        def loss(params):
            y, updates = net.apply({**variables, "params": params}, x, train=True,
                                   mutable=["batch_stats"])
            return jnp.mean(jnp.sin(y)), updates["batch_stats"]

        (losses[name], stats[name]), grads[name] = jax.jit(
            jax.value_and_grad(loss, has_aux=True))(variables["params"])
    assert jax.tree.all(jax.tree.map(np.array_equal, trees[layers], trees["xla"]))
    np.testing.assert_allclose(losses[layers], losses["xla"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads[layers]), jax.tree.leaves(grads["xla"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
    for a, b in zip(jax.tree.leaves(stats[layers]), jax.tree.leaves(stats["xla"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_resolve_auto_by_backend_and_dtype(monkeypatch):
    cfg = _config(kernels="auto")
    if jax.default_backend() != "cpu":
        assert runtime.resolve(cfg).layers.name == "xla"
        return
    want = "onednn" if ONEDNN_OK else "matmul"
    assert runtime.resolve(cfg).layers.name == want
    cfg.model.dtype = "bfloat16"  # oneDNN's calls here are float32 only
    resolved = runtime.resolve(cfg)
    assert resolved.layers.name == "matmul" and "bfloat16" in resolved.notes[0]
    cfg.model.dtype = "float32"
    monkeypatch.setattr(onednn, "available", lambda: (False, "no C++ compiler"))
    resolved = runtime.resolve(cfg)
    assert resolved.layers.name == "matmul"
    assert "no C++ compiler" in resolved.notes[0]
    assert resolved.describe()["notes"] == list(resolved.notes)
    with pytest.raises(config_base.ConfigError, match="runtime.kernels='onednn'.*compiler"):
        runtime.resolve(_config(kernels="onednn"))


@pytest.mark.parametrize("field, value", [("kernels", "matmul"), ("kernels", "onednn"),
                                          ("batchnorm", "jnp")])
def test_float64_takes_xla_layers_only(field, value):
    """model.dtype float64 (the equivalence-check mode, tests/test_device_drift.py runs it):
    float32-only layers are refused before JAX's x64 mode is switched on."""
    cfg = _config()
    cfg.model.dtype = "float64"
    cfg.runtime[field] = value
    with pytest.raises(config_base.ConfigError, match=f"model.dtype='float64'.*{value}"):
        runtime.resolve(cfg)
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("field, value", [("kernels", "im2col"), ("xla_cpu_conv", "onednn"),
                                          ("host_malloc", "always")])
def test_unknown_runtime_names_name_the_field(field, value):
    with pytest.raises(config_base.ConfigError, match=f"runtime.{field}='{value}'"):
        runtime.resolve(_config(**{field: value}))


def test_no_cpu_kernel_knowledge_in_the_models():
    """The model modules import nothing of the runtime package."""
    import cmil_jax.models as models_pkg

    folder = os.path.dirname(models_pkg.__file__)
    for name in os.listdir(folder):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                imports = [line for line in f if line.lstrip().startswith(("import ", "from "))]
            assert imports and not any("runtime" in line or "onednn" in line
                                       for line in imports), name


_DEVICE_COUNT_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + sys.argv[1]
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from cmil_jax import config_base, runtime
    from cmil_jax.models import CMIL
    layers = runtime.resolve(config_base.base_config()).layers
    model = CMIL(backbone="resnet10", backbone_width=8, width=48, embed_dim=16, layers=layers)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
    v = model.init(jax.random.key(0), x[:1], train=False)
    def loss(params, stats, x):
        out, new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"])
        return jnp.sum(out["class_logits"] ** 2) + jnp.sum(out["mil_emb"][..., 0]), new
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep = NamedSharding(mesh, P())
    (l, new), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        jax.device_put(v["params"], rep), jax.device_put(v["batch_stats"], rep),
        jax.device_put(x, NamedSharding(mesh, P("data"))))
    leaves = [np.asarray(a).ravel().tolist() for a in jax.tree.leaves((l, g, new))]
    print(json.dumps({"layers": layers.name, "devices": jax.device_count(), "leaves": leaves}))
""")


@pytest.mark.slow
def test_one_and_four_devices_use_the_same_layers_and_agree():
    """'auto' does not look at the device count: a 4-device run computes with the layers of a
    1-device run (custom calls run on the gathered batch) and gives the same loss, gradients
    and BatchNorm statistics within float32 reassociation."""
    import json

    runs = {}
    for n in (1, 4):
        out = subprocess.run([sys.executable, "-c", _DEVICE_COUNT_SCRIPT, str(n)],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 0, out.stderr[-3000:]
        runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs[4]["devices"] == 4 and runs[1]["layers"] == runs[4]["layers"]
    for a, b in zip(runs[1]["leaves"], runs[4]["leaves"]):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(a).max())))


@pytest.mark.slow
def test_without_a_cpp_compiler_auto_falls_back_and_trains(tmp_path):
    """No C++ compiler (and no cached build): 'auto' says why and uses 'matmul'; a train step
    runs."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from cmil_jax import config_base, runtime
        from cmil_jax.models import CMIL
        resolved = runtime.resolve(config_base.base_config())
        print(resolved.layers.name)
        print(resolved.notes[0] if resolved.notes else "")
        model = CMIL(backbone="resnet10", backbone_width=8, width=48, layers=resolved.layers)
        x = jnp.zeros((2, 64, 64, 3), jnp.uint8)
        v = model.init(jax.random.key(0), x, train=False)
        out, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
        print(bool(np.isfinite(np.asarray(out["class_logits"])).all()))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CXX": "no-such-compiler",
           "CMIL_JAX_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    name, note, finite = out.stdout.strip().splitlines()[-3:]
    assert name == "matmul" and finite == "True"
    assert "runtime.kernels 'auto' uses 'matmul'" in note and "C++ compiler" in note


def _ynn_convolutions(hlo_text: str) -> int:
    """Convolutions inside YNNPACK fusions of a compiled module's HLO text."""
    computations = {}
    for block in hlo_text.split("\n\n"):
        header = block.strip().split("\n", 1)[0]
        if header.startswith("%"):
            computations[header.split()[0][1:]] = block
    called = [line.split("calls=%", 1)[1].split(",", 1)[0]
              for line in hlo_text.splitlines()
              if "__ynn_fusion" in line and "calls=%" in line]
    return sum(computations.get(name, "").count(" convolution(") for name in called)


def test_xla_cpu_conv_eigen_same_gradients_without_ynnpack_convolutions():
    """runtime.xla_cpu_conv='eigen' only changes XLA:CPU's kernels: the convolutions leave
    the YNNPACK fusions and the loss and gradients stay those of the default."""
    eigen = runtime.resolve(_config(kernels="matmul", xla_cpu_conv="eigen")).compiler_options
    default = runtime.resolve(_config(kernels="matmul")).compiler_options
    if jax.default_backend() != "cpu":
        assert eigen is None and default is None
        return
    assert default is None and eigen == runtime.XLA_CPU_CONV["eigen"]

    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 48, 48, 3)), jnp.float32)
    # k x k convs of the matmul set stay lax convolutions
    net = build_backbone("resnet10", width=24, layers=matmul.MATMUL_LAYERS)
    variables = net.init(_key(0), x, train=False)

    def loss(params):
        y, _ = net.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.sin(y))

    results, ynn = {}, {}
    for name, opts in (("default", None), ("eigen", eigen)):
        fn = jax.jit(jax.value_and_grad(loss), compiler_options=opts)
        ynn[name] = _ynn_convolutions(fn.lower(variables["params"]).compile().as_text())
        results[name] = fn(variables["params"])
    assert ynn["eigen"] == 0
    if jax.__version_info__[:2] == (0, 10):  # jaxlib 0.10 gives f32 convolutions to YNNPACK
        assert ynn["default"] > 0
    np.testing.assert_allclose(results["eigen"][0], results["default"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results["eigen"][1]), jax.tree.leaves(results["default"][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
