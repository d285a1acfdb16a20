"""Diagnosis of recurrent video models (section 2.2, 3.1, appendices E, F, H).

    from recstab.diagnostics import temporal_receptive_field, instability_onsets
    trf = temporal_receptive_field(model, frames=81, size=64, iters=500)   # trf.verdict, trf.extent
    res = instability_onsets(model, LongVideo(loop_to=20000), sigma=30/255)  # res.onsets, res.deciles
    rep = stability_report(model, "logs/report", clean_frames=LongVideo())   # rep.verdict

- :mod:`.trf`: the TRF stress test (gradient-ascent search for an unstable sequence);
- :mod:`.onsets`: the long-video instability-onset test, and burst-by-burst processing;
- :mod:`.figure2`: untrained models of every temporal connection on random input;
- :mod:`.report`: all of it on one model, plus exact conv spectra and a Lipschitz bound.
"""

from recstab.diagnostics.figure2 import CONNECTIONS, Figure2Result, figure2
from recstab.diagnostics.onsets import (BurstProcessor, OnsetResult, burst_process, deciles,
                                        instability_onsets)
from recstab.diagnostics.report import (VERDICTS, StabilityReport, conv_spectra, lipschitz_bound,
                                        stability_report)
from recstab.diagnostics.trf import TRFResult, temporal_receptive_field

__all__ = ["temporal_receptive_field", "TRFResult", "instability_onsets", "OnsetResult", "deciles",
           "BurstProcessor", "burst_process", "stability_report", "StabilityReport", "VERDICTS",
           "conv_spectra", "lipschitz_bound", "figure2", "Figure2Result", "CONNECTIONS"]
