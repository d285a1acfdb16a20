r"""Replayable divergence: the only evidence behind a TRF "unbounded" and a "proven unstable".

A demonstration is an input anyone can replay — a period P of L frames, finite and in [0, 1],
repeated M times — and a criterion on the outputs that the replay produces (``model`` from its
initial state, eval mode, no gradients). Write

    Y_m  the L output frames of period m (m = 1 … M),
    s_m = ‖Y_m‖₂                the output scale of period m,
    d_m = ‖Y_m − Y_{m−1}‖₂      its change from the previous period (m ≥ 2),
    H   = ⌊M/2⌋                 the first half of the horizon.

The replay **diverges** when

    (N) an output is not finite (the input is finite), or
    (G) M ≥ 32 (``MIN_PERIODS``) and, at the end of the horizon,
        s_M ≥ 10⁶ · max_{m ≤ H} s_m,                                  the output grew by 10⁶ over
                                                                       everything the first half did,
        d_M ≥ 10⁶ · max(max_{2 ≤ m ≤ H} d_m, 10⁻⁶ · max_{m ≤ H} s_m),  so did its change per period
                                                                       (below 10⁻⁶ of the output a
                                                                       change is rounding),
        s_m and d_m strictly increase over the last 4 periods         no sign of stopping.

Only ratios enter (scale-free): multiplying the output by any constant changes nothing, and
h = 0.5·h + 1e7·x, whose outputs are 1e7, never qualifies.

Why (G) cannot fire on a contraction's transient
-------------------------------------------------
Take a linear recurrence h_t = A·h_{t−1} + B·x_t, y_t = C·h_t + D·x_t, any initial state, an input
of period L. With Φ = A^L and h_(m) the state at the end of period m, h_(m) = Φ·h_(m−1) + b (b the
response to one period from zero), so h_(m) − h_(m−1) = Φ^{m−1}·(h_(1) − h_(0)) and, O the linear map
from the state at the start of a period to that period's outputs (D·x cancels in differences),

    Y_m − Y_{m−1} = O·Φ^{m−2}·v,        v = h_(1) − h_(0).                              (1)

(a) ρ(A) < 1. Then Σ_m ‖Φ^m‖ < ∞, so Σ_m d_m < ∞: Y_m converges to the periodic orbit, d_m → 0 and
    s_m converges. Past the transient (G) fails at every horizon (it asks for growth by 10⁶ at the
    end of the horizon), and (N) never fires (the output is bounded).
(b) The transient itself cannot pass, at any horizon, when A has a single eigenvalue λ with |λ| ≤ 1
    (Jordan blocks of any coupling, of size n ≤ 8, any number of them), or a single complex pair
    r·e^{±iθ}, r ≤ 1, without Jordan coupling (a scaled rotation, in any basis). Then
    Φ^j = μ^j Σ_{i<n} C(j, i)·N^i (μ = λ^L, N nilpotent), so by (1) d_m = |μ|^{m−2}·‖q(m)‖ with q a
    vector polynomial of degree k ≤ n − 1 (for the pair: q(m) = Re(w·e^{i(m−2)Lθ}), w complex).
    Such a q is fixed by its values at k + 1 (pair: 2) nodes m_j in [2, H] by the Lagrange formula
    of its space, q(M) = Σ_j ℓ_j(M)·q(m_j); and |μ|^{M−2} ≤ |μ|^{m_j−2} since |μ| ≤ 1 and m_j ≤ M. So

        d_M ≤ Λ · max_{2 ≤ m ≤ H} d_m,      Λ = Σ_j |ℓ_j(M)|,

    Λ bounded over node choices by :func:`extrapolation_constant` (:func:`rotation_constant` for the
    pair). For H ≥ 16 and M ≤ 2H + 1 it is at most 3.5·10⁵ for k = 7 (3.43 for k = 1, 1.0·10³ for
    k = 4), and 3.43 for the pair: below 10⁶, so the d-condition of (G) fails. (``tests/test_trf.py``
    checks these constants for 16 ≤ H ≤ 1024, beyond which they fall towards the Chebyshev values
    T_k(3), and the bound itself on random polynomials.) This covers every scalar recurrence,
    h = 0.99·R(π/100)·h + B·x read out through one coordinate, the Jordan block [[0.999, 50],
    [0, 0.999]] and the 5×5 Jordan block at 0.95 — whatever the coupling, which only scales q
    (and any input, initial state and read-out, which only change v and O). As it needs only |λ| ≤ 1 it also
    covers the marginal Jordan block at λ = 1, whose output does grow without bound, but like a
    polynomial: polynomial growth is never *demonstrated* (a monomial m^k grows by 2^k over a
    doubling of the horizon).
(c) The limits. With several distinct eigenvalues, (1) is an exponential polynomial with more terms
    and its Λ grows with their number: a contraction with many eigenvalues just below 1 can mimic a
    high-degree polynomial for about 1/(1 − ρ) frames. No finite replay separates ρ = 1 − ε from
    ρ = 1 + ε over a horizon ≪ 1/ε; (G) therefore asks for growth *at a rate* — 10⁶ within the last
    doubling of the horizon, at least ln(10⁶)/(M·L/2) per frame — not for a positive log-slope
    (which a rotation between two zero crossings of its read-out has), and the reference
    contractions are checked numerically as well (tests, ``benchmarks/stability_verdicts.py``).
    For a nonlinear model (N) always holds as proof; (G) holds as what it is: the replayed numbers.

What (G) does catch: h = 1.005·h + x with L = 81 grows by 1.5 per period and reaches 10⁶ over the
first half's maximum once 1.005^{M·L/2} ≥ 10⁶, M ≈ 70 periods (5.7k frames), inside the default
budget of 8192 frames; a state that grows behind a read-out C = (1, 10⁻³) likewise, a few periods later.

The replay (:func:`demonstrate`) streams period after period (``model.process``; models without it
are rerun on 32, 64, … periods) and stops at the first of: (N); (G); **no growth** — at least 32
periods and the second half's largest s_m within 5 % (``SETTLE``) of the first half's: the output
settled; the frame budget (``REPLAY_FRAMES``). The verdict of a stopped replay is one of
"non-finite", "growth" (these two diverge), "no growth" (no growth found in M·L frames: evidence,
not proof) and "growing" (the output was still above its first half at the budget, by the factor
``growth``, without the 10⁶ of a demonstration). :meth:`Demonstration.save` writes the period and M;
:func:`replay` recomputes the verdict from such a file on any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from recstab.models.dampening import evaluating
from recstab.models.interface import traits

GROWTH = 1e6          # growth over the last half of the horizon that demonstrates divergence
LAST = 4              # s_m and d_m strictly increase over the last LAST periods
MIN_PERIODS = 32      # (G) and "no growth" need M >= 32 (first half H >= 16: the Λ bounds above)
SETTLE = 0.05         # "no growth": the second half's largest s_m <= (1 + SETTLE) · the first half's
RESOLUTION = 1e-6     # a change d_m below RESOLUTION · s is rounding (float32 resolves ~1e-7)
REPLAY_FRAMES = 8192  # default frame budget of a replay
STATUSES = ("non-finite", "growth", "no growth", "growing")


@dataclass
class Demonstration:
    """A replayed input (``period`` repeated ``periods`` times) and what its outputs did."""

    period: torch.Tensor            # L×C×H×W, finite, in [0, 1]
    periods: int                    # M: periods replayed
    scales: np.ndarray              # (M,) s_m = ‖Y_m‖₂ (inf/nan where an output was not finite)
    changes: np.ndarray             # (M,) d_m = ‖Y_m − Y_{m−1}‖₂, d_1 = nan
    status: str                     # one of STATUSES
    reason: str                     # the verdict in words, with the numbers
    first_nonfinite: int | None = None   # replay frame (0-based) of the first non-finite output
    growth: float = math.nan        # max_{m > H} s_m / max_{m <= H} s_m at the end
    settings: dict = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        return self.status in ("non-finite", "growth")

    @property
    def frames(self) -> int:
        return self.periods * int(self.period.shape[0])

    def inputs(self) -> torch.Tensor:
        """The replayed input, (M·L)×C×H×W: the period repeated M times."""
        return self.period.repeat(self.periods, *([1] * (self.period.dim() - 1)))

    def to_dict(self) -> dict:
        """JSON-ready numbers (the period itself is in :meth:`save`)."""
        return {"status": self.status, "diverged": self.diverged, "reason": self.reason,
                "periods": self.periods, "period_frames": int(self.period.shape[0]), "frames": self.frames,
                "first_nonfinite": self.first_nonfinite, "growth": self.growth,
                "scales": [float(v) for v in self.scales], "changes": [float(v) for v in self.changes],
                "settings": dict(self.settings)}

    def save(self, path: str | Path) -> Path:
        """The proof, replayable by :func:`replay`: the period, M, and what the replay gave here."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"period": self.period.cpu(), "periods": self.periods, "result": self.to_dict(),
                    "how": "y = model(period.repeat(periods, 1, 1, 1)[None]) from the initial state, eval mode; "
                           "recstab.diagnostics.demonstration.replay(model, path) recomputes the verdict"}, path)
        return path


