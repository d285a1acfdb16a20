"""Each measurement's function and metrics, and the verdict rule; :mod:`.measure` drives them.

Every caller measures through :func:`recstab.diagnostics.measure` (the stability report, the
training monitor, the sweeps' TableMeasurements, stabilise) or, for the spectra alone, through
:func:`conv_spectra` (:class:`recstab.lit.spectrum_callback.SpectrumMonitor`), under the same keys:

==================================  =============================================================
key                                 meaning
==================================  =============================================================
``spectra/<conv>/sigma1``           ‖W‖₂ of the conv's operator on an n×n map (exact, FFT)
``spectra/<conv>/srank``            its stable rank ‖W‖_F²/‖W‖₂²
``spectra/sigma1_max|mean|std``     over the measured convs
``spectra/srank_mean``              mean stable rank
``spectra/srank_ratio_mean``        mean of srank/(n²·min(c_in, c_out)) (what SRN-C's β targets)
``spectra/n``, ``spectra/convs``    the map size and the number of convs measured
``stability/bound``                 L̂, the loop certificate's bound (``inf``: none derived)
``stability/certified``             1 when L̂ < 1 (a theorem: the recurrence is a contraction)
``stability/trf_unbounded``         1 when the TRF demonstrated a diverging sequence
``stability/trf_verdict_code``      0 bounded, 1 inconclusive, 2 unbounded
``stability/trf_extent``            frames of the past that drive p
``stability/trf_growth_rate``       the TRF's measured growth of the future outputs
``stability/trf_p``                 |p| at the last TRF iteration
``stability/lyapunov``              λ₁, largest Lyapunov exponent per frame (natural log)
``stability/lyapunov_stderr``       its standard error
``stability/verdict_code``          index in :data:`VERDICTS` (0 certified stable … 3 proven unstable)
``long/onset_d1``, ``long/onset_d9`` 1st/9th decile of the onsets (∞: none)
``long/n_onsets``                   instabilities (PSNR < 0 dB or non-finite output)
``long/n_divergences``              of which feedback divergences (a proof of instability)
``long/input_nonfinite``            input frames with a NaN/Inf (instabilities of the input)
``long/frames``, ``long/fps``       frames streamed, frames per second (decode included)
``long/psnr_mean``                  mean finite PSNR over the stream (raw output)
``long/input_psnr_mean``            mean PSNR of the degraded input (bicubic-upsampled for SR) over it
==================================  =============================================================

Strings (not metrics) go with them in summaries: ``stability/verdict``, ``stability/trf_verdict``,
``stability/norm`` (the norm the certificate's bound holds in).

Verdicts — the words match what was proved (:func:`decide`):

- **certified stable** — a theorem: the loop certificate's bound L̂ < 1. The recurrence map is
  a contraction in the stated norm (the paper's Definition 2), so the model is stable on every
  input, whatever a search finds.
- **proven unstable** — a demonstrated diverging sequence: the TRF's replayed demonstration
  (:mod:`recstab.diagnostics.demonstration`: its period X and repeats M are saved next to the report,
  so anyone can replay it; never fired by a map of spectral radius < 1), or the
  long-video test met a *feedback divergence* on a finite input (the output with the carried
  state diverged, the same frame from the initial state does not; the frame range is named).
- **empirically stable** — no divergence was found and the largest Lyapunov exponent measured
  on the input is negative, λ₁ < 0 (the margin is stated): evidence, not a proof.
- **inconclusive** — none of the above (e.g. λ₁ ≥ 0 without a demonstrated divergence, which is
  evidence — not proof — of instability on the frames it was measured on; or λ₁ not measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recstab.models.interface import traits

VERDICTS = ("certified stable", "empirically stable", "inconclusive", "proven unstable")
TRF_VERDICTS = ("bounded", "inconclusive", "unbounded")


# ---------------------------------------------------------------------- conv spectra
@dataclass
class ConvSpectra:
    """Exact singular values of every measurable conv on an n×n map (circular padding, FFT)."""

    n: int
    rows: list                      # per conv: name, shape, sigma1, srank, srank_ratio, in_loop
    values: dict = field(default_factory=dict, repr=False)  # conv name -> sorted singular values (numpy)
    skipped: dict = field(default_factory=dict)             # conv name -> why it has no exact spectrum

    def metrics(self) -> dict:
        if not self.rows:
            return {}
        out = {}
        for row in self.rows:
            out[f"spectra/{row['name']}/sigma1"] = row["sigma1"]
            out[f"spectra/{row['name']}/srank"] = row["srank"]
        sigma = np.array([r["sigma1"] for r in self.rows])
        out.update({"spectra/sigma1_max": float(sigma.max()), "spectra/sigma1_mean": float(sigma.mean()),
                    "spectra/sigma1_std": float(sigma.std()),
                    "spectra/srank_mean": float(np.mean([r["srank"] for r in self.rows])),
                    "spectra/srank_ratio_mean": float(np.mean([r["srank_ratio"] for r in self.rows])),
                    "spectra/n": float(self.n), "spectra/convs": float(len(self.rows))})
        return out


def _loop_convs(module: nn.Module) -> set:
    for candidate in (module, getattr(module, "model", None)):  # a model, or a LightningModule holding one
        if callable(getattr(candidate, "recurrent_convs", None)):
            return {id(c) for c in candidate.recurrent_convs()}
    return set()


def conv_spectra(module: nn.Module, n: int = 64) -> ConvSpectra:
    """The exact spectrum of every stride-1, ungrouped, undilated nn.Conv2d of `module` on n×n.

    The spectrum is that of the linear operator W(K) (``recstab.norms.conv_singular_values``),
    never of the reshaped kernel, of the weight the layer uses (the normalised one under a
    norm). The weight is read with the conv in eval mode, so a normalised weight's power
    iteration does not move. Other convs (strided, grouped, dilated, or kernels wider than n)
    are listed in ``skipped`` with the reason: their operator is not the circulant one.
    """
    from recstab.norms import conv_singular_values

    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n (side of the feature map) must be an int >= 1, got {n!r}")
    n = int(n)
    loop = _loop_convs(module)
    rows, values, skipped = [], {}, {}
    for name, conv in module.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        if conv.stride != (1, 1) or conv.groups != 1 or conv.dilation != (1, 1):
            skipped[name] = f"stride {conv.stride}, groups {conv.groups}, dilation {conv.dilation}"
            continue
        if n < max(conv.kernel_size):
            skipped[name] = f"kernel {conv.kernel_size} wider than n = {n}"
            continue
        was_training = conv.training
        conv.eval()
        try:
            with torch.no_grad():
                weight = conv.weight.detach().double().cpu()
        finally:
            conv.train(was_training)
        sv = conv_singular_values(weight, n).numpy()
        values[name] = sv
        sigma = float(sv[0])
        srank = float((sv ** 2).sum() / sigma ** 2) if sigma > 0 else 0.0
        c_out, c_in = weight.shape[:2]
        rows.append({"name": name, "shape": list(weight.shape), "sigma1": sigma, "srank": srank,
                     "srank_ratio": srank / (n * n * min(c_in, c_out)), "in_loop": id(conv) in loop})
    return ConvSpectra(n, rows, values, skipped)


# ---------------------------------------------------------------------- the loop certificate
def certificate(model: nn.Module):
    """The loop certificate of `model` (``recstab.diagnostics.loop_certificate``, per-conv factors
    from ``recstab.norms.conv_norm_bound``: valid on every frame size); None when the model is not a
    :class:`recstab.models.interface.VideoModel` (it states no loop structure)."""
    from recstab.diagnostics import loop_certificate
    from recstab.models.interface import VideoModel

    if not isinstance(model, VideoModel):
        return None
    return loop_certificate(model)


def certificate_metrics(cert) -> dict:
    if cert is None:
        return {}
    return {"stability/bound": float(cert.bound), "stability/certified": float(cert.certified)}


# ---------------------------------------------------------------------- TRF
def trf(model: nn.Module, **kwargs):
    """The TRF stress test (:func:`recstab.diagnostics.trf.temporal_receptive_field`), weights untouched."""
    from recstab.diagnostics.trf import temporal_receptive_field
    with torch.inference_mode(False), torch.enable_grad():
        return temporal_receptive_field(model, **kwargs)


def trf_metrics(result) -> dict:
    return {"stability/trf_unbounded": float(result.verdict == "unbounded"),
            "stability/trf_verdict_code": float(TRF_VERDICTS.index(result.verdict)),
            "stability/trf_extent": float(result.extent),
            "stability/trf_growth_rate": float(result.growth_rate),
            "stability/trf_p": float(result.p_history[-1]) if result.p_history else math.nan}


# ---------------------------------------------------------------------- Lyapunov exponent
@dataclass
class LyapunovInput:
    """The clip λ₁ is measured on, and what it is in words (for the report)."""

    clip: torch.Tensor              # 1×T×C×H×W model input
    description: str                # e.g. "frames 0-199 of the long video (noisy, sigma 0.118)"
    real: bool                      # real video (True) or random frames


def lyapunov_input(model: nn.Module, clean_frames=None, frames: int = 200, *, sigma: float = 30 / 255,
                   task: str | None = None, seed: int = 0, size: int | None = None) -> LyapunovInput:
    """The first `frames` frames of the stream, degraded exactly as the onset test degrades them
    (noise of frame i seeded by (seed, i)); without a stream, i.i.d. uniform random frames.

    ``size``: centre crop to size×size (λ₁ per frame does not need the full frame; None keeps it).
    A one-shot iterator (``iter(x) is x``) cannot be read twice, so it is not used.
    """
    from recstab.data.degradations import Degradation, make_generator
    from recstab.diagnostics.figure2 import random_frames
    from recstab.diagnostics.onsets import _as_frame

    if frames < 2:
        raise ValueError(f"the Lyapunov clip needs >= 2 frames, got {frames}")
    channels = traits(model).in_channels
    task = task or traits(model).task
    degrade = Degradation(task, sigma * 255.0)
    clean = None
    if clean_frames is not None and iter(clean_frames) is not clean_frames:
        clean = []
        for i, f in enumerate(clean_frames):
            if i == frames:
                break
            clean.append(_as_frame(f, i))
        clean = torch.stack(clean) if clean else None
    if clean is None:
        side = size or 64
        clip = random_frames(frames, channels, side * degrade.scale, seed)
        what = f"{frames} i.i.d. uniform random frames of {side}×{side} (seed {seed})"
        real = False
    else:
        clip, real = clean, True
        what = f"frames 0-{len(clean) - 1} of the long video"
    if size is not None and real:
        s = size * degrade.scale
        h, w = clip.shape[-2:]
        if s < min(h, w):
            top, left = (h - s) // 2, (w - s) // 2
            clip = clip[..., top:top + s, left:left + s]
            what += f", centre {s}×{s} crop"
    h, w = clip.shape[-2] - clip.shape[-2] % degrade.scale, clip.shape[-1] - clip.shape[-1] % degrade.scale
    clip = clip[..., :h, :w]
    noisy = torch.stack([degrade(f, make_generator(seed, i)) for i, f in enumerate(clip)])
    return LyapunovInput(noisy[None], what + f" (degraded: {task}, sigma {sigma:.4g})", real)


def lyapunov(model: nn.Module, clip: torch.Tensor, **kwargs):
    """λ₁ of the recurrence (:func:`recstab.diagnostics.lyapunov_exponent`) on a 1×T×C×H×W clip."""
    from recstab.diagnostics import lyapunov_exponent
    param = next(iter(model.parameters()), None)
    if param is not None:
        clip = clip.to(param.device)
    with torch.inference_mode(False):
        return lyapunov_exponent(model, clip, **kwargs)


def lyapunov_metrics(result) -> dict:
    if result is None:
        return {}
    return {"stability/lyapunov": float(result.exponent), "stability/lyapunov_stderr": float(result.stderr)}


# ---------------------------------------------------------------------- onsets
def onsets(model: nn.Module, clean_frames, sigma: float = 30 / 255, **kwargs):
    """The long-video onset test (:func:`recstab.diagnostics.onsets.instability_onsets`)."""
    from recstab.diagnostics.onsets import instability_onsets
    return instability_onsets(model, clean_frames, sigma, **kwargs)


def onset_metrics(results) -> dict:
    """``long/*`` of one onset-test result, or of several pooled (onsets, frames and PSNR summed)."""
    from recstab.diagnostics.onsets import deciles

    results = [results] if not isinstance(results, (list, tuple)) else list(results)
    if not results:
        return {}
    pooled = [o for r in results for o in r.onsets]
    d1, d9 = deciles(pooled)
    psnr = np.concatenate([r.psnr for r in results])
    finite = psnr[np.isfinite(psnr)]
    seen = np.concatenate([r.input_psnr for r in results])
    seen = seen[np.isfinite(seen)]
    frames = sum(r.frames for r in results)
    seconds = sum(r.seconds for r in results)
    return {"long/onset_d1": float(d1), "long/onset_d9": float(d9), "long/n_onsets": float(len(pooled)),
            "long/n_divergences": float(sum(sum(r.divergent) for r in results)),
            "long/input_nonfinite": float(sum(len(r.input_nonfinite_frames) for r in results)),
            "long/frames": float(frames), "long/fps": frames / seconds if seconds > 0 else math.inf,
            "long/psnr_mean": float(finite.mean()) if len(finite) else math.nan,
            "long/input_psnr_mean": float(seen.mean()) if len(seen) else math.nan}


# ---------------------------------------------------------------------- the verdict
def decide(cert=None, trf_result=None, onset_result=None, lyap=None, *, measured_on: str | None = None,
           finite_memory: int | None = None) -> tuple[str, list]:
    """The verdict (see the module docstring) and the reasons/notes behind it, in words.

    Args:
        cert: the loop certificate (or None); trf_result, onset_result, lyap: the measurements
            (None: not run or failed).
        measured_on: what λ₁ was measured on, in words (named in the notes).
        finite_memory: processing resets the state every this many frames (burst by burst):
            no long-run λ₁ to measure; finite memory stands in for it.

    "proven unstable" needs a replayable demonstration: the TRF's (its ``demonstration`` diverged:
    a non-finite output, or growth by 10⁶ over the last doubling of a periodic replay, see
    :mod:`recstab.diagnostics.demonstration`; a TRFResult without one is not counted) or a
    feedback divergence of the long-video test. A TRF that found no growth is evidence only:
    "empirically stable" needs λ₁ < 0, the exponent of the *state* (it sees growth that a weak
    read-out hides), and a TRF replay that was not still growing (by ≥ ``GROWING``× over its
    second half) at the end of its budget.
    """
    GROWING = 2.0  # a TRF replay still growing by this factor over its second half blocks "empirically stable"
    notes = []
    demo = getattr(trf_result, "demonstration", None) if trf_result is not None else None
    trf_divergence = trf_result is not None and trf_result.verdict == "unbounded" and (
        demo.diverged if demo is not None else not hasattr(trf_result, "demonstration"))
    trf_growing = demo is not None and demo.status == "growing" and float(demo.growth) >= GROWING
    feedback = onset_result is not None and onset_result.diverged
    if trf_divergence:
        notes.append(f"the TRF stress test found a diverging sequence ({trf_result.reason})")
    elif trf_result is not None and trf_result.verdict == "unbounded":
        notes.append(f"the TRF said unbounded without a replayable demonstration (a TRF of an older version): "
                     f"not counted ({trf_result.reason})")
    if feedback:
        spans = ", ".join(f"{a}-{b}" for a, b in onset_result.divergences[:5])
        more = f" and {len(onset_result.divergences) - 5} more" if len(onset_result.divergences) > 5 else ""
        notes.append(f"the long-video test met {len(onset_result.divergences)} feedback divergence(s) on finite "
                     f"input: stream frames {spans}{more} (from the last reset to the diverged frame)")
    if onset_result is not None:
        bad = onset_result.n_onsets - sum(onset_result.divergent)
        if bad:
            notes.append(f"{bad} frame(s) with PSNR < 0 dB that are not feedback divergences (bad outputs; "
                         "the same frame from the initial state fails too, or the output stays within 10⁶× of it)")
        if onset_result.input_nonfinite_frames:
            notes.append(f"{len(onset_result.input_nonfinite_frames)} input frame(s) hold NaN/Inf (an "
                         "instability of the input, not of the model): state reset, not counted as onsets")
    if trf_result is not None and trf_result.verdict == "inconclusive":
        notes.append(f"TRF inconclusive: {trf_result.reason}")
    if trf_result is not None and trf_result.verdict == "bounded":
        notes.append(f"TRF: {trf_result.reason} (evidence, not proof)")
    margin = None
    if lyap is not None:
        margin = float(lyap.exponent)
        where = f" on {measured_on}" if measured_on else ""
        if margin > 0:
            ranges = ", ".join(f"{a}-{b - 1}" for a, b in list(lyap.positive_ranges)[:5])
            notes.append(f"λ₁ = {margin:+.3g} ± {float(lyap.stderr):.2g} > 0{where}: evidence (not proof) of "
                         "instability: nearby states separate on these frames"
                         + (f" (running exponent > 0 on stream frames {ranges})" if ranges else ""))
        else:
            notes.append(f"λ₁ = {margin:+.3g} ± {float(lyap.stderr):.2g}{where}: nearby states converge "
                         f"(Lyapunov margin {-margin:.3g} per frame)")
    if cert is not None and cert.certified:
        if trf_divergence or feedback:
            notes.append(f"CONTRADICTION: the certificate proves a contraction (L̂ = {cert.bound:.4g} < 1 in "
                         f"{cert.norm}) yet a divergence was found: one of the two is wrong, report it")
        notes.insert(0, f"certified: L̂ = {cert.bound:.4g} < 1 in {cert.norm}: the recurrence map is a contraction")
        return "certified stable", notes
    if cert is not None:
        notes.append(f"not certified: L̂ = {cert.bound:.4g} ≥ 1 in {cert.norm} (a bound ≥ 1 proves nothing)")
    if trf_divergence or feedback:
        return "proven unstable", notes
    if finite_memory is not None:
        notes.append(f"the state is reset every {finite_memory} frames: finite memory, no long-run λ₁; "
                     "no divergence was found")
        return "empirically stable", notes
    if trf_growing:
        notes.append(f"the TRF's replay output was still growing ({float(demo.growth):.3g}× over its second "
                     f"half, {demo.frames} frames): not empirically stable, whatever λ₁")
    if margin is not None and margin < 0 and not trf_growing:
        return "empirically stable", notes
    if margin is None:
        notes.append("λ₁ not measured: no divergence found, but no Lyapunov margin either")
    return "inconclusive", notes


def verdict_metrics(verdict: str) -> dict:
    return {"stability/verdict_code": float(VERDICTS.index(verdict))}


def json_value(value):
    """``json.dumps(..., default=json_value)``: numpy scalars and arrays as numbers, booleans and lists, paths
    and devices as strings, anything else as its repr (the reports and the sweep measurements write alike)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, torch.device)):
        return str(value)
    return repr(value)
