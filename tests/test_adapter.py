"""Diagnose your own model: three recurrent architectures the project does not ship, written here in the
style of published ones, wrapped with :mod:`recstab.models.adapter` in a few lines and diagnosed end to end
through :func:`recstab.diagnostics.stability_report`.

- a ConvGRU denoiser (gated: no chain certificate, L̂ = ∞; its loop convs are declared for the spectra);
- an RLSP-style ×2 super-resolution cell (Fuoli et al.: the last hidden features fed back to the head,
  output by pixel shuffle on a bilinear residual): a plain chain, ``certificate="chain"``;
- a BasicVSR-style forward propagation branch (Chan et al.: the propagated features warped by a flow,
  fused with the frame, a stack of residual blocks): a certificate written with ``chain_certificate``.

The certificates are checked against Jacobian-vector products of the state map, their factors against
dense-matrix spectra; the verdicts against contraction-scaled and exploding versions of the same models.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recstab.diagnostics import VERDICTS, loop_certificate, stability_report
from recstab.models.adapter import ClipModel, StepModel
from recstab.models.certificate import chain_certificate
from recstab.models.interface import StreamingNotSupported

F_ = 8  # feature channels of every test model

# tiny settings: every section runs in about a second (see tests/test_diagnostics.py)
FAST = dict(trf_kwargs=dict(frames=11, size=8, iters=2), spectra_n=8,
            lyapunov_kwargs=dict(frames=30, size=8, burn_in=5))


def clean_frames(n=12, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) for _ in range(n)]


def conv(c_in, c_out):
    return nn.Conv2d(c_in, c_out, 3, padding=1)


# ---------------------------------------------------------------------------------- three architectures
class ConvGRUDenoiser(nn.Module):
    """Encoder, a convolutional GRU cell (Ballas et al.), decoder; residual output."""

    def __init__(self, channels=3, features=F_):
        super().__init__()
        self.encode = conv(channels, features)
        self.gates = conv(2 * features, 2 * features)   # update z and reset r from [e, h]
        self.candidate = conv(2 * features, features)   # from [e, r·h]
        self.decode = conv(features, channels)

    def forward(self, frame, h):
        e = F.relu(self.encode(frame))
        z, r = torch.sigmoid(self.gates(torch.cat([e, h], 1))).chunk(2, 1)
        h = (1 - z) * h + z * torch.tanh(self.candidate(torch.cat([e, r * h], 1)))
        return frame - self.decode(h), h


class RLSPCell(nn.Module):
    """RLSP-style ×2 VSR cell: [frame, h_{t-1}] -> conv-ReLU × layers = h_t -> pixel shuffle + bilinear."""

    def __init__(self, channels=3, features=F_, layers=3):
        super().__init__()
        self.head = conv(channels + features, features)
        self.body = nn.ModuleList(conv(features, features) for _ in range(layers - 1))
        self.to_pixels = conv(features, 4 * channels)
        self.features = features

    def forward(self, frame, h):
        if h is None:  # the cell makes its own initial state (wrapped with initial_state=None)
            h = frame.new_zeros(frame.shape[0], self.features, *frame.shape[-2:])
        h = F.relu(self.head(torch.cat([frame, h], 1)))
        for layer in self.body:
            h = F.relu(layer(h))
        upsampled = F.interpolate(frame, scale_factor=2, mode="bilinear", align_corners=False)
        return upsampled + F.pixel_shuffle(self.to_pixels(h), 2), h


def flow_warp(features, flow):
    """Bilinear warp by a flow (B×2×H×W, pixels, (dx, dy)), zero outside: BasicVSR's flow_warp."""
    b, _, h, w = features.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=features.dtype), torch.arange(w, dtype=features.dtype),
                            indexing="ij")
    x = (xs + flow[:, 0]) * 2 / max(w - 1, 1) - 1
    y = (ys + flow[:, 1]) * 2 / max(h - 1, 1) - 1
    return F.grid_sample(features, torch.stack([x, y], -1), mode="bilinear", padding_mode="zeros",
                         align_corners=True)


