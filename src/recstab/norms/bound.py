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
flat landscape. Kernels with a pronounced peak (trained ones) clear most of T² at n₀.
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
    """H(ω) = K̂(ω)ᴴK̂(ω) on the smaller channel side, as a matrix trigonometric polynomial.

    H(ω) = L₀ + Σ_{δ ∈ half} [cos(ω·δ)·(L_δ + L_δᵀ) − i·sin(ω·δ)·(L_δ − L_δᵀ)], L_δ = Σ_{s−t=δ} K_tᵀK_s,
    half = the offsets with δ₁ > 0 or (δ₁ = 0, δ₂ > 0). Built in float64 from one Gram matrix.
    """

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().to(device="cpu", dtype=torch.float64)
        if w.shape[1] > w.shape[0]:
            w = w.transpose(0, 1)  # K̂ᵀ has the same singular values; H is then min(c_in, c_out) square
        c_out, m, kh, kw = w.shape
        self.m, self.kh, self.kw = m, kh, kw
        self.degrees = (kh - 1, kw - 1)
        taps = kh * kw
        kernels = w.permute(2, 3, 0, 1).reshape(taps, c_out, m)              # K_t, t = a·kw + b
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
        products = kernels[pairs_t].transpose(1, 2) @ kernels[pairs_s]       # K_tᵀ K_s for the pairs needed
        taps_L = torch.zeros(len(offsets), m, m, dtype=torch.float64).index_add_(0, torch.tensor(bins), products)
        zero = (taps_L[0] + taps_L[0].T) / 2                                 # L₀ (symmetric)
        sym = [block + block.T for block in taps_L[1:]]
        anti = [block - block.T for block in taps_L[1:]]
        offsets = offsets[1:]
        self.offsets = torch.tensor(offsets, dtype=torch.float64).reshape(-1, 2)
        self.real64 = torch.stack([zero] + sym).reshape(1 + len(sym), m * m)
        self.imag64 = (-torch.stack(anti)).reshape(len(anti), m * m) if anti else torch.zeros(0, m * m,
                                                                                              dtype=torch.float64)
        norms = self.real64.norm(dim=1).sum() + self.imag64.norm(dim=1).sum()
        count = len(offsets) + 1
        tap_error = 2 * count * (c_out + taps + 2) * _unit(torch.float64) * w.pow(2).sum()  # float64 taps
        self._form_error = {dt: float((count + 4) * _unit(dt) * norms * 1.01 + tap_error)
                            for dt in (torch.float32, torch.float64)}
        # one stack for one GEMM: rows (1, cos ω·δ, sin ω·δ) → the interleaved (re, im) pairs of H
        combined = torch.zeros(1 + 2 * len(offsets), m * m, 2, dtype=torch.float64)
        combined[: 1 + len(offsets), :, 0] = self.real64
        combined[1 + len(offsets):, :, 1] = self.imag64
        self._stacks = {torch.float64: combined.reshape(len(combined), 2 * m * m)}

    def stack(self, dtype: torch.dtype, sign: int = 1) -> torch.Tensor:
        if (dtype, sign) not in self._stacks:
            self._stacks[dtype, sign] = (sign * self._stacks[torch.float64]).to(dtype)
        return self._stacks[dtype, sign]

    def form_error(self, dtype: torch.dtype) -> float:
        """A bound of ‖H̃(ω) − H(ω)‖₂ for H̃ formed in `dtype` (any ω)."""
        return self._form_error[dtype]

    def gram(self, omega: torch.Tensor, dtype: torch.dtype = torch.float32, sign: int = 1) -> torch.Tensor:
        """sign·H at the frequencies `omega` (P × 2, radians, float64): P × m × m, complex."""
        phase = omega @ self.offsets.T                                          # P × D
        ones = torch.ones(len(omega), 1, dtype=torch.float64)
        coefficients = torch.cat([ones, phase.cos(), phase.sin()], 1).to(dtype)
        pairs = coefficients @ self.stack(dtype, sign)                          # P × 2m²: (re, im) interleaved
        return torch.view_as_complex(pairs.view(len(omega), self.m, self.m, 2))

    def slopes(self, omega: torch.Tensor, vectors: torch.Tensor):
        """For the top eigenvector v (last column of `vectors`, complex128) of H(ω): vᴴ∂_jH v (2,),
        vᴴ∂_j∂_kH v (2 × 2) and the couplings v_iᴴ∂_jH v (2 × m)."""
        phase = self.offsets @ omega                                            # D
        v = vectors[:, -1]
        if "complex" not in self._stacks:
            self._stacks["complex"] = (self.real64[1:].view(-1, self.m, self.m).to(torch.complex128),
                                       -self.imag64.view(-1, self.m, self.m).to(torch.complex128))
        sym, anti = self._stacks["complex"]
        ys, ya = sym @ v, anti @ v                                              # D × m: S_δ v, A_δ v
        ts, ta = ys @ v.conj(), ya @ v.conj()                                   # vᴴS_δv, vᴴA_δv
        sin, cos = phase.sin().to(torch.complex128), phase.cos().to(torch.complex128)
        d = self.offsets.to(torch.complex128)                                   # D × 2
        first = (-(d * sin[:, None])).T @ ys + (-1j * (d * cos[:, None])).T @ ya   # 2 × m: ∂_jH v
        grad = (first @ v.conj()).real
        second = torch.empty(2, 2, dtype=torch.float64)
        for j in range(2):
            for k in range(j, 2):
                dk = d[:, j] * d[:, k]
                second[j, k] = second[k, j] = (dk * (-cos * ts + 1j * sin * ta)).sum().real
        return grad, second, first @ vectors.conj()                            # couplings: (v_iᴴ∂_jH v)


