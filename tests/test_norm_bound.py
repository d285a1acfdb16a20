"""conv_norm_bound: a proven upper bound of the conv's norm on every input size, checked against dense SVDs of
the zero-padded and circular conv matrices, fine FFT grids, power iterations on large maps, kernels that peak
between grid points, an independent continuous maximisation of σ₁(K̂(ω)), and finite differences."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from recstab.norms import conv_norm_bound, conv_norm_bounds, spectral_norm_fft
from recstab.norms.spectra import frequency_response_peak
from recstab.norms.bound import RTOL, certified_peak, conv_norm_bound_tensor, lattice_svd_bound


def dense(weight, size, padding):
    """The (c_out·size²) × (c_in·size²) matrix of the stride-1 conv, column by column (F.conv2d on basis maps)."""
    c_in, kh, kw = weight.shape[1:]
    basis = torch.eye(c_in * size * size, dtype=weight.dtype).view(-1, c_in, size, size)
    if padding == "zeros":
        out = F.conv2d(basis, weight, padding=(kh // 2, kw // 2))[..., :size, :size]
    else:  # circular: wrap kh − 1 rows and kw − 1 columns (a shift of the output changes no singular value)
        out = F.conv2d(F.pad(basis, (0, kw - 1, 0, kh - 1), mode="circular"), weight)
    return out.reshape(c_in * size * size, -1).T


def grid_max(weight, n):
    """max over the n×n FFT grid of σ₁(K̂(f)): the circular norm at n, a lower estimate of the supremum."""
    return spectral_norm_fft(weight.double(), n)


def zero_padded_power_norm(weight, size, iters, start=None):
    """‖conv‖ of the 'same' zero-padded conv on a size×size map by power iteration (a lower estimate)."""
    kh, kw = weight.shape[-2:]
    pad = (kh // 2, kw // 2)
    x = torch.randn(1, weight.shape[1], size, size, dtype=weight.dtype,
                    generator=torch.Generator().manual_seed(0)) if start is None else start
    for _ in range(iters):
        x = x / x.norm()
        x = F.conv_transpose2d(F.conv2d(x, weight, padding=pad), weight, padding=pad)  # WᵀW x
    x = x / x.norm()
    return F.conv2d(x, weight, padding=pad).norm().item()


SHAPES = [(3, 2, 3, 3), (2, 3, 2, 4), (3, 2, 1, 3), (2, 2, 5, 5), (3, 4, 1, 1), (4, 3, 3, 5)]


@pytest.mark.parametrize("size", [5, 8, 13])
@pytest.mark.parametrize("shape", SHAPES)
def test_bound_exceeds_the_dense_norm_zero_and_circular(size, shape):
    torch.manual_seed(size)
    w = torch.randn(*shape, dtype=torch.float64)
    bound = conv_norm_bound(w)
    for padding in ("zeros", "circular"):
        exact = torch.linalg.svdvals(dense(w, size, padding))[0].item()
        assert bound >= exact, (padding, size, bound, exact)
    # and it is tight: at most (1 + rtol) above the supremum, which is at least the fine-grid maximum
    assert bound <= grid_max(w, 128) / math.cos(math.pi * (sum(shape[2:]) - 2) / 256) * (1 + RTOL) * (1 + 1e-8)


def test_1x1_kernels_get_their_exact_norm():
    torch.manual_seed(1)
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(w[:, :, 0, 0], ord=2).item()
    assert conv_norm_bound(w) == pytest.approx(exact, rel=1e-8)
    assert conv_norm_bound(w) >= exact
    assert torch.linalg.svdvals(dense(w, 6, "zeros"))[0].item() == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("shape,grid", [((4, 6, 3, 3), 512), ((6, 4, 5, 5), 512), ((16, 16, 3, 3), 256)])
def test_bound_exceeds_fine_grids_and_stays_within_rtol(shape, grid):
    torch.manual_seed(3)
    w = torch.randn(*shape, dtype=torch.float64)
    fine = grid_max(w, grid)
    bound = conv_norm_bound(w)
    assert fine <= bound <= fine / math.cos(math.pi * (sum(shape[2:]) - 2) / (2 * grid)) * (1 + RTOL) * (1 + 1e-8)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_bound_exceeds_the_zero_padded_norm_on_large_maps(size):
    torch.manual_seed(2)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    measured = zero_padded_power_norm(w, size, iters=60)
    assert measured <= conv_norm_bound(w)
    assert measured > 0.95 * conv_norm_bound(w)  # the power iteration got somewhere near


def adversarial_kernel(omega):
    """A 2→2 3×3 kernel whose response peaks at ω₀ = `omega` (anywhere, e.g. between grid points), with sup 1.

    The complex taps c_ab = w_a w_b e^{iω₀·(a,b)}, w = (½, 0, ½), written as 2×2 real blocks
    [[x, −y], [y, x]] (x + iy = c_ab): the block response has singular values |ĉ(ω)| and |ĉ(−ω)|,
    with |ĉ(ω)| = |cos(ω₁ − ω₀₁)·cos(ω₂ − ω₀₂)|, so sup = 1 at ω₀ and an n-grid sees cos²(π/n) at worst.
    """
    omega = torch.as_tensor(omega, dtype=torch.float64)
    w1 = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)
    a = torch.arange(3, dtype=torch.float64)
    taps = (w1[:, None] * w1[None, :]) * torch.exp(1j * (omega[0] * a[:, None] + omega[1] * a[None, :]))
    kernel = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    kernel[0, 0], kernel[0, 1] = taps.real, -taps.imag
    kernel[1, 0], kernel[1, 1] = taps.imag, taps.real
    return kernel


def test_adversarial_kernel_breaks_the_grid_max_but_not_the_bound():
    grid = 16
    omega = 2 * math.pi * (torch.tensor([3.0, 5.0], dtype=torch.float64) + 0.5) / grid  # the centre of a grid cell
    kernel = adversarial_kernel(omega)
    grid_value = grid_max(kernel, grid)
    assert grid_value == pytest.approx(math.cos(math.pi / grid) ** 2, rel=1e-9)  # the construction
    kernel = kernel / grid_value                     # "normalised to 1" by the plain grid maximum
    size = 256
    r = torch.arange(size, dtype=torch.float64)
    window = torch.sin(math.pi * (r + 1) / (size + 1))
    start = (window[:, None] * window[None, :] * torch.cos(omega[0] * r[:, None] + omega[1] * r[None, :]))
    start = torch.stack([start, torch.zeros_like(start)])[None]  # channel 0: both ±ω₀, both eigenvectors
    measured = zero_padded_power_norm(kernel, size, iters=40, start=start)
    assert measured > 1.03                          # the plain grid maximum (1) is no bound: 1/cos²(π/16) = 1.0396
    assert measured < 1 / math.cos(math.pi / grid) ** 2 + 1e-9
    bound = conv_norm_bound(kernel)
    assert measured <= bound <= (1 / math.cos(math.pi / grid) ** 2) * (1 + RTOL) * (1 + 1e-8)
    assert conv_norm_bound(kernel, n=16) >= measured  # any starting lattice
    assert conv_norm_bound(kernel, method="svd", n=16) >= measured


@pytest.mark.parametrize("seed", range(4))
def test_adversarial_peaks_anywhere_are_bounded_within_rtol(seed):
    omega = torch.rand(2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 * math.pi
    bound = conv_norm_bound(adversarial_kernel(omega))    # sup = 1 exactly, at an arbitrary (off-lattice) ω₀
    assert 1 <= bound <= (1 + RTOL) * (1 + 1e-8)


@pytest.mark.parametrize("shape,seed", [((64, 64, 3, 3), 0), ((64, 128, 3, 3), 2)])
def test_tight_on_he_init_64_channel_kernels_against_a_continuous_maximisation(shape, seed):
    """The bound against an independent estimate of the supremum (L-BFGS on ω from the best FFT-grid points, not a
    grid that contains the bound's own arg-max): fine ≤ bound (the bound is valid) and bound ≤ 1.001·fine (tight)."""
    torch.manual_seed(seed)
    w = torch.randn(*shape, dtype=torch.float64) * math.sqrt(2 / (shape[1] * 9))
    start = time.process_time()  # CPU time: wall time on a shared machine says little
    bound = conv_norm_bound(w)
    elapsed = time.process_time() - start
    fine = frequency_response_peak(w)
    assert fine <= bound <= 1.001 * fine
    assert elapsed < 5  # ~0.1 s of one thread; benchmarks/results/bound.md has the real number


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (3, 5, 3, 5), (6, 6, 1, 1), (5, 2, 2, 2)])
def test_gradient_of_the_differentiable_bound_is_that_of_the_bound(shape):
    torch.manual_seed(4)
    w = torch.randn(*shape, dtype=torch.float64)
    value = conv_norm_bound_tensor(w.clone().requires_grad_(True))
    assert value.item() == conv_norm_bound(w)                       # the same number
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        direction = torch.randn(shape, dtype=torch.float64, generator=generator)
        leaf = w.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(conv_norm_bound_tensor(leaf), leaf)
        step = 1e-6
        central = (conv_norm_bound(w + step * direction) - conv_norm_bound(w - step * direction)) / (2 * step)
        assert (grad * direction).sum().item() == pytest.approx(central, rel=1e-6, abs=1e-10)


