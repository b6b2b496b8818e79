"""Backbone weights (PyTorch layout) -> Flax variables for ``train.init_from``.

    python -m cmil_jax.convert --arch resnet50 --weights model.safetensors --out weights/r50
    python -m cmil_jax.convert --arch swin_t --weights swin_tiny.pth --out weights/swin_t \
        [--window-size 8]            # resample the position-bias tables for 256 px inputs
    python -m cmil_jax.main ... --config.model.backbone=resnet50 \
        --config.train.init_from=weights/r50

Sources: torchvision's resnet18/34/50 state_dicts (timm's ResNet weights use the same keys); for
swin_t/s/b timm's (>= 0.9) state_dicts and the official release layout (``{'model':
state_dict}`` with each PatchMerging at the end of the previous stage, as timm < 0.9 had).
Files: ``.safetensors`` (read with safetensors.numpy: no PyTorch needed), ``.npz`` (one array
per key) or a PyTorch file (``.pth``, ``.pt``, ``.bin``: ``torch.load(weights_only=True)``, the
`torch` extra). A checkpoint wrapped in 'model' / 'state_dict' / 'module.' is unwrapped.
``--torch-checkpoint`` is another name for ``--weights``. Named ImageNet weights are fetched
and converted by ``cmil_jax.pretrained`` (``train.init_from=imagenet``).

Every tensor is accounted for: each Flax variable of ``build_backbone(arch)`` takes exactly one
tensor of the expected shape, and the only tensors left over may be the classifier (``fc.*``,
``head.*``) and derived buffers (``num_batches_tracked``, ``relative_position_index`` (checked
against ours), ``attn_mask``). Anything else fails with a ValueError naming the key.

Output directory: ``variables.msgpack`` (flax.serialization msgpack of numpy float32 arrays,
{'params': ..., 'batch_stats': ...}; no 'batch_stats' for Swin) and ``meta.json`` (arch,
source file, layout, window size, tensor count).

Python API:
  convert_checkpoint(path, arch, out_dir, layout='auto', window_size=0) -> variables
  read_state_dict(path) -> {key: numpy} of a .safetensors, .npz or PyTorch file
  convert_state_dict(state_dict, arch, layout='auto', window_size=0) -> variables
  to_torch_state_dict(variables, arch, layout=...) -> {key: numpy}   (the inverse map)
  torch_tensor(path, leaf) -> (torch key, numpy): that map for one variable, for models that
      embed a backbone (benchmarks/torch_twin.py maps its whole CMIL with it)
  load_backbone_variables(dir) -> variables for build_backbone(arch).apply(v, x, train=False)
  match_tree(current, loaded, source) -> loaded, after checking keys and shapes against current
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from typing import Any

import numpy as np

VARIABLES_FILE = "variables.msgpack"
META_FILE = "meta.json"
FORMAT = "cmil_jax.convert/1"

RESNETS = ("resnet18", "resnet34", "resnet50")
SWINS = ("swin_t", "swin_s", "swin_b")
ARCHS = RESNETS + SWINS
LAYOUTS = {"resnet": ("torchvision",), "swin": ("timm", "official")}

# Tensors that have no Flax counterpart and may be dropped.
_IGNORED = (
    re.compile(r"^fc\.(weight|bias)$"),  # torchvision classifier
    re.compile(r"^head(\.fc)?\.(weight|bias)$"),  # timm / official classifier
    re.compile(r"\.num_batches_tracked$"),
    re.compile(r"\.attn_mask$"),  # official Swin: derived from the window/shift sizes
    re.compile(r"\.relative_position_index$"),  # derived; checked against ours
)

Path = tuple[str, ...]


def _family(arch: str) -> str:
    if arch in RESNETS:
        return "resnet"
    if arch in SWINS:
        return "swin"
    raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")


# ----------------------------------------------------------------------------- trees


def flatten(tree, prefix: Path = ()) -> dict[Path, Any]:
    """Nested dicts -> {path tuple: leaf}, in sorted key order (as jax.tree does)."""
    if hasattr(tree, "items"):
        out = {}
        for key in sorted(tree):
            out.update(flatten(tree[key], prefix + (str(key),)))
        return out
    return {prefix: tree}


def unflatten(flat: dict[Path, Any]) -> dict:
    """{path tuple: leaf} -> nested dicts."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def _path_str(path: Path) -> str:
    return "/".join(path)


# ----------------------------------------------------------------------------- key maps


