"""Build a paper table from finished runs: our numbers beside the paper's.

A sweep file ``sweeps/<name>.yaml`` holds, next to its Hydra sweep, a ``paper:`` node:

    paper:
      title: "Table 3: SRN and SRN-C ... on VResNet-feat"
      columns: [psnr_7, onset_d1, onset_d9, trf, sigma1, srank]
      rows:
        - {name: "SRN-C α=2.0 β=0.1", row: srnc_2.0_0.1, psnr_7: 35.59, onset_d1: .inf, ...}

A row names what made its runs, never a hand-written list of the config values to match. Its keys:

- ``name`` (required): the row's label; ``note``: a remark; the table's ``columns``: the paper's numbers;
- ``row: <row>``: the runs of the row file ``conf/row/<row>.yaml`` (its groups and the values it sets);
- ``model|recurrence|norm|task: <option>``: a group option, where the sweep sweeps a group (Fig. 7:
  ``{name: VResNet-mf3, recurrence: mf3}``, Table 2: ``{name: VDnCNN-frame, model: vdncnn, recurrence: frame}``);
- ``<dotted.key>: <value>``: a config value, as ``key=value`` on the command line, where the sweep sweeps a
  plain value (Table 7: ``module.dampening: 0.95``) or a row is a row file with one value changed
  (``{row: certified_0.5, norm.base: null}``);
- ``not_run: <why>``: a row of the paper's only, which no run of ours fills (Table 1's VNLB).

The groups a row leaves out are the sweep file's (its ``override /<group>: <option>`` defaults), else
conf/train.yaml's. From these :mod:`recstab.report.rows` derives each row's identity (the options of
model, recurrence, norm and task, and the values) and matches runs to it: by their Hydra choices and config
values, so a run trained by hand with the row's settings fills it too, and so do runs of another sweep with
the same model (``dir=a,b``).

:func:`collect_runs` reads every run dir under the sweep dir(s) — ``.hydra/config.yaml``, ``.hydra/hydra.yaml``
(the group choices), ``metrics.json`` (written by src/train.py), ``measurements.json`` (written by
:class:`recstab.report.TableMeasurements`) and, for keys missing from both, the last value of
``csv/metrics.csv``. W&B is not needed. :func:`build_table` gives each run to its row (the most specific
row it matches, :func:`recstab.report.rows.best_row`), averages repeated runs (seeds), and lists runs that
match no paper row after the paper's rows. :func:`render_markdown` / :func:`write_csv` write it out.

A job of a ``-m`` sweep that raised leaves ``failed.json`` in its run dir (src/train.py):
its row is marked failed (``failed`` in every cell of ours when no run of the row
finished) and the notes name the job's log.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from recstab.report.rows import best_row, derive, sweep_choices

FAILED = "failed"  # our value in every column of a row whose every job raised (failed.json)

MEASURED = ("stability/", "spectra/", "long/")  # the keys of one stability measurement (diagnostics.measure)
STABLE_MARK = {"certified stable": "✓ (certified)", "empirically stable": "✓", "proven unstable": "✗",
               "inconclusive": "?"}

# column -> (header, metric key or None for derived columns, format)
COLUMNS = {
    "params": ("# param.", "params/count", "params"),
    "fps": ("fps", "speed/fps", "fps"),
    "psnr_mean": ("PSNR_mean", "test/psnr_mean", "{:.2f}"),
    "lpips_7": ("LPIPS_7", "test/lpips_7", "{:.3f}"),
    "onset_d1": ("1st dec.", "long/onset_d1", "onset"),
    "onset_d9": ("9th dec.", "long/onset_d9", "onset"),
    "n_onsets": ("# inst.", "long/n_onsets", "{:.0f}"),
    "long_psnr": ("PSNR long video", "long/psnr_mean", "{:.2f}"),
    "trf": ("TRF", None, "text"),
    "stable": ("Stable", None, "text"),
    "sigma1": ("σ1 (mean)", "spectra/sigma1_mean", "{:.2f}"),
    "srank": ("srank/(n²m)", "spectra/srank_ratio_mean", "{:.3f}"),
    "verdict": ("verdict", "stability/verdict", "text"),
    "bound": ("L̂", "stability/bound", "{:.3g}"),
    "lyapunov": ("λ₁", "stability/lyapunov", "{:+.3f}"),
    "trf_growth": ("TRF growth", "stability/trf_growth_rate", "{:+.3f}"),
    "step_s": ("CPU s/step", "speed/train_step_cpu_s", "{:.2f}"),
}


@dataclass
class Run:
    path: Path
    config: DictConfig
    metrics: dict
    name: str
    notes: list = field(default_factory=list)
    failure: dict | None = None   # failed.json of a sweep job that raised: error, traceback, log
    choices: dict = field(default_factory=dict)  # hydra.runtime.choices (.hydra/hydra.yaml): group -> option

    def value(self, key: str):
        """A config value (dotted key), resolved when possible, else None."""
        try:
            return OmegaConf.select(self.config, key, throw_on_resolution_failure=False)
        except Exception:
            return None


def sweeps_dir() -> Path:
    """Where the sweep files live: ``$PROJECT_ROOT/sweeps`` (the scripts in src/ set PROJECT_ROOT to the
    repository; src/report.py passes its ``paths.sweeps_dir`` explicitly), else ``./sweeps``."""
    return Path(os.environ.get("PROJECT_ROOT", ".")) / "sweeps"


def sweep_file(sweep: str, folder: str | Path | None = None) -> Path:
    """``<folder>/<sweep>.yaml`` (default folder: :func:`sweeps_dir`); FileNotFoundError listing the sweeps."""
    folder = Path(folder) if folder is not None else sweeps_dir()
    path = folder / f"{sweep}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise FileNotFoundError(f"no sweep {sweep!r} in {folder}; sweeps: {', '.join(names) or 'none'}")
    return path


def conf_dir(sweeps: str | Path | None = None) -> Path:
    """The config folder beside the sweeps folder (conf/sweep links to ../sweeps): ``<sweeps>/../conf``."""
    return Path(sweeps if sweeps is not None else sweeps_dir()).resolve().parent / "conf"


def load_paper(sweep: str, folder: str | Path | None = None) -> dict:
    """The ``paper:`` node of sweeps/<sweep>.yaml as dicts and lists, each row with its ``identity``
    (:func:`recstab.report.rows.derive`; None for a ``not_run`` row). ValueError naming the bad row."""
    path = sweep_file(sweep, folder)
    node = OmegaConf.load(path)
    if node.get("paper") is None:
        raise ValueError(f"sweeps/{sweep}.yaml has no `paper:` node")
    paper = OmegaConf.to_container(node.paper, resolve=False)
    conf = conf_dir(path.parent)
    choices = sweep_choices(OmegaConf.to_container(node.defaults) if "defaults" in node else None, conf, path)
    try:
        paper["rows"] = [{**spec, "identity": derive(spec, choices, conf, paper["columns"])} for spec in paper["rows"]]
    except ValueError as error:
        raise ValueError(f"sweeps/{sweep}.yaml: {error}") from None
    return paper


def sweep_group(sweep: str, folder: str | Path | None = None) -> str:
    """The W&B group the training runs of sweeps/<sweep>.yaml log to (its ``group:``; default its name)."""
    return str(OmegaConf.load(sweep_file(sweep, folder)).get("group") or sweep)


def _last_csv_values(path: Path) -> dict:
    values: dict = {}
    if not path.is_file():
        return values
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key and value not in (None, ""):
                    try:
                        values[key] = float(value)
                    except ValueError:
                        pass
    return values


def load_run(path: Path) -> Run | None:
    """One run dir -> Run (None when it has no config or finished nothing)."""
    config_file = path / ".hydra" / "config.yaml"
    if not config_file.is_file():
        return None
    config = OmegaConf.load(config_file)
    metrics, notes = {}, []
    for key, value in _last_csv_values(path / "csv" / "metrics.csv").items():
        metrics[key] = value
    if (path / "metrics.json").is_file():
        metrics.update(json.loads((path / "metrics.json").read_text()))
    else:
        notes.append("no metrics.json (unfinished?)")
    extra = {}
    if (path / "measurements.json").is_file():  # the sweep's measurement of the tested weights: every stability
        extra = json.loads((path / "measurements.json").read_text())  # column and the verdict come from it alone
        metrics = {k: v for k, v in metrics.items() if not k.startswith(MEASURED)}
        metrics.update(extra.get("metrics", {}))
    metrics["_device_name"] = (extra.get("device") or {}).get("device_name")
    metrics["_fps_size"] = (extra.get("fps") or {})
    failure = json.loads((path / "failed.json").read_text()) if (path / "failed.json").is_file() else None
    if failure is not None:
        notes = []  # "no metrics.json" says nothing more than the failure does
    hydra_file = path / ".hydra" / "hydra.yaml"  # absent: matched on config values (recstab.report.rows)
    choices = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices") if hydra_file.is_file() else None
    choices = OmegaConf.to_container(choices) if choices else {}
    return Run(path, config, metrics, run_name(config, choices) or path.name, notes, failure, choices)


def run_name(config, choices: dict) -> str | None:
    """The run's ``run_name`` as its own run resolved it: ``${hydra:runtime.choices.<group>}`` read from its
    ``.hydra/hydra.yaml`` choices (outside that run no Hydra runtime answers it). None if it does not resolve."""
    raw = OmegaConf.to_container(config, resolve=False).get("run_name")
    if isinstance(raw, str) and "${hydra:runtime.choices." in raw:
        config = config.copy()
        config.run_name = re.sub(r"\$\{hydra:runtime\.choices\.([\w/]+)\}",
                                 lambda m: str(choices.get(m.group(1), m.group(0))), raw)
    name = OmegaConf.select(config, "run_name", throw_on_resolution_failure=False)
    return None if name is None else str(name)


def collect_runs(dirs) -> list[Run]:
    """Every finished or failed run under the given sweep (or run) dirs, in path order."""
    runs = []
    for d in [Path(d) for d in ([dirs] if isinstance(dirs, (str, Path)) else dirs)]:
        if not d.is_dir():
            raise FileNotFoundError(f"sweep dir {d} does not exist")
        for config in sorted(d.rglob(".hydra/config.yaml")):
            run = load_run(config.parent.parent)
            if run is not None and (run.failure is not None or (run.path / "metrics.json").is_file()
                                    or (run.path / "measurements.json").is_file()):
                runs.append(run)
    return runs


def _psnr_last(metrics: dict) -> tuple[float | None, int | None]:
    """test/psnr_7, else the PSNR of the last test frame (clips shorter than 7 frames, e.g. smoke)."""
    if "test/psnr_7" in metrics:
        return metrics["test/psnr_7"], 7
    frames = [int(k.rsplit("_", 1)[1]) for k in metrics if k.startswith("test/psnr_") and k[10:].isdigit()]
    if not frames:
        return None, None
    return metrics[f"test/psnr_{max(frames)}"], max(frames)


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    if any(math.isinf(v) for v in values):
        finite = [v for v in values if not math.isinf(v)]
        return math.inf if not finite else sum(finite) / len(finite)  # ∞ only when no run broke
    return sum(values) / len(values)


def our_value(column: str, runs: list[Run], notes: set, last_frame: bool = True):
    """Our value of one column over the runs of one row (mean over repeated runs).

    ``last_frame``: PSNR_7 falls back to the last frame of shorter clips (not in per-frame tables).
    """
    if not runs:
        return None
    ms = [r.metrics for r in runs]
    if column == "psnr_7" and last_frame:
        values = [_psnr_last(m) for m in ms]
        for _, t in values:
            if t is not None and t != 7:
                notes.add(f"PSNR_7: clips have {t} frames here (debug/short clips): PSNR of frame {t} shown")
        return _mean([v for v, _ in values])
    if column.startswith("psnr_") and column[5:].isdigit():
        return _mean([m.get(f"test/{column}") for m in ms])
    if column == "trf":
        # the measurement engine's keys; "trf/*" in measurements written before it
        verdicts = [v for v in (m.get("stability/trf_unbounded", m.get("trf/unbounded")) for m in ms) if v is not None]
        if not verdicts:
            return None
        extent = _mean([m.get("stability/trf_extent", m.get("trf/extent")) for m in ms])
        if all(v >= 0.5 for v in verdicts):
            return "unbounded"
        if all(v < 0.5 for v in verdicts):
            return f"bounded ({extent:.0f} fr.)" if extent is not None else "bounded"
        return f"mixed ({sum(v >= 0.5 for v in verdicts)}/{len(verdicts)} unbounded)"
    if column == "stable":  # the measurement's own verdict (recstab.diagnostics.engine.decide), in one symbol
        marks = {STABLE_MARK.get(m.get("stability/verdict"), "?") for m in ms if m.get("stability/verdict")}
        return " / ".join(sorted(marks)) or None
    if column not in COLUMNS:
        raise KeyError(f"unknown column {column!r}; columns: psnr_1..psnr_T, psnr_7, {', '.join(COLUMNS)}")
    if COLUMNS[column][2] == "text":  # a string metric (the verdict): the runs' values, joined when they differ
        return " / ".join(sorted({str(m[COLUMNS[column][1]]) for m in ms if m.get(COLUMNS[column][1]) is not None})) or None
    return _mean([m.get(COLUMNS[column][1]) for m in ms])


def fmt(column: str, value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "✓" if value else "✗"
    spec = COLUMNS.get(column, (None, None, "{:.2f}"))[2]
    if spec == "onset" or (isinstance(value, float) and math.isinf(value)):
        return "∞" if math.isinf(value) else f"{value:.0f}"
    if spec == "params":
        return "n/a" if value == 0 else (f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.0f}k")
    if spec == "text":
        return str(value)
    if spec == "fps":
        return f"{value:.2g}" if value < 10 else f"{value:.0f}"
    return spec.format(value)


def header(column: str) -> str:
    if column in COLUMNS:
        return COLUMNS[column][0]
    return column.replace("psnr_", "PSNR_")


@dataclass
class Table:
    sweep: str
    title: str
    columns: list
    rows: list          # dicts: name, runs, failed, status, dirs, logs, ours{col: value}, paper{col: value}
    notes: list


def build_table(sweep: str, runs: list[Run], paper: dict | None = None) -> Table:
    """Give each run to its paper row (:func:`recstab.report.rows.best_row`); our values beside the paper's.
    ``paper``: :func:`load_paper`'s; a hand-made one's rows without ``identity`` are derived on conf/train.yaml
    alone (no sweep file)."""
    paper = paper or load_paper(sweep)
    columns = list(paper["columns"])
    train = None if all("identity" in spec for spec in paper["rows"]) else sweep_choices(None, conf_dir())
    identities = [spec["identity"] if "identity" in spec else derive(spec, train, conf_dir(), columns)
                  for spec in paper["rows"]]
    owner = {id(run): best_row(run, identities) for run in runs}  # run -> index of its row (None: no row)
    last = not any(f"psnr_{t}" in columns for t in range(2, 7))  # per-frame tables show frames as they are
    notes: set = set()
    rows = []

    def row(name: str, matched: list[Run], paper_values: dict, note: str = "") -> dict:
        ok = [r for r in matched if r.failure is None]
        failed = [r for r in matched if r.failure is not None]
        for r in failed:
            notes.add(f"{name}: job {r.path.name} failed ({r.failure.get('error', '?').splitlines()[0]}); "
                      f"log: {r.failure.get('log') or r.path}")
        ours = {c: our_value(c, ok, notes, last) for c in columns}
        if failed and not ok:
            ours = {c: FAILED for c in columns}
        status = "failed" if failed and not ok else "partly failed" if failed else "ok" if ok else "not run"
        return {"name": name, "runs": len(ok), "failed": len(failed), "status": status,
                "dirs": [str(r.path) for r in matched], "logs": [r.failure.get("log") or str(r.path) for r in failed],
                "ours": ours, "paper": paper_values, "note": note}

    for i, spec in enumerate(paper["rows"]):
        mine = [r for r in runs if owner[id(r)] == i]
        rows.append(row(spec["name"], mine, {c: spec.get(c) for c in columns}, spec.get("note", "")))
    for run in runs:
        if owner[id(run)] is None:
            rows.append(row(f"{run.name} (not in the paper)", [run], {c: None for c in columns}))
    if "fps" in columns:
        devices = sorted({str(r.metrics.get("_device_name")) for r in runs if r.metrics.get("_device_name")})
        sizes = sorted({f"{s.get('width')}×{s.get('height')}" for r in runs if (s := r.metrics.get("_fps_size"))})
        notes.add(f"fps (ours): measured at {', '.join(sizes) or '?'} on {', '.join(devices) or '?'}, frame by "
                  "frame; the paper's: its authors' GPU (TensorFlow), an order of magnitude only")
    for run in runs:
        notes.update(f"{run.path.name}: {n}" for n in run.notes)
    notes.update(paper.get("notes") or [])
    return Table(sweep, paper.get("title", sweep), columns, rows, sorted(notes))


def render_markdown(table: Table) -> str:
    cells = ["model", "runs"]
    for c in table.columns:
        cells += [header(c), f"{header(c)} paper"]
    lines = [f"## {table.title}", "", "| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]
    for row in table.rows:
        cells = [row["name"], f"{row['runs']} + {row['failed']} failed" if row["failed"] else str(row["runs"])]
        for c in table.columns:
            cells += [fmt(c, row["ours"][c]) or "—", fmt(c, row["paper"][c]) or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    if table.notes:
        lines += [""] + [f"- {n}" for n in table.notes]
    return "\n".join(lines) + "\n"


def comparison_rows(table: Table, cell=lambda value: value) -> tuple[list[str], list[list]]:
    """The table as (columns, rows), ours beside the paper's: model, runs, failed, status, then ``<c>``,
    ``paper_<c>`` for every column, each value through ``cell`` (the CSV's and the W&B table's formats)."""
    columns = ["model", "runs", "failed", "status"] + [x for c in table.columns for x in (c, f"paper_{c}")]
    data = [[row["name"], row["runs"], row["failed"], row["status"]]
            + [cell(row[side][c]) for c in table.columns for side in ("ours", "paper")] for row in table.rows]
    return columns, data


def write_csv(table: Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns, data = comparison_rows(table, _raw)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns + ["run_dirs", "failed_logs"])
        for row, cells in zip(table.rows, data):
            writer.writerow(cells + [";".join(row["dirs"]), ";".join(str(p) for p in row["logs"])])
    return path


def _raw(value):
    if value is None:
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def draw_figure(table: Table, runs: list[Run], paper: dict, path: Path) -> Path | None:
    """The figure of a `paper.figure` spec: psnr_per_frame (Fig. 7), onsets_vs (Fig. 12), long_psnr (Fig. 9)."""
    spec = paper.get("figure")
    if not spec or not runs:
        return None
    if spec["kind"] == "stability_trajectory":  # the stability monitor's metrics against the step, per run
        from recstab.report.trajectory import draw_trajectories
        names = [run.name for run in runs]  # runs of one name (seeds, several dirs) keep a curve each
        labels = [f"{run.name} ({run.path.name})" if names.count(run.name) > 1 else run.name for run in runs]
        return draw_trajectories(dict(zip(labels, (run.path for run in runs))), path, table.title)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    kind = spec["kind"]
    if kind == "psnr_per_frame":
        for run in runs:
            frames = sorted(int(k[10:]) for k in run.metrics if k.startswith("test/psnr_") and k[10:].isdigit())
            ax.plot(frames, [run.metrics[f"test/psnr_{t}"] for t in frames], marker="o", label=run.name)
        ax.set(xlabel="frame", ylabel="PSNR (dB)")
    elif kind == "onsets_vs":
        pts = sorted((float(run.value(spec["x"])), run.metrics.get("long/onset_d1"), run.metrics.get("long/onset_d9"))
                     for run in runs if run.value(spec["x"]) is not None)
        for i, label in ((1, "1st decile"), (2, "9th decile")):
            ys = [p[i] if p[i] is not None and math.isfinite(p[i]) else np.nan for p in pts]
            ax.plot([p[0] for p in pts], ys, marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel=spec.get("xlabel", spec["x"]), ylabel="instability onset (frames)")
    elif kind == "long_psnr":
        for run in runs:
            f = run.path / "measure" / "long_psnr.npy"
            if f.is_file():
                ax.plot(np.clip(np.load(f), -10, 60), lw=0.7, label=run.name)
        ax.set(xlabel="frame", ylabel="PSNR (dB)")
    ax.set_title(table.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def newest_sweep_dir(sweep: str, log_dir: Path) -> Path:
    """logs/<sweep>/multiruns/<newest>: where `python src/train.py -m sweep=<sweep>` wrote last."""
    candidates = sorted((log_dir / sweep / "multiruns").glob("*"))
    if not candidates:
        raise FileNotFoundError(f"no runs of sweep {sweep!r} under {log_dir / sweep / 'multiruns'}; "
                                f"pass dir=<sweep dir>")
    return candidates[-1]


def report(sweep: str, dirs, out: Path | None = None, sweeps: str | Path | None = None) -> tuple[Table, dict]:
    """Collect, build, write <out>/<sweep>.md, .csv (and .png for figures); return (table, files).
    ``sweeps``: the folder of the sweep files (default :func:`sweeps_dir`)."""
    dirs = [Path(d) for d in ([dirs] if isinstance(dirs, (str, Path)) else dirs)]
    paper = load_paper(sweep, sweeps)
    runs = collect_runs(dirs)
    table = build_table(sweep, runs, paper)
    out = Path(out) if out else dirs[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / f"{sweep}.md", "csv": write_csv(table, out / f"{sweep}.csv")}
    files["markdown"].write_text(render_markdown(table))
    figure = draw_figure(table, [r for r in runs if r.failure is None], paper, out / f"{sweep}.png")
    if figure:
        files["figure"] = figure
    return table, files
