r"""A proven upper bound of a conv layer's operator norm on EVERY input size.

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

The bound. Fix a unit x ∈ C^{c_in}. T(ω) = ‖K̂(ω)x‖² is a real, non-negative
trigonometric polynomial of degree d₁ = kh − 1 in ω₁ and d₂ = kw − 1 in ω₂ (the
products e^{-iω·(a,b)}·e^{+iω·(a′,b′)} have frequencies a − a′ ∈ [−d₁, d₁], b − b′ ∈ [−d₂, d₂]).
Let M = max T, attained at ω*. P = (2T − M)/M is a real trigonometric polynomial
of the same degrees with |P| ≤ 1 and P(ω*) = 1.

1. (van der Corput–Schaake / Szegő) A real trigonometric polynomial Q of degree d
   in one variable with |Q| ≤ 1 satisfies Q′² + d²Q² ≤ d². So ψ = arccos Q has
   |ψ′| = |Q′|/√(1 − Q²) ≤ d wherever |Q| < 1; |Q| = 1 only at finitely many
   points (or Q is constant), and ψ is continuous, so ψ is d-Lipschitz.
2. Walk from ω* to a point ω along axis 1, then along axis 2. On each leg P is a
   one-variable trigonometric polynomial of degree ≤ d₁ (resp. d₂) bounded by 1,
   so ψ = arccos P, zero at ω*, grows by at most d₁|h₁| + d₂|h₂|, h = ω − ω*
   (each component taken mod 2π into [−π, π]). If r := d₁|h₁| + d₂|h₂| ≤ π, then
   P(ω) ≥ cos r and T(ω) = M(1 + P(ω))/2 ≥ M·cos²(r/2).
3. The lattice. Λ = {2π(p, q)/n : p + q even} for even n (all 2π(p, q)/n for odd n).
   Every unit cell of the n-grid has two opposite corners in Λ, and the weighted
   distances from any point of the cell to those two add up to (d₁ + d₂)·2π/n, so
   some λ ∈ Λ is within r ≤ π(d₁ + d₂)/n of ω*. (This covering radius is the one of
   the whole n-grid: the other half of its points adds nothing in this metric.)
4. Hence, if d₁ + d₂ < n, max_Λ T ≥ M cos²(π(d₁ + d₂)/(2n)). Maximising over x,
       S² = sup_x M(x) ≤ max_{λ∈Λ} σ₁(K̂(λ))² / cos²(π(d₁+d₂)/(2n)),
   i.e.   S ≤ max_{λ∈Λ} σ₁(K̂(λ)) / cos(π(kh + kw − 2)/(2n)).
For a 3×3 kernel the factor is 1.0048 at n = 64 (1.0197 at n = 32, 1.082 at n = 16);
for 1×1 kernels it is 1 (K̂ is constant: the bound is σ₁(K) itself).
K real gives K̂(−ω) = conj K̂(ω), and Λ = −Λ, so half of Λ is evaluated:
~n²/4 blocks, each one SVD (float64; a 64→64 layer at n = 64 in ~0.3 s on one CPU
thread). Rounding: the computed σ₁ of float64 blocks this small is within ~1e-13
relative of the exact one; the result is multiplied by 1 + 1e-9 to cover it.
"""

import math

import torch

from recstab.norms.spectra import _blocks, check_kernel_and_n

ROUNDING = 1e-9  # relative margin added for floating-point rounding (float64 SVD: ~1e-13)


def conv_norm_bound(weight: torch.Tensor, n: int = 64) -> float:
    """A float >= the operator norm of the stride-1 conv with kernel `weight`, on every input size,
    with zero padding (any amount) or circular padding.

    weight: c_out × c_in × kh × kw. n: lattice resolution, n > kh + kw − 2; the bound exceeds
    the supremum of the frequency response by at most 1/cos(π(kh + kw − 2)/(2n)).
    Derivation in the module docstring.
    """
    check_kernel_and_n(weight, n)
    kh, kw = weight.shape[-2:]
    degree = (kh - 1) + (kw - 1)
    if n <= degree:
        raise ValueError(f"n={n} is too small for the {kh}×{kw} kernel: the bound needs "
                         f"n > (kh − 1) + (kw − 1) = {degree}; valid: n >= {degree + 1}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite entries (nan or inf); no finite bound exists")
    w = weight.detach().to(torch.float64).cpu()
    p, q = torch.meshgrid(torch.arange(n), torch.arange(n // 2 + 1), indexing="ij")  # q <= n/2: conjugate symmetry
    keep = ((p + q) % 2 == 0) if n % 2 == 0 else torch.ones_like(p, dtype=torch.bool)
    blocks = _blocks(w, n)[keep]                                # K̂(λ) = Σ_ab K_ab e^{-iθ_ab(λ)}, tall
    top = torch.linalg.svdvals(blocks)[:, 0].max().item()
    return top / math.cos(math.pi * degree / (2 * n)) * (1 + ROUNDING)
