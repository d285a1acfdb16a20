r"""SRN-C: stable rank normalisation of the conv OPERATOR (Tanay et al., Algorithm 2, corrected).

Notation. K is the kernel (c_out × c_in × k × k), W(K) the stride-1 conv with
circular padding on an n×n map, a (c_out·n²) × (c_in·n²) matrix (spectra.py);
m = min(c_in, c_out), so W has n²·m singular values. Target: ‖W‖₂ = α and
srank(W) = ‖W‖_F²/‖W‖₂² ≤ β·n²·m.

Derivation of the algorithm (and of γ).

1. K ↦ W(K) is linear, and every kernel entry appears once in each of the n²
   rows of its output channel, so ⟨W(K), W(L)⟩_F = n²⟨K, L⟩_F; in particular
   ‖W(K)‖_F² = n²‖K‖_F².
2. Power iteration: u (1 × c_out × n × n) is a persistent buffer; v = Wᵀu/‖Wᵀu‖
   (a transposed conv). The weight is a function of K and u alone; after a
   training step has used it, u advances by u = Wv/‖Wv‖ (a conv, reusing v) and
   `power_iters` − 1 further steps v = Wᵀu/‖Wᵀu‖, u = Wv/‖Wv‖ (default: none).
3. σ = uᵀW(K)v = ⟨W(K), u vᵀ⟩_F = ⟨K, G⟩_F, where G = W*(u vᵀ) = ∇_K uᵀW(K)v is the
   weight gradient of a conv with input v and output gradient u:
       G[o, c, a, b] = Σ_x u[o, x] · v[c, x + (a, b) − centre],
   computed in closed form (no autograd) as
   `torch.nn.grad.conv2d_weight(circular_pad(v), K.shape, u)`.
   u, v (hence G) are constants; K̃ = K/σ is differentiable through σ = ⟨K, G⟩.
   Nothing is lost by detaching v: σ(K) = ‖W(K)ᵀu‖ has gradient exactly G
   (∂‖Wᵀu‖ = ⟨Wᵀu, ∂Wᵀu⟩/‖Wᵀu‖ = uᵀ ∂W v), so for fixed u the parametrization's
   gradient is the true one.
4. Stable rank. With ‖W(K̃)‖₂ = 1 and fact 1,
       srank(W(K̃)) = n²‖K̃‖_F²,   so   srank ≤ β·n²·m  ⇔  ‖K̃‖_F² ≤ β·m   (n cancels).
5. The rank-one part. The paper writes S1 = u vᵀ, but a k×k kernel cannot
   represent u vᵀ (an operator of rank one on the whole map); its kernel-space
   counterpart is the direction G. Project K̃ on it: since ⟨K̃, G⟩ = σ/σ = 1,
       S1 = G / ‖G‖_F²,   S2 = K̃ − S1,   ⟨S1, S2⟩ = 1/‖G‖² − ‖G‖²/‖G‖⁴ = 0,
   and uᵀW(S1)v = ⟨S1, G⟩ = 1, uᵀW(S2)v = 0: the top singular pair is carried by S1
   alone, so shrinking S2 lowers the rest of the spectrum and keeps σ₁ = 1.
6. γ solves ‖S1 + γS2‖_F² = ‖S1‖² + γ²‖S2‖² = β·m:
       γ = √((β·m − ‖S1‖_F²) / ‖S2‖_F²),
   applied only when γ < 1 (the constraint binds; otherwise K̃ already satisfies
   it). If β·m < ‖S1‖² = 1/‖G‖² the target is below what the rank-one part
   alone has: γ = 0 and the weight is the constant α·S1. Since
   ‖G‖² ≤ k² (Cauchy–Schwarz per tap), ‖S1‖² ≥ 1/k², so β ≤ 1/(m·k²) is degenerate
   whatever u (apply_norm warns); a converged, plane-wave u gives ‖S1‖² ≈ 1/k²–2/k².
7. weight = α·(S1 + γ·S2): ‖W‖₂ = α, srank(W) = n²‖S1 + γS2‖² = β·n²·m.
   Measured (exact FFT spectra, He-init kernels): 64→64 at n = 64, srank/(n²m) =
   0.1998, 0.0999, 0.0499 for β = 0.2, 0.1, 0.05 with ‖W‖₂/α = 1.0004–1.0007.
   The claim ‖W‖₂ = α rests on (u, v) staying the top pair once S2 shrinks; it
   weakens when γ ≪ 1 (β·m close to ‖S1‖²), because W(S1) alone is not exactly of
   norm 1: for a 64→3 conv (m = 3) at β = 0.1, ‖W‖₂/α = 1.10 and srank/(n²m) = 0.082.
   Layers with 3 channels (head, tail) are better left out for small β (loop_only).

The paper's steps 9–11 take S1 = G itself and γ = √(βm − 1)/n²/‖S2‖_F: the
operator-norm reasoning (‖u vᵀ‖_F = 1) carried over to kernels, with n² in the
wrong place. γ comes out ~1e-4, so the weight is ≈ α·G, whose operator norm is
up to k²α (for u, v constant maps, G = a bᵀ on all k² taps and its frequency-0
block is k²·a bᵀ). Measured on He-init 64→64 kernels at n = 64: srank/(n²m) =
0.0035 whatever β ∈ {0.2, 0.1, 0.05} and ‖W‖₂ = 4.5α (DESIGN.md: 0.0017 and 8.9α
on another kernel); it is also undefined for β < 1/m. Eq. (8) fails the same way.

Padding. The power iteration, σ and G use *circular* padding, so σ tracks the
exact FFT spectrum of `spectra.py` (Sedghi et al.), which is the definition of a
layer's spectral norm in recstab. The model's own conv may zero-pad: that operator
is a compression of the circular one on an (n+k−1)-map, so its norm is at most
that one. Measured on He-init 64-channel kernels: the circular norm at n = 32 and
64 is within 0.1 % of n = 256, the zero-padded one at n = 64 within 0.15 %.

Exact refresh. The top of a conv spectrum is a near-continuum of frequencies, so
a random u needs hundreds of power iterations to bring σ within 0.1 % (error
≈ 1/iters: 0.7 % after 50 at 64 channels, n = 64). `refresh` therefore sets u
exactly from the FFT: a real plane wave at the frequency holding σ₁ is an exact
top singular vector (spectra.top_right_singular_map); u = W v/‖W v‖, plus a 3 %
random part so that later power iterations can still move to another frequency
(sn.py). That costs one batched SVD (~0.7 s per 64-channel layer at n = 64 on
this CPU), so the constructor only starts u with INIT_ITERS power iterations
from a random map (σ within a few %); call `refresh` before relying on α. During
training u follows the kernel with `power_iters` steps per optimisation step.

Tracking a kernel in training. One power-iteration step per optimisation step
lags the kernel: training raises singular values at frequencies u does not see,
and a power iteration moves between near-equal frequencies slowly. Measured on
a 4-conv, 32-channel recurrent denoiser (n = 32, Adam, lr 1e-3, 300 steps, exact
refresh at step 0), the largest layer norm ‖W‖₂/α sampled every 25 steps from
step 50: 1.10–1.40 with one plain iteration per step, 1.06–1.25 with three, and
1.05–1.13 with one iteration whose v gets a 10 % random part (STEP_JITTER) before
u ← Wv (three such: 1.04–1.13) — the random part keeps every frequency present
and W filters it, so on a fixed kernel it biases σ by under 0.2 %. Refreshing
exactly every 10 steps does not help (the drift builds within a few steps). The
default is one jittered iteration per step; `refresh` (exact) before validation,
checkpointing and export makes the saved and evaluated model hit α to float
precision.

u's shape depends on n: a checkpoint made with one n only loads into a model
normalised with the same n. Cost per optimisation step and layer: 2·power_iters
+ 1 convolutions of one c×n×n map — v = Wᵀu for σ and G, the weight gradient G,
then u ← Wv reusing that v — against 3·B·T maps for the training step itself.
"""

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

