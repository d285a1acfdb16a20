"""Shared test setup: isolated home and caches, W&B disabled, a tiny CPU budget, the repository root."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Isolated home and caches for the whole session, set at import time (before torch or anything
# that resolves cache paths is imported) and inherited by subprocesses (sweeps, train.py): no
# test reads or writes the user's ~/.cache/torch, ~/.cache/recstab or ~/.config.
ISOLATED_HOME = Path(tempfile.mkdtemp(prefix="recstab-tests-home-"))
atexit.register(shutil.rmtree, ISOLATED_HOME, ignore_errors=True)
for _var, _sub in (("HOME", ""), ("XDG_CACHE_HOME", ".cache"), ("XDG_CONFIG_HOME", ".config"),
                   ("TORCH_HOME", ".cache/torch"), ("RECSTAB_CACHE", ".cache/recstab")):
    os.environ[_var] = str(ISOLATED_HOME / _sub)

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses too: tiny tensors, 2 shared cores
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # tiny tensors: threads cost more than they give

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