def certify(minus_H: torch.Tensor, tau: torch.Tensor, gram: GramTaps) -> torch.Tensor:
    """True where λ_max(H_exact) ≤ τ is proven by a Cholesky factorisation of s·I − H̃ (H̃ formed by `gram` in
    the precision of `minus_H` = −H̃, which is overwritten; margins in the module docstring, section 3).
    minus_H: P × m × m complex; τ: P float64."""
    dtype = minus_H.real.dtype
    m = minus_H.shape[-1]
    u = _unit(dtype)
    g = 4 * (m + 2) * u
    error = gram.form_error(dtype)
    diagonal = minus_H.diagonal(dim1=-2, dim2=-1).real
    trace = -diagonal.sum(-1).double()
    trace_a = (m * tau - trace + m * error).clamp_min(0)
    shift = tau - error - u * (tau + trace.abs()) - g * trace_a / (1 - g)
    diagonal.add_(shift.to(dtype)[:, None])
    ok = torch.linalg.cholesky_ex(minus_H).info == 0
    return ok & (shift > 0)


def top_eigenvalues(H64: torch.Tensor, gram: GramTaps) -> torch.Tensor:
    """λ_max of float64 blocks, raised by the rounding of forming and of eigvalsh (an upper bound)."""
    values = torch.linalg.eigvalsh(H64)[..., -1]
    slack = 10 * H64.shape[-1] * _unit(torch.float64) * torch.view_as_real(H64).pow(2).sum((-3, -2, -1)).sqrt()
    return values + slack + gram.form_error(torch.float64)


