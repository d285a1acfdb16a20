r"""SRN-C: stable rank normalisation of the conv OPERATOR (Tanay et al., Algorithm 2, corrected).

Notation. K is the kernel (c_out × c_in × kh × kw), W(K) the stride-1 conv with
circular padding on an n×n map, a (c_out·n²) × (c_in·n²) matrix (spectra.py);
m = min(c_in, c_out), so W has n²·m singular values. Target: ‖W‖₂ = α and
srank(W) = ‖W‖_F²/‖W‖₂² = β·n²·m (or less, when the kernel is already below it).

Spectral norm, per frequency. The 2-D DFT block-diagonalises W(K) (spectra.py):
its singular values are those of the n² blocks

    K̂(f) = Σ_{a,b} K[:, :, a, b] · e^{-iθ_ab(f)},   θ_ab(f) = 2π(p·a + q·b)/n,  f = (p, q),

so ‖W(K)‖₂ = max_f σ₁(K̂(f)), and K real gives K̂(−f) = conj K̂(f): the F = n·(n//2+1)
frequencies of `rfft2` suffice.

The map. SRN-C is the function kernel ↦ weight defined below with EXACT spectra; what
the module computes is that function, and its gradient is the derivative of that function.
Everything that depends on the spectrum enters through a few discrete choices — the
arg-max frequency f* of σ₁(K̂(f)) and, for β < 1, the arg-max f′ of the shrunk kernel K′ —
which are locally constant in K, and through smooth functions of the two blocks K̂(f*),
K̂′(f′) (σ₁ and its singular vectors, which autograd differentiates exactly when σ₁ is simple).

Which frequency is the arg-max, and what is guaranteed:
- `exhaustive` layers (F·max(m, 8)³ ≤ EXHAUSTIVE, e.g. up to 16 channels at n = 16 or 8 at
  n = 64): every evaluation computes the singular values of all F blocks (one FFT, one batched
  SVD, float64). f* is then the exact arg-max, so ‖W‖₂ = α to float precision at every step —
  both sides of the band by construction — and the gradient is that of the exact map.
- larger layers: a per-frequency power iteration tracks the spectrum (state: the buffer u, one
  unit left vector u_f ∈ C^{c_out} per frequency, stored as a real c_out × F × 2 tensor; each
  optimisation step updates half of the frequencies, p + q even then odd, by one batched
  step — no block is formed: K̂(f)v_f = Σ_ab K_ab(e^{-iθ_ab(f)}v_f) is one matrix product for
  all f), and the candidates — the TRACKED largest estimates of each half, plus those whose
  estimate plus the step's change ‖ΔK̂(f)‖_F (one kh·kw × kh·kw Gram matrix of the taps'
  change) exceeds the largest σ₁ found — get exact singular values; f* is the best of them.
  σ = σ₁(K̂(f*)) is exact, so ‖W‖₂ ≥ α always (the lower side holds by construction); the
  upper side holds when the true arg-max is among the candidates (measured, not proven:
  benchmarks/results/norms.md). Proving it at every step needs the singular values of all
  F blocks (a certified upper bound per block: one Cholesky factorisation or eigenvalue
  problem each; the exhaustive spectrum of a 64-channel layer at n = 64 takes ~1 s on one
  CPU thread, a tenth of a whole training step of the benchmark model) — beyond the 5 %
  step budget. Eval mode and `refresh(exact=True)` always use the exhaustive arg-max.

Derivation of the normalisation (and of γ).

1. K ↦ W(K) is linear, and every kernel entry appears once in each of the n²
   rows of its output channel, so ⟨W(K), W(L)⟩_F = n²⟨K, L⟩_F; in particular
   ‖W(K)‖_F² = n²‖K‖_F².
2. Let (u, v) be the top singular pair of K̂(f*), K̂(f*)v = σu. Then
       σ = Re(uᴴ K̂(f*) v) = Σ_{o,c,a,b} K[o,c,a,b]·Re(conj(u_o)·v_c·e^{-iθ_ab(f*)}) = ⟨K, G⟩_F,
       G[o, c, a, b] = Re(conj(u_o) · v_c · e^{-iθ_ab(f*)})
   (G is also uᵀW(K)v for the real plane waves u(x) ∝ Re(u e^{iθ(x)}), v alike). K̃ = K/σ.
   σ₁ is differentiated exactly (its gradient is G: ∂σ₁ = Re uᴴ ∂K̂ v); G itself depends on K
   through (u, v), and that dependence is differentiated too (β < 1 below).
3. Stable rank. With ‖W(K̃)‖₂ = 1 and fact 1,
       srank(W(K̃)) = n²‖K̃‖_F²,   so   srank ≤ β·n²·m  ⇔  ‖K̃‖_F² ≤ β·m   (n cancels).
4. The rank-one part. The paper writes S1 = u vᵀ, but a kh×kw kernel cannot
   represent u vᵀ (an operator of rank one on the whole map); its kernel-space
   counterpart is the direction G. Project K̃ on it: since ⟨K̃, G⟩ = σ/σ = 1,
       S1 = G / ‖G‖_F²,   S2 = K̃ − S1,   ⟨S1, S2⟩ = 1/‖G‖² − ‖G‖²/‖G‖⁴ = 0,
   and Re uᴴŜ1(f*)v = ⟨S1, G⟩ = 1, Re uᴴŜ2(f*)v = 0: the top singular pair is
   carried by S1, so shrinking S2 lowers the rest of the spectrum.
   ‖G‖² = ½(kh·kw + Re(c·ζ)) with c = Σ_ab e^{-2iθ_ab(f*)}, ζ = (uᴴ conj u)(vᵀv):
   ‖S1‖² = 1/‖G‖² is 1/(kh·kw) at f* ∈ {0, n/2}² (real u, v) and ≈ 2/(kh·kw) far from it.
5. γ solves ‖S1 + γS2‖_F² = ‖S1‖² + γ²‖S2‖² = β·m·κ²:
       γ(κ) = min(1, √(max(0, β·m·κ² − ‖S1‖_F²) / ‖S2‖_F²)),
   applied only when ‖K̃‖² > β·m (the constraint binds; otherwise the weight is α·K̃).
   κ = 1 is the formula when W(S1 + γS2) keeps norm 1, which "S1 carries the top pair"
   suggests but does not prove: Ŝ1(f*) = (kh·kw·u vᴴ + c·conj(u)vᵀ)/(2‖G‖²) is not u vᴴ, and
   Re uᴴŜ1(f*)v = 1 only bounds its norm from below (measured on He-init kernels, n = 16–32,
   β = 0.1: ‖W(S1 + γS2)‖₂ up to 1.12 near self-conjugate frequencies). So
       weight = α·K′/κ,   K′ = S1 + γ(κ)·S2,   κ = ‖W(K′)‖₂ = σ₁(K̂′(f′)),
   κ the fixed point of κ ↦ ‖W(S1 + γ(κ)S2)‖₂ (iterated to 1e-13). Then ‖W‖₂ = α and
   srank(W) = n²‖K′‖²/κ² = β·n²·m. The arg-max f′ of K′ is found among the frequencies where
   σ₁(K̂′(f)) ≤ (1 − γ)‖Ŝ1(f)‖ + γσ₁(K̂(f))/σ can exceed κ, with ‖Ŝ1(f)‖ ≤ ‖S1‖²(|D(f − f*)| +
   |D(f + f*)|)/2, D(h) = Σ_ab e^{-iθ_ab(h)} (exhaustive layers: σ₁(K̂(f)) exact, so the search is
   exact; tracked layers: estimates). If β·m·κ² < ‖S1‖² the weight is the constant-direction
   α·S1/κ. Since ‖G‖² ≤ kh·kw, ‖S1‖² ≥ 1/(kh·kw): β ≤ 1/(m·kh·kw) is degenerate (apply_norm warns).
6. The gradient. f*, f′ are locally constant; σ, u, v come from an SVD of the block K̂(f*)
   rebuilt from K with autograd (torch.linalg.svd differentiates σ₁ and the singular vectors;
   G is invariant to their common phase), so S1, S2, ‖S1‖², ‖S2‖² are differentiated. κ is an
   implicit function, κ = F(K, κ) with F(K, κ) = σ₁(K̂′_{K,κ}(f′)):
       dκ = ∂_K F dK / (1 − ∂_κ F),   ∂_κ F = ⟨S2, G′⟩·γ′(κ),   γ′(κ) = β·m·κ/(γ·‖S2‖²)
   (G′ the direction of K′ at f′, as in 2; γ′ = 0 where γ is clamped). The module evaluates
   κ₁ = F(K, κ₀) with autograd at the converged κ₀ and uses κ = κ₀ + (κ₁ − stop(κ₁))/(1 − ∂_κF):
   the value κ₀, the derivative of the fixed point. This holds in training and eval mode.

The paper's steps 9–11 take S1 = G itself and γ = √(βm − 1)/n²/‖S2‖_F: the
operator-norm reasoning (‖u vᵀ‖_F = 1) carried over to kernels, with n² in the
wrong place. γ comes out ~1e-4, so the weight is ≈ α·G, whose operator norm is
up to k²α (for u, v constant maps, G = a bᵀ on all k² taps and its frequency-0
block is k²·a bᵀ). Measured on He-init 64→64 kernels at n = 64: srank/(n²m) =
0.0035 whatever β ∈ {0.2, 0.1, 0.05} and ‖W‖₂ = 4.5α; it is also undefined for
β < 1/m. Eq. (8) fails the same way.

Padding. Everything uses the circular operator on the n×n map, which is the
definition of a layer's spectral norm in recstab. The model's own conv may
zero-pad: that operator is a compression of the conv on the infinite plane, whose
norm is sup_ω σ₁(K̂(ω)) over ALL frequencies, at most a factor 1/cos(π(kh+kw−2)/(2n))
above the n-grid maximum SRN-C sets (bound.py; 1.005 for 3×3 at n = 64).

Life cycle. Training: on a kernel it has not seen, the arg-max (and κ) are found for THAT
kernel before the weight is built, so the weight a step trains with is normalised on its own
spectrum. Eval: the same map with the exhaustive arg-max, cached per kernel value (a pure
function of the kernel: bit-identical after a state-dict round trip); with grad enabled and a
kernel that requires grad it is built with autograd, otherwise the cached constant is returned.
The buffer layout (u) is the one of earlier versions: their checkpoints load unchanged.

Cost per optimisation step and layer: exhaustive layers one FFT and F small SVDs; tracked
layers 2·power_iters real matrix products of (c_out·kh·kw × c_in) or (c_in·kh·kw × c_out) by a
(· × F) matrix, the singular values of the candidate blocks, and two SVDs for the weight —
no convolution of a feature map (benchmarks/bench_norms.py).
"""

