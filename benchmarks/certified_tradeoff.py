"""The quality of norm=certified against rho: table and trade-off figure from finished runs.

    python benchmarks/certified_tradeoff.py logs/certified/multiruns/<time>            # a sweep=certified
    python benchmarks/certified_tradeoff.py logs/train/runs/<t1> logs/train/runs/<t2> ...  # single runs
    (--out benchmarks/results: writes certified_table.md and certified_tradeoff.png there)

Runs are matched to the rows of sweeps/certified.yaml by their config (norm name, rho, alpha, beta), as
src/report.py does. The figure: test PSNR_mean and PSNR_7 − PSNR_1 against rho for the certified runs, the
unconstrained and SRN-C runs as horizontal lines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recstab.report.tables import build_table, collect_runs, fmt, load_paper


def rows(dirs: list[str]) -> tuple[list[dict], list[str]]:
    runs = collect_runs(dirs)
    table = build_table("certified", runs, load_paper("certified"))
    out = []
    for row in table.rows:
        if not row["runs"]:
            continue
        matched = [r for r in runs if str(r.path) in row["dirs"]]
        ours = dict(row["ours"])
        ours["gain"] = (ours["psnr_7"] - ours["psnr_1"]) if ours.get("psnr_7") is not None else None
        certified = matched[0].value("norm.name") == "certified"
        rho = matched[0].value("norm.rho") if certified else None
        family = ("certified + SRN-C base" if matched[0].value("norm.base") is not None else "certified, base=null") \
            if certified else None
        out.append({"name": row["name"], "rho": rho, "family": family, "dirs": row["dirs"], **ours})
    return out, table.notes


def markdown(table: list[dict]) -> str:
    cols = ["psnr_mean", "psnr_1", "psnr_7", "gain", "bound", "lyapunov", "verdict"]
    head = ["model", "PSNR_mean", "PSNR_1", "PSNR_7", "PSNR_7 − PSNR_1", "L̂", "λ₁", "verdict", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["name"]] + [fmt("psnr_mean" if c == "gain" else c, r.get(c)) or "—" for c in cols]
        cells[4] = f"{r['gain']:+.2f}" if r.get("gain") is not None else "—"
        lines.append("| " + " | ".join(cells + [", ".join(Path(d).name for d in r["dirs"])]) + " |")
    return "\n".join(lines) + "\n"


def figure(table: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r["family"] for r in table if r["rho"] is not None})
    references = [r for r in table if r["rho"] is None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "psnr_mean", "test PSNR_mean (dB)"), (axes[1], "gain", "PSNR_7 − PSNR_1 (dB)")):
        for j, family in enumerate(families):
            certified = sorted((r for r in table if r["family"] == family), key=lambda r: r["rho"])
            ax.plot([r["rho"] for r in certified], [r[key] for r in certified], marker="o", color=f"C{j}",
                    label=f"{family} (L̂ ≤ ρ)")
        for i, r in enumerate(references):
            ax.axhline(r[key], color=f"C{i + len(families)}", ls="--",
                       label=f"{r['name']} (L̂ = {fmt('bound', r['bound'])})")
        ax.set(xlabel="ρ (certified contraction factor)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[1].axhline(0.3, color="grey", lw=0.8, ls=":")
    axes[0].legend(fontsize=7)
    fig.suptitle("VResNet-feat, default recipe (32 ch, 600 steps, σ = 30): certified by construction vs ρ", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="sweep or run dirs")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    table, notes = rows(args.dirs)
    if not table:
        print(f"no finished run of the certified rows under {', '.join(args.dirs)}", file=sys.stderr)
        return 1
    text = markdown(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "certified_table.md").write_text(text)
    print(text)
    print("written:", out / "certified_table.md", figure(table, out / "certified_tradeoff.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
