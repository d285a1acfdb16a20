"""SN, SRN, SRN-C and the exact conv spectra, checked against independent computations."""

import io
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from recstab.norms import (NORM_KINDS, ConvStableRankNorm, SpectralNorm, apply_norm, bake,
                           conv_singular_values, normalised_convs, refresh, remove_norm, spectral_norm_fft,
                           spectral_norm_power, stable_rank)
from recstab.norms import srnc
from recstab.norms.spectra import conv_circular, conv_circular_t, top_right_singular_map

os.environ.setdefault("WANDB_MODE", "disabled")
CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "norm")




def he_conv(c_in, c_out=None, k=3, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out or c_in, k, padding=k // 2, bias=False).to(dtype)
    nn.init.kaiming_normal_(conv.weight)
    return conv


def dense_operator(weight, n):
    """The (c_out·n²) × (c_in·n²) matrix of the circular conv, column by column from the identity basis.

    Padded on one side only: a circular shift of the output does not change the singular values.
    """
    c_in, kh, kw = weight.shape[1:]
    basis = torch.eye(c_in * n * n, dtype=weight.dtype).view(-1, c_in, n, n)
    out = F.conv2d(F.pad(basis, (0, kw - 1, 0, kh - 1), mode="circular"), weight)
    return out.reshape(c_in * n * n, -1).T


def dense_norm(weight, n):
    return torch.linalg.matrix_norm(dense_operator(weight.detach().double(), n), ord=2).item()


def srank_fraction(weight, n):
    return stable_rank(weight, n) / (n * n * min(weight.shape[:2]))


class TinyRecurrent(nn.Module):
    """head → (loop: two convs fed with their own previous output) → tail, 8 channels."""

    def __init__(self, c=8):
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.loop = nn.ModuleList([nn.Conv2d(2 * c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)])
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def recurrent_convs(self):
        return list(self.loop)

    def forward(self, x):  # x: B×T×3×H×W
        h = torch.zeros(x.shape[0], self.loop[1].out_channels, *x.shape[-2:])
        out = []
        for t in range(x.shape[1]):
            f = F.relu(self.head(x[:, t]))
            h = self.loop[1](F.relu(self.loop[0](torch.cat([f, h], 1))))
            out.append(self.tail(h))
        return torch.stack(out, 1)


# ---------------------------------------------------------------- exact spectra
@pytest.mark.parametrize("shape,n", [((4, 4, 3, 3), 8), ((5, 3, 3, 3), 7), ((3, 6, 2, 4), 6), ((4, 2, 1, 1), 5)])
def test_conv_singular_values_equal_dense_svd(shape, n):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64)
    dense = torch.linalg.svdvals(dense_operator(w, n))[: n * n * min(shape[:2])]
    sv = conv_singular_values(w, n)
    assert sv.shape == (n * n * min(shape[:2]),)
    assert torch.all(sv[:-1] >= sv[1:])
    assert (sv - dense).abs().max().item() < 1e-5
    assert stable_rank(w, n) == pytest.approx((dense**2).sum().item() / dense[0].item() ** 2, rel=1e-9)
    assert spectral_norm_fft(w, n) == pytest.approx(dense[0].item(), rel=1e-9)
    assert spectral_norm_power(w, n, iters=300) == pytest.approx(dense[0].item(), rel=2e-3)


def test_conv_singular_values_float32_m4_n8():
    torch.manual_seed(1)
    w = torch.randn(4, 4, 3, 3)
    dense = torch.linalg.svdvals(dense_operator(w.double(), 8)).float()[: 8 * 8 * 4]
    assert (conv_singular_values(w, 8) - dense).abs().max().item() < 1e-5


def test_transposed_conv_is_the_adjoint_and_top_vector_is_exact():
    torch.manual_seed(2)
    w = torch.randn(5, 3, 3, 2, dtype=torch.float64)
    x, y = torch.randn(2, 3, 7, 7, dtype=torch.float64), torch.randn(2, 5, 7, 7, dtype=torch.float64)
    assert (conv_circular(x, w) * y).sum().item() == pytest.approx((x * conv_circular_t(y, w)).sum().item(), rel=1e-12)
    v = top_right_singular_map(w, 7)
    assert v.norm().item() == pytest.approx(1.0, rel=1e-12)
    assert conv_circular(v, w).norm().item() == pytest.approx(dense_norm(w, 7), rel=1e-10)


