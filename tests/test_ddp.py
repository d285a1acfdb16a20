"""trainer=ddp: one run on 2 CPU processes (gloo) under debug=smoke; SRN-C buffers identical on both ranks."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


class DumpState(L.Callback):
    """At the end of fit, every rank saves its state dict (parameters and buffers) to <out>/rank<r>.pt."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_fit_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "world_size": trainer.world_size, "backend": str(
            getattr(trainer.strategy, "_process_group_backend", ""))}, self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_srnc_buffers_identical(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), "trainer=ddp", "debug=smoke", "norm=srnc", "norm.alpha=2.0",
           "norm.beta=0.1", "norm.n=16", "logger=csv", "trainer.max_steps=4", "trainer.val_check_interval=2",
           f"hydra.run.dir={run}", "+callbacks.dump._target_=test_ddp.DumpState", f"+callbacks.dump.out={run / 'dump'}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(run / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    a, b = ranks[0]["state"], ranks[1]["state"]
    u = [k for k in a if k.endswith("parametrizations.weight.0.u")]
    assert len(u) >= 12  # every conv of the VResNet-feat carries SRN-C
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between ranks"
    assert (run / "metrics.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4
    assert torch.equal(saved["state_dict"][u[0]], a[u[0]])  # the checkpoint holds the (shared) vectors
