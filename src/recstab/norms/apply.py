"""Put a weight normalisation on a model's convs, and take it off again.

    SRNC(alpha=2.0, beta=0.1)(model)                 # what conf/norm/srnc.yaml instantiates (_target_)
    apply_norm(model, "srnc", alpha=2.0, beta=0.1)   # the same by name; loop_only=True: the recurrent convs
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

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .sn import PowerIterationNorm, SpectralNorm, check_alpha, check_beta, check_iters
from .srn import StableRankNorm
from .srnc import ConvStableRankNorm

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


@dataclass
class WeightNorm:
    """A weight normalisation as a value: ``norm(model)`` puts it on the model's convs, in place.

    What ``conf/norm/<name>.yaml`` instantiates (``_target_``) and ``build_model(norm=...)`` calls.
    A new norm is a subclass that defines :meth:`parametrization` (one nn.Module per conv,
    registered with ``torch.nn.utils.parametrize``) plus one config file; nothing else changes.
    """

    name: str = "none"        # the label of runs and report rows (run_name, src/report.py)
    loop_only: bool = False   # only the convs inside the recurrent loop (model.recurrent_convs())

    def __post_init__(self) -> None:
        if not isinstance(self.loop_only, bool):
            raise ValueError(f"loop_only must be true or false, got {self.loop_only!r}")

    def parametrization(self, weight: torch.Tensor) -> nn.Module | None:
        """The parametrization of one conv's weight (None: leave the conv alone)."""
        return None

    def check(self, name: str, conv: nn.Conv2d) -> None:
        """Raise a ValueError if conv `name` cannot carry this norm (called for every conv before any is touched)."""

    def __call__(self, model: nn.Module, modules: Iterable[nn.Conv2d] | None = None) -> nn.Module:
        if type(self).parametrization is WeightNorm.parametrization:
            return model  # the unconstrained model
        targets = _targets(model, self.loop_only, modules)
        if not targets:
            raise ValueError(f"no nn.Conv2d to normalise in {type(model).__name__} "
                             f"(loop_only={self.loop_only}, modules={'given' if modules is not None else None})")
        for name, conv in targets:  # check every layer before touching any
            if parametrize.is_parametrized(conv, "weight"):
                raise ValueError(f"conv {name!r} already has a weight parametrization; "
                                 "call remove_norm(model) or bake(model) first")
            self.check(name, conv)
        for name, conv in targets:
            norm = self.parametrization(conv.weight.detach())
            beta = getattr(self, "beta", 1.0)
            if beta < 1 and beta <= norm.beta_floor(conv.weight.detach()):
                warnings.warn(f"conv {name!r}: beta={beta} is at or below {norm.beta_floor(conv.weight):.3g}, the "
                              "share of the stable rank its rank-one part S1 alone takes at least; the weight becomes its "
                              "rank-one part scaled to norm alpha (beta cannot be reached). Raise beta or exclude "
                              "the layer (loop_only=True or modules=[...])", stacklevel=2)
            parametrize.register_parametrization(conv, "weight", norm)
        return model


@dataclass
class NoNorm(WeightNorm):
    """No weight normalisation: the unconstrained baseline."""

    name: str = "none"


@dataclass
class SN(WeightNorm):
    """Spectral normalisation of the reshaped c_out × (c_in·k·k) kernel (Miyato et al.) to ``alpha``.
    It does not bound the conv operator (its norm ends up 1.5-3× alpha: the paper's Table 3)."""

    name: str = "sn"
    alpha: float = 1.0        # target largest singular value of the reshaped kernel (> 0)
    power_iters: int = 1      # power-iteration steps per optimisation step (>= 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha, self.power_iters = check_alpha(self.alpha), check_iters(self.power_iters)

    def parametrization(self, weight: torch.Tensor) -> nn.Module:
        return SpectralNorm(weight, self.alpha, self.power_iters)


@dataclass
class SRN(SN):
    """Stable rank normalisation of the reshaped kernel (Sanyal et al. 2020; the paper's Algorithm 1)."""

    name: str = "srn"
    beta: float = 1.0         # target stable rank / min(c_out, c_in·k·k), in (0, 1]; 1 = spectral norm only

    def __post_init__(self) -> None:
        super().__post_init__()
        self.beta = check_beta(self.beta)

    def parametrization(self, weight: torch.Tensor) -> nn.Module:
        return StableRankNorm(weight, self.alpha, self.beta, self.power_iters)


