"""The loop certificate is a theorem: checked against Jacobian-vector products of the state map.

For every recurrent connection, the Jacobian of the state map s_{t-1} -> s_t at random points
(measured with torch.func.jvp / vjp, in float64) never exceeds the certificate's bound in the
norm the certificate names: Euclidean for chain loops, the weighted block norm for
triangular ones (with the weights the certificate returns).
"""

import math

import pytest
import torch
from torch.func import jvp, vjp

from recstab.diagnostics import loop_certificate
from recstab.models import build_model
from recstab.models.baselines import DBDNet

# (backbone, recurrence, task, state key) of every loop
LOOPS = [("vdncnn", "feat", "denoise", "features"), ("vresnet", "feat", "denoise", "features"),
         ("vresnet", "feat", "sr2", "features"), ("vdncnn", "frame", "denoise", "output"),
         ("vresnet", "frame", "sr2", "output"), ("vresnet", "rlsp", "denoise", "hidden"),
         ("vdncnn", "rlsp-mf3", "denoise", "hidden"), ("dbdnet", "feat", "denoise", "features")]


def tiny(backbone, recurrence, task, gain, seed=0):
    """A 6-channel, 2-block model (DBDNet: 6 features, 3 layers) in float64, kernels × gain."""
    torch.manual_seed(seed)
    if backbone == "dbdnet":
        model = DBDNet(channels=6, depth=3)
    else:
        model = build_model(backbone, recurrence, task, channels=6, depth=2)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.mul_(gain)
            else:
                p.normal_(0, 0.1)  # biases: move the ReLUs off the origin
    return model


def state_map(model, key, frame, state):
    """s_{t-1}[key] -> s_t[key] at a fixed input frame (the rest of the state held fixed)."""
    def advance(fed):
        return model.step(frame, {**state, key: fed})[1][key]
    return advance


def random_point(model, key, size=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 2, model.in_channels, size, size, generator=g, dtype=torch.float64)
    with torch.no_grad():
        _, state = model.process(x[:, :1])  # a state reached by the model itself
    state = {k: (v if not isinstance(v, list) else list(v)) for k, v in state.items()}
    noisy = lambda v: v + torch.randn(v.shape, generator=g, dtype=v.dtype)  # noqa: E731 — off the data manifold too
    fed = [noisy(v) for v in state[key]] if isinstance(state[key], list) else noisy(state[key])
    return x[:, 1], state, fed


def euclidean_growth(f, point, iters=60):
    """max ‖J δ‖ / ‖δ‖ by power iteration on JᵀJ (a lower estimate of ‖J‖₂, converging to it)."""
    _, pullback = vjp(f, point)
    delta = torch.randn_like(point)
    for _ in range(iters):
        delta = delta / delta.norm()
        image = jvp(f, (point,), (delta,))[1]
        delta = pullback(image)[0]
    delta = delta / delta.norm()
    return float(jvp(f, (point,), (delta,))[1].norm())


def weighted_growth(f, point, weights, iters=40):
    """max over δ with max_l w_l‖δ_l‖ = 1 of max_l w_l‖(Jδ)_l‖ (alternating ascent: a lower estimate)."""
    _, pullback = vjp(f, point)
    best = 0.0
    for target in range(len(weights)):
        delta = [torch.randn_like(p) / w for p, w in zip(point, weights)]
        for _ in range(iters):
            delta = tuple(d / d.norm() / w for d, w in zip(delta, weights))  # the extreme point of the ball
            image = jvp(f, (point,), (delta,))[1]
            cotangent = tuple(weights[target] * i if l == target else torch.zeros_like(i)
                              for l, i in enumerate(image))
            delta = pullback(cotangent)[0]
        delta = tuple(d / d.norm() / w for d, w in zip(delta, weights))
        image = jvp(f, (point,), (delta,))[1]
        best = max(best, max(w * float(i.detach().norm()) for w, i in zip(weights, image)))
    return best