def test_exact_spectrum_of_a_64_channel_layer_at_n64_is_fast_and_right():
    import time
    w = he_conv(64).weight.detach()
    start = time.perf_counter()
    sv = conv_singular_values(w, 64)
    elapsed = time.perf_counter() - start
    assert sv.shape == (64 * 64 * 64,)
    # ‖W‖_F² = n²‖K‖_F²: every kernel entry appears once per output pixel
    assert sv.double().pow(2).sum().item() == pytest.approx(64 * 64 * w.double().pow(2).sum().item(), rel=1e-4)
    assert elapsed < 10  # ~0.6 s alone on this 2-core CPU; the benchmark reports the real number


# ---------------------------------------------------------------- SRN-C
def test_srnc_beta1_sets_the_operator_norm_dense_small():
    for alpha in (0.5, 1.0, 2.0):
        conv = he_conv(4, seed=3)
        refresh(apply_norm(conv, "srnc", alpha=alpha, beta=1.0, n=8))  # warm-up: exact top vector
        assert dense_norm(conv.weight, 8) / alpha == pytest.approx(1.0, abs=1e-3)


def test_srnc_power_iteration_warm_up_and_exact_eval_whatever_u():
    conv = he_conv(4, seed=4)
    apply_norm(conv, "srnc", alpha=1.0, n=8)
    norm = conv.parametrizations.weight[0]
    with torch.no_grad():
        norm.u.copy_(torch.randn_like(norm.u))
    conv.eval()  # eval: the exact spectrum of the kernel, whatever u holds
    assert dense_norm(conv.weight, 8) == pytest.approx(1.0, rel=1e-5)
    conv.train()
    refresh(conv, iters=30, exact=False)  # per-frequency power iterations + exact SVDs of the top frequencies
    assert dense_norm(conv.weight, 8) == pytest.approx(1.0, rel=1e-5)


def test_srnc_beta1_64_channels_n64_fft():
    conv = he_conv(64, seed=5)
    apply_norm(conv, "srnc", alpha=2.0, beta=1.0, n=64)
    refresh(conv)
    conv.eval()
    assert spectral_norm_fft(conv.weight, 64) / 2.0 == pytest.approx(1.0, rel=1e-2)