def climb(gram: GramTaps, omega: torch.Tensor, steps: int = _CLIMB_STEPS, polish: bool = True
          ) -> tuple[torch.Tensor, float, int]:
    """A local maximum of λ_max(H(ω)) from `omega` (2,) by Newton's method: (ω̂, λ_max(H(ω̂)), number of
    eigendecompositions). Gradient v₁ᴴ∂H v₁, Hessian v₁ᴴ∂²H v₁ + 2 Σ_{i>1} Re(v₁ᴴ∂_jH v_i · v_iᴴ∂_kH v₁)/(λ₁ − λ_i)
    (perturbation theory). complex64 first, then (polish) complex128 to ω̂ within ~1e-9."""
    d1, d2 = gram.degrees
    free = torch.tensor([d1 > 0, d2 > 0], dtype=torch.float64)
    weight = torch.tensor([d1, d2], dtype=torch.float64)
    precision = [torch.float32]

    def eig(at):
        values, vectors = torch.linalg.eigh(gram.gram(at[None], precision[0])[0])
        return values.double(), vectors.to(torch.complex128)

    omega = omega.clone().double()
    values, vectors = eig(omega)
    count = 1
    for _ in range(2 * steps):
        top = values[-1]
        grad, second, coupling = gram.slopes(omega, vectors)
        grad = grad * free
        inverse_gaps = torch.zeros_like(values)
        inverse_gaps[:-1] = 1 / (top - values[:-1]).clamp_min(1e-300)
        hess = second + 2 * ((coupling * inverse_gaps) @ coupling.mH).real      # + 2 Σ_i Re(c_ji conj c_ki)/gap_i
        hess = hess * free[:, None] * free[None, :] - torch.diag(1 - free)
        curvature, directions = torch.linalg.eigh(hess)
        newton = bool(curvature[-1] < 0)
        if newton:
            step = -torch.linalg.solve(hess, grad)
        elif float((grad.abs() * weight).sum()) > 1e-9 * float(top):
            step = grad * (0.2 / float((grad.abs() * weight).sum()))
        else:   # a saddle or a minimum (e.g. a self-conjugate ω): leave along the upward curvature
            step = directions[:, -1] * free * (0.05 / float((directions[:, -1].abs() * weight).sum() + 1e-300))
        reach = float((step.abs() * weight).sum())
        if reach > 0.5:
            step, reach = step * (0.5 / reach), 0.5
        noise = float(top) * (1e-6 if precision[0] == torch.float32 else 1e-13)
        if reach < (1e-5 if precision[0] == torch.float32 else 1e-9):
            if precision[0] == torch.float64 or not polish:
                break
            precision[0] = torch.float64          # converged in complex64: finish in complex128
            values, vectors = eig(omega)
            count += 1
            continue
        for attempt in range(3):
            trial = eig(omega + step)
            count += 1
            if trial[0][-1] > top - noise or (newton and reach < 0.05):   # small Newton steps near a maximum
                omega, (values, vectors) = omega + step, trial
                break
            step = -step if attempt == 0 and not newton else step / 4
        else:
            if precision[0] == torch.float64 or not polish:
                break
            precision[0] = torch.float64
            values, vectors = eig(omega)
            count += 1
    return omega, float(values[-1]), count


@dataclass
class Certificate:
    """What the search proved: S ≤ `bound` (float), with S ≥ `peak` = σ₁ at `omega` (radians)."""

    bound: float
    peak: float
    omega: tuple[float, float]
    tests: int        # Cholesky certificates
    exact: int        # float64 eigenvalue evaluations (peak search and final-level corners)
    levels: tuple     # the lattice resolutions visited


_CACHE: "OrderedDict[tuple, Certificate]" = OrderedDict()   # the last certificates, by kernel value
_CACHE_SIZE = 256


def certified_peak(weight: torch.Tensor, n: int | None = None, rtol: float = RTOL) -> Certificate:
    """Run the certified search of the module docstring (section 2) on `weight`; no gradient.

    The search is a deterministic function of the kernel's values: the last certificates are kept (a model's
    certificate, or a training step that bounds the same kernel twice, does not search twice)."""
    _check(weight, n, rtol)
    w = weight.detach().to("cpu")
    key = (tuple(w.shape), w.dtype, n, rtol, hashlib.blake2b(w.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), digest_size=16).digest())
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    cert = _search(w, n, rtol)
    _CACHE[key] = cert
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return cert


