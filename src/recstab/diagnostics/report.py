"""The one-page stability report: every diagnosis of the paper on one model, and a verdict.

Sections, in the order they run (one :func:`recstab.diagnostics.measure` call, the spec a
``diagnostics`` preset):

0. the input check: every file of the long video is opened and its first and last frame
   decoded (:meth:`LongVideo.probe`) before anything long runs; unreadable files are
   skipped with a warning and listed, and when none is readable the report stops here,
   naming every file and why;
1. ``spectra``: the exact singular-value spectrum of every conv (the operator on an n×n map
   with circular padding, by FFT, never the reshaped kernel): ‖W‖₂ and the stable rank;
2. ``certificate``: the loop certificate L̂ (``recstab.diagnostics.loop_certificate``), a
   proven bound of the recurrence map in the fed-back state, in a stated norm;
3. ``trf``: the TRF stress test, a gradient-ascent search for a diverging sequence; when it
   finds one its input X (and the outputs Y) is saved to ``trf_unbounded_sequence.pt`` and
   replayed, so the proof can be checked by anyone: ``model(torch.load(f)["inputs"][None])``;
4. ``lyapunov``: the largest Lyapunov exponent λ₁ on the first frames of the long video
   (degraded as in the onset test; random frames without a video);
5. ``onsets``: the long-video onset test, resumable (``resume=True`` continues a killed run
   from ``onsets_progress.pt``; its onsets equal an uninterrupted run's).

Verdict (the words match the proofs; :func:`recstab.diagnostics.engine.decide`):
**certified stable** (a theorem: L̂ < 1), **proven unstable** (a demonstrated diverging
sequence: the TRF's, saved, or a feedback divergence in the long video on a finite input,
its frame range named), **empirically stable** (no divergence found and λ₁ < 0, the margin
stated: evidence), **inconclusive** (anything else; λ₁ > 0 without a divergence is evidence,
not proof, of instability on the frames named).

Output folder: ``report.json`` and ``report.md`` are rewritten after every section, so what
was measured survives a later failure or a kill; a section that fails is recorded with its
error and the others still run. Also ``trf.png``, ``onsets.png``, ``spectra.png``,
``trf.pt`` (the TRF result and what it measured: the weights' hash, the dampening, the
settings; reused by a resumed run of the same model only), ``trf_unbounded_sequence.pt``
(when unbounded) and ``onsets_progress.pt``. Nothing here logs anywhere: ``src/diagnose.py``
sends the files and numbers to W&B (:mod:`recstab.lit.publish`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recstab.diagnostics import engine
from recstab.diagnostics.engine import VERDICTS, ConvSpectra, conv_spectra
from recstab.diagnostics.measure import SECTIONS, Measurements, MeasureSpec, ResumeMismatch, as_spec, measure
from recstab.diagnostics.demonstration import replay
from recstab.diagnostics.onsets import DIVERGENCE_RATIO, BurstProcessor
from recstab.diagnostics.workfiles import model_fingerprint
from recstab.diagnostics.trf import TRFResult
from recstab.models.interface import traits

log = logging.getLogger(__name__)

__all__ = ["VERDICTS", "SECTIONS", "StabilityReport", "stability_report", "conv_spectra", "markdown"]

MEANING = {
    "certified stable": "a theorem: the loop certificate bounds the recurrence map by L̂ < 1 (a contraction)",
    "proven unstable": "a demonstrated diverging input sequence (saved / named below)",
    "empirically stable": "evidence, not a proof: no divergence found, and λ₁ < 0 on the input named below",
    "inconclusive": "neither proven nor certified, and no negative Lyapunov margin to report",
}


@dataclass
class StabilityReport:
    """A :class:`~recstab.diagnostics.measure.Measurements` with its name, settings and files."""

    name: str
    measurements: Measurements
    files: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    skipped_files: list = field(default_factory=list)  # (path, reason) of unreadable videos
    extra_notes: list = field(default_factory=list)

    # the measurements, read through
    verdict = property(lambda self: self.measurements.verdict)
    trf = property(lambda self: self.measurements.trf)
    spectra = property(lambda self: self.measurements.spectra)
    certificate = property(lambda self: self.measurements.certificate)
    lyapunov = property(lambda self: self.measurements.lyapunov)
    lyapunov_on = property(lambda self: self.measurements.lyapunov_on)
    sections = property(lambda self: self.measurements.sections)
    onsets = property(lambda self: self.measurements.onsets[0] if self.measurements.onsets else None)
    notes = property(lambda self: self.measurements.notes + self.extra_notes)

    @property
    def convs(self) -> list:
        return self.spectra.rows if self.spectra is not None else []

    @property
    def bound(self) -> float | None:
        return None if self.certificate is None else float(self.certificate.bound)

    def metrics(self) -> dict:
        """Flat scalar metrics in the engine's namespace (``stability/*``, ``spectra/*``, ``long/*``)."""
        return self.measurements.metrics

    def to_dict(self) -> dict:
        cert = self.certificate
        lyap = None if self.lyapunov is None else {**self.lyapunov.to_dict(), "input": self.lyapunov_on}
        return {"name": self.name, "verdict": self.verdict, "meaning": MEANING[self.verdict],
                "metrics": self.metrics(), "sections": self.sections,
                "skipped_files": [{"path": str(p), "reason": r} for p, r in self.skipped_files],
                "certificate": None if cert is None else {"bound": float(cert.bound), "certified": cert.certified,
                                                          "norm": cert.norm},
                "trf": None if self.trf is None else self.trf.to_dict(),
                "lyapunov": lyap, "onsets": None if self.onsets is None else self.onsets.to_dict(),
                "convs": self.convs, "spectra_skipped": {} if self.spectra is None else self.spectra.skipped,
                "notes": self.notes, "files": {k: str(v) for k, v in self.files.items()},
                "settings": self.settings}