# ---------------------------------------------------------------------------------------------- the criterion
def judge(scales, changes, *, growth: float = GROWTH, last: int = LAST, min_periods: int = MIN_PERIODS,
          resolution: float = RESOLUTION) -> tuple[bool, str]:
    """(G) at the horizon M = len(scales): (fires, the numbers in words). See the module docstring."""
    s, d = np.asarray(scales, dtype=np.float64), np.asarray(changes, dtype=np.float64)
    m = len(s)
    if m < max(min_periods, 2 * last, 2):
        return False, f"{m} periods: a growth demonstration needs >= {max(min_periods, 2 * last)}"
    half = m // 2
    first_s = float(s[:half].max())
    first_d = max(float(np.nanmax(d[1:half])) if half > 1 else 0.0, resolution * first_s)
    if not (math.isfinite(s[-1]) and math.isfinite(d[-1])):
        return False, "not finite (that is (N))"
    s_ratio = s[-1] / first_s if first_s > 0 else (math.inf if s[-1] > 0 else 0.0)
    d_ratio = d[-1] / first_d if first_d > 0 else (math.inf if d[-1] > 0 else 0.0)
    rising = bool(np.all(np.diff(s[-last - 1:]) > 0) and np.all(np.diff(d[-last - 1:]) > 0))
    words = (f"over periods {half + 1}-{m} the output scale grew {s_ratio:.3g}× and its change per period "
             f"{d_ratio:.3g}× beyond their first-half maxima (needs {growth:g}), "
             f"{'rising' if rising else 'not rising'} over the last {last} periods")
    return bool(s_ratio >= growth and d_ratio >= growth and rising), words


