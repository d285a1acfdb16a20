"""Largest Lyapunov exponent (Benettin, Jacobian-vector products) against closed forms and eigenvalues."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recstab.diagnostics import loop_certificate, lyapunov_exponent, temporal_receptive_field
from recstab.diagnostics.lyapunov import jvp
from recstab.diagnostics.onsets import BurstProcessor
from recstab.models import build_model
from recstab.models.reference import LinearRecurrence, LinearStateModel


class InputGain(nn.Module):
    """h_t = g_t·h_{t-1} + x_t with the scalar gain g_t = 0.2 + 2·mean(x_t): growth log g_t exactly."""

    in_channels = 1

    def process(self, x, state=None):
        h = torch.zeros_like(x[:, 0]) if state is None else state
        ys = []
        for t in range(x.shape[1]):
            h = (0.2 + 2 * x[:, t].mean()) * h + x[:, t]
            ys.append(h)
        return torch.stack(ys, 1), h

    def forward(self, x):
        return self.process(x)[0]


def clip(t=200, size=8, channels=3, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, t, channels, size, size, generator=g)


# ---------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("a", [0.5, 0.9, 1.05])
def test_linear_recurrence_has_log_a(a):
    model = LinearRecurrence(a)
    model.train()
    le = lyapunov_exponent(model, clip(200))
    assert abs(le.exponent - math.log(a)) < 0.02 * abs(math.log(a))
    assert le.burn_in == 50 and le.frames_used == 149 and le.per_frame.shape == (199,)
    assert le.stderr < 1e-6 and "batch means" in le.method
    assert le.positive_ranges == ([(51, 200)] if a > 1 else [])
    assert model.training and model.gain.grad is None  # mode restored, weights untouched
    json.dumps(le.to_dict())


def test_non_normal_2d_state_has_the_log_spectral_radius():
    A = np.array([[0.8, 3.0], [0.0, 0.6]])  # ‖A‖₂ ≈ 3.2 > 1, yet ρ(A) = 0.8: contractive in the long run
    le = lyapunov_exponent(LinearStateModel(A), clip(300, size=4, channels=1))
    expected = math.log(max(abs(np.linalg.eigvals(A))))
    assert np.linalg.norm(A, 2) > 3 and abs(le.exponent - expected) < 0.02 * abs(expected)


def test_complex_eigenvalues_expanding_2d_state():
    A = np.array([[0.9, 2.0], [-0.3, 0.7]])  # eigenvalues 0.8 ± 0.768i, |λ| = √1.23 ≈ 1.109
    frames = clip(1500, size=1, channels=1).double()  # float64: the state grows like 1.109^t
    le = lyapunov_exponent(LinearStateModel(A), frames)
    expected = math.log(max(abs(np.linalg.eigvals(A))))
    assert abs(le.exponent - expected) < 0.02 * abs(expected)


def test_per_frame_growth_and_stderr_against_a_direct_computation():
    frames = clip(120, size=4, channels=1, seed=3)
    le = lyapunov_exponent(InputGain(), frames, burn_in=10, batches=5)
    logs = np.log(0.2 + 2 * frames[0, 1:].double().flatten(1).mean(1).numpy())
    assert np.allclose(le.per_frame, logs, rtol=1e-5, atol=1e-6)
    assert le.exponent == pytest.approx(logs[10:].mean(), rel=1e-5)
    means = logs[10:10 + 5 * 21].reshape(5, 21).mean(1)  # 109 frames -> 5 batches of 21
    assert le.stderr == pytest.approx(means.std(ddof=1) / math.sqrt(5), rel=1e-4)


def test_positive_ranges_find_the_unstable_stretch():
    frames = torch.full((1, 300, 1, 2, 2), 0.2)   # gain 0.6: contracting ...
    frames[:, 150:200] = 0.6                      # ... except frames 150-199, gain 1.4
    le = lyapunov_exponent(InputGain(), frames, window=10)
    # the running mean over 10 frames of log 0.6 = -0.511 and log 1.4 = +0.336 is positive when
    # k >= 7 of its frames are unstable (0.336·k > 0.511·(10 - k)): from frame 156 to frame 202
    (start, stop), = le.positive_ranges
    assert (start, stop) == (156, 203)
    assert le.exponent < 0


# ---------------------------------------------------------------------------------- real models
def test_untrained_vresnet_feat_is_chaotic_and_at_half_norm_contractive(vresnet_feat):
    frames = clip(100, size=16, seed=1)
    he = lyapunov_exponent(vresnet_feat(16), frames, burn_in=30)
    half = lyapunov_exponent(vresnet_feat(16, conv_norm=0.5), frames, burn_in=30)
    assert he.exponent > 0.05 and he.exponent > 3 * he.stderr
    assert half.exponent < -0.5 and not half.positive_ranges
    assert he.positive_ranges and he.positive_ranges[-1][1] == 100


def test_chunked_stream_gives_the_same_exponent(vresnet_feat):
    model = vresnet_feat(8)
    frames = clip(60, size=16, seed=2)
    whole = lyapunov_exponent(model, frames, burn_in=10, sigma=20 / 255)
    pieces = [frames[:, :7], frames[:, 7:30], frames[:, 30:]]
    chunked = lyapunov_exponent(model, iter(pieces), burn_in=10, sigma=20 / 255)
    as_frames = lyapunov_exponent(model, list(frames[0]), burn_in=10, sigma=20 / 255)  # C×H×W frames
    assert np.array_equal(whole.per_frame, chunked.per_frame)
    assert np.array_equal(whole.per_frame, as_frames.per_frame)
    assert whole.exponent == chunked.exponent
    clean = lyapunov_exponent(model, frames, burn_in=10)
    assert not np.array_equal(clean.per_frame, whole.per_frame)  # the noise is there


@pytest.mark.parametrize("a, dampening", [(0.5, 1.0), (-0.9, 1.0), (1.5, 1.0), (1.5, 0.5)])
def test_reference_certificates_bound_the_measured_growth(a, dampening):
    model = LinearRecurrence(a)
    model.dampening = dampening
    cert = loop_certificate(model)
    le = lyapunov_exponent(model, clip(80, size=2), burn_in=10)
    assert cert.bound == pytest.approx(abs(a) * dampening) and cert.certified == (abs(a) * dampening < 1)
    assert le.exponent == pytest.approx(math.log(abs(a) * dampening), rel=1e-3)  # exact: the map is linear
    assert math.log(cert.bound) >= le.exponent - 1e-4
    A = np.array([[0.8, 3.0], [0.0, 0.6]])  # non-normal: the one-step bound ‖A‖₂ far above e^λ₁ = ρ(A)
    state_model = LinearStateModel(A)
    state_model.dampening = dampening
    bound = loop_certificate(state_model).bound
    assert bound == pytest.approx(dampening * np.linalg.norm(A, 2), rel=1e-6)
    assert math.log(bound) > lyapunov_exponent(state_model, clip(120, size=2, channels=1)).exponent


def test_along_the_trf_sequence():
    trf = temporal_receptive_field(LinearRecurrence(0.7), frames=41, size=4, iters=2)
    le = lyapunov_exponent(LinearRecurrence(0.7), trf.inputs, burn_in=5)  # T×C×H×W
    assert le.frames_used == 35 and le.exponent == pytest.approx(math.log(0.7), rel=1e-4)


def test_models_without_recurrent_memory_have_minus_infinity():
    torch.manual_seed(0)
    mf3 = lyapunov_exponent(build_model("vresnet", "mf3", "denoise", 4), clip(10))
    assert mf3.exponent == -math.inf and "is_recurrent" in mf3.note
    reset = lyapunov_exponent(BurstProcessor(LinearRecurrence(1.5), burst=5), clip(30))
    assert reset.exponent == -math.inf and "vanished at stream frame 5" in reset.note


def test_diverging_state_stops_the_stream_with_a_note():
    le = lyapunov_exponent(LinearRecurrence(3.0), clip(200, size=2), burn_in=10)  # 3^t overflows float32
    assert le.exponent == pytest.approx(math.log(3.0), rel=1e-4)
    assert "not finite" in le.note and le.frames_used < 90


def test_jvp_matches_the_dense_jacobian_with_and_without_forward_mode():
    torch.manual_seed(0)
    weight = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    grid = torch.rand(1, 5, 5, 2, dtype=torch.float64) * 2 - 1
    x, v = torch.rand(1, 2, 5, 5, dtype=torch.float64), torch.randn(1, 2, 5, 5, dtype=torch.float64)
    for f in (lambda z: torch.relu(F.conv2d(z, weight, padding=1)),          # forward mode
              lambda z: F.grid_sample(torch.tanh(z), grid, align_corners=False)):  # no forward mode: fallback
        jac = torch.autograd.functional.jacobian(f, x)  # out-shape × in-shape
        expected = (jac.flatten(0, 3).flatten(1) @ v.flatten()).reshape(f(x).shape)
        out, dot = jvp(f, (x,), (v,))
        assert torch.allclose(out, f(x)) and torch.allclose(dot, expected, atol=1e-12)


def test_bad_input_is_refused_clearly():
    model = LinearRecurrence(0.5)
    with pytest.raises(ValueError, match="burn_in.*-1"):
        lyapunov_exponent(model, clip(10), burn_in=-1)
    with pytest.raises(ValueError, match="sigma.*2"):
        lyapunov_exponent(model, clip(10), sigma=2.0)
    with pytest.raises(ValueError, match="shape \\(3, 4\\)"):
        lyapunov_exponent(model, [torch.rand(3, 4)])
    with pytest.raises(ValueError, match="1 channels, the model takes 3"):
        lyapunov_exponent(model, clip(10, channels=1))
    with pytest.raises(ValueError, match="empty"):
        lyapunov_exponent(model, [])
    with pytest.raises(ValueError, match="batch size"):
        lyapunov_exponent(model, [clip(5), clip(5, batch=2)])
    with pytest.raises(ValueError, match="stream"):
        lyapunov_exponent(build_model("vresnet", "birlsp", "denoise", 4), clip(10))
