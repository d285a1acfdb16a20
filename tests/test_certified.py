"""norm=certified: the loop certificate of the model, computed from its weights alone, is <= rho at every step."""

import copy
import math

import pytest
import torch
from torch.nn.utils import parametrize

from recstab.diagnostics import loop_certificate
from recstab.models import build_model
from recstab.models.certificate import triangular_certificate
from recstab.norms import conv_norm_bound
from recstab.norms.certified import (CERTIFIED_RECURRENCES, MARGIN, CertifiedLoop, bound_tensor, certify, frvsr_step_bounds,
                                     loop_gains, plain_state_dict, self_loop_budget,
                                     warp_l2_bound)

RHO = 0.95


def tiny(recurrence="feat", backbone="vresnet", **kwargs):
    kwargs = {"channels": 8, "depth": 2, "init": "near_identity", **kwargs}
    return build_model(backbone, recurrence, **kwargs)


def clip(batch=2, frames=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, size, size, generator=g)


# ---------------------------------------------------------------------------------------------- the bound
def adversarial_kernel() -> torch.Tensor:
    """A 2→2 3×3 kernel whose frequency response peaks between the points of every lattice."""
    w = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    omega = 2 * math.pi * 0.3137
    for a in range(3):
        for b in range(3):
            w[0, 0, a, b] = math.cos(omega * (a + b)) / 3
            w[1, 1, a, b] = math.sin(omega * (a - b)) / 3
    return w + 0.01 * torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("make", [lambda: torch.randn(8, 16, 3, 3), lambda: torch.randn(16, 8, 3, 3) * 0.1,
                                  adversarial_kernel, lambda: torch.randn(4, 4, 1, 1)])
