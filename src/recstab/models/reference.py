"""Reference recurrences with known stability, for calibrating the stability diagnostics.

Every number the diagnostics measure (TRF verdict and rates, largest Lyapunov exponent,
loop certificate, instability onsets) has a closed form on these models, so a diagnostic
that disagrees with them is wrong, not the model.

:class:`LinearRecurrence` — pixel-wise ``h_t = a·λ·h_{t-1} + b·g·x_t``, ``y_t = h_t``
(λ the feature dampening, g a learnable gain initialised to 1, which a diagnostic must
leave untouched). The state Jacobian is ∂h_t/∂h_{t-1} = a·λ·I, so

- the largest Lyapunov exponent is λ₁ = log|a·λ| exactly, on every input;
- the influence of x_{t-k} on y_t is b·g·(aλ)^k: the temporal receptive field is bounded
  (influence decays geometrically) iff |a·λ| < 1, with growth rate log|a·λ| in both the
  past-influence and the future-response direction;
- the loop is a chain through one factor, so its Lipschitz constant in the Euclidean norm
  of h is |λ|·|a|, which :meth:`LinearRecurrence.loop_certificate` states; it is exact
  (the map is linear), hence ≥ every measured growth factor and < 1 iff the loop contracts.

:class:`LinearStateModel` — ``h_t = λ·A·h_{t-1} + B·x_t``, ``y_t = C·h_t`` for an n-vector h
per pixel (one input channel, one output channel; default B = (1, …, 1), C = (1, 0, …, 0)).
Here λ₁ = log(|λ|·ρ(A)), ρ the spectral radius, while the one-step certificate is |λ|·‖A‖₂.
The matrices that break naive diagnostics are all of this form:

- non-normal (``[[0.8, 3], [0, 0.6]]``: ρ = 0.8, ‖A‖₂ ≈ 3.2): contracts in the long run
  although no single step does in ℓ2 — the gap between a Lyapunov exponent and a norm bound;
- a rotation, ``A = r·R(θ)`` (:func:`rotation`): ‖A‖₂ = ρ = r, certified when r < 1, yet its
  read-out C·A^k·B = r^k cos(kθ + φ) rises between zero crossings, which a log-slope fit
  over a window calls growth;
- a Jordan block (:func:`jordan_block`), ``A = μI + cN``: ρ = |μ| but ‖A^k‖ ≈ C(k, n−1)·c^{n−1}|μ|^k
  first grows like a polynomial (by a huge factor for a large coupling c) before it decays,
  and the Lyapunov growth of a tangent approaches log|μ| only like (n−1)/t;
- a weak read-out, ``A = diag(0.8, 1.1)``, ``C = (1, 1e-20)``: the state grows, the output
  hides it for hundreds of frames (here until 1e-20·1.1^t ≈ 1, t ≈ 480).

Its state also carries an integer frame count, which streaming diagnostics must carry along
but never perturb or differentiate.

:class:`TanhLatch` — pixel-wise ``h_t = tanh(λ·w·h_{t-1} + b·(x_t − ½))``, ``y_t = h_t``: bounded
(|y| < 1) whatever w, certified iff |λ·w| < 1 (tanh is 1-Lipschitz); for w > 1 a bistable latch
that remembers a sign, the nonlinear case where "not certified" is not "unstable".

:class:`LogisticMap` — ``h_t = r·h_{t-1}·(1 − h_{t-1})`` with h_0 = 0.1 + 0.8·x_0 set by the first
frame (later frames are ignored): bounded in [0, 1], chaotic for r = 4 with the known exponent
λ₁ = log 2 (it is conjugate to the tent map through h = sin²(πu/2); the exponent is the
average of log|4 − 8h| under the invariant density 1/(π√(h(1−h)))). The state is kept in float64.
Its finite-time exponent converges fast: Σ log|f'(h_s)| telescopes to t·log 2 plus a bounded term.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from recstab.models.certificate import LoopCertificate, chain_certificate
from recstab.models.interface import VideoModel


def rotation(radius: float, angle: float) -> torch.Tensor:
    """``radius · R(angle)``, a scaled 2×2 rotation (normal: ‖·‖₂ = ρ = radius)."""
    c, s = math.cos(angle), math.sin(angle)
    return radius * torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def jordan_block(eigenvalue: float, size: int, coupling: float = 1.0) -> torch.Tensor:
    """``eigenvalue·I + coupling·N`` (N the ones on the superdiagonal), size×size."""
    if size < 1:
        raise ValueError(f"a Jordan block needs size >= 1, got {size}")
    return eigenvalue * torch.eye(size, dtype=torch.float64) + coupling * torch.diag(
        torch.ones(size - 1, dtype=torch.float64), 1)


class LinearRecurrence(VideoModel):
    """``h_t = a·λ·h_{t-1} + b·gain·x_t``, ``y_t = h_t``, pixel-wise (see the module docstring)."""

    is_recurrent = True

    def __init__(self, a: float, b: float = 1.0, in_channels: int = 3):
        super().__init__()
        self.a, self.b, self.in_channels = float(a), float(b), int(in_channels)
        self.gain = nn.Parameter(torch.ones(()))  # a parameter the diagnostics must leave alone

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}, in_channels={self.in_channels}"

    def initial_state(self, x: torch.Tensor) -> dict:
        return {"h": torch.zeros_like(x[:, 0])}

    def step(self, frame: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        h = (self.a * self.dampening) * state["h"] + self.b * self.gain * frame
        return h, {"h": h}

    def loop_certificate(self, conv_norm=None) -> LoopCertificate:
        """|λ|·|a|: exact, the recurrence map is h ↦ a·λ·h + const (``conv_norm`` unused: no convs)."""
        return chain_certificate({"a": abs(self.a)}, self.dampening, "the state h")


class LinearStateModel(VideoModel):
    """``h_t = λ·A·h_{t-1} + B·x_t``, ``y_t = C·h_t`` with h an n-vector per pixel (see the module docstring).

    Args:
        A: n×n state matrix.
        B: input vector (n,), default all ones (the one-channel frame feeds every component).
        C: read-out vector (n,), default (1, 0, …, 0).
    """

    is_recurrent = True
    in_channels = 1

    def __init__(self, A, B=None, C=None):
        super().__init__()
        A = torch.as_tensor(A, dtype=torch.float64)
        if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
            raise ValueError(f"A must be a square n×n matrix, got shape {tuple(A.shape)}")
        n = A.shape[0]
        B = torch.ones(n, dtype=torch.float64) if B is None else torch.as_tensor(B, dtype=torch.float64)
        C = torch.eye(n, dtype=torch.float64)[0] if C is None else torch.as_tensor(C, dtype=torch.float64)
        for name, v in (("B", B), ("C", C)):
            if v.shape != (n,):
                raise ValueError(f"{name} must be a vector of length n = {n} (A is {n}×{n}), got shape "
                                 f"{tuple(v.shape)}")
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.register_buffer("C", C)

    def extra_repr(self) -> str:
        return f"n={self.A.shape[0]}, rho={self.spectral_radius:.4g}, norm={self.operator_norm:.4g}"

    @property
    def spectral_radius(self) -> float:
        return float(torch.linalg.eigvals(self.A).abs().max())

    @property
    def operator_norm(self) -> float:
        return float(torch.linalg.matrix_norm(self.A, 2))

    def initial_state(self, x: torch.Tensor) -> dict:
        b, _, _, height, width = x.shape
        return {"h": x.new_zeros(b, self.A.shape[0], height, width), "count": torch.zeros((), dtype=torch.long)}

    def step(self, frame: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        A, B, C = self._matrices(frame.dtype)
        h = state["h"]
        h = torch.matmul(A, h.flatten(2)).view_as(h) + B * frame
        y = torch.matmul(C, h.flatten(2)).view(h.shape[0], 1, *h.shape[2:])
        return y, {"h": h, "count": state["count"] + 1}

    def _matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """λ·A, B (as n×1×1) and C in ``dtype``, converted again only when dtype, λ or a buffer changes."""
        key = (dtype, float(self.dampening), *((v.data_ptr(), v._version, v.device) for v in (self.A, self.B, self.C)))
        if getattr(self, "_cache_key", None) != key:
            self._cache = (self.A.to(dtype) * self.dampening, self.B.to(dtype)[:, None, None], self.C.to(dtype))
            self._cache_key = key
        return self._cache

    def loop_certificate(self, conv_norm=None) -> LoopCertificate:
        """|λ|·‖A‖₂, the one-step Lipschitz constant of the loop (≥ exp λ₁ = |λ|·ρ(A))."""
        return chain_certificate({"A": self.operator_norm}, self.dampening, "the state h")


class TanhLatch(VideoModel):
    """``h_t = tanh(λ·w·h_{t-1} + b·(x_t − ½))``, ``y_t = h_t``, pixel-wise (see the module docstring)."""

    is_recurrent = True

    def __init__(self, w: float = 2.0, b: float = 4.0, in_channels: int = 1):
        super().__init__()
        self.w, self.b, self.in_channels = float(w), float(b), int(in_channels)

    def extra_repr(self) -> str:
        return f"w={self.w}, b={self.b}"

    def initial_state(self, x: torch.Tensor) -> dict:
        return {"h": torch.zeros_like(x[:, 0])}

    def step(self, frame: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        h = torch.tanh((self.w * self.dampening) * state["h"] + self.b * (frame - 0.5))
        return h, {"h": h}

    def loop_certificate(self, conv_norm=None) -> LoopCertificate:
        """|λ|·|w|: tanh is 1-Lipschitz."""
        return chain_certificate({"w": abs(self.w)}, self.dampening, "the state h")


class LogisticMap(VideoModel):
    """``h_t = r·h_{t-1}(1 − h_{t-1})``, h_0 = 0.1 + 0.8·x_0, ``y_t = h_t`` (see the module docstring)."""

    is_recurrent = True
    in_channels = 1

    def __init__(self, r: float = 4.0):
        super().__init__()
        if not 0 <= r <= 4:
            raise ValueError(f"r must be in [0, 4] (the map keeps [0, 1] invariant), got {r}")
        self.r = float(r)

    def extra_repr(self) -> str:
        return f"r={self.r}"

    @property
    def exponent(self) -> float:
        """λ₁ where it is known in closed form (r = 4: log 2), else nan."""
        return math.log(2.0) if self.r == 4.0 else math.nan

    def initial_state(self, x: torch.Tensor) -> dict:
        return {"h": None}

    def step(self, frame: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        h = state["h"]
        if h is None:  # the first frame sets the initial condition, inside (0, 1)
            h = 0.1 + 0.8 * frame.double()
        else:
            h = (self.r * self.dampening) * h * (1 - h)
        return h.to(frame.dtype), {"h": h}

    def loop_certificate(self, conv_norm=None) -> LoopCertificate:
        """|λ|·r: the largest slope of h ↦ r·h(1 − h) on [0, 1]."""
        return chain_certificate({"r": self.r}, self.dampening, "the state h")


class Reference(NamedTuple):
    """A reference model and what is known about it in closed form."""

    name: str
    build: Callable[[], VideoModel]
    exponent: float       # λ₁ (natural log per frame); nan where no closed form
    grows: bool           # some bounded input makes the output grow without bound


def catalogue() -> list[Reference]:
    """The reference models the diagnostics are calibrated on (tests and ``benchmarks/stability_verdicts.py``)."""
    log = math.log
    return [
        Reference("scalar a = 0.5", lambda: LinearRecurrence(0.5, in_channels=1), log(0.5), False),
        Reference("scalar a = 1.005 (slow growth)", lambda: LinearRecurrence(1.005, in_channels=1), log(1.005), True),
        Reference("scalar a = 1.5", lambda: LinearRecurrence(1.5, in_channels=1), log(1.5), True),
        Reference("rotation 0.99·R(π/100), B = e1, y = h[0]",
                  lambda: LinearStateModel(rotation(0.99, math.pi / 100), B=[1.0, 0.0]), log(0.99), False),
        Reference("Jordan 2×2, 0.999, coupling 50", lambda: LinearStateModel([[0.999, 50.0], [0.0, 0.999]]),
                  log(0.999), False),
        Reference("Jordan 2×2, 0.9, coupling 50", lambda: LinearStateModel([[0.9, 50.0], [0.0, 0.9]]),
                  log(0.9), False),
        Reference("Jordan 4×4, 0.9", lambda: LinearStateModel(jordan_block(0.9, 4)), log(0.9), False),
        Reference("Jordan 5×5, 0.95", lambda: LinearStateModel(jordan_block(0.95, 5)), log(0.95), False),
        Reference("Jordan 2×2, eigenvalue 1 (marginal: y ~ t²)", lambda: LinearStateModel(jordan_block(1.0, 2)),
                  0.0, True),
        Reference("non-normal [[0.8, 3], [0, 0.6]]", lambda: LinearStateModel([[0.8, 3.0], [0.0, 0.6]]),
                  log(0.8), False),
        Reference("weak read-out diag(0.8, 1.1), C = (1, 1e-20)",
                  lambda: LinearStateModel([[0.8, 0.0], [0.0, 1.1]], C=[1.0, 1e-20]), log(1.1), True),
        Reference("weak read-out diag(0.8, 1.005), C = (1, 1e-3)",
                  lambda: LinearStateModel([[0.8, 0.0], [0.0, 1.005]], C=[1.0, 1e-3]), log(1.005), True),
        Reference("tanh latch w = 0.5", lambda: TanhLatch(0.5), math.nan, False),
        Reference("tanh latch w = 2 (bistable)", lambda: TanhLatch(2.0), math.nan, False),
        Reference("logistic map r = 4 (chaotic)", lambda: LogisticMap(4.0), log(2.0), False),
    ]


def vresnet_feat(channels: int = 16, seed: int = 0, conv_norm: float | None = None) -> VideoModel:
    """An untrained He-init VResNet-feat (proven unstable); ``conv_norm``: every conv rescaled to that
    operator norm (FFT, 32×32), e.g. 0.5, which certifies it."""
    from recstab.models import build_model
    from recstab.norms import spectral_norm_fft

    torch.manual_seed(seed)
    model = build_model("vresnet", "feat", "denoise", channels)
    if conv_norm is not None:
        with torch.no_grad():
            for conv in model.modules():
                if isinstance(conv, nn.Conv2d):
                    conv.weight.mul_(conv_norm / spectral_norm_fft(conv.weight, 32))
    return model
