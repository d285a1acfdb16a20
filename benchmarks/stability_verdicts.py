"""Stability verdicts: reference models with known answers, and real models through the CLI.

``--reference`` (seconds to minutes, no training): for every model of
:func:`recstab.models.reference.catalogue` (rotations, Jordan blocks, weak read-outs, slow growth,
tanh latches, a chaotic map) and the untrained He-init VResNet-feat (16 channels) with and
without every conv scaled to operator norm 0.5, it tabulates the loop certificate, the TRF verdict,
the report verdict (``engine.decide`` on certificate, TRF and λ₁) and λ₁ ± stderr against the
closed form at 300 and 1000 frames, plus the calibration of λ₁'s stated error over 10 seeds
(max |z|, z = (λ̂₁ − λ₁)/stderr). The table goes into ``benchmarks/results/stability_verdicts.md``
under ``--label`` (a section per label, replaced on rerun).

Default (the CLI mode): for VResNet-feat, VDnCNN-feat, VResNet-frame and VResNet-RLSP
(16 channels), untrained (He init) and trained (the default recipe, ``--steps`` steps at 16
channels), it runs ``src/train.py`` and ``src/diagnose.py`` exactly as a user would and tabulates
the verdict, the certified bound L̂, the Lyapunov exponent λ₁ on the bundled real clips and the TRF
growth rate.

    python benchmarks/stability_verdicts.py --reference [--label after]
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


# ---------------------------------------------------------------------------------------------- reference models
RESULTS = ROOT / "benchmarks" / "results" / "stability_verdicts.md"
SEEDS = 10


def write_section(key: str, text: str, path: Path = RESULTS) -> None:
    """Put ``text`` between ``<!-- key -->`` and ``<!-- /key -->`` in ``path`` (replaced if there, else appended)."""
    old = path.read_text() if path.is_file() else "# Stability verdicts\n"
    begin, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def references() -> list:
    """(name, build, λ₁ or nan, grows, TRF kwargs, λ₁ frame size) of every reference row."""
    import math

    from recstab.models.reference import catalogue, vresnet_feat

    small = dict(frames=81, size=8, iters=20)
    rows = [(r.name, r.build, r.exponent, r.grows, small, 1) for r in catalogue()]
    net = dict(frames=41, size=16, iters=20)
    rows.append(("VResNet-feat 16 ch, He init", vresnet_feat, math.nan, True, net, 16))
    rows.append(("VResNet-feat 16 ch, every conv at norm 0.5", lambda: vresnet_feat(conv_norm=0.5), math.nan, False, net, 16))
    return rows


def _clip(frames: int, channels: int, size: int, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, frames, channels, size, size, generator=g, dtype=torch.float64)


def reference_table() -> str:
    import math
    import time

    import numpy as np
    import torch

    from recstab.diagnostics import loop_certificate, lyapunov_exponent, temporal_receptive_field
    from recstab.diagnostics.engine import decide

    torch.set_num_threads(1)
    verdicts = ["| model | grows? | L̂ | TRF verdict | TRF reason | report verdict | λ₁ truth | "
                "λ₁ ± stderr (z), 300 frames | λ₁ ± stderr (z), 1000 frames |",
                "|---|---|---|---|---|---|---|---|---|"]
    calibration = ["| model | λ₁ truth | 300 frames: median stderr, max \\|z\\| | 1000 frames: median stderr, "
                   "max \\|z\\| |", "|---|---|---|---|"]
    for name, build, truth, grows, trf_kwargs, size in references():
        model = build()
        double = size == 1  # the reference recurrences in float64: their λ₁ is resolved to 1e-16
        if double:
            model = model.double()
        cert = loop_certificate(model)
        start = time.perf_counter()
        trf = temporal_receptive_field(model, **trf_kwargs)
        trf_seconds = time.perf_counter() - start
        channels = model.in_channels
        les = {}
        for frames in (300, 1000):
            clip = _clip(frames, channels, size, 0)
            les[frames] = lyapunov_exponent(model, clip if double else clip.float())
        verdict, _ = decide(cert, trf, None, les[300])

        def cell(le, truth=truth) -> str:
            z = (le.exponent - truth) / le.stderr if math.isfinite(truth) and le.stderr > 0 else math.nan
            zs = f" ({z:+.1f})" if math.isfinite(z) else ""
            return f"{le.exponent:+.5f} ± {le.stderr:.1e}{zs}"

        reason = trf.reason.replace("|", "/")
        reason = reason if len(reason) < 160 else reason[:157] + "…"
        verdicts.append(f"| {name} | {'yes' if grows else 'no'} | {cert.bound:.4g} | {trf.verdict} "
                        f"({trf_seconds:.1f} s) | {reason} | {verdict} | "
                        f"{truth:+.5f} | {cell(les[300])} | {cell(les[1000])} |".replace("+nan", "—"))
        print(verdicts[-1], flush=True)
        if math.isfinite(truth):
            cells = []
            for frames in (300, 1000):
                z, se = [], []
                for seed in range(SEEDS):
                    clip = _clip(frames, channels, size, seed)
                    le = lyapunov_exponent(model, clip if double else clip.float(), seed=seed)
                    z.append(abs(le.exponent - truth) / le.stderr if le.stderr > 0 else math.inf)
                    se.append(le.stderr)
                cells.append(f"{np.median(se):.1e}, {max(z):.2f}")
            calibration.append(f"| {name} | {truth:+.5f} | {cells[0]} | {cells[1]} |")
            print(calibration[-1], flush=True)
    return "\n".join(["TRF at frames 81, size 8, 20 iterations (VResNet: frames 41, size 16); λ₁ on i.i.d. uniform "
                      "frames of 1×1 pixel in float64 (VResNet: 16×16, float32), seed 0; the report verdict is "
                      "`engine.decide(certificate, TRF, None, λ₁ at 300 frames)`.", "", *verdicts, "",
                      f"Calibration of λ₁'s stated error: {SEEDS} seeds (input frames and initial tangent).", "",
                      *calibration])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", action="store_true", help="the reference-model table (no training)")
    parser.add_argument("--label", default="after", help="section label of the reference table")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("/tmp/verdicts"))
    args = parser.parse_args()
    if args.reference:
        import recstab
        text = reference_table()
        where = Path(recstab.__file__).resolve().parents[1]
        write_section(f"reference:{args.label}", "\n".join([
            f"## Reference models: {args.label} (`python benchmarks/stability_verdicts.py --reference "
            f"--label {args.label}`, recstab from `{where}`)", "", text]))
        print(text)
        return
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
    text = "\n".join([f"## Untrained and trained (`python benchmarks/stability_verdicts.py --steps {args.steps}`)",
                      "", *lines])
    write_section("cli", text)
    print(text)


if __name__ == "__main__":
    main()
