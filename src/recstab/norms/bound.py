r"""A proven upper bound of a conv layer's operator norm on EVERY input size, by a certified search.

K is a kernel c_out × c_in × kh × kw (stride 1, no dilation, no groups). Its frequency
response is the matrix trigonometric polynomial

    K̂(ω) = Σ_{a,b} K[:, :, a, b] · e^{-i(ω₁a + ω₂b)},   ω ∈ T² = [0, 2π)².

Which operators it bounds. Let S = sup_ω ‖K̂(ω)‖₂.
- Circular padding on an H×W map (any H, W): the 2-D DFT block-diagonalises the
  conv into the blocks K̂(2πp/H, 2πq/W) (taps wrap around when H < kh; the phases
  are periodic, so the formula still holds), so its norm is the largest of them, ≤ S.
- Zero padding (any amount, 'same' included) on an H×W map: the conv is P C Jᵀ,
  where C is the convolution on ℓ²(Z²) (the infinite plane), Jᵀ embeds the map by
  zero extension and P restricts the output to the kept window. ‖P‖, ‖J‖ ≤ 1, and
  C is unitarily equivalent (Fourier series ℓ²(Z²) → L²(T²)) to multiplication by
  K̂(ω), whose norm is S. So the zero-padded conv is a compression of an operator
  of norm S: its norm is ≤ S (equivalently: a compression of the circular conv
  on an (H + kh − 1) × (W + kw − 1) torus). Dropping output pixels (stride) only
  compresses further.
The max of the circular FFT spectrum at one n is therefore only a LOWER estimate
of S: a peak between the grid points is missed (by up to 4 % at n = 16 for a 3×3).

1. The lattice argument (what every certificate here rests on). Fix a unit
x ∈ C^{c_in}. T(ω) = ‖K̂(ω)x‖² is a real, non-negative trigonometric polynomial of
degree d₁ = kh − 1 in ω₁ and d₂ = kw − 1 in ω₂ (the products e^{-iω·(a,b)}·e^{+iω·(a′,b′)}
have frequencies a − a′ ∈ [−d₁, d₁], b − b′ ∈ [−d₂, d₂]). Let M = max T, attained at ω*.
P = (2T − M)/M is a real trigonometric polynomial of the same degrees with |P| ≤ 1, P(ω*) = 1.
 (a) (van der Corput–Schaake / Szegő) A real trigonometric polynomial Q of degree d in
     one variable with |Q| ≤ 1 satisfies Q′² + d²Q² ≤ d². So ψ = arccos Q has
     |ψ′| = |Q′|/√(1 − Q²) ≤ d wherever |Q| < 1; |Q| = 1 only at finitely many points
     (or Q is constant), and ψ is continuous, so ψ is d-Lipschitz.
 (b) Walk from ω* to ω along axis 1, then along axis 2: on each leg P is a one-variable
     polynomial of degree ≤ d₁ (resp. d₂) bounded by 1, so ψ = arccos P, zero at ω*,
     grows by at most r = d₁|h₁| + d₂|h₂|, h = ω − ω* (components taken mod 2π into
     [−π, π]). If r ≤ π: P(ω) ≥ cos r and T(ω) = M(1 + P(ω))/2 ≥ M·cos²(r/2).
 (c) Cells. Split T² into the squares of the n-grid (n even) and give each square its two
     opposite corners on the checkerboard Λ_n = {2π(p, q)/n : p + q even}. The weighted
     distances from any point of the square to those two corners add up to (d₁ + d₂)·2π/n,
     so one of them is within r_n = π(d₁ + d₂)/n of it.
 (d) Hence, with x the top right singular vector at the global maximiser ω* of σ₁(K̂(ω))
     (so M = S²): if ω* lies in a square whose two corners λ satisfy σ₁(K̂(λ)) ≤ τ, then
     S·cos(r_n/2) ≤ τ. A square whose corners pass σ₁ ≤ γ·cos(r_n/2) cannot hold ω*
     unless S ≤ γ. If every square of a partition of T² passes (each at its own level n),
     S ≤ γ. K real gives K̂(−ω) = conj K̂(ω): covering ω₂ ∈ [0, π] suffices (ω* or −ω* is there).
 A full lattice at one n (the `method="svd"` bound: σ₁ of every corner, bound
 max_Λ σ₁ / cos(r_n/2)) costs n²/4 SVDs and is 1.0048 above S at n = 64 for a 3×3.

2. The certified search (`method="adaptive"`, the default). Only the squares near the
maximum need a fine n; the rest is cleared at coarse n:
 - H(ω) = K̂(ω)ᴴK̂(ω) (on the smaller channel side, m = min(c_in, c_out)) is itself a
   matrix trigonometric polynomial with (2kh − 1)(2kw − 1) taps L_δ = Σ_{s − t = δ} K_tᵀK_s,
   L_{−δ} = L_δᵀ (one batched product of the kernel's tap matrices, float64), after which H at
   any ω costs one small matrix product (no FFT, no per-point SVD).
 - A lower bound L: the coarse corners are ranked by ‖H‖_F, the best dozen get their top
   eigenvalue, and the best of those is climbed to a local maximum of σ₁(K̂(ω)) over continuous
   ω by Newton's method (gradient and Hessian of the top eigenvalue of H(ω) from one
   eigendecomposition, by first- and second-order perturbation theory; backtracking; saddles left
   along the upward curvature). L = σ₁ there (any σ₁ is ≤ S).
 - γ = (1 + rtol)·L. Starting at n₀ = 6(d₁ + d₂), every square is tested at its level: both
   corners must satisfy σ₁ ≤ γ·cos(r_n/2), i.e. λ_max(H) ≤ τ := γ²cos²(r_n/2) — one Cholesky
   factorisation of τI − H each (section 3); a square that fails is split into the four squares
   of the 2n-grid (their corners are on Λ_2n). A proven λ_max ≤ τ is kept and reused at finer
   levels (their τ only grows).
 - The corners that fail are also tested at γ² itself: one that fails that too has σ₁ > γ > L,
   so L was not the maximum — its eigenvalue raises L (a new peak is climbed), γ grows, and the
   level is tested again. At the final level n_f, where (1 + rtol)·cos(r_nf/2) ≥ 1 + rtol/2, these
   tests are float64; a square that still fails there has a corner above γ, which raises L
   (strictly: the search ends). When every square has passed, S ≤ γ by (d). Squares that passed
   at a smaller γ stay valid (thresholds only grow).
 - The bound returned is max(γ, (1 + rtol)·σ₁(K̂(ω̂)))·(1 + ROUNDING), ω̂ the final peak climbed
   in float64 (σ₁(K̂(ω̂)) ≥ L): at least S and at most (1 + rtol)·S. For 1×1 kernels K̂ is
   constant: the bound is σ₁(K)·(1 + ROUNDING). A zero kernel has bound 0.
 - Several kernels (`certified_peaks`: a model's loop, a certified slice and its partners) are searched
   together when their H have one shape: every step above runs for all of them at once — one
   batched product for the taps, the Newton climbs of all kernels in lockstep, one list of corner
   keys (kernel, p, q) per level whose blocks are formed and factorised a cache-sized chunk at a
   time. Each kernel's decisions read only its own L, γ and corners, so its certificate is the one
   its own search gives (the tests check: same bound, same tests, same levels); what is shared is
   the per-call overhead, which dominates for 32-channel kernels.

3. Rounding (stated margins). A Cholesky factorisation that runs to the end in floating point
(unit roundoff u) is exact for A + ΔA with |ΔA| ≤ γ_{m+1}|R̂ᴴ||R̂| (Demmel; Higham, Thm 10.3), so
‖ΔA‖₂ ≤ γ·‖R̂‖_F² ≤ γ·tr(A)/(1 − γ); for complex arithmetic we take γ = 4(m + 2)u (blocked LAPACK
factorisations with conventional products satisfy the same bound up to this constant). The test
factorises A = s·I − H̃, H̃ the H formed in the test's precision, whose error (casting the float64
taps and phases, the sum over D taps) is at most E = (D + 4)·u·Σ_δ‖stack_δ‖_F·1.01, plus the
float64 taps' own error 2D(c + kh·kw + 2)·u64·‖K‖_F²; s = τ − E − u(τ + |tr H̃|) − γ·tr(A)/(1 − γ).
Success proves τI − H ⪰ 0 for the exact H of the given kernel. In float32 the margin is ~8e-4
of τ for a 64-channel layer (~4e-4 on σ), so float64 tests (margin ~1e-12) take over where the
thresholds come within two margins of γ² (the fine levels); a float32 failure is only
inconclusive (it refines, or is retested in float64). Eigenvalues used as values are float64
or float32 (only to choose L: the proof never rests on them). The bound is multiplied by
1 + ROUNDING (1e-9) so that the differentiable recomputation (an SVD of one block) is never
below the proven γ.

4. Differentiable version. `conv_norm_bound_tensor(w)` returns the same number as a 0-dim
tensor: (1 + rtol)(1 + ROUNDING)·σ₁(K̂_w(ω̂)), the block at the final peak ω̂ rebuilt from `w`
with gradient. At a local maximum in ω, ∂σ₁/∂ω = 0, so by the envelope theorem this is the
derivative of the bound wherever the peak is unique and σ₁ simple. Dividing a weight by it gives
a weight whose bound is 1 (the bound is positively homogeneous: every decision of the search
compares scale-free ratios).

Cost (64→64 3×3, He-init): the taps, 300–800 Cholesky factorisations of 64×64 blocks
(He-init responses are flat: σ₁ varies by ~9 % over T², so most squares need n = 48–96 and
the squares near the peak n = 192–384) and a few dozen small eigendecompositions — numbers in
benchmarks/results/bound.md. That is one order of magnitude more than a conv forward on a
64×64 map: every certified corner costs a factorisation of an m×m block (no certificate of
λ_max(H) ≤ τ below O(m³) is known), and the lattice argument needs a few hundred corners on a
flat landscape — the n₀ level alone is 146 corners, ~1.4 forward passes of factorisations at
m = 64. Kernels with a pronounced peak (trained ones) clear most of T² at n₀. A model's
certificate searches its kernels together (above): about half the time of one search per kernel
for the default 32-channel model.
"""

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from recstab.norms.spectra import _blocks, check_kernel_and_n

