"""Resumable work files: what a killed measurement leaves behind, and the rule for reusing it.

A long measurement (the onset test, the TRF search) writes its progress every few steps
to a file, atomically (``torch.save`` to a temporary file in the same folder, then
``os.replace``: a kill leaves the old file or the new one, never half of one). Each file
carries the *identity* of what it measured: a SHA-1 of the model's weights
(:func:`model_fingerprint`), the settings, the input (files, frame size, σ), the dampening.
A resume reuses a file only when every entry of its identity equals the new run's; any
difference is refused (:class:`ResumeMismatch`) with a message naming each entry, saved
and now, so a resumed diagnosis can never put one model's result beside another's.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

PROGRESS_VERSION = 2  # 2: the onset test keeps the input PSNR per frame


class ResumeMismatch(ValueError):
    """A work file of another measurement: never reused; the message names the difference."""


def model_fingerprint(model: nn.Module) -> str:
    """SHA-1 of the model's state_dict (names, shapes, bytes): a resumed run must measure the same model."""
    digest = hashlib.sha1()
    for name, value in model.state_dict().items():
        if torch.is_tensor(value):
            digest.update(name.encode())
            digest.update(str(tuple(value.shape)).encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_progress_settings(progress, every: int, resume: bool, unit: str) -> None:
    """The settings of a resumable run: a ValueError naming the bad one."""
    if every < 1:
        raise ValueError(f"progress_every must be >= 1 {unit}, got {every}")
    if resume and progress is None:
        raise ValueError("resume=True needs progress=<file> to resume from")


def save_progress(path: Path, progress: dict) -> None:
    """Atomic write: torch.save to a temporary file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(progress, tmp)
    os.replace(tmp, path)


def load_progress(path: Path, identity: dict, device=None) -> dict | None:
    """The progress of a killed run with the same `identity`; None when there is none.

    Raises ResumeMismatch (naming each differing entry) when the file measured something else."""
    path = Path(path)
    if not path.is_file():
        return None
    progress = torch.load(path, map_location=device, weights_only=True)
    if progress.get("version") != PROGRESS_VERSION:
        raise ResumeMismatch(f"{path}: progress file version {progress.get('version')!r}, this code writes "
                             f"{PROGRESS_VERSION}: delete it to start over")
    differ = mismatch(progress["identity"], identity)
    if differ:
        raise ResumeMismatch(f"cannot resume from {path}: it measured something else ({differ}). Use the same "
                             "model and settings, or resume=false to start over")
    return progress


def mismatch(saved: dict, now: dict) -> str:
    """'' when the two identities agree; else '<key>: saved <a>, now <b>; ...' for each differing key."""
    differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    return "; ".join(f"{k}: saved {_short(saved.get(k))}, now {_short(now.get(k))}" for k in differ)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 20 else text[:12] + "…"