def test_bound_is_homogeneous_and_a_weight_divided_by_it_is_certified():
    torch.manual_seed(6)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    bound = conv_norm_bound(w)
    for scale in (0.37, 3.1, 1e-3):
        assert conv_norm_bound(scale * w) == pytest.approx(scale * bound, rel=1e-12)
    w32 = torch.randn(16, 8, 3, 3)
    normalised = w32 / conv_norm_bound_tensor(w32)
    assert conv_norm_bound(normalised) <= 1 + 1e-6                # float32 rounding of the division only
    assert conv_norm_bound(torch.zeros(2, 3, 3, 3)) == 0.0


def test_the_certificate_says_what_it_proved():
    torch.manual_seed(7)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    cert = certified_peak(w)
    peak = torch.linalg.svdvals((w.to(torch.complex128) * torch.exp(-1j * (
        cert.omega[0] * torch.arange(3.0, dtype=torch.float64)[:, None]
        + cert.omega[1] * torch.arange(3.0, dtype=torch.float64)[None, :]))).sum(dim=(-2, -1)))[0].item()
    assert cert.peak == pytest.approx(peak, rel=1e-10)               # σ₁ at the reported ω̂: a lower bound of S
    assert cert.peak <= cert.bound <= cert.peak * (1 + RTOL) * (1 + 1e-8)
    assert cert.tests > 0 and cert.levels[0] == 24


