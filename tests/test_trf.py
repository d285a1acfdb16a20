"""The TRF stress test: verdicts from rates (past influence AND future growth), never from magnitudes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from recstab.diagnostics import temporal_receptive_field
from recstab.models import build_model
from recstab.models.reference import LinearRecurrence


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
    """c · model(x): the same dynamics at another output scale."""

    def __init__(self, model, c):
        super().__init__()
        self.model, self.c, self.in_channels = model, c, model.in_channels

    def forward(self, x):
        return self.c * self.model(x)


# ---------------------------------------------------------------------------------- linear recurrences
def test_contraction_is_bounded_with_the_predicted_extent_and_rates():
    model = LinearRecurrence(0.5, b=0.2)
    model.train()
    trf = temporal_receptive_field(model, frames=81, size=8, iters=10)
    assert trf.verdict == "bounded" and not trf.stopped_early and trf.iterations == 10
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
@pytest.mark.parametrize("a", [0.3, 0.83, 0.85, 0.95])
def test_stable_recurrences_are_never_unbounded_whatever_the_scale(a, b):
    trf = temporal_receptive_field(LinearRecurrence(a, b), frames=81, size=8, iters=5)
    assert trf.verdict == "bounded", trf.reason
    assert not trf.stopped_early and trf.iterations == 5
    assert trf.growth_rate == pytest.approx(math.log(a), rel=1e-3)
    assert trf.future_rate == pytest.approx(math.log(a), rel=1e-2)
    # the extent is where 0.25^k-like decay a^(2k) crosses 1e-6, capped by the window
    assert trf.extent == min(41, 1 + math.floor(math.log(1e-6) / (2 * math.log(a)) - 1e-9))


@pytest.mark.parametrize("b", [1e-6, 1.0, 1e7])
@pytest.mark.parametrize("a", [1.05, 1.5])
def test_expanding_recurrences_are_unbounded_and_stop_early(a, b):
    trf = temporal_receptive_field(LinearRecurrence(a, b), frames=81, size=8, iters=50)
    assert trf.verdict == "unbounded" and trf.unbounded and trf.stopped_early and trf.iterations == 1
    assert trf.extent == 41 and "x_-40 drives p" in trf.reason
    assert trf.growth_rate == pytest.approx(math.log(a), rel=1e-4)
    assert trf.future_rate == pytest.approx(math.log(a), rel=1e-4)


def test_slow_decay_fills_the_window_and_is_resolved_or_inconclusive():
    resolved = temporal_receptive_field(LinearRecurrence(0.95, b=0.2), frames=81, size=4, iters=3)
    assert resolved.verdict == "bounded" and resolved.extent == 41
    assert "lag ≈ 135" in resolved.reason  # ln(1e-6) / (2 ln 0.95) = 134.7
    for a in (0.999, 1.0):  # a decay of 0.1 %/frame cannot be told from none in 40 frames
        trf = temporal_receptive_field(LinearRecurrence(a, b=0.2), frames=81, size=4, iters=3)
        assert trf.verdict == "inconclusive" and "too slow" in trf.reason, trf.reason
        assert abs(trf.growth_rate - math.log(a)) < 1e-6


def test_non_finite_output_is_unbounded_at_once():
    trf = temporal_receptive_field(NanAfter(5), frames=21, size=4, iters=5)
    assert trf.verdict == "unbounded" and trf.stopped_early and trf.iterations == 1
    assert "non-finite output (first at t = -6)" in trf.reason


# ---------------------------------------------------------------------------------- VResNet-feat
def test_untrained_vresnet_feat_is_unbounded_and_at_half_norm_bounded(tmp_path, vresnet_feat):
    he = temporal_receptive_field(vresnet_feat(16), frames=41, size=16, iters=20)
    assert he.verdict == "unbounded" and he.stopped_early and he.iterations == 1
    assert he.growth_rate > 0.1 and he.future_rate > 0.1 and he.extent == 21
    half = temporal_receptive_field(vresnet_feat(16, conv_norm=0.5), frames=41, size=16, iters=5)
    assert half.verdict == "bounded" and half.extent <= 3, half.reason
    assert half.growth_rate < -1 and half.future_rate < -1
    path = half.save_png(tmp_path / "trf.png")
    assert path.stat().st_size > 5000
    json.dumps(he.to_dict()), json.dumps(half.to_dict())
    assert half.to_dict()["growth_rate"] == half.growth_rate


def test_output_scale_changes_nothing(vresnet_feat):
    model = vresnet_feat(8, conv_norm=0.5)
    base = temporal_receptive_field(model, frames=21, size=8, iters=1)  # the same X: exact invariance
    big = temporal_receptive_field(Scaled(model, 1e7), frames=21, size=8, iters=1)
    assert base.verdict == big.verdict == "bounded" and base.extent == big.extent
    assert big.growth_rate == pytest.approx(base.growth_rate, rel=1e-5)
    assert big.future_rate == pytest.approx(base.future_rate, rel=1e-5)


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
