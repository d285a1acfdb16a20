"""Stable rank normalisation of the reshaped kernel (Sanyal, Torr & Dokania, ICLR 2020).

The paper's Algorithm 1 on M = K.reshape(c_out, c_in·kh·kw), with m = min(c_out, c_in·kh·kw)
(the largest possible rank of M):

    M̃  = M/σ                 spectral normalisation (u, v, σ as in sn.py), so ‖M̃‖₂ = 1
    S1 = u vᵀ                the rank-one part: ‖S1‖_F = 1 and ⟨S1, M̃⟩ = uᵀM̃v = 1
    S2 = M̃ − S1              orthogonal to S1 (⟨S1, S2⟩ = 1 − 1 = 0)
    γ  = √(βm − 1) / ‖S2‖_F  so that ‖S1 + γS2‖_F² = 1 + γ²‖S2‖_F² = βm
    weight = α·(S1 + γ·S2)    if γ < 1 (the constraint binds), α·M̃ otherwise

Shrinking the residual keeps the top singular pair (u, v, 1) and lowers every
other singular value, so ‖weight‖₂ = α and srank(M) = ‖M̃‖_F² ≤ βm. βm < 1 cannot be
reached (a stable rank is ≥ 1): γ is then 0 and the weight is the rank-one α·S1.

Like SN, this acts on the reshaped kernel, not on the conv operator: it neither
bounds the layer's spectral norm nor its stable rank on a feature map (see srnc.py).
"""

import math

import torch

from .sn import SpectralNorm, check_beta


class StableRankNorm(SpectralNorm):
    """SRN-α-β of the reshaped kernel; β = 1 is spectral normalisation."""

    def __init__(self, weight: torch.Tensor, alpha: float = 1.0, beta: float = 1.0, power_iters: int = 1):
        super().__init__(weight, alpha, power_iters)
        self.beta = check_beta(beta)

    def normalise(self, weight: torch.Tensor) -> torch.Tensor:
        matrix = weight.flatten(1)
        sigma, u, v = self.sigma(matrix)
        matrix = matrix / sigma
        if self.beta < 1:
            s1 = torch.outer(u, v)
            s2 = matrix - s1
            target = math.sqrt(max(self.beta * min(matrix.shape) - 1.0, 0.0))  # a constant: no sqrt(0) in autograd
            gamma = (target * s2.pow(2).sum().clamp_min(1e-24).rsqrt()).clamp(max=1.0)
            matrix = s1 + gamma * s2
        return self.alpha * matrix.view_as(weight)

    def beta_floor(self, weight: torch.Tensor) -> float:
        """The β at or below which γ = 0: ‖S1‖²/m = 1/m (the stable rank of a matrix is >= 1)."""
        return 1.0 / min(weight.shape[0], weight[0].numel())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"
