"""What ``python src/train.py`` does, as a function of the composed Hydra config.

1. validate the config and seed everything;
2. instantiate the DataModule, the LightningModule, callbacks, loggers and Trainer
   from their ``_target_`` nodes;
3. fit (resuming from ``ckpt_path``, or with ``resume=true`` from the newest
   ``last.ckpt`` of an earlier run of the same ``task_name``), then test the best
   checkpoint;
4. finish the W&B run, write the final metrics to ``<run dir>/metrics.json`` (what
   ``src/report.py`` collects) and return them (a sweep's objective).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def find_resume_checkpoint(cfg: DictConfig) -> str | None:
    """``ckpt_path`` if given; with ``resume=true`` the newest last.ckpt of this task's runs."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist")
        return str(path)
    if not cfg.get("resume"):
        return None
    own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if own.is_file():
        return str(own)
    runs = Path(cfg.paths.log_dir) / cfg.task_name
    candidates = sorted(runs.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"resume=true but no checkpoints/last.ckpt under {runs} (task_name={cfg.task_name!r}); "
            "pass ckpt_path=<file> or start a fresh run with resume=false")
    return str(candidates[-1])


def instantiate_group(node: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if not node:
        return []
    return [hydra.utils.instantiate(c, _convert_="all") for c in node.values() if c and "_target_" in c]


def finish_wandb() -> None:
    import sys
    if "wandb" in sys.modules:
        import wandb
        if wandb.run is not None:
            wandb.finish()


def run_training(cfg: DictConfig) -> dict[str, float]:
    os.environ.setdefault("WANDB_MODE", "offline")  # no account needed; export WANDB_MODE=online to sync
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)

    if not issubclass(hydra.utils.get_class(cfg.data._target_), L.LightningDataModule):
        raise ValueError(f"data={cfg.data._target_} is not a training dataset (a LightningDataModule); "
                         "train with data=synthetic or data=vimeo90k — data=long_video is the stream of "
                         "src/diagnose.py and of callbacks.onset_test")
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    module: L.LightningModule = hydra.utils.instantiate(cfg.module, _convert_="all")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    log.info("model %s: %d parameters", module.model.extra_repr(),
             sum(p.numel() for p in module.model.parameters()))

    try:
        if cfg.get("train", True):
            ckpt = find_resume_checkpoint(cfg)
            if ckpt:
                log.info("resuming from %s", ckpt)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if cfg.get("test", True):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if not cfg.get("train", True):
                best = cfg.get("ckpt_path") or ""
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        for callback in callbacks:  # diagnostics that ran outside the logged metrics (TRF, onsets)
            metrics.update(getattr(callback, "summary", dict)())
    finally:
        finish_wandb()
    out = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    log.info("outputs in %s (final metrics in metrics.json)", out)
    return metrics