from .sn import PowerIterationNorm, check_beta
from .spectra import check_kernel, circular_pads, conv_circular, conv_circular_t, top_right_singular_map


INIT_ITERS = 15     # power iterations of a fresh u (refresh() makes it exact)
STEP_JITTER = 0.1   # relative random part added to v at each training step's power iteration


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(1e-12)


class ConvStableRankNorm(PowerIterationNorm):
    """SRN-C-α-β on the n×n circular conv operator; β = 1 is spectral normalisation of the layer."""

    def __init__(self, weight: torch.Tensor, alpha: float = 1.0, beta: float = 1.0, n: int = 64,
                 power_iters: int = 1):
        super().__init__(alpha, power_iters)
        check_kernel(weight, n)
        self.beta = check_beta(beta)
        self.n = n
        self._v: tuple | None = None  # (u key, v = Wᵀu/‖Wᵀu‖) from the last `direction`
        self.step_jitter = STEP_JITTER
        self._draws = 0
        u = torch.randn(1, weight.shape[0], n, n, dtype=weight.dtype, device=weight.device)
        self.register_buffer("u", _unit(u))
        self.refresh(weight, INIT_ITERS, exact=False)

    def power_iteration(self, weight: torch.Tensor, iters: int) -> None:
        u = self.u
        for _ in range(iters):
            v = _unit(conv_circular_t(u, weight))
            u = _unit(conv_circular(v, weight))
        self.u.copy_(u)

    def exact_vectors(self, weight: torch.Tensor) -> None:
        v = top_right_singular_map(weight, self.n)
        self.u.copy_(_unit(conv_circular(v, weight)))

    def advance(self, weight: torch.Tensor) -> None:
        """u ← W ṽ/‖W ṽ‖, ṽ = the v `normalise` just computed plus a STEP_JITTER random part;
        then power_iters − 1 full steps."""
        stash, self._v = self._v, None
        v = stash[1] if stash is not None and stash[0] == (self.u._version, self.u.data_ptr()) \
            else _unit(conv_circular_t(self.u, weight))
        if self.step_jitter > 0:
            self._draws += 1  # a private, deterministic stream: the global RNG is left alone
            rng = torch.Generator(device=v.device).manual_seed(self._draws)
            noise = torch.randn(v.shape, generator=rng, device=v.device, dtype=v.dtype)
            v = _unit(v + self.step_jitter * _unit(noise))
        self.u.copy_(_unit(conv_circular(v, weight)))
        if self.power_iters > 1:
            self.power_iteration(weight, self.power_iters - 1)

    def direction(self, weight: torch.Tensor) -> torch.Tensor:
        """G = ∇_K uᵀW(K)v for the current u (v = Wᵀu/‖Wᵀu‖), a constant; σ = ⟨K, G⟩."""
        with torch.no_grad():
            w = weight.detach()
            v = _unit(conv_circular_t(self.u, w))
            self._v = ((self.u._version, self.u.data_ptr()), v)  # for `advance`, one conv saved
            padded = F.pad(v, circular_pads(*w.shape[-2:]), mode="circular")
            return conv2d_weight(padded, w.shape, self.u)

    def normalise(self, weight: torch.Tensor) -> torch.Tensor:
        g = self.direction(weight)
        sigma = (weight * g).sum().clamp_min(1e-12)
        kernel = weight / sigma
        if self.beta < 1:
            g_sq = g.pow(2).sum()
            s1 = g / g_sq
            s2 = kernel - s1
            target = (self.beta * min(weight.shape[0], weight.shape[1]) - 1.0 / g_sq).clamp_min(0.0).sqrt()
            gamma = (target * s2.pow(2).sum().clamp_min(1e-24).rsqrt()).clamp(max=1.0)  # target is a constant
            kernel = s1 + gamma * s2
        return self.alpha * kernel

    def beta_floor(self, weight: torch.Tensor) -> float:
        """A β at or below which γ = 0 whatever u: ‖S1‖²/m = 1/(m‖G‖²) >= 1/(m·kh·kw)."""
        return 1.0 / (min(weight.shape[0], weight.shape[1]) * weight.shape[2] * weight.shape[3])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, n={self.n}"