def _torch_key(path: Path, family: str, layout: str) -> tuple[str, str]:
    """Flax variable path (collection first) -> (torch key, kind); kind 'kernel' (transposed
    by rank: conv or dense) or 'copy'."""
    collection, *modules, leaf = path
    names = []
    for m in modules:
        if m == "downsample_conv":  # ResNet shortcut
            names.append("downsample.0")
        elif m == "downsample_bn":
            names.append("downsample.1")
        else:  # layer1_0 -> layer1.0, blocks_3 -> blocks.3
            names.append(re.sub(r"_(\d+)$", r".\1", m))
    if family == "swin" and layout == "official" and "downsample" in modules:
        # The official release merges at the end of the previous stage.
        stage = int(modules[0].split("_")[1])
        names[0] = f"layers.{stage - 1}"

    kind = "copy"
    if leaf == "kernel":
        leaf, kind = "weight", "kernel"
    elif leaf == "scale":
        leaf = "weight"
    elif collection == "batch_stats":
        leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
    return ".".join(names + [leaf]), kind


def _to_flax(tensor: np.ndarray, kind: str) -> np.ndarray:
    if kind == "kernel" and tensor.ndim == 4:  # (out, in, kh, kw) -> (kh, kw, in, out)
        return tensor.transpose(2, 3, 1, 0)
    if kind == "kernel" and tensor.ndim == 2:  # (out, in) -> (in, out)
        return tensor.T
    return tensor


def _to_torch(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if kind == "kernel" and array.ndim == 2:
        return array.T
    return array


def template(arch: str, window_size: int = 7) -> dict[Path, tuple]:
    """{Flax variable path: shape} of ``build_backbone(arch)`` (Swin: at window ``window_size``)."""
    return dict(_template(arch, window_size if _family(arch) == "swin" else 0))


@functools.cache
def _template(arch: str, window_size: int) -> tuple:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from cmil_jax.models import build_backbone  # pylint: disable=import-outside-toplevel

    size = 32 * window_size if window_size else 64
    module = build_backbone(arch)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
    return tuple((path, tuple(leaf.shape)) for path, leaf in flatten(shapes).items())


# ----------------------------------------------------------------------------- torch -> flax


def detect_layout(state: dict, arch: str) -> str:
    """'torchvision' for ResNets; 'official' or 'timm' for Swin (where the PatchMergings sit)."""
    if _family(arch) == "resnet":
        return "torchvision"
    return "official" if any(k.startswith("layers.0.downsample.") for k in state) else "timm"


def swin_window_size(state: dict) -> int:
    """Window size from the first relative position bias table: (2w - 1)^2 rows."""
    for key, value in state.items():
        if key.endswith("relative_position_bias_table"):
            side = int(round(np.sqrt(value.shape[0])))
            if side * side != value.shape[0] or side % 2 == 0:
                raise ValueError(f"{key}: {value.shape[0]} rows is not (2w - 1)^2 for a window w")
            return (side + 1) // 2
    raise ValueError("no relative_position_bias_table in the state_dict: not a Swin checkpoint")


def _bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
    """(size_out, size_in) weights of a 1-D bicubic resize as PyTorch's interpolate computes it
    (mode 'bicubic', align_corners=False: source x = (i + 0.5) * in / out - 0.5, cubic
    convolution with a = -0.75, neighbours clamped to the edge)."""
    x = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    x0 = np.floor(x)
    t = x - x0
    d = np.stack([t + 1, t, 1 - t, 2 - t])  # distances to the neighbours x0 - 1 .. x0 + 2
    near = ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    weights = np.where(d <= 1, near, far)
    matrix = np.zeros((size_out, size_in))
    for k in range(4):
        index = np.clip(x0.astype(int) - 1 + k, 0, size_in - 1)
        np.add.at(matrix, (np.arange(size_out), index), weights[k])
    return matrix


def resize_bias_table(table: np.ndarray, window_size: int) -> np.ndarray:
    """((2w - 1)^2, heads) -> ((2n - 1)^2, heads) for window n, bicubic on the (2w - 1)^2 grid
    (as timm's resize_rel_pos_bias_table_simple, which calls PyTorch's interpolate; numpy here)."""
    side = int(round(np.sqrt(table.shape[0])))
    new = 2 * window_size - 1
    if side == new:
        return table
    m = _bicubic_matrix(side, new)
    grid = table.T.reshape(-1, side, side).astype(np.float64)  # (heads, side, side)
    out = np.einsum("ij,hjk,lk->hil", m, grid, m)
    return out.reshape(-1, new * new).T.astype(table.dtype)


def convert_state_dict(state: dict, arch: str, layout: str = "auto", window_size: int = 0) -> dict:
    """torch state_dict (tensors or numpy) -> Flax variables (float32 numpy) of ``arch``.

    Swin: ``window_size`` 0 keeps the checkpoint's window; another value resamples the relative
    position bias tables to that window (e.g. 7 -> 8 for 256 px inputs).
    Raises ValueError naming any missing, mis-shaped or unmapped key.
    """
    family = _family(arch)
    state = {k: _numpy(v) for k, v in state.items()}
    if layout == "auto":
        layout = detect_layout(state, arch)
    if layout not in LAYOUTS[family]:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS[family]} for {arch}")

    source_window = swin_window_size(state) if family == "swin" else 0
    window = window_size or source_window
    shapes = template(arch, window)

    flat, used = {}, set()
    for path, shape in shapes.items():
        key, kind = _torch_key(path, family, layout)
        if key not in state:
            raise ValueError(
                f"{arch}: the checkpoint has no tensor {key!r} "
                f"(for {_path_str(path)}, shape {shape})"
            )
        value = state[key]
        if path[-1] == "relative_position_bias_table":
            value = resize_bias_table(value, window)
        value = _to_flax(value, kind)
        if value.shape != shape:
            raise ValueError(
                f"{arch}: tensor {key!r} has shape {tuple(state[key].shape)}, which maps to "
                f"{value.shape}; {_path_str(path)} needs {shape}"
            )
        flat[path] = np.ascontiguousarray(value, dtype=np.float32)
        used.add(key)

    unmapped = [k for k in state if k not in used and not any(p.search(k) for p in _IGNORED)]
    if unmapped:
        more = f" (and {len(unmapped) - 1} more)" if len(unmapped) > 1 else ""
        raise ValueError(
            f"{arch}: tensor {unmapped[0]!r} of shape {tuple(state[unmapped[0]].shape)} maps to no "
            f"variable{more}: wrong --arch or --layout? unmapped: {unmapped[:10]}"
        )
    if family == "swin" and window == source_window:
        _check_position_index(state, arch)
    return unflatten(flat)


