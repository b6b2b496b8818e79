"""Backbone weights for ``train.init_from``: ImageNet weights by name, fetched once, checked,
converted and cached; a local file or converted directory; or an explicit random start.

train.init_from:
  'none'        random initialisation (explicit; logged and recorded in config.json).
  'imagenet'    the ImageNet weights of model.backbone: IMAGENET[backbone] below.
  a name        one of WEIGHTS, e.g. 'resnet50.tv_in1k' (torchvision's original ResNet-50),
                'resnet50.a1_in1k', 'swin_tiny_patch4_window7_224.ms_in1k'.
  a path        a directory written by ``python -m cmil_jax.convert`` (used as it is), or a
                weights file for model.backbone: .safetensors, .npz, or a PyTorch .pth / .pt /
                .bin (convert.read_state_dict), converted and cached like a named file.

Named weights live on the Hugging Face Hub (timm's repositories, safetensors: no PyTorch
needed) and are fetched with huggingface_hub into its own cache (HF_HOME, HF_HUB_CACHE;
HF_HUB_OFFLINE=1 never connects). The file's sha256 must equal the hub's (the etag of an LFS
file, or the name of its blob in the hub cache) and train.init_sha256 when that is set; a
corrupt download is removed from the hub cache. The converted variables are cached in
``train.weights_cache/<arch>-<sha256[:16]>[-w<window>]/`` (convert's variables.msgpack and
meta.json), written beside it and renamed into place, so an interrupted or failed run leaves
nothing half-written there. Swin weights are resampled to the window of data.image_size
(image_size // 32).

Every failure (unknown name, weights for another backbone, offline and not cached, checksum
mismatch, unreadable file) raises WeightsError, a ConfigError (exit 2), that names the weights,
the file and what to do: where to put the file and the manual conversion command.

  check(cfg)    the static checks (no files, network or JAX), for config_base.validate
  resolve(cfg)  -> Resolved (the converted directory and where it came from) or None for 'none'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid

from cmil_jax import config_base
from cmil_jax import disk

NONE = "none"
IMAGENET_ALIAS = "imagenet"
HUB_URL = "https://huggingface.co"
METADATA_TIMEOUT_S = 5.0  # the hub's file metadata; past it the run looks in the local cache
FILE_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt", ".bin")
PYTORCH_WIDTH = 64  # pretrained weights exist only for the standard width (model.backbone_width)


class WeightsError(config_base.ConfigError):
    """Backbone weights that cannot be used; the message names them and what to do."""


@dataclasses.dataclass(frozen=True)
class HubWeights:
    """A weights file on the Hugging Face Hub for one backbone of cmil_jax.models."""

    repo: str
    filename: str
    arch: str
    about: str

    def url(self) -> str:
        return f"{HUB_URL}/{self.repo}/resolve/main/{self.filename}"


def _timm(name: str, arch: str, about: str) -> tuple[str, HubWeights]:
    return name, HubWeights(f"timm/{name}", "model.safetensors", arch, about)


WEIGHTS: dict[str, HubWeights] = dict([
    _timm("resnet18.tv_in1k", "resnet18", "torchvision's ImageNet-1k ResNet-18"),
    _timm("resnet34.tv_in1k", "resnet34", "torchvision's ImageNet-1k ResNet-34"),
    _timm("resnet50.tv_in1k", "resnet50", "torchvision's original ImageNet-1k ResNet-50"),
    _timm("resnet50.tv2_in1k", "resnet50", "torchvision's second ImageNet-1k ResNet-50 recipe"),
    _timm("resnet50.a1_in1k", "resnet50", "timm's ImageNet-1k ResNet-50 (ResNet strikes back A1)"),
    _timm("swin_tiny_patch4_window7_224.ms_in1k", "swin_t", "Microsoft's ImageNet-1k Swin-T"),
    _timm("swin_small_patch4_window7_224.ms_in1k", "swin_s", "Microsoft's ImageNet-1k Swin-S"),
    _timm("swin_small_patch4_window7_224.ms_in22k_ft_in1k", "swin_s",
          "Microsoft's Swin-S, ImageNet-22k fine-tuned on 1k"),
    _timm("swin_base_patch4_window7_224.ms_in1k", "swin_b", "Microsoft's ImageNet-1k Swin-B"),
    _timm("swin_base_patch4_window7_224.ms_in22k_ft_in1k", "swin_b",
          "Microsoft's Swin-B, ImageNet-22k fine-tuned on 1k"),
])

# train.init_from='imagenet': the ImageNet-1k weights of each backbone that has them.
IMAGENET: dict[str, str] = {
    "resnet18": "resnet18.tv_in1k",
    "resnet34": "resnet34.tv_in1k",
    "resnet50": "resnet50.tv_in1k",
    "swin_t": "swin_tiny_patch4_window7_224.ms_in1k",
    "swin_s": "swin_small_patch4_window7_224.ms_in1k",
    "swin_b": "swin_base_patch4_window7_224.ms_in1k",
}


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where a run's backbone weights come from.

    spec: train.init_from as given; name: the registry name or the path; source: the file
    read (or the converted directory given); sha256: of that file ('' for a directory);
    checked: what the sha256 was checked against; directory: the converted variables.
    """

    spec: str
    name: str
    arch: str
    source: str
    sha256: str
    checked: str
    directory: str

    def describe(self) -> dict:
        """For the log and config.json ('resolved_weights')."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- names


def _spec(cfg) -> str:
    return str(cfg.train.init_from).strip()


def _is_path(spec: str) -> bool:
    return (os.sep in spec or spec.startswith(("~", ".")) or spec.lower().endswith(FILE_SUFFIXES)
            or os.path.exists(spec))


def _field(cfg) -> str:
    return f"config field train.init_from={_spec(cfg)!r}"


def named_weights(cfg) -> str | None:
    """The WEIGHTS name train.init_from stands for ('imagenet' resolved), None for 'none' or a
    path. Raises WeightsError when it names nothing or weights of another backbone."""
    spec, backbone = _spec(cfg), cfg.model.backbone
    if spec == NONE:
        return None
    if spec == "":
        raise WeightsError(f"{_field(cfg)}: name the backbone's starting weights: "
                           f"'{IMAGENET_ALIAS}', a name of cmil_jax.pretrained.WEIGHTS, a "
                           f"converted directory or a weights file, or '{NONE}' for a random "
                           "initialisation")
    if spec == IMAGENET_ALIAS:
        if backbone not in IMAGENET:
            raise WeightsError(
                f"{_field(cfg)}: there are no ImageNet weights for model.backbone="
                f"{backbone!r} (there are for {', '.join(IMAGENET)}); set "
                f"--config.train.init_from={NONE} to start from random weights")
        spec = IMAGENET[backbone]
    if spec in WEIGHTS:
        if WEIGHTS[spec].arch != backbone:
            raise WeightsError(
                f"{_field(cfg)}: {spec} are weights for {WEIGHTS[spec].arch}, but model.backbone="
                f"{backbone!r}; use --config.train.init_from={IMAGENET_ALIAS} (the ImageNet "
                f"weights of the backbone), a name for {backbone} or {NONE}")
        _check_width(cfg, spec)
        return spec
    if _is_path(spec):
        return None
    raise WeightsError(f"{_field(cfg)}: not a known name ({', '.join(sorted(WEIGHTS))}), "
                       f"'{IMAGENET_ALIAS}', '{NONE}', nor an existing file or directory")


def _check_width(cfg, what: str) -> None:
    if cfg.model.backbone_width != PYTORCH_WIDTH:
        raise WeightsError(
            f"{_field(cfg)}: {what} fits model.backbone_width={PYTORCH_WIDTH}, the model has "
            f"{cfg.model.backbone_width}; set --config.train.init_from={NONE} for this width")


def check(cfg) -> None:
    """The checks that need neither the files, the network nor JAX (config_base.validate):
    train.init_from is 'none', a path, or names weights of model.backbone. Raises
    WeightsError."""
    named_weights(cfg)


def _local_path(cfg) -> str:
    path = os.path.abspath(os.path.expanduser(_spec(cfg)))
    if not os.path.exists(path):
        raise WeightsError(f"{_field(cfg)}: {path} does not exist (expected a directory written "
                           "by `python -m cmil_jax.convert`, or a weights file: "
                           f"{', '.join(FILE_SUFFIXES)})")
    if os.path.isfile(path):
        _check_width(cfg, path)
    return path


# ----------------------------------------------------------------------------- hub


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_sha256(text) -> bool:
    return isinstance(text, str) and re.fullmatch(r"[0-9a-f]{64}", text) is not None


def _field_of(spec: str, name: str) -> str:
    return f"config field train.init_from={spec!r}" + (f" ({name})" if spec != name else "")


def _missing_message(name: str, entry: HubWeights, why: str, hub_cache: str) -> str:
    folder = "models--" + entry.repo.replace("/", "--")
    local = f"/path/to/{entry.filename}"
    return (
        f"the {name} weights ({entry.about}) are needed: "
        f"{entry.filename} of the Hugging Face Hub repository {entry.repo} is not in the hub "
        f"cache here ({hub_cache}) and cannot be downloaded ({why}). Either\n"
        f"  - on a machine with internet run `hf download {entry.repo} {entry.filename}` and copy "
        f"its cache folder ~/.cache/huggingface/hub/{folder} to {hub_cache}/{folder} (or point "
        "HF_HOME at a copy of that machine's cache), then run this again;\n"
        f"  - or download {entry.url()} and pass the file: "
        f"--config.train.init_from={local}, or convert it once with `python -m "
        f"cmil_jax.convert --arch {entry.arch} --weights {local} --out DIR` and pass "
        "--config.train.init_from=DIR;\n"
        f"  - or start from random weights: --config.train.init_from={NONE}.")


def fetch(name: str, endpoint: str | None = None, offline: bool | None = None,
          spec: str = "") -> tuple[str, str, str]:
    """The local path of the WEIGHTS file `name`, downloaded into the hub cache if needed, its
    sha256 and what that was checked against ('hub', 'hub cache' or 'unchecked').

    `endpoint`: the hub's address (default: HF_ENDPOINT or huggingface.co); `offline`: never
    connect (default: HF_HUB_OFFLINE). When the hub cannot be reached within
    METADATA_TIMEOUT_S the hub cache is used. Raises WeightsError, its message starting with
    train.init_from=`spec` (default: `name`).
    """
    # pylint: disable=import-outside-toplevel
    import huggingface_hub as hub
    from huggingface_hub import constants, errors

    entry = WEIGHTS[name]
    field = _field_of(spec or name, name)
    hub_cache = constants.HF_HUB_CACHE
    offline = constants.is_offline_mode() if offline is None else offline
    why, expected = "HF_HUB_OFFLINE is set", None
    if not offline:
        url = hub.hf_hub_url(entry.repo, entry.filename, endpoint=endpoint)
        try:
            meta = hub.get_hf_file_metadata(url, timeout=METADATA_TIMEOUT_S, endpoint=endpoint)
            expected = meta.etag if _is_sha256(meta.etag) else None
        except (errors.RepositoryNotFoundError, errors.RemoteEntryNotFoundError) as e:
            raise WeightsError(f"{field}: the hub has no {entry.filename} in {entry.repo} "
                               f"({url}): {e}") from e
        except Exception as e:  # pylint: disable=broad-except  (no route, DNS, proxy, timeout)
            offline = True
            why = f"the hub at {url} cannot be reached: {(str(e).splitlines() or [''])[0][:200]}"
    try:
        path = hub.hf_hub_download(entry.repo, entry.filename, endpoint=endpoint,
                                   local_files_only=offline, etag_timeout=METADATA_TIMEOUT_S)
    except errors.LocalEntryNotFoundError as e:
        raise WeightsError(f"{field}: {_missing_message(name, entry, why, hub_cache)}") from e
    except (errors.HfHubHTTPError, OSError) as e:
        if disk.is_disk_full(e):
            raise  # exit 4, as any full disk
        raise WeightsError(f"{field}: downloading {entry.url()} failed ({e}); run again, or: "
                           f"{_missing_message(name, entry, 'download failed', hub_cache)}") from e

    # The hub names an LFS file's blob after its sha256 (the etag when online).
    blob = os.path.realpath(path)
    checked = "hub" if expected else "hub cache"
    expected = expected or (os.path.basename(blob) if _is_sha256(os.path.basename(blob)) else None)
    actual = _sha256(path)
    if expected is None:
        return path, actual, "unchecked"
    if actual != expected:
        for corrupt in {path, blob}:  # the next run downloads it again
            if os.path.lexists(corrupt):
                os.remove(corrupt)
        raise WeightsError(
            f"{field}: the weights file {path} has sha256 {actual}, the hub's is {expected}: the "
            "file is corrupt and was removed from the hub cache; run again to download it again, "
            "or: " + _missing_message(name, entry, "checksum mismatch", hub_cache))
    return path, actual, checked


# ----------------------------------------------------------------------------- conversion


def _window(cfg, arch: str) -> int:
    """The Swin window of data.image_size (models/swin.py: the side of the last map), else 0."""
    return cfg.data.image_size // 32 if arch.startswith("swin") else 0


def convert_cached(path: str, arch: str, sha256: str, cache_root: str, window: int = 0,
                   source_name: str = "") -> str:
    """The directory of `path` converted for `arch` (convert.convert_state_dict; Swin at
    `window`), made once under `cache_root` and reused. Written into a temporary directory
    beside it and renamed into place: a failure leaves nothing behind."""
    from cmil_jax import convert  # pylint: disable=import-outside-toplevel

    root = os.path.expanduser(cache_root)
    final = os.path.join(root, f"{arch}-{sha256[:16]}" + (f"-w{window}" if window else ""))
    if os.path.isfile(os.path.join(final, convert.VARIABLES_FILE)):
        return final
    try:
        state = convert.read_state_dict(path)
        variables = convert.convert_state_dict(state, arch, window_size=window)
    except (ValueError, ImportError) as e:
        raise WeightsError(f"config field train.init_from: {path} cannot be converted for "
                           f"{arch}: {e}") from e
    meta = {"arch": arch, "source": os.path.abspath(path), "source_name": source_name,
            "sha256": sha256, "layout": convert.detect_layout(state, arch),
            "num_tensors": len(convert.flatten(variables))}
    if window:
        meta["window_size"] = window
    with disk.writing(final, "nothing was left in the weights cache"):
        os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".{os.path.basename(final)}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with disk.writing(tmp, "nothing was left in the weights cache"):
            convert.save_variables(variables, tmp, meta)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.isfile(os.path.join(final, convert.VARIABLES_FILE)):
                    raise  # not another process's finished copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(cfg, endpoint: str | None = None, offline: bool | None = None) -> Resolved | None:
    """The backbone weights of `cfg` (train.init_from), fetched and converted where needed;
    None for 'none'. Raises WeightsError (a ConfigError: exit 2) naming what is wrong."""
    check(cfg)
    spec, arch = _spec(cfg), cfg.model.backbone
    if spec == NONE:
        return None
    pin = str(cfg.train.get("init_sha256", "") or "").strip().lower()
    name = named_weights(cfg)
    if name is not None:
        path, sha, checked = fetch(name, endpoint=endpoint, offline=offline, spec=spec)
    else:
        path = _local_path(cfg)
        if os.path.isdir(path):
            return Resolved(spec, path, _dir_arch(path, arch), path, "", "converted directory",
                            path)
        sha, checked = _sha256(path), "unchecked"
    if pin:
        if sha != pin:
            raise WeightsError(f"config field train.init_sha256={pin!r}: {path} (for "
                               f"train.init_from={spec!r}) has sha256 {sha}; nothing was "
                               "converted or cached")
        checked = f"{checked}, train.init_sha256" if checked != "unchecked" else "train.init_sha256"
    directory = convert_cached(path, arch, sha, cfg.train.weights_cache, _window(cfg, arch),
                               name or path)
    return Resolved(spec, name or path, arch, path, sha, checked, directory)


def _dir_arch(path: str, arch: str) -> str:
    """The arch a converted directory was made for (its meta.json), checked against `arch`."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        return arch  # shapes are still checked when the weights are loaded
    with open(meta_path, encoding="utf-8") as f:
        made_for = json.load(f).get("arch", arch)
    if made_for != arch:
        raise WeightsError(f"config field train.init_from={path!r}: converted for {made_for}, "
                           f"but model.backbone={arch!r}")
    return made_for


def describe(resolved: Resolved | None, cfg) -> str:
    """One log line saying where the backbone starts from."""
    if resolved is None:
        return (f"backbone {cfg.model.backbone}: random initialisation "
                f"(train.init_from={NONE!r})")
    sha = f", sha256 {resolved.sha256[:16]}... ({resolved.checked})" if resolved.sha256 else ""
    source = f" from {resolved.source}" if resolved.source != resolved.name else ""
    return (f"backbone {resolved.arch}: weights {resolved.name}{source}{sha}, converted in "
            f"{resolved.directory}")
