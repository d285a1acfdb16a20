"""Diagnosis of recurrent video models (section 2.2, 3.1, appendices E, F, H).

    from recstab.diagnostics import temporal_receptive_field, instability_onsets
    trf = temporal_receptive_field(model, frames=81, size=64, iters=500)   # trf.verdict, trf.extent
    res = instability_onsets(model, LongVideo(loop_to=20000), sigma=30/255)  # res.onsets, res.deciles
    rep = stability_report(model, "logs/report", clean_frames=LongVideo())   # rep.verdict

- :mod:`.trf`: the TRF stress test (gradient-ascent search for an unstable sequence);
- :mod:`.lyapunov`: the largest Lyapunov exponent λ₁ of the recurrence (Benettin, JVPs);
- :mod:`.onsets`: the long-video instability-onset test, and burst-by-burst processing;
- :mod:`recstab.models.certificate`: ``loop_certificate(model)``, the proven bound of the loop;
- :mod:`.figure2`: untrained models of every temporal connection on random input;
- :mod:`.engine`: each measurement's function and metrics, and the verdict rule (``decide``);
- :mod:`.workfiles`: resumable work files keyed by what they measured (``ResumeMismatch`` otherwise);
- :mod:`.measure`: ``measure(model, spec) -> Measurements``, the one driver every caller uses;
- :mod:`.report`: a measurement written section by section into a report folder (``src/diagnose.py``).

Nothing here logs to W&B: callers publish (:mod:`recstab.lit.publish`).
"""

from recstab.diagnostics.demonstration import Demonstration, demonstrate, replay
from recstab.diagnostics.figure2 import Figure2Result, figure2
from recstab.diagnostics.onsets import (BurstProcessor, OnsetResult, burst_process, deciles,
                                        instability_onsets)
from recstab.diagnostics.measure import SECTIONS, Diagnostic, Measurements, MeasureSpec, measure
from recstab.diagnostics.report import VERDICTS, StabilityReport, conv_spectra, stability_report
from recstab.diagnostics.lyapunov import LyapunovResult, lyapunov_exponent
from recstab.diagnostics.trf import TRFResult, temporal_receptive_field
from recstab.diagnostics.workfiles import ResumeMismatch, model_fingerprint
from recstab.models.certificate import (LoopCertificate, chain_certificate, default_conv_norm, loop_certificate,
                                        triangular_certificate)

__all__ = ["demonstrate", "replay", "Demonstration", "measure", "MeasureSpec", "Measurements", "Diagnostic", "SECTIONS", "temporal_receptive_field", "TRFResult", "lyapunov_exponent", "LyapunovResult",
           "instability_onsets", "OnsetResult", "deciles",
           "BurstProcessor", "burst_process", "stability_report", "StabilityReport", "VERDICTS",
           "conv_spectra", "figure2", "Figure2Result", "loop_certificate", "LoopCertificate",
           "chain_certificate", "triangular_certificate", "default_conv_norm", "ResumeMismatch", "model_fingerprint"]