@pytest.mark.parametrize("backbone,recurrence,task,key", LOOPS)
@pytest.mark.parametrize("gain", [0.3, 1.0])
def test_certificate_bounds_the_jacobian_in_its_norm(backbone, recurrence, task, key, gain):
    model = tiny(backbone, recurrence, task, gain)
    cert = loop_certificate(model)
    frame, state, fed = random_point(model, key)
    f = state_map(model, key, frame, state)
    if cert.weights is None:
        measured = euclidean_growth(f, fed)
        assert "Euclidean" in cert.norm
    else:
        assert "weighted" in cert.norm and len(cert.weights) == len(fed)
        measured = weighted_growth(lambda s: tuple(f(list(s))), tuple(fed), cert.weights)
    assert 0 < measured <= cert.bound * (1 + 1e-9), (measured, cert)
    assert cert.certified == (cert.bound < 1)


def test_triangular_norm_is_needed_and_the_weights_make_it_hold():
    """Feature-recurrence with small self-loops and strong couplings between blocks: every
    block's own loop is contractive and the certificate holds (weighted norm), while the
    Euclidean Jacobian exceeds 1 — a Euclidean claim of the self-loop bound would be false."""
    model = tiny("vresnet", "feat", "denoise", 1.0)
    with torch.no_grad():
        for block in model.body.blocks:
            block.conv1.weight[:, model.channels:] *= 0.05  # the slice that reads the block's own past
            block.conv1.weight[:, :model.channels] *= 10.0
    cert = loop_certificate(model)
    assert cert.certified
    frame, state, fed = random_point(model, "features")
    f = state_map(model, "features", frame, state)
    sizes = [v.numel() for v in fed]

    def flat_map(z):
        parts = [p.view_as(v) for p, v in zip(z.split(sizes), fed)]
        return torch.cat([o.flatten() for o in f(parts)])

    assert euclidean_growth(flat_map, torch.cat([v.flatten() for v in fed])) > 1
    assert weighted_growth(lambda s: tuple(f(list(s))), tuple(fed), cert.weights) <= cert.bound


def test_certified_model_contracts_from_any_two_states():
    """The theorem end to end: two runs of a certified feat model from different initial states
    approach each other at least as fast as L̂^t in the weighted norm."""
    model = tiny("vresnet", "feat", "denoise", 0.4)
    cert = loop_certificate(model)
    assert cert.certified
    x = torch.rand(1, 12, 3, 10, 10, dtype=torch.float64)
    _, a = model.process(x[:, :1])
    b = {**a, "features": [f + 5 * torch.randn_like(f) for f in a["features"]]}
    wnorm = lambda s, t: max(w * float((p - q).norm()) for w, p, q in zip(cert.weights, s, t))  # noqa: E731
    start = wnorm(a["features"], b["features"])
    with torch.no_grad():
        for t in range(1, 12):
            _, a = model.process(x[:, t:t + 1], a)
            _, b = model.process(x[:, t:t + 1], b)
            assert wnorm(a["features"], b["features"]) <= cert.bound ** t * start * (1 + 1e-9)


def test_dampening_scales_the_bound_and_feedforward_models_are_certified():
    model = tiny("vresnet", "rlsp", "denoise", 1.0)
    full = loop_certificate(model).bound
    model.dampening = 0.25
    assert loop_certificate(model).bound == pytest.approx(0.25 * full)
    for recurrence in ("none", "mf7", "shift"):
        cert = loop_certificate(build_model("vresnet", recurrence, channels=4))
        assert cert.certified and cert.bound == 0.0 and "no feedback loop" in cert.norm
    assert str(loop_certificate(build_model("frvsr"))).startswith("not certified")


# ---------------------------------------------------------------------------------- reference models: the verdicts
def _reference_verdict(reference):
    from recstab.diagnostics import lyapunov_exponent, temporal_receptive_field
    from recstab.diagnostics.engine import decide

    model = reference.build()
    cert = loop_certificate(model)
    trf = temporal_receptive_field(model, frames=21, size=1, iters=3)
    frames = torch.rand(1, 300, model.in_channels, 1, 1, generator=torch.Generator().manual_seed(0))
    lyap = lyapunov_exponent(model, frames.double() if reference.name.startswith("logistic") else frames)
    return model, cert, trf, lyap, decide(cert, trf, None, lyap)


