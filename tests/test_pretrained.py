"""cmil_jax.pretrained without the internet: named weights from a hub cache laid out as
huggingface_hub lays it out, downloads from a hub served on 127.0.0.1 by the test (checksum
checked, a corrupt download removed), the failures (offline and absent, wrong checksum, weights
of another backbone), and the paper config starting from pretrained ResNet-50 weights through
`python -m cmil_jax.main` on a data directory built by data_prep.seq_deepfake.

The weights files are random tensors with the key names and shapes of the real ones; the
expected Flax values are written out here from the PyTorch layout (conv (out, in, kh, kw) ->
(kh, kw, in, out), running_var -> batch_stats var), not taken from the converter.
"""

import csv
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
from safetensors.numpy import save as safetensors_bytes

from cmil_jax import config_base, convert, labels, pretrained
from cmil_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _weights_file(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A state dict in torchvision's layout with random values, classifier included."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in convert.template(arch).items():
        value = rng.standard_normal(shape, dtype=np.float32) * 0.05
        flat[path] = np.abs(value) + 0.5 if path[-1] == "var" else value
    state = convert.to_torch_state_dict(convert.unflatten(flat), arch)
    state["fc.weight"] = rng.standard_normal((1000, 512 if arch != "resnet50" else 2048),
                                             dtype=np.float32)
    state["fc.bias"] = np.zeros(1000, np.float32)
    return state


@pytest.fixture(scope="module")
def r18():
    """(state dict, safetensors bytes, sha256) of a ResNet-18-shaped weights file."""
    state = _weights_file("resnet18")
    data = safetensors_bytes(state)
    return state, data, hashlib.sha256(data).hexdigest()


def _hub_cache(hub_dir, repo: str, filename: str, data: bytes, blob: bool = True) -> str:
    """huggingface_hub's cache layout: models--ORG--NAME/{blobs/<sha256>, refs/main,
    snapshots/<commit>/<filename> -> ../../blobs/<sha256>} (a plain file when not `blob`)."""
    folder = os.path.join(str(hub_dir), "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(folder, "snapshots", COMMIT)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(COMMIT)
    target = os.path.join(snapshot, filename)
    if blob:
        sha = hashlib.sha256(data).hexdigest()
        os.makedirs(os.path.join(folder, "blobs"), exist_ok=True)
        with open(os.path.join(folder, "blobs", sha), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", sha), target)
    else:
        with open(target, "wb") as f:
            f.write(data)
    return target


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache for this test (the library reads it at call time)."""
    from huggingface_hub import constants

    path = tmp_path / "hf" / "hub"
    path.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    return path


def _cfg(tmp_path, backbone="resnet18", init_from="imagenet", image_size=64):
    cfg = config_base.base_config()
    cfg.model.backbone = backbone
    cfg.data.image_size = image_size
    cfg.train.init_from = init_from
    cfg.train.weights_cache = str(tmp_path / "cache")
    return cfg


def _assert_converted_from(directory, state):
    """The converted variables hold the file's tensors in the Flax layout."""
    variables = convert.load_backbone_variables(directory)
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(params["conv1"]["kernel"],
                                  state["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["bn1"]["scale"], state["bn1.weight"])
    np.testing.assert_array_equal(stats["bn1"]["var"], state["bn1.running_var"])
    np.testing.assert_array_equal(params["layer2_0"]["downsample_conv"]["kernel"],
                                  state["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(stats["layer4_1"]["bn2"]["mean"],
                                  state["layer4.1.bn2.running_mean"])
    leaves = len(convert.flatten(variables))
    assert leaves == len(state) - 2  # every tensor but the classifier


# ----------------------------------------------------------------------------- names


def test_names_resolve_to_the_backbone_and_bad_values_are_named(tmp_path):
    assert pretrained.named_weights(_cfg(tmp_path)) == "resnet18.tv_in1k"
    assert pretrained.named_weights(_cfg(tmp_path, "resnet50")) == "resnet50.tv_in1k"
    assert pretrained.named_weights(_cfg(tmp_path, "resnet50", "resnet50.a1_in1k")) == (
        "resnet50.a1_in1k")
    assert pretrained.named_weights(_cfg(tmp_path, init_from="none")) is None
    assert pretrained.resolve(_cfg(tmp_path, init_from="none")) is None
    cases = [
        (_cfg(tmp_path, "resnet10"), "no ImageNet weights for model.backbone='resnet10'"),
        (_cfg(tmp_path, init_from="resnet50.tv_in1k"), "weights for resnet50, but "
                                                       "model.backbone='resnet18'"),
        (_cfg(tmp_path, init_from="resnet18"), "not a known name"),
        (_cfg(tmp_path, init_from=""), "'none' for a random initialisation"),
    ]
    thin = _cfg(tmp_path)
    thin.model.backbone_width = 32
    cases.append((thin, "fits model.backbone_width=64, the model has 32"))
    for cfg, expected in cases:
        with pytest.raises(config_base.ConfigError, match="train.init_from") as info:
            config_base.check_values(cfg)  # before anything starts
        assert expected in str(info.value)
    with pytest.raises(pretrained.WeightsError, match="does not exist"):
        pretrained.resolve(_cfg(tmp_path, init_from=str(tmp_path / "nowhere.safetensors")))


def test_older_recorded_configs_read_as_random_init(tmp_path):
    cfg = config_base.seq_config("facial_attributes", "demo")
    old = cfg.to_dict()
    old["train"]["init_from"] = ""  # random initialisation, before 'none' existed
    for field in ("init_sha256", "weights_cache"):
        del old["train"][field]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**old, "resolved_weights": {"spec": "none"}}))
    loaded = config_base.load_recorded(str(path))
    assert loaded.train.init_from == "none"
    assert config_base.config_changes(loaded, cfg) == {}


def test_random_init_is_logged_and_recorded(tmp_path, capsys):
    from cmil_jax import runtime, train

    cfg = _cfg(tmp_path, "resnet10", init_from="none")
    resolved, record = train.resolve_weights(cfg, str(tmp_path))
    assert resolved is None and record == {"spec": "none", "random_init": True}
    assert "backbone resnet10: random initialisation (train.init_from='none')" in (
        capsys.readouterr().out)
    train.write_config(cfg, str(tmp_path), runtime.resolve(cfg, log=False), record)
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["resolved_weights"] == record and recorded["train"]["init_from"] == "none"
    import jax

    expected = "float32" if jax.default_backend() == "cpu" else "bfloat16"  # model.dtype 'auto'
    assert recorded["resolved_runtime"]["dtype"] == expected


# ----------------------------------------------------------------------------- hub cache


def test_offline_weights_come_from_the_hub_cache_checked_and_converted_once(
        tmp_path, hub_cache, r18, monkeypatch):
    state, data, sha = r18
    _hub_cache(hub_cache, "timm/resnet18.tv_in1k", "model.safetensors", data)
    cfg = _cfg(tmp_path)
    resolved = pretrained.resolve(cfg, offline=True)
    assert (resolved.name, resolved.arch, resolved.sha256) == ("resnet18.tv_in1k", "resnet18", sha)
    assert resolved.checked == "hub cache"  # the blob's name is its sha256
    assert resolved.directory == str(tmp_path / "cache" / f"resnet18-{sha[:16]}")
    _assert_converted_from(resolved.directory, state)
    assert os.listdir(tmp_path / "cache") == [f"resnet18-{sha[:16]}"]  # no temporary left

    # A second run converts nothing: the cached variables are used as they are.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "convert_state_dict", no_conversion)
    assert pretrained.resolve(cfg, offline=True).directory == resolved.directory


def test_pin_and_unchecked_copies(tmp_path, hub_cache, r18):
    """A snapshot file that is not a hub blob (copied in by hand) has no sha256 to check
    against but train.init_sha256; a wrong pin stops before anything is cached."""
    _, data, sha = r18
    _hub_cache(hub_cache, "timm/resnet18.tv_in1k", "model.safetensors", data, blob=False)
    cfg = _cfg(tmp_path)
    assert pretrained.resolve(cfg, offline=True).checked == "unchecked"
    cfg = _cfg(tmp_path / "pinned")
    cfg.train.init_sha256 = sha
    assert pretrained.resolve(cfg, offline=True).checked == "train.init_sha256"
    cfg = _cfg(tmp_path / "wrong")
    cfg.train.init_sha256 = "0" * 64
    with pytest.raises(pretrained.WeightsError, match=f"has sha256 {sha}"):
        pretrained.resolve(cfg, offline=True)
    assert not (tmp_path / "wrong" / "cache").exists()


def test_local_files_of_each_format(tmp_path, r18):
    state, data, sha = r18
    (tmp_path / "w.safetensors").write_bytes(data)
    np.savez(tmp_path / "w.npz", **state)
    for name in ("w.safetensors", "w.npz"):
        cfg = _cfg(tmp_path / name.split(".")[1], init_from=str(tmp_path / name))
        resolved = pretrained.resolve(cfg)
        assert resolved.source == str(tmp_path / name)
        _assert_converted_from(resolved.directory, state)
    assert pretrained.resolve(_cfg(tmp_path / "safetensors", init_from=str(
        tmp_path / "w.safetensors"))).sha256 == sha
    # A converted directory is used as it is; one made for another backbone is refused.
    directory = pretrained.resolve(_cfg(tmp_path / "npz", init_from=str(
        tmp_path / "w.npz"))).directory
    assert pretrained.resolve(_cfg(tmp_path, init_from=directory)).directory == directory
    with pytest.raises(pretrained.WeightsError, match="converted for resnet18"):
        pretrained.resolve(_cfg(tmp_path, "resnet34", init_from=directory))
    # A file that is not weights is named, and nothing is cached.
    (tmp_path / "bad.safetensors").write_bytes(b"not weights at all")
    with pytest.raises(pretrained.WeightsError, match="bad.safetensors"):
        pretrained.resolve(_cfg(tmp_path / "bad", init_from=str(tmp_path / "bad.safetensors")))
    cache = tmp_path / "bad" / "cache"
    assert not cache.exists() or not os.listdir(cache)


def test_convert_cli_reads_safetensors(tmp_path, r18, capsys):
    state, data, _ = r18
    (tmp_path / "model.safetensors").write_bytes(data)
    out = tmp_path / "out"
    assert convert.main(["--arch", "resnet18", "--weights", str(tmp_path / "model.safetensors"),
                         "--out", str(out)]) == 0
    assert "resnet18" in capsys.readouterr().out
    _assert_converted_from(str(out), state)


def test_swin_tables_resample_as_pytorch_does():
    """convert.resize_bias_table (numpy) against PyTorch's bicubic interpolate, which timm
    uses for the same resampling."""
    torch = pytest.importorskip("torch")
    table = np.random.default_rng(0).standard_normal((13 * 13, 3)).astype(np.float32)
    for window in (8, 12, 4):
        side = 2 * window - 1
        grid = torch.from_numpy(np.ascontiguousarray(table.T.reshape(1, 3, 13, 13)))
        expected = torch.nn.functional.interpolate(grid, size=(side, side), mode="bicubic",
                                                   align_corners=False)
        np.testing.assert_allclose(convert.resize_bias_table(table, window),
                                   expected.reshape(3, side * side).T.numpy(), atol=2e-5)


# ----------------------------------------------------------------------------- a hub on 127.0.0.1


class _Hub(http.server.BaseHTTPRequestHandler):
    """The hub's resolve endpoint: /<repo>/resolve/<revision>/<file> with the headers
    huggingface_hub reads (X-Repo-Commit, X-Linked-Etag = the LFS sha256, sizes)."""

    def do_HEAD(self):  # noqa: N802
        self._respond(send_body=False)

    def do_GET(self):  # noqa: N802
        self._respond(send_body=True)

    def _respond(self, send_body):
        self.server.requests.append((self.command, self.path))
        entry = self.server.files.get(self.path)
        if entry is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body, sha = entry
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("ETag", f'"{sha}"')
        self.send_header("X-Linked-Size", str(len(body)))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    server.files, server.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_from_the_hub_is_checked_and_cached(tmp_path, hub_cache, hub_server, r18,
                                                     monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server, endpoint = hub_server
    state, data, sha = r18
    server.files["/timm/resnet18.tv_in1k/resolve/main/model.safetensors"] = (data, sha)
    resolved = pretrained.resolve(_cfg(tmp_path), endpoint=endpoint, offline=False)
    assert (resolved.sha256, resolved.checked) == (sha, "hub")
    assert ("GET", "/timm/resnet18.tv_in1k/resolve/main/model.safetensors") in server.requests
    blob = hub_cache / "models--timm--resnet18.tv_in1k" / "blobs" / sha
    assert blob.read_bytes() == data  # in the hub's own cache
    _assert_converted_from(resolved.directory, state)


def test_a_corrupt_download_stops_and_leaves_no_cache(tmp_path, hub_cache, hub_server, r18,
                                                     monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server, endpoint = hub_server
    _, data, sha = r18
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size: only the checksum can tell
    server.files["/timm/resnet18.tv_in1k/resolve/main/model.safetensors"] = (bytes(corrupt), sha)
    with pytest.raises(pretrained.WeightsError) as info:
        pretrained.resolve(_cfg(tmp_path), endpoint=endpoint, offline=False)
    message = str(info.value)
    assert f"the hub's is {sha}" in message and "removed from the hub cache" in message
    assert "python -m cmil_jax.convert --arch resnet18" in message
    folder = hub_cache / "models--timm--resnet18.tv_in1k"
    assert not list((folder / "blobs").iterdir())
    assert not list((folder / "snapshots" / COMMIT).iterdir())
    assert not (tmp_path / "cache").exists()
    # The next run downloads it again.
    server.files["/timm/resnet18.tv_in1k/resolve/main/model.safetensors"] = (data, sha)
    assert pretrained.resolve(_cfg(tmp_path), endpoint=endpoint, offline=False).sha256 == sha


def test_unreachable_hub_and_empty_cache_names_the_way_out(tmp_path, hub_cache, hub_server):
    server, endpoint = hub_server
    server.shutdown()
    server.server_close()  # nothing listens there now
    with pytest.raises(pretrained.WeightsError) as info:
        pretrained.resolve(_cfg(tmp_path), endpoint=endpoint, offline=False)
    message = str(info.value)
    assert "cannot be reached" in message
    for expected in ("resnet18.tv_in1k", "hf download timm/resnet18.tv_in1k model.safetensors",
                     str(hub_cache), "--config.train.init_from=none",
                     "python -m cmil_jax.convert --arch resnet18 --weights"):
        assert expected in message, expected


# ----------------------------------------------------------------------------- the command line


def _write_seq_fixture(raw, sizes, image_size=64):
    """RAW/facial_components/{annotations/<split>.csv, images/<split>/<sequence>/*.jpg}: the
    official Seq-DeepFake layout."""
    subset, index = "facial_components", 0
    for split, n in sizes.items():
        rows = []
        for _ in range(n):
            ex = synthetic.generate_example(subset, index, image_size=image_size)
            index += 1
            rel = (f"{subset}/images/{split}/{labels.sequence_name(ex['label'], subset)}/"
                   f"{index:06d}.jpg")
            os.makedirs(os.path.dirname(raw / rel), exist_ok=True)
            cv2.imwrite(str(raw / rel), cv2.cvtColor(ex["image"], cv2.COLOR_RGB2BGR))
            rows.append((rel, "[" + ", ".join(str(int(v)) for v in ex["label"]) + "]"))
        os.makedirs(raw / subset / "annotations", exist_ok=True)
        with open(raw / subset / "annotations" / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("file_path", "label"), *rows])


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory):
    from data_prep import seq_deepfake

    raw = tmp_path_factory.mktemp("seq_raw")
    out = tmp_path_factory.mktemp("seq_tfds")
    _write_seq_fixture(raw, {"train": 24, "val": 6, "test": 6})
    assert seq_deepfake.main(["--raw-dir", str(raw), "--data-dir", str(out), "--image-size",
                              "64", "--num-workers", "0"]) == 0
    return out


def _main(workdir, data_dir, env_extra, *overrides, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **env_extra)
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "cmil_jax.main", "--config", "configs/seqcomp.py",
         "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *overrides],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.time() - start


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE", "unreachable hub"])
def test_paper_config_without_weights_exits_2_within_10_s(tmp_path, seq_data, network):
    env = {"HF_HOME": str(tmp_path / "hf")}
    if network == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # a port nothing listens on: no route to any hub
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["HF_ENDPOINT"] = f"http://127.0.0.1:{s.getsockname()[1]}"
    result, seconds = _main(tmp_path / "w", seq_data, env,
                            f"--config.train.weights_cache={tmp_path / 'cache'}", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert seconds < 10, seconds
    for expected in ("resnet50.tv_in1k", "model.safetensors", "timm/resnet50.tv_in1k",
                     str(tmp_path / "hf" / "hub"),
                     "python -m cmil_jax.convert --arch resnet50 --weights"):
        assert expected in result.stderr, expected
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_paper_config_trains_from_pretrained_resnet50(tmp_path, seq_data):
    """The acceptance run: configs/seqcomp.py as shipped (ResNet-50, init_from imagenet, dtype
    auto) on the built fixture, offline, the weights in the hub cache; tiny sizes only."""
    state = _weights_file("resnet50", seed=1)
    data = safetensors_bytes(state)
    sha = hashlib.sha256(data).hexdigest()
    _hub_cache(tmp_path / "hf" / "hub", "timm/resnet50.tv_in1k", "model.safetensors", data)
    workdir = tmp_path / "run"
    result, _ = _main(
        workdir, seq_data, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
        f"--config.train.weights_cache={tmp_path / 'cache'}", "--config.data.image_size=64",
        "--config.data.num_workers=0", "--config.model.width=48", "--config.train.batch_size=2",
        "--config.train.num_steps=1", "--config.train.log_every=1", "--config.train.eval_every=1",
        "--config.train.checkpoint_every=1", "--config.eval.batch_size=6",
        "--config.eval.select_metrics=fixed_acc", "--config.train.tensorboard=False")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "compute dtype float32 (model.dtype 'auto')" in log
    assert "backbone resnet50: weights resnet50.tv_in1k" in log

    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["model"]["dtype"] == "auto" and recorded["resolved_runtime"]["dtype"] == (
        "float32")
    weights = recorded["resolved_weights"]
    assert (weights["name"], weights["sha256"], weights["checked"], weights["random_init"]) == (
        "resnet50.tv_in1k", sha, "hub cache", False)

    # The trained conv1 is the file's, moved by one AdamW step (backbone lr 1e-5) at most.
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / "1" / "state"))
    kernel = np.asarray(restored["params"]["backbone"]["conv1"]["kernel"])
    expected = state["conv1.weight"].transpose(2, 3, 1, 0)
    assert np.abs(kernel - expected).max() < 1e-4
    assert np.abs(expected).mean() > 1e-2  # the bound above is tight against the values
