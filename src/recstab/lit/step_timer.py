"""Cost of a training step: wall and CPU seconds per optimisation step, validation excluded.

The paper reports the training-time factor of its normalisations (SRN ×1.8, SRN-C ×2.2).
``StepTimer`` times every training batch from ``on_train_batch_start`` to
``on_train_batch_end`` (forward, backward through time, the optimiser step and the
normalisation's power iteration), skips the first ``warmup`` steps (allocator and thread
start-up), and reports the medians, so that the occasional validation or checkpoint write,
and a busy shared machine's spikes, do not enter the comparison:

- ``speed/train_step_s``: median wall seconds per step;
- ``speed/train_step_cpu_s``: median process CPU seconds per step (all threads; on a shared
  machine the fairer number: it does not grow when other processes take the cores).

Both are logged at the end of training and returned by :meth:`summary` (which
``src/train.py`` writes into ``metrics.json``).
"""

from __future__ import annotations

import statistics
import time

import lightning as L


class StepTimer(L.Callback):
    """Args: warmup: first steps not timed (>= 0)."""

    def __init__(self, warmup: int = 5):
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {warmup}")
        self.warmup = int(warmup)
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start: tuple[float, float] | None = None
        self._seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        wall, cpu = time.perf_counter() - self._start[0], time.process_time() - self._start[1]
        self._start = None
        self._seen += 1
        if self._seen > self.warmup:
            self.wall.append(wall)
            self.cpu.append(cpu)

    def summary(self) -> dict:
        if not self.wall:
            return {}
        return {"speed/train_step_s": statistics.median(self.wall),
                "speed/train_step_cpu_s": statistics.median(self.cpu),
                "speed/train_steps_timed": float(len(self.wall))}

    def on_train_end(self, trainer, pl_module) -> None:
        metrics = self.summary()
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
