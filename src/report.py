"""Build a paper table from a finished sweep: ``python src/report.py sweep=<name> [dir=<sweep dir>[,<dir>...]] [out=<folder>]``.

    python src/train.py -m sweep=table3 debug=smoke          # runs land in logs/table3/multiruns/<time>/
    python src/report.py sweep=table3                         # the newest of them
    python src/report.py sweep=table4 dir=logs/table2/multiruns/<t1>,logs/table3/multiruns/<t2>

Reads every run under ``dir`` (``.hydra/config.yaml``, ``metrics.json``, ``measurements.json``;
W&B is not needed), matches the runs to the rows of the paper's table in ``sweeps/<name>.yaml``
by their config values, and writes ``<out>/<name>.md``, ``<out>/<name>.csv`` (and ``<name>.png``
for the figures) — default ``out``: ``<first dir>/report`` — then prints the Markdown table.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USAGE = "usage: python src/report.py sweep=<name> [dir=<sweep dir>[,<dir>...]] [out=<folder>]"


def parse(argv: list[str]) -> dict:
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("sweep", "dir", "out"):
            raise SystemExit(f"unknown argument {arg!r}\n{USAGE}")
        args[key] = value
    if "sweep" not in args:
        raise SystemExit(f"sweep=<name> is required\n{USAGE}")
    return args


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    args = parse(argv)
    from recstab.report.tables import newest_sweep_dir, report

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
    if not any(row["runs"] for row in table.rows):
        print(f"no finished run of {args['sweep']} found under {', '.join(map(str, dirs))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
