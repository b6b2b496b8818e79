"""A full disk (ENOSPC) while a run or predict writes: a clear error naming the file, exit status
4, and nothing half-written in place of what was there (the previous checkpoint, metrics.jsonl,
config.json); once there is space again the run resumes. Failures are injected where the bytes
go to disk: os.write for metrics.jsonl, tensorboardX's record writer, orbax's background save,
the write of a whole file; /dev/full gives the kernel's own ENOSPC."""

import builtins
import errno
import json
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cmil_jax import checkpoint, disk, faults, reporting, train

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# What tensorstore raises through orbax when the disk is full (the arrays of a checkpoint).
TENSORSTORE_ENOSPC = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/r/checkpoints/'
    '6.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed to write '
    "954731 bytes to file 4: No space left on device [os_error_code='28']")


def _lines(path):
    with open(path, "rb") as f:
        return f.read()


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _join_new_threads(before, timeout=60.0):
    """Waits for the threads started since `before` to end: the parts of a failed orbax save
    that did not fail go on writing in the background, as they would until the process exits."""
    deadline = time.time() + timeout
    while set(threading.enumerate()) - before and time.time() < deadline:
        time.sleep(0.05)


# ----------------------------------------------------------------------------- metrics.jsonl


def test_metrics_line_is_whole_or_absent_when_the_disk_fills(tmp_path, monkeypatch):
    writer = reporting.MetricWriter(str(tmp_path))
    writer.write(5, "train", {"loss": 1.5})
    writer.write(10, "val", {"auc": 0.75})
    before = _lines(writer.path)

    real_write = os.write
    calls = []

    def fills_up(fd, data):  # the kernel takes part of the line, then the disk is full
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", fills_up)
    with pytest.raises(disk.DiskFullError, match=f"out of disk space writing {writer.path}"):
        writer.write(15, "train", {"loss": 1.25, "lr": 1e-3})
    assert len(calls) == 2  # half the line went in before the error
    assert _lines(writer.path) == before  # ... and was taken out again

    monkeypatch.setattr(os, "write", real_write)  # space again: the same writer goes on
    writer.write(15, "train", {"loss": 1.25})
    with open(writer.path) as f:
        assert [json.loads(line)["step"] for line in f] == [5, 10, 15]


def test_a_partial_last_line_left_by_a_crash_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "split": "train", "loss": 1.0}\n{"step": 10, "spl')
    writer = reporting.MetricWriter(str(tmp_path))
    assert writer.last_train_step() == 5
    assert writer.drop_after(10) == 0
    writer.write(10, "train", {"loss": 2.0})  # not glued to the partial line
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10]
    path.write_text('{"step": 5}\nnot json\n{"step": 10}\n')
    with pytest.raises(faults.DataError, match=f"{path} line 2: not a metrics record"):
        writer.drop_after(10)


def test_kernel_enospc_from_dev_full():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system (Linux has it)")
    with pytest.raises(disk.DiskFullError, match="out of disk space writing /dev/full"):
        disk.append_line("/dev/full", '{"step": 1}')


def test_tensorboard_events_fail_in_the_writing_thread(tmp_path, monkeypatch):
    """tensorboardX's SummaryWriter writes in a thread of its own, where a full disk ends the
    thread and the events are lost unnoticed; the events are written in the caller's thread."""
    from tensorboardX import record_writer

    writer = reporting.MetricWriter(str(tmp_path), tensorboard=True)
    writer.write(5, "train", {"loss": 1.0})

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    with pytest.raises(disk.DiskFullError,
                       match=f"writing TensorBoard events in {tmp_path / 'tensorboard'}"):
        writer.write(10, "val", {"auc": 0.5})
    # metrics.jsonl is written first, whole: the record is there, the run can be resumed.
    with open(writer.path) as f:
        assert [json.loads(line)["step"] for line in f] == [5, 10]


# ----------------------------------------------------------------------------- whole files


