"""The temporal receptive field (TRF) stress test of section 2.2.

Search for an unstable input sequence by gradient ascent instead of by watching
hours of video. Fix 2τ+1 frames X = (x_-τ … x_τ) (τ = 40: 81 frames of 64×64 in
the paper), run the model over them from its initial state (h_{-τ-1} = 0) and
maximise |p|, p the centre pixel of the output frame y_0 summed over channels:

    max_{0 ≤ X ≤ 1} |p|                                              (eq. 3)

How it is solved here: X starts uniform in [0, 1] (seeded); each iteration runs
the model on X, takes g = ∂|p|/∂X, makes one Adam step *ascending* |p| (lr 0.05)
and clamps X back into [0, 1] (projected gradient ascent). The model's weights are
never touched: gradients are taken with ``torch.autograd.grad`` with respect to X
only, in eval mode, so the test can run in the middle of a training run.

The paper reads two things off the result: (1) whether input frames in the distant past
still drive p, and (2) whether output frames in the distant future diverge. Both are
measured here as *rates*, relative to the model's own scale, never as magnitudes
(h_t = 0.5·h_{t-1} + 1e7·x_t has outputs of 1e7 and is perfectly stable; multiplying a
model by a constant changes no verdict); (2) is decided by a replay, below.

1. Influence of the past. influence_t = ‖∂p/∂x_t‖², divided by its maximum over t
   (the most influential frame has 1), at the last X evaluated.
   - ``extent`` = 1 + the largest k ≥ 0 with influence_{-k} > ``threshold`` (1e-6):
     the past frames, the current one included, that still drive p. A single-frame
     model has extent 1, a causal 7-frame window 7, h_t = 0.5·h_{t-1} + 0.2·x_t
     (influence 0.25^k) extent 10.
   - ``growth_rate`` r, ``growth_stderr`` s: least-squares slope of
     ½·log influence_{-k} = log ‖∂p/∂x_{-k}‖ against the lag k = 1 … τ (the lags with a
     non-zero influence; the current frame k = 0 is left out, it also reaches p through
     skip connections), and the slope's standard error from the fit residuals. Per
     frame, natural log: negative = the influence decays into the past; log a for
     h_t = a·h_{t-1} + b·x_t whatever b. Fewer than 3 non-zero lags: r = -inf (finite
     memory).
2. Growth of the future. The tangent response u_t = (∂y_t/∂x_-τ)·v of every output
   frame to a perturbation v (Gaussian, seeded) of the *oldest* frame, a
   Jacobian-vector product (forward mode; see :func:`recstab.diagnostics.lyapunov.jvp`):
   the linearised difference between two runs that differ only in the distant past.
   ``future_rate``, ``future_stderr``: least-squares slope of log ‖u_t‖ over the future
   frames t = 1 … τ (those with ‖u_t‖ > 0; fewer than 3: -inf, the perturbation died).
   A linear map contributes no noise floor: u_t is exact where a finite difference of
   two float32 runs would bottom out at the rounding error.

A rate r ± s *decays* when r + 2s < −``growth_tol`` (0.01 per frame) and *grows* when
r − 2s > growth_tol. Rates describe; they prove nothing: a rotation h = 0.99·R(π/100)·h + B·x read
out through one coordinate has a future response that rises between two zero crossings (+0.08 per
frame over lags 41–80), a Jordan block of a contraction grows like a polynomial for hundreds of
frames, and a state that grows behind a weak read-out (C = (1, 1e-20)) stays invisible for
hundreds of frames. So the verdict rests on a replay instead
(:mod:`recstab.diagnostics.demonstration`): the optimised X, periodically extended, is streamed
through the model from its initial state, and its outputs are judged by the demonstration criterion
((N) a non-finite output, or (G) growth by 10⁶ over the last doubling of the horizon, still rising;
scale-free, and provably never met by the transient of a single Jordan block or a rotation of
spectral radius ≤ 1, see that module). The verdict:

- "unbounded": a demonstration — an output became non-finite during the search (X, one period,
  is the replayable input), or the replay of X diverged. ``demonstration`` holds the period, the
  number of periods and the per-period output scales; :meth:`Demonstration.save` writes it, and
  :func:`recstab.diagnostics.demonstration.replay` re-judges it on any model. Nothing else is
  called unbounded. The search stops early on a demonstration: non-finite outputs are checked at
  every iteration; at iteration 0 and every ``check_every`` (25) iterations, while x_-τ drives p and
  the future response grows (a cheap trigger, one Jacobian-vector product), X is replayed for
  ``MIN_PERIODS`` periods; after the last iteration it is replayed with the full budget
  (``replay_frames``, 8192 frames).
- "bounded": the replay found **no growth in N frames** (the output settled: its largest scale in the
  second half of the replay within 5 % of the first half's) AND the past's influence on p dies out
  (extent ≤ τ, or growth_rate a resolved decay; the reason gives the lag where it would cross the
  threshold, ln(threshold)/(2r)). Evidence, not proof: the reason says "no growth found in N
  frames"; the report's verdict weighs it with λ₁ of the *state*, which sees growth that a read-out
  hides.
- "inconclusive" otherwise, with the reason: the replay output was still growing at the end of its
  budget without reaching a demonstration (h = h + x grows like t; a = 1.0005 needs ~55k frames),
  or the influence of x_-τ fills the window and decays too slowly to resolve (h = 0.999·h + x).

Resumable runs. With ``progress=<file>`` the search writes, every ``progress_every`` (10)
iterations and atomically, the iteration reached, X, Adam's state and the |p| history (the
whole state of the search: nothing else is random after the seeded start); ``resume=True``
loads it and continues, so an interrupted search ends bit-identical to an uninterrupted one.
The file holds the identity of the search (the model's weights hash, every setting, the
dampening, and what the caller adds in ``context``); another identity is refused, naming
what differs (:class:`recstab.diagnostics.workfiles.ResumeMismatch`). The file is deleted
once the search ends.

``stopped_early`` and ``reason`` say what ended the search and why the verdict; ``replay_growth``
is the replay's second-half growth factor (∞ when it diverged). τ ≥ 3 (frames ≥ 7) is needed to
fit a future rate at all.

The picture (:meth:`TRFResult.save_png`) has the paper's two rows X and Y every 5
frames from -τ to +τ, the influence on a log scale against t with its fitted line,
the future response ‖u_t‖ (relative) with its fitted line and the output RMS, and the
replay's output scale per period.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from recstab.diagnostics.demonstration import MIN_PERIODS, REPLAY_FRAMES, Demonstration, demonstrate
from recstab.diagnostics.lyapunov import jvp
from recstab.diagnostics.workfiles import (PROGRESS_VERSION, check_progress_settings, load_progress,
                                           model_fingerprint, save_progress)
from recstab.models.dampening import evaluating
from recstab.models.interface import traits

THRESHOLD = 1e-6    # relative gradient energy below which a past frame has no influence on p
GROWTH_TOL = 0.01   # per frame: a log-rate r ± s grows when r - 2s > GROWTH_TOL, decays when r + 2s < -GROWTH_TOL
LR = 0.05           # Adam step on X (pixel units)
CHECK_EVERY = 25    # iterations between two looks for a divergence (while the past drives p)
TRF_VERDICTS = ("bounded", "unbounded", "inconclusive")


@dataclass
class TRFResult:
    """What :func:`temporal_receptive_field` found. Frame index i ↔ time t = i - tau."""

    inputs: torch.Tensor            # X, T×C×H×W in [0, 1]
    outputs: torch.Tensor           # Y, T×C×sH×sW (raw, unclamped; may hold inf/nan)
    influence: np.ndarray           # (T,) ‖∂p/∂x_t‖² / max_t, at the last evaluated X
    verdict: str                    # "bounded" | "unbounded" | "inconclusive"
    extent: int                     # frames of the past window (current included) that drive p
    reason: str                     # why the verdict, in words
    stopped_early: bool             # the search ended before `iters` iterations (a demonstration)
    iterations: int                 # iterations actually run
    tau: int
    growth_rate: float = math.nan   # slope of log ‖∂p/∂x_{-k}‖ vs lag k, per frame (negative = decay)
    growth_stderr: float = math.nan
    future_rate: float = math.nan   # slope of log ‖∂y_t/∂x_-τ · v‖ over t = 1 … τ (> 0: rising; not a proof)
    future_stderr: float = math.nan
    future_response: np.ndarray = None  # (T,) ‖∂y_t/∂x_-τ · v‖ / max_t
    p_history: list = field(default_factory=list)   # |p| per iteration
    output_rms: np.ndarray = None   # (T,) RMS of each output frame
    seconds: float = 0.0
    threshold: float = THRESHOLD
    growth_tol: float = GROWTH_TOL
    demonstration: Demonstration | None = None  # the replay behind the verdict (None: nothing replayed)

    @property
    def unbounded(self) -> bool:
        return self.verdict == "unbounded"

    @property
    def replay_growth(self) -> float:
        """The replay's largest output scale in its second half over the first half's (∞: diverged)."""
        if self.demonstration is None:
            return math.nan
        return math.inf if self.demonstration.diverged else float(self.demonstration.growth)

    @property
    def times(self) -> np.ndarray:
        return np.arange(-self.tau, self.tau + 1)

    def to_dict(self) -> dict:
        """JSON-ready numbers (no tensors; ±inf/nan stay floats)."""
        return {
            "verdict": self.verdict, "extent": self.extent, "reason": self.reason,
            "growth_rate": self.growth_rate, "growth_stderr": self.growth_stderr,
            "future_rate": self.future_rate, "future_stderr": self.future_stderr,
            "stopped_early": self.stopped_early, "iterations": self.iterations, "tau": self.tau,
            "p_final": self.p_history[-1] if self.p_history else float("nan"),
            "influence": [float(v) for v in self.influence],
            "future_response": [float(v) for v in self.future_response],
            "output_rms": [float(v) for v in self.output_rms],
            "threshold": self.threshold, "growth_tol": self.growth_tol, "seconds": self.seconds,
            "demonstration": None if self.demonstration is None else self.demonstration.to_dict(),
        }

    def figure(self, every: int = 5):
        """The paper's TRF picture: rows X and Y every `every` frames, influence, future response, replay."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = [t for t in range(-(self.tau // every) * every, self.tau + 1, every)]
        demo = self.demonstration
        rows = 5 if demo is not None else 4
        fig = plt.figure(figsize=(max(6.0, 0.75 * len(cols)), 6.0 + 1.5 * (rows - 4)))
        grid = fig.add_gridspec(rows, len(cols), height_ratios=[1, 1, 1.3, 1.3, 1.3][:rows], hspace=0.35,
                                wspace=0.05)
        for j, t in enumerate(cols):
            for row, (name, seq) in enumerate((("X", self.inputs), ("Y", self.outputs))):
                ax = fig.add_subplot(grid[row, j])
                ax.imshow(_displayable(seq[t + self.tau]), cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(name)
                if row == 1:
                    ax.set_xlabel(f"{t:+d}" if t else "0", fontsize=8)
        ax = fig.add_subplot(grid[2, :])
        shown = np.where(self.influence > 0, self.influence, np.nan)  # future frames of a causal model: 0
        ax.semilogy(self.times, shown, "b.-", label="influence ‖∂p/∂x_t‖² (rel.)")
        ax.axhline(self.threshold, color="b", ls=":", lw=0.8)
        lags = np.arange(1, self.tau + 1)
        if math.isfinite(self.growth_rate):  # fitted on >= 3 positive lags
            k, lv = _fit_points(self.influence[:self.tau][::-1] ** 0.5, lags)
            _, c = _line(lv, k)
            ax.semilogy(-k, np.exp(2 * (c + self.growth_rate * k)), "k--", lw=0.8,
                        label=f"fit: rate {self.growth_rate:+.3g}/frame")
        ax.set_xlim(-self.tau - 0.5, self.tau + 0.5)
        ax.set_ylabel("influence")
        ax.legend(fontsize=7, loc="lower right")
        ax = fig.add_subplot(grid[3, :])
        resp = self.future_response if self.future_response is not None else np.zeros(0)
        if len(resp):
            ax.semilogy(self.times, np.where(resp > 0, resp, np.nan), "g.-", label="‖∂y_t/∂x_-τ·v‖ (rel.)")
            if math.isfinite(self.future_rate):
                t, lv = _fit_points(resp[self.tau + 1:], lags)
                _, c = _line(lv, t)
                ax.semilogy(t, np.exp(c + self.future_rate * t), "k--", lw=0.8,
                            label=f"fit: rate {self.future_rate:+.3g}/frame")
        rms = np.where(np.isfinite(self.output_rms), self.output_rms, np.nan)
        ax2 = ax.twinx()
        ax2.plot(self.times, np.where(rms > 0, rms, np.nan), "r.-", lw=0.6, ms=2)
        shown_rms = rms[np.isfinite(rms) & (rms > 0)]
        if len(shown_rms) and shown_rms.max() > 10 * shown_rms.min():
            ax2.set_yscale("log")
        ax2.set_ylabel("RMS(y_t)", color="r")
        ax.set_xlim(-self.tau - 0.5, self.tau + 0.5)
        ax.set_xlabel("t")
        ax.set_ylabel("future response", color="g")
        ax.legend(fontsize=7, loc="lower right")
        if demo is not None:
            ax = fig.add_subplot(grid[4, :])
            scales = np.where(np.isfinite(demo.scales) & (demo.scales > 0), demo.scales, np.nan)
            ax.semilogy(np.arange(1, demo.periods + 1), scales, "m.-", ms=3, label="replay: ‖Y_m‖ per period")
            ax.set_xlabel(f"period m of the replay (X repeated, {demo.period.shape[0]} frames each): {demo.status}")
            ax.set_ylabel("output scale")
            ax.legend(fontsize=7, loc="lower right")
        early = " (stopped early)" if self.stopped_early else ""
        fig.suptitle(f"TRF: {self.verdict}{early}, extent {self.extent}, {self.iterations} iterations\n"
                     f"{self.reason}", fontsize=8)
        return fig

    def save_png(self, path: str | Path, every: int = 5) -> Path:
        import matplotlib.pyplot as plt
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = self.figure(every)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path


def _displayable(frame: torch.Tensor) -> np.ndarray:
    """C×H×W -> H×W(×3) in [0, 1]; non-finite values shown as 1 (white), like a saturated output."""
    a = frame.detach().float().cpu()
    a = torch.where(torch.isfinite(a), a, torch.ones_like(a)).clamp(0, 1).numpy()
    return a[0] if a.shape[0] != 3 else a.transpose(1, 2, 0)


def _fit_points(values: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (position, log value) pairs with a finite, positive value."""
    ok = np.isfinite(values) & (values > 0)
    return positions[ok].astype(np.float64), np.log(values[ok])


def _line(logs: np.ndarray, positions: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and intercept of logs against positions."""
    slope, intercept = np.polyfit(positions, logs, 1)
    return float(slope), float(intercept)


def log_rate(values: np.ndarray, positions: np.ndarray) -> tuple[float, float]:
    """(slope, standard error) of log(values) against positions over the positive values; -inf if < 3."""
    x, y = _fit_points(np.asarray(values, dtype=np.float64), np.asarray(positions))
    if len(x) < 3:
        return -math.inf, 0.0
    slope, intercept = _line(y, x)
    residual = y - (intercept + slope * x)
    sxx = float(((x - x.mean()) ** 2).sum())
    return slope, float(math.sqrt(float((residual ** 2).sum()) / (len(x) - 2) / sxx))


def _in_channels(model: nn.Module, channels: int | None) -> int:
    if channels is not None:
        return channels
    return traits(model).in_channels


def _future_response(model: nn.Module, x: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """‖(∂y_t/∂x_-τ)·v‖ per output frame, v a perturbation of the oldest frame only."""
    tangent = torch.zeros_like(x)
    tangent[:, 0] = v
    with parametrize.cached():
        _, u = jvp(model, (x,), (tangent,))
    return u.detach().double().flatten(2).norm(dim=2)[0].cpu().numpy()


def _future(response: np.ndarray, tau: int) -> tuple[float, float, bool]:
    """(future_rate, its stderr, overflowed) over t = 1 … τ."""
    future = response[tau + 1:]
    overflowed = bool(np.isfinite(response[:tau + 1]).all() and not np.isfinite(future).all())
    rate, se = log_rate(future, np.arange(1, tau + 1))
    return rate, se, overflowed


def temporal_receptive_field(model: nn.Module, frames: int = 81, size: int = 64, iters: int = 500,
                             lr: float = LR, seed: int = 0, threshold: float = THRESHOLD,
                             growth_tol: float = GROWTH_TOL, check_every: int = CHECK_EVERY,
                             channels: int | None = None, dampening: float | None = None,
                             replay_frames: int = REPLAY_FRAMES, device=None,
                             progress: str | Path | None = None, progress_every: int = 10,
                             resume: bool = False, context: dict | None = None,
                             on_progress=None) -> TRFResult:
    """Run the TRF stress test on any ``nn.Module`` with the sequence API ``model(x)``.

    Args:
        model: x (1×T×C×H×W) -> y (1×T×C×sH×sW).
        frames: 2τ+1 frames (odd, ≥ 3); t = 0 is the middle frame (frame 41 of 81).
        size: H = W of the input frames.
        iters: Adam iterations (stops earlier once a divergence is demonstrated).
        lr: Adam learning rate on X.
        seed: seeds the uniform initial X and the perturbation v of the oldest frame.
        threshold: relative influence above which a past frame counts (extent, past condition).
        growth_tol: per-frame log-rate margin of growth / decay (module docstring).
        check_every: iterations between two looks for a divergence (trigger and short replay).
        channels: image channels C (default ``model.in_channels`` or 3).
        dampening: feature dampening λ (appendix F) to test at; None keeps ``model.dampening``.
        replay_frames: frame budget of the final replay of X (periodically extended); 0: no replay
            (then the verdict is never "bounded": no growth was looked for).
        device: default the device of the model's parameters.
        progress: file the search state is written to every ``progress_every`` iterations
            (deleted when the search ends); None: nothing is written.
        resume: continue from ``progress`` when it holds this search (same model, settings, context).
        context: what else the result depends on (e.g. the input description, burst processing):
            part of the identity checked on resume.
        on_progress: called with the fraction of the iterations done after each one (a progress bar).
    """
    if frames < 3 or frames % 2 == 0:
        raise ValueError(f"frames must be odd and >= 3 (2·tau+1, 81 in the paper), got {frames}")
    if size < 1:
        raise ValueError(f"size must be >= 1 pixel, got {size}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold is a relative influence in (0, 1), got {threshold}")
    if not growth_tol >= 0:
        raise ValueError(f"growth_tol is a per-frame log-rate margin >= 0 (e.g. 0.01), got {growth_tol}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1 iteration, got {check_every}")
    if replay_frames < 0:
        raise ValueError(f"replay_frames is a frame budget >= 0 (e.g. {REPLAY_FRAMES}), got {replay_frames}")
    check_progress_settings(progress, progress_every, resume, "iteration")
    tau = (frames - 1) // 2
    c = _in_channels(model, channels)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(int(seed))
    x = torch.rand(1, frames, c, size, size, generator=generator).to(device).requires_grad_(True)
    v = torch.randn(1, c, size, size, generator=generator).to(device)
    optimizer = torch.optim.Adam([x], lr=lr)
    progress = None if progress is None else Path(progress)
    identity = {"model": model_fingerprint(model), "frames": frames, "size": size, "iters": iters, "lr": lr,
                "seed": int(seed), "threshold": threshold, "growth_tol": growth_tol, "check_every": check_every,
                "channels": c, "replay_frames": replay_frames, "progress_every": progress_every,
                "dampening": traits(model).dampening if dampening is None else float(dampening),
                **(context or {})}
    first, p_history, elapsed = 0, [], 0.0
    saved = load_progress(progress, identity, device) if resume else None
    if saved is not None:
        with torch.no_grad():
            x.copy_(saved["x"])
        optimizer.load_state_dict(saved["optimizer"])
        first, p_history, elapsed = int(saved["next"]), list(saved["p_history"]), float(saved["seconds"])

    def grows(rate: float, se: float) -> bool:
        return rate - 2 * se > growth_tol

    scope = ExitStack()
    scope.enter_context(evaluating(model, dampening))
    # Gradients of a contractive model shrink geometrically into the past and reach
    # subnormal floats, which x86 CPUs process ~100x slower (a TRF ran 2.2x slower):
    # flush them to zero during the test (influence below 1e-38 of ‖∂p/∂x‖ is 0 anyway).
    flush = torch.set_flush_denormal(True)
    start = time.perf_counter() - elapsed
    note, grad, y, response, demo = "", None, None, None, None
    try:
        for it in range(first, iters):
            grad, response = None, None  # everything is measured at the X of the last forward pass
            with parametrize.cached():
                y = model(x)
            if y.dim() != 5 or y.shape[1] != frames:
                raise ValueError(f"model(x) must return 1×{frames}×C×H×W for x of shape "
                                 f"{tuple(x.shape)}, got {tuple(y.shape)}")
            h, w = y.shape[-2:]
            p = y[0, tau, :, h // 2, w // 2].sum()
            p_history.append(abs(float(p.detach())))
            if not bool(torch.isfinite(y).all()) or not math.isfinite(p_history[-1]):
                demo = _search_divergence(x.detach()[0], y.detach()[0], tau, it)
                break
            (grad,) = torch.autograd.grad(p.abs(), x)
            if not bool(torch.isfinite(grad).all()):
                note, grad = f"the gradient of p was not finite at iteration {it} (the search stopped there)", None
                break
            energy = grad.detach().pow(2).flatten(2).sum(dim=(0, 2))
            past_drives = float(energy[0]) > threshold * float(energy.max())
            if past_drives and replay_frames > 0 and it % check_every == 0 and it < iters - 1:
                response = _future_response(model, x.detach(), v)
                rate, se, overflowed = _future(response, tau)
                if overflowed or grows(rate, se):  # a trigger only: the replay decides
                    attempt = demonstrate(model, x.detach()[0], max_frames=min(replay_frames, MIN_PERIODS * frames))
                    if attempt.diverged:
                        demo = attempt
                        break
            if it == iters - 1:
                break  # keep X, Y and the gradient of the same evaluated point
            optimizer.zero_grad(set_to_none=True)
            x.grad = -grad  # ascend |p|
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            if on_progress is not None:
                on_progress((it + 1) / iters)
            if progress is not None and (it + 1) % progress_every == 0:
                save_progress(progress, {"version": PROGRESS_VERSION, "identity": identity, "next": it + 1,
                                         "x": x.detach().cpu(), "optimizer": optimizer.state_dict(),
                                         "p_history": p_history, "seconds": time.perf_counter() - start})
        if on_progress is not None:
            on_progress(1.0)
        if grad is not None and response is None:  # the future response at the final X
            response = _future_response(model, x.detach(), v)
        if demo is None and replay_frames > 0:
            demo = demonstrate(model, x.detach()[0], max_frames=replay_frames)
    finally:
        if flush:
            torch.set_flush_denormal(False)  # PyTorch's default
        scope.close()
    seconds = time.perf_counter() - start
    if progress is not None:
        progress.unlink(missing_ok=True)

    if grad is not None:
        energy = grad.detach().double().pow(2).flatten(2).sum(dim=(0, 2)).cpu().numpy()
        influence = energy / energy.max() if energy.max() > 0 else energy
    else:  # nothing finite to measure: the divergence itself is the finding
        influence = np.full(frames, np.nan)
    past = influence[:tau + 1][::-1]  # past[k] = influence of x_{-k}
    above = np.nonzero(past > threshold)[0]
    extent = int(above.max()) + 1 if len(above) else 0
    growth_rate, growth_se = log_rate(np.sqrt(past[1:]), np.arange(1, tau + 1))
    if response is not None:
        future_rate, future_se, _ = _future(response, tau)
        finite = response[np.isfinite(response)]
        peak = finite.max() if len(finite) else 0.0
        response_rel = response / peak if peak > 0 else response
    else:
        future_rate, future_se, response_rel = math.nan, math.nan, np.full(frames, np.nan)
    if grad is None:
        extent, growth_rate, growth_se = tau + 1, math.nan, math.nan

    stopped_early = len(p_history) < iters
    if demo is not None and demo.diverged:
        verdict = "unbounded"
        reason = f"{demo.reason} (X {'itself' if demo.periods == 1 else 'periodically extended'}, "
        reason += f"iteration {len(p_history) - 1})"
    else:
        verdict, reason = _judge(extent, tau, growth_rate, growth_se, future_rate, future_se, threshold,
                                 growth_tol, len(p_history), demo)
    if note:
        reason = f"{reason}; {note}"
    out = y.detach().cpu() if y is not None else torch.empty(0)
    rms = out.double().pow(2).flatten(2).mean(dim=2).sqrt()[0].numpy() if out.numel() else np.zeros(0)
    return TRFResult(inputs=x.detach()[0].cpu(), outputs=out[0] if out.numel() else out,
                     influence=influence, verdict=verdict, extent=extent, reason=reason,
                     stopped_early=stopped_early, iterations=len(p_history), tau=tau,
                     growth_rate=growth_rate, growth_stderr=growth_se, future_rate=future_rate,
                     future_stderr=future_se, future_response=response_rel, p_history=p_history,
                     output_rms=rms, seconds=seconds, threshold=threshold, growth_tol=growth_tol,
                     demonstration=demo)


def _search_divergence(x: torch.Tensor, y: torch.Tensor, tau: int, iteration: int) -> Demonstration:
    """The search itself met a non-finite output: X (one period) is the demonstration."""
    from recstab.diagnostics.demonstration import _Tracker

    tracker = _Tracker(x.shape[0])
    tracker.add(y)
    where = tracker.first_nonfinite
    where = tau if where is None else where  # y finite, p overflowed: t = 0
    reason = (f"non-finite output (first at t = {where - tau:+d}) from a finite input in [0, 1] at iteration "
              f"{iteration}")
    return Demonstration(x.detach().cpu(), 1, np.array(tracker.scales), np.array(tracker.changes), "non-finite",
                         reason, where, math.inf, {"search_iteration": iteration})


def _judge(extent: int, tau: int, rate: float, se: float, future: float, future_se: float,
           threshold: float, tol: float, iterations: int, demo: Demonstration | None) -> tuple[str, str]:
    """Verdict and reason when nothing diverged (see the module docstring)."""
    fills = extent == tau + 1
    decays = rate + 2 * se < -tol
    past = (f"influence rate {rate:+.3g} ± {se:.2g} per frame into the past" if math.isfinite(rate)
            else "the influence vanishes after a few frames")
    fut = (f"future response to x_-{tau}: {future:+.3g} ± {future_se:.2g} per frame"
           if math.isfinite(future) else f"no future response to x_-{tau} after t = 0")
    after = f" ({iterations} iterations)"
    if demo is None:
        return "inconclusive", f"no replay (replay_frames = 0): growth not looked for; {past}; {fut}{after}"
    found = demo.reason
    if demo.status != "no growth":
        return "inconclusive", f"{found}; {past}; {fut}{after}"
    if not fills:
        return "bounded", f"{found}; no influence above {threshold:g} beyond {extent} frame(s), {past}; {fut}{after}"
    if decays:
        crossing = math.log(threshold) / (2 * rate)
        return "bounded", (f"{found}; {past}, a resolved decay: it falls below {threshold:g} at lag ≈ "
                           f"{crossing:.0f}, beyond the {tau + 1}-frame window; {fut}{after}")
    if rate <= tol:
        return "inconclusive", (f"{found}, but x_-{tau} still drives p and the {past} is a decay too slow to "
                                f"resolve in {tau} frames (needs rate + 2·stderr < {-tol:g}); {fut}{after}")
    return "inconclusive", (f"{found}, but x_-{tau} drives p more than recent frames ({past}); {fut}{after}")