def _search(weight: torch.Tensor, n: int | None, rtol: float) -> Certificate:
    degree = _check(weight, n, rtol)
    if not weight.detach().abs().max() > 0:
        return Certificate(0.0, 0.0, (0.0, 0.0), 0, 0, ())
    gram = GramTaps(weight)
    d1, d2 = gram.degrees
    if degree == 0:  # 1×1: K̂ is constant
        value = float(top_eigenvalues(gram.gram(torch.zeros(1, 2, dtype=torch.float64), torch.float64), gram)[0])
        sigma = math.sqrt(max(value, 0.0))
        return Certificate(sigma * (1 + ROUNDING), sigma, (0.0, 0.0), 0, 1, ())
    n0 = n if n is not None else 6 * degree
    n0 += n0 % 2                                          # the checkerboard needs an even n
    resolution = n0 << _MAX_DOUBLINGS

    def key(p: torch.Tensor, q: torch.Tensor, level: int) -> torch.Tensor:
        scale = resolution // level
        p, q = (p * scale) % resolution, (q * scale) % resolution
        if d1 == 0:
            p = torch.zeros_like(p)
        if d2 == 0:
            q = torch.zeros_like(q)
        mirror_p, mirror_q = (-p) % resolution, (-q) % resolution
        use_mirror = (mirror_q < q) | ((mirror_q == q) & (mirror_p < p))
        p, q = torch.where(use_mirror, mirror_p, p), torch.where(use_mirror, mirror_q, q)
        return p * resolution + q

    def omega_of(keys: torch.Tensor) -> torch.Tensor:
        return torch.stack([keys // resolution, keys % resolution], 1).double() * (2 * math.pi / resolution)

    rows = n0 // 2 if d2 > 0 else 1                       # ω₂ ∈ [0, π] (or ω₂ irrelevant)
    cols = n0 if d1 > 0 else 1
    p, q = torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="ij")
    cells = torch.stack([p.flatten(), q.flatten()], 1)

    # a first lower bound L: the best Rayleigh quotient of the coarse corners after a few power iterations
    coarse_keys = torch.unique(torch.cat([key(cells[:, 0] + i, cells[:, 1] + j, n0) for i in (0, 1) for j in (0, 1)]))
    coarse_omega = omega_of(coarse_keys)
    coarse = gram.gram(coarse_omega, torch.float32)
    frobenius = torch.linalg.vector_norm(torch.view_as_real(coarse), dim=(1, 2, 3))  # ‖H‖_F = (Σλ²)^½ ranks them
    top = frobenius.topk(min(4 * _CANDIDATES, len(frobenius))).indices
    values = torch.linalg.eigvalsh(coarse[top]).double()[:, -1]   # their top eigenvalues; climb from the best
    omega, lam, count = climb(gram, coarse_omega[top[values.argmax()]], polish=False)
    lam *= 1 - _FLOAT32_VALUE    # float32 eigenvalues, lowered: L stays below σ₁² at ω, and so below the final peak
    state = {"lam": lam, "omega": omega, "tests": 0, "exact": len(top) + count}
    # what is proven per corner (keys sorted): the smallest τ with λ_max ≤ τ, the largest τ below λ_max
    book = {"keys": coarse_keys, "passed": torch.full((len(coarse_keys),), math.inf, dtype=torch.float64),
            "failed": torch.full((len(coarse_keys),), -math.inf, dtype=torch.float64)}
    fresh_coarse = [True]                                  # the coarse blocks are reused by the first tests
    # float32 tests carry a relative margin (module docstring, section 3): float64 where the thresholds come within
    # a few margins of γ² (the fine levels); float32 where a spurious failure only costs a refinement
    trace = coarse.diagonal(dim1=-2, dim2=-1).real.sum(-1).double()
    g32 = 4 * (gram.m + 2) * _unit(torch.float32)
    margin32 = float(g32 * (gram.m - trace / max(state["lam"], 1e-300)).clamp_min(0).max()) * 1.1 + 1e-6
    margins = {torch.float32: margin32, torch.float64: 1e-9}

    def gamma() -> float:
        return math.sqrt(max(state["lam"], 0.0)) * (1 + rtol)

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

    def run(keys: torch.Tensor, tau: float, dtype: torch.dtype) -> torch.Tensor:
        """Verdicts λ_max(H) ≤ τ for `keys` (unique), from the book or from new Cholesky certificates."""
        where = index_of(keys)
        verdict = book["passed"][where] <= tau
        pending = ~verdict & (book["failed"][where] < tau)
        if pending.any():
            todo = where[pending]
            if fresh_coarse[0] and dtype == torch.float32:  # the first level: exactly the coarse corners
                minus_H = -coarse[torch.searchsorted(coarse_keys, keys[pending])]
            else:
                minus_H = gram.gram(omega_of(keys[pending]), dtype, -1)
            ok = certify(minus_H, torch.full((len(minus_H),), tau, dtype=torch.float64), gram)
            state["tests"] += len(minus_H)
            book["passed"][todo[ok]] = book["passed"][todo[ok]].clamp(max=tau)
            book["failed"][todo[~ok]] = book["failed"][todo[~ok]].clamp(min=tau * (1 - margins[dtype]))
            verdict[pending] = ok
        fresh_coarse[0] = False
        return verdict

    def raise_peak(candidates: torch.Tensor) -> bool:
        """Corners that failed λ_max ≤ γ²: their values raise L (climbing to a local peak when L jumps); True if
        L rose."""
        omega = omega_of(candidates[:4 * _CANDIDATES])
        values = torch.linalg.eigvalsh(gram.gram(omega, torch.float32)).double()[:, -1]
        state["exact"] += len(values)
        index = int(values.argmax())
        if float(values[index]) <= state["lam"] * (1 + 1e-9):
            return False
        start, value = omega[index], float(values[index])
        if value > state["lam"] * (1 + rtol) ** 2:  # a different peak: climb it now (γ right for the next levels)
            start, value, count = climb(gram, start, polish=False)
            state["exact"] += count
        state.update(lam=value * (1 - _FLOAT32_VALUE), omega=start)
        return True

    level, levels = n0, []
    while len(cells):
        levels.append(level)
        if level > n0 << _MAX_DOUBLINGS - 1:
            raise RuntimeError("certified_peak: the search did not converge (please report this kernel)")
        factor = math.cos(math.pi * degree / (2 * level))
        final = (1 + rtol) * factor >= 1 + rtol / 2
        dtype = torch.float64 if 1 - factor < 2 * margin32 else torch.float32
        parity = (cells[:, 0] + cells[:, 1]) % 2
        corners = torch.cat([key(cells[:, 0] + parity, cells[:, 1], level),
                             key(cells[:, 0] + 1 - parity, cells[:, 1] + 1, level)])
        unique, inverse = torch.unique(corners, return_inverse=True)
        while True:
            verdict = run(unique, (gamma() * factor) ** 2, dtype)
            losers = unique[~verdict]
            if not len(losers):
                break
            # is a failing corner above γ itself? Then L was not the maximum: raise it and redo the level.
            above = losers[~run(losers, gamma() ** 2, torch.float64 if final else torch.float32)]
            if not len(above) or not raise_peak(above):
                if final and len(above):
                    raise RuntimeError("certified_peak: a corner above the bound did not raise it (please report)")
                break
        failing = (~verdict[inverse]).view(2, -1).any(0)
        cells = cells[failing]
        cells = torch.cat([torch.stack([2 * cells[:, 0] + i, 2 * cells[:, 1] + j], 1) for i in (0, 1) for j in (0, 1)])
        level *= 2
    proven = gamma()
    omega, lam, count = climb(gram, state["omega"])      # the peak ω̂ (the differentiable bound's block), float64
    state["exact"] += count
    sigma = math.sqrt(max(lam, 0.0))
    # the proof is S ≤ γ = (1 + rtol)·√L, and L ≤ σ₁(K̂(ω̂))²: the bound below is at least γ
    bound = sigma * (1 + rtol) * (1 + ROUNDING)
    if bound < proven:   # cannot happen (the float64 climb starts at L's ω and only ascends); never below the proof
        bound = proven * (1 + ROUNDING)
    return Certificate(bound, sigma, (float(omega[0]), float(omega[1])), state["tests"], state["exact"],
                       tuple(levels))


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
