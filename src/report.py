"""Build a paper table from a finished sweep: ``python src/report.py sweep=<name> [dir=<sweep dir>[,<dir>...]] [out=<folder>] [wandb=false]``.

    python src/train.py -m sweep=table3 debug=smoke          # runs land in logs/table3/multiruns/<time>/
    python src/report.py sweep=table3                         # the newest of them
    python src/report.py sweep=table4 dir=logs/table2/multiruns/<t1>,logs/table3/multiruns/<t2>

Reads every run under ``dir`` (``.hydra/config.yaml``, ``metrics.json``, ``measurements.json``;
W&B is not needed), matches the runs to the rows of the paper's table in ``sweeps/<name>.yaml``
by their config values, and writes ``<out>/<name>.md``, ``<out>/<name>.csv`` (and ``<name>.png``
for the figures) — default ``out``: ``<first dir>/report`` — then prints the Markdown table.
A row whose jobs raised (``failed.json``, see src/train.py) is marked failed and its log named.

It also logs the report to the sweep's W&B group as a run with ``job_type="report"``
(:mod:`recstab.report.dashboard`: the comparison table, the per-row verdicts, the figure),
offline unless ``WANDB_MODE`` says otherwise, under ``<out>/wandb`` for ``wandb sync`` later;
``wandb=false`` skips it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USAGE = "usage: python src/report.py sweep=<name> [dir=<sweep dir>[,<dir>...]] [out=<folder>] [wandb=true|false]"


def parse(argv: list[str]) -> dict:
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("sweep", "dir", "out", "wandb"):
            raise SystemExit(f"unknown argument {arg!r}\n{USAGE}")
        args[key] = value
    if "sweep" not in args:
        raise SystemExit(f"sweep=<name> is required\n{USAGE}")
    if args.setdefault("wandb", "true") not in ("true", "false"):
        raise SystemExit(f"wandb must be true or false, got {args['wandb']!r}\n{USAGE}")
    return args


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    args = parse(argv)
    from recstab.report.tables import newest_sweep_dir, report, sweep_group

    log_dir = Path(os.environ.get("PROJECT_ROOT", ROOT)) / "logs"
    try:
        dirs = args["dir"].split(",") if args.get("dir") else [newest_sweep_dir(args["sweep"], log_dir)]
    except FileNotFoundError as error:
        print(f"report.py: {error}", file=sys.stderr)
        return 2
    try:
        table, files = report(args["sweep"], dirs, args.get("out"))
    except (FileNotFoundError, ValueError) as error:
        print(f"report.py: {error}", file=sys.stderr)
        return 2
    print(files["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in files.values()))
    if args["wandb"] == "true":
        from recstab.report.dashboard import log_report
        group = sweep_group(args["sweep"])
        folder = log_report(table, files, files["markdown"].parent, group=group, tags=[group])
        if folder is not None:
            print(f"W&B report run (job_type=report, group {group}): {folder}")
    if not any(row["runs"] for row in table.rows):
        print(f"no finished run of {args['sweep']} found under {', '.join(map(str, dirs))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
