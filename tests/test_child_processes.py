"""Processes a run starts end when it dies, SIGKILL included."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_main import ROOT, TINY


def _children(pid: int) -> set[int]:
    """All live descendants of `pid` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":  # zombies hold nothing
                parents[int(entry)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(pid)
        except OSError:
            pass
    return alive


def _wait_gone(pids, timeout=30.0) -> set[int]:
    deadline = time.time() + timeout
    while _alive(pids) and time.time() < deadline:
        time.sleep(0.5)
    return _alive(pids)


def test_a_busy_spawned_worker_ends_with_its_killed_parent(tmp_path):
    """Pool workers busy with a task (so not waiting on the parent's pipe) and
    multiprocessing's resource tracker: gone soon after the parent is killed."""
    parent_code = textwrap.dedent("""
        import multiprocessing, sys, time
        from cmil_jax import child_processes
        def work(_):
            time.sleep(600)
        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(2, initializer=child_processes.exit_with_parent)
            pool.map_async(work, range(2))
            print("ready", flush=True)
            time.sleep(600)
    """)
    script = tmp_path / "parent.py"  # a file, so that the workers can import `work`
    script.write_text(parent_code)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(3)  # the workers start their tasks
        workers = _children(proc.pid)
        assert len(workers) >= 3, workers  # the pool's two workers and the resource tracker
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert _wait_gone(workers, timeout=10) == set()
    finally:
        proc.kill()


@pytest.mark.slow
def test_sigkill_of_the_trainer_leaves_no_process_behind(tmp_path):
    """A trainer with grain workers, killed with SIGKILL mid-run: every process it started
    (data workers, multiprocessing's resource tracker) is gone within 30 seconds."""
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "cmil_jax.main", "--config", "configs/seqattr.py:demo",
            "--workdir", str(workdir), f"--config.data.data_dir={tmp_path / 'data'}", *TINY,
            "--config.data.num_workers=2", "--config.train.num_steps=100000"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and '"loss"' in metrics.read_text()):  # training steps
            assert proc.poll() is None, "the trainer ended early"
            assert time.time() < deadline, "no training step in time"
            time.sleep(1)
        started = _children(proc.pid)
        assert len(started) >= 2, started  # the grain workers at least
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert _wait_gone(started, timeout=30) == set()
    finally:
        proc.kill()