def _second_half_growth(s: np.ndarray) -> float:
    half = len(s) // 2
    if half < 1:
        return math.nan
    first = float(s[:half].max())
    later = float(s[half:].max())
    return later / first if first > 0 else (math.inf if later > 0 else 1.0)


# ---------------------------------------------------------------------------------------------- the replay
class _Tracker:
    """s_m, d_m of the periods seen so far, and the first non-finite output."""

    def __init__(self, period_frames: int):
        self.length = period_frames
        self.scales: list[float] = []
        self.changes: list[float] = []
        self.previous: torch.Tensor | None = None
        self.first_nonfinite: int | None = None

    def add(self, y: torch.Tensor) -> None:
        """y: the L output frames of the next period (any shape with the frames first)."""
        y = y.detach()
        finite = torch.isfinite(y)
        if self.first_nonfinite is None and not bool(finite.all()):
            bad = (~finite).flatten(1).any(dim=1).nonzero()
            self.first_nonfinite = len(self.scales) * self.length + int(bad[0])
        y64 = y.double()
        self.scales.append(float(y64.norm()) if self.first_nonfinite is None else math.inf)
        if self.previous is None or self.first_nonfinite is not None:
            self.changes.append(math.nan if self.previous is None else math.inf)
        else:
            self.changes.append(float((y64 - self.previous).norm()))
        self.previous = y64