class ResidualBlockNoBN(nn.Module):
    def __init__(self, features=F_):
        super().__init__()
        self.conv1, self.conv2 = conv(features, features), conv(features, features)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class ForwardPropagation(nn.Module):
    """BasicVSR-style forward branch: warp h_{t-1} by the flow (zero, or a given constant
    translation), fuse with the frame (conv + LeakyReLU), residual blocks = h_t; reconstruct."""

    def __init__(self, channels=3, features=F_, blocks=2, flow=None):
        super().__init__()
        self.fuse = conv(channels + features, features)
        self.blocks = nn.ModuleList(ResidualBlockNoBN(features) for _ in range(blocks))
        self.reconstruct, self.to_pixels = conv(features, features), conv(features, channels)
        self.flow, self.channels = flow, channels

    def forward(self, frame, h):
        if self.flow is not None:
            b, _, height, width = h.shape
            h = flow_warp(h, h.new_tensor(self.flow).view(1, 2, 1, 1).expand(b, 2, height, width))
        h = F.leaky_relu(self.fuse(torch.cat([frame, h], 1)), 0.1)
        for block in self.blocks:
            h = block(h)
        return frame + self.to_pixels(F.leaky_relu(self.reconstruct(h), 0.1)), h


class WholeClipForward(nn.Module):
    """The same branch as a module whose forward takes the whole clip (BasicVSR's forward(lqs))."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, lqs):
        h = lqs.new_zeros(lqs.shape[0], F_, *lqs.shape[-2:])
        outputs = []
        for t in range(lqs.shape[1]):
            y, h = self.cell(lqs[:, t], h)
            outputs.append(y)
        return torch.stack(outputs, 1)


# ---------------------------------------------------------------------------------- the few lines a user writes
def zeros_state(frame):
    return frame.new_zeros(frame.shape[0], F_, *frame.shape[-2:])


def wrap_convgru(cell):
    return StepModel(cell, in_channels=3, initial_state=zeros_state,
                     loop_convs=[(cell.gates, slice(F_, None)), (cell.candidate, slice(F_, None))])


def wrap_rlsp(cell):
    return StepModel(cell, in_channels=3, task="sr2",
                     loop_convs=[(cell.head, slice(3, None)), *cell.body], certificate="chain")


def wrap_basicvsr(cell):
    def bound(conv_norm, dampening):  # warp -> fuse -> residual blocks, a chain in the l2 norm of h
        # the warp by a constant translation: every source pixel gives away bilinear weights summing to <= 1
        # (rows and columns of W sum to <= 1), so ||W||_2 <= 1 (Schur test); a general flow needs sqrt(c_t)
        # (recstab.norms.certified.warp_l2_bound)
        factors = {"warp": 1.0, "fuse": conv_norm(cell.fuse.weight[:, 3:])}
        for i, b in enumerate(cell.blocks):
            factors[f"block{i}"] = 1 + conv_norm(b.conv2.weight) * conv_norm(b.conv1.weight)
        return chain_certificate(factors, dampening, "the propagated features h")

    return StepModel(cell, in_channels=3, initial_state=zeros_state, certificate=bound,
                     loop_convs=[(cell.fuse, slice(3, None))] + [c for b in cell.blocks for c in (b.conv1, b.conv2)])


ARCHITECTURES = {  # name -> (model, the clip it reads)
    "convgru": lambda: wrap_convgru(ConvGRUDenoiser()),
    "rlsp": lambda: wrap_rlsp(RLSPCell()),
    "basicvsr": lambda: wrap_basicvsr(ForwardPropagation(flow=(0.5, -0.25))),
}


def build(name, gain=1.0, seed=0):
    """The wrapped model with every conv kernel × gain."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.mul_(gain)
    return model


def scale_loop_to(model, target):
    """Scale every declared loop conv by the same factor so that the chain bound becomes ``target``."""
    convs = model.recurrent_convs()
    factor = (target / loop_certificate(model).bound) ** (1 / len(convs))
    with torch.no_grad():
        for c in convs:
            c.weight.mul_(factor)
    return model