def _check_position_index(state: dict, arch: str) -> None:
    """The checkpoint's relative_position_index buffers, where present, must equal ours."""
    from cmil_jax.models import swin  # pylint: disable=import-outside-toplevel

    for key, value in state.items():
        if key.endswith("relative_position_index"):
            side = int(round(np.sqrt(value.shape[0])))
            if value.shape != (side * side, side * side) or not np.array_equal(
                value, swin.relative_position_index(side, side)
            ):
                raise ValueError(f"{arch}: {key} differs from the index this implementation uses")


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _import_torch():
    """torch, or an ImportError that names the extra to install."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError("reading PyTorch checkpoints needs PyTorch: pip install -e '.[torch]' "
                          "(the CPU build)") from e
    return torch


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A weights file -> {key: numpy array}: ``.safetensors`` (safetensors.numpy), ``.npz`` or a
    PyTorch file (any other suffix: load_torch_state_dict). A 'module.' prefix is dropped.
    Raises ValueError naming the file when it cannot be read as one."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".safetensors", ".npz"):
        return load_torch_state_dict(path)
    from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    try:
        if suffix == ".safetensors":
            state = load_file(path)
        else:
            with np.load(path, allow_pickle=False) as data:
                state = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable {suffix} weights file ({e})") from e
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a .pth/.pt file with torch.load(weights_only=True) -> {key: numpy array}.

    Unwraps {'model': ...}, {'state_dict': ...} and {'model_ema': ...} and a 'module.' prefix.
    """
    torch = _import_torch()

    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}"
        )
    state = {}
    for key, value in obj.items():
        if not hasattr(value, "shape"):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key.removeprefix("module.")] = _numpy(value)
    return state


# ----------------------------------------------------------------------------- flax -> torch


def to_torch_state_dict(
    variables: dict, arch: str, layout: str | None = None
) -> dict[str, np.ndarray]:
    """Inverse of ``convert_state_dict``: Flax variables -> {torch key: numpy} (no classifier,
    no derived buffers). Default layout: 'torchvision' for ResNets, 'timm' for Swin."""
    family = _family(arch)
    layout = layout or LAYOUTS[family][0]
    return dict(torch_tensor(path, leaf, family, layout)
                for path, leaf in flatten(variables).items())


def torch_tensor(path: Path, leaf, family: str = "resnet",
                 layout: str = "torchvision") -> tuple[str, np.ndarray]:
    """One Flax variable -> (torch state_dict key, numpy array in PyTorch's layout).

    ``path``: the variable's path, collection first (``flatten`` of {'params': ...,
    'batch_stats': ...}): ('params', 'layer1_0', 'conv1', 'kernel') -> 'layer1.0.conv1.weight'
    with the kernel (kh, kw, in, out) -> (out, in, kh, kw); a Dense kernel (in, out) -> (out,
    in); 'scale' -> 'weight'; batch_stats 'mean' / 'var' -> 'running_mean' / 'running_var';
    'downsample_conv' / 'downsample_bn' -> 'downsample.0' / 'downsample.1'. Module names pass
    through otherwise (a backbone under 'backbone' maps to 'backbone.*').
    """
    key, kind = _torch_key(path, family, layout)
    return key, np.ascontiguousarray(_to_torch(np.asarray(leaf), kind))


# ----------------------------------------------------------------------------- files


