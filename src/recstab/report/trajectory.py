"""Stability across training: what the stability monitor logged, against the training step.

During training, :class:`recstab.lit.stability_callbacks.StabilityMonitor` measures the model
every N validations and logs (to every logger, so also to ``<run dir>/csv/metrics.csv``):

- ``stability/lyapunov``: λ₁, the largest Lyapunov exponent of the recurrence per frame on
  real video (natural log; > 0: nearby states separate, < 0: they converge);
- ``stability/trf_growth_rate``: the growth rate of the TRF stress test's future outputs
  (> 0: the sequence found diverges);
- ``stability/bound``: L̂, the loop certificate (< 1: a proof of stability);
- ``stability/verdict_code``: the index of the verdict in
  :data:`recstab.diagnostics.engine.VERDICTS` (0 certified stable … 3 proven unstable).

:func:`draw_trajectories` draws the four against the step, one curve per run, in one PNG:
the picture of a model becoming (or not becoming) unstable as it learns to use its memory.
It needs only the CSV files: no torch, no W&B.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

PANELS = (
    ("stability/lyapunov", "λ₁ per frame (real video)", 0.0, "linear"),
    ("stability/trf_growth_rate", "TRF growth rate", 0.0, "linear"),
    ("stability/bound", "certified bound L̂", 1.0, "log"),
    ("stability/verdict_code", "verdict", None, "linear"),
)
VERDICT_LABELS = ("certified stable", "empirically stable", "inconclusive", "proven unstable")


def read_trajectory(csv_path: str | Path, keys=tuple(k for k, *_ in PANELS)) -> dict[str, tuple[list, list]]:
    """{key: (steps, values)} of every row of a Lightning CSV log where ``key`` has a finite value.

    Lightning's CSVLogger writes one row per logging call with empty cells for the other keys;
    the ``step`` column is the global step of the call.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path} (a run's csv/metrics.csv)")
    out: dict[str, tuple[list, list]] = {k: ([], []) for k in keys}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if step in (None, ""):
                continue
            for key in keys:
                cell = row.get(key)
                if cell in (None, ""):
                    continue
                value = float(cell)
                if math.isnan(value):
                    continue
                out[key][0].append(int(float(step)))
                out[key][1].append(value)
    return out


def draw_trajectories(runs: dict[str, str | Path], path: str | Path, title: str | None = None) -> Path | None:
    """One PNG of the stability metrics against the training step for each run.

    ``runs``: {label: run dir (holding csv/metrics.csv) or the CSV file itself}. Runs without
    any stability metric are skipped; returns None when no run has one.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for label, where in runs.items():
        where = Path(where)
        csv_path = where if where.suffix == ".csv" else where / "csv" / "metrics.csv"
        if not csv_path.is_file():
            continue
        data = read_trajectory(csv_path)
        if any(steps for steps, _ in data.values()):
            curves[label] = data
    if not curves:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (key, name, reference, scale) in zip(axes.flat, PANELS):
        for label, data in curves.items():
            steps, values = data[key]
            if not steps:
                continue
            if scale == "log":
                values = [v if v > 0 else math.nan for v in values]
                values = [min(v, 1e12) for v in values]
            ax.plot(steps, values, marker="o", ms=3, label=label)
        if reference is not None:
            ax.axhline(reference, color="k", lw=0.8, ls="--")
        ax.set_yscale(scale)  # before the verdict ticks: setting a scale resets the tick labels
        if key == "stability/verdict_code":
            ax.set_yticks(range(len(VERDICT_LABELS)), VERDICT_LABELS, fontsize=8)
            ax.set_ylim(-0.3, len(VERDICT_LABELS) - 0.7)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title or "stability across training", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
