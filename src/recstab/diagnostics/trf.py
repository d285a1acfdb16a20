"""The temporal receptive field (TRF) stress test of section 2.2.

Search for an unstable input sequence by gradient ascent instead of by watching
hours of video. Fix 2τ+1 frames X = (x_-τ … x_τ) (τ = 40: 81 frames of 64×64 in
the paper), run the model over them from its initial state (h_{-τ-1} = 0) and
maximise |p|, p the centre pixel of the output frame y_0 summed over channels:

    max_{0 ≤ X ≤ 1} |p|                                              (eq. 3)

How it is solved here: X starts uniform in [0, 1] (seeded); each iteration runs
the model on X, takes g = ∂|p|/∂X, makes one Adam step *ascending* |p| and then
clamps X back into [0, 1] (projected gradient ascent; the prototype of DESIGN.md,
lr 0.05). The model's weights are never touched: gradients are taken with
``torch.autograd.grad`` with respect to X only, in eval mode, so the test can run
in the middle of a training run.

Measurements and their thresholds (all documented defaults, all arguments):

- influence_t = ‖∂p/∂x_t‖², the gradient energy of p per input frame, divided by
  its maximum over t (so the most influential frame has 1). It is measured at the
  last X the search evaluated.
- ``extent`` = 1 + the largest k ≥ 0 such that influence_{-k} > ``threshold``
  (1e-6): the number of frames, the current one included, of the window of past
  frames that still drive p. A single-frame model has extent 1, a causal mf7
  model 7, h_t = 0.5·h_{t-1} + 0.2·x_t has influence 0.25^k and extent 10.
- verdict "unbounded" when divergence is *proven*, i.e. any of
    1. an output, p or the gradient is not finite;
    2. some output value exceeds ``blowup`` in magnitude (1e6: inputs are in
       [0, 1] and a restoration model outputs about [0, 1]; even an untrained
       He-initialised feedforward backbone stays orders of magnitude below);
    3. the distant past still drives p: the oldest frame x_-τ has influence above
       ``threshold`` (extent = τ + 1, the TRF fills the whole window).
  Otherwise "bounded" (nothing unstable was found; reasonable, not certain,
  evidence of stability). Conditions 1 and 2 are checked at every iteration and
  stop the search early (``stopped_early``, ``reason``): the X found is then an
  unstable sequence, a proof that the model is unstable. Condition 3 is judged on
  the final X (the search goes on: memory is what the optimisation reveals); the
  iteration where it first held is reported as ``memory_unbounded_at``.

A stable-but-slow model (e.g. h_t = 0.99·h_{t-1} + x_t) also fills an 81-frame
window and is reported unbounded: the test cannot tell memory longer than τ from
instability, exactly like the paper's visual reading of the TRF picture.

The picture (:meth:`TRFResult.save_png`) has the paper's two rows X and Y every 5
frames from -τ to +τ, plus a strip with the influence and the output RMS per frame.
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

from recstab.models.dampening import evaluating

THRESHOLD = 1e-6   # relative gradient energy below which a past frame has no influence on p
BLOWUP = 1e6       # |y| above this proves divergence (inputs and sane outputs are ~[0, 1])
LR = 0.05          # Adam step on X (pixel units)


@dataclass
class TRFResult:
    """What :func:`temporal_receptive_field` found. Frame index i ↔ time t = i - tau."""

    inputs: torch.Tensor            # X, T×C×H×W in [0, 1]
    outputs: torch.Tensor           # Y, T×C×sH×sW (raw, unclamped; may hold inf/nan)
    influence: np.ndarray           # (T,) ‖∂p/∂x_t‖² / max_t, at the last evaluated X
    verdict: str                    # "bounded" | "unbounded"
    extent: int                     # frames of the past window (current included) that drive p
    reason: str                     # why the verdict, in words
    stopped_early: bool             # divergence proven before `iters` iterations
    iterations: int                 # iterations actually run
    tau: int
    p_history: list = field(default_factory=list)   # |p| per iteration
    output_rms: np.ndarray = None   # (T,) RMS of each output frame
    seconds: float = 0.0
    memory_unbounded_at: tuple | None = None  # (iteration, seconds) when x_-τ first drove p (criterion 3)
    threshold: float = THRESHOLD
    blowup: float = BLOWUP

    @property
    def unbounded(self) -> bool:
        return self.verdict == "unbounded"

    @property
    def times(self) -> np.ndarray:
        return np.arange(-self.tau, self.tau + 1)

    def to_dict(self) -> dict:
        """JSON-ready numbers (no tensors)."""
        return {
            "verdict": self.verdict, "extent": self.extent, "reason": self.reason,
            "stopped_early": self.stopped_early, "iterations": self.iterations, "tau": self.tau,
            "p_final": self.p_history[-1] if self.p_history else float("nan"),
            "influence": [float(v) for v in self.influence],
            "output_rms": [float(v) for v in self.output_rms],
            "threshold": self.threshold, "blowup": self.blowup, "seconds": self.seconds,
            "memory_unbounded_at": self.memory_unbounded_at,
        }

    def figure(self, every: int = 5):
        """The paper's TRF picture: rows X and Y every `every` frames, plus influence/RMS curves."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = [t for t in range(-(self.tau // every) * every, self.tau + 1, every)]
        fig = plt.figure(figsize=(max(6.0, 0.75 * len(cols)), 4.2))
        grid = fig.add_gridspec(3, len(cols), height_ratios=[1, 1, 1.3], hspace=0.15, wspace=0.05)
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
        rms = np.where(np.isfinite(self.output_rms), self.output_rms, np.nan)
        ax2 = ax.twinx()
        ax2.semilogy(self.times, np.where(rms > 0, rms, np.nan), "r.-", label="RMS(y_t)")
        ax.set_xlim(-self.tau - 0.5, self.tau + 0.5)
        ax.set_xlabel("t")
        ax.set_ylabel("influence", color="b")
        ax2.set_ylabel("RMS(y_t)", color="r")
        early = " (stopped early)" if self.stopped_early else ""
        fig.suptitle(f"TRF: {self.verdict}{early}, extent {self.extent}, {self.iterations} iterations\n"
                     f"{self.reason}", fontsize=9)
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


