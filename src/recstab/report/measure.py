"""What the paper's tables measure, on the model as tested: a Lightning callback.

Every sweep in sweeps/ adds :class:`TableMeasurements` (``callbacks.measure``, from
sweeps/common/measure.yaml). After ``trainer.test`` — so it runs for training runs
(fit, then test the best checkpoint) and for evaluation runs (``train=false
ckpt_path=...``: Tables 7 and Fig. 12) alike — it measures, on rank 0:

- ``params``: number of parameters (Table 1);
- one :func:`recstab.diagnostics.measure` of the tested weights with the ``diagnostics`` spec
  (the preset every caller uses: ``conf/diagnostics/``): exact conv spectra, the loop
  certificate L̂, the TRF stress test, λ₁ and the onset test — on a long video (``video: long``)
  or on appendix H's scene-change sequences (``video: scenes``, ``repeats`` sequences pooled),
  optionally burst by burst (Fig. 9) — and the verdict decided on exactly these numbers. The
  row's verdict and its TRF/λ₁/onset columns in ``src/report.py`` are this measurement's;
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
the scalars also go to every logger (W&B, CSV) under ``split/name`` keys
(:mod:`recstab.lit.publish`).

``debug``/``smoke``: under ``debug=smoke`` (``debug: ${hydra:runtime.choices.debug}``) the
``diagnostics`` preset is ``smoke`` and the scene sequences, long video and fps clip shrink to
the ``smoke`` sizes, so a whole sweep runs in a minute on a CPU.
"""

from __future__ import annotations

