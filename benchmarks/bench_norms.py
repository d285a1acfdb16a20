"""Norms, side by side: the training-step cost of SN, SRN and SRN-C, SRN-C's band under Adam, and the
speed and tightness of the per-conv bound.

    .venv/bin/python benchmarks/bench_norms.py --what step   # step cost (~15-35 min on this 2-core CPU)
    .venv/bin/python benchmarks/bench_norms.py --what band   # SRN-C band, 48 configurations × 200 steps (~10 min)
    .venv/bin/python benchmarks/bench_norms.py --what bound  # conv_norm_bound vs the old bound, the FFT spectrum
    .venv/bin/python benchmarks/bench_norms.py --steps 5 --threads 2  # more timed steps; wall-clock when idle

Each mode rewrites its own section of benchmarks/results/norms.md (step, band) or bound.md (bound).

Step cost:
One training step = forward + backward + Adam over a BPTT unroll of 7 frames,
under `torch.nn.utils.parametrize.cached()` (one normalisation per step), batch
8 × 7 frames × 3 × 64 × 64, VResNet-feat with 64 channels (`build_model`; a
12-conv stand-in if the model zoo is missing). The four kinds train identical
copies and are timed round-robin (a steady drift of the machine hits all of
them alike); one warm-up step each is excluded. By default torch runs one
thread and the process's CPU time is reported (median): on a CPU shared with
other jobs, wall time varied 5x between identical steps, CPU time does not.

Because the normalisation is a small part of the step, the step-time ratio is
within the noise of a shared CPU; the table also gives the isolated cost of the
normalisation (all layers' normalised weights, forward + backward, power
iteration included) as a fraction of the unnormalised step. Also timed: the
exact spectrum (FFT + batched SVD) of one 64-channel 3×3 layer at n = 64, and
an exact `refresh` of the whole model.

Accuracy: after the timing, the srnc model trains `--accuracy-steps` more steps
(same data, no refresh anywhere) and the weight each step actually trains with
(read inside `parametrize.cached()`) is checked against its exact FFT spectrum at
n = 64: the largest |‖W‖₂/α − 1| and the range of srank/(n²m)/β over all layers
and steps.

Band (`--what band`): one conv per configuration — kernel {1×1 8→8, 3×3 6→10, 5×5 8→8, 3×5 4→6} × Adam lr
{1e-3, 3e-3, 1e-2} × β {1, 0.3, 0.1, 0.025}, n = 16, α = 1 — regressed onto a fixed random conv (a loss that
moves the arg-max frequency; the audit's failures came from such runs) in a plain loop: no refresh, no
`parametrize.cached()`. Every step, the exact ‖W‖₂ (FFT) of the weight that step trains with, over α.

Bound (`--what bound`): for He-init kernels, the time of `conv_norm_bound` (certified search), of the old
full-lattice bound (`method="svd"`, n = 64) and of the exact FFT spectrum at n = 64 (`spectral_norm_fft`),
as ratios to one forward pass of that conv on a 1×c_in×64×64 input, interleaved in the same process; their
values over the supremum S, estimated independently (L-BFGS on ω from the best points of a 64-grid); and the
time of `loop_certificate` for the default model (VResNet-feat, 32 channels).
"""

import argparse
import copy
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import torch.nn.functional as F

from recstab.norms import apply_norm, conv_norm_bound, conv_singular_values, normalised_convs, refresh, spectral_norm_fft
from recstab.norms import bound as bound_module
from recstab.norms.bound import certified_peak, lattice_svd_bound
from recstab.norms.spectra import frequency_response_peak
from recstab.norms.srnc import TRACKED

RESULTS = Path(__file__).parent / "results"

KINDS = {  # kind: apply_norm kwargs (the paper's settings: SRN-1-1, SRN-C-2-0.1 at n = 64)
    "none": dict(kind="none"),
    "sn": dict(kind="sn", alpha=1.0),
    "srn": dict(kind="srn", alpha=1.0, beta=0.5),
    "srnc": dict(kind="srnc", alpha=2.0, beta=0.1, n=64),
}


