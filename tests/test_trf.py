"""The TRF stress test: rates describe, a replayed demonstration decides; never a magnitude, never a log-slope."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from recstab.diagnostics import temporal_receptive_field
from recstab.diagnostics.demonstration import (GROWTH, MIN_PERIODS, demonstrate, extrapolation_constant, judge,
                                               replay, rotation_constant)
from recstab.models import build_model
from recstab.models.reference import (LinearRecurrence, LinearStateModel, TanhLatch, catalogue, jordan_block,
                                      rotation)


class NanAfter(nn.Module):
    """Returns its input, except NaN on the k-th frame: a finite input producing a non-finite output."""

    in_channels = 3

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        y = x.clone()
        y[:, self.k - 1] = float("nan")
        return y


class Scaled(nn.Module):
    """c · model(x): the same dynamics at another output scale (no process(): replayed whole)."""

    def __init__(self, model, c):
        super().__init__()
        self.model, self.c, self.in_channels = model, c, model.in_channels

    def forward(self, x):
        return self.c * self.model(x)


def linear_outputs(A, B, C, periods, length=1, x=1.0):
    """Per-period scale s_m and change d_m of y = C·h, h ← A·h + B·x (constant input), float64 numpy."""
    A, B, C = (np.asarray(v, dtype=np.float64) for v in (A, B, C))
    h = np.zeros(len(A))
    ys = []
    for _ in range(periods * length):
        h = A @ h + B * x
        ys.append(C @ h)
    Y = np.asarray(ys).reshape(periods, length)
    s = np.linalg.norm(Y, axis=1)
    d = np.concatenate([[np.nan], np.linalg.norm(np.diff(Y, axis=0), axis=1)])
    return s, d


def first_firing(s, d):
    """The first horizon M at which the criterion (G) fires on the prefixes of (s, d); None if never."""
    for m in range(MIN_PERIODS, len(s) + 1):
        if judge(s[:m], d[:m])[0]:
            return m
    return None


# ---------------------------------------------------------------------------------- the criterion itself
@pytest.mark.parametrize("size, coupling", [(2, 50.0), (5, 1.0), (8, 1e3)])
@pytest.mark.parametrize("eigenvalue", [0.95, 0.999, 1 - 1e-9, 1.0])
def test_jordan_block_transients_never_fire_at_any_horizon(size, coupling, eigenvalue):
    """A Jordan block with |λ| ≤ 1 grows like a polynomial at most (λ = 1: without bound); (G) never fires."""
    A = jordan_block(eigenvalue, size, coupling).numpy()
    s, d = linear_outputs(A, np.ones(size), np.eye(size)[0], periods=1500)
    assert s[-1] > 10 * s[0] or eigenvalue < 0.999  # near 1 the output does grow a lot: it is a real test
    assert first_firing(s, d) is None


@pytest.mark.parametrize("angle", [math.pi / 100, 0.3, 2.0, math.pi - 1e-3])
@pytest.mark.parametrize("radius", [0.99, 1.0])
def test_rotations_never_fire(angle, radius):
    B = np.array([1.0, 0.0])  # read-out crosses zero: the old log-slope called this growth
    s, d = linear_outputs(rotation(radius, angle).numpy(), B, np.array([1.0, 0.0]), periods=600, length=3)
    assert first_firing(s, d) is None


def test_slow_exponential_growth_fires_and_a_rise_and_fall_does_not():
    s, d = linear_outputs([[1.005]], [1.0], [1.0], periods=100, length=81)
    m = first_firing(s, d)
    assert m is not None and 60 <= m <= 75  # 1.005^{M·81/2} >= 10⁶ beyond the first half: M ≈ 69
    fires, words = judge(s[:m], d[:m])
    assert fires and "rising" in words
    # two distinct eigenvalues (beyond the proof): the output rises ~10⁴-fold, then falls back; never fires
    s, d = linear_outputs([[0.999, 1e6], [0.0, 0.998]], [1.0, 1.0], [1.0, 0.0], periods=400, length=10)
    assert s.max() > 1e3 * s[0] and first_firing(s, d) is None
    # what (G) judges is the replayed numbers: a made-up sequence that rises 10¹² within a doubling of the
    # horizon fires while it rises, whatever it would do later (no finite replay can know)
    bump = 1 + 1e12 * np.exp(-((np.arange(200) - 120.0) / 10) ** 2)
    bump_d = np.concatenate([[np.nan], np.abs(np.diff(bump))])
    assert first_firing(bump, bump_d) is not None


def test_scale_free():
    s, d = linear_outputs([[1.005]], [1.0], [1.0], periods=80, length=81)
    for c in (1e-30, 1.0, 1e30):
        assert judge(c * s, c * d)[0] == judge(s, d)[0] is True
        assert judge(c * s[:60], c * d[:60])[0] == judge(s[:60], d[:60])[0] is False


def test_extrapolation_constants_are_below_the_growth_threshold_and_bound_polynomials():
    for degree in range(8):  # Jordan blocks up to size 8
        worst = max(extrapolation_constant(degree, half) for half in range(16, 1025))
        assert worst < GROWTH / 2, (degree, worst)
    assert extrapolation_constant(1, 16) == pytest.approx(3.4286, rel=1e-4)   # nodes 2, 16; at 33: 17/14 + 31/14
    assert extrapolation_constant(8, 16) > GROWTH  # size 9 is beyond the proof (not the criterion)
    rng = np.random.default_rng(0)
    for degree in range(1, 8):
        for half in (16, 23, 64):
            bound = extrapolation_constant(degree, half)
            for _ in range(50):  # random polynomials, with roots inside the first half too
                roots = rng.uniform(0, 2 * half, degree)
                first_half = np.prod(np.arange(2.0, half + 1)[:, None] - roots, axis=1)
                assert abs(np.prod(2 * half + 1.0 - roots)) <= bound * np.abs(first_half).max() * (1 + 1e-9)
    assert rotation_constant(16) < 4 and rotation_constant(40) < 4


# ---------------------------------------------------------------------------------- linear recurrences
def test_contraction_is_bounded_with_the_predicted_extent_and_rates():
    model = LinearRecurrence(0.5, b=0.2)
    model.train()
    trf = temporal_receptive_field(model, frames=81, size=8, iters=10)
    assert trf.verdict == "bounded" and not trf.stopped_early and trf.iterations == 10
    assert trf.reason.startswith(f"no growth found in {MIN_PERIODS * 81} frames")
    assert trf.demonstration.status == "no growth" and trf.demonstration.periods == MIN_PERIODS
    # influence of x_{-k} is (0.2·0.5^k)² / 0.2² = 0.25^k > 1e-6  <=>  k <= 9: ten frames
    assert trf.extent == 10
    assert np.allclose(trf.influence[40 - np.arange(41)], 0.25 ** np.arange(41.0), rtol=1e-4)
    # ‖∂p/∂x_-k‖ ∝ 0.5^k and ∂y_t/∂x_-40 = 0.2·0.5^(t+40): both rates are log 0.5
    assert trf.growth_rate == pytest.approx(math.log(0.5), rel=1e-5)
    assert trf.future_rate == pytest.approx(math.log(0.5), rel=1e-5)
    expected = 0.5 ** np.arange(81.0)
    assert np.allclose(trf.future_response, expected / expected.max(), rtol=1e-4)
    assert trf.inputs.shape == (81, 3, 8, 8) and trf.outputs.shape == (81, 3, 8, 8)
    assert 0 <= float(trf.inputs.min()) and float(trf.inputs.max()) <= 1   # X stays in [0, 1]
    assert trf.p_history[-1] > trf.p_history[0] + 0.1  # |p| grows under the ascent
    assert model.gain.grad is None and model.training                   # weights and mode untouched


@pytest.mark.parametrize("b", [1e-6, 1.0, 1e7])
@pytest.mark.parametrize("a", [0.3, 0.83, 0.95])
def test_stable_recurrences_are_never_unbounded_whatever_the_scale(a, b):
    trf = temporal_receptive_field(LinearRecurrence(a, b), frames=81, size=4, iters=5)
    assert trf.verdict == "bounded", trf.reason
    assert not trf.stopped_early and trf.iterations == 5
    assert trf.growth_rate == pytest.approx(math.log(a), rel=1e-3)
    assert trf.future_rate == pytest.approx(math.log(a), rel=1e-2)
    # the extent is where 0.25^k-like decay a^(2k) crosses 1e-6, capped by the window
    assert trf.extent == min(41, 1 + math.floor(math.log(1e-6) / (2 * math.log(a)) - 1e-9))


@pytest.mark.parametrize("b", [1e-6, 1.0, 1e7])
@pytest.mark.parametrize("a", [1.05, 1.5])
def test_expanding_recurrences_are_unbounded_and_stop_early(a, b, tmp_path):
    model = LinearRecurrence(a, b)
    trf = temporal_receptive_field(model, frames=81, size=4, iters=50)
    assert trf.verdict == "unbounded" and trf.unbounded and trf.stopped_early and trf.iterations == 1
    demo = trf.demonstration
    assert demo.diverged and torch.equal(demo.period, trf.inputs)
    assert demo.status == "non-finite" and "non-finite output at replay frame" in trf.reason  # float32 overflow
    assert trf.replay_growth == math.inf and trf.extent == 41
    assert trf.growth_rate == pytest.approx(math.log(a), rel=1e-4)
    again = replay(LinearRecurrence(a, b), demo.save(tmp_path / "demo.pt"))  # anyone can replay it
    assert again.status == demo.status and again.first_nonfinite == demo.first_nonfinite


def test_slow_growth_is_demonstrated_and_replays_from_the_saved_file(tmp_path):
    model = LinearRecurrence(1.005, in_channels=1)
    trf = temporal_receptive_field(model, frames=21, size=2, iters=3)
    demo = trf.demonstration
    assert trf.verdict == "unbounded" and demo.status == "growth" and "growth demonstrated" in trf.reason
    assert demo.frames > 5000 and np.all(np.isfinite(demo.scales))  # slow: thousands of frames, still finite
    again = replay(LinearRecurrence(1.005, in_channels=1), demo.save(tmp_path / "slow.pt"))
    assert again.status == "growth" and again.periods == demo.periods
    assert np.allclose(again.scales, demo.scales, rtol=1e-5)
    stable = replay(LinearRecurrence(0.5, in_channels=1), tmp_path / "slow.pt")  # the same input, a contraction
    assert not stable.diverged and stable.status == "no growth"


def test_slow_decay_and_marginal_growth_are_inconclusive():
    resolved = temporal_receptive_field(LinearRecurrence(0.95, b=0.2), frames=81, size=2, iters=3)
    assert resolved.verdict == "bounded" and resolved.extent == 41
    assert "lag ≈ 135" in resolved.reason  # ln(1e-6) / (2 ln 0.95) = 134.7
    slow = temporal_receptive_field(LinearRecurrence(0.999, b=0.2), frames=81, size=2, iters=3)
    assert slow.verdict == "inconclusive" and "too slow" in slow.reason, slow.reason
    for model in (LinearRecurrence(1.0, b=0.2), LinearStateModel(jordan_block(1.0, 2))):  # y ~ t and y ~ t²:
        trf = temporal_receptive_field(model, frames=81, size=2, iters=3, replay_frames=4096)  # polynomial growth
        assert trf.verdict == "inconclusive" and trf.demonstration.status == "growing", trf.reason
        assert "still growing" in trf.reason and 1.5 < trf.replay_growth < 5  # ×2 (t) and ×4 (t²) per doubling


def test_non_finite_output_is_unbounded_at_once():
    trf = temporal_receptive_field(NanAfter(5), frames=21, size=4, iters=5)
    assert trf.verdict == "unbounded" and trf.stopped_early and trf.iterations == 1
    assert "non-finite output (first at t = -6)" in trf.reason
    assert trf.demonstration.periods == 1 and torch.equal(trf.demonstration.period, trf.inputs)


# ---------------------------------------------------------------------------------- beyond scalars
@pytest.mark.parametrize("name", [r.name for r in catalogue() if not r.grows])
def test_stable_reference_models_are_never_unbounded(name):
    """Rotations, Jordan blocks of contractions (coupling 50, 5×5), non-normal maps, tanh latches, chaos."""
    (reference,) = [r for r in catalogue() if r.name == name]
    trf = temporal_receptive_field(reference.build(), frames=81, size=2, iters=3, replay_frames=4096)
    assert trf.verdict != "unbounded" and not trf.demonstration.diverged, trf.reason


def test_the_rotation_that_fooled_the_log_slope():
    trf = temporal_receptive_field(LinearStateModel(rotation(0.99, math.pi / 100), B=[1.0, 0.0]), frames=81,
                                   size=2, iters=3)
    assert trf.future_rate > 0.02  # the read-out rises between zero crossings: the old verdict was unbounded
    assert trf.verdict == "bounded" and "no growth found in 2592 frames" in trf.reason, trf.reason


@pytest.mark.parametrize("A, C, frames", [([[0.8, 0.0], [0.0, 1.1]], [1.0, 1e-20], 500),
                                          ([[0.8, 0.0], [0.0, 1.005]], [1.0, 1e-3], 5000)])
def test_growth_behind_a_weak_readout_is_demonstrated(A, C, frames):
    trf = temporal_receptive_field(LinearStateModel(A, C=C), frames=21, size=1, iters=3)
    assert trf.verdict == "unbounded" and trf.demonstration.status == "growth", trf.reason
    # far beyond the 21-frame window (1e-20·1.1^t reaches the read-out's first component near t = 500)
    assert trf.demonstration.frames > frames


def test_a_tanh_latch_is_bounded_and_not_unbounded():
    trf = temporal_receptive_field(TanhLatch(2.0), frames=21, size=4, iters=5)
    assert trf.verdict == "bounded" and "no growth found" in trf.reason, trf.reason


def test_the_demonstration_of_a_whole_sequence_model_replays_in_doublings():
    model = Scaled(LinearRecurrence(1.005, in_channels=1), 1e-3)  # no process(): rerun on 32, 64, … periods
    demo = demonstrate(model, torch.rand(21, 1, 1, 1), max_frames=8192)
    assert demo.status == "growth" and demo.periods == 8192 // 21  # 32, 64, 128, 256 periods: not yet
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        demonstrate(model, torch.full((3, 1, 1, 1), 2.0))


# ---------------------------------------------------------------------------------- VResNet-feat
def test_untrained_vresnet_feat_is_unbounded_and_at_half_norm_bounded(tmp_path, vresnet_feat):
    he = temporal_receptive_field(vresnet_feat(16), frames=41, size=16, iters=20)
    assert he.verdict == "unbounded" and he.stopped_early and he.iterations == 1
    assert he.demonstration.diverged and he.growth_rate > 0.1 and he.future_rate > 0.1 and he.extent == 21
    half = temporal_receptive_field(vresnet_feat(16, conv_norm=0.5), frames=21, size=8, iters=5)
    assert half.verdict == "bounded" and half.extent <= 3, half.reason
    assert half.growth_rate < -1 and half.future_rate < -1 and half.demonstration.status == "no growth"
    path = half.save_png(tmp_path / "trf.png")
    assert path.stat().st_size > 5000
    json.dumps(he.to_dict()), json.dumps(half.to_dict())
    assert half.to_dict()["growth_rate"] == half.growth_rate
    assert half.to_dict()["demonstration"]["status"] == "no growth"


def test_output_scale_changes_nothing(vresnet_feat):
    model = vresnet_feat(8, conv_norm=0.5)
    base = temporal_receptive_field(model, frames=21, size=8, iters=1, replay_frames=21 * MIN_PERIODS)
    big = temporal_receptive_field(Scaled(model, 1e7), frames=21, size=8, iters=1, replay_frames=21 * MIN_PERIODS)
    assert base.verdict == big.verdict == "bounded" and base.extent == big.extent
    assert big.growth_rate == pytest.approx(base.growth_rate, rel=1e-5)
    assert big.future_rate == pytest.approx(base.future_rate, rel=1e-5)
    assert big.replay_growth == pytest.approx(base.replay_growth, rel=1e-4)


def test_finite_window_has_minus_infinite_rates():
    torch.manual_seed(0)
    trf = temporal_receptive_field(build_model("vresnet", "mf3", "denoise", 4), frames=21, size=8, iters=2)
    assert trf.verdict == "bounded" and trf.extent == 3   # causal 3-frame window
    assert trf.growth_rate == -math.inf and trf.future_rate == -math.inf


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="odd.*80"):
        temporal_receptive_field(LinearRecurrence(0.5), frames=80)
    with pytest.raises(ValueError, match="threshold"):
        temporal_receptive_field(LinearRecurrence(0.5), threshold=2.0)
    with pytest.raises(ValueError, match="growth_tol.*-1"):
        temporal_receptive_field(LinearRecurrence(0.5), growth_tol=-1)
    with pytest.raises(ValueError, match="check_every.*0"):
        temporal_receptive_field(LinearRecurrence(0.5), check_every=0)
    with pytest.raises(ValueError, match="replay_frames.*-1"):
        temporal_receptive_field(LinearRecurrence(0.5), replay_frames=-1)
    unreplayed = temporal_receptive_field(LinearRecurrence(0.5), frames=21, size=2, iters=2, replay_frames=0)
    assert unreplayed.verdict == "inconclusive" and unreplayed.demonstration is None  # no growth looked for