ROUNDING = 1e-9   # relative margin added for floating-point rounding (float64 SVD/eigh: ~1e-13)
RTOL = 5e-4       # default: the bound is at most (1 + RTOL)·S (and at least S)
METHODS = ("adaptive", "svd")
_CANDIDATES = 3   # coarse corners the peak search climbs from
_CLIMB_STEPS = 8  # Newton steps of the peak search
_FLOAT32_VALUE = 1e-5  # relative error allowed for a float32 top eigenvalue of a formed block (~m·u₃₂)
_MAX_DOUBLINGS = 24


def _check(weight: torch.Tensor, n, rtol) -> int:
    """Validate the inputs; return the degree d₁ + d₂."""
    if isinstance(n, bool) or not (n is None or isinstance(n, int)):
        raise ValueError(f"n must be an int (the lattice resolution), got {n!r}")
    check_kernel_and_n(weight, 1 if n is None else n)
    kh, kw = weight.shape[-2:]
    degree = (kh - 1) + (kw - 1)
    if n is not None and n > 2 ** 16:
        raise ValueError(f"n={n} is too large for the coarsest lattice; valid: {degree + 1} <= n <= 65536")
    if n is not None and n <= degree:
        raise ValueError(f"n={n} is too small for the {kh}×{kw} kernel: the bound needs "
                         f"n > (kh − 1) + (kw − 1) = {degree}; valid: n >= {degree + 1}")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 < rtol <= 0.1:
        raise ValueError(f"rtol (relative tightness of the bound) must be in (0, 0.1], got {rtol!r}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite entries (nan or inf); no finite bound exists")
    return degree


