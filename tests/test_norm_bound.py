"""conv_norm_bound: a proven upper bound of the conv's norm on every input size, checked against
dense SVDs, power iterations on large maps, an adversarial kernel and a fine frequency grid."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from recstab.norms import conv_norm_bound, spectral_norm_fft


def dense(weight, size, padding):
    """The (c_out·size²) × (c_in·size²) matrix of the stride-1 conv, column by column (F.conv2d on basis maps)."""
    c_in, kh, kw = weight.shape[1:]
    basis = torch.eye(c_in * size * size, dtype=weight.dtype).view(-1, c_in, size, size)
    if padding == "zeros":
        out = F.conv2d(basis, weight, padding="same")
    else:  # circular: wrap kh − 1 rows and kw − 1 columns (a shift of the output changes no singular value)
        out = F.conv2d(F.pad(basis, (0, kw - 1, 0, kh - 1), mode="circular"), weight)
    return out.reshape(c_in * size * size, -1).T


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


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("size", [5, 8, 13, 16])
@pytest.mark.parametrize("shape", [(3, 2, 3, 3), (2, 3, 2, 4), (3, 2, 1, 3)])
def test_bound_exceeds_the_dense_norm_zero_and_circular(size, shape):
    torch.manual_seed(size)
    w = torch.randn(*shape, dtype=torch.float64)
    bound = conv_norm_bound(w)
    for padding in ("zeros", "circular"):
        exact = torch.linalg.svdvals(dense(w, size, padding))[0].item()
        assert bound >= exact, (padding, size, bound, exact)
    # and it is not loose: within the proven factor of the supremum (>= the circular norm at 64)
    assert bound <= spectral_norm_fft(w, 64) / math.cos(math.pi * (sum(shape[2:]) - 2) / 128) * 1.02


def test_1x1_kernels_get_their_exact_norm():
    torch.manual_seed(1)
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(w[:, :, 0, 0], ord=2).item()
    assert conv_norm_bound(w, n=2) == pytest.approx(exact, rel=1e-8)
    assert conv_norm_bound(w) >= exact
    assert torch.linalg.svdvals(dense(w, 6, "zeros"))[0].item() == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_bound_exceeds_the_zero_padded_norm_on_large_maps(size):
    torch.manual_seed(2)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    measured = zero_padded_power_norm(w, size, iters=60)
    assert measured <= conv_norm_bound(w)
    assert measured > 0.95 * conv_norm_bound(w)  # the power iteration got somewhere near


def adversarial_kernel(grid):
    """A 2→2 3×3 kernel whose response peaks at the centre of a cell of the `grid`×`grid` DFT grid.

    The complex taps c_ab = w_a w_b e^{iω₀·(a,b)}, w = (½, 0, ½), written as 2×2 real blocks
    [[x, −y], [y, x]] (x + iy = c_ab): the block response has singular values |ĉ(ω)| and |ĉ(−ω)|,
    with |ĉ(ω)| = |cos(ω₁ − ω₀₁)·cos(ω₂ − ω₀₂)|, so sup = 1 at ω₀ and the grid sees cos²(π/grid).
    """
    omega = 2 * math.pi * (torch.tensor([3.0, 5.0], dtype=torch.float64) + 0.5) / grid
    w1 = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)
    a = torch.arange(3, dtype=torch.float64)
    taps = (w1[:, None] * w1[None, :]) * torch.exp(1j * (omega[0] * a[:, None] + omega[1] * a[None, :]))
    kernel = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    kernel[0, 0], kernel[0, 1] = taps.real, -taps.imag
    kernel[1, 0], kernel[1, 1] = taps.imag, taps.real
    return kernel, omega


def test_adversarial_kernel_breaks_the_grid_max_but_not_the_bound():
    grid = 16
    kernel, omega = adversarial_kernel(grid)
    grid_max = spectral_norm_fft(kernel, grid)
    assert grid_max == pytest.approx(math.cos(math.pi / grid) ** 2, rel=1e-9)  # the construction
    kernel = kernel / grid_max                      # "normalised to 1" by the plain grid maximum
    size = 256
    r = torch.arange(size, dtype=torch.float64)
    window = torch.sin(math.pi * (r + 1) / (size + 1))
    start = (window[:, None] * window[None, :] * torch.cos(omega[0] * r[:, None] + omega[1] * r[None, :]))
    start = torch.stack([start, torch.zeros_like(start)])[None]  # channel 0: both ±ω₀, both eigenvectors
    measured = zero_padded_power_norm(kernel, size, iters=40, start=start)
    assert measured > 1.03                          # the plain grid maximum (1) is no bound: 1/cos²(π/16) = 1.0396
    assert measured < 1 / math.cos(math.pi / grid) ** 2 + 1e-9
    bound = conv_norm_bound(kernel)
    assert bound >= measured
    assert bound <= (1 / math.cos(math.pi / grid) ** 2) / math.cos(math.pi * 4 / 128) * (1 + 1e-6)
    # the proven factor at n = 16 must and does cover the gap too
    assert conv_norm_bound(kernel, n=16) >= measured


@pytest.mark.parametrize("shape,seed", [((64, 64, 3, 3), 0), ((64, 128, 3, 3), 2)])
def test_tight_on_he_init_64_channel_kernels(shape, seed):
    torch.manual_seed(seed)
    w = torch.randn(*shape, dtype=torch.float64) * math.sqrt(2 / (shape[1] * 9))
    start = time.process_time()  # CPU time: wall time on a shared machine says little
    bound = conv_norm_bound(w)
    elapsed = time.process_time() - start
    # sup estimate: the 512-grid within one 64-grid cell of the 64-grid arg-max (a lower estimate of sup)
    blocks = torch.fft.rfft2(w.float(), s=(64, 64)).permute(2, 3, 0, 1)
    top = torch.linalg.svdvals(blocks)[..., 0]
    p, q = divmod(int(top.argmax()), top.shape[1])
    offsets = torch.arange(-8, 9, dtype=torch.float64) / 512
    f1 = (p / 64 + offsets)[:, None].expand(17, 17).reshape(-1)
    f2 = (q / 64 + offsets)[None, :].expand(17, 17).reshape(-1)
    a = torch.arange(3, dtype=torch.float64)
    phase = torch.exp(-2j * math.pi * (f1[:, None, None] * a[None, :, None] + f2[:, None, None] * a[None, None, :]))
    fine = torch.linalg.matrix_norm(torch.einsum("lab,ocab->loc", phase, w.to(torch.complex128)), ord=2).max()
    assert fine.item() >= top.max().item() * (1 - 1e-6)
    assert 1.0 <= bound / fine.item() <= 1.01
    assert elapsed < 3  # 64→64: ~0.5 s of one thread on this CPU


def test_bad_input():
    with pytest.raises(ValueError, match=r"n=4 is too small for the 3×3 kernel.*n >= 5"):
        conv_norm_bound(torch.randn(2, 2, 3, 3), n=4)
    with pytest.raises(ValueError, match=r"n=8 is too small for the 9×9 kernel.*n >= 17"):
        conv_norm_bound(torch.randn(2, 2, 9, 9), n=8)
    with pytest.raises(ValueError, match="4-D conv kernel"):
        conv_norm_bound(torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match="must be an int"):
        conv_norm_bound(torch.randn(2, 2, 3, 3), n=64.0)
    with pytest.raises(ValueError, match="non-finite"):
        conv_norm_bound(torch.full((2, 2, 3, 3), math.nan))
