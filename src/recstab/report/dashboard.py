"""A sweep's W&B dashboard: the report of a finished sweep logged next to its training runs.

Every training run of a sweep is in the W&B group of the sweep (``group``, ``tags`` and
``job_type=train`` in conf/logger/wandb.yaml). :func:`log_report` adds one run with
``job_type="report"`` to the same group, holding

- ``comparison``: the paper's table with our numbers and the paper's side by side
  (one row per paper row, ``<column>`` and ``paper_<column>``), a ``wandb.Table``;
- ``verdicts``: one line per row — its status (ok / failed / not run), our stability
  verdict and the paper's (from the onset deciles, the TRF and the Stable column), whether
  they agree, and the PSNR difference ours − paper on the table's PSNR column;
- ``figure``: the table's figure (Figs. 7, 9, 12) as a ``wandb.Image``;
- the Markdown and CSV files of the report.

Offline by default (``WANDB_MODE=offline``): the run is written under ``<dir>/wandb``
(the report folder inside the sweep dir), for ``wandb sync <dir>/wandb/offline-run-*``
later. :func:`verdicts` needs no W&B.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from recstab.lit.publish import publish_image, publish_summary, publish_table
from recstab.report.tables import Table, comparison_rows

PSNR_COLUMNS = ("psnr_7", "psnr_mean", "psnr_1", "long_psnr")


def _stability(values: dict) -> str | None:
    """stable / unstable from a row's onset, TRF and Stable cells (ours or the paper's); None: not measured."""
    says = []
    stable = values.get("stable")
    if stable is not None:
        says.append(stable in (True, "✓"))
    d1 = values.get("onset_d1")
    if isinstance(d1, (int, float)) and not isinstance(d1, bool):
        says.append(math.isinf(d1))
    trf = values.get("trf")
    if isinstance(trf, str) and trf.split(" ")[0] in ("bounded", "unbounded", "mixed"):
        says.append(trf.startswith("bounded"))
    if not says:
        return None
    return "stable" if all(says) else "unstable"


def verdicts(table: Table) -> list[dict]:
    """One verdict per row of the table: status, our and the paper's stability, agreement, ΔPSNR."""
    out = []
    psnr = next((c for c in PSNR_COLUMNS if c in table.columns), None)
    for row in table.rows:
        measured = row["status"] not in ("failed", "not run")
        ours = _stability(row["ours"]) if measured else None
        paper = _stability(row["paper"])
        delta = None
        if psnr and isinstance(row["ours"].get(psnr), float) and isinstance(row["paper"].get(psnr), (int, float)):
            delta = row["ours"][psnr] - float(row["paper"][psnr])
        out.append({"model": row["name"], "status": row["status"], "runs": row["runs"], "failed": row["failed"],
                    "ours": ours or ("not measured" if measured else row["status"]),
                    "paper": paper or "not given",
                    "agrees": None if ours is None or paper is None else ours == paper,
                    "psnr_column": psnr, "psnr_minus_paper": delta,
                    "failed_logs": ";".join(str(p) for p in row["logs"])})
    return out


def _cell(value):
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def log_report(table: Table, files: dict, dir: Path, group: str | None = None, project: str = "recstab",
               tags: list | None = None, name: str | None = None):
    """Log the report as a ``job_type="report"`` W&B run of the sweep's group; return the run's folder.

    ``dir``: where W&B writes (the offline run lands in ``<dir>/wandb/offline-run-*``). Returns
    None under ``WANDB_MODE=disabled``.
    """
    os.environ.setdefault("WANDB_MODE", "offline")  # no account needed; WANDB_MODE=online to sync at once
    import wandb

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, group=group or table.sweep, job_type="report",
                     name=name or f"{table.sweep}-report", tags=list(tags or [table.sweep]), dir=str(dir),
                     config={"sweep": table.sweep, "title": table.title, "columns": table.columns})
    try:
        columns, data = comparison_rows(table, _cell)  # ∞ as text, NaN as empty
        publish_table(run, "comparison", columns, data)
        rows = verdicts(table)
        keys = list(rows[0]) if rows else ["model"]
        publish_table(run, "verdicts", keys, [[r[k] for k in keys] for r in rows])
        if files.get("figure"):
            publish_image(run, "figure", files["figure"])
        for key in ("markdown", "csv"):
            if files.get(key):
                run.save(str(files[key]), base_path=str(Path(files[key]).parent), policy="now")
        failed = sum(r["failed"] for r in table.rows)
        publish_summary(run, {"rows": len(table.rows), "rows_filled": sum(bool(r["runs"]) for r in table.rows),
                              "jobs_failed": failed, "notes": "\n".join(table.notes)})
        folder = Path(run.dir).parent if not getattr(run, "disabled", False) else None
    finally:
        run.finish()
    return folder
