"""Interrupted runs continue exactly: random state in checkpoints, preemption at step boundaries.

A run killed after step k and resumed from its checkpoint of step k must end
with the weights of the uninterrupted run. The weights after step k+1 are a
function of (weights, optimiser and scheduler state, batch k+1, random draws of
step k+1). Lightning checkpoints the first three; the data module makes batch
k+1 a pure function of (seed, epoch, batch index) and stores its position in the
stream (``recstab.lit.datamodules.ResumableLoader``); ``RandomState`` stores the
global generators (torch CPU and CUDA, numpy, python ``random``) and restores them
when training restarts, so anything that draws from them (dropout, a random
restart of a power iteration) repeats its draws too.

Preemption. SLURM (and most schedulers) send SIGTERM some seconds before they
kill a job. Lightning turns SIGTERM into an exception raised at the end of the
current training step; ``OnExceptionCheckpoint`` (``conf/callbacks``) then writes
``checkpoints/interrupted.ckpt`` from a consistent step boundary, and
``recstab.lit.launch`` ends the run with exit status 0, so ``resume=true`` (or a
requeued job) continues from it. submitit, the Hydra SLURM launcher, asks for a
checkpoint with another signal (``SIGUSR2`` unless ``SUBMITIT_PREEMPT_SIGNAL``
says otherwise) and its handler requeues the job and exits at once, in the middle
of whatever step runs. ``StepBoundarySignals`` defers such handlers: the signal
only sets a flag, and at the end of the step the callback writes ``last.ckpt``
and then calls the original handler.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def capture_random_state() -> dict:
    """The state of every global generator: torch CPU (and CUDA), numpy, python."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # tensors and plain python values only: checkpoints must load with torch.load(weights_only=True)
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict) -> None:
    """Inverse of :func:`capture_random_state` (CUDA states only where CUDA has as many devices)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


class RandomState(L.Callback):
    """Checkpoint the global random generators; restore them when training resumes.

    The states are captured when a checkpoint is written and put back just before
    the first training step after the restore (not at load time: setting up the
    loaders in between draws from the torch generator).
    """

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        return capture_random_state()

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict or None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            restore_random_state(self._pending)
            self._pending = None


def _last_step(trainer) -> bool:
    """This step ends training (max_steps, or the last batch of the last epoch): Lightning just stops."""
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return True
    return trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs


def preempt_signal() -> signal.Signals:
    """The signal submitit sends before preempting or timing out a job (``SUBMITIT_PREEMPT_SIGNAL``)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    found = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if not isinstance(found, signal.Signals):
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={name!r} is not a signal name (e.g. USR2)")
    return found


class StepBoundarySignals(L.Callback):
    """Run the handlers already installed for ``signals`` at the next step boundary, after a checkpoint.

    Only signals that have a Python handler when training starts (submitit's
    requeue handler) are deferred; others are left alone. On such a signal the
    handler records it; at the end of the current training step the callback saves
    ``<dirpath>/last.ckpt`` and then calls the original handler (which requeues
    the job and exits). Installed when training starts (after Lightning's own signal
    handlers), removed when it ends. A SIGTERM on the last batch of an epoch also stops at that
    step's end (Lightning's own stop would come after the epoch end, see on_train_batch_end).
    """

    def __init__(self, dirpath: str, signals: list[str] | None = None):
        self.dirpath = Path(dirpath)
        names = signals if signals is not None else [preempt_signal().name]
        self.signals = []
        for name in names:
            found = getattr(signal, name if str(name).startswith("SIG") else f"SIG{name}", None)
            if not isinstance(found, signal.Signals) or found in (signal.SIGKILL, signal.SIGSTOP):
                raise ValueError(f"signals: {name!r} is not a signal that can be handled (e.g. USR2, USR1)")
            self.signals.append(found)
        self._originals: dict = {}
        self._received: list[tuple[int, object]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        # not on_fit_start: Lightning saves every handler after it and puts them back at its teardown
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in self.signals:
            original = signal.getsignal(signum)
            if callable(original):
                self._originals[signum] = original
                signal.signal(signum, self._defer)

    def _defer(self, signum, frame) -> None:
        log.info("received %s: checkpointing at the end of this step", signal.Signals(signum).name)
        self._received.append((signum, frame))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm and batch_idx + 1 == trainer.num_training_batches and not _last_step(trainer):
            # Lightning defers a SIGTERM on an epoch's last batch until after the epoch end; a checkpoint
            # taken there resumes one batch into the next epoch and skips the rest of it. Stop here, at the
            # step boundary where last.ckpt is taken too (and which resumes exactly).
            raise SIGTERMException()
        if not self._received:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        log.info("saved %s at step %d", path, trainer.global_step)
        received, self._received = self._received, []
        self._restore()
        for signum, frame in received:
            original = signal.getsignal(signum)
            if callable(original):
                original(signum, frame)

    def _restore(self) -> None:
        for signum, original in self._originals.items():
            signal.signal(signum, original)
        self._originals = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