def test_svd_lattice_bound_is_kept_and_valid():
    torch.manual_seed(8)
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    fine = grid_max(w, 256)
    old = conv_norm_bound(w, method="svd")
    assert old == lattice_svd_bound(w, 64)
    assert fine <= old <= fine / math.cos(math.pi * 4 / 128) * (1 + 1e-8)


def test_bad_input():
    with pytest.raises(ValueError, match=r"n=4 is too small for the 3×3 kernel.*n >= 5"):
        conv_norm_bound(torch.randn(2, 2, 3, 3), n=4)
    with pytest.raises(ValueError, match=r"n=8 is too small for the 9×9 kernel.*n >= 17"):
        conv_norm_bound(torch.randn(2, 2, 9, 9), n=8)
    with pytest.raises(ValueError, match="4-D conv kernel"):
        conv_norm_bound(torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match=r"n=70000 is too large.*5 <= n <= 65536"):
        conv_norm_bound(torch.randn(2, 2, 3, 3), n=70000)
    with pytest.raises(ValueError, match="must be an int"):
        conv_norm_bound(torch.randn(2, 2, 3, 3), n=64.0)
    with pytest.raises(ValueError, match="non-finite"):
        conv_norm_bound(torch.full((2, 2, 3, 3), math.nan))
    with pytest.raises(ValueError, match="unknown method 'gram'.*adaptive, svd"):
        conv_norm_bound(torch.randn(2, 2, 3, 3), method="gram")
    with pytest.raises(ValueError, match=r"rtol.*\(0, 0.1\]"):
        conv_norm_bound(torch.randn(2, 2, 3, 3), rtol=0.0)


def test_kernels_searched_together_get_the_certificates_they_get_alone():
    """certified_peaks batches the search of kernels of one shape (on H's side: 6×4 and 4×6 share one); each
    certificate is the one-kernel search's, and each bound is valid and tight against a fine grid."""
    from recstab.norms import bound as bound_module
    generator = torch.Generator().manual_seed(9)
    shapes = [(6, 4, 3, 3), (4, 6, 3, 3), (6, 4, 3, 3), (5, 5, 1, 3), (5, 5, 1, 3), (3, 3, 5, 5), (3, 3, 5, 5),
              (4, 3, 3, 1), (4, 3, 3, 1), (4, 2, 1, 1), (4, 2, 1, 1), (6, 4, 3, 3)]
    kernels = [torch.randn(*shape, dtype=torch.float64, generator=generator) for shape in shapes]
    kernels.append(kernels[0].clone())          # a duplicate
    kernels.append(kernels[1].float())          # float32 in the same search as float64 kernels
    kernels.append(torch.zeros(6, 4, 3, 3))     # and a zero kernel
    bound_module._CACHE.clear()
    together = bound_module.certified_peaks(kernels)
    bound_module._CACHE.clear()
    alone = [certified_peak(w) for w in kernels]
    for w, a, b in zip(kernels, together, alone):
        assert a.bound == pytest.approx(b.bound, rel=1e-12, abs=0)
        assert (a.tests, a.levels) == (b.tests, b.levels)   # the same search, step by step
        if a.bound > 0:
            degree = sum(w.shape[-2:]) - 2
            fine = grid_max(w, 256)
            assert fine <= a.bound <= fine / math.cos(math.pi * degree / 512) * (1 + RTOL) * (1 + 1e-8)
    assert together[-1].bound == 0.0 and together[-3].bound == together[0].bound
    assert together[-2].bound == pytest.approx(together[1].bound, rel=1e-6)    # float32 rounding of the kernel
    assert conv_norm_bounds(kernels) == [cert.bound for cert in together]   # the public list form


def test_a_models_certificate_searches_its_kernels_together_and_is_unchanged():
    from recstab.models import build_model
    from recstab.models.certificate import loop_certificate
    from recstab.norms import bound as bound_module
    torch.manual_seed(10)
    model = build_model("vresnet", "feat", "denoise", channels=8, depth=6)
    bound_module._CACHE.clear()
    together = loop_certificate(model)                                   # default: one batched search
    bound_module._CACHE.clear()
    alone = loop_certificate(model, conv_norm=lambda w: conv_norm_bound(w))  # one search per kernel
    assert together.bound == pytest.approx(alone.bound, rel=1e-12)
    assert together.weights == pytest.approx(alone.weights, rel=1e-12)