class StandIn(nn.Module):
    """12 convs, feature recurrence: head, 5 blocks of two convs (the first sees its previous output), tail."""

    def __init__(self, c=64):
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(nn.ModuleList([nn.Conv2d(2 * c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)])
                                    for _ in range(5))
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        states = [None] * len(self.blocks)
        out = []
        for t in range(x.shape[1]):
            h = torch.relu(self.head(x[:, t]))
            for i, (a, b) in enumerate(self.blocks):
                prev = states[i] if states[i] is not None else torch.zeros_like(h)
                states[i] = h + b(torch.relu(a(torch.cat([h, prev], 1))))
                h = states[i]
            out.append(x[:, t] + self.tail(h))
        return torch.stack(out, 1)


def make_model():
    try:
        from recstab.models import build_model
        return build_model("vresnet", "feat", "denoise", 64), "VResNet-feat (build_model)"
    except Exception as error:  # the model zoo is written concurrently
        print(f"build_model unavailable ({error!r}); using the 12-conv stand-in")
        return StandIn(64), "12-conv stand-in"


def train_step(model, optimizer, x, y):
    """(wall seconds, CPU seconds of this process) of one training step."""
    wall, cpu = time.perf_counter(), time.process_time()
    with parametrize.cached():
        loss = (model(x) - y).pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - wall, time.process_time() - cpu


