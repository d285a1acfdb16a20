"""The paper's tables from our runs: measure after testing, collect, compare.

    from recstab.report import TableMeasurements, report
    # callbacks.measure in every sweep (sweeps/common/measure.yaml): params, spectra, TRF, onsets, fps
    table, files = report("table3", ["logs/table3/multiruns/<time>"])   # what src/report.py does

- :mod:`.measure`: :class:`TableMeasurements`, the callback that writes ``measurements.json``;
- :mod:`.tables`: collect run dirs (metrics.json, measurements.json, failed.json, .hydra/config.yaml),
  match them to the paper's rows of ``sweeps/<name>.yaml`` and write Markdown, CSV (and a figure);
- :mod:`.dashboard`: the same report as a ``job_type="report"`` W&B run of the sweep's group
  (comparison table, per-row verdicts, figure).

Not to be confused with :mod:`recstab.diagnostics.report`, the stability report of one model.
The callback is imported lazily: building a table needs neither torch nor Lightning.
"""

from recstab.report.tables import Run, Table, build_table, collect_runs, load_paper, render_markdown, report

_MEASURE = ("TableMeasurements", "device_info", "measure_fps")


def __getattr__(name: str):
    if name in _MEASURE:
        from recstab.report import measure
        return getattr(measure, name)
    raise AttributeError(f"module 'recstab.report' has no attribute {name!r}")


__all__ = [*_MEASURE, "Run", "Table", "build_table", "collect_runs", "load_paper", "render_markdown", "report"]