def report(model, tmp_path, **kwargs):
    return stability_report(model, tmp_path, clean_frames=clean_frames(24), **{**FAST, **kwargs})


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_wrapped_model_streams_chunk_by_chunk_as_a_whole(name):
    model = build(name).eval()
    x = torch.rand(2, 7, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(x)
        first, state = model.process(x[:, :3])
        rest, _ = model.process(x[:, 3:], state)
    assert whole.shape == (2, 7, 3, 12 * model.scale, 12 * model.scale)
    assert torch.equal(torch.cat([first, rest], 1), whole)
    assert not torch.equal(rest, model.process(x[:, 3:])[0])  # the carried state matters: a real recurrence


def test_convgru_denoiser_end_to_end(tmp_path):
    model = build("convgru")
    rep = report(model, tmp_path)
    assert all(s["status"] == "done" for s in rep.sections.values()) and len(rep.sections) == 5
    assert rep.verdict in VERDICTS
    # gates multiply the state: no chain, no bound derived, so never "certified"
    assert rep.bound == math.inf and not rep.certificate.certified and "no bound derived" in rep.certificate.norm
    # the GRU's state is a convex combination of h and tanh(·) ∈ [-1, 1]: it cannot diverge, and
    # the measured λ₁ decides
    assert rep.verdict == ("empirically stable" if rep.lyapunov.exponent < 0 else "inconclusive")
    assert rep.onsets.onsets == [] and rep.trf.verdict != "unbounded"
    in_loop = {r["name"] for r in rep.convs if r["in_loop"]}
    assert in_loop == {"module.gates", "module.candidate"} and len(rep.convs) == 4
    assert model.name == "ConvGRUDenoiser" and "recurrent=True, loop_convs=2" in repr(model)


def test_rlsp_cell_chain_certificate_and_verdicts(tmp_path):
    model = build("rlsp")
    cert = loop_certificate(model)
    assert list(cert.factors) == ["dampening", "head[3:11]", "body.0", "body.1"]
    assert math.isfinite(cert.bound) and cert.bound == pytest.approx(math.prod(cert.factors.values()))
    rep = report(model, tmp_path / "he")
    assert rep.verdict in VERDICTS and rep.bound == pytest.approx(cert.bound)
    assert {r["name"] for r in rep.convs if r["in_loop"]} == {"module.head", "module.body.0", "module.body.1"}

    contracted = report(scale_loop_to(build("rlsp"), 0.5), tmp_path / "contraction")
    assert contracted.bound == pytest.approx(0.5) and contracted.verdict == "certified stable"
    assert contracted.lyapunov.exponent < math.log(0.5) + 1e-9  # a contraction by 0.5 forgets at least that fast

    from recstab.norms import apply_norm  # stabilising your own model: SRN-C on the declared loop convs
    normalised = apply_norm(build("rlsp", gain=3.0), "srnc", alpha=0.9, n=16, loop_only=True)
    assert loop_certificate(normalised).bound <= 0.9 ** 3 * 1.01 and loop_certificate(normalised).certified

    exploding = report(build("rlsp", gain=3.0), tmp_path / "exploding")
    assert exploding.bound > 1 and exploding.verdict not in ("certified stable", "empirically stable")
    assert exploding.verdict == "proven unstable" and exploding.trf.verdict == "unbounded"


def test_basicvsr_branch_end_to_end_with_a_written_certificate(tmp_path):
    model = build("basicvsr")
    rep = report(model, tmp_path / "he")
    assert rep.verdict in VERDICTS and all(s["status"] == "done" for s in rep.sections.values())
    cert = rep.certificate
    assert list(cert.factors) == ["dampening", "warp", "fuse", "block0", "block1"]
    assert cert.bound > 1 and all(cert.factors[f"block{i}"] >= 1 for i in range(2))  # residual: 1 + ‖K2‖‖K1‖

    exploding = report(build("basicvsr", gain=3.0), tmp_path / "exploding")
    assert exploding.verdict not in ("certified stable", "empirically stable")
    assert exploding.verdict == "proven unstable" and exploding.lyapunov.exponent > 0

    damped = report(build("basicvsr", gain=3.0), tmp_path / "damped", dampening=0.0, lyapunov_kwargs={"frames": 0})
    assert damped.bound == 0.0 and damped.verdict == "certified stable"  # λ = 0 cuts the loop


def test_whole_clip_module_is_diagnosed_without_streaming(tmp_path):
    cell = build("basicvsr").module
    stepped = wrap_basicvsr(cell)
    clip = ClipModel(WholeClipForward(cell), in_channels=3, certificate=stepped._rule)
    x = torch.rand(1, 5, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(clip(x), stepped(x))
    with pytest.raises(StreamingNotSupported, match="WholeClipForward"):
        clip.process(x)
    rep = report(clip, tmp_path)
    assert rep.verdict in VERDICTS and rep.sections["trf"]["status"] == "done"
    assert rep.sections["lyapunov"]["status"].startswith("skipped") and rep.sections["onsets"]["status"].startswith("skipped")
    assert rep.bound == pytest.approx(loop_certificate(stepped).bound) and rep.settings["dampening"] is None


def test_clip_module_that_carries_its_state_streams():
    class Propagate(nn.Module):  # forward(clip, state) -> (outputs, state): streams chunk by chunk
        def __init__(self, cell):
            super().__init__()
            self.cell = cell

        def forward(self, lqs, h=None):
            h = zeros_state(lqs[:, 0]) if h is None else h
            outputs = []
            for t in range(lqs.shape[1]):
                y, h = self.cell(lqs[:, t], h)
                outputs.append(y)
            return torch.stack(outputs, 1), h

    cell = build("basicvsr").module
    model = ClipModel(Propagate(cell), in_channels=3, carries_state=True)
    x = torch.rand(1, 6, 3, 10, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first, state = model.process(x[:, :2])
        rest, _ = model.process(x[:, 2:], state)
        assert torch.equal(torch.cat([first, rest], 1), model(x)) and torch.equal(model(x), wrap_basicvsr(cell)(x))
    assert model.streamable and model.dampening is None and loop_certificate(model).bound == math.inf


# ---------------------------------------------------------------------------------- the certificate is a theorem
def state_growths(model, frame, h, directions=12, iters=40):
    """‖J v‖/‖v‖ of the state map h ↦ step(frame, h)[1] for random v, and the power-iteration
    maximum (a lower estimate of ‖J‖₂), by double-backward JVPs and VJPs (float64)."""
    def advance(s):
        return model.step(frame, s)[1]

    def jv(v):
        return torch.autograd.functional.jvp(advance, h, v)[1]

    g = torch.Generator().manual_seed(5)
    ratios = [float(jv(v).norm() / v.norm()) for v in
              (torch.randn(h.shape, generator=g, dtype=h.dtype) for _ in range(directions))]
    v = torch.randn(h.shape, generator=g, dtype=h.dtype)
    for _ in range(iters):
        v = v / v.norm()
        v = torch.autograd.functional.vjp(advance, h, jv(v))[1]
    v = v / v.norm()
    return ratios, float(jv(v).norm())


@pytest.mark.parametrize("name", ["rlsp", "basicvsr"])
@pytest.mark.parametrize("dampening", [1.0, 0.5])
def test_certificate_bounds_the_state_maps_jacobian(name, dampening):
    model = build(name).double().eval()
    model.dampening = dampening
    cert = loop_certificate(model)
    assert cert.factors["dampening"] == dampening and "Euclidean" in cert.norm
    g = torch.Generator().manual_seed(4)
    frame = torch.rand(1, 3, 9, 9, generator=g, dtype=torch.float64)
    h = torch.randn(1, F_, 9, 9, generator=g, dtype=torch.float64)  # a point off the data manifold too
    ratios, top = state_growths(model, frame, h)
    assert 0 < max(ratios) <= top * (1 + 1e-6)
    assert top <= cert.bound * (1 + 1e-9), (top, cert)


def test_certificate_is_tight_where_the_loop_is_linear():
    """A one-conv RLSP loop with every ReLU active (large biases) is the linear map h ↦ K_h * h: the
    power iteration reaches the bound up to the 9×9 map's boundary; a bound that counted the frame's
    part of the kernel or missed the dampening would be off by far more."""
    torch.manual_seed(0)
    cell = RLSPCell(layers=1)
    with torch.no_grad():
        cell.head.bias.fill_(100.0)
        cell.head.weight[:, :3] *= 20
    model = wrap_rlsp(cell).double().eval()
    g = torch.Generator().manual_seed(4)
    frame = torch.rand(1, 3, 9, 9, generator=g, dtype=torch.float64)
    h = torch.randn(1, F_, 9, 9, generator=g, dtype=torch.float64)
    for dampening in (1.0, 0.5):
        model.dampening = dampening
        bound = loop_certificate(model).bound
        _, top = state_growths(model, frame, h, iters=100)
        assert 0.9 * bound <= top <= bound, (dampening, top, bound)


def circular_operator_norm(weight, n=10):
    """‖W‖₂ of the circular conv with this kernel on n×n maps: the dense matrix, column by column."""
    c_in = weight.shape[1]
    eye = torch.eye(c_in * n * n, dtype=torch.float64).reshape(-1, c_in, n, n)
    columns = F.conv2d(F.pad(eye, (1, 1, 1, 1), mode="circular"), weight.detach().double())
    return float(torch.linalg.matrix_norm(columns.reshape(c_in * n * n, -1), 2))


def test_chain_factors_are_the_state_slices_operator_norms():
    """Each factor bounds the operator norm of the part of the kernel that reads the state, and no more:
    the frame's part of the head kernel, made large here, is not counted."""
    model = build("rlsp")
    with torch.no_grad():
        model.module.head.weight[:, :3] *= 20
    factors = loop_certificate(model).factors
    parts = {"head[3:11]": model.module.head.weight[:, 3:], "body.0": model.module.body[0].weight,
             "body.1": model.module.body[1].weight}
    for key, weight in parts.items():
        dense = circular_operator_norm(weight)
        # above every map size's norm; within the grid's 1/cos(π(kh+kw−2)/(2n)) = 1/cos(36°) of n = 10's
        assert dense <= factors[key] <= dense / math.cos(math.pi / 5) * 1.01, key
    assert circular_operator_norm(model.module.head.weight) > 2 * factors["head[3:11]"]


# ---------------------------------------------------------------------------------- bad wrapping
class ReturnsOutputOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv(3, 3)

    def forward(self, frame, state):
        return self.conv(frame)


class ReturnsStateFirst(RLSPCell):
    def forward(self, frame, h):
        y, h = super().forward(frame, h)
        return h, y


def test_bad_wrapping_is_a_clear_value_error():
    cell = RLSPCell()
    with pytest.raises(ValueError, match=r"in_channels=1.*Is in_channels right"):
        StepModel(cell, in_channels=1, task="sr2")
    with pytest.raises(ValueError, match=r"shape \(1, 3, 64, 64\).*expected \(1, 3, 32, 32\).*'denoise'"):
        StepModel(cell, in_channels=3)  # an ×2 cell declared as a denoiser
    with pytest.raises(ValueError, match="returned a Tensor; expected a pair"):
        StepModel(ReturnsOutputOnly(), in_channels=3)
    with pytest.raises(ValueError, match=r"shape \(1, 8, 32, 32\).*expected \(1, 3, 64, 64\)"):
        StepModel(ReturnsStateFirst(), in_channels=3, task="sr2")
    with pytest.raises(ValueError, match="in_channels must be an int >= 1.*'3'"):
        StepModel(cell, in_channels="3", task="sr2")
    with pytest.raises(ValueError, match="unknown task 'sr4'"):
        StepModel(cell, in_channels=3, task="sr4")
    with pytest.raises(ValueError, match="step_module must be a torch.nn.Module.*function"):
        StepModel(lambda frame, h: (frame, h), in_channels=3)
    with pytest.raises(ValueError, match=r"loop_convs\[0\] is a Linear"):
        StepModel(cell, in_channels=3, task="sr2", loop_convs=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"loop_convs\[1\] .* is not a submodule"):
        StepModel(cell, in_channels=3, task="sr2", loop_convs=[cell.head, conv(8, 8)])
    with pytest.raises(ValueError, match=r"loop_convs\[0\] \(head\): channels range\(3, 20\)"):
        StepModel(cell, in_channels=3, task="sr2", loop_convs=[(cell.head, range(3, 20))])
    with pytest.raises(ValueError, match="certificate='chain' needs loop_convs"):
        StepModel(cell, in_channels=3, task="sr2", certificate="chain")
    with pytest.raises(ValueError, match="certificate must be None, 'chain' or a function.*'triangular'"):
        StepModel(cell, in_channels=3, task="sr2", loop_convs=[cell.head], certificate="triangular")
    model = StepModel(cell, in_channels=3, task="sr2", loop_convs=[cell.head], certificate=lambda norm, lam: 0.5)
    with pytest.raises(ValueError, match="returned a float; expected a .*LoopCertificate"):
        loop_certificate(model)
    with pytest.raises(ValueError, match=r"expected input B×T×3×H×W, got shape \(1, 4, 1, 8, 8\)"):
        model(torch.rand(1, 4, 1, 8, 8))  # a grey clip into an RGB model
    with pytest.raises(ValueError, match=r"WholeClipForward failed on a 1×2×1×32×32 zero clip \(in_channels=1"):
        ClipModel(WholeClipForward(ForwardPropagation()), in_channels=1)


def test_cell_without_feedback_is_certified_by_its_finite_memory(tmp_path):
    class TwoFrameWindow(nn.Module):  # the state is the previous input frame: no loop
        def __init__(self):
            super().__init__()
            self.conv = conv(6, 3)

        def forward(self, frame, previous):
            return frame + self.conv(torch.cat([frame, previous], 1)), frame

    model = StepModel(TwoFrameWindow(), in_channels=3, initial_state=torch.zeros_like, recurrent=False)
    assert loop_certificate(model).bound == 0.0 and model.recurrent_convs() == []
    rep = stability_report(model, tmp_path, trf_kwargs=dict(frames=11, size=8, iters=2), spectra_n=8,
                           lyapunov_kwargs=dict(frames=8, size=8, burn_in=2))
    assert rep.verdict == "certified stable" and rep.trf.extent <= 2 and rep.lyapunov.exponent == -math.inf
    with pytest.raises(ValueError, match="certificate='chain' was given for a model declared not recurrent"):
        StepModel(TwoFrameWindow(), in_channels=3, initial_state=torch.zeros_like, recurrent=False,
                  loop_convs=[], certificate="chain")
