"""The largest Lyapunov exponent λ₁ of a recurrent video model (Benettin's method).

A streaming model is a dynamical system driven by its input frames,

    s_t = F(x_t, s_{t-1}),        y_t = G(x_t, s_{t-1}),

with s the state returned by ``model.process(x_t, s_{t-1})``. A small change δ_0 of
the state after frame 0 evolves, to first order, as δ_t = J_t δ_{t-1} with
J_t = ∂F/∂s at (x_t, s_{t-1}): the tangent map at a fixed input. The largest
Lyapunov exponent is its average logarithmic growth per frame,

    λ₁ = lim_{N→∞} (1/N) log ‖J_N ⋯ J_1 δ_0‖          (natural log, per frame)

for a generic δ_0. λ₁ < 0: nearby trajectories converge, the state forgets
perturbations geometrically (memory decays like e^{λ₁ t}); λ₁ > 0: they separate
exponentially, the recurrence amplifies its own past (the instability of section 2.1,
measured along real input instead of bounded from the weights). For a linear
recurrence s_t = A s_{t-1} + B x_t, J_t = A and λ₁ = log ρ(A), ρ the spectral radius.

Benettin's algorithm (the product of Jacobians overflows or underflows, so it is
renormalised frame by frame):

    δ ← random unit vector (seeded), in the floating-point tensors of the state
    for every frame t ≥ 1:   δ ← J_t δ  (a Jacobian-vector product);  g_t = log ‖δ‖;  δ ← δ / ‖δ‖

so G(t) = g_1 + … + g_t = log ‖J_t ⋯ J_1 δ_0‖, the log growth of the tangent over t frames.

The estimate. The mean of g_t after a burn-in is biased whenever G(t) approaches its slope
slowly. For a Jordan block of size n, ‖J^t δ‖ ∝ t^{n−1}·ρ^t, so G(t) = c + t·log ρ + (n−1)·log t
+ O(1/t), and the mean over frames b … T exceeds log ρ by (n−1)·log(T/b)/(T − b) (for
[[0.9, 50], [0, 0.9]] at 300 frames: +0.0072, while batch means of g_t claimed an error of 0.0013).
Here λ₁ is the slope of a least-squares fit of

    G(t) = c + λ₁·t + k·log(t + 1)      over the frames after the burn-in,

done on the increments, g_t = λ₁ + k·log((t + 1)/t) + noise, so the polynomial factor of a Jordan
block (k = n − 1) and the slow O(1/t) alignment of δ with the most expanding direction do not
count as growth. k is fitted, not assumed (``log_order``): ≈ 0 for diagonalisable maps and for
chaotic ones, whose G is a random walk or a bounded oscillation around its line.

The stated error, ``stderr``² = statistical² + model² + resolution²:

- statistical: the long-run variance of the fit residuals by *batch means* (``batches`` = 10
  contiguous batches; a batch longer than the correlation of successive g_t absorbs it),
  propagated through the least-squares weights, λ̂₁ = Σ_t w_t g_t: σ²_LR · Σ_t w_t²;
- model: the fit is repeated without the first third of its frames; the change of λ̂₁ beyond
  two standard deviations of what the noise explains (√(stat'² − stat²)) is the transient that
  the fit's two terms do not capture (the O(1/t²) terms of a Jordan block, the (ρ₂/ρ)^t alignment
  of a non-normal map, ρ₂ its second eigenvalue's modulus, a rotation's periodic modulation) and is
  added in full;
- resolution: 4 machine epsilons of the tangent's dtype, a few roundings per frame (the growth
  of a float32 state is not resolved below ~5e-7 per frame, of a float64 one ~1e-15).

The free k costs variance on noisy streams (the stderr of i.i.d. growths is about 2× the plain
mean's at 300 frames, 1.4× at 1000); in exchange the stated error covers the truth (|z| ≤ 3) on
Jordan blocks (2×2 with coupling 50, 4×4, 5×5), rotations, non-normal diagonalisable maps and the
logistic map (``benchmarks/results/stability_verdicts.md``: the calibration table). With fewer than
3·batches frames after the burn-in there is no room for the fit: λ₁ is the plain mean and
``stderr`` its batch-means error (or nan), and ``method`` says so.

The first ``burn_in`` (50) growths are discarded: δ needs a few frames to leave the directions
that die fastest, and the state to leave its initial value. J_t δ is computed in forward mode (``torch.autograd.forward_ad``, the engine of
``torch.func.jvp``): one pass costs about one extra forward and never forms J_t. An
op without a forward-mode derivative (e.g. ``grid_sample`` of flow-warping models)
falls back to the reverse-over-reverse identity J·v = ∂/∂w ⟨Jᵀw, v⟩ (two backward
passes). The weights never receive gradients.

What the tangent lives in: every floating-point tensor of the state pytree (a tensor,
or dicts / lists / tuples of them); integers and other leaves are carried unchanged.
Keys that only hold the input window (``"frames"`` of multi-frame models) also get a
tangent: it is shifted out by the new frames after the window length and does not
change λ₁. A batch of B clips is one system of B independent copies: δ spans all of
them, so λ₁ is the largest exponent among the B trajectories.

Evidence:
- ``positive_ranges``: the frame ranges [start, stop) where the running exponent, the
  mean of g over the last ``window`` (25) frames (fewer just after the burn-in), is > 0:
  stretches of the input along which the model amplified its own state.
- A model without recurrent state (``model.is_recurrent`` False, or a state without
  floating tensors) has λ₁ = −∞ with a note; so has a model whose tangent becomes
  exactly 0 (finite memory: a window, or a state reset as in burst processing).
- A state that turns non-finite ends the stream: the frames before it are used, with a note.

Frames: a B×T×C×H×W clip, a T×C×H×W clip (e.g. ``temporal_receptive_field(...).inputs``:
λ₁ along the TRF sequence), or an iterable of clips (T×C×H×W or B×T×C×H×W, all with
the same B) or of C×H×W frames, streamed one after the other as one sequence. They
are the model's inputs as given; ``sigma`` adds N(0, sigma²) noise (the [0, 1] scale,
not clamped) drawn for frame t from a generator seeded by (seed, t), so how the frames
are split into clips cannot change the result. Frames are streamed one at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten, tree_unflatten

from recstab.data.degradations import make_generator
from recstab.models.dampening import evaluating
from recstab.models.interface import traits

BURN_IN = 50   # growths discarded while δ aligns with the most expanding direction
BATCHES = 10   # batch means for the standard error
WINDOW = 25    # frames of the running exponent behind `positive_ranges`


def _is_float(leaf) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.is_floating_point()


def jvp(fn, primals: tuple, tangents: tuple):
    """``(fn(*primals), J·tangents)``: a Jacobian-vector product through any autograd code.

    ``fn`` returns a pytree (tensor, dict, list, tuple, ...); the second value has the
    same structure, with the directional derivative at every floating-point tensor leaf
    (zeros where it does not depend on the primals) and None at the other leaves.
    Forward mode; reverse-over-reverse when an op has no forward-mode derivative.
    """
    try:
        with torch.no_grad(), fwAD.dual_level():
            out = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
            leaves, spec = tree_flatten(out)
            values, dots = [], []
            for leaf in leaves:
                if _is_float(leaf):
                    primal, dot = fwAD.unpack_dual(leaf)
                    values.append(primal.clone())  # plain tensors, valid after the dual level
                    dots.append(torch.zeros_like(primal) if dot is None else dot.clone())
                else:
                    values.append(leaf)
                    dots.append(None)
        return tree_unflatten(values, spec), tree_unflatten(dots, spec)
    except NotImplementedError:  # an op without forward-mode AD (grid_sample, ...)
        return _jvp_reverse(fn, primals, tangents)


def _jvp_reverse(fn, primals: tuple, tangents: tuple):
    """J·v = ∂/∂w ⟨Jᵀw, v⟩ at w = 0: two reverse passes, for ops without forward mode."""
    with torch.enable_grad():
        inputs = [p.detach().requires_grad_(True) for p in primals]
        out = fn(*inputs)
        leaves, spec = tree_flatten(out)
        live = [i for i, leaf in enumerate(leaves) if _is_float(leaf) and leaf.requires_grad]
        dots = [torch.zeros_like(leaf) if _is_float(leaf) else None for leaf in leaves]
        if live:
            ws = [torch.zeros_like(leaves[i], requires_grad=True) for i in live]
            grads = torch.autograd.grad([leaves[i] for i in live], inputs, grad_outputs=ws,
                                        create_graph=True, allow_unused=True)
            pairs = [(g, t) for g, t in zip(grads, tangents) if g is not None and g.requires_grad]
            if pairs:
                jv = torch.autograd.grad([g for g, _ in pairs], ws, grad_outputs=[t for _, t in pairs],
                                         allow_unused=True, materialize_grads=True)
                for i, d in zip(live, jv):
                    dots[i] = d.detach()
    values = [leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    return tree_unflatten(values, spec), tree_unflatten(dots, spec)


@dataclass
class LyapunovResult:
    """What :func:`lyapunov_exponent` measured. ``per_frame[i]`` is the log growth at stream frame i + 1."""

    exponent: float                 # λ₁ per frame (natural log); -inf: no recurrent memory
    stderr: float                   # stated error: statistical ⊕ model ⊕ resolution (nan: too few frames)
    burn_in: int                    # growths discarded at the start
    frames_used: int                # growths averaged (after the burn-in)
    per_frame: np.ndarray           # log ‖J_t δ_{t-1}‖ for stream frames t = 1, 2, ...
    positive_ranges: list           # [(start, stop)) stream-frame ranges with running exponent > 0
    note: str = ""
    method: str = ""                # how the exponent and stderr were computed
    log_order: float = math.nan     # k of the fit G(t) = c + λ₁t + k·log(t+1) (Jordan block size − 1)
    window: int = WINDOW
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def running(self) -> np.ndarray:
        """Mean growth over the last ``window`` frames, for each post-burn-in frame."""
        post = self.per_frame[self.burn_in:]
        if not len(post):
            return np.zeros(0)
        c = np.concatenate([[0.0], np.cumsum(post)])
        i = np.arange(1, len(post) + 1)
        lo = np.maximum(0, i - self.window)
        return (c[i] - c[lo]) / (i - lo)

    def to_dict(self) -> dict:
        """JSON-ready numbers (±inf and nan as floats)."""
        return {"exponent": self.exponent, "stderr": self.stderr, "burn_in": self.burn_in,
                "frames_used": self.frames_used, "per_frame": [float(v) for v in self.per_frame],
                "positive_ranges": [list(r) for r in self.positive_ranges], "note": self.note,
                "method": self.method, "log_order": self.log_order, "window": self.window, "seconds": self.seconds,
                "settings": dict(self.settings)}


def _clips(frames) -> Iterator[torch.Tensor]:
    """Every item of ``frames`` as a B×T×C×H×W tensor."""
    items = [frames] if isinstance(frames, torch.Tensor) else frames
    if not isinstance(items, Iterable):
        raise TypeError(f"frames must be a tensor or an iterable of tensors, got {type(frames).__name__}")
    for k, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"frames item {k} is a {type(item).__name__}, expected a tensor "
                            "(B×T×C×H×W, T×C×H×W or C×H×W)")
        if item.dim() == 3:
            item = item[None, None]
        elif item.dim() == 4:
            item = item[None]
        elif item.dim() != 5:
            raise ValueError(f"frames item {k} has shape {tuple(item.shape)}; expected B×T×C×H×W, "
                             "T×C×H×W (one clip) or C×H×W (one frame)")
        if not item.is_floating_point():
            raise ValueError(f"frames item {k} has dtype {item.dtype}; expected floating point in [0, 1]")
        yield item


def _batch_variance(residuals: np.ndarray, batches: int) -> float:
    """Long-run variance σ²_LR of a series by batch means: size · var(batch means) (ddof 1)."""
    size = len(residuals) // batches
    means = residuals[:size * batches].reshape(batches, size).mean(axis=1)
    return float(size * means.var(ddof=1))


def _fit(growth: np.ndarray, first: int, batches: int) -> tuple[float, float, float]:
    """(λ₁, statistical error, k) of g_t = λ₁ + k·log((t+1)/t) by least squares; t = first, first + 1, …"""
    t = np.arange(first, first + len(growth), dtype=np.float64)
    design = np.stack([np.ones_like(t), np.log1p(1.0 / t)], axis=1)
    solve = np.linalg.pinv(design)               # 2 × n: the least-squares weights
    lam, k = solve @ growth
    residuals = growth - design @ np.array([lam, k])
    return float(lam), math.sqrt(_batch_variance(residuals, batches) * float((solve[0] ** 2).sum())), float(k)


def estimate(growth: np.ndarray, first: int = 1, batches: int = BATCHES,
             resolution: float = 0.0) -> tuple[float, float, float, str]:
    """λ₁, its stated error, k and the method in words, from the growths g_t of frames t = first, … .

    See the module docstring: least squares of g_t on [1, log((t+1)/t)], the error from batch
    means of the residuals, the change when the first third is left out, and ``resolution``.
    """
    growth = np.asarray(growth, dtype=np.float64)
    n = len(growth)
    if n < 3 * batches:
        size = n // batches
        exponent = float(growth.mean()) if n else math.nan
        if size >= 1:
            means = growth[:size * batches].reshape(batches, size).mean(axis=1)
            stderr = math.hypot(float(means.std(ddof=1) / math.sqrt(batches)), resolution)
            return exponent, stderr, math.nan, (f"plain mean (fewer than {3 * batches} frames after the burn-in for "
                                                f"the transient fit); batch means: {batches} batches of {size} frames")
        return exponent, math.nan, math.nan, f"fewer than {batches} frames after the burn-in: no standard error"
    lam, stat, k = _fit(growth, first, batches)
    cut = n // 3
    lam_late, stat_late, _ = _fit(growth[cut:], first + cut, batches)
    noise = math.sqrt(max(stat_late ** 2 - stat ** 2, 0.0))
    model = max(0.0, abs(lam - lam_late) - 2 * noise)
    stderr = math.sqrt(stat ** 2 + model ** 2 + resolution ** 2)
    method = (f"least squares of G(t) = c + λ₁t + k·log(t+1) over frames {first}-{first + n - 1} (k = {k:.3g}); "
              f"stderr: batch means of the residuals ({batches} batches) {stat:.2g}, model {model:.2g} (refit "
              f"without the first {cut} frames moved λ₁ by {abs(lam - lam_late):.2g}), resolution {resolution:.2g}")
    return lam, stderr, k, method


def _positive_ranges(running: np.ndarray, first_frame: int) -> list:
    above = np.concatenate([[False], running > 0, [False]])
    edges = np.flatnonzero(np.diff(above.astype(np.int8)))
    return [(first_frame + int(a), first_frame + int(b)) for a, b in zip(edges[::2], edges[1::2])]


def lyapunov_exponent(model: nn.Module, frames, *, burn_in: int = BURN_IN, sigma: float | None = None,
                      seed: int = 0, max_frames: int | None = None, batches: int = BATCHES,
                      window: int = WINDOW, dampening: float | None = None, device=None) -> LyapunovResult:
    """Largest Lyapunov exponent of ``model``'s recurrence along the stream ``frames``.

    Args:
        model: streams with ``model.process(x_t, state)`` (x_t: B×1×C×H×W), eval mode is
            used and the training mode restored; weights get no gradients.
        frames: a B×T×C×H×W or T×C×H×W clip, or an iterable of clips / C×H×W frames
            (one continuous stream; e.g. ``trf.inputs`` of a TRF result).
        burn_in: growths discarded at the start (50).
        sigma: std of Gaussian noise added to every frame ([0, 1] scale), seeded by (seed, t).
        seed: seeds the initial tangent and the noise.
        max_frames: stop after this many stream frames (None: the whole stream).
        batches: number of batch means for ``stderr`` (≥ 2).
        window: frames of the running exponent behind ``positive_ranges``.
        dampening: feature dampening λ to measure at (None: ``model.dampening`` as it is).
        device: default the device of the model's parameters.
    """
    if int(burn_in) != burn_in or burn_in < 0:
        raise ValueError(f"burn_in must be a non-negative integer of frames, got {burn_in}")
    if sigma is not None and not 0 <= sigma <= 1:
        raise ValueError(f"sigma is the noise std on the [0, 1] scale (e.g. 30/255) or None, got {sigma}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if max_frames is not None and max_frames < 2:
        raise ValueError(f"max_frames must be >= 2 (one frame sets the state, the next measures) "
                         f"or None, got {max_frames}")
    if batches < 2:
        raise ValueError(f"batches must be >= 2 for a batch-means standard error, got {batches}")
    if window < 1:
        raise ValueError(f"window must be >= 1 frame, got {window}")
    if not traits(model).streamable:
        raise ValueError(f"{type(model).__name__} cannot stream with process(x, state): the Lyapunov "
                         "exponent follows the recurrence frame by frame")
    settings = dict(burn_in=int(burn_in), sigma=sigma, seed=int(seed), max_frames=max_frames,
                    batches=int(batches), window=int(window), dampening=dampening)
    burn_in = int(burn_in)
    if not traits(model).is_recurrent:
        return LyapunovResult(-math.inf, 0.0, burn_in, 0, np.zeros(0), [], window=window, settings=settings,
                              note="model.is_recurrent is False: no recurrent state, perturbations "
                                   "leave with the input window (finite memory)")
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    in_channels = traits(model).in_channels

    growth: list[float] = []
    note, state, delta, batch = "", None, None, None
    t = -1
    start = time.perf_counter()
    scope = ExitStack()
    scope.enter_context(evaluating(model, dampening))
    scope.enter_context(torch.no_grad())
    scope.enter_context(parametrize.cached())
    flush = torch.set_flush_denormal(True)  # subnormal tangents of contractive maps are ~100x slower on x86
    try:
        for clip in _clips(frames):
            if batch is None:
                batch = clip.shape[0]
            if clip.shape[0] != batch:
                raise ValueError(f"all clips must have the same batch size B = {batch}, got {tuple(clip.shape)}")
            if in_channels is not None and clip.shape[2] != in_channels:
                raise ValueError(f"frames have {clip.shape[2]} channels, the model takes {in_channels}: "
                                 f"shape {tuple(clip.shape)}")
            for k in range(clip.shape[1]):
                t += 1
                if max_frames is not None and t >= max_frames:
                    break
                x = clip[:, k:k + 1].to(device)
                if sigma:
                    noise = torch.randn(x.shape, generator=make_generator(seed, t), dtype=x.dtype)
                    x = x + sigma * noise.to(device)
                if state is None:  # frame 0: the state whose perturbation we follow
                    _, state = model.process(x, None)
                    leaves, _ = tree_flatten(state)
                    floats = [leaf for leaf in leaves if _is_float(leaf)]
                    if not floats or sum(f.numel() for f in floats) == 0:
                        note = "the state holds no floating-point tensor: no recurrent memory"
                        break
                    g = torch.Generator().manual_seed(int(seed))
                    delta = [torch.randn(f.shape, generator=g, dtype=f.dtype).to(f.device) for f in floats]
                    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta))
                    delta = [d / norm for d in delta]
                    continue
                leaves, spec = tree_flatten(state)
                where = [i for i, leaf in enumerate(leaves) if _is_float(leaf)]  # δ has these leaves

                def step(*floats, x=x, leaves=leaves, spec=spec, where=where):
                    full = list(leaves)
                    for i, f in zip(where, floats):
                        full[i] = f
                    return model.process(x, tree_unflatten(full, spec))[1]

                state, dstate = jvp(step, tuple(leaves[i] for i in where), tuple(delta))
                new_leaves, _ = tree_flatten(state)
                dleaves, _ = tree_flatten(dstate)
                delta = [d for leaf, d in zip(new_leaves, dleaves) if _is_float(leaf)]
                if not all(bool(torch.isfinite(leaf).all()) for leaf in new_leaves if _is_float(leaf)):
                    note = f"the state is not finite after stream frame {t}: the trajectory diverged"
                    break
                norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta))
                if not math.isfinite(norm):
                    note = f"the tangent overflowed at stream frame {t}"
                    break
                if norm == 0:
                    note = (f"the tangent vanished at stream frame {t}: the state forgets its past in "
                            "finitely many frames")
                    growth.append(-math.inf)
                    break
                growth.append(math.log(norm))
                delta = [d / norm for d in delta]
            else:
                continue
            break  # max_frames reached or the measurement ended inside this clip
    finally:
        if flush:
            torch.set_flush_denormal(False)
        scope.close()
    seconds = time.perf_counter() - start

    per_frame = np.asarray(growth, dtype=np.float64)
    if state is None and not note:
        raise ValueError("frames is empty: at least 2 frames are needed")
    if not len(per_frame) and not note:
        raise ValueError("only one frame: at least 2 are needed (one sets the state, the next measures)")
    if note.startswith("the state holds no") or (len(per_frame) and per_frame[-1] == -math.inf):
        return LyapunovResult(-math.inf, 0.0, burn_in, 0, per_frame, [], note=note, window=window,
                              seconds=seconds, settings=settings)
    used_burn_in = burn_in
    if len(per_frame) <= burn_in:
        used_burn_in = 0
        note = (note + "; " if note else "") + (f"only {len(per_frame)} growths for a burn-in of {burn_in}: "
                                                "the burn-in was not discarded")
    post = per_frame[used_burn_in:]
    resolution = 4 * float(torch.finfo(delta[0].dtype).eps) if delta else 0.0  # a few roundings per frame
    exponent, stderr, log_order, method = estimate(post, used_burn_in + 1, batches, resolution)
    result = LyapunovResult(exponent, stderr, used_burn_in, len(post), per_frame, [], note=note,
                            method=method, log_order=log_order, window=window, seconds=seconds,
                            settings=settings)
    result.positive_ranges = _positive_ranges(result.running, used_burn_in + 1)
    return result