def _unit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


class GramTaps:
    """H_k(ω) = K̂_k(ω)ᴴK̂_k(ω) for a batch of kernels k of one shape, on the smaller channel side, as matrix
    trigonometric polynomials.

    H(ω) = L₀ + Σ_{δ ∈ half} [cos(ω·δ)·(L_δ + L_δᵀ) − i·sin(ω·δ)·(L_δ − L_δᵀ)], L_δ = Σ_{s−t=δ} K_tᵀK_s,
    half = the offsets with δ₁ > 0 or (δ₁ = 0, δ₂ > 0). Built in float64 from one batched product of tap matrices.
    """

    def __init__(self, weights: list[torch.Tensor]):
        w = [weight.detach().to(device="cpu", dtype=torch.float64) for weight in weights]
        # K̂ᵀ has the same singular values: H is min(c_in, c_out) square
        w = torch.stack([k.transpose(0, 1) if k.shape[1] > k.shape[0] else k for k in w])
        batch, c_out, m, kh, kw = w.shape
        self.batch, self.m, self.kh, self.kw = batch, m, kh, kw
        self.degrees = (kh - 1, kw - 1)
        taps = kh * kw
        kernels = w.permute(0, 3, 4, 1, 2).reshape(batch, taps, c_out, m)     # K_t, t = a·kw + b
        offsets, pairs_t, pairs_s, bins = [], [], [], []
        for d1 in range(0, kh):                                              # δ = 0 and the half-plane
            for d2 in range(-(kw - 1), kw):
                if d1 == 0 and d2 < 0:
                    continue
                for a in range(max(0, -d1), min(kh, kh - d1)):
                    for b in range(max(0, -d2), min(kw, kw - d2)):
                        pairs_t.append(a * kw + b)
                        pairs_s.append((a + d1) * kw + (b + d2))
                        bins.append(len(offsets))
                offsets.append((d1, d2))
        products = kernels[:, pairs_t].transpose(-1, -2) @ kernels[:, pairs_s]   # K_tᵀ K_s for the pairs needed
        taps_L = torch.zeros(batch, len(offsets), m, m, dtype=torch.float64).index_add_(1, torch.tensor(bins),
                                                                                       products)
        zero = (taps_L[:, :1] + taps_L[:, :1].mT) / 2                        # L₀ (symmetric)
        sym, anti = taps_L[:, 1:] + taps_L[:, 1:].mT, taps_L[:, 1:] - taps_L[:, 1:].mT
        count = len(offsets)
        self.offsets = torch.tensor(offsets[1:], dtype=torch.float64).reshape(-1, 2)
        real64 = torch.cat([zero, sym], 1).reshape(batch, count, m * m)
        imag64 = (-anti).reshape(batch, count - 1, m * m)
        self._complex = (sym.to(torch.complex128), anti.to(torch.complex128))   # for the slopes
        norms = real64.norm(dim=2).sum(1) + imag64.norm(dim=2).sum(1)
        tap_error = 2 * count * (c_out + taps + 2) * _unit(torch.float64) * w.pow(2).sum((1, 2, 3, 4))  # float64 taps
        self._form_error = {dt: (count + 4) * _unit(dt) * norms * 1.01 + tap_error
                            for dt in (torch.float32, torch.float64)}
        # one stack per kernel for one GEMM: rows (1, cos ω·δ, sin ω·δ) → the interleaved (re, im) pairs of H
        combined = torch.zeros(batch, 2 * count - 1, m * m, 2, dtype=torch.float64)
        combined[:, :count, :, 0] = real64
        combined[:, count:, :, 1] = imag64
        self._stacks = {(torch.float64, 1): combined.reshape(batch, 2 * count - 1, 2 * m * m)}

    def stack(self, dtype: torch.dtype, sign: int = 1) -> torch.Tensor:
        if (dtype, sign) not in self._stacks:
            self._stacks[dtype, sign] = (sign * self._stacks[torch.float64, 1]).to(dtype)
        return self._stacks[dtype, sign]

    def form_error(self, dtype: torch.dtype) -> torch.Tensor:
        """Per kernel, a bound of ‖H̃(ω) − H(ω)‖₂ for H̃ formed in `dtype` (any ω)."""
        return self._form_error[dtype]

    def _coefficients(self, omega: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        phase = omega @ self.offsets.T                                          # P × D
        ones = torch.ones(len(omega), 1, dtype=torch.float64)
        return torch.cat([ones, phase.cos(), phase.sin()], 1).to(dtype)

    def gram_all(self, omega: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """H of every kernel at the frequencies `omega` (P × 2, radians): batch × P × m × m, complex."""
        coefficients, stacks = self._coefficients(omega, dtype), self.stack(dtype)
        pairs = torch.empty(self.batch, len(omega), stacks.shape[-1], dtype=dtype)   # batch × P × 2m²
        for k, stack in enumerate(stacks):
            torch.matmul(coefficients, stack, out=pairs[k])
        return torch.view_as_complex(pairs.view(self.batch, len(omega), self.m, self.m, 2))

    def gram(self, kernel: torch.Tensor, omega: torch.Tensor, dtype: torch.dtype = torch.float32,
             sign: int = 1) -> torch.Tensor:
        """sign·H_kernel[j](omega[j]) for the pairs j (kernel: P indices, omega: P × 2): P × m × m, complex.
        The search passes the kernel indices grouped (ascending), so each kernel costs one matrix product."""
        coefficients = self._coefficients(omega, dtype)
        stack = self.stack(dtype, sign)
        kernels, counts = torch.unique_consecutive(kernel, return_counts=True)   # runs of one kernel: one GEMM each
        pairs = torch.empty(len(omega), stack.shape[-1], dtype=dtype)
        for k, rows, out in zip(kernels.tolist(), coefficients.split(counts.tolist()), pairs.split(counts.tolist())):
            torch.matmul(rows, stack[k], out=out)
        return torch.view_as_complex(pairs.view(len(omega), self.m, self.m, 2))

    def slopes(self, kernel: torch.Tensor, omega: torch.Tensor, vectors: torch.Tensor):
        """For the top eigenvectors v (last columns of `vectors`, P × m × m complex128) of H_kernel(ω): vᴴ∂_jH v
        (P × 2), vᴴ∂_j∂_kH v (P × 2 × 2) and the couplings v_iᴴ∂_jH v (P × 2 × m)."""
        phase = omega @ self.offsets.T                                          # P × D
        v = vectors[..., -1]
        sym, anti = self._complex
        if self.batch > 1:
            sym, anti = sym[kernel], anti[kernel]
        ys = (sym @ v[:, None, :, None])[..., 0]                                # P × D × m: S_δ v
        ya = (anti @ v[:, None, :, None])[..., 0]                               # A_δ v
        ts, ta = ys @ v.conj()[:, :, None], ya @ v.conj()[:, :, None]           # P × D × 1: vᴴS_δv, vᴴA_δv
        sin, cos = phase.sin()[..., None].to(torch.complex128), phase.cos()[..., None].to(torch.complex128)
        d = self.offsets.to(torch.complex128)                                   # D × 2
        first = (-sin * d).mT @ ys + (-1j * cos * d).mT @ ya                    # P × 2 × m: ∂_jH v
        grad = (first @ v.conj()[:, :, None])[..., 0].real
        second = (((-cos * ts + 1j * sin * ta) * d).mT @ d).real                 # Σ_δ δ_j δ_k (…)
        return grad, second, first @ vectors.conj()                             # couplings: (v_iᴴ∂_jH v)


def certify(minus_H: torch.Tensor, tau: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """True where λ_max(H_exact) ≤ τ is proven by a Cholesky factorisation of s·I − H̃ (H̃ formed in the precision
    of `minus_H` = −H̃, which is overwritten, within `error` of H; margins in the module docstring, section 3).
    minus_H: P × m × m complex; τ, error: P float64."""
    dtype = minus_H.real.dtype
    m = minus_H.shape[-1]
    u = _unit(dtype)
    g = 4 * (m + 2) * u
    diagonal = minus_H.diagonal(dim1=-2, dim2=-1).real
    trace = -diagonal.sum(-1).double()
    trace_a = (m * tau - trace + m * error).clamp_min(0)
    shift = tau - error - u * (tau + trace.abs()) - g * trace_a / (1 - g)
    diagonal.add_(shift.to(dtype)[:, None])
    ok = torch.linalg.cholesky_ex(minus_H).info == 0
    return ok & (shift > 0)


def _eig(gram: GramTaps, kernel: torch.Tensor, omega: torch.Tensor, dtype: torch.dtype):
    values, vectors = torch.linalg.eigh(gram.gram(kernel, omega, dtype))
    return values.double(), vectors.to(torch.complex128)


@dataclass
class _Move:
    """One start's proposed step in the climb: where it starts, the step, its weighted length, whether it is a
    Newton step, and the value it must not fall below."""

    start: int
    step: tuple[float, float]
    reach: float
    newton: bool
    value: float


def _newton_step(grad, hess, top: float, free, weight) -> tuple[tuple[float, float], bool]:
    """The climb's step from one point (plain floats): Newton's where the Hessian is negative definite (a
    maximum's basin), else a step of weighted length 0.2 along the gradient, or, where the gradient vanishes (a
    saddle or a minimum, e.g. a self-conjugate ω), of 0.05 along the direction of upward curvature."""
    (g1, g2), ((a, b), (_, c)) = grad, hess
    curvature = (a + c) / 2 + math.sqrt((a - c) ** 2 / 4 + b * b)          # the larger eigenvalue of the 2×2
    if curvature < 0:
        determinant = a * c - b * b
        return (-(c * g1 - b * g2) / determinant, -(a * g2 - b * g1) / determinant), True
    slope = abs(g1) * weight[0] + abs(g2) * weight[1]
    if slope > 1e-9 * top:
        return (g1 * 0.2 / slope, g2 * 0.2 / slope), False
    up = (curvature - c, b) if a >= c else (b, curvature - a)                # its eigenvector
    up = (up[0] * free[0], up[1] * free[1]) if up != (0.0, 0.0) else (free[0], 0.0)
    length = abs(up[0]) * weight[0] + abs(up[1]) * weight[1] + 1e-300
    return (up[0] * 0.05 / length, up[1] * 0.05 / length), False


def climb(gram: GramTaps, kernel: torch.Tensor, omega: torch.Tensor, steps: int = _CLIMB_STEPS,
          polish: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local maxima of λ_max(H_kernel[j](ω)) from the starts `omega` (P × 2), all climbed at once by Newton's method:
    (ω̂ P × 2, λ_max(H(ω̂)) P, eigendecompositions per start P). Gradient v₁ᴴ∂H v₁, Hessian v₁ᴴ∂²H v₁ +
    2 Σ_{i>1} Re(v₁ᴴ∂_jH v_i · v_iᴴ∂_kH v₁)/(λ₁ − λ_i) (perturbation theory); backtracking; saddles (e.g. a
    self-conjugate ω) left along the upward curvature. complex64 first, then (polish) complex128 to ω̂ within ~1e-9."""
    d1, d2 = gram.degrees
    free_axes, degrees = (float(d1 > 0), float(d2 > 0)), (float(d1), float(d2))
    free = torch.tensor(free_axes, dtype=torch.float64)
    omega = omega.clone().double()
    count = torch.zeros(len(omega), dtype=torch.long)
    for dtype in (torch.float32, torch.float64) if polish else (torch.float32,):
        values, vectors = _eig(gram, kernel, omega, dtype)
        count += 1
        converged, noise = (1e-5, 1e-6) if dtype == torch.float32 else (1e-9, 1e-13)
        active = list(range(len(omega)))
        for _ in range(2 * steps):
            if not active:
                break
            rows = torch.tensor(active)
            top = values[rows, -1]
            grad, second, coupling = gram.slopes(kernel[rows], omega[rows], vectors[rows])
            grad = grad * free
            inverse_gaps = torch.zeros_like(values[rows])
            inverse_gaps[:, :-1] = 1 / (top[:, None] - values[rows, :-1]).clamp_min(1e-300)
            hess = second + 2 * ((coupling * inverse_gaps[:, None]) @ coupling.mH).real  # + 2 Σ_i Re(c_ji c̄_ki)/gap_i
            hess = hess * free[:, None] * free[None, :] - torch.diag(1 - free)
            pending = []   # the starts that move, until a trial step is accepted
            for start, g, h, value in zip(active, grad.tolist(), hess.tolist(), top.tolist()):
                step, newton = _newton_step(g, h, value, free_axes, degrees)
                reach = abs(step[0]) * degrees[0] + abs(step[1]) * degrees[1]
                if reach > 0.5:
                    step, reach = (step[0] * 0.5 / reach, step[1] * 0.5 / reach), 0.5
                if reach >= converged:
                    pending.append(_Move(start, step, reach, newton, value))
            active = [move.start for move in pending]
            for attempt in range(3):
                if not pending:
                    break
                starts = torch.tensor([move.start for move in pending])
                trial = omega[starts] + torch.tensor([move.step for move in pending], dtype=torch.float64)
                trial_values, trial_vectors = _eig(gram, kernel[starts], trial, dtype)
                count[starts] += 1
                accept = [top_value > move.value * (1 - noise) or (move.newton and move.reach < 0.05)
                          for move, top_value in zip(pending, trial_values[:, -1].tolist())]
                taken = torch.tensor(accept)
                omega[starts[taken]] = trial[taken]
                values[starts[taken]], vectors[starts[taken]] = trial_values[taken], trial_vectors[taken]
                pending = [move for move, ok in zip(pending, accept) if not ok]
                for move in pending:   # a first rejected gradient step turns round, any other shrinks
                    turn = attempt == 0 and not move.newton
                    move.step = (-move.step[0], -move.step[1]) if turn else (move.step[0] / 4, move.step[1] / 4)
            stuck = {move.start for move in pending}   # three rejected trials: this precision is done for that start
            active = [start for start in active if start not in stuck]
    return omega, values[:, -1], count


@dataclass
class Certificate:
    """What the search proved: S ≤ `bound` (float), with S ≥ `peak` = σ₁ at `omega` (radians)."""

    bound: float
    peak: float
    omega: tuple[float, float]
    tests: int        # Cholesky certificates
    exact: int        # eigenvalue evaluations (peak search)
    levels: tuple     # the lattice resolutions visited


_CACHE: "OrderedDict[tuple, Certificate]" = OrderedDict()   # the last certificates, by kernel value
_CACHE_SIZE = 1024


def certified_peak(weight: torch.Tensor, n: int | None = None, rtol: float = RTOL) -> Certificate:
    """Run the certified search of the module docstring (section 2) on `weight`; no gradient.

    The search is a deterministic function of the kernel's values: the last certificates are kept (a model's
    certificate, or a training step that bounds the same kernel twice, does not search twice)."""
    return certified_peaks([weight], n, rtol)[0]


def certified_peaks(weights, n: int | None = None, rtol: float = RTOL) -> list[Certificate]:
    """`certified_peak` of several kernels, searched together: kernels of one shape share every step of the search
    (one batched factorisation per level for all of them), which is what makes a model's certificate fast."""
    weights = list(weights)
    for weight in weights:
        _check(weight, n, rtol)
    keys = []
    for weight in weights:
        w = weight.detach().to("cpu")
        digest = hashlib.blake2b(w.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), digest_size=16)
        keys.append((tuple(w.shape), w.dtype, n, rtol, digest.digest()))
    found: dict[tuple, Certificate] = {}
    groups: dict[tuple, dict[tuple, torch.Tensor]] = {}   # kernels to search, by shape (c_out, c_in on H's side)
    for key, weight in zip(keys, weights):
        if key in found:
            continue
        if key in _CACHE:
            found[key] = _CACHE[key]
        elif not weight.detach().abs().max() > 0:
            found[key] = Certificate(0.0, 0.0, (0.0, 0.0), 0, 0, ())
        else:
            shape = (max(weight.shape[:2]), min(weight.shape[:2]), *weight.shape[-2:])
            groups.setdefault(shape, {})[key] = weight
    for members in groups.values():
        found.update(zip(members, _search(list(members.values()), n, rtol)))
    for key in keys:
        _CACHE[key] = found[key]
        _CACHE.move_to_end(key)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return [found[key] for key in keys]


def _search(weights: list[torch.Tensor], n: int | None, rtol: float) -> list[Certificate]:
    """The certified search (module docstring, section 2) of non-zero kernels of one shape, all at once."""
    gram = GramTaps(weights)
    batch = gram.batch
    d1, d2 = gram.degrees
    degree = d1 + d2
    if degree == 0:  # 1×1: K̂ is constant
        H = gram.gram_all(torch.zeros(1, 2, dtype=torch.float64), torch.float64)[:, 0]
        values = torch.linalg.eigvalsh(H)[:, -1]
        slack = 10 * gram.m * _unit(torch.float64) * torch.view_as_real(H).pow(2).sum((-3, -2, -1)).sqrt()
        sigma = (values + slack + gram.form_error(torch.float64)).clamp_min(0).sqrt().tolist()
        return [Certificate(s * (1 + ROUNDING), s, (0.0, 0.0), 0, 1, ()) for s in sigma]
    n0 = n if n is not None else 6 * degree
    n0 += n0 % 2                                          # the checkerboard needs an even n
    doublings = min(_MAX_DOUBLINGS, (62 - batch.bit_length()) // 2 - n0.bit_length())  # keys fit in int64
    resolution = n0 << doublings
    area = resolution * resolution                        # keys: kernel·area + p·resolution + q

    def key(cells: torch.Tensor, i: int | torch.Tensor, j: int, level: int) -> torch.Tensor:
        """Global keys of the points (p + i, q + j) of the level-n lattice for the cells (kernel, p, q)."""
        scale = resolution // level
        p, q = ((cells[:, 1] + i) * scale) % resolution, ((cells[:, 2] + j) * scale) % resolution
        if d1 == 0:
            p = torch.zeros_like(p)
        if d2 == 0:
            q = torch.zeros_like(q)
        mirror_p, mirror_q = (-p) % resolution, (-q) % resolution
        use_mirror = (mirror_q < q) | ((mirror_q == q) & (mirror_p < p))
        p, q = torch.where(use_mirror, mirror_p, p), torch.where(use_mirror, mirror_q, q)
        return cells[:, 0] * area + p * resolution + q

    def kernel_of(keys: torch.Tensor) -> torch.Tensor:
        return keys // area

    def omega_of(keys: torch.Tensor) -> torch.Tensor:
        local = keys % area
        return torch.stack([local // resolution, local % resolution], 1).double() * (2 * math.pi / resolution)

    rows = n0 // 2 if d2 > 0 else 1                       # ω₂ ∈ [0, π] (or ω₂ irrelevant)
    cols = n0 if d1 > 0 else 1
    k, p, q = torch.meshgrid(torch.arange(batch), torch.arange(cols), torch.arange(rows), indexing="ij")
    cells = torch.stack([k.flatten(), p.flatten(), q.flatten()], 1)

    # a first lower bound L per kernel: climb from the best of the coarse corners ranked by ‖H‖_F = (Σλ²)^½
    first = cells[cells[:, 0] == 0]
    local_keys = torch.unique(torch.cat([key(first, i, j, n0) for i in (0, 1) for j in (0, 1)]))
    corners = len(local_keys)
    coarse_keys = (torch.arange(batch)[:, None] * area + local_keys[None]).flatten()   # sorted
    coarse = gram.gram_all(omega_of(local_keys), torch.float32)                          # batch × corners × m × m
    frobenius = torch.linalg.vector_norm(torch.view_as_real(coarse), dim=(2, 3, 4))
    top = frobenius.topk(min(4 * _CANDIDATES, corners), dim=1).indices                 # batch × 12
    values = torch.linalg.eigvalsh(coarse[torch.arange(batch)[:, None], top])[..., -1]
    best = top[torch.arange(batch), values.argmax(1)]
    everyone = torch.arange(batch)
    omega, lam, count = climb(gram, everyone, omega_of(local_keys[best]), polish=False)
    count += top.shape[1]
    coarse = coarse.reshape(batch * corners, gram.m, gram.m)
    # lowered by the float32 error: L stays below σ₁² at ω, and so below the final peak
    state = {"lam": lam * (1 - _FLOAT32_VALUE), "omega": omega, "exact": count,
             "tests": torch.zeros(batch, dtype=torch.long)}
    # what is proven per corner (keys sorted): the smallest τ with λ_max ≤ τ, the largest τ below λ_max
    book = {"keys": coarse_keys, "passed": torch.full((len(coarse_keys),), math.inf, dtype=torch.float64),
            "failed": torch.full((len(coarse_keys),), -math.inf, dtype=torch.float64)}
    fresh_coarse = [True]                                  # the coarse blocks are reused by the first tests
    chunk_size = min(256, max(16, 2 ** 18 // gram.m ** 2))   # blocks formed and factorised at a time
    # float32 tests carry a relative margin (module docstring, section 3): float64 where the thresholds come within
    # a few margins of γ² (the fine levels); float32 where a spurious failure only costs a refinement
    trace = coarse.diagonal(dim1=-2, dim2=-1).real.sum(-1).double().view(batch, corners)
    g32 = 4 * (gram.m + 2) * _unit(torch.float32)
    margin32 = (g32 * (gram.m - trace / state["lam"].clamp_min(1e-300)[:, None]).clamp_min(0)).amax(1) * 1.1 + 1e-6

    def gamma() -> torch.Tensor:
        return state["lam"].clamp_min(0).sqrt() * (1 + rtol)

    def index_of(keys: torch.Tensor) -> torch.Tensor:
        """Positions of `keys` (unique) in the book, adding the new ones."""
        where = torch.searchsorted(book["keys"], keys).clamp(max=len(book["keys"]) - 1)
        new = keys[book["keys"][where] != keys]
        if len(new):
            merged, order = torch.sort(torch.cat([book["keys"], new]))
            grow = torch.full((len(new),), math.inf, dtype=torch.float64)
            book["keys"] = merged
            book["passed"] = torch.cat([book["passed"], grow])[order]
            book["failed"] = torch.cat([book["failed"], -grow])[order]
            where = torch.searchsorted(book["keys"], keys)
        return where

    def run(keys: torch.Tensor, tau: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        """Verdicts λ_max(H) ≤ τ for `keys` (unique, sorted; τ per key), from the book or from new Cholesky
        certificates (float64 where `exact`, else float32)."""
        where = index_of(keys)
        verdict = book["passed"][where] <= tau
        pending = ~verdict & (book["failed"][where] < tau)
        for dtype, rows in ((torch.float32, pending & ~exact), (torch.float64, pending & exact)):
            if not rows.any():
                continue
            todo, kernels = where[rows], kernel_of(keys[rows])
            reuse = fresh_coarse[0] and dtype == torch.float32   # the first level: exactly the coarse corners

            def minus_H(chunk_keys, chunk_kernels):
                if reuse:
                    return -coarse[torch.searchsorted(coarse_keys, chunk_keys)]
                return gram.gram(chunk_kernels, omega_of(chunk_keys), dtype, -1)
            # formed (or gathered) and factorised a chunk at a time: the blocks stay in cache in between
            ok = torch.cat([certify(minus_H(chunk_keys, chunk), chunk_tau, gram.form_error(dtype)[chunk])
                            for chunk, chunk_keys, chunk_tau in zip(kernels.split(chunk_size),
                                                                    keys[rows].split(chunk_size),
                                                                    tau[rows].split(chunk_size))])
            state["tests"] += torch.bincount(kernels, minlength=batch)
            margin = margin32[kernels] if dtype == torch.float32 else torch.full_like(tau[rows], 1e-9)
            book["passed"][todo[ok]] = torch.minimum(book["passed"][todo[ok]], tau[rows][ok])
            book["failed"][todo[~ok]] = torch.maximum(book["failed"][todo[~ok]], (tau[rows] * (1 - margin))[~ok])
            verdict[rows] = ok
        fresh_coarse[0] = False
        return verdict

    def raise_peak(candidates: torch.Tensor) -> torch.Tensor:
        """Corners (sorted keys) that failed λ_max ≤ γ²: their values raise L (climbing to a local peak when L
        jumps). The kernels whose L rose (batch, bool)."""
        kernels = kernel_of(candidates)
        rank = torch.arange(len(candidates)) - torch.searchsorted(kernels, kernels)   # position within its kernel
        candidates, kernels = candidates[rank < 4 * _CANDIDATES], kernels[rank < 4 * _CANDIDATES]
        omega = omega_of(candidates)
        values = torch.linalg.eigvalsh(gram.gram(kernels, omega, torch.float32)).double()[:, -1]
        state["exact"] += torch.bincount(kernels, minlength=batch)
        raised = torch.zeros(batch, dtype=torch.bool)
        climbers, starts = [], []
        for k in torch.unique(kernels).tolist():
            rows = (kernels == k).nonzero()[:, 0]
            row = rows[values[rows].argmax()]
            value = float(values[row])
            if value <= float(state["lam"][k]) * (1 + 1e-9):
                continue
            raised[k] = True
            if value > float(state["lam"][k]) * (1 + rtol) ** 2:  # a different peak: climb it now (γ right next)
                climbers.append(k)
                starts.append(omega[row])
            else:
                state["lam"][k], state["omega"][k] = value * (1 - _FLOAT32_VALUE), omega[row]
        if climbers:
            climbers = torch.tensor(climbers)
            peaks, values, count = climb(gram, climbers, torch.stack(starts), polish=False)
            state["exact"][climbers] += count
            state["lam"][climbers], state["omega"][climbers] = values * (1 - _FLOAT32_VALUE), peaks
        return raised

    level = n0
    levels: list[list[int]] = [[] for _ in range(batch)]
    while len(cells):
        for k in torch.unique(cells[:, 0]).tolist():
            levels[k].append(level)
        if level > n0 << doublings - 1:
            raise RuntimeError("certified_peak: the search did not converge (please report this kernel)")
        factor = math.cos(math.pi * degree / (2 * level))
        final = (1 + rtol) * factor >= 1 + rtol / 2
        exact = (1 - factor) < 2 * margin32                # per kernel: float64 tests at this level
        parity = (cells[:, 1] + cells[:, 2]) % 2
        corners = torch.cat([key(cells, parity, 0, level), key(cells, 1 - parity, 1, level)])
        unique, inverse = torch.unique(corners, return_inverse=True)
        owner = kernel_of(unique)
        verdict = torch.zeros(len(unique), dtype=torch.bool)
        testing = torch.ones(len(unique), dtype=torch.bool)   # the corners of the kernels still testing this level
        while True:
            keys, kernels = unique[testing], owner[testing]
            verdict[testing] = passed = run(keys, (gamma()[kernels] * factor) ** 2, exact[kernels])
            losers = keys[~passed]
            if not len(losers):
                break
            # is a failing corner above γ itself? Then L was not the maximum: raise it and redo the level.
            kernels = kernel_of(losers)
            above = losers[~run(losers, gamma()[kernels] ** 2, torch.full((len(losers),), final))]
            if not len(above):
                break
            raised = raise_peak(above)
            if final and not raised[kernel_of(above)].all():
                raise RuntimeError("certified_peak: a corner above the bound did not raise it (please report)")
            if not raised.any():
                break
            testing = raised[owner]
        failing = (~verdict[inverse]).view(2, -1).any(0)
        cells = cells[failing]
        cells = torch.cat([torch.stack([cells[:, 0], 2 * cells[:, 1] + i, 2 * cells[:, 2] + j], 1)
                           for i in (0, 1) for j in (0, 1)])
        level *= 2
    proven = gamma()
    omega, lam, count = climb(gram, everyone, state["omega"])   # the peaks ω̂ (the differentiable bound's block), float64
    state["exact"] += count
    certificates = []
    for k in range(batch):
        sigma = math.sqrt(max(float(lam[k]), 0.0))
        # the proof is S ≤ γ = (1 + rtol)·√L, and L ≤ σ₁(K̂(ω̂))²: the bound below is at least γ
        bound = sigma * (1 + rtol) * (1 + ROUNDING)
        if bound < float(proven[k]):   # cannot happen (the float64 climb starts at L's ω, only ascends); never below
            bound = float(proven[k]) * (1 + ROUNDING)
        certificates.append(Certificate(bound, sigma, (float(omega[k, 0]), float(omega[k, 1])),
                                        int(state["tests"][k]), int(state["exact"][k]), tuple(levels[k])))
    return certificates


def lattice_svd_bound(weight: torch.Tensor, n: int = 64) -> float:
    """The full-lattice bound of section 1: σ₁ of every block of Λ_n (SVDs), times 1/cos(π(d₁+d₂)/(2n)).

    At most 1/cos(π(kh + kw − 2)/(2n)) above S (1.0048 for a 3×3 at n = 64). Kept for comparison.
    """
    degree = _check(weight, n, RTOL)
    w = weight.detach().to(torch.float64).cpu()
    p, q = torch.meshgrid(torch.arange(n), torch.arange(n // 2 + 1), indexing="ij")  # q <= n/2: conjugate symmetry
    keep = ((p + q) % 2 == 0) if n % 2 == 0 else torch.ones_like(p, dtype=torch.bool)
    blocks = _blocks(w, n)[keep]                                # K̂(λ) = Σ_ab K_ab e^{-iθ_ab(λ)}, tall
    top = torch.linalg.svdvals(blocks)[:, 0].max().item()
    return top / math.cos(math.pi * degree / (2 * n)) * (1 + ROUNDING)


def response(weight: torch.Tensor, omega: tuple[float, float]) -> torch.Tensor:
    """K̂(ω) = Σ_ab K_ab e^{-i(ω₁a + ω₂b)} (c_out × c_in, complex128), differentiable in `weight`."""
    kh, kw = weight.shape[-2:]
    a = torch.arange(kh, dtype=torch.float64, device=weight.device)[:, None]
    b = torch.arange(kw, dtype=torch.float64, device=weight.device)[None, :]
    phase = torch.exp(-1j * (omega[0] * a + omega[1] * b))
    return (weight.to(torch.complex128) * phase).sum(dim=(-2, -1))


def conv_norm_bound_tensor(weight: torch.Tensor, n: int | None = None, rtol: float = RTOL) -> torch.Tensor:
    """`conv_norm_bound(weight)` as a differentiable 0-dim float64 tensor (the same value).

    (1 + rtol)(1 + ROUNDING)·σ₁(K̂(ω̂)) with the certified search's peak ω̂ held fixed: the gradient is
    that of the bound wherever the peak is unique (envelope theorem, module docstring section 4).
    """
    cert = certified_peak(weight, n, rtol)
    sigma = torch.linalg.svd(response(weight, cert.omega), full_matrices=False)[1][0]  # one routine, grad or not
    scale = 1.0 if sum(weight.shape[-2:]) == 2 else 1 + rtol
    value = sigma * (scale * (1 + ROUNDING))
    if float(value.detach()) < cert.bound:   # rounding of the two computations of σ₁: never below the proof
        value = value * (cert.bound / float(value.detach()))
    return value


def kernels_bounded_by(run) -> list[torch.Tensor]:
    """The kernels `run(conv_norm)` asks `conv_norm` to bound (each answered with 1): what a certificate rule needs
    proved, to be proved together by `certified_peaks` before the rule runs on the real bounds."""
    kernels = []

    def record(weight: torch.Tensor) -> float:
        kernels.append(weight.detach())
        return 1.0

    run(record)
    return kernels


def conv_norm_bounds(weights, n: int | None = None, rtol: float = RTOL) -> list[float]:
    """`conv_norm_bound` of several kernels (method "adaptive"), searched together: the same numbers, in about half
    the time for a model's worth of 32-channel kernels (module docstring, section 2)."""
    return [cert.bound for cert in certified_peaks(weights, n, rtol)]


def conv_norm_bound(weight: torch.Tensor, n: int | None = None, method: str = "adaptive",
                    rtol: float = RTOL) -> float:
    """A float >= the operator norm of the stride-1 conv with kernel `weight`, on every input size,
    with zero padding (any amount) or circular padding.

    weight: c_out × c_in × kh × kw. method "adaptive" (default): the certified search, at most
    (1 + rtol)·sup_ω‖K̂(ω)‖ (n: its coarsest lattice, default 6(kh + kw − 2)). method "svd": the full
    lattice of SVDs at resolution n (default 64), at most 1/cos(π(kh + kw − 2)/(2n)) above.
    Derivation in the module docstring.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method == "svd":
        return lattice_svd_bound(weight, 64 if n is None else n)
    with torch.no_grad():
        return float(conv_norm_bound_tensor(weight.detach(), n, rtol))
