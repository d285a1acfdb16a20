r"""Loop certificates: a proven bound on the recurrence map, and the norm it holds in.

A streaming model is a state map and a read-out, ``s_t = Φ(s_{t-1}, x_t)``, ``y_t = Ψ(s_t, x_t)``.
If, for every input frame x, ``‖Φ(s, x) − Φ(s', x)‖ ≤ L̂ ‖s − s'‖`` in some norm with L̂ < 1,
the recurrence is a contraction (the paper's Definition 2): two runs from different states
converge geometrically, ``‖s_t − s'_t‖ ≤ L̂^t ‖s_0 − s'_0‖``, and for bounded inputs the state
stays bounded, ``‖s_t‖ ≤ L̂‖s_{t-1}‖ + ‖Φ(0, x_t)‖`` — the model is stable, whatever input
it will ever see. That is the only statement this module calls **certified**. The bound
holds for frames of *any* size, because every per-conv factor does (see below).

Ingredients (all Lipschitz constants of maps of the fed-back state, the input held fixed):

- a conv ``b ↦ K * b`` (stride 1, zero padding) is bounded by ``conv_norm(K)``, by default
  :func:`recstab.norms.conv_norm_bound`, an upper bound of sup_ω ‖K̂(ω)‖₂ (the operator
  norm on every input size, zero or circular padding). When a conv reads a concatenation
  ``[a, b]``, the part that sees b alone is the kernel slice ``K[:, b-channels]``:
  ``‖K*[a, b] − K*[a, b']‖ = ‖K_b * (b − b')‖``, so the slice's bound is used;
- biases cancel in differences; ReLU and LeakyReLU are 1-Lipschitz; pixel (un)shuffle is
  a permutation of entries (an isometry); adding a state-independent term (the input frame,
  its bicubic upsampling) changes nothing;
- a composition multiplies bounds (the paper's Proposition 1); a residual block
  ``a + K2 * relu(K1 * [a, b])`` is bounded by ``1 + ‖K2‖‖K1_a‖`` in a and ``‖K2‖‖K1_b‖`` in b;
- feature dampening λ scales the fed-back signal, hence the bound, by |λ|.

**Chain loops** (frame-, RLSP-recurrence): the state goes once through a chain of layers,
so ``L̂ = |λ| · Π_l L_l`` in the Euclidean (ℓ2) norm of the fed-back tensor.

**Triangular loops** (feature-recurrence, DBDNet): the state is the list of block outputs
``(o_1, …, o_D)`` and block l reads the present output of block l−1 and its own past:
``o_l^t = B_l(o_{l-1}^t, λ o_l^{t-1})``, with ``o_0^t`` independent of the state. With
``A_l`` (resp. ``S_l``) the Lipschitz constant of B_l in its first (resp. fed-back) input,
δ_l = ‖Δo_l^t‖ and e_l = ‖Δo_l^{t-1}‖::

    δ_1 ≤ |λ| S_1 e_1,      δ_l ≤ A_l δ_{l-1} + |λ| S_l e_l.

The Jacobian is block lower-triangular, so no single Euclidean bound is small (the trouble
with reporting max_l S_l as "the Lipschitz constant": the cross terms A_l can make
‖J‖₂ ≫ max_l S_l). In the **weighted norm** ``‖s‖_w = max_l w_l ‖o_l‖₂`` it is a
contraction as soon as every self-loop is: put E = ‖Δs^{t-1}‖_w (so e_l ≤ E / w_l), w_1 = 1,
and ``D_1 = |λ|S_1``, ``D_l = |λ|S_l + (w_l / w_{l-1}) A_l D_{l-1}``. By induction
``w_l δ_l ≤ w_l A_l δ_{l-1} + |λ| S_l E ≤ (w_l/w_{l-1}) A_l D_{l-1} E + |λ| S_l E = D_l E``,
hence ``‖Δs^t‖_w ≤ (max_l D_l) · ‖Δs^{t-1}‖_w``:  **L̂ = max_l D_l.**
The weights are chosen to bring every D_l down to a target ρ just above the largest self-loop
m = |λ| max_l S_l (any ρ > m is reachable, the infimum over weights is m):
``w_l / w_{l-1} = min(1, (ρ − |λ|S_l) / (A_l D_{l-1}))``, with ρ = m + min(m/100, (1 − m)/2)
when m < 1 (so that m < 1 is always certified) and ρ = 1.01 m otherwise. The weights are
returned with the certificate, so the claim ``‖J‖_w ≤ L̂`` can be checked by anyone with
Jacobian-vector products (the tests do).

**No loop** (none, multi-frame, feature-shifting, FastDVDnet, BM3D): y_t is a function of a
finite window of inputs, which is BIBO-stable by construction; the certificate says so with
L̂ = 0 (the state holds past inputs only, and forgets them in finitely many frames).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

ConvNorm = Callable[[torch.Tensor], float]  # a conv kernel (c_out×c_in×k×k) -> bound of its operator norm


def default_conv_norm() -> ConvNorm:
    from recstab.norms import conv_norm_bound  # the per-conv theorem (models do not depend on norms at import)
    return conv_norm_bound


def evaluate(rule: Callable[[ConvNorm], LoopCertificate], conv_norm: ConvNorm | None = None) -> LoopCertificate:
    """``rule(conv_norm)``, a model's certificate as a function of its per-conv bound.

    With the default bound (``conv_norm`` None) the kernels the rule bounds are searched together first: the
    rule runs once recording them (every factor 1), :func:`recstab.norms.bound.certified_peaks` proves all of
    them in one batched search per kernel shape, and the rule runs again on the same (now cached) bounds —
    the same certificate, in a fraction of the time of one search per kernel.
    """
    if conv_norm is not None:
        return rule(conv_norm)
    from recstab.norms.bound import certified_peaks, kernels_bounded_by
    try:
        kernels = kernels_bounded_by(rule)
    except Exception:  # noqa: BLE001 - a rule that fails on unit factors fails (and says why) in the real run below
        kernels = []
    certified_peaks(kernels)
    return rule(default_conv_norm())


@dataclass(frozen=True)
class LoopCertificate:
    """A proven upper bound ``bound`` of the recurrence map's Lipschitz constant in ``norm``.

    ``certified`` is ``bound < 1``: the recurrence is a contraction, the model is stable.
    ``weights`` are the block weights w_l of the weighted norm (triangular loops), else None.
    ``factors`` names every factor of the bound (for the report).
    """

    bound: float
    norm: str
    weights: tuple[float, ...] | None = None
    factors: dict = field(default_factory=dict)

    @property
    def certified(self) -> bool:
        return bool(self.bound < 1)

    def to_dict(self) -> dict:
        return {"bound": self.bound, "certified": self.certified, "norm": self.norm,
                "weights": None if self.weights is None else list(self.weights), "factors": self.factors}

    def __str__(self) -> str:
        verdict = "certified stable" if self.certified else "not certified"
        return f"{verdict}: L̂ = {self.bound:.4g} {'<' if self.certified else '≥'} 1 in {self.norm}"


def feedforward_certificate(memory: int | None = None) -> LoopCertificate:
    """No feedback loop: y_t depends on the last ``memory`` input frames only."""
    window = "a finite window of past frames" if memory is None else f"the last {memory} input frame(s)"
    return LoopCertificate(0.0, f"no feedback loop: y_t depends on {window} only (BIBO-stable by construction)")


def unbounded_certificate(reason: str) -> LoopCertificate:
    """A loop for which no finite bound is derived (e.g. an input-dependent warp)."""
    return LoopCertificate(math.inf, f"no bound derived: {reason}")


def chain_certificate(factors: dict[str, float], dampening: float, state: str) -> LoopCertificate:
    """The state passes once through a chain: L̂ = |λ| · Π factors, Euclidean norm of ``state``."""
    bound = abs(dampening) * math.prod(factors.values())
    return LoopCertificate(float(bound), f"Euclidean (ℓ2) norm of {state}",
                           factors={"dampening": abs(dampening), **factors})


def triangular_certificate(main: Sequence[float], own: Sequence[float], dampening: float,
                           state: str = "the block outputs (o_1..o_D)") -> LoopCertificate:
    """Weighted-norm bound of a block-triangular loop (derivation in the module docstring).

    ``main[l]`` = A_l, block l's Lipschitz constant in the present output of block l−1
    (``main[0]`` is unused: block 1 reads a state-independent input); ``own[l]`` = S_l, in
    its own past output.
    """
    if len(main) != len(own) or not own:
        raise ValueError(f"need one (main, own) pair per block, got {len(main)} and {len(own)}")
    lam = abs(dampening)
    self_loops = [lam * s for s in own]
    m = max(self_loops)
    norm = f"weighted norm max_l w_l·‖o_l‖₂ over {state}"
    factors = {"dampening": lam, "self_loops": self_loops, "couplings": list(main[1:])}
    if m == 0:  # the state is not read at all: the map is constant in it
        return LoopCertificate(0.0, norm, tuple(1.0 for _ in own), factors)
    rho = m + min(m / 100, (1 - m) / 2) if m < 1 else 1.01 * m
    weights, bounds = [1.0], [self_loops[0]]
    for a, s in zip(main[1:], self_loops[1:]):
        coupling = a * bounds[-1]
        ratio = 1.0 if coupling <= 0 else min(1.0, (rho - s) / coupling)
        weights.append(weights[-1] * ratio)
        bounds.append(s + ratio * coupling)
    return LoopCertificate(float(max(bounds)), norm, tuple(weights), factors)


def loop_certificate(model, conv_norm: ConvNorm | None = None) -> LoopCertificate:
    """The certificate of any :class:`~recstab.models.interface.VideoModel`: ``.bound``,
    ``.certified`` (bound < 1), ``.norm``. ``conv_norm`` defaults to the per-conv theorem
    :func:`recstab.norms.conv_norm_bound`."""
    if not callable(getattr(model, "loop_certificate", None)):
        raise TypeError(f"{type(model).__name__} is not a recstab VideoModel: it has no loop_certificate(); "
                        "subclass recstab.models.interface.VideoModel")
    return model.loop_certificate(conv_norm)
