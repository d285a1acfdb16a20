"""Shared test setup: W&B disabled, a tiny CPU budget, the repository root."""

import os
from pathlib import Path

import pytest
import torch

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses too: tiny tensors, 2 shared cores
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # tiny tensors: threads cost more than they give

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
