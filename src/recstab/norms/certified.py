r"""Certified stable by construction: ``python src/train.py norm=certified norm.rho=0.95``.

:class:`CertifiedLoop` re-parametrises the few kernel slices through which the fed-back state
enters a model, so that the model's own loop certificate (:func:`recstab.diagnostics.loop_certificate`,
built in :mod:`recstab.models.certificate`), computed from the weights alone, is at most ρ < 1 for
*every* value of the raw parameters: at initialisation, after every optimiser step (Lightning or a
plain PyTorch loop), after a checkpoint reload. Everything else — the head's view of the current
frames, the main path of every block, the tail — stays free, so the feed-forward denoiser is the
unconstrained one.

Notation. B(K) is the per-conv bound :func:`recstab.norms.conv_norm_bound`: S(K) ≤ B(K) ≤ (1 + r)·S(K),
S(K) = sup_ω ‖K̂(ω)‖₂ ≥ the operator norm of the conv on every input size, zero or circular padding, r its
relative slack (0.0048 for the n = 64 lattice bound, rtol = 5e-4 for a certified search). B̃ is a
differentiable version with B̃(K) ≥ B(K) (below). For a kernel slice V, a target τ and a product P of
the other factors of the same loop product (recomputed from the current weights, and differentiated),
the **normalised slice** is ``V·c``, c = τ/(B̃(V)·P). S is positively homogeneous, so
``B(V·c) ≤ (1 + r)·c·S(V) ≤ (1 + r)·τ/P``, and ``B(V·c) = τ/P`` up to rounding when B is homogeneous
itself (the lattice bound is; a certified search is, unless it settles on another peak of a rescaled
kernel). Each normalised slice carries a learnable logit θ and a target ``τ = budget · sigmoid(θ)`` <
budget, ``budget = (1 − MARGIN) ×`` what ρ allows; MARGIN = 1e-3 covers a search's slack (2·rtol) and
the float32 rounding of V·c (~1e-6). Hence the certificate, recomputed from the weights, is ≤ ρ.

**feat** (``FeatureRecurrence``; VResNet blocks ``o_l = a + K2 * relu(K1 * [a, λ·o_l^{t−1}])``,
VDnCNN blocks ``o_l = relu(K * [a, λ·o_l^{t−1}])``, a = o_{l−1}^t). The map bounded is the state map
(o_1^{t−1} … o_D^{t−1}) ↦ (o_1^t … o_D^t), input frame fixed, in the weighted norm
``‖s‖_w = max_l w_l ‖o_l‖₂`` of the certificate. Its theorem (module docstring of
:mod:`recstab.models.certificate`): with self-loops S_l (Lipschitz constant of block l in its own past
output, here ``S_l = B(K2_l)·B(K1_l[:, C:])``, resp. ``B(K_l[:, C:])``) and couplings A_l (in the
present output of block l−1), the bound is ``max_l D_l ≤ ρ'(m)``, m = |λ| max_l S_l, whatever the
couplings: they only set the weights w. ρ'(m) is the certificate's target, increasing in m
(m + min(m/100, (1 − m)/2) today); :func:`self_loop_budget` inverts it numerically through
``triangular_certificate`` itself, so the budget follows any change of that rule. The side slice
K1_l[:, C:] (resp. K_l[:, C:]) is normalised with P = B̃(K2_l) (resp. 1): S_l ≤ budget·sigmoid(θ_l) <
m*, hence L̂ ≤ ρ'(m*) ≤ ρ. The main path (K1_l[:, :C], K2_l: A_l) is free.

**frame** (``FrameRecurrence``). The map bounded is ``y_{t−1} ↦ y_t`` in the Euclidean (ℓ2) norm of
the fed-back output frame: y_t = x_t + T * B_D(… B_1(H * [x_t, unshuffle(λ·y_{t−1})])), a chain, so
(Proposition 1 of the paper) ``L̂ = |λ| · B(H[:, fed:]) · Π_l A_l · B(T)`` with A_l = 1 + B(K2_l)B(K1_l)
(VResNet: a residual block is never below 1) or B(K_l) (VDnCNN). The head's fed slice H[:, fed:] is
normalised with P = Π_l Ã_l · B̃(T): L̂ < |λ|·budget ≤ ρ. **rlsp** (``RLSP``, and ``birlsp`` per
direction; with any multi-frame window): the same for ``h_{t−1} ↦ h_t``, ℓ2 norm of the fed-back
hidden features, without the tail (it is outside the loop). Every block and the tail stay free: the
price of their gain is paid by the fed slice alone, which is the only factor the feed-forward path
does not use. **DBDNet** (feature-recurrent like feat, VDnCNN-like layers): its own-past slices are
normalised with P = 1, weighted norm as for feat.

All bounds hold for |λ| ≤ 1 (feature dampening only shrinks them) and on frames of every size.

**FRVSR's flow warp** (not covered; why, and what would cover it). FRVSR feeds back
``W_t(λ y_{t−1})``, W_t the bilinear backward warp with the flow FNet(x_{t−1}, x_t): the flow depends
on the inputs only, so for a given clip W_t is a fixed linear map, the same on every channel, with
non-negative entries a_pq and row sums 1 (border padding clamps each sample point into the image, so
its ≤ 4 bilinear weights stay inside and sum to 1). Hence ``‖W_t‖_∞ = 1`` (non-expansive in ℓ∞) and,
by the Schur test (‖W‖₂² ≤ ‖W‖₁‖W‖_∞), ``‖W_t‖₂ ≤ √c_t``, c_t = max_q Σ_p a_pq the largest total
bilinear weight any source pixel receives (:func:`warp_l2_bound`; attained by a flow that gathers every
output at one pixel: √(HW)). Per frame the state map is then Lipschitz in ℓ2 with
``L_t ≤ |λ|·√c_t·B(H[:, C:])·Π_l A_l·B(T)`` (:func:`frvsr_step_bounds`), and two runs from different
states satisfy ‖Δy_t‖ ≤ (Π_s L_s)‖Δy_0‖ on that clip. That is a certificate *of a clip*, not of the
model: c_t grows when the flow converges, and with FNet's |flow| < 24 px the worst case over all clips
is c_t ≤ 49² (only outputs within 24 px reach a source pixel), i.e. a factor 49 — and even a plain
translation piles the clamped samples on the border pixels (c_t = 1 + shift). Certifying FRVSR for
every input by construction therefore needs a change inside the model (it cannot be a weight
parametrization: the gate depends on the flow): multiply the warped frame by g_t = 1/√c_t (per clip
of the batch, c_t from the same flow, no gradient needed through it), so that ‖g_t W_t‖₂ ≤ 1, and
let ``FRVSR.loop_certificate`` return the chain bound |λ|·B(H[:, C:])·Π A_l·B(T); this class would then
normalise FRVSR's head slice exactly as for frame. Until then it refuses FRVSR.

The differentiable bound B̃ is ``conv_norm_bound_tensor`` of :mod:`recstab.norms.bound`: the same number
as ``conv_norm_bound`` with the gradient of its peak's σ₁. The parametrization references the partner
convs of the model (not as submodules, so nothing is duplicated in state_dict; a deepcopy of the whole
model copies the references consistently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from recstab.norms.bound import certified_peaks, conv_norm_bound, conv_norm_bound_tensor, kernels_bounded_by

MARGIN = 1e-3     # relative room below rho: the per-conv bound's own slack on a rescaled kernel (≤ its rtol) and float32 rounding
CERTIFIED_RECURRENCES = ("feat", "frame", "rlsp", "birlsp", "rlsp-mf3", "rlsp-mf7", "birlsp-mf3",
                         "birlsp-mf7")  # of the vdncnn and vresnet backbones; plus the dbdnet baseline


def bound_tensor(weight: torch.Tensor) -> torch.Tensor:
    """B̃(weight) = ``conv_norm_bound_tensor(weight)``: ``conv_norm_bound(weight)`` (what certificates use)
    as a differentiable 0-dim float64 tensor."""
    return conv_norm_bound_tensor(weight)


def self_loop_budget(rho: float) -> float:
    """The largest self-loop m whose triangular certificate is ≤ rho·(1 − MARGIN), whatever the couplings.

    Found by bisection on :func:`recstab.models.certificate.triangular_certificate` with huge couplings
    (they make every D_l reach the certificate's target ρ'(m), its worst case).
    """
    from recstab.models.certificate import triangular_certificate

    target = rho * (1 - MARGIN)
    bound = lambda m: triangular_certificate([0.0, 1e6, 1e6], [m, m, m], 1.0).bound  # noqa: E731
    lo, hi = 0.0, target
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bound(mid) <= target else (lo, mid)
    return lo


class LoopGain(nn.Module):
    """Parametrization of a conv weight: its input-channel slice ``[start:]`` (where the fed-back state
    enters) is rescaled so that ``B(slice) · Π partners ≤ budget · sigmoid(logit)``; the rest is free.

    ``partners``: (kind, module) pairs whose bounds multiply the slice's in the loop's bound: ``("conv",
    conv)`` contributes B(conv.weight), ``("block", block)`` the block's Lipschitz constant in its main
    input, ``block.lipschitz(B̃)[0]`` (the certificate's own formula).
    """

    def __init__(self, weight: torch.Tensor, start: int, budget: float, gain: float,
                 partners: tuple = ()):
        super().__init__()
        if not 0 <= start < weight.shape[1]:
            raise ValueError(f"slice start {start} outside the {weight.shape[1]} input channels")
        self.start, self.budget = int(start), float(budget)
        self.logit = nn.Parameter(torch.tensor(math.log(gain / (1 - gain)), dtype=weight.dtype,
                                               device=weight.device))
        self._partners = tuple(partners)  # plain attribute: the modules belong to the model, not to us

    def partner_product(self, bound=bound_tensor) -> torch.Tensor:
        """Π of the partners' factors, each conv bounded by ``bound`` (default B̃)."""
        product = torch.ones((), dtype=torch.float64)
        for kind, module in self._partners:
            factor = bound(module.weight) if kind == "conv" else module.lipschitz(bound)[0]
            product = product * factor
        return product

    def _search_together(self, loop: torch.Tensor) -> None:
        """Prove the bounds of the slice and of every partner kernel in one batched search (the certificates
        are cached by value, so the differentiable bounds that follow find them)."""
        certified_peaks([loop.detach(), *kernels_bounded_by(self.partner_product)])

    def target(self) -> torch.Tensor:
        """budget · sigmoid(logit): the bound the slice's loop product is normalised to."""
        return self.budget * torch.sigmoid(self.logit.to(torch.float64))

    def _inputs_key(self, weight: torch.Tensor) -> tuple:
        """Changes whenever any tensor the scale depends on does (in-place updates bump ``_version``)."""
        tensors = [weight, self.logit] + [p for _, module in self._partners for p in module.parameters()]
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        free, loop = weight[:, :self.start], weight[:, self.start:]
        key = None if torch.is_grad_enabled() else self._inputs_key(weight)
        if key is not None and key == getattr(self, "_cached_key", None):
            scale = self._cached_scale  # evaluation without parametrize.cached(): once per weight change
        else:
            with parametrize.cached():   # each partner weight computed once below, however often it is read
                self._search_together(loop)
                scale = self.target() / (bound_tensor(loop) * self.partner_product().to(loop.device))
            self._cached_key, self._cached_scale = key, (scale.detach() if key is not None else None)
        return torch.cat([free, loop * scale.to(loop.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f"start={self.start}, budget={self.budget:.6g}, partners={len(self._partners)}"


@dataclass
class CertifiedLoop:
    """``norm(model)``: make ``loop_certificate(model).bound <= rho`` hold by construction (theorem in
    the module docstring). What ``conf/norm/certified.yaml`` instantiates.

    rho: the certified contraction factor, in (0, 1).
    gain: the fraction of the budget each normalised slice starts at, in (0, 1); learned after
        (``budget · sigmoid(logit)``).
    loop_only: must be true (the construction never touches the feed-forward path).
    base: a norm object (or its config dict) put on the model first, e.g. ``SRNC(alpha=2, beta=0.1)``:
        a regulariser of the whole model; the loop slices are then normalised on top of it (the
        certificate reads the composed weights, so the theorem is unchanged).
    """

    name: str = "certified"   # the label of runs and report rows
    rho: float = 0.95
    gain: float = 0.9
    loop_only: bool = True    # always: only the loop's entry slices are normalised (for sweeps that set it)
    base: object = None       # a norm applied first to the whole model (e.g. recstab.norms.SRNC), or None

    def __post_init__(self) -> None:
        if self.loop_only is not True:
            raise ValueError(f"norm=certified constrains only the recurrent loop: loop_only must be true, "
                             f"got {self.loop_only!r}")
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not 0 < self.rho < 1:
            raise ValueError(f"rho must be a number in (0, 1) (a certified contraction factor), got {self.rho!r}")
        if isinstance(self.gain, bool) or not isinstance(self.gain, (int, float)) or not 0 < self.gain < 1:
            raise ValueError(f"gain must be a number in (0, 1) (the initial fraction of the budget), got {self.gain!r}")
        self.rho, self.gain = float(self.rho), float(self.gain)

    def plan(self, model: nn.Module) -> list[tuple[nn.Conv2d, int, float, tuple]]:
        """(conv, slice start, budget, partners) for every slice to normalise; a ValueError for a
        model whose loop this construction does not cover."""
        from recstab.models.backbones import ConvReLU, ResidualBlock
        from recstab.models.baselines import DBDNet
        from recstab.models.connections import FeatureRecurrence, FrameRecurrence, RLSP
        from recstab.models.temporal import BidirectionalVideoModel, RecurrentVideoModel

        if isinstance(model, BidirectionalVideoModel):  # each direction's loop, as its own model
            return self.plan(model.causal) + self.plan(model.anticausal)
        valid = (f"recurrence {', '.join(CERTIFIED_RECURRENCES)} of the vdncnn and vresnet backbones, "
                 "and the dbdnet baseline")
        if isinstance(model, DBDNet):
            f, c, last = model.channels, model.in_channels, len(model.multi) - 1
            budget = self_loop_budget(self.rho)
            return [(conv, conv.in_channels - (c if l == last else f), budget, ())
                    for l, conv in enumerate(model.multi)]
        connection = getattr(model, "connection", None)
        if not isinstance(model, RecurrentVideoModel) or not isinstance(
                connection, (FeatureRecurrence, FrameRecurrence, RLSP)):
            what = getattr(model, "recurrence", None) if isinstance(model, RecurrentVideoModel) else type(model).__name__
            hint = (" (FRVSR's loop runs through a flow warp: see recstab.norms.certified's docstring)"
                    if type(model).__name__ == "FRVSR" else
                    " (it has no feedback loop: its certificate is already L̂ = 0)"
                    if not getattr(model, "is_recurrent", True) else "")
            raise ValueError(f"norm=certified cannot certify {what!r}{hint}; valid: {valid}")
        if isinstance(connection, FeatureRecurrence):
            budget, c = self_loop_budget(self.rho), model.channels
            plan = []
            for block in model.body.blocks:
                if isinstance(block, ResidualBlock):
                    plan.append((block.conv1, c, budget, (("conv", block.conv2),)))
                elif isinstance(block, ConvReLU):
                    plan.append((block.conv, c, budget, ()))
                else:
                    raise ValueError(f"norm=certified: unknown block {type(block).__name__}; valid: {valid}")
            return plan
        budget, fed_from = self.rho * (1 - MARGIN), model.in_channels * model.window
        tail = (("conv", model.tail),) if isinstance(connection, FrameRecurrence) else ()
        return [(model.body.head, fed_from, budget, tuple(("block", b) for b in model.body.blocks) + tail)]

    def __call__(self, model: nn.Module) -> nn.Module:
        plan = self.plan(model)
        for conv, *_ in plan:  # check every layer before touching any
            if parametrize.is_parametrized(conv, "weight"):
                raise ValueError(f"a loop conv of {type(model).__name__} already has a weight parametrization; "
                                 "norm=certified must be the model's only norm")
        if self.base is not None:
            from recstab.norms import make_norm
            make_norm(self.base)(model)
        for conv, start, budget, partners in plan:
            gain = LoopGain(conv.weight.detach(), start, budget, self.gain, partners)
            parametrize.register_parametrization(conv, "weight", gain)
        return model


def certify(model: nn.Module, rho: float = 0.95) -> nn.Module:
    """Put :class:`CertifiedLoop` on a TRAINED model, changing it as little as possible: each slice keeps
    its trained loop gain when that is within the budget (the model is then unchanged: scale 1), and is
    shrunk to the budget (0.999 of it) otherwise. The starting point of a certified fine-tune."""
    CertifiedLoop(rho=rho)(model)
    with torch.no_grad():
        for conv, _, _, _ in CertifiedLoop(rho=rho).plan(model):
            raw, (gain,) = conv.parametrizations.weight.original, conv.parametrizations.weight
            fraction = min(float(bound_tensor(raw[:, gain.start:]) * gain.partner_product()) / gain.budget, 0.999)
            gain.logit.fill_(math.log(fraction / (1 - fraction)))
    return model


def loop_gains(model: nn.Module) -> list[LoopGain]:
    """The :class:`LoopGain` parametrizations of a model (empty if it is not certified by construction)."""
    return [p for m in model.modules() if parametrize.is_parametrized(m, "weight")
            for p in m.parametrizations.weight if isinstance(p, LoopGain)]


def plain_state_dict(model: nn.Module) -> dict:
    """The state dict of the same model without parametrizations: every parametrized weight as the plain
    ``<conv>.weight`` it computes (the weights a certificate reads), the learned logits dropped. It loads
    into a freshly built model without ``norm=certified``; that model's certificate is the same."""
    names = {name for name, m in model.named_modules() if parametrize.is_parametrized(m, "weight")}
    plain = {}
    for key, value in model.state_dict().items():
        owner, _, rest = key.partition(".parametrizations.weight.")
        if owner in names or (not owner and "" in names and rest):
            continue  # the raw weight and the parametrization's own tensors
        plain[key] = value
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in names:
                plain[f"{name}.weight" if name else "weight"] = module.weight.detach().clone()
    return plain


# ------------------------------------------------------------------------------------------ FRVSR's warp
def warp_column_sums(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row sums W·1, column sums Wᵀ·1) of FRVSR's bilinear warp with ``flow`` (B×2×H×W), each B×H×W.

    Wᵀ·1 is the gradient of Σ warp(u, flow) with respect to u: the exact weights grid_sample gives.
    """
    from recstab.models.baselines.frvsr import warp

    ones = torch.ones(flow.shape[0], 1, *flow.shape[-2:], dtype=flow.dtype, device=flow.device,
                      requires_grad=True)
    with torch.enable_grad():
        rows = warp(ones, flow.detach())
        (columns,) = torch.autograd.grad(rows.sum(), ones)
    return rows.detach()[:, 0], columns[:, 0]


def warp_l2_bound(flow: torch.Tensor) -> torch.Tensor:
    """Per clip of the batch: an upper bound of the ℓ2 operator norm of the warp with ``flow``,
    √(max row sum · max column sum) (Schur test; row sums are 1, so √(largest total weight any
    source pixel receives)). Shape B."""
    rows, columns = warp_column_sums(flow)
    return (rows.flatten(1).amax(1) * columns.flatten(1).amax(1)).sqrt()


def frvsr_step_bounds(model: nn.Module, clip: torch.Tensor) -> torch.Tensor:
    """L_t, t = 1…T−1: a proven bound of the Lipschitz constant (ℓ2 norm of the output frame) of
    FRVSR's state map y_{t−1} ↦ y_t on this clip (B×T×C×H×W; the largest over the batch), frame 0 has
    no past. ``|λ|·‖W_t‖₂-bound·B(H[:, C:])·Π_l(1 + B(K2_l)B(K1_l))·B(T)`` (module docstring)."""
    c = model.in_channels
    chain = conv_norm_bound(model.head.weight[:, c:].detach())
    for block in model.blocks:
        chain *= block.lipschitz(conv_norm_bound)[0]
    chain *= conv_norm_bound(model.tail.weight.detach()) * abs(model.dampening)
    with torch.no_grad():
        flows = [model.flow(clip[:, t - 1], clip[:, t]) for t in range(1, clip.shape[1])]
    return torch.stack([warp_l2_bound(f).max() * chain for f in flows])


__all__ = ["CertifiedLoop", "LoopGain", "certify", "loop_gains", "plain_state_dict", "bound_tensor",
           "self_loop_budget", "warp_l2_bound", "warp_column_sums", "frvsr_step_bounds", "MARGIN",
           "CERTIFIED_RECURRENCES"]
