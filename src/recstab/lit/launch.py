"""What ``python src/train.py`` does, as a function of the composed Hydra config.

1. preflight (``recstab.lit.preflight``): every output directory is writable and
   the checkpoint to start from exists and holds the model the config builds;
   then seed everything;
2. instantiate the DataModule, the LightningModule, callbacks, loggers and Trainer
   from their ``_target_`` nodes;
3. fit (resuming from ``ckpt_path``, or with ``resume=true`` from the newest
   ``last.ckpt``/``interrupted.ckpt`` of an earlier run of the same ``task_name``),
   then test the best checkpoint. A SIGTERM ends the fit at a step boundary with
   ``checkpoints/interrupted.ckpt`` and the run returns without testing (exit
   status 0; see ``recstab.lit.resume``);
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
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from recstab.diagnostics.engine import json_value
from recstab.lit.preflight import check_checkpoint, check_writable
from recstab.lit.publish import publish_summary

log = logging.getLogger(__name__)


RESUMABLE = ("last.ckpt", "interrupted.ckpt")  # what resume=true continues from (the newest of a run dir)


def _newest(paths) -> Path | None:
    paths = [p for p in paths if p.is_file()]
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def requeued() -> bool:
    """Whether this process is a SLURM job that was requeued (preempted or timed out, then restarted)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def find_resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint ``trainer.fit`` starts from, or None for a fresh run.

    ``ckpt_path`` if given. With ``resume=true``: the newest ``last.ckpt`` or
    ``interrupted.ckpt`` of this run's own directory, else of the runs of this
    ``task_name``. A requeued SLURM job (``SLURM_RESTART_COUNT`` > 0) resumes from the
    newest of its own directory (also Lightning's ``hpc_ckpt_*.ckpt``) even without
    ``resume=true``: that is the job's earlier life.
    """
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    out = Path(cfg.paths.output_dir)
    # Lightning's own SLURM auto-requeue (USR1) writes hpc_ckpt_<n>.ckpt into the run dir
    own = _newest([*(out / "checkpoints" / name for name in RESUMABLE), *out.glob("hpc_ckpt_*.ckpt")])
    if requeued() and own is not None:
        return str(own)
    if not cfg.get("resume"):
        return None
    if own is not None:
        return str(own)
    runs = Path(cfg.paths.log_dir) / cfg.task_name
    newest = _newest(p for name in RESUMABLE for p in runs.glob(f"**/checkpoints/{name}"))
    if newest is None:
        raise FileNotFoundError(
            f"resume=true but no checkpoints/last.ckpt or interrupted.ckpt under {runs} "
            f"(task_name={cfg.task_name!r}); pass ckpt_path=<file> or start a fresh run with resume=false")
    return str(newest)


def preflight(cfg: DictConfig) -> str | None:
    """Check every place the run reads or writes before anything is built; return the checkpoint to start from.

    Output directories (``paths.output_dir`` and every callback's ``dirpath``) must be
    writable; the checkpoint to resume or test (``ckpt_path``, or the one ``resume=true``
    finds) must exist and hold the model the config builds (``recstab.lit.preflight``).
    """
    check_writable(cfg.paths.output_dir, "paths.output_dir")
    for name, node in (cfg.get("callbacks") or {}).items():
        if node and node.get("dirpath"):
            check_writable(node.dirpath, f"callbacks.{name}.dirpath")
    ckpt = find_resume_checkpoint(cfg) if cfg.get("train", True) else cfg.get("ckpt_path")
    if ckpt:
        key = "ckpt_path" if cfg.get("ckpt_path") else ("resume=true" if cfg.get("resume") else
                                                        "requeued job") + ": checkpoint"
        check_checkpoint(ckpt, OmegaConf.to_container(cfg.module, resolve=True), key)
    return ckpt


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
    ckpt = preflight(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)

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
            if ckpt:
                log.info("resuming from %s", ckpt)
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
            except SIGTERMException:  # preempted: on_exception wrote checkpoints/interrupted.ckpt
                log.warning("SIGTERM: stopped after step %d with a checkpoint in %s/checkpoints; continue "
                            "with resume=true (or ckpt_path=...)", trainer.global_step, cfg.paths.output_dir)
                return {}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if cfg.get("test", True):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            if not cfg.get("train", True):
                best = cfg.get("ckpt_path") or ""
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        for callback in callbacks:  # the final stability measurement, the sweeps' table measurements
            metrics.update(getattr(callback, "summary", dict)())
        publish_summary(loggers, metrics)  # the W&B run summary holds what metrics.json holds
    finally:
        finish_wandb()
    out = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=json_value))
    log.info("outputs in %s (final metrics in metrics.json)", out)
    return metrics
