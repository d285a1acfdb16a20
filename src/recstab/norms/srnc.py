r"""SRN-C: stable rank normalisation of the conv OPERATOR (Tanay et al., Algorithm 2, corrected).

Notation. K is the kernel (c_out × c_in × kh × kw), W(K) the stride-1 conv with
circular padding on an n×n map, a (c_out·n²) × (c_in·n²) matrix (spectra.py);
m = min(c_in, c_out), so W has n²·m singular values. Target: ‖W‖₂ = α and
srank(W) = ‖W‖_F²/‖W‖₂² = β·n²·m (or less, when the kernel is already below it).

Spectral norm, per frequency. The 2-D DFT block-diagonalises W(K) (spectra.py):
its singular values are those of the n² blocks

    K̂(f) = Σ_{a,b} K[:, :, a, b] · e^{-iθ_ab(f)},   θ_ab(f) = 2π(p·a + q·b)/n,  f = (p, q),

so ‖W(K)‖₂ = max_f σ₁(K̂(f)), and K real gives K̂(−f) = conj K̂(f): the n·(n//2+1)
frequencies of `rfft2` suffice. A power iteration on W itself converges slowly
(the top of a conv spectrum is a near-continuum of frequencies; per frequency it
is not), so SRN-C runs one power iteration per frequency, batched:

- state: the buffer u, one unit left vector u_f ∈ C^{c_out} per frequency
  (stored as a real c_out × F × 2 tensor, F = n·(n//2+1));
- one step: v_f = K̂(f)ᴴu_f/‖·‖, u_f = K̂(f)v_f/‖·‖, and s_f = ‖K̂(f)v_f‖ ≤ σ₁(K̂(f)).
  Both products for all F frequencies are ONE real matrix product each:
  K̂(f)v_f = Σ_ab K_ab (e^{-iθ_ab(f)} v_f) is the (c_out × kh·kw·c_in) kernel times the
  stacked, phase-modulated vectors — no block is ever formed;
- each optimisation step updates half of the frequencies (p + q even, then odd, in
  turn: every frequency every other step, and any peak of the response has fresh
  neighbours every step); a refresh, the constructor and a state-dict load sweep all;
- candidates: the TRACKED largest s_f of each half (estimates of one age are compared
  with each other only), plus — the step's kernel change ΔK̂(f) bounds how far σ₁ can
  move, and ‖ΔK̂(f)‖_F for all f costs one kh·kw × kh·kw Gram matrix of the taps'
  change — up to TRACKED frequencies whose s_f + ‖ΔK̂(f)‖_F exceeds the largest σ₁
  found (Adam moves taps coherently and lifts low frequencies faster than a power
  iteration follows). Their blocks K̂(f) come from a direct DFT (kh·kw taps) and get
  exact singular values; the largest σ₁ among them is the operator norm (exact
  whenever the true arg-max frequency is a candidate) and one SVD of that block
  gives the pair (f*, u*, v*), K̂(f*)v* = σ u*, that defines the normalisation
  below; u*, exact, is written back into u.
On a new kernel (every optimisation step) this runs BEFORE the weight is
normalised, so the weight a step trains with is normalised with singular vectors
of that very kernel, not of the previous one. No random part is added anywhere:
nothing keeps the iteration from converging. Measured in a plain training loop
(Adam, He init, 4-conv recurrent nets of 8–16 channels, n = 16 and 32, 50 steps,
no refresh, every layer at every step against its exact FFT spectrum): at lr 1e-3
max |‖W‖₂/α − 1| = 2.8e-5 (under 1e-6 in 11 of 12 runs) for β = 1 and 0.1, with
srank/(n²m) = β to 1e-6 when the constraint binds (tests/test_norms.py); at lr 1e-2
(taps moving ~10 % per step) under 1e-6 in 9 of 12 runs but up to 1.5e-2 in the
others: the low frequencies of a layer then grow faster than its vectors follow;
power_iters = 2 brings those two worst runs to 6e-7. VResNet-feat, 64 channels, n = 64:
benchmarks/results/norms.md.

Derivation of the normalisation (and of γ).

1. K ↦ W(K) is linear, and every kernel entry appears once in each of the n²
   rows of its output channel, so ⟨W(K), W(L)⟩_F = n²⟨K, L⟩_F; in particular
   ‖W(K)‖_F² = n²‖K‖_F².
2. σ = Re(u*ᴴ K̂(f*) v*) = Σ_{o,c,a,b} K[o,c,a,b]·Re(conj(u*_o)·v*_c·e^{-iθ_ab(f*)}) = ⟨K, G⟩_F with
       G[o, c, a, b] = Re(conj(u*_o) · v*_c · e^{-iθ_ab(f*)}),
   the real part of the per-frequency outer product conj(u*)·v*ᵀ mapped back to the
   taps (it is also uᵀW(K)v for the real plane waves u(x) ∝ Re(u* e^{iθ(x)}), v alike).
   u*, v* (hence G) are constants; K̃ = K/σ is differentiable through σ = ⟨K, G⟩
   (Miyato's SN). Nothing is lost: σ₁(K̂(f*)) has gradient exactly G when σ₁ is a
   simple singular value (∂σ₁ = Re uᴴ ∂K̂ v), so the gradient is the true one.
3. Stable rank. With ‖W(K̃)‖₂ = 1 and fact 1,
       srank(W(K̃)) = n²‖K̃‖_F²,   so   srank ≤ β·n²·m  ⇔  ‖K̃‖_F² ≤ β·m   (n cancels).
4. The rank-one part. The paper writes S1 = u vᵀ, but a kh×kw kernel cannot
   represent u vᵀ (an operator of rank one on the whole map); its kernel-space
   counterpart is the direction G. Project K̃ on it: since ⟨K̃, G⟩ = σ/σ = 1,
       S1 = G / ‖G‖_F²,   S2 = K̃ − S1,   ⟨S1, S2⟩ = 1/‖G‖² − ‖G‖²/‖G‖⁴ = 0,
   and Re u*ᴴŜ1(f*)v* = ⟨S1, G⟩ = 1, Re u*ᴴŜ2(f*)v* = 0: the top singular pair is
   carried by S1, so shrinking S2 lowers the rest of the spectrum.
   ‖G‖² = ½(kh·kw + Re(c·ζ)) with c = Σ_ab e^{-2iθ_ab(f*)}, ζ = (u*ᴴ conj u*)(v*ᵀv*):
   ‖S1‖² = 1/‖G‖² is 1/(kh·kw) at f* ∈ {0, n/2}² (real u*, v*) and ≈ 2/(kh·kw) far from it.
5. γ solves ‖S1 + γS2‖_F² = ‖S1‖² + γ²‖S2‖² = β·m·κ²:
       γ = √((β·m·κ² − ‖S1‖_F²) / ‖S2‖_F²),
   applied only when γ < 1 (the constraint binds; otherwise K̃ already satisfies
   it). κ = 1 is the formula when W(S1 + γS2) keeps norm 1, which the step
   "S1 carries the top pair" suggests but does not prove: Ŝ1(f*) =
   (kh·kw·u*v*ᴴ + c·conj(u*)v*ᵀ)/(2‖G‖²) is not u*v*ᴴ, and Re u*ᴴŜ1(f*)v* = 1 only bounds
   its norm from below. Measured with exact singular vectors (He-init kernels, n = 16–32,
   β = 0.1): ‖W(S1 + γS2)‖₂ = 1.0000–1.003 far from the self-conjugate frequencies,
   but up to 1.12 near them (c large, ζ complex: small channel counts, low
   frequencies), with srank/(n²m) = 0.08 instead of 0.1. So the weight is
       weight = α·K′/κ,   K′ = S1 + γS2,   κ = ‖W(K′)‖₂ = ⟨K′, G′⟩,
   G′ from the top singular pair of K′ (found like that of K, among the tracked
   frequencies), and κ in γ is the fixed point κ = ‖W(S1 + γ(κ)S2)‖₂ (a few
   iterations, each a handful of small SVDs; κ then enters γ as a constant, like
   the target β·m). Then ‖W‖₂ = α and srank(W) = n²‖K′‖²/κ² = β·n²·m, both to the
   precision of the fixed point (1e-6). If β·m·κ² < ‖S1‖² the target is below what
   the rank-one part alone has: γ = 0 and the weight is the constant α·S1/κ. Since
   ‖G‖² ≤ kh·kw, ‖S1‖² ≥ 1/(kh·kw), so β ≤ 1/(m·kh·kw) is degenerate whatever the kernel
   (apply_norm warns).

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

Evaluation. In eval mode the weight is computed once per kernel from the EXACT
spectrum (all frequencies, batched SVD: ~0.5 s per 64-channel layer at n = 64 on a
CPU), so it is a pure function of the kernel — exact however stale u is, and
bit-identical after a state-dict round trip. `refresh` computes the same exact
state (eval reuses it) and re-converges u.

Cost per optimisation step and layer: 2·power_iters real matrix products of
(c_out·kh·kw × c_in) or (c_in·kh·kw × c_out) by a (· × F) matrix (half of the
frequencies, real and imaginary parts: 64 channels, n = 64: ~5 ms each on one CPU
thread), as many element-wise phase modulations, the singular values of TRACKED
small blocks and one SVD (twice for β < 1, plus the κ iterations, usually one) —
no convolution of a feature map. ~15 ms per 64-channel layer in all, against a
~5 s training step of VResNet-feat (benchmarks/bench_norms.py).
"""