def _catalogue_names():
    from recstab.models.reference import catalogue
    return [r.name for r in catalogue()]


@pytest.mark.parametrize("name", _catalogue_names())
def test_reference_models_are_proven_unstable_only_by_a_replayable_divergence(name, tmp_path):
    """Rotations, Jordan blocks of contractions, weak read-outs, slow growth, tanh latches, the logistic map:
    never "proven unstable" when certified (the demonstration cannot fire on a contraction), proven unstable
    exactly when the output grows exponentially (then the saved demonstration replays), and never
    "empirically stable" when the state grows (λ₁ sees it behind the weak read-outs)."""
    from recstab.diagnostics.demonstration import replay
    from recstab.models.reference import catalogue

    (reference,) = [r for r in catalogue() if r.name == name]
    _, cert, trf, _, (verdict, notes) = _reference_verdict(reference)
    if cert.certified:
        assert verdict == "certified stable" and not trf.demonstration.diverged, trf.reason
    if reference.grows and reference.exponent > 0:  # exponential growth: demonstrated, and replayable
        assert verdict == "proven unstable" and trf.verdict == "unbounded", trf.reason
        assert replay(reference.build(), trf.demonstration.save(tmp_path / "proof.pt")).diverged
    else:
        assert verdict != "proven unstable" and trf.verdict != "unbounded", trf.reason
    if reference.grows:  # exponential or polynomial (the marginal Jordan block, y ~ t²): never stable
        assert verdict not in ("certified stable", "empirically stable"), notes


def test_untrained_vresnet_feat_is_proven_unstable_and_at_half_norm_certified(vresnet_feat):
    from recstab.diagnostics import temporal_receptive_field
    from recstab.diagnostics.engine import decide

    he = vresnet_feat(8)
    trf = temporal_receptive_field(he, frames=21, size=8, iters=3)
    assert decide(loop_certificate(he), trf, None, None)[0] == "proven unstable" and trf.demonstration.diverged
    half = vresnet_feat(8, conv_norm=0.5)
    cert = loop_certificate(half)
    trf = temporal_receptive_field(half, frames=21, size=8, iters=3)
    assert cert.certified and decide(cert, trf, None, None)[0] == "certified stable"
    assert trf.verdict == "bounded" and not trf.demonstration.diverged


def test_no_growth_found_behind_a_weak_readout_is_not_empirically_stable():
    """A replay too short to see the state 1e-20·1.1^t reach the read-out finds no growth: evidence, which λ₁ of
    the state (log 1.1 > 0) overrules; a replay still growing (y ~ t²) overrules a λ₁ just below 0."""
    from recstab.diagnostics import lyapunov_exponent, temporal_receptive_field
    from recstab.diagnostics.engine import decide
    from recstab.models.reference import LinearStateModel, jordan_block

    hidden = LinearStateModel([[0.8, 0.0], [0.0, 1.1]], C=[1.0, 1e-20])
    trf = temporal_receptive_field(hidden, frames=9, size=1, iters=2, replay_frames=9 * 32)
    assert trf.verdict == "bounded" and trf.reason.startswith("no growth found in 288 frames")
    lyap = lyapunov_exponent(hidden, torch.rand(1, 100, 1, 1, 1))
    verdict, notes = decide(loop_certificate(hidden), trf, None, lyap)
    assert lyap.exponent == pytest.approx(math.log(1.1), rel=1e-4) and verdict == "inconclusive"
    assert any("no growth found" in n and "evidence" in n for n in notes)

    marginal = LinearStateModel(jordan_block(1.0, 2))
    trf = temporal_receptive_field(marginal, frames=9, size=1, iters=2, replay_frames=9 * 64)
    assert trf.demonstration.status == "growing" and trf.replay_growth > 2
    class Margin:  # λ₁ measured just below 0 (e.g. on other frames): the replay's growth still wins
        exponent, stderr, positive_ranges = -1e-3, 1e-4, []
    verdict, notes = decide(loop_certificate(marginal), trf, None, Margin())
    assert verdict == "inconclusive" and any("still growing" in n for n in notes)
