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

import lightning as L
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
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",  # tests/ on the path: SigtermAt
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    log = open(run_dir / "stderr.txt", "a")  # the interrupted run's output, then the resumed run's
    return subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


class SigtermAt(L.Callback):
    """Sends its own process SIGTERM as training step ``step`` starts: a preemption at a chosen step."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def saved_step(path: Path) -> int:
    """global_step of a checkpoint, -1 while it does not exist or is being replaced."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except Exception:
        return -1


def interrupt_at(targets: dict) -> dict:
    """``targets``: run_dir -> (proc, step, signum). Polls all runs together and sends each its signal
    once its last.ckpt holds ``step`` or more (while it is still training); returns the steps seen."""
    pending, seen_at = dict(targets), {}
    deadline = time.time() + 240
    while pending and time.time() < deadline:
        for run_dir, (proc, step, signum) in list(pending.items()):
            if proc.poll() is not None:
                raise AssertionError(f"{run_dir} ended (rc={proc.poll()}) before step {step}:\n"
                                     + (run_dir / "stderr.txt").read_text()[-3000:])
            seen = saved_step(run_dir / "checkpoints" / "last.ckpt")
            if seen >= step:
                os.kill(proc.pid, signum)
                seen_at[run_dir] = seen
                del pending[run_dir]
        time.sleep(0.005)
    assert not pending, f"runs never reached their interruption step: {list(pending)}"
    return seen_at


def finish(proc: subprocess.Popen) -> int:
    return proc.wait(timeout=300)


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
    seen = interrupt_at({killed: (procs[killed], k_kill, signal.SIGKILL),
                         termed: (procs[termed], k_term, signal.SIGTERM)})
    at_kill, at_term = seen[killed], seen[termed]
    rcs = {d: finish(p) for d, p in procs.items()}
    interrupted = {"killed": (at_kill, rcs[killed], saved_step(killed / "checkpoints" / "last.ckpt")),
                   "termed": (at_term, rcs[termed], saved_step(termed / "checkpoints" / "interrupted.ckpt"))}
    resumed = {d: start(d, "resume=true") for d in (killed, termed)}
    rcs.update({d: finish(p) for d, p in resumed.items()})
    return root, rcs, interrupted


@pytest.mark.slow
def test_uninterrupted_run_finishes(runs):
    root, rcs, _ = runs
    assert rcs[root / "full"] == 0, (root / "full" / "stderr.txt").read_text()[-3000:]
    assert saved_step(root / "full" / "checkpoints" / "last.ckpt") == STEPS


@pytest.mark.slow
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
        assert f"SIGTERM: stopped after step {step_on_disk} with a checkpoint in {run}/checkpoints" in log
        assert not (run / "checkpoints" / "interrupted.ckpt").exists()  # removed once the run completed
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


@pytest.mark.slow
def test_sigterm_on_the_last_batch_of_an_epoch_resumes_exactly(runs):
    """9 clips in batches of 2: step 10 ends an epoch, where Lightning would stop only after the epoch end
    (a checkpoint from there resumed one batch into the next epoch, then skipped the rest of it)."""
    root, _, _ = runs
    run = root / "epoch_end"
    assert finish(start(run, "+callbacks.sigterm._target_=test_resume.SigtermAt", "+callbacks.sigterm.step=10")) == 0
    log = (run / "stderr.txt").read_text()
    assert "SIGTERM: stopped after step 10 " in log, log[-3000:]
    assert finish(start(run, "resume=true")) == 0, (run / "stderr.txt").read_text()[-3000:]
    delta = max_diff(weights(root / "full" / "checkpoints" / "last.ckpt"), weights(run / "checkpoints" / "last.ckpt"))
    assert delta <= 1e-6, f"max |dw| = {delta}"


