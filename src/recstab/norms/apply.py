"""Put a weight normalisation on a model's convs, and take it off again.

    apply_norm(model, "srnc", alpha=2.0, beta=0.1)   # every nn.Conv2d; loop_only=True: the recurrent ones
    with torch.nn.utils.parametrize.cached():          # one normalisation per optimisation step,
        loss = loss_fn(model(clip), target)            # not one per frame of the BPTT unroll
    refresh(model)                                     # before validation, checkpointing, export
    bake(model)                                        # plain convs holding the normalised weights

Each normalised conv gets a `torch.nn.utils.parametrize` parametrization on its
`weight` (SpectralNorm, StableRankNorm or ConvStableRankNorm); the raw kernel is
`conv.parametrizations.weight.original` and the power-iteration vector the buffer
`conv.parametrizations.weight[0].u`, so both travel in state_dict / Lightning
checkpoints. Apply the norm before loading a state dict. Loading *plain* weights
into a normalised model (e.g. a checkpoint trained without the norm) leaves u
stale: call `refresh(model)` after it.
"""

import warnings
from collections.abc import Iterable

import torch.nn as nn
from torch.nn.utils import parametrize

from .sn import PowerIterationNorm, SpectralNorm, check_alpha, check_beta, check_iters
from .srn import StableRankNorm
from .srnc import ConvStableRankNorm

NORM_KINDS = ("none", "sn", "srn", "srnc")


def _targets(model: nn.Module, loop_only: bool, modules: Iterable[nn.Module] | None) -> list[tuple[str, nn.Conv2d]]:
    names = {id(module): name for name, module in model.named_modules()}
    if modules is not None:
        if loop_only:
            raise ValueError("pass either loop_only=True or an explicit `modules` list, not both")
        chosen = list(modules)
    elif loop_only:
        if not callable(getattr(model, "recurrent_convs", None)):
            raise ValueError(f"loop_only=True needs model.recurrent_convs() (the convs inside the recurrent "
                             f"loop); {type(model).__name__} has no such method")
        chosen = list(model.recurrent_convs())
    else:
        chosen = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    for module in chosen:
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"only nn.Conv2d layers can be normalised, got {type(module).__name__}")
        if id(module) not in names:
            raise ValueError(f"conv {module} is not a submodule of the model")
    unique = list({id(module): module for module in chosen}.values())
    return [(names[id(module)], module) for module in unique]


