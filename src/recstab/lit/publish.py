"""The one place that sends numbers, figures and tables to the loggers (W&B, CSV) and the run summary.

The diagnostics (:mod:`recstab.diagnostics`) return numbers and write files; they log
nothing. Whoever ran them publishes what they returned here:

    publish_metrics(loggers, {"stability/bound": 0.8}, step)     # every logger, at a step
    publish_image(loggers, "stability/trf", "run/stability/trf.png", step)   # the figure on disk -> W&B
    publish_summary(loggers, metrics)                             # final values: W&B run summary
    publish_table(loggers, "comparison", columns, rows)           # a W&B table

``loggers`` is a Lightning Trainer (its loggers), a list of Lightning loggers, a raw
``wandb`` run, or None (nothing is sent). Non-finite floats other than ±∞ (NaN: a
measurement that failed) are left out of metric logs; the summary keeps every value.
"""

from __future__ import annotations

import math
from pathlib import Path


def _targets(loggers) -> list:
    """Lightning loggers and raw W&B runs behind ``loggers``."""
    if loggers is None:
        return []
    if hasattr(loggers, "loggers") and not hasattr(loggers, "log"):  # a Trainer
        return list(loggers.loggers)
    if isinstance(loggers, (list, tuple)):
        return list(loggers)
    return [loggers]


def _is_wandb_logger(target) -> bool:
    from lightning.pytorch.loggers import WandbLogger
    return isinstance(target, WandbLogger)


def _is_wandb_run(target) -> bool:
    """A raw ``wandb`` run (``wandb.init()``), not a Lightning logger."""
    return hasattr(target, "summary") and hasattr(target, "finish") and not hasattr(target, "log_metrics")


def publish_metrics(loggers, metrics: dict, step: int | None = None) -> None:
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and not math.isnan(float(v))}
    for target in _targets(loggers):
        if _is_wandb_run(target):
            target.log(numbers, **({} if step is None else {"step": step}))
        else:
            target.log_metrics(numbers, step=step)


def publish_image(loggers, key: str, path: str | Path, step: int | None = None) -> None:
    """The figure on disk to W&B (CSV and other loggers: the file on disk is the record)."""
    for target in _targets(loggers):
        if _is_wandb_logger(target):
            target.log_image(key=key, images=[str(path)], step=step)
        elif _is_wandb_run(target):
            import wandb
            target.log({key: wandb.Image(str(path))}, **({} if step is None else {"step": step}))


def publish_table(loggers, key: str, columns: list, rows: list) -> None:
    for target in _targets(loggers):
        if _is_wandb_logger(target):
            target.log_table(key=key, columns=list(columns), data=[list(r) for r in rows])
        elif _is_wandb_run(target):
            import wandb
            target.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows], allow_mixed_types=True)})


def publish_summary(loggers, summary: dict) -> None:
    """The run's final values (what metrics.json holds) into every W&B run summary."""
    for target in _targets(loggers):
        run = target.experiment if _is_wandb_logger(target) else target if _is_wandb_run(target) else None
        if run is not None:
            run.summary.update(dict(summary))