def test_the_differentiable_bound_is_the_certificates_and_its_gradient_is_right(make):
    """B̃ is never below what certificates use (but for rounding MARGIN covers ten times over), and its
    gradient is the bound's (central finite differences of conv_norm_bound, float64)."""
    torch.manual_seed(0)
    w = make().double()
    assert bound_tensor(w).item() >= conv_norm_bound(w) * (1 - MARGIN / 10)
    w.requires_grad_(True)
    (grad,) = torch.autograd.grad(bound_tensor(w), w)
    direction = torch.randn_like(w)
    eps = 1e-6
    numeric = (conv_norm_bound(w.detach() + eps * direction) - conv_norm_bound(w.detach() - eps * direction)) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(numeric, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("rho", [0.5, 0.8, 0.95, 0.99, 0.999])
def test_self_loop_budget_is_the_largest_self_loop_the_triangular_certificate_keeps_below_rho(rho):
    m = self_loop_budget(rho)
    target = rho * (1 - MARGIN)
    # the certificate's rule today: rho' = m + min(m/100, (1 - m)/2), increasing in m; invert it in closed form
    closed = max(target / 1.01, 2 * target - 1)
    assert m == pytest.approx(closed, rel=1e-9)
    for couplings in ([0.0, 1e6, 1e6], [0.0, 1.0, 3.0], [0.0, 0.0, 0.0]):
        assert triangular_certificate(couplings, [m] * 3, 1.0).bound <= target
    assert triangular_certificate([0.0, 1e6, 1e6], [m * 1.001] * 3, 1.0).bound > target


# ---------------------------------------------------------------------------------------------- certified at every step
def _bounded_slices(model):
    return {id(g): g for g in loop_gains(model)}


@pytest.mark.parametrize("recurrence,depth", [("feat", 2), ("frame", 1), ("rlsp", 1)])
def test_certified_at_every_step_of_a_plain_adam_loop(recurrence, depth):
    """50 Adam steps at lr 1e-2 in plain PyTorch (no Lightning): the certificate
    recomputed from the weights is <= rho after every step, equals the construction's target (the budget is
    spent, not wasted), and the model learns."""
    torch.manual_seed(0)
    model = CertifiedLoop(rho=RHO)(tiny(recurrence, depth=depth))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = clip(frames=3, size=16)
    target = x.clamp(0, 1)
    noisy = x + 0.1 * torch.randn_like(x)
    losses, bounds = [], []
    for step in range(50):
        with parametrize.cached():  # one normalisation per step (correct without it too, only slower)
            loss = torch.nn.functional.mse_loss(model(noisy), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        cert = loop_certificate(model)
        assert cert.certified and cert.bound <= RHO, (step, cert)
        bounds.append(cert.bound)
        expected = max(g.target().item() for g in loop_gains(model))
        if recurrence == "feat":  # the triangular certificate's target for the largest self-loop
            expected = triangular_certificate([0.0, 1e6], [expected, expected], 1.0).bound
        assert cert.bound == pytest.approx(expected, rel=1e-5), step
    assert losses[-1] < 0.7 * losses[0]
    assert len({round(b, 6) for b in bounds}) > 1  # the gains were learned, not frozen


def test_without_the_construction_the_same_loop_is_not_certified():
    """The test above can fail: the same models, unconstrained, are far from certified."""
    for recurrence in ("feat", "frame", "rlsp"):
        assert loop_certificate(tiny(recurrence)).bound > 1


# ---------------------------------------------------------------------------------------------- contraction
def _state_distance(recurrence, a, b, weights):
    if recurrence == "feat":
        return max(w * (x - y).norm().item() for w, x, y in zip(weights, a["features"], b["features"]))
    key = {"frame": "output", "rlsp": "hidden"}[recurrence]
    return (a[key] - b[key]).norm().item()


def _perturbed(recurrence, state, seed):
    g = torch.Generator().manual_seed(seed)
    state = dict(state)
    if recurrence == "feat":
        state["features"] = [f + 3 * torch.randn(f.shape, generator=g) for f in state["features"]]
    else:
        key = {"frame": "output", "rlsp": "hidden"}[recurrence]
        state[key] = state[key] + 3 * torch.randn(state[key].shape, generator=g)
    return state


def _envelope_violations(model, recurrence, rho, frames=12):
    """Run two trajectories (same inputs, different initial states); return the frames where
    ‖Δs_t‖ > rho^t ‖Δs_0‖ in the certificate's norm, and the last distance ratio."""
    cert = loop_certificate(model)
    x = clip(batch=1, frames=frames, size=16, seed=3)
    with torch.no_grad():
        s0 = model.initial_state(x)
        a, b = _perturbed(recurrence, s0, 1), _perturbed(recurrence, s0, 2)
        d0 = _state_distance(recurrence, a, b, cert.weights)
        bad, ratio = [], None
        for t in range(frames):
            _, a = model.step(x[:, t], a)
            _, b = model.step(x[:, t], b)
            ratio = _state_distance(recurrence, a, b, cert.weights) / d0
            if not ratio <= rho ** (t + 1) * (1 + 1e-5):
                bad.append(t)
    return bad, ratio


@pytest.mark.parametrize("recurrence", ["feat", "frame", "rlsp"])
def test_two_trajectories_of_a_certified_model_contract_at_rho_to_the_t(recurrence):
    torch.manual_seed(1)
    rho = 0.8
    model = CertifiedLoop(rho=rho, gain=0.99)(tiny(recurrence, init="he")).eval()
    bad, ratio = _envelope_violations(model, recurrence, rho)
    assert not bad and 0 < ratio  # contracts within the envelope, and the states still differ
    # the check can fail: the unconstrained He-init model leaves the envelope
    torch.manual_seed(1)
    bad, _ = _envelope_violations(tiny(recurrence, init="he").eval(), recurrence, rho)
    assert bad


# ---------------------------------------------------------------------------------------------- composition
@pytest.mark.parametrize("recurrence", CERTIFIED_RECURRENCES)
@pytest.mark.parametrize("backbone", ["vresnet", "vdncnn"])
def test_composes_with_every_recurrence_it_claims(recurrence, backbone):
    torch.manual_seed(0)
    model = CertifiedLoop(rho=0.5)(tiny(recurrence, backbone, init="he"))
    cert = loop_certificate(model)
    assert cert.bound <= 0.5 and cert.certified
    assert model(clip(batch=1, frames=2)).shape == (1, 2, 3, 16, 16)


def test_composes_with_sr2_and_the_dbdnet_baseline():
    torch.manual_seed(0)
    sr = CertifiedLoop(rho=0.5)(tiny("frame", task="sr2", init="he"))
    assert loop_certificate(sr).bound <= 0.5
    dbd = build_model("dbdnet", channels=8, depth=3)
    assert loop_certificate(dbd).bound > 1
    assert loop_certificate(CertifiedLoop(rho=0.5)(dbd)).bound <= 0.5


@pytest.mark.parametrize("recurrence", ["feat", "frame"])
def test_composes_on_top_of_a_base_norm_of_the_whole_model(recurrence):
    """base=SRN-C (a config dict, as Hydra hands it): every conv carries SRN-C, the loop slices LoopGain on top."""
    from recstab.norms import ConvStableRankNorm, normalised_convs

    torch.manual_seed(0)
    base = {"_target_": "recstab.norms.SRNC", "alpha": 2.0, "beta": 1.0}
    model = CertifiedLoop(rho=0.5, base=base)(tiny(recurrence, init="he"))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(normalised_convs(model)) == len(convs)
    assert all(isinstance(n, ConvStableRankNorm) for _, _, n in normalised_convs(model))
    assert len(loop_gains(model)) == (2 if recurrence == "feat" else 1)
    assert loop_certificate(model).bound <= 0.5


@pytest.mark.parametrize("recurrence", ["none", "mf3", "shift"])
def test_refuses_models_without_a_loop_naming_the_valid_ones(recurrence):
    with pytest.raises(ValueError, match=f"{recurrence!r}.*no feedback loop.*valid: recurrence feat, frame, rlsp"):
        CertifiedLoop()(tiny(recurrence))


@pytest.mark.parametrize("backbone", ["frvsr", "fastdvdnet"])
def test_refuses_baselines_it_does_not_cover(backbone):
    with pytest.raises(ValueError, match="valid: recurrence feat.*dbdnet"):
        CertifiedLoop()(build_model(backbone, channels=8))


@pytest.mark.parametrize("kwargs,match", [({"rho": 1.0}, "rho"), ({"rho": 0}, "rho"), ({"rho": "0.9"}, "rho"),
                                          ({"gain": 1.0}, "gain"), ({"loop_only": False}, "loop_only")])
def test_bad_settings_name_the_value_and_what_is_valid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CertifiedLoop(**kwargs)


def test_a_second_norm_on_the_loop_is_refused():
    model = CertifiedLoop()(tiny("feat"))
    with pytest.raises(ValueError, match="only norm"):
        CertifiedLoop()(model)


# ---------------------------------------------------------------------------------------------- weights alone
def test_state_dict_reload_deepcopy_and_baked_weights_keep_the_certificate():
    torch.manual_seed(0)
    model = CertifiedLoop(rho=RHO)(tiny("frame", init="he"))
    with torch.no_grad():
        for g in loop_gains(model):
            g.logit.fill_(3.0)
    x = clip(batch=1)
    # reload into a freshly built certified model (what a checkpoint does)
    fresh = CertifiedLoop(rho=RHO)(tiny("frame", init="he"))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    assert loop_certificate(fresh).bound == pytest.approx(loop_certificate(model).bound, rel=1e-12)
    assert loop_certificate(fresh).bound <= RHO
    # a deepcopy refers to its own partner convs
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.tail.weight.mul_(10)
    assert loop_certificate(twin).bound <= RHO
    assert loop_certificate(model).bound == pytest.approx(loop_certificate(fresh).bound, rel=1e-12)
    # plain convs holding the parametrized weights: the certificate from the weights alone
    plain = tiny("frame", init="he")
    plain.load_state_dict(plain_state_dict(model))  # strict: exactly the plain model's keys
    assert loop_certificate(plain).bound <= RHO
    assert torch.allclose(plain(x), model(x), atol=1e-6)


def test_evaluation_reuses_the_scale_until_a_weight_changes():
    model = CertifiedLoop()(tiny("feat")).eval()
    gain = loop_gains(model)[0]
    with torch.no_grad():
        first = model.body.blocks[0].conv1.weight
        assert gain._cached_key is not None
        again = model.body.blocks[0].conv1.weight
        assert torch.equal(first, again)
        model.body.blocks[0].conv2.weight.mul_(2)  # a partner changes: the slice must shrink
        halved = model.body.blocks[0].conv1.weight[:, 8:]
    assert torch.allclose(halved, first[:, 8:] / 2, rtol=1e-4)


def test_certify_leaves_a_model_within_budget_unchanged_and_shrinks_one_above_it():
    torch.manual_seed(0)
    x = clip(batch=1)
    small = tiny("frame", init="he")
    with torch.no_grad():
        small.body.head.weight[:, 3:].mul_(1e-4)  # loop gain far below 0.95
    before = small(x)
    assert loop_certificate(small).bound < 0.95
    assert torch.allclose(certify(small, 0.95)(x), before, atol=1e-6)
    big = tiny("frame", init="he")
    bound = loop_certificate(big).bound
    assert bound > 1
    certify(big, 0.95)
    assert 0.95 * 0.998 < loop_certificate(big).bound <= 0.95


# ---------------------------------------------------------------------------------------------- FRVSR's warp
def _dense_warp(flow):
    from recstab.models.baselines.frvsr import warp

    h, w = flow.shape[-2:]
    basis = torch.eye(h * w, dtype=flow.dtype).reshape(h * w, 1, h, w)
    return warp(basis, flow.expand(h * w, -1, -1, -1)).reshape(h * w, h * w).T  # column q = image of e_q


@pytest.mark.parametrize("kind", ["random", "gather", "translate", "zero"])
def test_warp_l2_bound_bounds_the_dense_warp_norm(kind):
    h, w = 6, 7
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    flow = {"random": 3 * torch.randn(1, 2, h, w, generator=g, dtype=torch.float64),
            "gather": -torch.stack([xs, ys])[None],               # every output samples pixel (0, 0)
            "translate": torch.full((1, 2, h, w), 2.0, dtype=torch.float64),
            "zero": torch.zeros(1, 2, h, w, dtype=torch.float64)}[kind]
    dense = _dense_warp(flow)
    norm = torch.linalg.matrix_norm(dense, ord=2).item()
    bound = warp_l2_bound(flow).item()
    assert norm <= bound * (1 + 1e-12)
    assert torch.allclose(dense.sum(1), torch.ones(h * w, dtype=torch.float64))  # rows sum to 1: ℓ∞ non-expansive
    if kind == "gather":
        assert norm == pytest.approx(math.sqrt(h * w)) == pytest.approx(bound)  # tight: not ℓ2 non-expansive
    if kind == "zero":
        assert bound == pytest.approx(1.0)
    if kind == "translate":
        assert bound > 1.5  # border clamping piles samples on the last rows/columns


def test_frvsr_step_bounds_bound_the_measured_growth_of_the_state_map():
    torch.manual_seed(0)
    model = build_model("frvsr", channels=8, depth=2).eval()
    x = clip(batch=1, frames=4, size=16)
    bounds = frvsr_step_bounds(model, x)
    assert bounds.shape == (3,) and torch.isfinite(bounds).all()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in range(1, 4):
            y = torch.randn(1, 3, 16, 16, generator=g)
            dy = 1e-3 * torch.randn(1, 3, 16, 16, generator=g)
            out = model.denoise(x[:, t], x[:, t - 1], y + dy) - model.denoise(x[:, t], x[:, t - 1], y)
            assert out.norm() <= bounds[t - 1] * dy.norm()


# ---------------------------------------------------------------------------------------------- Lightning
@pytest.mark.slow
def test_cli_smoke_run_checkpoint_reloaded_is_certified_from_its_weights(tmp_path, run_script):
    """`python src/train.py norm=certified norm.rho=0.9 debug=smoke`: the reloaded checkpoint's model, and a plain
    model holding its weights, are certified <= rho."""
    from recstab.lit.module import VideoRestorationModule

    result = run_script("train.py", ["debug=smoke", f"hydra.run.dir={tmp_path}", "norm=certified", "norm.rho=0.9",
                                     "logger=csv"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    module = VideoRestorationModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    model = module.model.eval()
    assert loop_gains(model) and loop_certificate(model).bound <= 0.9
    plain = build_model(model.backbone_name, model.recurrence, channels=model.channels, init="near_identity")
    plain.load_state_dict(plain_state_dict(model))
    assert loop_certificate(plain).bound <= 0.9


# ---------------------------------------------------------------------------------------------- the sweep
def test_sweep_certified_is_the_default_recipe_and_fills_each_row_once(compose, sweep_jobs):
    from pathlib import Path

    from recstab.report.rows import best_row
    from recstab.report.tables import Run, load_paper

    cfg = compose("train", ["sweep=certified"])
    default = compose("train", [])
    assert (cfg.trainer.max_steps, cfg.model.channels, cfg.recurrence.name) == (
        default.trainer.max_steps, default.model.channels, default.recurrence.name)
    rows = load_paper("certified")["rows"]
    identities = [r["identity"] for r in rows]
    hits = []
    for overrides in sweep_jobs(cfg):
        job = compose("train", ["sweep=certified", *overrides])
        hits.append(rows[best_row(Run(Path("."), job, {}, " ".join(overrides)), identities)]["name"])
        if job.norm.name == "certified":
            assert CertifiedLoop(**{k: v for k, v in job.norm.items() if k != "_target_"}).rho == job.norm.rho
            assert job.norm.base.alpha == 2.0 and job.norm.base.beta == 0.1  # the default base: SRN-C Soft
    by_hand = [r["name"] for r in rows if r["name"].endswith("base=null")]
    assert sorted(hits) == sorted(r["name"] for r in rows if r["name"] not in by_hand)
    for rho in (0.5, 0.8, 0.95, 0.99):  # the loop slices alone: norm.base=null, one row each
        job = compose("train", ["norm=certified", "norm.base=null", f"norm.rho={rho}"])
        assert rows[best_row(Run(Path("."), job, {}, "x"), identities)]["name"] == f"certified ρ={rho}, base=null"
