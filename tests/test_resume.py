"""Exact resume through the real entry point: SIGKILL or SIGTERM at a random step, then resume.

Three real ``python src/train.py`` processes start together: one runs
uninterrupted, one is killed with SIGKILL and one is sent SIGTERM once its
``last.ckpt`` (written every step here) reaches a randomly drawn step. The two
interrupted runs then continue with ``resume=true`` in their own run
directories. Both must end with the uninterrupted run's weights (max |dw| <= 1e-6
on the CPU), global step and metrics. 5 clips per epoch of batch 2, so the
interruption falls in an epoch's middle or at its end depending on the draw.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 14
RUN = ["debug=smoke", "logger=csv", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}",
       "callbacks.periodic_checkpoint.every_n_train_steps=1", "callbacks.spectrum=null",
       "callbacks.validation_figures=null", "data.train_length=9"]


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), *RUN, f"hydra.run.dir={run_dir}", *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    log = open(run_dir / "stderr.txt", "w")
    return subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def saved_step(path: Path) -> int:
    """global_step of a checkpoint, -1 while it does not exist or is being replaced."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except Exception:
        return -1


def interrupt_at(proc: subprocess.Popen, run_dir: Path, step: int, signum: int) -> int:
    """Send ``signum`` once run_dir's last.ckpt holds ``step`` or more; the step it held then."""
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        seen = saved_step(last)
        if seen >= step:
            os.kill(proc.pid, signum)
            return seen
        time.sleep(0.005)
    raise AssertionError(f"{run_dir} ended (rc={proc.poll()}) before step {step}:\n"
                         + (run_dir / "stderr.txt").read_text()[-3000:])


def finish(proc: subprocess.Popen, run_dir: Path) -> int:
    rc = proc.wait(timeout=300)
    return rc


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    rng = random.Random()
    k_kill, k_term = rng.randint(2, STEPS - 5), rng.randint(2, STEPS - 5)
    full, killed, termed = root / "full", root / "killed", root / "termed"
    procs = {d: start(d) for d in (full, killed, termed)}
    at_kill = interrupt_at(procs[killed], killed, k_kill, signal.SIGKILL)
    at_term = interrupt_at(procs[termed], termed, k_term, signal.SIGTERM)
    rcs = {d: finish(p, d) for d, p in procs.items()}
    interrupted = {"killed": (at_kill, rcs[killed], saved_step(killed / "checkpoints" / "last.ckpt")),
                   "termed": (at_term, rcs[termed], saved_step(termed / "checkpoints" / "interrupted.ckpt"))}
    resumed = {d: start(d, "resume=true") for d in (killed, termed)}
    rcs.update({d: finish(p, d) for d, p in resumed.items()})
    return root, rcs, interrupted


def test_uninterrupted_run_finishes(runs):
    root, rcs, _ = runs
    assert rcs[root / "full"] == 0, (root / "full" / "stderr.txt").read_text()[-3000:]
    assert saved_step(root / "full" / "checkpoints" / "last.ckpt") == STEPS


@pytest.mark.parametrize("name", ["killed", "termed"])
def test_resumed_run_matches_the_uninterrupted_one(runs, name):
    root, rcs, interrupted = runs
    full, run = root / "full", root / name
    at, rc_interrupted, step_on_disk = interrupted[name]
    log = (run / "stderr.txt").read_text()
    if name == "killed":
        assert rc_interrupted == -signal.SIGKILL
    else:  # SIGTERM: a checkpoint at the step boundary and a clean exit
        assert rc_interrupted == 0, log[-3000:]
        assert at <= step_on_disk < STEPS
    assert rcs[run] == 0, log[-3000:]
    assert "resuming from" in log
    last_full, last_run = full / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt"
    delta = max_diff(weights(last_full), weights(last_run))
    print(f"{name} at step {step_on_disk} (asked {at}): max |dw| = {delta:.3g}")
    assert delta <= 1e-6, f"{name} at step {step_on_disk}: max |dw| = {delta}"
    assert saved_step(last_run) == saved_step(last_full) == STEPS
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert a.keys() == b.keys() and "train/loss" in a and "val/psnr_mean" in a and "test/psnr_mean" in a
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
