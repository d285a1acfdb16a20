"""The one-page stability report: every diagnosis of the paper on one model, and a verdict.

Four measurements (sections 2.1–2.2, 3.1, Tables 2–3):

1. the TRF stress test (:mod:`recstab.diagnostics.trf`): gradient-ascent search for an
   unstable sequence;
2. the long-video onset test (:mod:`recstab.diagnostics.onsets`): random search on real
   video, when clean frames are given;
3. the exact singular-value spectrum of every conv: the linear operator W(K) on an n×n
   map with circular padding, by FFT (never the reshaped kernel), with its spectral norm
   ‖W‖₂ and stable rank ‖W‖_F²/‖W‖₂²;
4. an upper bound L̂ of the Lipschitz constant of the recurrence map in the fed-back
   state, ``model.loop_lipschitz_bound(conv -> ‖W(conv)‖₂)``: ReLU is 1-Lipschitz, norms
   multiply along the loop (Proposition 1 of the paper), a residual block is bounded by
   1 + ‖W1‖‖W2‖, the dampening λ multiplies the loop. The per-conv norms are exact for the
   circular operator on the n×n frequency grid (n = 64 is within ~0.2 % of the supremum
   over all frequencies; the zero-padded conv of the model is a restriction of it).

Verdict, in this order:

- **certified stable**: L̂ < 1. The recurrence map is a contraction (Definition 2), so the
  model is Lipschitz- hence BIBO-stable: a proof, whatever the search finds. (Frames with
  PSNR < 0 on such a model are then not a feedback divergence; the summary says so.)
- **proven unstable**: the TRF is unbounded, or the onset test met an instability. The
  input found is an unstable sequence (a proof up to the TRF's documented thresholds).
- **empirically stable**: neither: no unstable sequence was found, nothing is certified.

Output folder: ``trf.png``, ``onsets.png`` (when run), ``spectra.png``, ``report.json``,
``report.md``; the same numbers and images go to W&B when a run/logger is passed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recstab.diagnostics.onsets import BurstProcessor, OnsetResult, instability_onsets
from recstab.diagnostics.trf import TRFResult, temporal_receptive_field
from recstab.models.dampening import evaluating

VERDICTS = ("certified stable", "proven unstable", "empirically stable")


@dataclass
class StabilityReport:
    name: str
    verdict: str
    trf: TRFResult
    onsets: OnsetResult | None
    convs: list                      # per conv: name, shape, spectral_norm, stable_rank, in_loop
    lipschitz_bound: float | None
    notes: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    spectra: dict = field(default_factory=dict, repr=False)  # conv name -> sorted singular values

    def to_dict(self) -> dict:
        return {"name": self.name, "verdict": self.verdict, "lipschitz_bound": self.lipschitz_bound,
                "trf": self.trf.to_dict(), "onsets": None if self.onsets is None else self.onsets.to_dict(),
                "convs": self.convs, "notes": self.notes,
                "files": {k: str(v) for k, v in self.files.items()}, "settings": self.settings}

    def metrics(self) -> dict:
        """Flat scalar metrics (``split/name`` keys) for loggers."""
        out = {"report/certified": float(self.verdict == "certified stable"),
               "report/proven_unstable": float(self.verdict == "proven unstable"),
               "report/trf_unbounded": float(self.trf.unbounded), "report/trf_extent": float(self.trf.extent)}
        if self.lipschitz_bound is not None:
            out["report/lipschitz_bound"] = float(self.lipschitz_bound)
        if self.convs:
            out["report/max_spectral_norm"] = max(c["spectral_norm"] for c in self.convs)
        if self.onsets is not None:
            out.update({"long/onset_d1": self.onsets.deciles[0], "long/onset_d9": self.onsets.deciles[1],
                        "long/n_onsets": float(self.onsets.n_onsets), "long/fps": self.onsets.fps})
        return out


def conv_spectra(model: nn.Module, n: int = 64) -> tuple[list, dict, dict]:
    """Exact spectrum of every nn.Conv2d of `model` on an n×n map.

    Returns (rows of name/shape/spectral_norm/stable_rank/in_loop, {name: sorted singular
    values}, {id(conv): spectral norm}).
    """
    from recstab.norms import conv_singular_values

    loop = {id(c) for c in model.recurrent_convs()} if callable(getattr(model, "recurrent_convs", None)) else set()
    rows, spectra, norms = [], {}, {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, nn.Conv2d):
                continue
            weight = module.weight.detach().double().cpu()
            sv = conv_singular_values(weight, n).numpy()
            spectra[name] = sv
            sigma = norms[id(module)] = float(sv[0])
            rows.append({"name": name, "shape": list(weight.shape), "spectral_norm": sigma,
                         "stable_rank": float((sv ** 2).sum() / sigma ** 2) if sigma > 0 else 0.0,
                         "in_loop": id(module) in loop})
    return rows, spectra, norms


def lipschitz_bound(model: nn.Module, norms: dict | None = None, n: int = 64) -> float | None:
    """``model.loop_lipschitz_bound`` with exact FFT spectral norms (None if the model has no such method).

    ``norms`` maps id(conv) -> ‖W‖₂ already computed (else ``spectral_norm_fft(conv.weight, n)``).
    """
    if not callable(getattr(model, "loop_lipschitz_bound", None)):
        return None
    from recstab.norms import spectral_norm_fft
    norms = norms or {}

    def conv_norm(conv):
        if id(conv) in norms:
            return norms[id(conv)]
        with torch.no_grad():
            return spectral_norm_fft(conv.weight.detach().double().cpu(), n)
    return float(model.loop_lipschitz_bound(conv_norm))


def decide(bound: float | None, trf: TRFResult, onsets: OnsetResult | None) -> tuple[str, list]:
    """The verdict (see the module docstring) and notes on conflicting evidence."""
    notes = []
    diverged = trf.unbounded or (onsets is not None and onsets.diverged)
    if bound is not None and bound < 1:
        if diverged:
            notes.append(f"the recurrence is contractive (bound {bound:.3g} < 1) yet "
                         + ("the TRF reports unbounded" if trf.unbounded else "the onset test met PSNR < 0")
                         + ": a bounded model with bad outputs, or memory longer than the TRF window, "
                           "not a feedback divergence")
        return "certified stable", notes
    if diverged:
        return "proven unstable", notes
    if bound is not None:
        notes.append(f"Lipschitz bound {bound:.3g} ≥ 1: not certified (the bound is loose)")
    return "empirically stable", notes


def stability_report(model: nn.Module, out_dir: str | Path, *, clean_frames=None, name: str | None = None,
                     sigma: float = 30 / 255, task: str | None = None, trf_kwargs: dict | None = None,
                     onset_kwargs: dict | None = None, spectra_n: int = 64, burst: int | None = None,
                     overlap: int = 0, dampening: float | None = None, run=None) -> StabilityReport:
    """Diagnose `model` and write the report folder; return a :class:`StabilityReport`.

    Args:
        model: the nn.Module (``model(x)``; ``process`` for the onset test; ``recurrent_convs`` and
            ``loop_lipschitz_bound`` for the certificate, when it has them).
        out_dir: folder for the PNGs, report.json and report.md (created).
        clean_frames: iterable of clean C×H×W frames (e.g. a LongVideo) for the onset test; None skips it.
        sigma, task: degradation of the onset test (sigma on the [0, 1] scale).
        trf_kwargs: arguments of :func:`temporal_receptive_field` (frames, size, iters, lr, seed, ...).
        onset_kwargs: further arguments of :func:`instability_onsets` (chunk, seed, max_frames, ...).
        spectra_n: map size n of the exact conv spectra.
        burst, overlap: diagnose the model run burst by burst (appendix E) instead.
        dampening: diagnose the model with feature dampening λ (appendix F).
        run: W&B run or Lightning WandbLogger to log to (optional).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or type(model).__name__
    trf_kwargs, onset_kwargs = dict(trf_kwargs or {}), dict(onset_kwargs or {})
    start = time.perf_counter()
    files: dict = {}
    with evaluating(model, dampening):
        subject = BurstProcessor(model, burst, overlap) if burst is not None else model
        trf = temporal_receptive_field(subject, **trf_kwargs)
        files["trf"] = trf.save_png(out_dir / "trf.png")

        onsets, notes = None, []
        if clean_frames is not None:
            if burst is None and not getattr(model, "streamable", True):
                notes.append("onset test skipped: the model is bidirectional (not streamable); use burst=")
            else:
                onsets = instability_onsets(model, clean_frames, sigma, task=task, burst=burst,
                                            overlap=overlap, **onset_kwargs)
                files["onsets"] = onsets.save_png(out_dir / "onsets.png")
        else:
            notes.append("onset test not run (no clean frames given)")

        convs, spectra, norms = conv_spectra(model, spectra_n)
        if spectra:
            files["spectra"] = _save_spectra(spectra, convs, out_dir / "spectra.png")
        bound = lipschitz_bound(model, norms, spectra_n)
        dampening_used = getattr(model, "dampening", None)

    verdict, conflict = decide(bound, trf, onsets)
    notes += conflict
    if burst is not None:
        notes.append(f"diagnosed burst by burst (burst={burst}, overlap={overlap}); the Lipschitz bound "
                     "is the underlying model's")
    if bound is None:
        notes.append("no Lipschitz bound: the model has no loop_lipschitz_bound(conv_norm)")
    settings = {"sigma": sigma, "task": task or getattr(model, "task", None), "spectra_n": spectra_n,
                "burst": burst, "overlap": overlap, "dampening": dampening_used, "trf": trf_kwargs,
                "onsets": onset_kwargs, "seconds": time.perf_counter() - start}
    report = StabilityReport(name=name, verdict=verdict, trf=trf, onsets=onsets, convs=convs,
                             lipschitz_bound=bound, notes=notes, files=files, settings=settings,
                             spectra=spectra)
    files["json"] = out_dir / "report.json"
    files["markdown"] = out_dir / "report.md"
    files["json"].write_text(json.dumps(report.to_dict(), indent=2, default=_json_default))
    files["markdown"].write_text(markdown(report))
    if run is not None:
        log_report(run, report)
    return report


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (Path, torch.device)):
        return str(value)
    return repr(value)


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        return f"{value:.4g}"
    return str(value)


