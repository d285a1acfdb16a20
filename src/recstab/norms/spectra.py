"""Exact spectra of a convolutional layer seen as a linear operator.

A conv layer with kernel K (c_out × c_in × kh × kw, stride 1, no groups, no
dilation) acting on an n×n feature map is a linear map W(K) of size
(c_out·n²) × (c_in·n²). With *circular* padding (the map is a torus) W(K) is a
block matrix of doubly-block-circulant blocks, and the 2-D DFT block-diagonalises
it (Sedghi, Gupta & Long, "The singular values of convolutional layers",
ICLR 2019): for every frequency ω = (p, q), p, q ∈ {0 … n-1},

    F(ω) = Σ_{a,b} K[:, :, a, b] · exp(-2πi (p·a + q·b) / n)      (c_out × c_in)

and the singular values of W(K) are the union over the n² frequencies of the
singular values of F(ω). F is the 2-D FFT of the kernel zero-padded to n×n, so
the exact spectrum costs one FFT and n² small SVDs instead of one SVD of a
(c·n²)² matrix. Two facts keep it cheap:

- K is real, so F(-ω) = conj(F(ω)) has the same singular values: we only
  decompose the n × (n//2 + 1) frequencies of `rfft2` and count the columns
  1 … (n-1)//2 twice (their mirror images are the missing columns).
- cross-correlation (what `conv2d` computes) and convolution differ by a flip,
  ω ↦ -ω, which does not change the set of singular values; neither does the
  position of the kernel's centre (a circular shift is unitary).

Zero padding (what the models use) is a different operator: it is the circular
operator on a map of size n + k - 1 restricted to the n×n interior, so its norm
is at most the circular one on that larger map; for n = 32–64 the two differ by
well under 1 %. The *definition* used everywhere in recstab is the circular one;
a bound valid on every map size is `bound.conv_norm_bound`.

Also here: `conv_circular(x, K)` applies W(K), `conv_circular_t(y, K)` applies W(K)ᵀ
(a correlation with the flipped, channel-transposed kernel — the transposed
convolution of the torus), and `spectral_norm_power` runs the power iteration
with them.
"""

import math

import torch
import torch.nn.functional as F


def check_kernel_and_n(weight: torch.Tensor, n: int) -> None:
    """A 4-D conv kernel and an integer map side n (what every spectrum computation takes)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 4-D conv kernel c_out×c_in×kh×kw, got {shape}")
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n must be an int (the side of the n×n feature map), got {n!r}")


def check_kernel(weight: torch.Tensor, n: int) -> None:
    check_kernel_and_n(weight, n)
    kh, kw = weight.shape[-2:]
    if n < max(kh, kw):
        raise ValueError(f"n={n} is smaller than the {kh}×{kw} kernel; valid: n >= {max(kh, kw)}")


def circular_pads(kh: int, kw: int) -> tuple[int, int, int, int]:
    """F.pad amounts (left, right, top, bottom) so a valid conv of a kh×kw kernel keeps n×n."""
    top, left = (kh - 1) // 2, (kw - 1) // 2
    return left, kw - 1 - left, top, kh - 1 - top


def conv_circular(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W(K)·x: stride-1 cross-correlation of x (B×c_in×n×n) on the torus."""
    return F.conv2d(F.pad(x, circular_pads(*weight.shape[-2:]), mode="circular"), weight)


