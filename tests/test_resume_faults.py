"""Resume over damaged or missing checkpoints, through the command line: fall back to the
previous good checkpoint with a warning, or exit 2 naming the directory; never a silent
restart from step 0 over a workdir that had progress."""

import os
import shutil

import pytest
from test_faults import _damage
from test_main import TINY, _records, _run

pytestmark = pytest.mark.slow


def test_damaged_and_missing_checkpoints_on_resume(tmp_path):
    workdir = tmp_path / "run"
    common = ["--config", "configs/seqattr.py:demo", "--workdir", str(workdir),
              f"--config.data.data_dir={tmp_path / 'data'}", *TINY,
              "--config.train.checkpoint_every=5", "--config.train.keep_checkpoints=3",
              "--config.train.eval_every=100", "--config.eval.select_metrics=fixed_acc",
              "--config.train.num_steps=10"]
    first = _run(*common)
    assert first.returncode == 0, first.stderr[-3000:]

    # The newest checkpoint (step 10, the last) damaged: resume from step 5, say so, redo 6-10.
    _damage(workdir / "checkpoints" / "10", "truncate")
    resumed = _run(*common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"damaged checkpoint(s) {workdir / 'checkpoints' / '10'}" in resumed.stderr
    assert f"resuming from {workdir / 'checkpoints' / '5'}" in resumed.stderr
    assert "at step 5" in resumed.stdout + resumed.stderr
    train_steps = [r["step"] for r in _records(workdir) if r["split"] == "train" and "loss" in r]
    assert train_steps == [5, 10]  # step 10's record was redone, not duplicated

    # No good checkpoint left: exit 2 naming the directory, nothing trained.
    for step in os.listdir(workdir / "checkpoints"):
        if step.isdigit():
            _damage(workdir / "checkpoints" / step, "flip")
    before = _records(workdir)
    broken = _run(*common)
    assert broken.returncode == 2
    assert f"no checkpoint under {workdir / 'checkpoints'} can be restored" in broken.stderr
    assert _records(workdir) == before

    # Checkpoints gone but metrics.jsonl shows progress: exit 2 rather than restart at 0.
    shutil.rmtree(workdir / "checkpoints")
    gone = _run(*common)
    assert gone.returncode == 2
    assert "records training up to step 10" in gone.stderr
    assert _records(workdir) == before