def save_variables(variables: dict, out_dir: str, meta: dict) -> None:
    """Writes ``variables.msgpack`` and ``meta.json`` into ``out_dir`` (created)."""
    from flax import serialization  # pylint: disable=import-outside-toplevel

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, VARIABLES_FILE), "wb") as f:
        f.write(serialization.msgpack_serialize(variables))
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump({"format": FORMAT, **meta}, f, indent=2)
        f.write("\n")


def read_meta(directory: str) -> dict:
    """meta.json of a converted directory ({} when absent)."""
    path = os.path.join(os.path.expanduser(directory), META_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_backbone_variables(directory: str) -> dict:
    """Converted directory -> {'params': ..., 'batch_stats': ...} of numpy float32 arrays
    ('batch_stats' only for BatchNorm nets), for ``build_backbone(arch).apply(v, x, train=False)``.
    ``directory`` may also name the msgpack file itself."""
    from flax import serialization  # pylint: disable=import-outside-toplevel

    directory = os.path.expanduser(directory)
    path = os.path.join(directory, VARIABLES_FILE) if os.path.isdir(directory) else directory
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: no converted backbone weights; make them with "
            "`python -m cmil_jax.convert --arch ARCH --torch-checkpoint FILE --out DIR`"
        )
    with open(path, "rb") as f:
        variables = serialization.msgpack_restore(f.read())
    if "params" not in variables:
        raise ValueError(f"{path}: expected top-level 'params', found {sorted(variables)}")
    return variables


def match_tree(current, loaded, source: str = ""):
    """Returns ``loaded`` after checking that its keys and leaf shapes equal those of ``current``.

    Raises ValueError naming the first mismatching key path (in sorted path order) with both
    shapes. Leaves come back as arrays of the current leaf's dtype (jax arrays placed like the
    current ones where those are jax arrays).
    """
    import jax  # pylint: disable=import-outside-toplevel

    cur, new = flatten(current), flatten(loaded)
    for path in sorted(set(cur) | set(new)):
        cur_shape = tuple(cur[path].shape) if path in cur else None
        new_shape = tuple(np.shape(new[path])) if path in new else None
        if cur_shape != new_shape:
            arch = (
                read_meta(source).get("arch")
                if source and os.path.isdir(os.path.expanduser(source))
                else None
            )
            made_for = f" (converted for {arch})" if arch else ""
            have = (
                "the model has no such variable"
                if cur_shape is None
                else f"the model expects {cur_shape}"
            )
            got = "the weights lack it" if new_shape is None else f"the weights have {new_shape}"
            raise ValueError(
                f"backbone weights {source}{made_for} do not fit the model at "
                f"{_path_str(path)!r}: {have}, {got}"
            )
    out = {}
    for path, leaf in new.items():
        ref = cur[path]
        value = np.asarray(leaf, dtype=ref.dtype)
        if isinstance(ref, jax.Array):
            value = jax.device_put(value, ref.sharding)
        out[path] = value
    return unflatten(out)


def convert_checkpoint(
    checkpoint: str, arch: str, out_dir: str, layout: str = "auto", window_size: int = 0
) -> dict:
    """Reads ``checkpoint`` (read_state_dict), converts it for ``arch``, writes ``out_dir``;
    returns the variables."""
    state = read_state_dict(checkpoint)
    layout = detect_layout(state, arch) if layout == "auto" else layout
    variables = convert_state_dict(state, arch, layout, window_size)
    meta = {
        "arch": arch,
        "source": os.path.abspath(checkpoint),
        "layout": layout,
        "num_tensors": len(flatten(variables)),
        "ignored": sorted(k for k in state if any(p.search(k) for p in _IGNORED)),
    }
    if _family(arch) == "swin":
        meta["window_size"] = window_size or swin_window_size(state)
        meta["source_window_size"] = swin_window_size(state)
    save_variables(variables, out_dir, meta)
    return variables


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cmil_jax.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--weights", "--torch-checkpoint", dest="weights", required=True,
                        help="state_dict file: .safetensors, .npz or PyTorch (.pth / .pt / .bin)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--layout", default="auto", choices=("auto", "torchvision", "timm", "official")
    )
    parser.add_argument(
        "--window-size",
        type=int,
        default=0,
        help="Swin: resample the relative position bias tables to this window (0: keep)",
    )
    args = parser.parse_args(argv)
    try:
        variables = convert_checkpoint(
            args.weights, args.arch, args.out, args.layout, args.window_size
        )
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = read_meta(args.out)
    count = sum(np.size(v) for v in flatten(variables).values())
    print(
        f"{args.arch}: {meta['num_tensors']} tensors ({count:,} values, layout {meta['layout']}) "
        f"-> {os.path.join(args.out, VARIABLES_FILE)}; dropped {len(meta['ignored'])} "
        f"(classifier / derived buffers)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