def normalisation_cost(model, repeats=3):
    """Seconds for every layer's normalised weight, forward + backward (power iteration included)."""
    convs = normalised_convs(model)
    if not convs:
        return 0.0
    times = []
    for _ in range(repeats):
        for _, conv, norm in convs:
            norm._seen = None  # force the power-iteration step, as after an optimiser step
        start = time.process_time()
        total = sum(conv.weight.sum() for _, conv, _ in convs)
        total.backward()
        times.append(time.process_time() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def accuracy(model, optimizer, x, y, steps, alpha, beta, n):
    """(max |‖W‖₂/α − 1|, min and max srank/(n²m)/β) over the layers and `steps` training steps."""
    worst, low, high = 0.0, math.inf, 0.0
    for step in range(steps):
        with parametrize.cached():
            used = [conv.weight.detach().clone() for _, conv, _ in normalised_convs(model)]
            loss = (model(x) - y).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for weight in used:
            sv = conv_singular_values(weight.double(), n)
            worst = max(worst, abs(sv[0].item() / alpha - 1))
            fraction = (sv.pow(2).sum() / sv[0] ** 2).item() / (n * n * min(weight.shape[:2])) / beta
            low, high = min(low, fraction), max(high, fraction)
        print(f"accuracy step {step}: max |‖W‖/α − 1| so far {worst:.2e}, srank/β in [{low:.4f}, {high:.4f}]",
              flush=True)
    return worst, low, high


def machine(args, load) -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs (load "
            f"average {load:.1f} at start), {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def step_section(args, load) -> str:
    """Training-step cost of the four kinds and SRN-C's accuracy on the 64-channel model."""
    torch.manual_seed(0)
    base, name = make_model()
    models, optimizers = {}, {}
    for kind, kwargs in KINDS.items():
        models[kind] = apply_norm(copy.deepcopy(base), **kwargs)
        optimizers[kind] = torch.optim.Adam(models[kind].parameters(), lr=1e-4)
    x, y = torch.rand(8, 7, 3, 64, 64), torch.rand(8, 7, 3, 64, 64)
    bench_start = time.perf_counter()

    walls, cpus = {kind: [] for kind in KINDS}, {kind: [] for kind in KINDS}
    for round_ in range(args.steps + 1):
        for kind in KINDS:
            wall, cpu = train_step(models[kind], optimizers[kind], x, y)
            if round_ > 0:
                walls[kind].append(wall)
                cpus[kind].append(cpu)
            print(f"round {round_} {kind:5s} wall {wall:7.2f} s  cpu {cpu:7.2f} s", flush=True)
    cpu = {kind: statistics.median(t) for kind, t in cpus.items()}
    wall = {kind: min(t) for kind, t in walls.items()}
    isolated = {kind: normalisation_cost(models[kind]) for kind in KINDS}

    layer = nn.Conv2d(64, 64, 3)
    spectrum_times = []
    for _ in range(3):
        start = time.perf_counter()
        conv_singular_values(layer.weight, 64)
        spectrum_times.append(time.perf_counter() - start)
    srnc = KINDS["srnc"]
    worst, low, high = accuracy(models["srnc"], optimizers["srnc"], x, y, args.accuracy_steps,
                                srnc["alpha"], srnc["beta"], srnc["n"])
    start = time.perf_counter()
    refresh(models["srnc"])
    refresh_time = time.perf_counter() - start
    exhaustive = sum(norm.exhaustive for _, _, norm in normalised_convs(models["srnc"]))

    lines = [
        f"## Normalisation cost ({name}, 64 channels, batch 8 × 7 frames × 64², BPTT under parametrize.cached())",
        "",
        f"`.venv/bin/python benchmarks/bench_norms.py --what step --steps {args.steps} --threads {args.threads}` — "
        f"{machine(args, load)}. {args.steps} timed steps per kind after 1 warm-up, kinds round-robin. "
        "CPU time (of this single-threaded process) is the robust measure on a shared machine; "
        "wall time is the best of the steps.",
        "",
        "| kind | settings | step CPU time (s) | step / none (CPU) | step / none (best wall) "
        "| normalisation alone (CPU s) | 1 + normalisation / none step |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, kwargs in KINDS.items():
        settings = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "kind") or "-"
        lines.append(f"| {kind} | {settings} | {cpu[kind]:.2f} | {cpu[kind] / cpu['none']:.3f} | "
                     f"{wall[kind] / wall['none']:.3f} | {isolated[kind]:.3f} | {1 + isolated[kind] / cpu['none']:.3f} |")
    lines += [
        "",
        f"- exact spectrum of one 64-channel 3×3 layer at n = 64 (FFT + batched SVD): "
        f"{statistics.median(spectrum_times):.2f} s (median of 3)",
        f"- srnc accuracy, the weight each step trains with against its exact FFT spectrum at n = 64, all "
        f"{len(normalised_convs(models['srnc']))} layers ({exhaustive} with the whole spectrum every step, the others "
        f"tracked: per-frequency power iteration, {TRACKED} candidates per half with exact SVDs), each of the "
        f"{args.accuracy_steps} training steps after the timed ones (no refresh since apply_norm): max |‖W‖₂/α − 1| = "
        f"{worst:.1e}, srank/(n²m)/β in [{low:.4f}, {high:.4f}]",
        f"- exact `refresh` of every srnc layer of the model (n = 64): {refresh_time:.2f} s",
        "- paper: ×1.8 (SRN), ×2.2 (SRN-C); target here srnc/none ≤ 1.05",
        f"- benchmark wall time: {time.perf_counter() - bench_start:.0f} s",
    ]
    return "\n".join(lines)


BAND_SHAPES = {"1×1 8→8": (8, 8, 1, 1), "3×3 6→10": (6, 10, 3, 3), "5×5 8→8": (8, 8, 5, 5), "3×5 4→6": (4, 6, 3, 5)}
BAND_LRS = (1e-3, 3e-3, 1e-2)
BAND_BETAS = (1.0, 0.3, 0.1, 0.025)


def band_run(c_in, c_out, kh, kw, lr, beta, steps, n=16):
    """(min, max of ‖W‖₂/α over the steps, first step outside [0.99, 1.01] or None, CPU s per step)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2), bias=False)
    nn.init.kaiming_normal_(conv.weight)
    apply_norm(conv, "srnc", alpha=1.0, beta=beta, n=n)
    optimizer = torch.optim.Adam(conv.parameters(), lr=lr)
    teacher = torch.randn(c_out, c_in, kh, kw) * 0.5
    x = torch.randn(4, c_in, 16, 16)
    y = F.conv2d(x, teacher, padding=(kh // 2, kw // 2))
    low, high, first, cpu = math.inf, 0.0, None, 0.0
    for step in range(steps):
        start = time.process_time()
        weight = conv.weight
        loss = (F.conv2d(x, weight, padding=(kh // 2, kw // 2)) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        cpu += time.process_time() - start
        ratio = spectral_norm_fft(weight.detach().double(), n)
        low, high = min(low, ratio), max(high, ratio)
        if first is None and not 0.99 <= ratio <= 1.01:
            first = step
        optimizer.step()
    return low, high, first, cpu / steps


def band_section(args, load) -> str:
    lines = [
        f"## SRN-C band under Adam ({args.band_steps} steps per configuration, n = 16, α = 1)",
        "",
        f"`.venv/bin/python benchmarks/bench_norms.py --what band --band-steps {args.band_steps}` — "
        f"{machine(args, load)}. Plain loop (no refresh, no parametrize.cached()), regression onto a fixed random "
        "conv; ‖W‖₂ is the exact FFT norm on the 16×16 map of the weight each step trains with. Every layer here "
        "computes its whole spectrum each step (srnc.EXHAUSTIVE), so ‖W‖₂ = α holds by construction.",
        "",
        "| kernel | lr | β | min ‖W‖₂/α | max ‖W‖₂/α | first step outside [0.99, 1.01] | CPU ms / step (fwd+bwd) |",
        "|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for name, (c_in, c_out, kh, kw) in BAND_SHAPES.items():
        for lr in BAND_LRS:
            for beta in BAND_BETAS:
                low, high, first, cpu = band_run(c_in, c_out, kh, kw, lr, beta, args.band_steps)
                worst = max(worst, abs(low - 1), abs(high - 1))
                lines.append(f"| {name} | {lr:g} | {beta:g} | {low:.7f} | {high:.7f} | "
                             f"{'-' if first is None else first} | {cpu * 1e3:.1f} |")
                print(lines[-1], flush=True)
    lines += ["", f"- largest |‖W‖₂/α − 1| over all configurations and steps: {worst:.1e}"]
    return "\n".join(lines)


def cpu_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


BOUND_CASES = [  # (label, c_out, c_in, k, kernel maker)
    ("He 64→64 3×3", 64, 64, 3, "he"), ("He 32→32 3×3", 32, 32, 3, "he"), ("He 64→128 3×3", 64, 128, 3, "he"),
    ("He 64→64 5×5", 64, 64, 5, "he"), ("He + low-pass 64→64 3×3", 64, 64, 3, "peaked")]


def bound_section(args, load) -> str:
    rows, raw = [], []
    for label, c_out, c_in, k, kind in BOUND_CASES:
        for seed in range(args.bound_seeds):
            torch.manual_seed(seed)
            w = torch.randn(c_out, c_in, k, k) * math.sqrt(2 / (c_in * k * k))
            if kind == "peaked":   # a smoothing component on every tap: one dominant low-frequency peak
                w += 1.5 * torch.eye(c_out, c_in)[:, :, None, None] / (k * k)
            x = torch.randn(1, c_in, 64, 64)
            conv = cpu_time(lambda: F.conv2d(x, w, padding=k // 2), 7)
            new = cpu_time(lambda: (bound_module._CACHE.clear(), conv_norm_bound(w)), 3)  # no cached certificate
            cert = certified_peak(w)
            fft = cpu_time(lambda: spectral_norm_fft(w, 64), 1)
            old = cpu_time(lambda: lattice_svd_bound(w, 64), 1) if k == 3 or seed == 0 else math.nan
            sup = frequency_response_peak(w)
            values = (conv_norm_bound(w) / sup, lattice_svd_bound(w, 64) / sup, spectral_norm_fft(w.double(), 64) / sup)
            raw.append((label, seed, conv, new, old, fft, values, cert))
            print(label, seed, f"conv {conv * 1e3:.2f} ms, new {new / conv:.1f}x, old {old / conv:.0f}x, "
                  f"fft {fft / conv:.0f}x, values/S {values}", flush=True)
    for label, *_ in BOUND_CASES:
        mine = [r for r in raw if r[0] == label]
        conv = statistics.median(r[2] for r in mine)
        new = statistics.median(r[3] for r in mine)
        old = statistics.median(r[4] for r in mine if not math.isnan(r[4]))
        fft = statistics.median(r[5] for r in mine)
        tight = max(r[6][0] for r in mine)
        old_tight = max(r[6][1] for r in mine)
        grid = min(r[6][2] for r in mine)
        tests = statistics.median(r[7].tests for r in mine)
        rows.append(f"| {label} | {conv * 1e3:.2f} | {new * 1e3:.1f} ({new / conv:.1f}×) | {old * 1e3:.0f} "
                    f"({old / conv:.0f}×) | {fft * 1e3:.0f} ({fft / conv:.0f}×) | {tight:.6f} | {old_tight:.5f} | "
                    f"{grid:.5f} | {tests:.0f} |")
    from recstab.diagnostics import loop_certificate
    from recstab.models import build_model
    torch.manual_seed(0)
    model = build_model("vresnet", "feat", "denoise", channels=32, init="near_identity")
    cert_time = cpu_time(lambda: (bound_module._CACHE.clear(), loop_certificate(model)), 3)  # kernels together
    one_by_one = cpu_time(lambda: (bound_module._CACHE.clear(), loop_certificate(model, conv_norm_bound)), 3)
    cert = loop_certificate(model)
    lines = [
        "## The per-conv bound: time and tightness",
        "",
        f"`.venv/bin/python benchmarks/bench_norms.py --what bound --bound-seeds {args.bound_seeds} --threads "
        f"{args.threads}` — {machine(args, load)}. CPU times of this process (median; conv: 7 runs, new bound: 3, "
        "old bound and FFT: 1); ratios to one forward pass of the same conv on a 1×c_in×64×64 input. Values over S, "
        f"the supremum of σ₁(K̂(ω)) estimated independently (L-BFGS from the 5 best points of a 64-grid); the worst "
        f"of {args.bound_seeds} kernels per row (the FFT grid maximum: the lowest). Cholesky certificates: median "
        "count of `certified_peak(w).tests`.",
        "",
        "| kernel | conv forward (ms) | conv_norm_bound (ms, ratio) | old lattice-SVD bound n = 64 (ms, ratio) "
        "| exact FFT spectrum n = 64 (ms, ratio) | new bound / S | old bound / S | FFT grid max / S "
        "| Cholesky certificates |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"- `loop_certificate` of the default model (VResNet-feat, 32 channels, near_identity init; "
        f"{len(cert.factors.get('self_loops', [])) or '-'} self-loops, 15 kernels): {cert_time * 1e3:.0f} ms CPU "
        f"(L̂ = {cert.bound:.4g}, {cert.norm}), its kernels searched together (`certified_peaks`); one kernel at a "
        f"time (`loop_certificate(model, conv_norm_bound)`, the same L̂): {one_by_one * 1e3:.0f} ms "
        f"({one_by_one / cert_time:.2f}× the batched time).",
        "- The new bound is proven for zero and circular padding on every input size (bound.py); the FFT grid "
        "maximum is only a lower estimate of S (it misses peaks between grid points), the old bound exceeds S "
        "by up to 1/cos(π(kh + kw − 2)/128).",
    ]
    return "\n".join(lines)


def write_section(path: Path, key: str, text: str, title: str) -> None:
    """Replace the section `key` of the markdown file `path` (delimited by HTML comments), keeping the others."""
    begin, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    body = path.read_text() if path.exists() else f"# {title}\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in body and end in body:
        body = body[:body.index(begin)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", choices=("step", "band", "bound", "all"), default="step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per kind (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 makes CPU time immune to other processes on a shared machine")
    parser.add_argument("--accuracy-steps", type=int, default=10,
                        help="srnc training steps checked against the exact spectrum after the timing")
    parser.add_argument("--band-steps", type=int, default=200, help="training steps per band configuration")
    parser.add_argument("--bound-seeds", type=int, default=3, help="kernels per row of the bound table")
    parser.add_argument("--results", default=str(RESULTS), help="folder of norms.md and bound.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results = Path(args.results)
    if args.what in ("step", "all"):
        write_section(results / "norms.md", "step", step_section(args, load), "Norms: cost, band, accuracy")
    if args.what in ("band", "all"):
        write_section(results / "norms.md", "band", band_section(args, load), "Norms: cost, band, accuracy")
    if args.what in ("bound", "all"):
        write_section(results / "bound.md", "bound", bound_section(args, load), "conv_norm_bound")
    print("written to", results)


if __name__ == "__main__":
    main()
