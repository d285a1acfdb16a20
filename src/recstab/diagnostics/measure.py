"""One measurement of a model's stability: ``measure(model, spec) -> Measurements``.

Every caller measures through this function with a :class:`MeasureSpec` chosen once, the
``diagnostics`` config group (``conf/diagnostics/{cpu,paper,smoke}.yaml``):

- the training monitor (:class:`recstab.lit.stability_callbacks.StabilityMonitor`): the spec's
  certificate, TRF and λ₁ at validations, the whole spec at the end of training;
- ``src/diagnose.py`` (:func:`recstab.diagnostics.stability_report`): the whole spec, written
  section by section, resumable;
- the sweeps' end-of-run measurements (:class:`recstab.report.TableMeasurements`): the whole
  spec on the tested weights; the row's verdict is this measurement's;
- ``src/stabilise.py``: certificate, TRF and λ₁ before and after.

So a verdict always sits next to the numbers it was decided on, under one key namespace
(``spectra/*``, ``stability/*``, ``long/*``: :mod:`recstab.diagnostics.engine`), decided by one
rule (:func:`recstab.diagnostics.engine.decide`).

Sections, in order: ``spectra`` (exact conv spectra on n×n), ``certificate`` (the loop
certificate L̂), ``trf`` (the TRF stress test), ``lyapunov`` (λ₁ of the state on the first
frames of the stream), ``onsets`` (the long-video onset test). A section the spec leaves out
(``None`` / false) is not run; a section that raises is recorded (``errors``) and the others
still run. Nothing here logs to W&B or writes files except the resumable work files of a
``workdir`` (``trf.pt``, ``trf_progress.pt``, ``onsets_progress.pt``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from recstab.diagnostics import engine
from recstab.diagnostics.onsets import BurstProcessor
from recstab.diagnostics.workfiles import ResumeMismatch, mismatch, model_fingerprint  # noqa: F401 (ResumeMismatch: public here)
from recstab.models.dampening import evaluating
from recstab.models.interface import traits

log = logging.getLogger(__name__)

SECTIONS = ("spectra", "certificate", "trf", "lyapunov", "onsets")


@dataclass
class MeasureSpec:
    """What to measure and at what size (one ``conf/diagnostics/*.yaml``). ``None`` turns a section off."""

    name: str = "cpu"                       # the preset's name (recorded with the measurements)
    spectra_n: int | None = 64              # exact conv spectra on an n×n map
    certificate: bool = True                # the loop certificate L̂ (a theorem when < 1)
    trf: dict | None = field(default_factory=lambda: {"frames": 81, "size": 32, "iters": 50})
    lyapunov: dict | None = field(default_factory=lambda: {"frames": 120, "size": 32, "burn_in": 20})
    onsets: dict | None = field(default_factory=lambda: {"max_frames": 600, "chunk": 16, "seed": 0})
    extra: dict = field(default_factory=dict)  # name -> a diagnostic of your own (see Diagnostic), run last

    def __post_init__(self) -> None:
        from omegaconf import DictConfig, OmegaConf

        from recstab.diagnostics.lyapunov import lyapunov_exponent
        from recstab.diagnostics.trf import temporal_receptive_field

        if self.spectra_n is not None and (isinstance(self.spectra_n, bool) or int(self.spectra_n) != self.spectra_n
                                           or self.spectra_n < 1):
            raise ValueError(f"spectra_n must be an int >= 1 or null (off), got {self.spectra_n!r}")
        # the settings a preset may hold (the rest is the caller's: model, input, noise, dampening, files)
        allowed = {"trf": set(inspect_parameters(temporal_receptive_field)) - {"model", "dampening", "device",
                                                                             "progress", "resume", "context",
                                                                             "on_progress"},
                   "lyapunov": set(inspect_parameters(lyapunov_exponent)) - {"model", "sigma", "dampening", "device"}
                   | {"size"},
                   "onsets": {"chunk", "seed", "max_frames", "prefetch", "progress_every"}}
        for key, known in allowed.items():
            settings = getattr(self, key)
            if settings is None:
                continue
            if isinstance(settings, DictConfig):  # instantiated by Hydra without _convert_
                settings = OmegaConf.to_container(settings, resolve=True)
            if not isinstance(settings, dict):
                raise ValueError(f"diagnostics.{key} must be a mapping of settings or null (off), got {settings!r}")
            setattr(self, key, dict(settings))
            unknown = sorted(set(settings) - known)
            if unknown:
                raise ValueError(f"diagnostics.{key}: unknown setting(s) {', '.join(unknown)}; "
                                 f"valid: {', '.join(sorted(known))}")
        self.extra = dict(self.extra or {})
        for key, diagnostic in self.extra.items():
            if key in SECTIONS or not callable(diagnostic):
                raise ValueError(f"diagnostics.extra.{key}: a diagnostic is a callable (model, measurements) -> "
                                 f"metrics, named other than {', '.join(SECTIONS)}; got {diagnostic!r}")
        if self.lyapunov is not None and int(self.lyapunov.get("frames", 120)) < 2:
            raise ValueError(f"diagnostics.lyapunov.frames must be >= 2 (or lyapunov: null), got "
                             f"{self.lyapunov.get('frames')}")

    def only(self, *sections: str) -> MeasureSpec:
        """The same spec with every section but ``sections`` (built-in or extra) turned off."""
        bad = sorted(set(sections) - set(SECTIONS) - set(self.extra))
        if bad:
            raise ValueError(f"unknown section(s) {bad}; valid: {', '.join([*SECTIONS, *self.extra])}")
        off = {"spectra": {"spectra_n": None}, "certificate": {"certificate": False}, "trf": {"trf": None},
               "lyapunov": {"lyapunov": None}, "onsets": {"onsets": None}}
        changes = {k: v for s in SECTIONS if s not in sections for k, v in off[s].items()}
        return dataclasses.replace(self, **changes, extra={k: v for k, v in self.extra.items() if k in sections})

    def runs(self, section: str) -> bool:
        return {"spectra": self.spectra_n is not None, "certificate": bool(self.certificate),
                "trf": self.trf is not None, "lyapunov": self.lyapunov is not None,
                "onsets": self.onsets is not None}.get(section, section in self.extra)


class Diagnostic:
    """A diagnostic of your own: one class plus one config entry, ``diagnostics.extra.<name>``.

    ``__call__(model, measurements) -> dict`` runs after the built-in sections (it may read their
    results: ``measurements.certificate``, ``.trf``, ...) and returns scalar metrics, which land in
    ``Measurements.metrics`` under ``<name>/<key>``. It informs; the verdict stays the one rule's.
    Subclassing is optional: any callable with that signature does.
    """

    def __call__(self, model: nn.Module, measurements: "Measurements") -> dict:
        raise NotImplementedError


def inspect_parameters(function) -> list[str]:
    import inspect
    return list(inspect.signature(function).parameters)


def as_spec(spec) -> MeasureSpec:
    """A :class:`MeasureSpec` from a spec, a config dict (with or without ``_target_``) or None (the defaults)."""
    from omegaconf import DictConfig, OmegaConf

    if spec is None:
        return MeasureSpec()
    if isinstance(spec, MeasureSpec):
        return spec
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, dict):
        raise ValueError(f"diagnostics must be a MeasureSpec or its config, got {spec!r}")
    spec = {k: v for k, v in spec.items() if k != "_target_"}
    if spec.get("extra"):  # diagnostics of your own, given by their config (_target_)
        import hydra
        spec["extra"] = {k: hydra.utils.instantiate(v, _convert_="all") if isinstance(v, dict) and "_target_" in v
                         else v for k, v in spec["extra"].items()}
    fields = {f.name for f in dataclasses.fields(MeasureSpec)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise ValueError(f"diagnostics: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    return MeasureSpec(**spec)


@dataclass
class Measurements:
    """The results of one :func:`measure` call, its verdict and the reasons behind it."""

    spec: MeasureSpec
    spectra: object | None = None           # engine.ConvSpectra
    certificate: object | None = None       # recstab.models.certificate.LoopCertificate
    trf: object | None = None               # recstab.diagnostics.trf.TRFResult
    lyapunov: object | None = None          # recstab.diagnostics.lyapunov.LyapunovResult
    lyapunov_on: str | None = None          # what λ₁ was measured on, in words
    onsets: list = field(default_factory=list)  # OnsetResult per stream (pooled in the metrics)
    verdict: str = "inconclusive"
    notes: list = field(default_factory=list)
    sections: dict = field(default_factory=dict)  # section -> {"status": done|skipped: why|failed, "seconds", "error"}
    finite_memory: int | None = None        # burst length when the model was measured burst by burst
    extra: dict = field(default_factory=dict)  # name -> the metrics of a diagnostic of your own
    input: dict = field(default_factory=dict)  # the video as the model sees it (check_input): frames, size, notes

    def decide(self) -> None:
        """(Re)compute the verdict and the notes from what is measured (:func:`engine.decide`)."""
        onset = None
        if self.onsets:  # the stream with a feedback divergence decides; else the one with most onsets
            onset = max(self.onsets, key=lambda r: (r.diverged, r.n_onsets))
        self.verdict, self.notes = engine.decide(self.certificate, self.trf, onset, self.lyapunov,
                                                 measured_on=self.lyapunov_on, finite_memory=self.finite_memory)
        for key, info in self.sections.items():
            if info["status"] == "failed":
                self.notes.append(f"section {key} FAILED: {info['error']}")

    @property
    def metrics(self) -> dict:
        """Flat scalars, one namespace: ``spectra/*``, ``stability/*``, ``long/*`` (see :mod:`.engine`)."""
        out = engine.verdict_metrics(self.verdict)
        if self.spectra is not None:
            out.update(self.spectra.metrics())
        out.update(engine.certificate_metrics(self.certificate))
        if self.trf is not None:
            out.update(engine.trf_metrics(self.trf))
        out.update(engine.lyapunov_metrics(self.lyapunov))
        if self.onsets:
            out.update(engine.onset_metrics(self.onsets))
        for name, values in self.extra.items():
            out.update({f"{name}/{key}": float(value) for key, value in values.items()})
        return out

    def summary(self) -> dict:
        """The metrics and the words: ``stability/verdict``, ``stability/trf_verdict``, ``stability/norm``."""
        words = {"stability/verdict": self.verdict, "stability/diagnostics": self.spec.name}
        if self.trf is not None:
            words["stability/trf_verdict"] = self.trf.verdict
        if self.certificate is not None:
            words["stability/norm"] = self.certificate.norm
        return {**self.metrics, **words}


def measure(model: nn.Module, spec=None, *, clean_frames=None, sigma: float = 30 / 255, task: str | None = None,
            dampening: float | None = None, burst: int | None = None, overlap: int = 0,
            onset_streams: list | None = None, workdir: str | Path | None = None, resume: bool = False,
            done: Measurements | None = None, progress: bool = False,
            on_section: Callable[[str, Measurements], None] | None = None) -> Measurements:
    """Measure `model` as `spec` says (see the module docstring) and decide its verdict.

    Args:
        model: an nn.Module with ``model(x)`` (and ``process`` for λ₁ and the onsets); a
            :class:`~recstab.models.interface.VideoModel` also gets a loop certificate.
        spec: a :class:`MeasureSpec`, its config, or None (the defaults: the ``cpu`` preset).
        clean_frames: an iterable of clean C×H×W frames (e.g. a LongVideo): λ₁'s clip (its first
            frames) and the onset test's stream. None: λ₁ on random frames, no onset test.
        sigma, task: the degradation of λ₁'s clip and of the onset stream (sigma on the [0, 1] scale).
        dampening: measure with feature dampening λ (appendix F); None: the model's own.
        burst, overlap: measure the model run burst by burst (appendix E).
        onset_streams: several streams for the onset test, pooled (default ``[clean_frames]``).
        workdir: folder of the resumable work files (``trf.pt``: the TRF's result, reused on resume
            when its settings are these; ``trf_progress.pt``: a TRF search in progress, continued on
            resume; ``onsets_progress.pt``).
        resume: continue from the work files.
        done: measurements already made (sections with status done are not measured again).
        on_section: called after every section with its name and the measurements so far.
        progress: log each section's estimated cost before it starts and show a progress bar over the
            whole measurement in estimated seconds (its ETA), for the command-line tools.
    """
    spec = as_spec(spec)
    task = task or traits(model).task
    result = done if done is not None else Measurements(spec)
    result.spec, result.finite_memory = spec, burst
    workdir = None if workdir is None else Path(workdir)
    streams = list(onset_streams) if onset_streams is not None else ([clean_frames] if clean_frames is not None
                                                                      else [])

    # the video against the model and the spec: what it cannot measure is skipped, saying why (the scripts
    # call check_input strict first, so that a user gets one line before anything starts)
    result.input = check_input(model, spec, streams[0] if streams else None, task=task, burst=burst, strict=False)
    for note in result.input.get("notes", []):
        log.warning("input: %s", note)

    # a resumed TRF must be this model's, at these settings: refused before anything is measured
    trf_id = trf_key(model, spec.trf, dampening, burst, overlap) if spec.trf is not None else None
    saved_trf = _load_trf(workdir, trf_id) if resume and workdir is not None and trf_id is not None else None

    def spectra():
        result.spectra = engine.conv_spectra(model, int(spec.spectra_n))

    def certificate():
        result.certificate = engine.certificate(model)
        if result.certificate is None:
            return "skipped: the model is not a VideoModel (no loop structure stated)"

    def trf():
        if not list(model.parameters()):
            return "skipped: the model has no parameters (nothing to search)"
        result.trf = saved_trf
        if result.trf is None:
            work = workdir / "trf_progress.pt" if workdir is not None else None
            result.trf = engine.trf(subject, **spec.trf, progress=work, resume=resume,
                                    context={"burst": burst, "overlap": overlap}, on_progress=advance)
            if workdir is not None:
                torch.save({"key": trf_id, "result": _fields(result.trf)}, workdir / "trf.pt")

    def lyapunov():
        if "lyapunov" in result.input.get("refused", {}):
            return f"skipped: {result.input['refused']['lyapunov']}"
        if burst is not None:
            return "skipped: burst-by-burst processing resets the state (finite memory)"
        if not traits(model).streamable:
            return "skipped: the model is bidirectional (no forward recurrence to measure)"
        settings = dict(spec.lyapunov)
        frames, size = int(settings.pop("frames", 120)), settings.pop("size", 32)
        seed = int((spec.onsets or {}).get("seed", 0))
        clip = engine.lyapunov_input(model, clean_frames, frames, sigma=sigma, task=task, seed=seed, size=size)
        result.lyapunov_on = clip.description
        result.lyapunov = engine.lyapunov(model, clip.clip, **settings)

    def onsets():
        if not streams:
            return "skipped: no video given"
        if "onsets" in result.input.get("refused", {}):
            return f"skipped: {result.input['refused']['onsets']}"
        if burst is None and not traits(model).streamable:
            return "skipped: the model is bidirectional (not streamable); measure it burst by burst"
        settings = dict(spec.onsets)
        result.onsets = []
        for i, stream in enumerate(streams):
            progress = workdir / ("onsets_progress.pt" if i == 0 else f"onsets_progress_{i}.pt") if workdir else None
            seed = int(settings.get("seed", 0)) + i
            share = lambda fraction, i=i: advance((i + fraction) / len(streams))  # noqa: E731
            result.onsets.append(engine.onsets(model, stream, sigma, task=task, burst=burst, overlap=overlap,
                                               progress=progress, resume=resume, on_progress=share,
                                               **{**settings, "seed": seed}))

    runners = {"spectra": spectra, "certificate": certificate, "trf": trf, "lyapunov": lyapunov, "onsets": onsets}
    for name, diagnostic in spec.extra.items():
        runners[name] = lambda diagnostic=diagnostic, name=name: result.extra.__setitem__(name, dict(
            diagnostic(subject, result)))
    todo = [k for k in [*SECTIONS, *spec.extra]
            if spec.runs(k) and result.sections.get(k, {}).get("status") != "done"]
    with evaluating(model, dampening):
        subject = BurstProcessor(model, burst, overlap) if burst is not None else model
        cost = estimate_seconds(model, spec, todo, streams) if progress else {}
        bar = _progress_bar(cost, spec.name) if progress else None
        done_seconds, current = 0.0, {"key": None}

        def advance(fraction: float) -> None:
            """The running section is ``fraction`` done: the bar moves within its estimated share."""
            if bar is not None and current["key"] is not None:
                bar.n = done_seconds + min(1.0, max(0.0, fraction)) * cost.get(current["key"], 0.0)
                bar.refresh()

        for key in [*SECTIONS, *spec.extra]:
            current["key"] = key
            if not spec.runs(key):
                result.sections[key] = {"status": f"skipped: not in the diagnostics spec ({spec.name})", "seconds": 0.0}
                continue
            if result.sections.get(key, {}).get("status") == "done":
                continue
            if bar is not None:
                bar.set_postfix_str(key)
                log.info("measuring %s: about %s", key, _duration(cost.get(key, 0.0)))
            start = time.perf_counter()
            try:
                status = runners[key]() or "done"
                result.sections[key] = {"status": status, "seconds": time.perf_counter() - start}
            except Exception as error:  # recorded; the other sections still run
                log.error("measurement %s failed: %s", key, error, exc_info=True)
                result.sections[key] = {"status": "failed", "seconds": time.perf_counter() - start,
                                        "error": f"{type(error).__name__}: {error}"}
            result.decide()
            done_seconds += cost.get(key, 0.0)
            if bar is not None:
                bar.n = done_seconds
                bar.refresh()
            if on_section is not None:
                on_section(key, result)
        if bar is not None:
            bar.close()
    result.decide()
    return result


def check_input(model: nn.Module, spec: MeasureSpec, stream, *, task: str | None = None,
                burst: int | None = None, strict: bool = True) -> dict:
    """The video as the model will see it, checked before anything is measured.

    Returns {"frames", "frame_size" (H, W), "channels", "notes", "refused"}: ``notes`` say, in words,
    every conversion the measurement makes (they go into the report):

    - greyscale frames (R = G = B) into an RGB model: fed as they are, grey on three channels;
    - frames converted to one luma channel (``LongVideo(gray=True)``) for a 1-channel model;
    - a frame size that is not a multiple of the SR scale: cropped to one (top-left);
    - a video shorter than λ₁'s clip: λ₁ on the frames there are (a plain mean when few).

    Refused (ValueError naming the value and what is valid): frames whose channels differ from the
    model's (3 into 1: ``long_video.gray=true`` converts; 1 into 3: decode as RGB), a video shorter than
    λ₁'s burn-in plus the frames its error bar needs, or than the burst window. ``strict=False`` (what
    :func:`measure` does, so that a training monitor never dies of its video) returns the refusals in
    ``refused`` ({section: why}) and those sections are skipped with that reason; the
    scripts call it strict before anything starts. A one-shot iterator is not read (nothing can be
    checked without consuming it).
    """
    from recstab.data.degradations import Degradation
    from recstab.diagnostics.lyapunov import BATCHES, BURN_IN

    if stream is None:
        return {}
    try:
        frames = len(stream)
    except TypeError:
        frames = None
    out: dict = {"frames": frames, "notes": [], "refused": {}}

    def refuse(section: str, message: str) -> None:
        if strict:
            raise ValueError(message)
        out["refused"][section] = message
    first = None
    if iter(stream) is not stream:
        first = next(iter(stream), None)
        if first is not None and not torch.is_tensor(first):
            first = torch.as_tensor(first)
    if first is not None:
        if first.dim() == 4 and first.shape[0] == 1:
            first = first[0]
        c, h, w = (int(n) for n in first.shape[-3:])
        out.update(channels=c, frame_size=[h, w])
        model_c = traits(model).in_channels
        if c != model_c:
            how = ("convert to luma with long_video.gray=true (LongVideo(..., gray=True))" if c == 3 and model_c == 1
                   else "decode the video as RGB (long_video.gray=false)" if c == 1 and model_c == 3
                   else f"give frames of {model_c} channels")
            message = f"the video's frames have {c} channel(s), the model expects {model_c}: {how}"
            refuse("lyapunov", message)
            refuse("onsets", message)
        if getattr(stream, "gray", False):
            out["notes"].append("the video is converted to one luma channel (BT.601) for the 1-channel model")
        elif c == 3 and bool((first[0] == first[1]).all() and (first[1] == first[2]).all()):
            out["notes"].append("the video is greyscale (R = G = B in its first frame): the RGB model is fed "
                                "grey frames on its three channels")
        scale = Degradation(task or traits(model).task, 0.0).scale
        if h % scale or w % scale:
            out["notes"].append(f"frames of {h}×{w} are cropped to {h - h % scale}×{w - w % scale} "
                                f"(a multiple of the SR scale {scale})")
    if frames is not None and spec.lyapunov is not None and burst is None:
        burn_in, batches = int(spec.lyapunov.get("burn_in", BURN_IN)), int(spec.lyapunov.get("batches", BATCHES))
        clip = int(spec.lyapunov.get("frames", 120))
        used = min(frames, clip)
        if used < burn_in + batches:
            refuse("lyapunov", f"λ₁ needs at least {burn_in + batches} frames (a burn-in of {burn_in}, then {batches} "
                             f"for its error bar), the video has {frames} and diagnostics.lyapunov.frames is {clip}: "
                             "give a longer video, loop it (long_video.loop_to=<frames>), lower "
                             "diagnostics.lyapunov.burn_in, or set diagnostics.lyapunov=null")
        elif frames < clip:
            out["notes"].append(f"λ₁ is measured on the video's {frames} frames (diagnostics.lyapunov.frames "
                                f"asks for {clip})")
        if burn_in + batches <= used < burn_in + 3 * batches:
            out["notes"].append(f"λ₁ is fitted on {used - burn_in} frames after the burn-in (fewer than "
                                f"{3 * batches}): a plain mean, no fit of a transient")
    if frames is not None and burst is not None and frames < burst:
        refuse("onsets", f"the video has {frames} frames, shorter than the burst window (burst={burst}): give a "
                         "longer video or a smaller burst")
    return out


def estimate_seconds(model: nn.Module, spec: MeasureSpec, sections, streams=()) -> dict:
    """Rough wall time of each section, from one timed model step on this device: TRF ≈ iters × frames ×
    3 steps (forward and backward) at its size, λ₁ ≈ 3 steps per frame (forward and a JVP), the onset test
    ≈ 1.5 steps per frame at the stream's frame size; spectra and the certificate ≈ an FFT per conv."""
    def step_seconds(side: int) -> float:
        param = next(iter(model.parameters()), None)
        x = torch.rand(1, 2, traits(model).in_channels, side, side, device=param.device if param is not None else "cpu")
        with torch.no_grad():
            model(x[:, :1])
            start = time.perf_counter()
            model(x)
        return (time.perf_counter() - start) / 2

    out, convs = {}, sum(isinstance(m, nn.Conv2d) for m in model.modules())
    try:
        for key in sections:
            if key == "trf":
                out[key] = 3 * spec.trf.get("iters", 500) * spec.trf.get("frames", 81) * step_seconds(
                    int(spec.trf.get("size", 64)))
            elif key == "lyapunov":
                out[key] = 3 * spec.lyapunov.get("frames", 120) * step_seconds(int(spec.lyapunov.get("size") or 64))
            elif key == "onsets":
                frames = spec.onsets.get("max_frames") or sum(_length(s) for s in streams) or 1000
                side = int(math.sqrt(144 * 176))  # the bundled clips' frame size; videos of your own vary
                out[key] = 1.5 * frames * step_seconds(side)
            else:
                out[key] = 0.05 * convs * (1 + (spec.spectra_n or 0) / 64) ** 2
    except Exception:  # an estimate never stops a measurement
        log.debug("no time estimate", exc_info=True)
    return out


def _length(stream) -> int:
    try:
        return len(stream)
    except TypeError:
        return 0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _progress_bar(cost: dict, name: str):
    from tqdm.auto import tqdm
    total = sum(cost.values())
    log.info("diagnostics preset %s: about %s in all (%s)", name, _duration(total),
             ", ".join(f"{k} {_duration(v)}" for k, v in cost.items()))
    return tqdm(total=total, unit="s", desc=f"diagnostics ({name})", bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                "{n:.0f}/{total:.0f} est. s [{elapsed}<{remaining}{postfix}]", dynamic_ncols=True)


def _fields(result) -> dict:
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}


def trf_key(model: nn.Module, settings: dict, dampening, burst, overlap) -> dict:
    """What a TRF result depends on: the weights (their hash), the dampening, the burst processing, the settings."""
    return {"model": model_fingerprint(model), "dampening": traits(model).dampening if dampening is None
            else float(dampening), "burst": burst, "overlap": overlap, **dict(settings)}


def _load_trf(workdir: Path, key: dict):
    """The TRF result a killed run left in ``workdir``; refused (ResumeMismatch) when it measured something else."""
    from recstab.diagnostics.trf import TRFResult

    path = workdir / "trf.pt"
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=False)  # written by measure() itself, next to the report
    old = saved.get("key") or {"settings": saved.get("settings")}
    named = mismatch(old, key)
    if named:
        raise ResumeMismatch(f"{path} holds the TRF of another measurement ({named}); it is not reused. Resume "
                             "in the folder of this model's diagnosis, or start afresh (resume=false).")
    try:
        return TRFResult(**saved["result"])
    except TypeError:  # written by another version of TRFResult
        return None