def apply_norm(model: nn.Module, kind: str, alpha: float = 1.0, beta: float = 1.0, n: int = 64,
               power_iters: int = 1, loop_only: bool = False,
               modules: Iterable[nn.Conv2d] | None = None) -> nn.Module:
    """Normalise the weights of `model`'s convs in place and return `model`.

    kind: "none" (nothing), "sn" (Miyato, reshaped kernel, to α), "srn" (Sanyal, reshaped
        kernel, α and β), "srnc" (SRN-C, the conv operator on an n×n map, α and β).
    alpha: target spectral norm (> 0). beta: target stable rank as a fraction of its
        maximum, in (0, 1]; 1 = spectral normalisation only ("sn" has no β: it must be 1).
    n: feature-map side of the operator SRN-C normalises (>= kernel size; unused by sn/srn).
    power_iters: power-iteration steps per optimisation step (>= 1; for srnc: batched
        per-frequency steps on half of the frequencies, see srnc.py).
    loop_only: only the convs `model.recurrent_convs()` returns (those inside the recurrent loop).
    modules: an explicit list of nn.Conv2d of the model instead.

    sn/srn start from the exact top singular vector of the reshaped kernel; srnc from
    per-frequency power iterations and exact SVDs of the top frequencies, so the operator
    norm is α from the first training step on (and in eval mode, exactly, at any time).
    """
    if not isinstance(kind, str) or kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; valid kinds: {', '.join(NORM_KINDS)}")
    alpha, beta, power_iters = check_alpha(alpha), check_beta(beta), check_iters(power_iters)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (side of the feature map SRN-C normalises on) must be an int >= 1, got {n!r}")
    if not isinstance(loop_only, bool):
        raise ValueError(f"loop_only must be true or false, got {loop_only!r}")
    if kind == "sn" and beta != 1:
        raise ValueError(f"kind 'sn' has no stable-rank target, so beta must be 1, got {beta}; "
                         "use kind 'srn' (reshaped kernel) or 'srnc' (conv operator) for beta < 1")
    if kind == "none":
        return model
    targets = _targets(model, loop_only, modules)
    if not targets:
        raise ValueError(f"no nn.Conv2d to normalise in {type(model).__name__} "
                         f"(loop_only={loop_only}, modules={'given' if modules is not None else None})")
    for name, conv in targets:  # check every layer before touching any
        if parametrize.is_parametrized(conv, "weight"):
            raise ValueError(f"conv {name!r} already has a weight parametrization; "
                             "call remove_norm(model) or bake(model) first")
        if kind == "srnc":
            if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
                raise ValueError(f"srnc normalises stride-1, undilated, ungrouped convs; conv {name!r} has "
                                 f"stride={conv.stride}, dilation={conv.dilation}, groups={conv.groups} "
                                 "(exclude it with modules=[...] or loop_only=True)")
            kh, kw = conv.kernel_size
            if n < max(kh, kw):
                raise ValueError(f"n={n} is smaller than the {kh}×{kw} kernel of conv {name!r}; "
                                 f"valid: n >= {max(kh, kw)}")
    for name, conv in targets:
        weight = conv.weight.detach()
        if kind == "sn":
            norm = SpectralNorm(weight, alpha, power_iters)
        elif kind == "srn":
            norm = StableRankNorm(weight, alpha, beta, power_iters)
        else:
            norm = ConvStableRankNorm(weight, alpha, beta, n, power_iters)
        if kind != "sn" and beta <= norm.beta_floor(weight):
            warnings.warn(f"conv {name!r}: beta={beta} is at or below {norm.beta_floor(weight):.3g}, the share of "
                          "the stable rank its rank-one part S1 alone takes at least; the weight becomes the "
                          "constant alpha*S1 (no gradient, spectral norm not guaranteed). Raise beta or exclude "
                          "the layer (loop_only=True or modules=[...])", stacklevel=2)
        parametrize.register_parametrization(conv, "weight", norm)
    return model


def normalised_convs(model: nn.Module) -> list[tuple[str, nn.Module, PowerIterationNorm]]:
    """(name, conv, norm) for every conv of `model` whose weight carries one of our norms."""
    found = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for norm in module.parametrizations.weight:
                if isinstance(norm, PowerIterationNorm):
                    found.append((name, module, norm))
    return found


def refresh(model: nn.Module, iters: int = 50, exact: bool = True) -> nn.Module:
    """Bring every power-iteration vector up to date with its current kernel.

    exact=True (default) sets u to the exact top singular vector (an SVD of the reshaped
    kernel for sn/srn; for srnc the exact FFT spectrum, ~0.5 s for a 64-channel layer at
    n = 64 on a CPU, which eval mode then reuses), after which the normalised weight has
    spectral norm α to float precision. exact=False runs `iters` more power iterations
    instead. For sn/srn call it before validation, checkpointing and export (one power
    iteration per step lags a training kernel); srnc tracks its kernel exactly and
    computes eval weights from the exact spectrum, so it needs it only after loading
    plain weights into a normalised model (the next training steps' warm starts).
    """
    for _, module, norm in normalised_convs(model):
        norm.refresh(module.parametrizations.weight.original, iters, exact)
    return model


def bake(model: nn.Module) -> nn.Module:
    """Replace every normalisation by a plain weight equal to the normalised one (eval value).

    The output is unchanged (bit for bit against the eval-mode output before baking);
    the power iteration does not advance, so call `refresh(model)` first for an exact α.
    """
    for _, module, norm in normalised_convs(model):
        was_training = norm.training
        norm.eval()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        norm.train(was_training)
        norm._frozen = None
    return model


def remove_norm(model: nn.Module) -> nn.Module:
    """Remove every normalisation and give each conv back its raw (unnormalised) kernel."""
    for _, module, _ in normalised_convs(model):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return model
