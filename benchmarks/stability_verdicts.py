"""The four verdict numbers of section 2 for untrained and trained models, with the CLI only.

For VResNet-feat, VDnCNN-feat, VResNet-frame and VResNet-RLSP (16 channels), untrained
(He init) and trained (the default recipe, ``--steps`` steps at 16 channels), it runs
``src/train.py`` and ``src/diagnose.py`` exactly as a user would and tabulates the verdict,
the certified bound L̂, the Lyapunov exponent λ₁ on the bundled real clips and the TRF
growth rate. Writes ``benchmarks/results/stability_verdicts.md``.

    python benchmarks/stability_verdicts.py [--steps 150] [--out /tmp/verdicts]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = [("vresnet", "feat"), ("vdncnn", "feat"), ("vresnet", "frame"), ("vresnet", "rlsp")]
DIAGNOSE = ["trf.frames=41", "trf.size=32", "trf.iters=100", "lyapunov.frames=150", "lyapunov.size=32",
            "onsets.max_frames=150", "wandb.enabled=false"]


def run(args: list[str]) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True)


def diagnose(out: Path, extra: list[str]) -> dict:
    run(["src/diagnose.py", *DIAGNOSE, *extra, f"hydra.run.dir={out}"])
    return json.loads((out / "report" / "report.json").read_text())


def row(name: str, state: str, report: dict) -> str:
    m = report["metrics"]
    fmt = lambda k, f="{:+.3f}": f.format(m[k]) if k in m else "—"  # noqa: E731
    return (f"| {name} | {state} | {report['verdict']} | {fmt('stability/bound', '{:.3g}')} | "
            f"{fmt('stability/lyapunov')} ± {fmt('stability/lyapunov_stderr', '{:.3f}')} | "
            f"{fmt('stability/trf_growth_rate')} | {report['trf']['verdict']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("/tmp/verdicts"))
    args = parser.parse_args()
    lines = ["| model | weights | verdict | L̂ | λ₁ (real clips) | TRF growth rate | TRF |", "|---|---|---|---|---|---|---|"]
    for backbone, recurrence in MODELS:
        name = f"{backbone}-{recurrence}"
        spec = [f"model={backbone}", f"recurrence={recurrence}", "model.channels=16"]
        lines.append(row(name, "untrained (He)", diagnose(args.out / name / "untrained", spec + ["model.init=he"])))
        train_dir = args.out / name / "train"
        run(["src/train.py", *spec, f"trainer.max_steps={args.steps}", "data.crop=32", "logger=csv",
             "callbacks.trf_monitor=null", "callbacks.onset_test=null", f"hydra.run.dir={train_dir}"])
        ckpt = train_dir / "checkpoints" / "last.ckpt"
        lines.append(row(name, f"trained {args.steps} steps", diagnose(args.out / name / "trained", [f"ckpt_path={ckpt}"])))
        print(lines[-2], lines[-1], sep="\n", flush=True)
    text = "\n".join([f"# Stability verdicts, untrained and trained (`python benchmarks/stability_verdicts.py "
                      f"--steps {args.steps}`)", "", *lines, ""])
    (ROOT / "benchmarks" / "results" / "stability_verdicts.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