def test_whole_files_keep_their_previous_version(tmp_path, monkeypatch):
    path = str(tmp_path / "config.json")
    checkpoint.write_json(path, {"model": {"width": 48}})
    before = _lines(path)

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(builtins, "open", lambda *a, _open=builtins.open, **k: FullFile(
        _open(*a, **k)))
    with pytest.raises(disk.DiskFullError, match=f"writing {path} .*previous version"):
        checkpoint.write_json(path, {"model": {"width": 64}})
    monkeypatch.undo()
    assert _lines(path) == before
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary file left


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("error", [ENOSPC, TENSORSTORE_ENOSPC], ids=["oserror", "tensorstore"])
def test_checkpoint_write_out_of_space_keeps_the_previous_one(tmp_path, monkeypatch, error):
    """orbax writes in the background: the error surfaces when the run waits for the save (or
    at the next save). It names the directory and the newest complete checkpoint, which is
    what the next run restores; once there is space, the same step saves again."""
    state = {"w": jnp.arange(2000.0), "step": jnp.int32(3)}
    manager = checkpoint.make_manager(str(tmp_path), keep=2)
    checkpoint.save(manager, 3, state, {"data": {"next_index": 3}}, wait=True)

    async def full(self, item, directory):
        raise error

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full)
    threads = set(threading.enumerate())
    checkpoint.save(manager, 6, {**state, "step": jnp.int32(6)}, {"data": {"next_index": 6}})
    directory = tmp_path / "checkpoints"
    with pytest.raises(disk.DiskFullError) as info:
        checkpoint.wait(manager)
    assert f"out of disk space writing a checkpoint under {directory}" in str(info.value)
    assert f"the newest complete checkpoint, {directory / '3'}, is intact" in str(info.value)
    manager.close()
    monkeypatch.undo()
    _join_new_threads(threads)

    manager = checkpoint.make_manager(str(tmp_path), keep=2)  # the next run, space back
    step, restored, loop = checkpoint.restore_latest(manager, _abstract(state))
    assert step == 3 and loop == {"data": {"next_index": 3}}
    np.testing.assert_array_equal(restored["w"], np.arange(2000.0))
    checkpoint.save(manager, 6, {**state, "step": jnp.int32(6)}, {"data": {"next_index": 6}},
                    wait=True)
    # The half-written one is cleaned up: orbax removes temporary directories in the background
    # from the manager's start and waits for that before its first save.
    assert sorted(os.listdir(directory)) == ["3", "6"]
    assert checkpoint.restore_latest(manager, _abstract(state))[0] == 6
    manager.close()


class _Closable:
    def close(self):
        pass


def test_the_loop_reports_a_failed_background_save_when_it_ends(tmp_path, monkeypatch, capsys):
    """The run's last checkpoint is written while the loop closes down: a full disk there is
    reported (not lost), and it does not replace an error already on its way."""
    state = {"w": jnp.arange(10.0)}
    threads = set(threading.enumerate())

    def failing_run(name):
        monkeypatch.undo()  # space for step 3; none when step 6 is written
        workdir = str(tmp_path / name)
        manager = checkpoint.make_manager(workdir, keep=2)
        checkpoint.save(manager, 3, state, {}, wait=True)

        async def full(self, item, directory):
            raise ENOSPC

        monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full)
        checkpoint.save(manager, 6, state, {})
        return dict(batches=_Closable(), manager=manager,
                    best=checkpoint.BestKeeper(workdir, ["auc"]),
                    writer=reporting.MetricWriter(workdir))

    with pytest.raises(disk.DiskFullError, match="checkpoints/3, is intact"):
        train._close_run(False, **failing_run("a"))
    assert train._close_run(True, **failing_run("b")) == 3  # an error is on its way already
    assert "warning: while closing the run: DiskFullError" in capsys.readouterr().err
    monkeypatch.undo()
    _join_new_threads(threads)


# ----------------------------------------------------------------------------- exit status


@pytest.mark.parametrize("error, status, text", [
    (disk.DiskFullError("out of disk space writing /w/metrics.jsonl (No space left on device)"),
     4, "error: out of disk space writing /w/metrics.jsonl"),
    (TENSORSTORE_ENOSPC, 4, "error: out of disk space (RESOURCE_EXHAUSTED"),
    (RuntimeError("wrapped"), 4, "error: out of disk space (wrapped)"),
    (faults.DataError("/w/metrics.jsonl line 2: not a metrics record"), 2, "line 2"),
    (faults.NonFiniteError("stopping: NaN"), 3, "error: stopping: NaN"),
    (ValueError("a bug"), None, ""),
])
def test_exit_status_of_each_error(tmp_path, capsys, error, status, text):
    from cmil_jax import main

    if str(error) == "wrapped":  # a library's error raised while handling an ENOSPC
        try:
            try:
                raise ENOSPC
            except OSError:
                raise RuntimeError("wrapped")  # pylint: disable=raise-missing-from
        except RuntimeError as e:
            error = e
    (tmp_path / "checkpoints" / "7").mkdir(parents=True)
    (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp").mkdir()  # the failed save
    assert main.exit_status(error, str(tmp_path)) == status
    err = capsys.readouterr().err
    assert text in err
    if status == 4:
        assert ("run the same command again: it resumes from the newest complete checkpoint "
                "(step 7)") in err
        assert err.rstrip().endswith(".")  # the message is the last thing printed


def test_out_of_space_before_any_checkpoint_says_how_to_start_again(tmp_path, capsys):
    from cmil_jax import main

    assert main.exit_status(disk.DiskFullError("out of disk space writing x"),
                            str(tmp_path)) == 4
    assert (f"no checkpoint was completed yet, so move {tmp_path} away (or remove its "
            "metrics.jsonl)") in capsys.readouterr().err


def test_bad_record_log_with_a_partial_or_broken_line(tmp_path):
    path = tmp_path / "bad_records.jsonl"
    path.write_text('{"source": "s", "index": 3, "error": "x"}\n{"source": "s", "ind')
    assert faults.count_bad_records(str(tmp_path)) == 1  # the cut-short last line is left out
    path.write_text('{"source": "s", "index": 3}\n[1, 2]\n{"source": "s", "index": 4}\n')
    with pytest.raises(faults.DataError, match=f"{path} line 2: not a bad-record entry"):
        faults.count_bad_records(str(tmp_path))