import math

import torch

from .sn import PowerIterationNorm, _same, check_beta, check_iters
from .spectra import _blocks, check_kernel

INIT_ITERS = 20   # cold per-frequency power iterations of a fresh u
TRACKED = 6       # frequencies per half whose block gets exact singular values each step
KAPPA_ITERS = 8   # fixed-point iterations for κ (β < 1)
KAPPA_TOL = 1e-6  # relative


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
        self.tracked = TRACKED
        self._phase_cache: tuple | None = None
        self._state: dict | None = None   # constants of `normalise` for the kernel `_seen`
        self._exact: tuple | None = None  # (kernel copy, state) from the exact spectrum
        self._kappa = 1.0                 # the last κ (β < 1), a warm start for the next
        self._estimates: torch.Tensor | None = None  # s_f per frequency (not saved: rebuilt by a sweep)
        self._turn = 1                    # which half of the frequencies the next step updates
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
        if self._phase_cache is None or self._phase_cache[0] != key:
            n, half = self.n, self.n // 2 + 1
            p = torch.arange(n, dtype=torch.float64).repeat_interleave(half)
            q = torch.arange(half, dtype=torch.float64).repeat(n)
            a = torch.arange(kh, dtype=torch.float64).repeat_interleave(kw)
            b = torch.arange(kw, dtype=torch.float64).repeat(kh)
            theta = 2 * math.pi * (a[:, None] * p[None] + b[:, None] * q[None]) / n
            self._phase_cache = (key, torch.polar(torch.ones_like(theta), -theta).to(ctype).to(weight.device))
        return self._phase_cache[1]

    def blocks(self, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """K̂(f) for the frequencies `index` (flat rfft2 indices), a T × c_out × c_in batch (direct DFT)."""
        c_out, c_in = weight.shape[:2]
        phase = self.phases(weight)[:, index]                                   # A × T
        out = weight.reshape(c_out * c_in, -1) @ _real(phase)                   # (c_out·c_in) × 2T
        return torch.view_as_complex(out.view(c_out, c_in, -1, 2)).permute(2, 0, 1).contiguous()

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
        """G[o,c,a,b] = Re(conj(u_o)·v_c·e^{-iθ_ab(f)}): ⟨K, G⟩ = Re uᴴK̂(f)v, a constant kernel."""
        phase = self.phases(weight)[:, index]
        outer = u.conj()[:, None, None] * v[None, :, None] * phase[None, None, :]
        return outer.real.reshape(weight.shape).to(weight.dtype)

    @staticmethod
    def top_pair(blocks: torch.Tensor, values: torch.Tensor | None = None
                 ) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position of the block with the largest σ₁, its top left and right singular vectors, σ₁).

        Largest singular values of all blocks (unless given), then one full SVD: K̂ v = σ₁ u."""
        best = int((_top_values(blocks) if values is None else values).argmax())
        if blocks.shape[-2] >= blocks.shape[-1]:
            left, values, right_h = torch.linalg.svd(blocks[best], full_matrices=False)
            return best, left[:, 0], right_h[0].conj(), values[0]
        left, values, right_h = torch.linalg.svd(blocks[best].mH, full_matrices=False)  # K̂ᴴ = L S Rᴴ
        return best, right_h[0].conj(), left[:, 0], values[0]

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

    # ------------------------------------------------------------------ state
    def state(self, weight: torch.Tensor, estimates: torch.Tensor, drift: torch.Tensor | None = None) -> dict:
        """The constants of `normalise` for kernel `weight`, given per-frequency σ estimates (F,).

        The candidates are the TRACKED largest estimates of each half of the frequencies: one half
        was updated this step, the other one step earlier, and only estimates of the same age are
        compared (a stale estimate may be above the current value). `drift` (training: the change of
        each block since the last step) adds the frequencies whose estimate plus drift exceeds the
        largest exact σ₁ found: a block can grow faster than its power-iteration vector follows
        (Adam moves all taps alike, which lifts the low frequencies coherently)."""
        even, odd = self.halves(weight.device)
        index = torch.cat([part[estimates[part].topk(min(self.tracked, len(part))).indices] for part in (even, odd)])
        blocks = self.blocks(weight, index)
        values = _top_values(blocks)
        if drift is not None:  # σ₁ moves by at most ‖ΔK̂(f)‖: examine the frequencies that could now lead
            priority = estimates + drift
            priority[index] = -math.inf
            extra = priority.topk(min(self.tracked, self.freqs)).indices
            extra = extra[priority[extra] > values.max()]
            if len(extra):
                extra_blocks = self.blocks(weight, extra)
                index, blocks = torch.cat([index, extra]), torch.cat([blocks, extra_blocks])
                values = torch.cat([values, _top_values(extra_blocks)])
        best, u, v, sigma = self.top_pair(blocks, values)
        g = self.direction(weight, int(index[best]), u, v)
        state = {"g": g, "best": index[best], "left": u, "target": None, "g2": None}
        if self.beta < 1:
            estimates = estimates.clone()
            estimates[index] = values.to(estimates.dtype)  # exact where known (for the κ candidates)
            g_sq = g.pow(2).sum()
            s1 = g / g_sq
            kernel = weight / sigma.to(weight.dtype)
            s2 = kernel - s1
            s1_sq, s2_sq = 1.0 / g_sq, s2.pow(2).sum().clamp_min(1e-30)
            bm = self.beta * min(weight.shape[0], weight.shape[1])
            if bm < kernel.pow(2).sum():  # the constraint binds
                state.update(self.shrink(weight, estimates / sigma, int(index[best]), s1, s1_sq, s2_sq, bm, sigma))
        return state

    def shrink(self, weight, k_values, star: int, s1, s1_sq, s2_sq, bm, sigma) -> dict:
        """κ = ‖W(S1 + γ(κ)S2)‖₂ by fixed-point iteration, on the frequencies where K′ can be largest.

        ‖K̂′(f)‖ ≤ (1 − γ)‖Ŝ1(f)‖ + γ‖K̃̂(f)‖, and Ŝ1(f) = (D(f − f*)·u*v*ᴴ + D(f + f*)·conj(u*)v*ᵀ)/(2‖G‖²)
        with D(h) = Σ_ab e^{-iθ_ab(h)}, so ‖Ŝ1(f)‖ ≤ (|D(f − f*)| + |D(f + f*)|)/(2‖G‖²) =: c(f). The
        candidates: f* (flat index `star`) and its grid neighbours, where S1 lives and where K′ peaks
        when f* is close to a self-conjugate frequency, and the TRACKED + 1 largest of the bound
        (1 − γ)c(f) + γ·k_values(f) (k_values ≈ σ₁(K̃̂(f)), so the largest σ₁(K̃̂) are among them).
        """
        phase = self.phases(weight)
        at_star = phase[:, star]
        c = ((phase * at_star.conj()[:, None]).sum(0).abs() + (phase * at_star[:, None]).sum(0).abs()) * s1_sq / 2
        kappa = self._kappa
        gamma = ((bm * kappa**2 - s1_sq).clamp_min(0.0) / s2_sq).sqrt().clamp(max=1.0)
        score = (1 - gamma) * c + gamma * k_values
        chosen = torch.cat([self.window(star, weight.device),
                            score.topk(min(self.tracked + 1, self.freqs)).indices]).unique()
        s1_hat, k_hat = self.blocks(s1, chosen), self.blocks(weight, chosen) / sigma
        for _ in range(KAPPA_ITERS):
            gamma = ((bm * kappa**2 - s1_sq).clamp_min(0.0) / s2_sq).sqrt().clamp(max=1.0)
            shrunk = (1 - gamma) * s1_hat + gamma * k_hat
            tops = _top_values(shrunk)
            new, kappa = kappa, float(tops.max())
            if abs(kappa - new) <= KAPPA_TOL * kappa:
                break
        self._kappa = kappa
        best, u, v, _ = self.top_pair(shrunk, tops)
        return {"target": float(((bm * kappa**2 - s1_sq).clamp_min(0.0)).sqrt()),
                "g2": self.direction(weight, int(chosen[best]), u, v)}

    def advance(self, weight: torch.Tensor) -> None:
        """An optimisation step's tracking of a new kernel: `power_iters` batched steps on half of the
        frequencies (p + q even and odd in turn; all of them after a refresh or a state-dict load),
        then exact singular values of the candidate frequencies (see `state`)."""
        previous = self._seen
        if self._estimates is None or self._estimates.device != weight.device:
            self.power_iteration(weight, INIT_ITERS)
        else:
            self._turn ^= 1
            self.power_iteration(weight, self.power_iters, self.halves(weight.device)[self._turn])
        fresh = previous is not None and _same_layout(previous, weight)
        self._settle(weight, drift=self.drift(weight, previous) if fresh else None)

    def halves(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat frequency indices with p + q even, and with p + q odd."""
        if self._halves is None or self._halves[0].device != device:
            half = self.n // 2 + 1
            index = torch.arange(self.freqs, device=device)
            parity = (index // half + index % half) % 2
            self._halves = (index[parity == 0], index[parity == 1])
        return self._halves

    def _settle(self, weight: torch.Tensor, drift: torch.Tensor | None = None) -> None:
        self._set_state(self.state(weight, self._estimates, drift))

    def _set_state(self, state: dict) -> None:
        self._state = state
        u = torch.view_as_complex(self.u)
        u[:, self._state["best"]] = self._state["left"].to(u.dtype)  # the exact vector as a warm start

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._estimates = None  # a loaded u: the next training step runs a full sweep first

    def exact_state(self, weight: torch.Tensor) -> dict:
        """The state from the exact spectrum (all frequencies), cached per kernel value."""
        if self._exact is None or not _same(self._exact[0], weight):
            w = weight.detach()
            self._exact = (w.clone(), self.state(w, _top_values(_blocks(w, self.n).flatten(0, 1))))
        return self._exact[1]

    def exact_vectors(self, weight: torch.Tensor) -> None:
        self.power_iteration(weight, INIT_ITERS)
        self._set_state(self.exact_state(weight))

    def refresh(self, weight: torch.Tensor, iters: int = 50, exact: bool = True) -> None:
        """exact: INIT_ITERS batched iterations on u, then the exact state (cached for eval);
        otherwise `iters` batched iterations and exact SVDs of the tracked frequencies."""
        with torch.inference_mode(False), torch.no_grad():
            w = weight.detach()
            if exact:
                self.exact_vectors(w)
            else:
                self.power_iteration(w, check_iters(iters, "iters"))
                self._settle(w)
            self._seen = w.clone()
        self._frozen = None

    # ------------------------------------------------------------------ the weight
    def normalise(self, weight: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        state = self._state if state is None else state
        g = state["g"]
        sigma = (weight * g).sum().clamp_min(1e-12)
        kernel = weight / sigma
        if state["target"] is not None:
            g_sq = g.pow(2).sum()
            s1 = g / g_sq
            s2 = kernel - s1
            gamma = (state["target"] * s2.pow(2).sum().clamp_min(1e-24).rsqrt()).clamp(max=1.0)
            kernel = s1 + gamma * s2
            kernel = kernel / (kernel * state["g2"]).sum().clamp_min(1e-12)  # κ = ‖W(K′)‖₂
        return self.alpha * kernel

    def frozen(self, weight: torch.Tensor) -> torch.Tensor:
        """Eval: the weight from the exact spectrum of the current kernel, a cached constant."""
        cache = self._frozen
        if cache is None or not _same(cache[0], weight):
            with torch.inference_mode(False), torch.no_grad():
                w = weight.detach()
                cache = (w.clone(), None, self.normalise(w, self.exact_state(w)))
            self._frozen = cache
        return cache[2]

    def beta_floor(self, weight: torch.Tensor) -> float:
        """A β at or below which γ = 0 whatever u: ‖S1‖²/m = 1/(m‖G‖²) >= 1/(m·kh·kw)."""
        return 1.0 / (min(weight.shape[0], weight.shape[1]) * weight.shape[2] * weight.shape[3])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, n={self.n}"
