"""Spectral normalisation of the reshaped kernel (Miyato et al., ICLR 2018) — the paper's "SRN β=1".

The kernel K (c_out × c_in × kh × kw) is read as the matrix M = K.reshape(c_out, c_in·kh·kw)
and rescaled so that its largest singular value is α:

    v = Mᵀu / ‖Mᵀu‖,   σ = uᵀ M v (= ‖Mᵀu‖),   weight = α · K / σ

with u (c_out) a persistent buffer advanced by `power_iters` power iterations per
optimisation step. u and v are constants for autograd; since σ(M) = ‖Mᵀu‖ has
gradient u vᵀ, detaching v loses nothing (the envelope argument), and the
gradient is exact for fixed u.

This does NOT bound the layer: the operator W(K) on a feature map has spectral
norm up to √(kh·kw)·σ(M) (its frequency-0 block is the sum of the kh·kw taps),
and typically 1.5–3× σ(M) — the paper's Table 3, first row. `srnc.py` bounds
W(K) itself.

This module also holds `PowerIterationNorm`, the life cycle shared by the three
parametrizations (SN is its minimal instance):

- the normalised weight is always normalise(K; u), a pure function of the kernel
  and the buffer u.
- train mode: on a kernel it has not seen (compared by value, so fused optimisers,
  which do not bump tensor versions, are handled) the parametrization first
  advances u by `power_iters` power-iteration steps on THAT kernel, then returns
  normalise(K; u) with gradient: the weight a step trains with is normalised with
  vectors of its own kernel, not of the previous step's. Under
  `torch.nn.utils.parametrize.cached()` one call serves a whole BPTT unroll;
  without it every access re-normalises (slow, but still one power-iteration step
  per optimisation step).
- eval mode: the normalised weight is a constant — computed once under no_grad,
  cached, and recomputed only when the kernel or u changes (load_state_dict,
  refresh, `.to()`). The power iteration never advances in eval, so the eval
  output is a pure function of (kernel, u): saving and loading the state dict
  (u is a registered buffer) reproduces it bit for bit. No gradient reaches the
  kernel in eval mode (gradients w.r.t. the input still flow).
- autocast is switched off inside: σ and u keep the weight's precision under
  mixed-precision training.
- `refresh(weight, iters, exact)`: bring u up to date with the kernel (exact top
  singular vector by default, no random part: the power iteration then sits at
  its fixed point and the weight has norm α to float precision). Needed before evaluation, checkpointing and export,
  and after loading plain (unnormalised) weights into a normalised model, which
  leaves u stale.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha (target spectral norm) must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
        raise ValueError(f"beta (target stable rank as a fraction of its maximum) must be in (0, 1], got {beta!r}")
    return float(beta)


def check_iters(iters, name: str = "power_iters") -> int:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{name} must be an int >= 1, got {iters!r}")
    return iters


def _same(snapshot: torch.Tensor | None, weight: torch.Tensor) -> bool:
    return (snapshot is not None and snapshot.shape == weight.shape and snapshot.dtype == weight.dtype
            and snapshot.device == weight.device and torch.equal(snapshot, weight))


class PowerIterationNorm(nn.Module):
    """Base of SN, SRN and SRN-C: a parametrization K ↦ normalise(K; u) with a power-iterated buffer u.

    A subclass registers the buffer `u` and defines `power_iteration`, `exact_vectors`
    (both update u in place) and `normalise` (a pure, differentiable function of K for fixed u).
    """

    u: torch.Tensor

    def __init__(self, alpha: float = 1.0, power_iters: int = 1):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.power_iters = check_iters(power_iters)
        self._seen: torch.Tensor | None = None   # the kernel the last power-iteration step ran on
        self._frozen: tuple | None = None        # eval cache: (kernel copy, u key, normalised weight)

    # -- what a subclass defines --------------------------------------------------------------
    def power_iteration(self, weight: torch.Tensor, iters: int) -> None:
        raise NotImplementedError

    def advance(self, weight: torch.Tensor) -> None:
        """An optimisation step's power iteration on a new kernel, run before `normalise` uses it."""
        self.power_iteration(weight, self.power_iters)

    def exact_vectors(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def normalise(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- life cycle ------------------------------------------------------------------------------
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(weight.device.type, enabled=False):  # σ in the weight's own precision
            if not self.training:
                return self.frozen(weight)
            self._frozen = None
            if not _same(self._seen, weight):
                with torch.no_grad():
                    self.advance(weight.detach())
                self._seen = weight.detach().clone()
            return self.normalise(weight)

    def frozen(self, weight: torch.Tensor) -> torch.Tensor:
        """The normalised weight for the current (kernel, u), as a cached constant; u does not move."""
        key = (self.u._version, self.u.data_ptr())
        cache = self._frozen
        if cache is None or cache[1] != key or not _same(cache[0], weight):
            with torch.inference_mode(False), torch.no_grad():
                cache = (weight.detach().clone(), key, self.normalise(weight.detach()))
            self._frozen = cache
        return cache[2]

    def refresh(self, weight: torch.Tensor, iters: int = 50, exact: bool = True) -> None:
        """Set u to the exact top singular vector (`exact`), or run `iters` power iterations."""
        with torch.inference_mode(False), torch.no_grad():
            if exact:
                self.exact_vectors(weight.detach())
            else:
                self.power_iteration(weight.detach(), check_iters(iters, "iters"))
            self._seen = weight.detach().clone()
        self._frozen = None

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, power_iters={self.power_iters}"


class SpectralNorm(PowerIterationNorm):
    """weight = α·K/σ₁(K.reshape(c_out, -1)) — Miyato's spectral normalisation of the reshaped kernel."""

    def __init__(self, weight: torch.Tensor, alpha: float = 1.0, power_iters: int = 1):
        super().__init__(alpha, power_iters)
        if weight.dim() < 2:
            raise ValueError(f"weight must have at least 2 dims (c_out × …), got shape {tuple(weight.shape)}")
        u = torch.randn(weight.shape[0], dtype=weight.dtype, device=weight.device)
        self.register_buffer("u", F.normalize(u, dim=0))
        self.refresh(weight)

    def power_iteration(self, weight: torch.Tensor, iters: int) -> None:
        matrix, u = weight.flatten(1), self.u
        for _ in range(iters):
            v = F.normalize(matrix.t() @ u, dim=0)
            u = F.normalize(matrix @ v, dim=0)
        self.u.copy_(u)

    def exact_vectors(self, weight: torch.Tensor) -> None:
        left, _, _ = torch.linalg.svd(weight.flatten(1), full_matrices=False)
        self.u.copy_(left[:, 0])

    def sigma(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(σ = uᵀMv differentiable in M, u, v) with v = Mᵀu/‖Mᵀu‖ held constant."""
        with torch.no_grad():
            u = self.u.clone()
            v = F.normalize(matrix.t() @ u, dim=0)
        return (u @ (matrix @ v)).clamp_min(1e-12), u, v

    def normalise(self, weight: torch.Tensor) -> torch.Tensor:
        sigma, _, _ = self.sigma(weight.flatten(1))
        return self.alpha * weight / sigma