def test_srnc_tracks_a_kernel_being_trained_with_one_per_frequency_iteration_per_step():
    conv = he_conv(16, seed=6)
    refresh(apply_norm(conv, "srnc", alpha=1.5, n=16, power_iters=1))
    optimizer = torch.optim.Adam(conv.parameters(), lr=1e-3)
    torch.manual_seed(7)
    x, y = torch.randn(4, 16, 16, 16), torch.randn(4, 16, 16, 16)
    for _ in range(8):
        with parametrize.cached():
            used = conv.weight  # the weight this step trains with (after its power-iteration step)
            assert spectral_norm_fft(used, 16) / 1.5 == pytest.approx(1.0, abs=1e-5)
            loss = (conv(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def he_init(model):
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
    return model


def operator_norm_and_srank(weight, n):
    sv = conv_singular_values(weight.detach().double(), n)
    return sv[0].item(), (sv.pow(2).sum() / sv[0] ** 2).item() / (n * n * min(weight.shape[:2]))


@pytest.mark.parametrize("n", [1, 2])
def test_srnc_trains_on_grids_with_fewer_frequencies_than_it_tracks(n):
    """n = 1, 2 (a 1×1 conv): 1 or 4 frequencies, fewer than the tracked candidates; ‖W‖₂ of a 1×1 conv is the
    matrix norm of its weight."""
    torch.manual_seed(0)
    model = apply_norm(nn.Sequential(nn.Conv2d(3, 4, 1)), "srnc", alpha=1.5, beta=0.5, n=n)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        loss = model(torch.rand(1, 3, 4, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        weight = model[0].weight.detach().double()[:, :, 0, 0]
        assert torch.linalg.matrix_norm(weight, 2).item() == pytest.approx(1.5, rel=1e-5)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_srnc_holds_at_every_step_of_a_plain_training_loop(beta):
    """apply_norm, then forward / backward / Adam — no refresh, no parametrize.cached(), He init."""
    torch.manual_seed(20)
    alpha, n = 2.0, 16
    model = apply_norm(he_init(TinyRecurrent(c=16)), "srnc", alpha=alpha, beta=beta, n=n)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(2, 3, 3, 16, 16), torch.rand(2, 3, 3, 16, 16)
    norms, sranks = [], []
    for _ in range(40):
        loss = (model(x) - y).pow(2).mean()
        for _, conv, _ in normalised_convs(model):  # the weight this step used (same kernel: same state)
            sigma, srank = operator_norm_and_srank(conv.weight, n)
            norms.append(sigma / alpha)
            sranks.append(srank)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert min(norms) >= 0.99 and max(norms) <= 1.01        # required band; measured within 1e-6
    assert max(abs(r - 1) for r in norms) < 1e-4
    if beta < 1:
        assert all(abs(r / beta - 1) < 0.10 for r in sranks)  # required; measured within 1e-5
        assert max(abs(r / beta - 1) for r in sranks) < 1e-3
    model.eval()  # no refresh: eval weights from the exact spectrum of the trained kernels
    for _, conv, _ in normalised_convs(model):
        sigma, srank = operator_norm_and_srank(conv.weight, n)
        assert sigma / alpha == pytest.approx(1.0, abs=1e-5)
        if beta < 1:
            assert srank / beta == pytest.approx(1.0, abs=1e-3)


def test_srnc_training_resumes_exactly_from_a_state_dict():
    torch.manual_seed(21)
    n = 8
    model = apply_norm(he_init(TinyRecurrent()), "srnc", alpha=1.5, beta=0.3, n=n)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(2, 3, 3, 8, 8)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    names = sorted(model.state_dict())
    clone = apply_norm(he_init(TinyRecurrent()), "srnc", alpha=1.5, beta=0.3, n=n)
    clone.load_state_dict(model.state_dict())
    assert sorted(clone.state_dict()) == names                   # same buffer names, u included
    optimizer = torch.optim.Adam(clone.parameters(), lr=1e-2)
    for _ in range(3):
        clone(x).pow(2).mean().backward()
        for _, conv, _ in normalised_convs(clone):
            assert operator_norm_and_srank(conv.weight, n)[0] / 1.5 == pytest.approx(1.0, abs=1e-5)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("beta", [0.2, 0.1, 0.05])
def test_srnc_beta_sets_the_operator_stable_rank(beta):
    conv = he_conv(16, seed=8)
    with torch.no_grad():  # an almost orthogonal kernel: unconstrained srank/(n²m) ≈ 0.9
        conv.weight.mul_(0.05)
        conv.weight[:, :, 1, 1] += torch.linalg.qr(torch.randn(16, 16))[0]
    n = 16
    assert srank_fraction(conv.weight, n) > 2 * beta
    refresh(apply_norm(conv, "srnc", alpha=2.0, beta=beta, n=n))
    conv.eval()
    assert srank_fraction(conv.weight, n) / beta == pytest.approx(1.0, rel=0.15)
    assert spectral_norm_fft(conv.weight, n) / 2.0 == pytest.approx(1.0, rel=0.02)


def test_srnc_gamma_formula_and_closed_form_direction():
    conv = he_conv(6, seed=9, dtype=torch.float64)
    n = 8
    norm = ConvStableRankNorm(conv.weight.detach(), alpha=1.0, beta=0.1, n=n)
    w = conv.weight.detach().clone().requires_grad_(True)
    blocks = torch.fft.rfft2(w.detach(), s=(n, n)).permute(2, 3, 0, 1)
    p, q = 3, 2
    left, values, right_h = torch.linalg.svd(blocks[p, q])
    u, v = left[:, 0], right_h[0].conj()
    response = torch.fft.rfft2(w, s=(n, n))[:, :, p, q]         # K̂(p, q), c_out × c_in, autograd
    (autograd_g,) = torch.autograd.grad((u.conj() @ response @ v).real, w)
    g = norm.direction(w.detach(), p * (n // 2 + 1) + q, u, v)
    assert torch.allclose(g, autograd_g, atol=1e-12)
    assert (w.detach() * g).sum().item() == pytest.approx(values[0].item(), rel=1e-12)  # σ = ⟨K, G⟩
    norm.refresh(w.detach())
    out = norm.normalise(w.detach())  # ‖α K′/κ‖_F² = β m α², the target, when the constraint binds
    assert out.pow(2).sum().item() == pytest.approx(0.1 * 6, rel=1e-5)
    assert spectral_norm_fft(out, n) == pytest.approx(1.0, rel=1e-6)


# ---------------------------------------------------------------- SN and SRN (reshaped kernel)
def test_sn_normalises_the_reshaped_kernel_but_not_the_operator():
    conv = he_conv(16, seed=0)
    reference = he_conv(16, seed=0)
    torch.nn.utils.parametrizations.spectral_norm(reference, n_power_iterations=500)
    reference.weight  # one training-mode access runs torch's 500 power iterations
    apply_norm(conv, "sn", alpha=1.5)
    conv.eval()
    reference.eval()
    assert torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item() / 1.5 == pytest.approx(1.0, rel=1e-2)
    assert torch.allclose(conv.weight / 1.5, reference.weight, rtol=1e-3, atol=1e-5)
    ratio = spectral_norm_fft(conv.weight, 32) / 1.5
    assert 1.5 <= ratio <= 3.0  # the paper's Table 3, first row: SN/SRN fails to control the layer


def test_srn_sets_the_reshaped_stable_rank():
    conv = he_conv(16, seed=10)
    apply_norm(conv, "srn", alpha=2.0, beta=0.25)
    conv.eval()
    s = torch.linalg.svdvals(conv.weight.detach().flatten(1).double())
    assert s[0].item() / 2.0 == pytest.approx(1.0, rel=1e-2)
    assert (s.pow(2).sum() / s[0] ** 2).item() / 16 == pytest.approx(0.25, rel=0.05)


# ---------------------------------------------------------------- autograd, caching, state
def test_sn_gradient_is_exact_for_its_power_iteration_vector():
    """SN's map is K ↦ αK/σ(K; u) for the stored u (the power-iteration state is part of SN's definition)."""
    torch.manual_seed(11)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(SpectralNorm(w, 1.3).normalise, (w.clone().requires_grad_(True),))


def exact_srnc_map(kernel, alpha, beta, n):
    """SRN-C written out independently (float64, exact FFT spectra): the map the parametrization must compute.

    σ, (u, v) = top singular triple of the block with the largest σ₁; G = Re(conj(u)vᵀe^{-iθ}); K̃ = K/σ;
    if ‖K̃‖² > βm: S1 = G/‖G‖², S2 = K̃ − S1, γ(κ) = min(1, √(max(0, βmκ² − ‖S1‖²)/‖S2‖²)), κ the fixed point
    of κ = ‖W(S1 + γ(κ)S2)‖₂ (plain iteration to 1e-15), weight α(S1 + γS2)/κ."""
    def norm_and_top(k):
        blocks = torch.fft.rfft2(k, s=(n, n)).permute(2, 3, 0, 1)
        tops = torch.linalg.svdvals(blocks)[..., 0]
        p, q = divmod(int(tops.argmax()), tops.shape[1])
        left, values, right_h = torch.linalg.svd(blocks[p, q])
        return values[0], left[:, 0], right_h[0].conj(), p, q

    sigma, u, v, p, q = norm_and_top(kernel)
    tilde = kernel / sigma
    m = min(kernel.shape[:2])
    if beta >= 1 or beta * m >= tilde.pow(2).sum():
        return alpha * tilde
    kh, kw = kernel.shape[-2:]
    a, b = torch.arange(kh, dtype=torch.float64)[:, None], torch.arange(kw, dtype=torch.float64)[None, :]
    g = (u.conj()[:, None, None, None] * v[None, :, None, None] * torch.exp(-2j * math.pi * (p * a + q * b) / n)).real
    s1 = g / g.pow(2).sum()
    s2 = tilde - s1
    kappa = 1.0
    for _ in range(500):
        gamma = min(1.0, math.sqrt(max(0.0, beta * m * kappa**2 - s1.pow(2).sum().item()) / s2.pow(2).sum().item()))
        new = norm_and_top(s1 + gamma * s2)[0].item()
        if abs(new - kappa) <= 1e-15 * new:
            break
        kappa = new
    gamma = min(1.0, math.sqrt(max(0.0, beta * m * kappa**2 - s1.pow(2).sum().item()) / s2.pow(2).sum().item()))
    return alpha * (s1 + gamma * s2) / kappa


def binds(kernel, beta, n):
    top = torch.linalg.svdvals(torch.fft.rfft2(kernel, s=(n, n)).permute(2, 3, 0, 1))[..., 0].max()
    return beta < 1 and beta * min(kernel.shape[:2]) < (kernel / top).pow(2).sum()


@pytest.mark.parametrize("shape,n,beta,binding", [
    ((2, 3, 3, 3), 8, 0.3, True),     # the audit's case (3→2, 3×3, n = 8, β = 0.3, binding)
    ((2, 3, 3, 3), 8, 0.9, False),    # β < 1, not binding
    ((5, 4, 5, 5), 12, 0.2, True),
    ((6, 4, 3, 5), 10, 0.3, True),    # non-square kernel
    ((4, 4, 1, 1), 4, 0.5, True),
    ((8, 8, 1, 1), 4, 0.1, True),     # β below the rank-one floor: the weight is α·S1/κ
    ((3, 5, 3, 3), 8, 1.0, False),    # β = 1
])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_srnc_gradient_is_the_derivative_of_the_exact_map(shape, n, beta, binding, mode):
    """Autograd against central finite differences of the exact map (float64, random directions, rel 1e-6)."""
    for seed in range(100):  # the first kernel on the wanted side of the constraint
        torch.manual_seed(seed)
        kernel = torch.randn(*shape, dtype=torch.float64)
        if binds(kernel, beta, n) == binding:
            break
    assert binds(kernel, beta, n) == binding
    alpha = 1.3
    norm = ConvStableRankNorm(kernel.clone(), alpha, beta, n).train(mode == "train")
    exact = exact_srnc_map(kernel, alpha, beta, n)
    assert torch.allclose(norm(kernel.clone()), exact, rtol=1e-10, atol=1e-12)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = torch.randn(kernel.shape, dtype=torch.float64, generator=generator)
        readout = torch.randn(kernel.shape, dtype=torch.float64, generator=generator)
        leaf = kernel.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((norm(leaf) * readout).sum(), leaf)
        step = 1e-6
        central = ((exact_srnc_map(kernel + step * direction, alpha, beta, n)
                    - exact_srnc_map(kernel - step * direction, alpha, beta, n)) / (2 * step) * readout).sum()
        assert (grad * direction).sum().item() == pytest.approx(central.item(), rel=1e-6, abs=1e-9)


BAND_CASES = [  # (c_in, c_out, kh, kw, lr, beta): the configurations the old tracker left the band in
    (6, 10, 3, 3, 1e-2, 1.0), (8, 8, 5, 5, 1e-2, 0.3), (4, 6, 3, 5, 1e-2, 1.0), (8, 8, 1, 1, 1e-2, 0.025),
    (8, 8, 5, 5, 3e-3, 0.1)]


@pytest.mark.parametrize("c_in,c_out,kh,kw,lr,beta", BAND_CASES)
def test_srnc_stays_in_its_band_at_every_step_of_a_plain_adam_loop(c_in, c_out, kh, kw, lr, beta):
    """Regression onto a fixed random conv (it moves the arg-max frequency), no refresh, no cached(): the exact
    ‖W‖₂ of the weight each step trains with is α (the band is [0.99, 1.01]α; measured here to 1e-6). The full
    grid, 200 steps each: benchmarks/bench_norms.py --what band."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2), bias=False)
    nn.init.kaiming_normal_(conv.weight)
    apply_norm(conv, "srnc", alpha=1.5, beta=beta, n=16)
    optimizer = torch.optim.Adam(conv.parameters(), lr=lr)
    teacher = torch.randn(c_out, c_in, kh, kw) * 0.5
    x = torch.randn(4, c_in, 16, 16)
    y = F.conv2d(x, teacher, padding=(kh // 2, kw // 2))
    ratios = []
    for _ in range(30):
        weight = conv.weight
        ratios.append(spectral_norm_fft(weight.detach().double(), 16) / 1.5)
        loss = (F.conv2d(x, weight, padding=(kh // 2, kw // 2)) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert 0.99 <= min(ratios) and max(ratios) <= 1.01
    assert max(abs(r - 1) for r in ratios) < 1e-6


@pytest.mark.parametrize("kind,beta", [("sn", 1.0), ("srn", 0.5), ("srnc", 1.0), ("srnc", 0.4)])
def test_gradient_flows_to_the_raw_kernels(kind, beta):
    torch.manual_seed(12)
    model = apply_norm(TinyRecurrent(), kind, alpha=1.2, beta=beta, n=8)
    model(torch.rand(2, 3, 3, 8, 8)).pow(2).mean().backward()
    for _, conv, _ in normalised_convs(model):
        grad = conv.parametrizations.weight.original.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def count_calls(norm, method):
    calls = []
    original = getattr(norm, method)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(norm, method, counted)
    return calls


def test_cached_unroll_runs_the_power_iteration_once_per_step():
    model = apply_norm(TinyRecurrent(), "srnc", alpha=1.0, n=8)
    norm = model.loop[1].parametrizations.weight[0]
    iterations, normalisations = count_calls(norm, "advance"), count_calls(norm, "normalise")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(2, 7, 3, 8, 8)
    for step in range(1, 3):
        with parametrize.cached():
            loss = model(x).pow(2).mean()  # 7-frame unroll: 7 accesses of each weight
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert len(normalisations) == step
        # step 1 trains with the kernel the constructor refreshed; afterwards one step per update
        assert len(iterations) == step - 1
    iterations.clear(), normalisations.clear()
    model(x).pow(2).mean().backward()  # without cached(): 7 normalisations, still one power-iteration step
    assert len(normalisations) == 7 and len(iterations) == 1


def test_a_tracked_layer_advances_u_by_one_per_frequency_power_iteration_step(monkeypatch):
    """Layers too large for the whole spectrum per step (srnc.EXHAUSTIVE) track it by power iteration."""
    monkeypatch.setattr(srnc, "EXHAUSTIVE", 0)
    n = 8
    conv = apply_norm(he_conv(4, seed=17, dtype=torch.float64), "srnc", alpha=1.0, beta=0.5, n=n)
    norm = conv.parametrizations.weight[0]
    assert not norm.exhaustive
    kernel = conv.parametrizations.weight.original
    with torch.no_grad():
        kernel.mul_(1.01).add_(0.01 * torch.randn_like(kernel))  # a new kernel: the next access advances u
    u = torch.view_as_complex(norm.u.clone())                    # c_out × n·(n//2+1)
    weight = conv.weight
    blocks = torch.fft.rfft2(kernel.detach(), s=(n, n)).permute(2, 3, 0, 1).reshape(-1, 4, 4)
    v = torch.einsum("foc,of->cf", blocks.conj(), u)             # K̂(f)ᴴ u_f, one block at a time
    v = v / v.norm(dim=0)
    expected = torch.einsum("foc,cf->of", blocks, v)
    expected = expected / expected.norm(dim=0)
    after = torch.view_as_complex(norm.u)
    updated = norm.halves(after.device)[norm._turn]              # this step's half of the frequencies
    untouched = norm.halves(after.device)[1 - norm._turn]
    best = norm._plan[1]["best"]
    updated = updated[updated != best]                           # (the top frequency gets its exact vector)
    assert torch.allclose(after[:, updated], expected[:, updated], atol=1e-10)
    assert torch.equal(after[:, untouched[untouched != best]], u[:, untouched[untouched != best]])
    # σ is exact at the frequency found, so ‖W‖₂ ≥ α always; here the tracker found the true arg-max: = α,
    # and the weight equals the exhaustive (eval) one
    assert spectral_norm_fft(weight, n) == pytest.approx(1.0, rel=1e-9)
    assert torch.allclose(conv.eval().weight, weight, atol=1e-9)


def test_autocast_does_not_lower_the_precision_of_the_normalisation():
    conv = apply_norm(he_conv(8, seed=18), "srnc", alpha=1.0, beta=0.5, n=8)
    expected = conv.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight = conv.weight
        conv(torch.rand(1, 8, 8, 8))
    assert weight.dtype == torch.float32 and torch.equal(weight, expected)


def test_fused_optimiser_updates_are_seen():
    model = apply_norm(TinyRecurrent(), "srnc", alpha=1.0, n=8)
    norm = model.loop[1].parametrizations.weight[0]
    iterations = count_calls(norm, "advance")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)  # no version-counter bumps
    model(torch.rand(1, 2, 3, 8, 8)).pow(2).mean().backward()
    optimizer.step()
    model.eval()
    before = model.loop[1].weight
    model.train()
    with parametrize.cached():
        model(torch.rand(1, 2, 3, 8, 8))
    assert len(iterations) == 1
    optimizer.step()
    model.eval()
    assert not torch.equal(model.loop[1].weight, before)


def test_eval_computes_the_weight_once_and_notices_changes():
    model = apply_norm(TinyRecurrent(), "srnc", alpha=1.0, beta=0.5, n=8).eval()
    norm = model.loop[0].parametrizations.weight[0]
    normalisations, iterations = count_calls(norm, "normalise"), count_calls(norm, "advance")
    x = torch.rand(1, 7, 3, 8, 8)
    y = model(x)
    for _ in range(3):
        assert torch.equal(model(x), y)
    assert len(normalisations) == 1 and len(iterations) == 0
    model.loop[0].weight.sum().backward()  # eval with gradient: the exact map's derivative, the weight still cached
    assert model.loop[0].parametrizations.weight.original.grad.abs().sum() > 0 and len(normalisations) == 2
    with torch.no_grad():  # an in-place change that bypasses the version counter
        model.loop[0].parametrizations.weight.original.data.mul_(1.1)
    model(x)
    assert len(normalisations) == 3
    refresh(model)
    model(x)
    assert len(normalisations) == 4
    with torch.inference_mode():
        model(x)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)  # eval weights are constants; input grads flow
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", ["sn", "srn", "srnc"])
def test_state_dict_roundtrip_gives_bit_identical_eval_output(kind):
    torch.manual_seed(13)
    model = apply_norm(TinyRecurrent(), kind, alpha=1.5, beta=0.5 if kind != "sn" else 1.0, n=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        with parametrize.cached():
            loss = model(torch.rand(2, 3, 3, 8, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = torch.rand(1, 5, 3, 8, 8)
    expected = model.eval()(x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert any(key.endswith("parametrizations.weight.0.u") for key in model.state_dict())
    torch.manual_seed(99)  # different raw weights and different u before loading
    clone = apply_norm(TinyRecurrent(), kind, alpha=1.5, beta=0.5 if kind != "sn" else 1.0, n=8).eval()
    clone(x)  # fill its eval cache first: loading must invalidate it
    buffer.seek(0)
    clone.load_state_dict(torch.load(buffer))
    assert torch.equal(clone(x), expected)


def test_bake_keeps_the_output_and_remove_norm_restores_the_raw_kernels():
    torch.manual_seed(14)
    model = apply_norm(TinyRecurrent(), "srnc", alpha=0.9, beta=0.3, n=8)
    raw = model.tail.parametrizations.weight.original.detach().clone()
    x = torch.rand(1, 4, 3, 8, 8)
    expected = model.eval()(x)
    model.train()  # bake uses the eval value whatever the mode
    bake(model)
    assert not normalised_convs(model) and not parametrize.is_parametrized(model.tail)
    assert torch.equal(model.eval()(x), expected)
    assert isinstance(model.tail.weight, nn.Parameter)
    other = apply_norm(TinyRecurrent(), "sn", alpha=1.0)
    other.tail.parametrizations.weight.original.data.copy_(raw)
    remove_norm(other)
    assert torch.equal(other.tail.weight.detach(), raw)


def test_loop_only_uses_recurrent_convs_and_explicit_modules():
    model = apply_norm(TinyRecurrent(), "srnc", alpha=1.0, n=8, loop_only=True)
    assert {name for name, _, _ in normalised_convs(model)} == {"loop.0", "loop.1"}
    plain = TinyRecurrent()
    apply_norm(plain, "srn", beta=0.5, modules=[plain.tail])
    assert [name for name, _, _ in normalised_convs(plain)] == ["tail"]
    with pytest.raises(ValueError, match="not a submodule"):
        apply_norm(TinyRecurrent(), "sn", modules=[TinyRecurrent().head])
    with pytest.raises(ValueError, match="not both"):
        apply_norm(plain, "sn", modules=[plain.head], loop_only=True)


def test_norm_configs_instantiate_the_norm_that_apply_norm_builds_by_name():
    import hydra
    from omegaconf import OmegaConf
    for kind in NORM_KINDS:
        cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF, f"{kind}.yaml")))
        norm = hydra.utils.instantiate({**cfg, "n": 8} if kind == "srnc" else cfg)
        assert norm.name == kind and cfg["_target_"].endswith(type(norm).__name__)
        torch.manual_seed(0)
        by_config = norm(TinyRecurrent())
        torch.manual_seed(0)
        settings = {k: v for k, v in cfg.items() if k not in ("_target_", "name")} | ({"n": 8} if kind == "srnc" else {})
        by_name = apply_norm(TinyRecurrent(), kind, **settings)
        assert len(normalised_convs(by_config)) == len(normalised_convs(by_name)) == (0 if kind == "none" else 4)
        x = torch.rand(1, 2, 3, 8, 8)
        assert torch.equal(by_config.eval()(x), by_name.eval()(x))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,words", [
    (dict(kind="srnc", alpha=0.0), ["alpha", "0.0", "> 0"]),
    (dict(kind="sn", alpha=-1), ["alpha", "-1", "> 0"]),
    (dict(kind="srnc", alpha=math.nan), ["alpha", "nan"]),
    (dict(kind="srnc", beta=0.0), ["beta", "0.0", "(0, 1]"]),
    (dict(kind="srn", beta=1.5), ["beta", "1.5", "(0, 1]"]),
    (dict(kind="srnc", n=2), ["n=2", "3×3", "n >= 3"]),
    (dict(kind="spectral"), ["'spectral'", "none, sn, srn, srnc"]),
    (dict(kind="sn", beta=0.5), ["beta", "0.5", "srn"]),
    (dict(kind="srnc", power_iters=0), ["power_iters", "0", ">= 1"]),
])
def test_bad_input_raises_value_error_naming_value_and_valid_range(kwargs, words):
    with pytest.raises(ValueError) as error:
        apply_norm(TinyRecurrent(), **kwargs)
    for word in words:
        assert word in str(error.value)


def test_a_stable_rank_target_below_the_rank_one_part_warns():
    with pytest.warns(UserWarning, match=r"'tail': beta=0.3 is at or below 0.333"):
        apply_norm(TinyRecurrent(), "srn", alpha=2.0, beta=0.3)
    with pytest.warns(UserWarning, match=r"'head': beta=0.03 is at or below 0.037"):  # 1/(m k²), m = 3
        apply_norm(TinyRecurrent(), "srnc", alpha=2.0, beta=0.03, n=8)


def test_bad_input_elsewhere():
    with pytest.raises(ValueError, match="recurrent_convs"):
        apply_norm(nn.Sequential(nn.Conv2d(3, 3, 3)), "srnc", n=8, loop_only=True)
    model = apply_norm(TinyRecurrent(), "sn")
    with pytest.raises(ValueError, match="already has a weight parametrization"):
        apply_norm(model, "srnc", n=8)
    with pytest.raises(ValueError, match="n=2 is smaller than the 3×3 kernel"):
        conv_singular_values(torch.randn(4, 4, 3, 3), 2)
    with pytest.raises(ValueError, match="stride"):
        apply_norm(nn.Sequential(nn.Conv2d(3, 3, 3, stride=2)), "srnc", n=8)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        apply_norm(nn.Sequential(nn.Linear(3, 3)), "sn")


# ---------------------------------------------------------------- spectrum monitor (Lightning)
def test_spectrum_monitor_logs_metrics_and_plot_and_checkpoint_roundtrip(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from recstab.lit.spectrum_callback import SpectrumMonitor

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(15)
            self.model = apply_norm(TinyRecurrent(), "srnc", alpha=1.0, beta=0.5, n=8)

        def training_step(self, batch, batch_idx):
            with parametrize.cached():
                return (self.model(batch[0]) - batch[1]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class RecordingWandb(WandbLogger):  # a W&B logger that records instead of starting a run
        def __init__(self):
            self.images, self.metrics = [], []

        @property
        def save_dir(self):
            return str(tmp_path)

        def log_image(self, key, images, step=None, **kwargs):
            self.images.append((key, images, step))

        def log_metrics(self, metrics, step=None):
            self.metrics.append((dict(metrics), step))

        def log_hyperparams(self, *args, **kwargs):
            pass

        def finalize(self, *args, **kwargs):
            pass

        def save(self):
            pass

    torch.manual_seed(16)
    data = torch.utils.data.TensorDataset(torch.rand(4, 3, 3, 8, 8), torch.rand(4, 3, 3, 8, 8))
    monitor = SpectrumMonitor(every_n_steps=2, n=8)
    wandb = RecordingWandb()
    trainer = L.Trainer(max_steps=4, default_root_dir=tmp_path, logger=[CSVLogger(tmp_path), wandb],
                        callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    module = Module()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    steps = [step for metrics, step in wandb.metrics if "spectra/loop.1/sigma1" in metrics]
    assert steps == [0, 2, 4]
    metrics = monitor.last_metrics
    assert set(metrics) >= {"spectra/head/sigma1", "spectra/loop.0/srank", "spectra/sigma1_max"}
    weight = module.model.loop[0].eval().weight
    assert metrics["spectra/loop.0/sigma1"] == pytest.approx(spectral_norm_fft(weight, 8), rel=1e-6)
    assert metrics["spectra/loop.0/srank"] == pytest.approx(stable_rank(weight, 8), rel=1e-4)
    assert monitor.last_figure.exists() and monitor.last_figure.suffix == ".png"
    assert [key for key, _, _ in wandb.images] == ["spectra/average"] * 3
    # a Lightning checkpoint carries the power-iteration buffers: bit-identical eval output
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    x = torch.rand(1, 3, 3, 8, 8)
    expected = module.eval().model(x)
    restored = Module.load_from_checkpoint(path).eval()
    assert torch.equal(restored.model(x), expected)
    with pytest.raises(ValueError, match="every_n_steps"):
        SpectrumMonitor(every_n_steps=0)
