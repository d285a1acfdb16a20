"""Build a paper table from a finished sweep: ``python src/report.py sweep=<name> [dir=<sweep dir>[,<dir>...]] [out=<folder>] [wandb=false]``.

    python src/train.py -m sweep=table3 debug=smoke          # runs land in logs/table3/multiruns/<time>/
    python src/report.py sweep=table3                         # the newest of them
    python src/report.py sweep=table4 dir=logs/table2/multiruns/<t1>,logs/table3/multiruns/<t2>
    python src/report.py --help                               # (or sweep=table3 --cfg job: the composed config)

Root config: src/recstab/report/conf/report.yaml (a Hydra app like the other scripts; its own config
folder, because in conf/ ``sweep`` is the training sweeps' group). The work: :mod:`recstab.report`.
Reads every run under ``dir`` (``.hydra/config.yaml``, ``metrics.json``, ``measurements.json``;
W&B is not needed), matches the runs to the rows of the paper's table in ``sweeps/<name>.yaml``
by their config values, and writes ``<out>/<name>.md``, ``<out>/<name>.csv`` (and ``<name>.png``
for the figures) — default ``out``: ``<first dir>/report`` — then prints the Markdown table.
A row whose jobs raised (``failed.json``, see src/train.py) is marked failed and its log named.

It also logs the report to the sweep's W&B group as a run with ``job_type="report"``
(:mod:`recstab.report.dashboard`: the comparison table, the per-row verdicts, the figure),
offline unless ``WANDB_MODE`` says otherwise, under ``<out>/wandb`` for ``wandb sync`` later;
``wandb=false`` skips it. Exit status: 0, 1 when no run of the sweep was found, 2 on a user error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
USAGE = "usage: python src/report.py sweep=<name> [dir=<sweep dir>[,<dir>...]] [out=<folder>] [wandb=true|false]"


def hydra_list(arg: str) -> str:
    """``dir=a,b`` (the documented form) as Hydra's list ``dir=[a,b]``: to Hydra a bare comma list is a sweep."""
    key, sep, value = arg.partition("=")
    if key == "dir" and sep and "," in value and not value.startswith(("[", "'", '"')):
        return f"dir=[{value}]"
    return arg


def sweep_dirs(cfg: DictConfig) -> list[Path]:
    from recstab.report.tables import newest_sweep_dir

    if cfg.dir is None:
        return [newest_sweep_dir(cfg.sweep, Path(cfg.paths.log_dir))]
    dirs = list(cfg.dir) if OmegaConf.is_list(cfg.dir) else str(cfg.dir).split(",")
    return [Path(str(d)) for d in dirs]


@hydra.main(config_path="recstab/report/conf", config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from recstab.report.tables import report, sweep_group

    if OmegaConf.is_missing(cfg, "sweep"):
        raise SystemExit(f"sweep=<name> is required\n{USAGE}")
    if not isinstance(cfg.wandb, bool):
        raise SystemExit(f"wandb must be true or false, got {cfg.wandb!r}\n{USAGE}")
    try:
        dirs = sweep_dirs(cfg)
        table, files = report(str(cfg.sweep), dirs, cfg.out, sweeps=cfg.paths.sweeps_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"report.py: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(files["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in files.values()))
    if cfg.wandb:
        from recstab.report.dashboard import log_report
        group = sweep_group(str(cfg.sweep), cfg.paths.sweeps_dir)
        folder = log_report(table, files, files["markdown"].parent, group=group, tags=[group])
        if folder is not None:
            print(f"W&B report run (job_type=report, group {group}): {folder}")
    if not any(row["runs"] for row in table.rows):
        print(f"no finished run of {cfg.sweep} found under {', '.join(map(str, dirs))}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *map(hydra_list, sys.argv[1:])]
    main()