@dataclass
class SRNC(SRN):
    """SRN-C: stable rank normalisation of the conv OPERATOR on an n×n map (the paper's Algorithm 2,
    corrected: :mod:`recstab.norms.srnc`). ``alpha`` < 1 with ``beta`` = 1 is the Hard constraint."""

    name: str = "srnc"
    alpha: float = 2.0        # target spectral norm of every normalised conv operator (> 0)
    beta: float = 0.1         # target stable rank / (n²·min(c_in, c_out)), in (0, 1]; 1 = spectral norm only
    n: int = 64               # side of the n×n map the operator acts on (>= kernel); checkpoints load only with the same n

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n (side of the feature map SRN-C normalises on) must be an int >= 1, got {self.n!r}")

    def check(self, name: str, conv: nn.Conv2d) -> None:
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError(f"srnc normalises stride-1, undilated, ungrouped convs; conv {name!r} has "
                             f"stride={conv.stride}, dilation={conv.dilation}, groups={conv.groups} "
                             "(exclude it with modules=[...] or loop_only=True)")
        kh, kw = conv.kernel_size
        if self.n < max(kh, kw):
            raise ValueError(f"n={self.n} is smaller than the {kh}×{kw} kernel of conv {name!r}; "
                             f"valid: n >= {max(kh, kw)}")

    def parametrization(self, weight: torch.Tensor) -> nn.Module:
        return ConvStableRankNorm(weight, self.alpha, self.beta, self.n, self.power_iters)


NORMS = {cls.name: cls for cls in (NoNorm, SN, SRN, SRNC)}  # the kinds apply_norm takes by name
NORM_KINDS = tuple(NORMS)


def make_norm(norm: "WeightNorm | dict | None") -> WeightNorm:
    """A norm object from a norm object, None (no norm) or a dict: a config with a ``_target_``,
    or the ``{"kind": ..., **kwargs}`` of :func:`apply_norm` (and of checkpoints saved before norms were
    objects)."""
    from omegaconf import DictConfig, OmegaConf

    if norm is None:
        return NoNorm()
    if isinstance(norm, DictConfig):
        norm = OmegaConf.to_container(norm, resolve=True)
    if callable(norm) and not isinstance(norm, dict):
        return norm
    if not isinstance(norm, dict):
        raise ValueError(f"norm must be a norm object, a config dict or None, got {norm!r}")
    norm = dict(norm)
    if "_target_" in norm:
        import hydra

        return hydra.utils.instantiate(norm, _convert_="all")
    kind = norm.pop("kind", "none")
    if not isinstance(kind, str) or kind not in NORMS:
        raise ValueError(f"unknown norm kind {kind!r}; valid kinds: {', '.join(NORM_KINDS)}")
    if kind == "sn" and norm.get("beta", 1) != 1:
        raise ValueError(f"kind 'sn' has no stable-rank target, so beta must be 1, got {norm['beta']}; "
                         "use kind 'srn' (reshaped kernel) or 'srnc' (conv operator) for beta < 1")
    if kind == "sn":
        norm.pop("beta", None)
    fields = {f.name for f in dataclasses.fields(NORMS[kind])}
    unknown = sorted(set(norm) - fields)
    if unknown:
        raise ValueError(f"norm {kind!r} has no setting {', '.join(unknown)}; valid: {', '.join(sorted(fields - {'name'}))}")
    return NORMS[kind](**norm)


def apply_norm(model: nn.Module, kind: str, alpha: float = 1.0, beta: float = 1.0, n: int = 64,
               power_iters: int = 1, loop_only: bool = False,
               modules: Iterable[nn.Conv2d] | None = None) -> nn.Module:
    """Normalise the weights of `model`'s convs in place and return `model` (``NORMS[kind](...)(model)``).

    kind: "none" (nothing), "sn" (Miyato, reshaped kernel, to α), "srn" (Sanyal, reshaped
        kernel, α and β), "srnc" (SRN-C, the conv operator on an n×n map, α and β).
    alpha: target spectral norm (> 0). beta: target stable rank as a fraction of its
        maximum, in (0, 1]; 1 = spectral normalisation only ("sn" has no β: it must be 1).
    n: feature-map side of the operator SRN-C normalises (>= kernel size; unused by sn/srn).
    power_iters: power-iteration steps per optimisation step (>= 1).
    loop_only: only the convs `model.recurrent_convs()` returns (those inside the recurrent loop).
    modules: an explicit list of nn.Conv2d of the model instead.
    """
    if not isinstance(kind, str) or kind not in NORMS:
        raise ValueError(f"unknown norm kind {kind!r}; valid kinds: {', '.join(NORM_KINDS)}")
    check_alpha(alpha), check_beta(beta), check_iters(power_iters)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (side of the feature map SRN-C normalises on) must be an int >= 1, got {n!r}")
    if kind == "none":
        return model
    settings = {"alpha": alpha, "beta": beta, "n": n, "power_iters": power_iters, "loop_only": loop_only}
    fields = {f.name for f in dataclasses.fields(NORMS[kind])} | {"beta"}  # sn refuses beta != 1 by name
    return make_norm({"kind": kind, **{k: v for k, v in settings.items() if k in fields}})(model, modules)


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
