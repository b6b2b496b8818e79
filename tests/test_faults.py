"""Fault-handling helpers in-process: bad records (with fuzzing), non-finite monitor, metrics
window, preemption flag, atomic checkpoints, config and workdir checks, data sharding."""

import json
import os
import pickle
import signal

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmil_jax import checkpoint, config_base, faults, reporting, train
from cmil_jax.data import pipeline, sources
from cmil_jax.data.sources import DataError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None)


def _example(size=16, label=(2, 1, 0, 0, 0)):
    rng = np.random.default_rng(size)
    return {
        "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "mask": np.zeros((size, size), np.uint8),
        "label": np.asarray(label, np.int32),
        "landmarks": np.zeros((68, 2), np.float32),
        "is_fake": np.int32(any(label)),
    }


class ListSource:
    """Random-access source over a list; entries that are exceptions are raised."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __repr__(self):
        return "ListSource"

    def __getitem__(self, i):
        item = self.items[i]
        if isinstance(item, Exception):
            raise item
        return item

    def labels(self):
        return np.stack([np.zeros(5, np.int32) if isinstance(x, Exception) else x["label"]
                         for x in self.items])


# ----------------------------------------------------------------------------- bad records


@pytest.mark.parametrize("change, field", [
    ({"image": np.zeros((16, 16, 3), np.float32)}, "image must be a uint8"),
    ({"image": np.zeros((16, 16), np.uint8)}, "image shape (16, 16)"),
    ({"image": np.zeros((4, 4, 3), np.uint8)}, "image shape (4, 4, 3)"),
    ({"label": np.zeros(4, np.int32)}, "label shape (4,)"),
    ({"label": np.zeros(5, np.float32)}, "label dtype float32"),
    ({"label": np.array([9, 0, 0, 0, 0])}, "outside 0..5"),
    ({"label": np.array([0, 2, 0, 0, 0])}, "(padding) before a class"),
    ({"mask": np.zeros((8, 8), np.uint8)}, "mask uint8 (8, 8)"),
    ({"landmarks": np.full((68, 2), np.nan, np.float32)}, "landmarks must be finite"),
])
def test_check_example_names_record_and_field(change, field):
    assert faults.check_example(_example(), "rec 0") is not None
    with pytest.raises(DataError, match="^rec 7: ") as info:
        faults.check_example({**_example(), **change}, "rec 7")
    assert field in str(info.value)


def test_skip_bad_records_substitutes_logs_and_counts(tmp_path):
    good = [_example(16 + i) for i in range(6)]
    items = list(good)
    items[1] = DataError("record 1: image bytes are not a decodable PNG/JPEG")
    items[2] = {**good[2], "label": np.array([7, 0, 0, 0, 0])}
    log = str(tmp_path / "bad_records.jsonl")
    src = faults.SkipBadRecords(ListSource(items), log)
    assert len(src) == 6 and src.labels().shape == (6, 5)  # attributes of the wrapped source
    np.testing.assert_array_equal(src[1]["image"], good[3]["image"])  # 1, 2 bad -> 3
    np.testing.assert_array_equal(src[5]["image"], good[5]["image"])
    src[2]  # pylint: disable=pointless-statement
    assert faults.count_bad_records(str(tmp_path)) == 2  # distinct records, read twice
    with open(log) as f:
        errors = [json.loads(line)["error"] for line in f]
    assert "image bytes" in errors[0] and "outside 0..5" in errors[1]

    src = pickle.loads(pickle.dumps(src))  # grain worker processes get a copy
    with pytest.raises(DataError, match="record 1"):
        faults.SkipBadRecords(ListSource(items), log, strict=True)[1]
    with pytest.raises(DataError, match="are all bad"):
        faults.SkipBadRecords(ListSource([DataError("x")] * 3), log)[0]


def test_training_pipeline_skips_bad_records(tmp_path):
    items = [_example(16) for _ in range(8)]
    items[3] = DataError("record 3: cannot read the record")
    src = faults.SkipBadRecords(ListSource(items), str(tmp_path / "bad_records.jsonl"))
    ds = pipeline.make_train_dataset(src, batch_size=4, seed=0, image_size=16)
    batches = [b for _, b in zip(range(4), iter(ds))]  # two epochs
    assert all(b["image"].shape == (4, 16, 16, 3) for b in batches)
    assert faults.count_bad_records(str(tmp_path)) == 1


def _png(array):
    return sources.encode_png(array)


SMALL_PNG = _png(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))
SMALL_JPEG = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 256, (9, 14, 3),
                                                                    dtype=np.uint8))[1].tobytes()


def _damaged(data: bytes):
    """Strategy: `data` truncated, with flipped bytes, or both."""
    return st.tuples(st.integers(0, len(data)), st.lists(
        st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=4)).map(
        lambda t: bytes(_flip(bytearray(data), t[1])[:t[0]]))


def _flip(buf, changes):
    for i, value in changes:
        buf[i] = value
    return buf


IMAGE_BYTES = st.one_of(
    st.binary(max_size=300),
    _damaged(SMALL_PNG),
    _damaged(SMALL_JPEG),
    st.sampled_from([SMALL_PNG, SMALL_JPEG, SMALL_PNG[:8], SMALL_JPEG[:2],
                     _png(np.zeros((5, 5), np.uint8)),  # grey
                     _png(np.zeros((5, 5, 4), np.uint8)),  # 4 channels
                     cv2.imencode(".png", np.zeros((6, 6, 3), np.uint16))[1].tobytes()]),
)


@FUZZ
@given(IMAGE_BYTES)
def test_fuzz_decode_image_returns_rgb_uint8_or_none(data):
    image = sources.decode_image(data)
    if image is not None:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_decode_image_of_empty_bytes_returns_none():
    assert sources.decode_image(b"") is None


class OneRecord(sources.RecordSource):
    """RecordSource over one in-memory raw record (no TFDS files)."""

    def __init__(self, record):  # pylint: disable=super-init-not-called
        self.name, self.split, self.version_dir = "fuzz", "train", ""
        self._ds, self._len, self._labels = [record], 1, None


ARRAYS = st.one_of(
    st.sampled_from([np.int32, np.int64, np.uint8, np.float32, np.bool_]).flatmap(
        lambda dtype: st.sampled_from([(5,), (4,), (5, 1), (), (68, 2), (3, 68, 2)]).flatmap(
            lambda shape: st.lists(st.integers(-3, 9), min_size=int(np.prod(shape)),
                                   max_size=int(np.prod(shape))).map(
                lambda v: np.asarray(v).astype(dtype).reshape(shape)))),
    st.just(np.full((68, 2), np.nan, np.float32)),
    st.just("not an array"),
)
RECORDS = st.fixed_dictionaries(
    {"image": st.one_of(st.just(b""), IMAGE_BYTES)},
    optional={
        "label": ARRAYS,
        "landmarks": ARRAYS,
        "mask": st.one_of(st.just(b""), IMAGE_BYTES, st.just(_png(np.zeros((12, 10), np.uint8)))),
        "path": st.sampled_from([b"a/b.png", "c.jpg", b"\xff\xfe"]),
        "is_fake": st.integers(0, 1),
    },
)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@FUZZ
@given(RECORDS)
def test_fuzz_record_parser_gives_contract_example_or_named_error(record):
    source = faults.SkipBadRecords(OneRecord(record), "unused", strict=True)
    try:
        ex = source[0]
    except DataError as e:
        assert "record 0" in str(e), str(e)
        return
    assert faults.check_example(ex, "again") is ex
    assert ex["image"].dtype == np.uint8 and ex["mask"].shape == ex["image"].shape[:2]


# ----------------------------------------------------------------------------- training loop


def test_nonfinite_monitor_counts_streaks_across_windows():
    monitor = faults.NonFiniteMonitor(max_in_a_row=3)
    assert not monitor.update(5, [False, True, True, False, True])
    assert not monitor.update(10, [False, False, False, True, True])  # steps 9, 10
    assert monitor.streak == 2
    assert monitor.update(15, [True, True, False, False, False])  # 9-12, then finite again
    message = monitor.message(12)
    assert "NaN/Inf in 4 steps in a row (steps 9-12" in message, message
    assert "the newest checkpoint (step 12) holds the last good state" in message
    never = faults.NonFiniteMonitor(max_in_a_row=0)
    assert not never.update(5, [True] * 5) and never.streak == 5


def test_train_window_means_skip_nonfinite_and_survive_json():
    window = reporting.TrainWindow()
    for loss, bad in ((1.0, 0.0), (np.nan, 1.0), (2.0, 0.0)):
        window.append({"loss": jnp.float32(loss), "nonfinite": jnp.float32(bad)}, 8)
    restored = reporting.TrainWindow(json.loads(json.dumps(window.to_json())))
    means, flags = restored.summary()
    assert means.pop("images_per_sec") == 0.0  # images are not carried over
    assert means == {"loss": 1.5, "nonfinite": 1} and flags == [False, True, False]
    assert restored.steps == []
    window = reporting.TrainWindow([{"loss": np.nan, "nonfinite": 1.0}])
    assert np.isnan(window.summary()[0]["loss"])


def test_metric_writer_drops_records_of_rerun_steps(tmp_path):
    writer = reporting.MetricWriter(str(tmp_path))
    for step in (5, 10, 15):
        writer.write(step, "train", {"loss": 1.0})
    assert writer.drop_after(10) == 1
    with open(writer.path) as f:
        assert [json.loads(line)["step"] for line in f] == [5, 10]
    assert writer.drop_after(10) == 0


def test_preemption_watcher_flags_sigterm_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with faults.PreemptionWatcher() as watcher:
        assert not watcher.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) is before


def test_checkpoint_left_half_written_by_a_kill_is_ignored(tmp_path):
    state = {"w": jnp.arange(4.0), "step": jnp.int32(3)}
    manager = checkpoint.make_manager(str(tmp_path), keep=2)
    checkpoint.save(manager, 3, state, {"data": {"next_index": 3}}, wait=True)
    checkpoint.save(manager, 3, state, {"data": {}}, wait=True)  # existing step: no-op
    manager.close()
    # What a SIGKILL during the save of step 6 leaves: orbax's temporary directory.
    partial = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 100)
    manager = checkpoint.make_manager(str(tmp_path), keep=2)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    step, restored, loop = checkpoint.restore_latest(manager, abstract)
    manager.close()
    assert step == 3 and loop == {"data": {"next_index": 3}}
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    assert not partial.exists()  # cleaned up by the new manager


def test_validate_config_names_the_field():
    cfg = config_base.seq_config("facial_attributes", "demo")
    config_base.validate(cfg, devices=1, processes=1)
    # the demo: 16 triples, 48 images
    with pytest.raises(config_base.ConfigError,
                       match=r"train.batch_size=16: .*48 images.* 5 devices"):
        config_base.validate(cfg, devices=5, processes=1)
    cfg.runtime.kernels = "im2col"
    with pytest.raises(config_base.ConfigError, match="runtime.kernels='im2col'"):
        config_base.validate(cfg, devices=1, processes=1)
    cfg.runtime.kernels = "auto"
    cfg.train.debug_nonfinite_steps = "3,x"
    with pytest.raises(config_base.ConfigError, match="train.debug_nonfinite_steps"):
        config_base.validate(cfg, devices=1, processes=1)
    assert config_base.parse_steps("3, 7-9") == (3, 7, 8, 9)
    assert config_base.parse_steps("") == ()


def test_unwritable_workdir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(faults.WorkdirError, match=f"{blocker}/run"):
        faults.check_workdir(str(blocker / "run"))
    faults.check_workdir(str(tmp_path / "fine"))


def test_global_batches_do_not_depend_on_the_process_count(monkeypatch):
    """Process p of P takes batches p, p+P, ...: their concatenation is the 1-process batch."""
    src = ListSource([_example(16, (i % 5 + 1, 0, 0, 0, 0)) for i in range(10)])
    kw = {"seed": 3, "image_size": 16}
    single = [b for _, b in zip(range(6), iter(pipeline.make_train_dataset(src, batch_size=4,
                                                                            **kw)))]
    shares = []
    for p in range(2):
        monkeypatch.setattr(pipeline, "process_shard", lambda shard=True, p=p: (p, 2))
        it = iter(pipeline.make_train_dataset(src, batch_size=2, **kw))
        shares.append([b for _, b in zip(range(6), it)])
    for g in range(6):  # 6 global batches of 4 = 2.4 epochs
        for key in single[g]:
            np.testing.assert_array_equal(
                np.concatenate([shares[0][g][key], shares[1][g][key]]), single[g][key])


def _damage(step_dir, how):
    """Damages the largest array file of a saved checkpoint step the way a crash or a disk
    fault would."""
    files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names
             if "/d/" in os.path.join(root, f)]
    target = max(files, key=os.path.getsize)
    data = bytearray(open(target, "rb").read())
    if how == "flip":
        data[len(data) // 2] ^= 0x04
        open(target, "wb").write(bytes(data))
    elif how == "truncate":
        open(target, "wb").write(bytes(data[: len(data) // 2]))
    else:  # missing
        os.remove(target)


def _saved_run(tmp_path, steps=(3, 6, 9)):
    manager = checkpoint.make_manager(str(tmp_path), keep=5)
    for step in steps:
        state = {"w": jnp.arange(2000.0) * step, "step": jnp.int32(step)}
        checkpoint.save(manager, step, state, {"data": {"next_index": step}}, wait=True)
    manager.close()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


@pytest.mark.parametrize("how", ["flip", "truncate", "missing"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, how):
    abstract = _saved_run(tmp_path)
    _damage(tmp_path / "checkpoints" / "9", how)
    manager = checkpoint.make_manager(str(tmp_path), keep=5)
    step, state, loop = checkpoint.restore_latest(manager, abstract)
    manager.close()
    assert step == 6 and loop == {"data": {"next_index": 6}}
    np.testing.assert_array_equal(state["w"], np.arange(2000.0) * 6)
    warning = capsys.readouterr().err
    assert str(tmp_path / "checkpoints" / "9") in warning
    assert f"resuming from {tmp_path / 'checkpoints' / '6'}" in warning


def test_no_good_checkpoint_is_an_error_naming_the_directory(tmp_path):
    abstract = _saved_run(tmp_path, steps=(3, 6))
    for step in ("3", "6"):
        _damage(tmp_path / "checkpoints" / step, "flip")
    manager = checkpoint.make_manager(str(tmp_path), keep=5)
    with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path / "checkpoints")):
        checkpoint.restore_latest(manager, abstract)
    manager.close()


def test_fingerprint_changes_with_any_single_bit():
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    base = checkpoint.fingerprint({"x": x, "b": np.array([True, False])})
    bits = x.view(np.uint32).copy()
    for index, bit in ((0, 0), (17, 31), (34, 12)):
        flipped = bits.copy()
        flipped.flat[index] ^= np.uint32(1 << bit)
        assert checkpoint.fingerprint({"x": flipped.view(np.float32),
                                       "b": np.array([True, False])}) != base
    # two swapped values: the sum is position-weighted
    swapped = x.copy()
    swapped.flat[0], swapped.flat[1] = x.flat[1], x.flat[0]
    assert checkpoint.fingerprint({"x": swapped, "b": np.array([True, False])}) != base


def test_fingerprint_does_not_depend_on_the_containers():
    """A checkpoint saved from a TrainState is read back (in another process, by the tests'
    tools) into plain dicts, whose leaves flatten in another order: same fingerprint."""
    from cmil_jax.train import TrainState

    state = TrainState(step=np.int32(3), params={"w": np.arange(4.0, dtype=np.float32)},
                       batch_stats={"m": np.ones(2, np.float32)},
                       opt_state={"count": np.int32(7)})
    as_dicts = {"batch_stats": {"m": np.ones(2, np.float32)}, "opt_state": {"count": np.int32(7)},
                "params": {"w": np.arange(4.0, dtype=np.float32)}, "step": np.int32(3)}
    assert jax.tree.leaves(state)[0].shape != jax.tree.leaves(as_dicts)[0].shape  # other order
    assert checkpoint.fingerprint(state) == checkpoint.fingerprint(as_dicts)
    assert set(checkpoint.fingerprint(state)) == {"step", "params/w", "batch_stats/m",
                                                 "opt_state/count"}


def test_damaged_best_checkpoint_falls_back_to_the_runner_up(tmp_path, capsys):
    keeper = checkpoint.BestKeeper(str(tmp_path), ["auc"])
    for step, auc in ((5, 0.6), (10, 0.8)):
        keeper.update(step, {"params": {"w": jnp.arange(2000.0) * step}}, {"auc": auc})
        keeper.wait()
    keeper.close()
    abstract = {"params": {"w": jax.ShapeDtypeStruct((2000,), jnp.float32)}}
    step, variables = checkpoint.restore_best(str(tmp_path), "auc", abstract)
    assert step == 10
    _damage(tmp_path / "best" / "auc" / "10", "flip")
    step, variables = checkpoint.restore_best(str(tmp_path), "auc", abstract)
    assert step == 5
    np.testing.assert_array_equal(variables["params"]["w"], np.arange(2000.0) * 5)
    assert str(tmp_path / "best" / "auc" / "10") in capsys.readouterr().err