def _verdict(tracker: _Tracker, settings: dict, final: bool) -> tuple[str, str] | None:
    """The status once decided (None: go on). ``final``: the budget is spent, decide now."""
    m = len(tracker.scales)
    length = tracker.length
    if tracker.first_nonfinite is not None:
        t = tracker.first_nonfinite
        return "non-finite", (f"non-finite output at replay frame {t} (period {t // length + 1}, frame {t % length} "
                              f"of it) from a finite input in [0, 1]")
    s, d = np.array(tracker.scales), np.array(tracker.changes)
    fires, words = judge(s, d, growth=settings["growth"], last=settings["last"],
                         min_periods=settings["min_periods"])
    if fires:
        return "growth", f"growth demonstrated in {m * length} frames ({m} periods of {length}): {words}"
    if m >= settings["min_periods"] or final:
        g = _second_half_growth(s)
        if g <= 1 + settings["settle"]:
            return "no growth", (f"no growth found in {m * length} frames ({m} periods of {length}): the second "
                                 f"half's largest output scale is {g:.4g}× the first half's")
        if final:
            return "growing", (f"the output was still growing at the end of the {m * length}-frame budget ({m} "
                               f"periods of {length}): {words}; not a demonstration")
    return None


def demonstrate(model: nn.Module, period: torch.Tensor, *, max_frames: int = REPLAY_FRAMES,
                min_periods: int = MIN_PERIODS, growth: float = GROWTH, last: int = LAST,
                settle: float = SETTLE, device=None) -> Demonstration:
    """Replay ``period`` (L×C×H×W, finite, in [0, 1]) repeated until (N), (G), no growth or the budget.

    The model is run as it is (the caller sets eval mode and dampening; :func:`replay` does it for
    a saved file); no gradients. ``max_frames``: the frame budget (at least one period is replayed).
    A streaming model is judged after every period; a whole-sequence model (no ``process``) is run
    on 32, 64, … periods and judged at the end of each run, so that the recorded M replays exactly.
    """
    if period.dim() != 4 or period.shape[0] < 1:
        raise ValueError(f"period must be L×C×H×W with L >= 1 frames, got shape {tuple(period.shape)}")
    if not bool(torch.isfinite(period).all()) or float(period.min()) < 0 or float(period.max()) > 1:
        raise ValueError("period must be finite and in [0, 1]: a demonstration starts from a bounded input")
    if last < 1 or min_periods < 2 * last:
        raise ValueError(f"need last >= 1 and min_periods >= 2·last, got last={last}, min_periods={min_periods}")
    if not growth > 1 or not settle >= 0:
        raise ValueError(f"growth must be > 1 and settle >= 0, got growth={growth}, settle={settle}")
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    length = int(period.shape[0])
    budget = max(1, int(max_frames) // length)
    settings = {"growth": float(growth), "last": int(last), "min_periods": int(min_periods), "settle": float(settle),
                "max_frames": int(max_frames)}
    chunk = period.to(device)[None]
    decided = None
    with torch.no_grad(), parametrize.cached():
        if traits(model).streamable:
            tracker, state = _Tracker(length), None
            for m in range(budget):
                y, state = model.process(chunk, state)
                tracker.add(y[0])
                decided = _verdict(tracker, settings, final=m == budget - 1)
                if decided is not None:
                    break
        else:
            periods = min(budget, min_periods)
            while decided is None:
                tracker = _outputs(model, chunk, periods)
                decided = _verdict(tracker, settings, final=periods == budget)
                periods = min(budget, 2 * periods)
    status, reason = decided
    scales, changes = np.array(tracker.scales), np.array(tracker.changes)
    return Demonstration(period.detach().cpu(), len(scales), scales, changes, status, reason,
                         tracker.first_nonfinite, _second_half_growth(scales), settings)


def _outputs(model: nn.Module, chunk: torch.Tensor, periods: int) -> _Tracker:
    """s_m, d_m of ``model`` on the period ``chunk`` (1×L×C×H×W) repeated ``periods`` times, in one pass."""
    length = chunk.shape[1]
    y = model(chunk.repeat(1, periods, 1, 1, 1))[0]
    tracker = _Tracker(length)
    for m in range(periods):
        tracker.add(y[m * length:(m + 1) * length])
    return tracker


def replay(model: nn.Module, saved, *, dampening: float | None = None) -> Demonstration:
    """Recompute a saved demonstration on ``model``: exactly its M periods, the verdict from the numbers.

    ``saved``: a path written by :meth:`Demonstration.save`, or its dict. ``model(x)`` on the whole
    input from the initial state, eval mode, ``dampening`` as the TRF had it (None: the model's own).
    """
    if not isinstance(saved, dict):
        saved = torch.load(saved, weights_only=False)  # a file this module wrote (tensors and numbers)
    period, periods = saved["period"], int(saved["periods"])
    settings = {"growth": GROWTH, "last": LAST, "min_periods": MIN_PERIODS, "settle": SETTLE,
                **saved.get("result", {}).get("settings", {})}
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    with evaluating(model, dampening), torch.no_grad(), parametrize.cached():
        tracker = _outputs(model, period.to(device)[None], periods)
    status, reason = _verdict(tracker, settings, final=True)
    scales, changes = np.array(tracker.scales), np.array(tracker.changes)
    return Demonstration(period.detach().cpu(), periods, scales, changes, status, reason, tracker.first_nonfinite,
                         _second_half_growth(scales), settings)


# ---------------------------------------------------------------------------------------------- the constants
def _lebesgue(nodes: np.ndarray, at: float) -> float:
    total = 0.0
    for j, node in enumerate(nodes):
        others = np.delete(nodes, j)
        total += abs(float(np.prod((at - others) / (node - others))))
    return total


def extrapolation_constant(degree: int, half: int, at: int | None = None) -> float:
    """Λ of the module docstring: max |q(at)| / max_{2 ≤ m ≤ half} |q(m)| over polynomials q of ``degree``.

    An upper bound: Lagrange interpolation at degree + 1 integer nodes in [2, half] (rounded
    Chebyshev extrema, or evenly spaced), Λ = Σ_j |ℓ_j(at)|, the smaller of the two node sets.
    ``at`` defaults to 2·half + 1, the farthest horizon whose first half is ``half``. inf when
    [2, half] holds fewer than degree + 1 integers.
    """
    if degree < 0 or half < 2:
        raise ValueError(f"degree must be >= 0 and half >= 2, got degree={degree}, half={half}")
    at = 2 * half + 1 if at is None else at
    if degree == 0:
        return 1.0
    if half - 1 < degree + 1:
        return math.inf
    i = np.arange(degree + 1)
    candidates = [np.round(2 + (half - 2) * (1 - np.cos(np.pi * i / degree)) / 2),
                  np.round(np.linspace(2, half, degree + 1))]
    values = [_lebesgue(c, float(at)) for c in candidates if len(set(c.tolist())) == degree + 1]
    return min(values) if values else math.inf


def rotation_constant(half: int, at: int | None = None, angles: int = 20001) -> float:
    """Λ for q(m) = Re(w·e^{imθ}) (a scaled rotation), the worst over ``angles`` θ in (0, π).

    For each θ the best pair of nodes m1 < m2 ≤ half among (half or half − 1, and every gap):
    |q(at)| ≤ (|sin((at − m2)θ)| + |sin((at − m1)θ)|) / |sin((m2 − m1)θ)| · max(|q(m1)|, |q(m2)|).
    """
    at = 2 * half + 1 if at is None else at
    theta = np.linspace(1e-6, math.pi - 1e-6, angles)
    best = np.full(theta.shape, np.inf)
    for m2 in (half, half - 1):
        for gap in range(1, m2 - 1):
            m1 = m2 - gap
            with np.errstate(divide="ignore"):
                value = (np.abs(np.sin((at - m2) * theta)) + np.abs(np.sin((at - m1) * theta))) / np.abs(
                    np.sin(gap * theta))
            best = np.minimum(best, value)
    return float(best.max())