import math

import torch

from .sn import PowerIterationNorm, _same, check_beta, check_iters
from .spectra import check_kernel

INIT_ITERS = 20          # cold per-frequency power iterations of a fresh u (tracked layers)
TRACKED = 6              # frequencies per half whose block gets exact singular values each step
EXHAUSTIVE = 1 << 21     # F·max(m, 8)³ up to which every step computes the whole spectrum
KAPPA_ITERS = 100        # fixed-point iterations for κ (β < 1)
KAPPA_TOL = {torch.float64: 1e-13, torch.float32: 1e-6}  # relative


def _unit_columns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = x.abs().pow(2).sum(0).sqrt()
    return x / norms.clamp_min(1e-30), norms


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _top_values(blocks: torch.Tensor) -> torch.Tensor:
    """σ₁ of each block of a batch: √λ_max of the smaller Gram matrix (half the time of batched SVDs;
    squaring costs relative precision only at the bottom of the spectrum, not at σ₁)."""
    gram = blocks.mH @ blocks if blocks.shape[-2] >= blocks.shape[-1] else blocks @ blocks.mH
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0).sqrt()


def _real(x: torch.Tensor) -> torch.Tensor:
    """A complex r × F matrix as the real r × 2F matrix of its (re, im) pairs (a view)."""
    return torch.view_as_real(x).reshape(x.shape[0], -1)


