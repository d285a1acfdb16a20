"""The paper's tables from our runs (issue 5): measure after testing, collect, compare.

    from recstab.report import TableMeasurements, report
    # callbacks.measure in every sweep (sweeps/common/measure.yaml): params, spectra, TRF, onsets, fps
    table, files = report("table3", ["logs/table3/multiruns/<time>"])   # what src/report.py does

- :mod:`.measure`: :class:`TableMeasurements`, the callback that writes ``measurements.json``;
- :mod:`.tables`: collect run dirs (metrics.json, measurements.json, .hydra/config.yaml), match
  them to the paper's rows of ``sweeps/<name>.yaml`` and write Markdown, CSV (and a figure).

Not to be confused with :mod:`recstab.diagnostics.report`, the stability report of one model.
"""

from recstab.report.measure import TableMeasurements, device_info, measure_fps
from recstab.report.tables import Run, Table, build_table, collect_runs, load_paper, render_markdown, report

__all__ = ["TableMeasurements", "device_info", "measure_fps", "Run", "Table", "build_table", "collect_runs",
           "load_paper", "render_markdown", "report"]
