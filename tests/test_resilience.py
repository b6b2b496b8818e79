"""Scale-out and fault tolerance end to end, through the command line, on CPU.

Every run trains the same tiny model for STEPS steps on one shared synthetic data set and uses
one shared JAX compilation cache, so each distinct program compiles once per session. The
uninterrupted single-device run (`reference`) is what the other runs must reproduce:
  killed with SIGKILL at a random step, then resumed  -> the same metrics records, exactly
  SIGTERM (preemption)                                -> checkpoint and exit 0 at once
  two processes (jax.distributed, gloo), SIGTERM to one of them
                                                      -> both stop at one step with one shared
                                                         checkpoint, which this (single)
                                                         process restores; same parameters
  4 devices (--xla_force_host_platform_device_count) -> the same parameters within 1e-5
  NaN losses injected                                 -> skipped, counted; a streak stops it
Parameters and metrics agree up to float rounding across topologies, bit for bit on resume.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_main import ROOT, TINY

STEPS = 30
COMMON = [
    "--config",
    # The single-image demo. On the triples recipe the float32 4-device run leaves the 1-device
    # one faster than the 1e-5 asked here (matmul layers: 4e-5 relative on a BatchNorm bias at
    # step 7, 0.17 at step 30). Traced (docs/distributed.md, benchmarks/device_count_drift.py):
    # in float64 the two stay within 5e-14 for 30 steps, so the device count changes only the
    # order of additions, and this training amplifies any rounding difference (a 1e-7 change
    # of the initial weights grows to 7e-2 in 30 steps in float64 too); tests/test_device_drift.py
    # asserts the equivalence on triples in float64, 4 devices and 2 processes x 2 devices.
    "configs/seqattr.py:demo_single",
    *TINY,
    f"--config.train.num_steps={STEPS}",
    "--config.train.checkpoint_every=3",
    "--config.train.keep_checkpoints=20",
    "--config.train.eval_every=15",
    "--config.eval.select_metrics=fixed_acc",
    # 'auto' picks the same layers for 1 and 4 devices; matmul here because with the oneDNN
    # layers the single-image run's rounding differences grow past 1e-5 within these 30 steps
    # (the same amplification as above); tests/test_runtime.py checks one step of the default
    # layers on 1 and 4 devices.
    "--config.runtime.kernels=matmul",
]
TIMING_KEYS = ("images_per_sec", "time_to_first_step_s")
# The attention key bias has a zero gradient in exact arithmetic (softmax ignores a shift of
# all logits), so Adam turns rounding noise there into lr-sized steps: left out of comparisons.
KEY_BIAS = "['key']['bias']"
# LLVM -O0: compiles about a third faster; these runs are dominated by compilation.
XLA_FLAGS = "--xla_backend_optimization_level=0"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("resilience")
    return {"data": str(root / "data"), "cache": str(root / "jax_cache")}


def _env(shared, **extra):
    env = dict(
        os.environ,
        PYTHONPATH=ROOT,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=shared["cache"],
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env["XLA_FLAGS"] = XLA_FLAGS
    env.update(extra)
    return env


def _start(shared, workdir, *args, log_name="run", **env):
    """Starts the CLI in the background; stdout+stderr go to <workdir>.<log_name>.log."""
    cmd = [sys.executable, "-m", "cmil_jax.main", *COMMON, "--workdir", workdir,
           f"--config.data.data_dir={shared['data']}", *args]
    with open(f"{workdir}.{log_name}.log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(shared, **env), stdout=log,
                                stderr=subprocess.STDOUT)
    proc.log_path = log.name
    return proc


def _output(proc) -> str:
    with open(proc.log_path, errors="replace") as f:
        return f.read()


def _finish(proc, timeout=300) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run(shared, workdir, *args, **env) -> str:
    proc = _start(shared, workdir, *args, **env)
    code = _finish(proc)
    assert code == 0, _output(proc)[-4000:]
    return _output(proc)


def _checkpoint_steps(workdir):
    """Steps of the finished checkpoints (orbax renames a step's directory when complete)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _wait_for_checkpoint(procs, workdir, step, timeout=300):
    deadline = time.time() + timeout
    while not any(s >= step for s in _checkpoint_steps(workdir)):
        for proc in procs:
            assert proc.poll() is None, f"exited early ({proc.returncode}):\n" + _output(proc)[-4000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _comparable(records):
    """Records without wall-clock fields (and without the timing-only records)."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in TIMING_KEYS}
        if set(r) - {"step", "split"}:
            out.append(r)
    return out


def _assert_train_close(records, expected, rtol, keys=None, max_step=STEPS):
    """Train records of steps <= max_step agree within rtol (in `keys`, default all)."""
    got, want = ([r for r in _comparable(rs) if r["split"] == "train" and r["step"] <= max_step]
                 for rs in (records, expected))
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for r, e in zip(got, want):
        for k in keys or e:
            if isinstance(e[k], float):
                assert r[k] == pytest.approx(e[k], rel=rtol, abs=1e-7), (r["step"], k, r[k], e[k])


def _state(workdir, step):
    """The saved train state of `step` as numpy arrays."""
    import jax  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, restore_args=args)


def _restore_latest(workdir):
    """checkpoint.restore_latest in this process, shapes taken from the checkpoint itself."""
    import jax  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    from cmil_jax import checkpoint, parallel  # pylint: disable=import-outside-toplevel

    manager = checkpoint.make_manager(workdir, keep=20)
    path = os.path.join(workdir, "checkpoints", str(manager.latest_step()), "state")
    tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
    replicated = jax.sharding.NamedSharding(parallel.make_mesh(), jax.sharding.PartitionSpec())
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), tree)
    try:
        return checkpoint.restore_latest(manager, abstract)
    finally:
        manager.close()


def _leaves(tree):
    import jax  # pylint: disable=import-outside-toplevel

    return jax.tree.leaves(tree)


def _max_relative_difference(a, b, skip="") -> float:
    """max over leaves of |a - b| / |b| (Frobenius norms), leaving out paths containing skip."""
    import jax  # pylint: disable=import-outside-toplevel

    diffs = [np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12)
             for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], _leaves(b))
             if not skip or skip not in jax.tree_util.keystr(path)]
    return max(diffs)


@pytest.fixture(scope="module")
def reference(shared, tmp_path_factory):
    """An uninterrupted single-process, single-device run: (workdir, records)."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    _run(shared, workdir)
    return workdir, _records(workdir)


def test_kill9_at_random_step_then_resume_matches_uninterrupted(shared, reference, tmp_path):
    workdir = str(tmp_path / "run")
    kill_after = random.randint(3, STEPS - 6)
    proc = _start(shared, workdir)
    try:
        _wait_for_checkpoint([proc], workdir, kill_after)
        proc.send_signal(signal.SIGKILL)  # lands a few steps later, maybe during a save
    finally:
        assert _finish(proc) == -signal.SIGKILL
    out = _run(shared, workdir)
    assert "Resumed from" in out, out[-3000:]
    assert _comparable(_records(workdir)) == _comparable(reference[1]), f"kill after {kill_after}"


def test_sigterm_saves_a_checkpoint_and_exits_zero_promptly(shared, tmp_path):
    workdir = str(tmp_path / "run")
    proc = _start(shared, workdir)
    try:
        _wait_for_checkpoint([proc], workdir, 6)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        code = _finish(proc, timeout=120)
    finally:
        _finish(proc)
    out = _output(proc)
    assert code == 0, out[-3000:]
    assert time.time() - sent < 60
    assert "Preempted: checkpoint saved at step" in out, out[-3000:]
    stopped = int(out.split("checkpoint saved at step ")[1].split(";")[0])
    assert stopped < STEPS and _checkpoint_steps(workdir)[-1] == stopped
    assert not any(r["split"] == "test" for r in _records(workdir))  # no evaluation after it
    # The kill -9 test shows that resuming from a checkpoint repeats the run exactly.


def test_sigterm_during_a_save_an_evaluation_and_the_test_then_resume(shared, reference,
                                                                     tmp_path):
    """SIGTERM at exact points (the run sends it to itself: train.debug_sigterm_at) while a
    checkpoint is being written, during an evaluation and during the test of the best
    checkpoints: every run exits 0 having saved what it can, and the resumed runs write
    exactly the records of the uninterrupted one."""
    workdir = str(tmp_path / "run")
    # While the checkpoint of step 6 is written: it is completed, the run stops there.
    out = _run(shared, workdir, "--config.train.debug_sigterm_at=save:6")
    assert "Preempted: checkpoint saved at step 6;" in out, out[-3000:]
    assert _checkpoint_steps(workdir)[-1] == 6

    # During the evaluation of step 15 (after its first batch of 3): it is abandoned, the
    # checkpoint of step 15 is saved with the evaluation still due, no val record written.
    out = _run(shared, workdir, "--config.train.debug_sigterm_at=eval:15")
    assert "at step 6" in out and "Preempted: checkpoint saved at step 15;" in out, out[-3000:]
    assert "step 15: val" not in out
    assert _checkpoint_steps(workdir)[-1] == 15
    records = _comparable(_records(workdir))
    assert [(r["split"], r["step"]) for r in records] == [("train", 5), ("train", 10),
                                                         ("train", 15)]

    # Resumed, it evaluates step 15 first and trains on; SIGTERM during the test: nothing of
    # the test is recorded, so the train and val records are exactly the reference's.
    out = _run(shared, workdir, "--config.train.debug_sigterm_at=test")
    assert "at step 15" in out and "step 15: val" in out, out[-3000:]
    assert "Preempted while testing the best checkpoints" in out
    expected = _comparable(reference[1])
    assert _comparable(_records(workdir)) == [r for r in expected if r["split"] != "test"]

    # The same command tests the best checkpoints: now every record is the reference's.
    out = _run(shared, workdir)
    assert "at step 30" in out, out[-3000:]
    assert _comparable(_records(workdir)) == expected


def test_two_processes_match_one_and_share_a_checkpoint(shared, reference, tmp_path):
    workdir = str(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [
        _start(shared, workdir, log_name=f"p{i}", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        for i in range(2)
    ]
    try:
        _wait_for_checkpoint(procs, workdir, 6)
        procs[1].send_signal(signal.SIGTERM)  # one process is told; both must stop together
        codes = [_finish(p, timeout=180) for p in procs]
    finally:
        for p in procs:
            _finish(p)
    assert codes == [0, 0], [_output(p)[-2000:] for p in procs]
    out = _output(procs[0])
    stopped = int(out.split("checkpoint saved at step ")[1].split(";")[0])
    assert _checkpoint_steps(workdir)[-1] == stopped
    assert "Preempted" not in _output(procs[1])  # logs come from process 0
    _assert_train_close(_records(workdir), reference[1], rtol=1e-5, max_step=stopped)
    diff = _max_relative_difference(_state(workdir, 6)["params"],
                                    _state(reference[0], 6)["params"], skip=KEY_BIAS)
    assert diff < 1e-5, diff

    # This process (one process, one device) restores the checkpoint that the two wrote.
    step, state, loop = _restore_latest(workdir)
    assert step == stopped and int(state["step"]) == stopped
    assert loop["data"] == {"next_index": stopped}  # global batches, whatever the processes
    assert all(np.isfinite(x).all() for x in _leaves(state["params"]))


def test_four_devices_match_one_device(shared, reference, tmp_path):
    workdir = str(tmp_path / "run")
    _run(shared, workdir, XLA_FLAGS=XLA_FLAGS + " --xla_force_host_platform_device_count=4")
    for step in (3, 9, STEPS):
        diff = _max_relative_difference(_state(workdir, step)["params"],
                                        _state(reference[0], step)["params"], skip=KEY_BIAS)
        assert diff < 1e-5, (step, diff)
    _assert_train_close(_records(workdir), reference[1], rtol=1e-5, max_step=10)
    _assert_train_close(_records(workdir), reference[1], rtol=1e-3, keys=["loss"])
    assert [r["num_images"] for r in _records(workdir) if r["split"] != "train"] == [40] * 3


def test_nonfinite_steps_are_skipped_and_a_streak_stops_the_run(shared, tmp_path):
    workdir = str(tmp_path / "run")
    proc = _start(shared, workdir, "--config.train.debug_nonfinite_steps=3,4,13-30",
                  "--config.train.max_nonfinite_steps=4")
    code = _finish(proc)
    out = _output(proc)
    assert code == 3, out[-3000:]
    assert "NaN/Inf in 8 steps in a row (steps 13-20" in out, out[-3000:]
    assert "the newest checkpoint (step 18) holds the last good state" in out
    train = {r["step"]: r for r in _records(workdir) if r["split"] == "train" and "loss" in r}
    assert [train[s]["nonfinite"] for s in (5, 10, 15, 20)] == [2, 0, 3, 5]
    assert all(train[s]["loss"] is not None for s in (5, 10, 15))  # means of finite steps
    assert train[20]["loss"] is None
    assert _checkpoint_steps(workdir)[-1] == 18
    last_good, newest = _state(workdir, 12), _state(workdir, 18)
    assert newest["step"] == 18
    for key in ("params", "batch_stats", "opt_state"):  # updates 13-18 were skipped
        assert _max_relative_difference(newest[key], last_good[key]) == 0.0, key
    assert all(np.isfinite(x).all() for x in _leaves(newest["params"]))