def _in_channels(model: nn.Module, channels: int | None) -> int:
    if channels is not None:
        return channels
    return int(getattr(model, "in_channels", 3))


def temporal_receptive_field(model: nn.Module, frames: int = 81, size: int = 64, iters: int = 500,
                             lr: float = LR, seed: int = 0, threshold: float = THRESHOLD,
                             blowup: float = BLOWUP, channels: int | None = None,
                             dampening: float | None = None, device=None) -> TRFResult:
    """Run the TRF stress test on any ``nn.Module`` with the sequence API ``model(x)``.

    Args:
        model: x (1×T×C×H×W) -> y (1×T×C×sH×sW).
        frames: 2τ+1 frames (odd, ≥ 3); t = 0 is the middle frame (frame 41 of 81).
        size: H = W of the input frames.
        iters: Adam iterations (stops earlier once divergence is proven).
        lr: Adam learning rate on X.
        seed: seeds the uniform initial X.
        threshold: relative influence above which a past frame counts (extent, criterion 3).
        blowup: |y| above which divergence is proven (criterion 2).
        channels: image channels C (default ``model.in_channels`` or 3).
        dampening: feature dampening λ (appendix F) to test at; None keeps ``model.dampening``.
        device: default the device of the model's parameters.
    """
    if frames < 3 or frames % 2 == 0:
        raise ValueError(f"frames must be odd and >= 3 (2·tau+1, 81 in the paper), got {frames}")
    if size < 1:
        raise ValueError(f"size must be >= 1 pixel, got {size}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold is a relative influence in (0, 1), got {threshold}")
    if not blowup > 0:
        raise ValueError(f"blowup must be > 0, got {blowup}")
    tau = (frames - 1) // 2
    c = _in_channels(model, channels)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(int(seed))
    x = torch.rand(1, frames, c, size, size, generator=generator).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)

    scope = ExitStack()
    scope.enter_context(evaluating(model, dampening))
    # Gradients of a contractive model shrink geometrically into the past and reach
    # subnormal floats, which x86 CPUs process ~100x slower (a TRF ran 2.2x slower):
    # flush them to zero during the test (influence below 1e-38 of ‖∂p/∂x‖ is 0 anyway).
    flush = torch.set_flush_denormal(True)
    start = time.perf_counter()
    p_history: list[float] = []
    reason, stopped_early, grad, y, memory_at = "", False, None, None, None
    try:
        for it in range(iters):
            grad = None  # the influence is always measured at the X of the last forward pass
            with parametrize.cached():
                y = model(x)
            if y.dim() != 5 or y.shape[1] != frames:
                raise ValueError(f"model(x) must return 1×{frames}×C×H×W for x of shape "
                                 f"{tuple(x.shape)}, got {tuple(y.shape)}")
            h, w = y.shape[-2:]
            p = y[0, tau, :, h // 2, w // 2].sum()
            p_history.append(abs(float(p.detach())))
            finite_y = bool(torch.isfinite(y).all())
            if math.isfinite(p_history[-1]):
                (grad,) = torch.autograd.grad(p.abs(), x)
            if not finite_y or not math.isfinite(p_history[-1]):
                reason, stopped_early = f"non-finite output at iteration {it}", True
                break
            if not bool(torch.isfinite(grad).all()):
                reason, stopped_early = f"non-finite gradient of p at iteration {it}", True
                break
            if memory_at is None:
                energy = grad.detach().pow(2).flatten(2).sum(dim=(0, 2))
                if float(energy[0]) > threshold * float(energy.max()):
                    memory_at = (it, time.perf_counter() - start)
            peak = float(y.detach().abs().max())
            if peak > blowup:
                where = int(y.detach().abs().flatten(2).amax(dim=(0, 2)).gt(blowup).nonzero()[0]) - tau
                reason = f"|y| = {peak:.3g} > {blowup:g} (first at t = {where:+d}) at iteration {it}"
                stopped_early = True
                break
            if it == iters - 1:
                break  # keep X, Y and the gradient of the same evaluated point
            optimizer.zero_grad(set_to_none=True)
            x.grad = -grad  # ascend |p|
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0, 1)
    finally:
        if flush:
            torch.set_flush_denormal(False)  # PyTorch's default
        scope.close()
    seconds = time.perf_counter() - start

    if grad is not None and bool(torch.isfinite(grad).all()):
        energy = grad.detach().double().pow(2).flatten(2).sum(dim=(0, 2)).cpu().numpy()
        influence = energy / energy.max() if energy.max() > 0 else energy
    else:  # nothing finite to measure: the divergence itself is the finding
        influence = np.full(frames, np.nan)
    past = influence[:tau + 1][::-1]  # past[k] = influence of x_{-k}
    above = np.nonzero(past > threshold)[0]
    extent = int(above.max()) + 1 if len(above) else 0
    if stopped_early:
        verdict = "unbounded"
        extent = tau + 1 if not len(above) or np.isnan(influence).any() else extent
    elif extent == tau + 1:
        verdict = "unbounded"
        reason = (f"the oldest frame x_-{tau} still drives p (influence {past[tau]:.3g} > {threshold:g})")
    else:
        verdict = "bounded"
        reason = (f"no influence above {threshold:g} beyond {extent} frame(s), "
                  f"outputs within {blowup:g} after {len(p_history)} iterations")
    out = y.detach().cpu() if y is not None else torch.empty(0)
    rms = out.double().pow(2).flatten(2).mean(dim=2).sqrt()[0].numpy() if out.numel() else np.zeros(0)
    return TRFResult(inputs=x.detach()[0].cpu(), outputs=out[0] if out.numel() else out,
                     influence=influence, verdict=verdict, extent=extent, reason=reason,
                     stopped_early=stopped_early, iterations=len(p_history), tau=tau,
                     p_history=p_history, output_rms=rms, seconds=seconds, memory_unbounded_at=memory_at,
                     threshold=threshold,
                     blowup=blowup)