def markdown(report: StabilityReport) -> str:
    """The one-page summary."""
    t, o = report.trf, report.onsets
    lines = [f"# Stability report: {report.name}", "", f"**Verdict: {report.verdict}**", ""]
    lines += ["| measurement | value |", "|---|---|",
              f"| Lipschitz upper bound of the recurrence map | {_fmt(report.lipschitz_bound)} |",
              f"| TRF verdict | {t.verdict}{' (stopped early)' if t.stopped_early else ''} |",
              f"| TRF extent (frames) | {t.extent} of {t.tau + 1} |",
              f"| TRF iterations | {t.iterations} ({t.seconds:.1f} s) |",
              f"| TRF reason | {t.reason.replace('|', chr(92) + '|')} |"]
    if o is not None:
        lines += [f"| onset test: frames | {o.frames} |",
                  f"| onset test: instabilities | {o.n_onsets} |",
                  f"| onset 1st / 9th decile | {_fmt(o.deciles[0])} / {_fmt(o.deciles[1])} |",
                  f"| onset test: fps (model only) | {o.fps:.1f} ({o.model_fps:.1f}) |"]
        finite = o.psnr[np.isfinite(o.psnr)]
        if len(finite):
            lines.append(f"| median PSNR (dB, raw output) | {float(np.median(finite)):.2f} |")
    lines += ["", "Thresholds: TRF influence > "
              f"{t.threshold:g} of the largest counts, |y| > {t.blowup:g} proves divergence; an instability "
              "is a frame with PSNR < 0 dB or a non-finite output; certified when the bound is < 1.", ""]
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    if report.convs:
        lines += ["## Convolutions (exact spectra, n = "
                  f"{report.settings['spectra_n']})", "",
                  "| conv | shape | ‖W‖₂ | stable rank | in loop |", "|---|---|---|---|---|"]
        lines += [f"| {c['name']} | {'×'.join(map(str, c['shape']))} | {c['spectral_norm']:.4g} | "
                  f"{c['stable_rank']:.4g} | {'yes' if c['in_loop'] else ''} |" for c in report.convs]
        lines.append("")
    lines += ["## Figures", ""] + [f"![{k}]({Path(v).name})" for k, v in report.files.items()
                                   if str(v).endswith(".png")]
    return "\n".join(lines) + "\n"


def _save_spectra(spectra: dict, convs: list, path: Path) -> Path:
    """Every conv's spectrum against its normalised index, and their average (Table 2's column)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, 1, 200)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    curves = []
    for (name, sv), row in zip(spectra.items(), convs):
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


def log_report(run, report: StabilityReport) -> None:
    """Send the report's numbers and images to a W&B run (or a Lightning WandbLogger)."""
    import wandb
    experiment = getattr(run, "experiment", run)
    payload = dict(report.metrics())
    for key, path in report.files.items():
        if str(path).endswith(".png"):
            payload[f"report/{key}"] = wandb.Image(str(path))
    experiment.log(payload)
    experiment.summary["report/verdict"] = report.verdict