def stability_report(model: nn.Module, out_dir: str | Path, *, clean_frames=None, name: str | None = None,
                     spec=None, sigma: float = 30 / 255, task: str | None = None, trf_kwargs: dict | None = None,
                     onset_kwargs: dict | None = None, lyapunov_kwargs: dict | None = None,
                     spectra_n: int = 64, burst: int | None = None, overlap: int = 0,
                     dampening: float | None = None, resume: bool = False, source: str | None = None,
                     progress: bool = False) -> StabilityReport:
    """Diagnose `model` (:func:`recstab.diagnostics.measure`) and write the report folder.

    Args:
        model: the nn.Module (``model(x)``; ``process`` for the onset test and λ₁; a
            :class:`recstab.models.interface.VideoModel` for the loop certificate).
        out_dir: folder for report.json/md, the PNGs and the .pt files (created).
        clean_frames: iterable of clean C×H×W frames (e.g. a LongVideo) for λ₁ and the onset test;
            a LongVideo is probed first (unreadable files skipped, or the report stops before
            measuring anything when none is readable). None: λ₁ on random frames, no onset test.
        spec: what to measure (:class:`~recstab.diagnostics.measure.MeasureSpec` or its config: the
            ``diagnostics`` group). Without it, the spec is made of ``spectra_n``, ``trf_kwargs``,
            ``lyapunov_kwargs`` (``frames`` 0: off; default 200 frames, 64 px) and ``onset_kwargs``.
        sigma, task: degradation of the onset test and of λ₁'s clip (sigma on the [0, 1] scale).
        burst, overlap: diagnose the model run burst by burst (appendix E) instead.
        dampening: diagnose the model with feature dampening λ (appendix F).
        resume: continue a killed report in the same folder: the onset test from its progress
            file, the TRF from trf.pt when it measured this very model at these settings.
        source: where the model came from (e.g. its checkpoint path), recorded in the report.
        progress: estimated cost of each section up front, a progress bar with an ETA (the CLI's).
    """
    if spec is None:
        lyapunov = {"frames": 200, "size": 64, **dict(lyapunov_kwargs or {})}
        spec = MeasureSpec(name="custom", spectra_n=spectra_n, trf=dict(trf_kwargs or {}),
                           lyapunov=lyapunov if int(lyapunov["frames"]) else None,
                           onsets=dict(onset_kwargs or {}))
    spec = as_spec(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = task or traits(model).task
    own = getattr(model, "name", None)  # a wrapped model's (recstab.models.adapter) or a built model's name
    report = StabilityReport(name=name or (own if isinstance(own, str) else type(model).__name__),
                             measurements=Measurements(spec))
    fingerprint = model_fingerprint(model)
    _refuse_another_models_report(out_dir, fingerprint)
    report.settings = {"source": source, "model_hash": fingerprint, "recstab_version": _version(), "sigma": sigma,
                       "sigma_255": sigma * 255, "task": task, "burst": burst, "overlap": overlap,
                       "dampening": traits(model).dampening if dampening is None else dampening,
                       "video": _describe(clean_frames), "diagnostics": dataclasses.asdict(spec)}
    report.files = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    start = time.perf_counter()

    # 0. the input: every file readable? (before anything long runs; raises naming every file)
    probe = getattr(clean_frames, "probe", None)
    if callable(probe):
        probe()
    report.skipped_files = list(getattr(clean_frames, "skipped", []))

    def write(section: str | None = None, measurements: Measurements | None = None) -> None:
        report.skipped_files = list(getattr(clean_frames, "skipped", report.skipped_files))
        if section == "spectra" and report.spectra is not None and report.spectra.values:
            report.files["spectra"] = _save_spectra(report.spectra, out_dir / "spectra.png")
        if section == "trf" and report.trf is not None:
            report.files["trf"] = report.trf.save_png(out_dir / "trf.png")
            if report.trf.verdict == "unbounded":
                report.files["trf_sequence"] = _save_sequence(model, report.trf, out_dir, burst, overlap)
        if section == "onsets" and report.onsets is not None:
            report.files["onsets"] = report.onsets.save_png(out_dir / "onsets.png")
            report.files["onsets_progress"] = out_dir / "onsets_progress.pt"
        report.extra_notes = list(report.measurements.input.get("notes", []))
        if report.measurements.input:
            report.settings["input"] = report.measurements.input
        if "trf_sequence" in report.files and report.trf is not None and report.trf.verdict == "unbounded":
            report.extra_notes.append(f"the diverging TRF sequence is saved in {Path(report.files['trf_sequence']).name}"
                                      " (the period X and its repeats M; replay: "
                                      "recstab.diagnostics.demonstration.replay(model, path))")
        if burst is not None:
            report.extra_notes.append(f"diagnosed burst by burst (burst={burst}, overlap={overlap}); the certificate "
                                      "is the underlying model's")
        report.extra_notes += [f"skipped unreadable video {path}: {reason}" for path, reason in report.skipped_files]
        report.settings["seconds"] = time.perf_counter() - start
        _atomic_write(report.files["json"], json.dumps(report.to_dict(), indent=2, default=engine.json_value))
        _atomic_write(report.files["markdown"], markdown(report))

    measure(model, spec, clean_frames=clean_frames, sigma=sigma, task=task, dampening=dampening, burst=burst,
            overlap=overlap, workdir=out_dir, resume=resume, done=report.measurements, on_section=write,
            progress=progress)
    write()
    return report


def _refuse_another_models_report(out_dir: Path, fingerprint: str) -> None:
    """A report folder holding another model's report is never written into (resumed or not)."""
    path = out_dir / "report.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    other = (saved.get("settings") or {}).get("model_hash")
    if other is not None and other != fingerprint:
        raise ResumeMismatch(f"{path} is the report of another model ({saved.get('name')!r}, weights {other[:12]}…; "
                             f"this one: {fingerprint[:12]}…): it is not overwritten. Give this diagnosis its own "
                             "report_dir (or drop report_dir / resume=true).")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("recstab")
    except PackageNotFoundError:
        return "unknown"


def _describe(frames) -> dict | None:
    """What the stream is: files, frame size, frames (a LongVideo); None without one."""
    if frames is None:
        return None
    out = {"type": type(frames).__name__}
    if hasattr(frames, "files"):
        out["files"] = [str(f) for f in frames.files]
        out.update(loop_to=getattr(frames, "loop_to", None), resize=getattr(frames, "resize", None),
                   crop=getattr(frames, "crop", None), gray=getattr(frames, "gray", None))
    try:
        out["frames"] = len(frames)
    except TypeError:
        pass
    return out


def _save_sequence(model: nn.Module, trf: TRFResult, out_dir: Path, burst: int | None = None,
                   overlap: int = 0) -> Path:
    """Save the TRF's demonstration (the period X and how often it is repeated) and replay it from the file:
    the proof, checkable by anyone with ``recstab.diagnostics.demonstration.replay(model, path)``."""
    subject = BurstProcessor(model, burst, overlap) if burst is not None else model
    path = trf.demonstration.save(out_dir / "trf_unbounded_sequence.pt")
    again = replay(subject, path)
    saved = torch.load(path, weights_only=False)
    saved.update(replayed_status=again.status, replayed_status_agrees=again.status == trf.demonstration.status,
                 verdict=trf.verdict, reason=trf.reason)
    torch.save(saved, path)
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        return f"{value:.4g}"
    return str(value)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _seen(described: dict) -> str:
    """' (N frames of H×W, C channels)' from check_input's description; '' without one."""
    if not described.get("frame_size"):
        return ""
    h, w = described["frame_size"]
    frames = f"{described['frames']} frames of " if described.get("frames") is not None else "frames of "
    return f" ({frames}{h}×{w}, {described.get('channels')} channel(s))"


def markdown(report: StabilityReport) -> str:
    """The one-page summary."""
    t, o, c, le = report.trf, report.onsets, report.certificate, report.lyapunov
    lines = [f"# Stability report: {report.name}", "", f"**Verdict: {report.verdict}** — {MEANING[report.verdict]}", ""]
    st = report.settings
    video = st.get("video") or {}
    lines += [f"Model: {st.get('source') or 'built in memory'} (weights {str(st.get('model_hash'))[:12]}…), "
              f"dampening {st.get('dampening')}; input: {st.get('task')}, σ = {st.get('sigma_255', 0):.3g}/255"
              + (f"; video: {', '.join(Path(f).name for f in video.get('files', []))}" if video.get("files") else "")
              + _seen(st.get("input") or {})
              + f"; diagnostics preset {(st.get('diagnostics') or {}).get('name')}; recstab {st.get('recstab_version')}.",
              ""]
    lines += ["| section | status |", "|---|---|"]
    lines += [f"| {k} | {_cell(report.sections[k]['status'])} ({report.sections[k].get('seconds', 0):.1f} s)"
              f"{' — ' + _cell(report.sections[k]['error']) if 'error' in report.sections[k] else ''} |"
              for k in SECTIONS if k in report.sections]
    lines += [f"| {k} | not run yet |" for k in SECTIONS if k not in report.sections]
    lines += ["", "| measurement | value |", "|---|---|"]
    if c is not None:
        lines += [f"| loop certificate L̂ (proven bound of the recurrence map) | {_fmt(float(c.bound))} |",
                  f"| ... in the norm | {_cell(c.norm)} |"]
    if t is not None:
        growth = getattr(t, "growth_rate", None)
        lines += [f"| TRF verdict | {t.verdict}{' (stopped early)' if t.stopped_early else ''} |",
                  f"| TRF extent (frames) | {t.extent} of {t.tau + 1} |",
                  f"| TRF growth rate | {_fmt(None if growth is None else float(growth))} |",
                  f"| TRF iterations | {t.iterations} ({t.seconds:.1f} s) |",
                  f"| TRF reason | {_cell(t.reason)} |"]
    if le is not None:
        lines += [f"| largest Lyapunov exponent λ₁ (per frame) | {float(le.exponent):+.4g} ± {float(le.stderr):.2g} |",
                  f"| ... measured on | {_cell(report.lyapunov_on)} |"]
    if o is not None:
        lines += [f"| onset test: frames | {o.frames}{f' (resumed at {o.resumed_from})' if o.resumed_from else ''} |",
                  f"| onset test: instabilities (feedback divergences) | {o.n_onsets} ({sum(o.divergent)}) |",
                  f"| onset 1st / 9th decile | {_fmt(o.deciles[0])} / {_fmt(o.deciles[1])} |",
                  f"| input frames with NaN/Inf | {len(o.input_nonfinite_frames)} |",
                  f"| onset test: fps (model only) | {o.fps:.1f} ({o.model_fps:.1f}) |"]
        finite = o.psnr[np.isfinite(o.psnr)]
        if len(finite):
            seen = o.to_dict()["input_psnr_median"]
            lines.append(f"| median PSNR (dB): output (raw) / degraded input | {float(np.median(finite)):.2f} / "
                         f"{_fmt(seen)} |")
    if t is not None:
        lines += ["", f"Thresholds: TRF influence > {t.threshold:g} of the largest counts; unbounded needs a replayed "
                  "demonstration (X repeated from the initial state: a non-finite output, or growth by 10⁶ over the "
                  "last doubling of ≥ 32 periods, still rising); an instability is a frame with "
                  "PSNR < 0 dB or a non-finite output, a feedback divergence one whose output with the carried "
                  f"state is non-finite or over {DIVERGENCE_RATIO:g}× the output from the initial state; certified "
                  "when the bound is < 1."]
    lines.append("")
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    if report.skipped_files:
        lines += ["## Skipped files", ""] + [f"- `{p}`: {r}" for p, r in report.skipped_files] + [""]
    if o is not None and o.input_nonfinite_frames:
        shown = ", ".join(map(str, o.input_nonfinite_frames[:20]))
        lines += ["## Non-finite input frames", "", shown + (" ..." if len(o.input_nonfinite_frames) > 20 else ""), ""]
    if report.convs:
        lines += [f"## Convolutions (exact spectra, n = {report.spectra.n})", "",
                  "| conv | shape | ‖W‖₂ | stable rank | in loop |", "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {'×'.join(map(str, r['shape']))} | {r['sigma1']:.4g} | "
                  f"{r['srank']:.4g} | {'yes' if r['in_loop'] else ''} |" for r in report.convs]
        lines.append("")
    lines += ["## Figures", ""] + [f"![{k}]({Path(v).name})" for k, v in report.files.items()
                                   if str(v).endswith(".png")]
    return "\n".join(lines) + "\n"


def _save_spectra(spectra: ConvSpectra, path: Path) -> Path:
    """Every conv's spectrum against its normalised index, and their average (Table 2's column)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, 1, 200)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    curves = []
    for row in spectra.rows:
        sv = spectra.values[row["name"]]
        x = np.linspace(0, 1, len(sv))
        curves.append(np.interp(grid, x, sv))
        ax.plot(x, sv, lw=0.8, alpha=0.5, color="r" if row["in_loop"] else "0.5")
    ax.plot(grid, np.mean(curves, axis=0), "k", lw=2, label="average")
    ax.axhline(1.0, color="b", ls=":", lw=0.8)
    ax.set_xlabel("normalised index")
    ax.set_ylabel("singular value")
    ax.set_title("exact conv spectra (red: in the recurrent loop)", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
