"""Reference outputs of the CMIL model as of commit 24814b0, before ResNet received its layers
as a set: variables, eval and train outputs with conv_impl 'xla' (and 'matmul', 'onednn').

Run once with that commit on PYTHONPATH: python make_cmil_outputs.py cmil_outputs_24814b0.npz
"""
import sys
import numpy as np, jax, jax.numpy as jnp
from flax import traverse_util
from cmil_jax.models import CMIL

out = {}
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
out["images"] = images
for tag, kw in {"r10": dict(backbone="resnet10"), "r50": dict(backbone="resnet50", dilate_last=True)}.items():
    model = CMIL(backbone_width=8, width=48, num_heads=6, embed_dim=16, conv_impl="xla", **kw)
    variables = model.init(jax.random.key(1), jnp.asarray(images), train=False)
    # perturb batch stats so eval mode is not the identity
    variables = jax.tree.map(lambda x: x, variables)
    flat = traverse_util.flatten_dict(variables, sep="/")
    flat = {k: np.asarray(v) + (np.float32(0.1) * rng.standard_normal(np.shape(v)).astype(np.float32) if k.startswith("batch_stats") and k.endswith("mean") else 0) for k, v in flat.items()}
    flat = {k: (np.abs(v) + 0.5 if k.startswith("batch_stats") and k.endswith("var") else v).astype(np.float32) for k, v in flat.items()}
    variables = traverse_util.unflatten_dict(flat, sep="/")
    ev = model.apply(variables, jnp.asarray(images), train=False)
    tr, new_vars = model.apply(variables, jnp.asarray(images), train=True, mutable=["batch_stats"])
    for k, v in flat.items():
        out[f"{tag}/var/{k}"] = v
    for k in ("class_logits", "patch_class_logits", "patch_logits", "mil_emb", "feature_map"):
        out[f"{tag}/eval/{k}"] = np.asarray(ev[k])
        out[f"{tag}/train/{k}"] = np.asarray(tr[k])
    for k, v in traverse_util.flatten_dict(new_vars, sep="/").items():
        out[f"{tag}/train_stats/{k}"] = np.asarray(v)
    for impl in ("matmul", "onednn"):
        m = model.clone(conv_impl=impl)
        ev = m.apply(variables, jnp.asarray(images), train=False)
        tr, new_vars = m.apply(variables, jnp.asarray(images), train=True, mutable=["batch_stats"])
        for k in ("class_logits", "mil_emb", "feature_map"):
            out[f"{tag}/{impl}/eval/{k}"] = np.asarray(ev[k])
            out[f"{tag}/{impl}/train/{k}"] = np.asarray(tr[k])
np.savez_compressed(sys.argv[1], **out)
print(len(out), sum(v.nbytes for v in out.values()))
