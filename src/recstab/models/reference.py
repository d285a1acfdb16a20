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

:class:`LinearStateModel` — ``h_t = λ·A·h_{t-1} + x_t·(1, 1)`` for a 2-vector per pixel (the
one-channel input feeds both components, ``y_t`` is the first component). Here λ₁ =
log(|λ|·ρ(A)), ρ the spectral radius, while the one-step certificate is |λ|·‖A‖₂: for a
non-normal A (``[[0.8, 3], [0, 0.6]]``: ρ = 0.8, ‖A‖₂ ≈ 3.2) the loop contracts in the long
run although no single step does in ℓ2 — the gap between a Lyapunov exponent and a norm
bound. Its state also carries an integer frame count, which streaming diagnostics must
carry along but never perturb or differentiate.
"""

from __future__ import annotations

import torch
from torch import nn

from recstab.models.certificate import LoopCertificate, chain_certificate
from recstab.models.interface import VideoModel


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
    """``h_t = λ·A·h_{t-1} + x_t`` with h a 2-vector per pixel, ``y_t = h_t[0]`` (see the module docstring)."""

    is_recurrent = True
    in_channels = 1

    def __init__(self, A):
        super().__init__()
        A = torch.as_tensor(A, dtype=torch.float64)
        if A.shape != (2, 2):
            raise ValueError(f"A must be a 2×2 matrix, got shape {tuple(A.shape)}")
        self.register_buffer("A", A)

    def initial_state(self, x: torch.Tensor) -> dict:
        b, _, _, height, width = x.shape
        return {"h": x.new_zeros(b, 2, height, width), "count": torch.zeros((), dtype=torch.long)}

    def step(self, frame: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        A = self.A.to(frame.dtype) * self.dampening
        h = torch.einsum("ij,bjhw->bihw", A, state["h"]) + frame  # the frame feeds both components
        return h[:, :1], {"h": h, "count": state["count"] + 1}

    def loop_certificate(self, conv_norm=None) -> LoopCertificate:
        """|λ|·‖A‖₂, the one-step Lipschitz constant of the loop (≥ exp λ₁ = |λ|·ρ(A))."""
        return chain_certificate({"A": float(torch.linalg.matrix_norm(self.A, 2))}, self.dampening, "the state h")
