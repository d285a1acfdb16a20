"""What the paper's tables measure, on the model as tested: a Lightning callback.

Every sweep in sweeps/ adds :class:`TableMeasurements` (``callbacks.measure``, from
sweeps/common/measure.yaml). After ``trainer.test`` — so it runs for training runs
(fit, then test the best checkpoint) and for evaluation runs (``train=false
ckpt_path=...``: Tables 7 and Fig. 12) alike — it measures, on rank 0:

- ``params``: number of parameters (Table 1);
- ``spectra``: the exact singular values of every conv (the operator on an n×n map, never
  the reshaped kernel): mean/max spectral norm σ₁ and the stable rank, also relative to its
  maximum, srank/(n²·min(c_in, c_out)) — the area under the normalised spectrum the paper
  draws (Tables 2, 3, 5–8);
- ``certificate``: the loop certificate L̂ and whether it certifies (L̂ < 1);
- ``trf``: the TRF stress test: verdict, extent, growth rate, |p| (Tables 2–8);
- ``onsets``: the long-video onset test on a long video (``video: long``) or on appendix H's
  scene-change sequences (``video: scenes``, ``repeats`` sequences pooled), optionally burst
  by burst (Fig. 9): 1st/9th deciles, number of instabilities and of feedback divergences,
  mean PSNR over the stream;

All of them are measured by :mod:`recstab.diagnostics.engine`, under its keys
(``spectra/*``, ``stability/*``, ``long/*``), the same the stability report and the
training callbacks log.
- ``fps``: frames per second at 448×256 on the current device, frame by frame as a video
  would be processed (Table 1);
- the device: ``CUDA_VISIBLE_DEVICES``, the CUDA devices torch sees, the device the model
  trained and tested on, Ray's GPU ids (one GPU per job under ``hydra/launcher=ray_gpu``).

Everything is evaluated with the module's evaluation dampening λ
(``hparams.dampening``) and refreshed normalised weights. ``dampening`` (the config's
``module.dampening``) is checked against the module's hparams before testing and wins
when they differ, so an evaluation sweep over λ (Table 7) measures the λ it asks for
even if the module came from a checkpoint's hyper-parameters.

Outputs in the run dir (``trainer.default_root_dir``): ``measurements.json`` (what
src/report.py reads, next to metrics.json), ``device.json`` (written as soon as the run
starts), ``measure/trf.png``, ``measure/onsets.png`` and ``measure/long_psnr.npy``;
the scalars also go to every logger (W&B, CSV) under ``split/name`` keys.

``debug``/``smoke``: under ``debug=smoke`` (``debug: ${hydra:runtime.choices.debug}``)
the sizes in ``smoke`` replace the paper's, so a whole sweep runs in a minute on a CPU.
A part that is off (null) stays off.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.nn.utils import parametrize

from recstab.diagnostics import engine
from recstab.models.dampening import evaluating
from recstab.models.interface import traits

log = logging.getLogger(__name__)


def merged(base: dict | None, update: dict | None) -> dict | None:
    """Deep-merge `update` into a copy of `base`; a part that is off (None) stays off."""
    if base is None:
        return None
    out = dict(base)
    for key, value in (update or {}).items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def device_info(pl_module: L.LightningModule | None = None) -> dict:
    """Which device this job sees and uses (what the Ray launcher's one-GPU-per-job test checks)."""
    info = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "hostname": platform.node(), "pid": os.getpid()}
    if pl_module is not None:
        info["device"] = str(pl_module.device)
        info["device_name"] = device_name(pl_module.device)
    try:
        import ray
        if ray.is_initialized():
            info["ray_gpu_ids"] = [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # not running under Ray
        pass
    return info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def measure_fps(model: torch.nn.Module, height: int = 256, width: int = 448, frames: int = 50,
                warmup: int = 5, channels: int | None = None) -> float:
    """Frames per second of ``model`` on ``frames`` frames of height×width output, one frame per call.

    Streamable models are fed frame by frame with the carried state (how a video is processed);
    bidirectional ones get the whole clip at once. For ×2 SR the input is height/2×width/2.
    """
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    c = channels or traits(model).in_channels
    scale = traits(model).scale
    x = torch.rand(1, warmup + frames, c, height // scale, width // scale, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    streaming = traits(model).streamable
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), parametrize.cached():
            if not streaming:
                model(x[:, :max(warmup, 1)])
                sync()
                start = time.perf_counter()
                model(x[:, warmup:])
                sync()
                return frames / (time.perf_counter() - start)
            state = None
            for t in range(warmup):
                _, state = model.process(x[:, t:t + 1], state)
            sync()
            start = time.perf_counter()
            for t in range(warmup, warmup + frames):
                _, state = model.process(x[:, t:t + 1], state)
            sync()
            return frames / (time.perf_counter() - start)
    finally:
        model.train(was_training)


class TableMeasurements(L.Callback):
    """Measure params, spectra, TRF, onsets and fps after testing (see the module docstring).

    Args:
        params: count the parameters.
        spectra_n: map size n of the exact conv spectra (None: off).
        certificate: the loop certificate L̂ (``stability/bound``, ``stability/certified``).
        trf: keyword arguments of ``temporal_receptive_field`` (frames, size, iters, lr, seed,
            threshold, growth_tol); None: off.
        onsets: ``video`` (long | scenes), ``sigma`` (0-255 scale), ``long_video`` (LongVideo
            kwargs), ``scenes`` (n_distinct, total_frames, size, repeats, split), and
            ``instability_onsets`` kwargs (chunk, seed, max_frames, burst, overlap); None: off.
        fps: height, width, frames, warmup of :func:`measure_fps`; None: off.
        dampening: the evaluation λ the config asks for (``${module.dampening}``); None: the module's.
        require_checkpoint: refuse to test without a checkpoint (``ckpt_path``): evaluation sweeps
            (Table 7, Fig. 12) would otherwise measure an untrained model.
        debug: the ``debug`` config choice; ``smoke`` applies the ``smoke`` sizes.
        smoke: sizes merged into spectra_n/trf/onsets/fps under debug=smoke.
    """

    def __init__(self, params: bool = True, spectra_n: int | None = 64, certificate: bool = True,
                 trf: dict | None = None,
                 onsets: dict | None = None, fps: dict | None = None, dampening: float | None = None,
                 require_checkpoint: bool = False, debug: str | None = None, smoke: dict | None = None):
        small = dict(smoke or {}) if debug == "smoke" else {}
        self.params = bool(params)
        self.certificate = bool(certificate)
        self.spectra_n = small.get("spectra_n", spectra_n) if spectra_n is not None else None
        self.trf = merged(trf, small.get("trf"))
        self.onsets = merged(onsets, small.get("onsets"))
        self.fps = merged(fps, small.get("fps"))
        if self.onsets is not None and self.onsets.get("video", "long") not in ("long", "scenes"):
            raise ValueError(f"onsets.video must be 'long' or 'scenes', got {self.onsets.get('video')!r}")
        self.dampening = None if dampening is None else float(dampening)
        self.require_checkpoint = bool(require_checkpoint)
        self.device: dict = {}
        self.results: dict = {}

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record_device(trainer, pl_module, "train")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.require_checkpoint and not trainer.ckpt_path:
            raise ValueError("this evaluation sweep tests a trained checkpoint: pass ckpt_path=<absolute path of "
                             "its .ckpt> (and the experiment= it was trained with)")
        hparams = getattr(pl_module, "hparams", {})
        if self.dampening is not None and "dampening" in hparams and float(hparams["dampening"]) != self.dampening:
            log.warning("module hparams say dampening=%s, the config asks for %s: testing with %s",
                        hparams["dampening"], self.dampening, self.dampening)
            hparams["dampening"] = self.dampening
        self._record_device(trainer, pl_module, "test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        out = Path(trainer.default_root_dir)
        model = pl_module.model
        refresh = getattr(pl_module, "_refresh_norms", None)
        if callable(refresh):
            refresh()
        hparams = getattr(pl_module, "hparams", {})
        dampening = float(hparams.get("dampening", 1.0)) if hasattr(hparams, "get") else 1.0
        was_training = model.training
        model.eval()
        results: dict = {"eval/dampening": dampening}
        extra: dict = {"device": self.device}
        try:
            with torch.inference_mode(False):
                if self.params:
                    results["params/count"] = float(sum(p.numel() for p in model.parameters()))
                if self.spectra_n:
                    measured = engine.conv_spectra(model, int(self.spectra_n))
                    results.update(measured.metrics())
                    extra["convs"] = measured.rows
                if self.certificate:
                    with evaluating(model, dampening):
                        cert = engine.certificate(model)
                    results.update(engine.certificate_metrics(cert))
                    extra["certificate"] = None if cert is None else {"bound": cert.bound, "norm": cert.norm}
                if self.trf is not None:
                    results.update(self._trf(model, dampening, out, extra))
                if self.onsets is not None:
                    results.update(self._onsets(model, dampening, out, extra))
                if self.fps is not None:
                    with torch.no_grad():
                        results["speed/fps"] = measure_fps(model, **self.fps)
                    extra["fps"] = {**self.fps, "device_name": device_name(pl_module.device)}
        finally:
            model.train(was_training)
        self.results = results
        (out / "measurements.json").write_text(json.dumps({"metrics": results, **extra}, indent=2,
                                                          default=engine.json_value))
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in results.items() if isinstance(v, float)}, step=trainer.global_step)
        log.info("table measurements: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()})

    # ------------------------------------------------------------------ parts
    def _record_device(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        info = device_info(pl_module)
        self.device = {**self.device, **{k: v for k, v in info.items() if k not in ("device", "device_name")},
                       f"{stage}_device": info["device"], "device_name": info["device_name"],
                       "world_size": trainer.world_size}
        if trainer.is_global_zero:
            Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer.default_root_dir) / "device.json").write_text(json.dumps(self.device, indent=2))

    def _trf(self, model, dampening: float, out: Path, extra: dict) -> dict:
        if not list(model.parameters()):
            return {}  # no network to diagnose (BM3D)
        trf = engine.trf(model, dampening=dampening, **self.trf)
        trf.save_png(out / "measure" / "trf.png")
        extra["trf"] = {"verdict": trf.verdict, "extent": trf.extent, "reason": trf.reason, **self.trf}
        return engine.trf_metrics(trf)

    def _onsets(self, model, dampening: float, out: Path, extra: dict) -> dict:
        cfg = dict(self.onsets)
        burst = cfg.get("burst")
        if not traits(model).streamable and burst is None:
            extra["onsets"] = {"skipped": "bidirectional model: no streaming onset test"}
            return {}
        kwargs = {k: cfg[k] for k in ("chunk", "seed", "max_frames", "burst", "overlap") if k in cfg}
        sigma = float(cfg.get("sigma", 30.0)) / 255
        channels = traits(model).in_channels
        runs = []
        if cfg.get("video", "long") == "long":
            from recstab.data.long_video import LongVideo
            lv = dict(cfg.get("long_video") or {})
            if lv.get("gray") is None:
                lv["gray"] = channels == 1
            video = LongVideo(**lv)
            video.probe()
            runs.append(engine.onsets(model, video, sigma, dampening=dampening, **kwargs))
        else:
            from recstab.data.synthetic import synthetic_scene_changes
            sc = dict(cfg.get("scenes") or {})
            total = int(sc.get("total_frames", 2048))
            n = min(int(sc.get("n_distinct", 1)), total)  # smoke sequences are shorter than n
            for r in range(int(sc.get("repeats", 1))):
                video = synthetic_scene_changes(n, total, int(sc.get("size", 64)), channels,
                                                seed=int(sc.get("seed", 0)) + r, split=sc.get("split", "test"))
                runs.append(engine.onsets(model, video, sigma, dampening=dampening,
                                          **{**kwargs, "seed": int(kwargs.get("seed", 0)) + r}))
        onsets = [o for run in runs for o in run.onsets]
        (out / "measure").mkdir(parents=True, exist_ok=True)
        np.save(out / "measure" / "long_psnr.npy", runs[0].psnr)
        runs[0].save_png(out / "measure" / "onsets.png")
        extra["onsets"] = {"onsets": [int(o) for o in onsets], "sequences": len(runs),
                           "frames": int(sum(run.frames for run in runs)), **cfg}
        metrics = engine.onset_metrics(runs)
        metrics["long/fps"] = float(np.mean([run.fps for run in runs]))  # per sequence, as the tables report it
        return metrics