class ConvStableRankNorm(PowerIterationNorm):
    """SRN-C-α-β on the n×n circular conv operator; β = 1 is spectral normalisation of the layer."""

    def __init__(self, weight: torch.Tensor, alpha: float = 1.0, beta: float = 1.0, n: int = 64,
                 power_iters: int = 1):
        super().__init__(alpha, power_iters)
        check_kernel(weight, n)
        self.beta = check_beta(beta)
        self.n = n
        c_out, c_in, kh, kw = weight.shape
        self.freqs = n * (n // 2 + 1)
        self.exhaustive = self.freqs * max(min(c_out, c_in), 8) ** 3 <= EXHAUSTIVE
        self.tracked = TRACKED
        self._phase_cache: dict = {}
        self._plan: tuple | None = None       # (kernel copy, plan) for the kernel the next weight uses
        self._eval_plan: tuple | None = None  # (kernel copy, plan) from the exhaustive arg-max (eval, refresh)
        self._kappa = 1.0                     # the last κ (β < 1), a warm start for the next
        self._estimates: torch.Tensor | None = None  # s_f per frequency (not saved: rebuilt by a sweep)
        self._turn = 1                        # which half of the frequencies the next step updates
        self._halves: tuple | None = None
        generator = torch.Generator().manual_seed(0)  # deterministic; the global RNG is left alone
        start = torch.randn(c_out, self.freqs, 2, generator=generator, dtype=weight.dtype)
        self.register_buffer("u", start.to(weight.device))
        self.refresh(weight, INIT_ITERS, exact=False)

    # ------------------------------------------------------------------ frequencies
    def phases(self, weight: torch.Tensor) -> torch.Tensor:
        """E[a·kw + b, p·(n//2+1) + q] = exp(-2πi(p·a + q·b)/n), (kh·kw) × F, complex."""
        kh, kw = weight.shape[-2:]
        ctype = torch.complex128 if weight.dtype == torch.float64 else torch.complex64
        key = (kh, kw, weight.device, ctype)
        if key not in self._phase_cache:
            n, half = self.n, self.n // 2 + 1
            p = torch.arange(n, dtype=torch.float64).repeat_interleave(half)
            q = torch.arange(half, dtype=torch.float64).repeat(n)
            a = torch.arange(kh, dtype=torch.float64).repeat_interleave(kw)
            b = torch.arange(kw, dtype=torch.float64).repeat(kh)
            theta = 2 * math.pi * (a[:, None] * p[None] + b[:, None] * q[None]) / n
            self._phase_cache[key] = torch.polar(torch.ones_like(theta), -theta).to(ctype).to(weight.device)
        return self._phase_cache[key]

    def blocks(self, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """K̂(f) for the frequencies `index` (flat rfft2 indices), a T × c_out × c_in batch (direct DFT)."""
        c_out, c_in = weight.shape[:2]
        phase = self.phases(weight)[:, index]                                   # A × T
        out = weight.reshape(c_out * c_in, -1) @ _real(phase)                   # (c_out·c_in) × 2T
        return torch.view_as_complex(out.view(c_out, c_in, -1, 2)).permute(2, 0, 1).contiguous()

    def response(self, weight: torch.Tensor, index: int) -> torch.Tensor:
        """K̂(f) at one frequency (complex, the weight's precision), differentiable in `weight` (c_out × c_in)."""
        phase = self.phases(weight.detach())[:, index]
        return (weight.reshape(weight.shape[0], weight.shape[1], -1) * phase).sum(-1)

    def spectrum(self, weight: torch.Tensor) -> torch.Tensor:
        """σ₁ of all F blocks (float64, exact): the spectrum the exhaustive arg-max reads."""
        w = weight.detach().double()
        blocks = torch.fft.rfft2(w, s=(self.n, self.n)).permute(2, 3, 0, 1).reshape(self.freqs, *w.shape[:2])
        return _top_values(blocks)

    def power_iteration(self, weight: torch.Tensor, iters: int, part: torch.Tensor | None = None) -> None:
        """`iters` batched per-frequency power-iteration steps on u (on the frequencies `part`, default
        all); updates the estimates s_f = ‖K̂(f)v_f‖ <= σ₁(K̂(f)) of those frequencies."""
        c_out, c_in = weight.shape[:2]
        phase = self.phases(weight)                                             # A × F
        forward = weight.permute(0, 2, 3, 1).reshape(c_out, -1)                 # c_out × (A·c_in)
        adjoint = weight.permute(1, 2, 3, 0).reshape(c_in, -1)                  # c_in × (A·c_out)
        u = torch.view_as_complex(self.u)                                       # c_out × F
        if part is not None:
            phase, u = phase[:, part], u[:, part]
        count = phase.shape[1]
        if count == 0:  # the empty half of a 1×1 grid (n = 1)
            return
        for _ in range(iters):
            modulated = (phase.conj()[:, None, :] * u[None]).reshape(-1, count)
            v, _ = _unit_columns(torch.view_as_complex((adjoint @ _real(modulated)).view(c_in, -1, 2)))
            modulated = (phase[:, None, :] * v[None]).reshape(-1, count)
            u, values = _unit_columns(torch.view_as_complex((forward @ _real(modulated)).view(c_out, -1, 2)))
        if part is None:
            self.u.copy_(torch.view_as_real(u))
            self._estimates = values
        else:
            torch.view_as_complex(self.u)[:, part] = u
            self._estimates[part] = values

    def direction(self, weight: torch.Tensor, index: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """G[o,c,a,b] = Re(conj(u_o)·v_c·e^{-iθ_ab(f)}): ⟨K, G⟩ = Re uᴴK̂(f)v (differentiable in u, v)."""
        phase = self.phases(weight.detach())[:, index]
        outer = u.conj()[:, None, None] * v[None, :, None] * phase[None, None, :]
        return outer.real.reshape(weight.shape).to(weight.dtype)

    @staticmethod
    def top_pair(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(σ₁, u, v) of one block, K̂ v = σ₁ u (differentiable)."""
        left, values, right_h = torch.linalg.svd(block, full_matrices=False)
        return values[0], left[:, 0], right_h[0].conj()

    def window(self, flat: int, device: torch.device) -> torch.Tensor:
        """Flat indices of f = (p, q) and its 8 grid neighbours, mapped into the rfft2 half (f ~ −f)."""
        half = self.n // 2 + 1
        p, q = divmod(flat, half)
        out = []
        for dp in (-1, 0, 1):
            for dq in (-1, 0, 1):
                pp, qq = (p + dp) % self.n, (q + dq) % self.n
                if qq >= half:
                    pp, qq = (-pp) % self.n, (-qq) % self.n
                out.append(pp * half + qq)
        return torch.tensor(out, device=device)

    def drift(self, weight: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """‖K̂(f) − K̂_prev(f)‖_F for every frequency, from the kh·kw × kh·kw Gram matrix of the taps'
        change: Σ_{ab,a′b′} ⟨Δ_ab, Δ_a′b′⟩ e^{-iθ_ab} e^{+iθ_a′b′} (no block is formed)."""
        delta = (weight - previous).reshape(-1, weight.shape[2] * weight.shape[3])
        phase = self.phases(weight)
        gram = (delta.T @ delta).to(phase.dtype)
        return (phase * (gram @ phase.conj())).sum(0).real.clamp_min(0.0).sqrt()

    def halves(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat frequency indices with p + q even, and with p + q odd."""
        if self._halves is None or self._halves[0].device != device:
            half = self.n // 2 + 1
            index = torch.arange(self.freqs, device=device)
            parity = (index // half + index % half) % 2
            self._halves = (index[parity == 0], index[parity == 1])
        return self._halves

    # ------------------------------------------------------------------ the arg-max frequencies
    def candidates(self, weight: torch.Tensor, estimates: torch.Tensor, drift: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tracked layers: (frequencies, their exact σ₁) — the TRACKED largest estimates of each half (only
        estimates of the same age are compared), plus, in training, the frequencies whose estimate plus the
        step's change ‖ΔK̂(f)‖_F exceeds the largest σ₁ found (σ₁ moves by at most ‖ΔK̂(f)‖)."""
        even, odd = self.halves(weight.device)
        index = torch.cat([part[estimates[part].topk(min(self.tracked, len(part))).indices] for part in (even, odd)])
        values = _top_values(self.blocks(weight, index))
        if drift is not None:
            priority = estimates + drift
            priority[index] = -math.inf
            extra = priority.topk(min(self.tracked, self.freqs)).indices
            extra = extra[priority[extra] > values.max()]
            if len(extra):
                index, values = torch.cat([index, extra]), torch.cat([values, _top_values(self.blocks(weight, extra))])
        return index, values

    def plan(self, weight: torch.Tensor, exact: bool, drift: torch.Tensor | None = None) -> dict:
        """The discrete part of the map for kernel `weight`: f* (and, if the constraint binds, f′ and κ₀).

        exact: the whole spectrum (exhaustive arg-max); otherwise the tracked candidates (u must be current)."""
        w = weight.detach()
        if exact:
            exact_values = self.spectrum(w)                                    # float64
            best = int(exact_values.argmax())
            values, index = exact_values.to(w.dtype), torch.arange(self.freqs, device=w.device)
        else:
            index, values = self.candidates(w, self._estimates, drift)
            best = int(index[values.argmax()])
        sigma, u, v = self.top_pair(self.response(w, best))
        plan = {"best": best, "pair": (u, v), "kappa": None, "best2": None, "pair2": None}
        kernel = w / sigma
        m = min(w.shape[0], w.shape[1])
        if self.beta >= 1 or self.beta * m >= kernel.pow(2).sum():
            return plan                      # β = 1, or the constraint does not bind
        g = self.direction(w, best, u, v)
        s1_sq = 1.0 / g.pow(2).sum()
        s1 = g * s1_sq
        s2 = kernel - s1
        s2_sq = s2.pow(2).sum().clamp_min(1e-30)
        bm = self.beta * m
        phase = self.phases(w)
        at_star = phase[:, best]
        window = ((phase * at_star.conj()[:, None]).sum(0).abs() + (phase * at_star[:, None]).sum(0).abs()) * s1_sq / 2
        if exact:
            k_values = values / sigma                                          # σ₁(K̃̂(f)), all f
        else:
            k_values = self._estimates / sigma
            k_values[index] = values / sigma
        chosen = None if exact else torch.cat([self.window(best, w.device), index]).unique()
        if w.shape[-2:] == (1, 1):   # a 1×1 kernel has the same block at every frequency
            chosen = torch.tensor([best], device=w.device)
        s1_blocks, k_blocks = {}, {}

        def top_of(kappa: float) -> tuple[float, int]:
            """max_f σ₁(K̂′(f)) for γ(κ): exact over the frequencies whose bound can reach the best value."""
            gamma = min(1.0, math.sqrt(max(0.0, bm * kappa**2 - float(s1_sq)) / float(s2_sq)))
            bound = (1 - gamma) * window + gamma * k_values
            order = (bound.argsort(descending=True) if chosen is None
                     else chosen[bound[chosen].argsort(descending=True)])
            top, arg, start = -math.inf, best, 0
            while start < len(order) and float(bound[order[start]]) > top * (1 - 1e-6):
                part = order[start:start + 8]
                missing = [int(f) for f in part if int(f) not in k_blocks]
                if missing:
                    at = torch.tensor(missing, device=w.device)
                    s1_blocks.update(zip(missing, self.blocks(s1, at)))
                    k_blocks.update(zip(missing, self.blocks(w, at) / sigma))
                shrunk = torch.stack([(1 - gamma) * s1_blocks[int(f)] + gamma * k_blocks[int(f)] for f in part])
                tops = _top_values(shrunk)
                if float(tops.max()) > top:
                    top, arg = float(tops.max()), int(part[tops.argmax()])
                start += len(part)
            return top, arg

        kappa, arg, last = self._kappa, best, None
        for _ in range(KAPPA_ITERS):     # κ = F(κ): fixed-point steps, secant steps once two residuals exist
            new, arg = top_of(kappa)
            residual = new - kappa
            if abs(residual) <= KAPPA_TOL.get(w.dtype, 1e-6) * new:
                kappa = new
                break
            step = new
            if last is not None and last[1] != residual:
                secant = kappa - residual * (kappa - last[0]) / (residual - last[1])
                if secant > 0 and abs(secant - kappa) <= 4 * abs(residual):
                    step = secant
            last = (kappa, residual)
            kappa = step
        self._kappa = kappa
        gamma = min(1.0, math.sqrt(max(0.0, bm * kappa**2 - float(s1_sq)) / float(s2_sq)))
        _, u2, v2 = self.top_pair(self.response(s1 + gamma * s2, arg))
        plan.update(kappa=kappa, best2=arg, pair2=(u2, v2))
        return plan

    # ------------------------------------------------------------------ the weight
    def normalise(self, weight: torch.Tensor, plan: dict | None = None) -> torch.Tensor:
        """α·K/σ, or α·K′/κ when the constraint binds (module docstring), differentiable in `weight`."""
        plan = self._plan[1] if plan is None else plan
        if plan["kappa"] is None:        # σ = ⟨K, G⟩ with the exact top pair: its gradient is G (envelope)
            u, v = plan["pair"]
            sigma = (weight * self.direction(weight, plan["best"], u, v)).sum()
            return self.alpha * weight / sigma
        sigma, u, v = self.top_pair(self.response(weight, plan["best"]))   # G depends on K through (u, v)
        kernel = weight / sigma
        m = min(weight.shape[0], weight.shape[1])
        bm = self.beta * m
        g = self.direction(weight, plan["best"], u, v)
        s1_sq = 1 / g.pow(2).sum()
        s1 = g * s1_sq
        s2 = kernel - s1
        s2_sq = s2.pow(2).sum().clamp_min(1e-30)

        def gamma_of(kappa):  # γ(κ) (5.), with a zero derivative where it is clamped to 0 or 1
            square = (bm * kappa**2 - s1_sq) / s2_sq
            inside = (square > 0) & (square < 1)
            return torch.where(inside, square.where(inside, torch.ones_like(square)).sqrt(),
                               (square >= 1).to(square.dtype))

        kappa0 = plan["kappa"]
        u2, v2 = plan["pair2"]
        g2 = self.direction(weight, plan["best2"], u2, v2)          # the top pair of K′ at f′ (envelope for κ₁)
        shrunk = s1 + gamma_of(torch.tensor(kappa0, dtype=weight.dtype, device=weight.device)) * s2
        kappa1 = (shrunk * g2).sum()                                 # = σ₁(K̂′(f′)) = κ₀
        with torch.no_grad():                 # ∂κ₁/∂κ₀ = ⟨S2, G′⟩·γ′(κ₀)
            gamma0 = float(gamma_of(torch.tensor(kappa0, dtype=weight.dtype, device=weight.device)))
            slope = 0.0
            if 0 < gamma0 < 1:
                slope = float((s2 * g2).sum()) * bm * kappa0 / (gamma0 * float(s2_sq))
        kappa = kappa0 + (kappa1 - kappa1.detach()) / (1 - slope)
        shrunk = s1 + gamma_of(kappa) * s2
        return self.alpha * shrunk / kappa

    # ------------------------------------------------------------------ life cycle
    def advance(self, weight: torch.Tensor) -> None:
        """An optimisation step's plan for a new kernel: the whole spectrum (exhaustive layers) or
        `power_iters` batched steps on half of the frequencies and exact values of the candidates."""
        previous = self._seen
        if self.exhaustive:
            self._plan = (weight.clone(), self.plan(weight, exact=True))
            return
        if self._estimates is None or self._estimates.device != weight.device:
            self.power_iteration(weight, INIT_ITERS)
        else:
            self._turn ^= 1
            self.power_iteration(weight, self.power_iters, self.halves(weight.device)[self._turn])
        fresh = previous is not None and _same_layout(previous, weight)
        plan = self.plan(weight, exact=False, drift=self.drift(weight, previous) if fresh else None)
        self._plan = (weight.clone(), plan)
        u = torch.view_as_complex(self.u)
        u[:, plan["best"]] = plan["pair"][0].to(u.dtype)            # the exact vector as a warm start

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "u"
        if key in state_dict and state_dict[key].shape != self.u.shape:
            error_msgs.append(f"{key}: SRN-C state of shape {tuple(state_dict[key].shape)} does not fit this layer "
                              f"({tuple(self.u.shape)}: c_out × n·(n//2+1) × 2 with n = {self.n}); the checkpoint "
                              "was saved with another n or another kernel")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._estimates = None  # a loaded u: the next training step runs a full sweep first
        self._plan = self._eval_plan = self._seen = None

    def exact_plan(self, weight: torch.Tensor) -> dict:
        """The plan from the whole spectrum, cached per kernel value (eval mode, refresh)."""
        if self._eval_plan is None or not _same(self._eval_plan[0], weight):
            w = weight.detach()
            self._eval_plan = (w.clone(), self.plan(w, exact=True))
        return self._eval_plan[1]

    def exact_vectors(self, weight: torch.Tensor) -> None:
        plan = self.exact_plan(weight)
        self._plan = (weight.detach().clone(), plan)
        if not self.exhaustive:
            self.power_iteration(weight, INIT_ITERS)
            u = torch.view_as_complex(self.u)
            u[:, plan["best"]] = plan["pair"][0].to(u.dtype)

    def refresh(self, weight: torch.Tensor, iters: int = 50, exact: bool = True) -> None:
        """exact: the plan from the whole spectrum (cached for eval; tracked layers also re-converge u);
        otherwise `iters` batched power iterations and exact values of the candidates."""
        with torch.inference_mode(False), torch.no_grad():
            w = weight.detach()
            if exact or self.exhaustive:
                self.exact_vectors(w)
            else:
                self.power_iteration(w, check_iters(iters, "iters"))
                self._plan = (w.clone(), self.plan(w, exact=False))
            self._seen = w.clone()
        self._frozen = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training and torch.is_grad_enabled() and weight.requires_grad:
            with torch.autocast(weight.device.type, enabled=False):
                return _EvalWeight.apply(weight, self.frozen(weight), self)
        return super().forward(weight)

    def frozen(self, weight: torch.Tensor) -> torch.Tensor:
        """Eval: the weight from the exhaustive arg-max of the current kernel, a cached constant."""
        cache = self._frozen
        if cache is None or not _same(cache[0], weight):
            with torch.inference_mode(False), torch.no_grad():
                w = weight.detach()
                cache = (w.clone(), None, self.normalise(w, self.exact_plan(w)))
            self._frozen = cache
        return cache[2]

    def beta_floor(self, weight: torch.Tensor) -> float:
        """A β at or below which γ = 0 whatever the kernel: ‖S1‖²/m = 1/(m‖G‖²) >= 1/(m·kh·kw)."""
        return 1.0 / (min(weight.shape[0], weight.shape[1]) * weight.shape[2] * weight.shape[3])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, n={self.n}"


class _EvalWeight(torch.autograd.Function):
    """Eval mode with gradient: the cached exact weight forward; the exact map's vector-Jacobian product
    backward (built only if a gradient reaches the kernel: input gradients, e.g. the TRF's, skip it)."""

    @staticmethod
    def forward(ctx, weight, value, norm):
        ctx.save_for_backward(weight)
        ctx.norm = norm
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        with torch.enable_grad():
            w = weight.detach().requires_grad_(True)
            out = ctx.norm.normalise(w, ctx.norm.exact_plan(w.detach()))
            (grad,) = torch.autograd.grad(out, w, grad_output)
        return grad, None, None