import dataclasses
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
from recstab.diagnostics.measure import as_spec, measure
from recstab.lit.publish import publish_image, publish_metrics
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
    """What a paper table measures after testing: one :func:`recstab.diagnostics.measure` of the tested
    weights (the ``diagnostics`` spec), plus params and fps (see the module docstring).

    Args:
        diagnostics: the :class:`~recstab.diagnostics.MeasureSpec` (or its config): spectra, certificate,
            TRF, λ₁ and the onset test's sizes, the same for every caller.
        params: count the parameters.
        video: what the onset test streams: ``long`` (``long_video``, a LongVideo) or ``scenes``
            (appendix H's scene-change sequences, ``scenes``; ``repeats`` sequences, pooled).
        long_video: :class:`recstab.data.long_video.LongVideo` keyword arguments (the long_video group).
        scenes: n_distinct, total_frames, size, repeats, seed, split of
            :func:`recstab.data.synthetic.synthetic_scene_changes`.
        sigma: noise std on the 0-255 scale (the task's).
        burst, overlap: measure the model run burst by burst (appendix E, Fig. 9).
        fps: height, width, frames, warmup of :func:`measure_fps`; None: off.
        dampening: the evaluation λ the config asks for (``${module.dampening}``); None: the module's.
        require_checkpoint: refuse to test without a checkpoint (``ckpt_path``): evaluation sweeps
            (Table 7, Fig. 12) would otherwise measure an untrained model.
        debug: the ``debug`` config choice; ``smoke`` merges ``smoke`` into scenes/long_video/fps.
        smoke: smaller ``scenes``, ``long_video`` and ``fps`` under debug=smoke (the spec has its own preset).
    """

    def __init__(self, diagnostics=None, params: bool = True, video: str = "long", long_video: dict | None = None,
                 scenes: dict | None = None, sigma: float = 30.0, burst: int | None = None, overlap: int = 0,
                 fps: dict | None = None, dampening: float | None = None, require_checkpoint: bool = False,
                 debug: str | None = None, smoke: dict | None = None):
        if video not in ("long", "scenes"):
            raise ValueError(f"video must be 'long' or 'scenes', got {video!r}")
        if not 0 <= sigma <= 255:
            raise ValueError(f"sigma is on the 0-255 scale (e.g. 30), got {sigma}")
        small = dict(smoke or {}) if debug == "smoke" else {}
        self.spec = as_spec(diagnostics)
        self.params = bool(params)
        self.video = video
        self.long_video = merged(dict(long_video or {}), small.get("long_video"))
        self.scenes = merged(dict(scenes or {}), small.get("scenes"))
        self.sigma = float(sigma)
        self.burst, self.overlap = burst, int(overlap)
        self.fps = merged(fps, small.get("fps"))
        self.dampening = None if dampening is None else float(dampening)
        self.require_checkpoint = bool(require_checkpoint)
        self.device: dict = {}
        self.results: dict = {}
        self.measurements = None

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
        try:
            with torch.inference_mode(False):
                if self.params:
                    results["params/count"] = float(sum(p.numel() for p in model.parameters()))
                spec = self.spec if list(model.parameters()) else self.spec.only("certificate", "onsets")
                streams = self._streams(model) if spec.onsets is not None or spec.lyapunov is not None else []
                self.measurements = m = measure(model, spec, clean_frames=streams[0] if streams else None,
                                                onset_streams=streams if spec.onsets is not None else None,
                                                sigma=self.sigma / 255, dampening=dampening,
                                                burst=self.burst, overlap=self.overlap, progress=True)
                results.update(m.summary())
                if self.fps is not None:
                    with torch.no_grad():
                        results["speed/fps"] = measure_fps(model, **self.fps)
        finally:
            model.train(was_training)
        self.results = results
        files = self._write_figures(trainer, m, out)
        extra = {"verdict": m.verdict, "notes": m.notes, "sections": m.sections, "device": self.device,
                 "diagnostics": dataclasses.asdict(m.spec), "convs": m.spectra.rows if m.spectra else [],
                 "certificate": None if m.certificate is None else {"bound": m.certificate.bound,
                                                                     "norm": m.certificate.norm},
                 "trf": None if m.trf is None else {"verdict": m.trf.verdict, "extent": m.trf.extent,
                                                    "reason": m.trf.reason},
                 "onsets": {"onsets": [int(o) for r in m.onsets for o in r.onsets], "sequences": len(m.onsets),
                            "frames": int(sum(r.frames for r in m.onsets)), "video": self.video,
                            "burst": self.burst, "overlap": self.overlap} if m.onsets else None,
                 "fps": None if self.fps is None else {**self.fps, "device_name": device_name(pl_module.device)},
                 "files": {k: str(v) for k, v in files.items()}}
        (out / "measurements.json").write_text(json.dumps({"metrics": results, **extra}, indent=2,
                                                          default=engine.json_value))
        publish_metrics(trainer, results, trainer.global_step)
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

    def _streams(self, model) -> list:
        """The onset test's stream(s): the long video, or ``repeats`` scene-change sequences."""
        channels = traits(model).in_channels
        if self.video == "long":
            from recstab.data.long_video import LongVideo
            lv = dict(self.long_video)
            if lv.get("gray") is None:
                lv["gray"] = channels == 1
            video = LongVideo(**lv)
            video.probe()
            return [video]
        from recstab.data.synthetic import synthetic_scene_changes
        sc = self.scenes
        total = int(sc.get("total_frames", 2048))
        n = min(int(sc.get("n_distinct", 1)), total)  # smoke sequences are shorter than n
        return [synthetic_scene_changes(n, total, int(sc.get("size", 64)), channels, seed=int(sc.get("seed", 0)) + r,
                                        split=sc.get("split", "test")) for r in range(int(sc.get("repeats", 1)))]

    def _write_figures(self, trainer: L.Trainer, m, out: Path) -> dict:
        files = {}
        if m.trf is not None:
            files["trf"] = m.trf.save_png(out / "measure" / "trf.png")
            publish_image(trainer, "measure/trf", files["trf"], trainer.global_step)
        if m.onsets:
            (out / "measure").mkdir(parents=True, exist_ok=True)
            np.save(out / "measure" / "long_psnr.npy", m.onsets[0].psnr)
            files["onsets"] = m.onsets[0].save_png(out / "measure" / "onsets.png")
            publish_image(trainer, "measure/onsets", files["onsets"], trainer.global_step)
        return files