# ---------------------------------------------------------------- in-process pieces
def test_submitit_signal_is_deferred_to_the_step_boundary(tmp_path):
    """A handler already installed for USR2 (submitit's requeue) runs after the step and after last.ckpt."""
    import hydra
    import lightning as L
    from hydra import compose, initialize_config_dir

    from recstab.lit.resume import StepBoundarySignals

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["debug=smoke"])
    module = hydra.utils.instantiate(cfg.module, _convert_="all")
    data = hydra.utils.instantiate(cfg.data, _convert_="all")
    calls = []

    def submitit_handler(signum, frame):  # what submitit does: requeue, then exit
        calls.append(saved_step(tmp_path / "last.ckpt"))
        raise SystemExit(-1)

    class SignalDuringStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR2)  # arrives in the middle of step 3
                assert calls == []  # the original handler did not run yet

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[SignalDuringStep(), StepBoundarySignals(str(tmp_path), ["USR2"])])
        with pytest.raises(SystemExit):
            trainer.fit(module, datamodule=data)
        assert calls == [3]  # after step 3 ended, with last.ckpt of step 3 on disk
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # handlers restored
    finally:
        signal.signal(signal.SIGUSR2, previous)
    with pytest.raises(ValueError, match="'KILL' is not a signal that can be handled"):
        StepBoundarySignals(str(tmp_path), ["KILL"])


def test_requeued_job_resumes_from_its_own_directory(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from recstab.lit.launch import find_resume_checkpoint

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["debug=smoke"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    assert find_resume_checkpoint(cfg) is None
    (tmp_path / "checkpoints").mkdir()
    for i, name in enumerate(("last.ckpt", "interrupted.ckpt")):
        (tmp_path / "checkpoints" / name).write_bytes(b"x")
        os.utime(tmp_path / "checkpoints" / name, (1000 + i, 1000 + i))
    assert find_resume_checkpoint(cfg) is None  # a fresh job does not resume by itself
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert find_resume_checkpoint(cfg) == str(tmp_path / "checkpoints" / "interrupted.ckpt")  # the newest


def test_slurm_launcher_config_requeues_time_outs():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.max_num_timeout > 0
    assert launcher.signal_delay_s >= 60


@pytest.mark.parametrize("epoch,done", [(0, 0), (0, 2), (1, 3), (2, 4), (1, 5)])
def test_loader_state_continues_the_epoch_where_it_stopped(epoch, done):
    """After ``done`` trained batches of ``epoch``, a loader given the state yields the rest, then the next epoch."""
    from recstab.lit.datamodules import EpochSampler, ResumableLoader

    n, bs, seed = 9, 2, 3  # 5 batches per epoch, the last one of a single key

    def loader():
        return ResumableLoader(list(range(10 * n)), batch_size=bs, sampler=EpochSampler(n, seed))

    def epoch_batches(dl, e):
        dl.sampler.set_epoch(e)
        return [b.tolist() for b in dl]

    reference = loader()
    stream = {e: epoch_batches(reference, e) for e in range(4)}
    assert [len(stream[e]) for e in stream] == [5] * 4
    keys = sorted(k for b in stream[1] for k in b)  # epoch 1: every index once, offset by n
    assert keys == list(range(n, 2 * n))

    first = loader()
    first.sampler.set_epoch(epoch)
    first.progress = lambda: done
    state = first.state_dict()
    assert state == {"epoch": epoch, "batches_done": done, "batch_size": bs, "length": n, "seed": seed}

    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b.tolist() for b in resumed]  # the iterator Lightning creates right after loading
    if done < 5:
        assert rest == stream[epoch][done:]
        nxt = epoch + 1
    else:  # saved after the last batch of the epoch: continue with the next one
        assert rest == stream[epoch + 1]
        nxt = epoch + 2
    assert epoch_batches(resumed, nxt) == stream[nxt]  # skipping happens once only

    other = ResumableLoader(list(range(10 * n)), batch_size=3, sampler=EpochSampler(n, seed))
    with pytest.raises(ValueError, match=r"batch_size=2 \(this run: 3\)"):
        other.load_state_dict(state)


def test_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random as pyrandom

    import numpy as np

    from recstab.lit.resume import RandomState

    torch.manual_seed(1), np.random.seed(2), pyrandom.seed(3)
    torch.save({"callbacks": {"RandomState": RandomState().state_dict()}}, tmp_path / "c.ckpt")
    expected = (torch.rand(3), np.random.rand(3), pyrandom.random())
    torch.rand(5), np.random.rand(5), pyrandom.random()  # move every generator on
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]["RandomState"]
    callback = RandomState()
    callback.load_state_dict(state)
    callback.on_train_batch_start(None, None, None, 0)  # restored before the first resumed step
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and pyrandom.random() == expected[2]
    torch.manual_seed(4)
    before = torch.rand(1)
    torch.manual_seed(4)
    callback.on_train_batch_start(None, None, None, 1)  # only once
    assert torch.equal(torch.rand(1), before)