def conv_circular_t(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W(K)ᵀ·y: the transposed convolution on the torus (y is B×c_out×n×n).

    (Wᵀy)[c, j] = Σ_{o,a} K[o, c, a] · y[o, j - a + top] is a correlation with the
    flipped kernel Kᵀ[c, o, a] = K[o, c, kh-1-a], whose padding is mirrored.
    """
    left, right, top, bottom = circular_pads(*weight.shape[-2:])
    flipped = weight.transpose(0, 1).flip(2, 3)
    return F.conv2d(F.pad(y, (right, left, bottom, top), mode="circular"), flipped)


def _blocks(weight: torch.Tensor, n: int) -> torch.Tensor:
    """The blocks F(p, q), p < n, q <= n//2, as an n × (n//2+1) batch of tall matrices.

    Wide blocks (c_out < c_in) are conjugate-transposed (same singular values): batched
    LAPACK SVDs of wide complex matrices can run many times slower with two threads (benchmarks/results/norms.md).
    """
    blocks = torch.fft.rfft2(weight.detach(), s=(n, n)).permute(2, 3, 0, 1)
    return (blocks if blocks.shape[-2] >= blocks.shape[-1] else blocks.mH).contiguous()


def conv_singular_values(weight: torch.Tensor, n: int) -> torch.Tensor:
    """All n²·min(c_out, c_in) singular values of the circular conv operator, sorted descending.

    Computed in the weight's precision (float64 in → float64 out) and detached.
    A 64-channel 3×3 layer at n = 64 takes well under a second on a laptop CPU.
    """
    check_kernel(weight, n)
    per_freq = torch.linalg.svdvals(_blocks(weight, n))            # n × (n//2+1) × m
    mirrored = per_freq[:, 1:(n - 1) // 2 + 1]                     # columns whose mirror rfft2 drops
    values = torch.cat([per_freq.flatten(), mirrored.flatten()])
    return values.sort(descending=True).values


def spectral_norm_fft(weight: torch.Tensor, n: int) -> float:
    """‖W(K)‖₂ on an n×n map, exact (largest value of `conv_singular_values`)."""
    check_kernel(weight, n)
    return torch.linalg.svdvals(_blocks(weight, n)).max().item()


def stable_rank(weight: torch.Tensor, n: int) -> float:
    """srank(W(K)) = ‖W‖_F² / ‖W‖₂² on an n×n map.

    ‖W‖_F² = n²‖K‖_F² (each kernel entry appears once per output pixel), so only
    the spectral norm needs the FFT. It lies in [1, n²·min(c_out, c_in)].
    """
    check_kernel(weight, n)
    sigma = spectral_norm_fft(weight, n)
    return n * n * weight.detach().double().pow(2).sum().item() / sigma**2


def top_right_singular_map(weight: torch.Tensor, n: int) -> torch.Tensor:
    """A real unit top right-singular vector of W(K), as a 1×c_in×n×n map (exact, from the FFT).

    A plane wave x[c, r, s] = b_c·exp(-2πi(p·r + q·s)/n) is mapped by the correlation to
    exp(-2πi(p·r + q·s)/n)·(phase)·F(p, q)·b, so with b the top right singular vector of the
    block F(p, q) that holds σ₁, ‖W x‖ = σ₁‖x‖. K is real, so the real and imaginary parts of
    x are top singular vectors too (whichever is non-zero; both when (p, q) ≠ -(p, q)).
    """
    check_kernel(weight, n)
    w = weight.detach()
    blocks = _blocks(w, n)
    top = torch.linalg.svdvals(blocks)[..., 0]
    p, q = divmod(int(top.argmax()), top.shape[1])
    block = blocks[p, q] if w.shape[0] >= w.shape[1] else blocks[p, q].mH    # F(p, q), c_out × c_in
    _, _, vh = torch.linalg.svd(block)
    b = vh[0].conj()                                                            # F(p, q) b = σ₁ a
    pixels = torch.arange(n, device=w.device, dtype=w.dtype)
    phase = torch.exp(-2j * torch.pi * (p * pixels[:, None] + q * pixels[None, :]) / n)
    wave = b[:, None, None] * phase.to(b.dtype)                                 # c_in × n × n, complex
    x = wave.real if wave.real.norm() >= wave.imag.norm() else wave.imag
    return (x / x.norm()).unsqueeze(0).contiguous()


def spectral_norm_power(weight: torch.Tensor, n: int, iters: int = 100,
                        generator: torch.Generator | None = None) -> float:
    """‖W(K)‖₂ by `iters` power iterations (a lower bound that converges to the exact value).

    Conv spectra are dense near the top (a continuum of frequencies), so the
    estimate converges slowly — roughly like 1/iters in relative error for
    large n; use `spectral_norm_fft` when you need the exact number.
    """
    check_kernel(weight, n)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    w = weight.detach()
    u = torch.randn(1, w.shape[0], n, n, dtype=w.dtype, device=w.device, generator=generator)
    with torch.no_grad():
        for _ in range(iters):
            v = F.normalize(conv_circular_t(u, w).flatten(), dim=0).view(1, -1, n, n)
            u = F.normalize(conv_circular(v, w).flatten(), dim=0).view(1, -1, n, n)
        return conv_circular_t(u, w).norm().item()


def frequency_response_peak(weight: torch.Tensor, starts: int = 5, grid: int = 64) -> float:
    """A measured estimate of sup_ω σ₁(K̂(ω)) over continuous frequencies: the best `starts` points of a
    grid×grid FFT spectrum, each climbed by L-BFGS on ω (autograd through svdvals); the largest local
    maximum found, a LOWER estimate. Independent of :mod:`.bound` (tests and benchmarks check the bound
    against it)."""
    w = weight.double()
    tops = torch.linalg.svdvals(torch.fft.fft2(w.float(), s=(grid, grid)).permute(2, 3, 0, 1))[..., 0]
    kh, kw = w.shape[-2:]
    a = torch.arange(kh, dtype=torch.float64)[:, None]
    b = torch.arange(kw, dtype=torch.float64)[None, :]
    best = 0.0
    for flat in tops.flatten().topk(starts).indices.tolist():
        omega = (2 * math.pi * torch.tensor(divmod(flat, grid), dtype=torch.float64)).div(grid).requires_grad_(True)
        optimizer = torch.optim.LBFGS([omega], lr=0.5, max_iter=60, tolerance_grad=1e-14, tolerance_change=1e-16,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            block = (w.to(torch.complex128) * torch.exp(-1j * (omega[0] * a + omega[1] * b))).sum(dim=(-2, -1))
            loss = -torch.linalg.svdvals(block)[0]
            loss.backward()
            return loss

        optimizer.step(closure)
        best = max(best, -closure().item())
    return best
