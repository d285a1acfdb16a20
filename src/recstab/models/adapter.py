r"""Diagnose your own model: any PyTorch module, wrapped into the :class:`VideoModel` contract.

The diagnostics (:func:`recstab.diagnostics.stability_report`, the TRF, λ₁, the onset test, the
norms) read a model only through :class:`~recstab.models.interface.VideoModel`. A recurrent video
model written elsewhere usually has one of two shapes, and each has a wrapper here:

- a **cell** ``cell(frame, state) -> (output, next_state)`` (a ConvGRU, an RLSP cell, BasicVSR's
  forward propagation step): :class:`StepModel`, streamable, every diagnostic applies;
- a module whose **forward takes a whole clip** ``net(clip) -> outputs`` (B×T×C×H×W, e.g.
  BasicVSR's bidirectional forward): :class:`ClipModel`. It cannot stream, so λ₁ and the onset
  test are skipped; or, when its forward already carries a state, ``net(clip, state) ->
  (outputs, state)`` (``carries_state=True``), it streams like a cell.

In a few lines (``cell(frame, h) -> (y, h)``, the state fed back through ``cell.head``'s input
channels 3: and then ``cell.body``'s convs, ReLUs between them)::

    from recstab.diagnostics import stability_report
    from recstab.models.adapter import StepModel

    model = StepModel(cell, in_channels=3, task="denoise",
                      initial_state=lambda frame: frame.new_zeros(frame.shape[0], 8, *frame.shape[-2:]),
                      loop_convs=[(cell.head, slice(3, None)), *cell.body], certificate="chain")
    report = stability_report(model, "logs/my_model", clean_frames=LongVideo("my_videos/"))
    print(report.verdict, report.bound)   # e.g. "empirically stable", L̂ = 1.41

What a wrapper supplies, and which diagnostic uses it:

=========================== ============================================ =============================
attribute                   what it is                                   used by
=========================== ============================================ =============================
``in_channels``             image channels C of every input frame        every section (input frames,
                                                                         the TRF's X, refusal of a
                                                                         clip with other C)
``task``, ``scale``         ``denoise`` (scale 1) or ``sr2`` (scale 2):  λ₁'s and the onset test's
                            the degradation the diagnostics apply and    degraded input, PSNR
                            the output's spatial scale
``model(x)``                B×T×C×H×W in [0, 1] -> B×T×C×sH×sW, from     the TRF, its replayed proof
                            the initial state
``process(x, state)``       a chunk of frames, the state carried across  λ₁ (a Jacobian-vector
                            calls (None: the initial state);             product of the state map
                            ``process(x[:, :k])`` then                   per frame), the onset test
                            ``process(x[:, k:], state)`` equals          (state carried chunk to
                            ``model(x)``                                 chunk, reset after a failure)
``initial_state(x)``,       the state before frame 0, one frame of       ``process``
``step(frame, state)``      processing
``streamable``              False: needs the whole clip (bidirectional)  λ₁, onsets skipped if False
``is_recurrent``            the state feeds back into itself             λ₁ (False: −∞, no memory)
``dampening``               λ of appendix F: the fed-back state is       ``stability_report(...,
                            scaled by λ before each step (None: the      dampening=λ)``, the
                            model has no dampening)                      certificate (× |λ|)
``recurrent_convs()``       the convs on the loop                        the spectra ("in loop"),
                                                                         ``apply_norm(loop_only=True)``
``loop_certificate()``      a proven bound L̂ of the state map's          the verdict "certified
                            Lipschitz constant (∞ unless declared)       stable" (L̂ < 1)
=========================== ============================================ =============================

**The loop certificate** (:mod:`recstab.models.certificate`) is a theorem about the state map
``s_{t-1} ↦ s_t`` at a fixed input frame, so it is computed only from what the user states:

- ``loop_convs=[...]``: the convs the fed-back state passes through, in order. An entry is a
  conv, or ``(conv, channels)`` where ``channels`` (a slice or range of its *input* channels) is
  the part of a concatenated input that carries the state (the rest, e.g. the input frame, is
  state-independent: ``‖K*[x, s] − K*[x, s']‖ = ‖K_s*(s − s')‖``, the slice's bound is used).
- ``certificate="chain"`` states that the loop is a plain chain: the state (all its tensors
  together, in the Euclidean norm) enters only through the first conv's ``channels``, passes once
  through every declared conv in order, with 1-Lipschitz element-wise activations (ReLU,
  LeakyReLU, tanh, ...) between them, state-independent additions (biases, input features) and
  pixel (un)shuffles allowed, no skip connection around a conv and no multiplication by a
  state-dependent value (gates, attention); the next state is the last conv's (activated) output.
  Then ``L̂ = |λ| · Π_l ‖K_l‖`` (:func:`~recstab.models.certificate.chain_certificate`), with
  ‖K_l‖ from ``conv_norm`` (default :func:`~recstab.models.certificate.default_conv_norm`, the
  per-conv bound valid on every frame size, zero or circular padding; stride, dilation and groups
  cannot raise it). A ConvGRU is *not* a chain (its gates multiply the state).
- ``certificate=fn``: any other loop, ``fn(conv_norm, dampening) -> LoopCertificate``, composed from
  the helpers ``chain_certificate``, ``triangular_certificate`` (block-triangular loops) or
  ``unbounded_certificate``; e.g. a residual block ``a + K2*relu(K1*a)`` is the factor
  ``1 + ‖K2‖‖K1‖``, a bilinear warp by a constant flow (fixed convex 2×2 weights, zero outside) is
  ``1``. A BasicVSR-style propagation (warp, fuse conv on ``[frame, h]``, residual blocks)::

      def bound(conv_norm, dampening):
          factors = {"warp": 1.0, "fuse": conv_norm(cell.fuse.weight[:, 3:])}
          for i, b in enumerate(cell.blocks):
              factors[f"block{i}"] = 1 + conv_norm(b.conv2.weight) * conv_norm(b.conv1.weight)
          return chain_certificate(factors, dampening, "the propagated features h")

  A flow estimated from the frames keeps the warp linear in h, ``‖warp‖₂ ≤ √(max column sum)`` of
  its bilinear weights, but a converging flow (many pixels sampling one place) pushes that far
  above 1 and no bound holds for every input: leave such a loop at ``L̂ = ∞``.
- neither: ``L̂ = ∞`` ("no bound derived", the verdict rests on the TRF and λ₁); a model
  declared not recurrent gets ``L̂ = 0`` (finite memory).

Every wrapper checks itself at construction on a zero clip of ``check_size`` pixels (None: skip),
so a wrong ``in_channels`` or a cell that returns something else fails there, with a ValueError
naming the bad value, not in the middle of a diagnosis; the shapes are checked at every step too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map

from recstab.models.certificate import (ConvNorm, LoopCertificate, chain_certificate, evaluate,
                                        feedforward_certificate, unbounded_certificate)
from recstab.models.interface import StreamingNotSupported, VideoModel, check_task

__all__ = ["StepModel", "ClipModel"]

CertificateRule = Callable[[ConvNorm, float], LoopCertificate]  # (conv_norm, dampening λ) -> certificate
CHAIN_PADDINGS = ("zeros", "circular")  # the per-conv bound's padding modes


def _check_channels(in_channels) -> int:
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1 (image channels of a frame), got {in_channels!r}")
    return in_channels


def _check_module(module, what: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise ValueError(f"{what} must be a torch.nn.Module (so that its weights are the model's), "
                         f"got {type(module).__name__}")
    return module


def _state_channels(conv: nn.Conv2d, channels, where: str) -> range:
    if isinstance(channels, slice):
        channels = range(*channels.indices(conv.in_channels))
    if not isinstance(channels, range):
        raise ValueError(f"{where}: the state's input channels must be a slice or a range, got {channels!r}")
    if len(channels) == 0 or min(channels) < 0 or max(channels) >= conv.in_channels:
        raise ValueError(f"{where}: channels {channels} are not a non-empty part of the conv's "
                         f"{conv.in_channels} input channels")
    if conv.groups != 1:
        raise ValueError(f"{where}: a channel slice of a grouped conv (groups={conv.groups}) is not supported; "
                         "declare the whole conv or pass certificate=<function>")
    return channels


def _loop_entries(loop_convs, module: nn.Module) -> list[tuple[str, nn.Conv2d, range | None]]:
    """``loop_convs`` as (name, conv, state channels or None), every conv a submodule of ``module``."""
    if loop_convs is None:
        return []
    if isinstance(loop_convs, (nn.Module, tuple)) or not isinstance(loop_convs, Sequence):
        raise ValueError(f"loop_convs must be a list of nn.Conv2d or (nn.Conv2d, channels) pairs, "
                         f"got {type(loop_convs).__name__}")
    names = {id(m): name for name, m in module.named_modules()}
    entries = []
    for i, entry in enumerate(loop_convs):
        conv, channels = entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, None)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"loop_convs[{i}] is a {type(conv).__name__}; expected an nn.Conv2d or a pair "
                             "(nn.Conv2d, slice of its input channels that carry the state)")
        if id(conv) not in names:
            raise ValueError(f"loop_convs[{i}] ({conv}) is not a submodule of the wrapped module")
        where = f"loop_convs[{i}] ({names[id(conv)] or 'the module itself'})"
        entries.append((names[id(conv)], conv, None if channels is None else _state_channels(conv, channels, where)))
    return entries


def _check_rule(certificate, entries: list, recurrent: bool) -> None:
    if certificate is None or callable(certificate):
        return
    if certificate != "chain":
        raise ValueError(f"certificate must be None, 'chain' or a function (conv_norm, dampening) -> LoopCertificate, "
                         f"got {certificate!r}")
    if not recurrent:
        raise ValueError("certificate='chain' was given for a model declared not recurrent (recurrent=False)")
    if not entries:
        raise ValueError("certificate='chain' needs loop_convs: the convs the state passes through, in order")
    for name, conv, _ in entries:
        if conv.padding_mode not in CHAIN_PADDINGS:
            raise ValueError(f"loop conv {name} uses padding_mode={conv.padding_mode!r}: the per-conv bound holds "
                             f"for {' or '.join(CHAIN_PADDINGS)} padding; pass certificate=<function> with your own "
                             "bound")


class _Wrapper(VideoModel):
    """What both wrappers share: the task, the declared loop and its certificate."""

    def __init__(self, module: nn.Module, what: str, in_channels: int, task: str, recurrent: bool,
                 loop_convs, certificate, name: str | None):
        super().__init__()
        self.module = _check_module(module, what)
        self.in_channels = _check_channels(in_channels)
        self.scale = check_task(task)
        self.task = task
        if not isinstance(recurrent, bool):
            raise ValueError(f"recurrent must be True or False, got {recurrent!r}")
        self.is_recurrent = recurrent
        self._loop = _loop_entries(loop_convs, module)
        _check_rule(certificate, self._loop, recurrent)
        self._rule = certificate
        self.name = name or type(module).__name__

    def recurrent_convs(self) -> list[nn.Conv2d]:
        return list({id(conv): conv for _, conv, _ in self._loop}.values())

    def loop_certificate(self, conv_norm: ConvNorm | None = None) -> LoopCertificate:
        if not self.is_recurrent:
            return feedforward_certificate(self.memory)
        if self._rule == "chain":
            return evaluate(lambda norm: chain_certificate(self._chain_factors(norm), self._lambda(),
                                                           f"the state of {self.name}"), conv_norm)
        if callable(self._rule):
            cert = evaluate(lambda norm: self._rule(norm, self._lambda()), conv_norm)
            if not isinstance(cert, LoopCertificate):
                raise ValueError(f"the certificate function returned a {type(cert).__name__}; expected a "
                                 "recstab.models.certificate.LoopCertificate (e.g. from chain_certificate)")
            return cert
        if self._loop:
            return unbounded_certificate(f"loop convs of {self.name} declared, but not how the state passes through "
                                         "them (certificate='chain' or a function)")
        return unbounded_certificate(f"no loop structure declared for {self.name} (loop_convs, certificate)")

    def _chain_factors(self, conv_norm: ConvNorm) -> dict[str, float]:
        factors = {}
        for name, conv, channels in self._loop:
            weight = conv.weight if channels is None else conv.weight[:, list(channels)]
            key = name if channels is None else f"{name}[{channels.start}:{channels.stop}]"
            while key in factors:  # the same conv twice on the loop counts twice
                key += "'"
            factors[key] = float(conv_norm(weight))
        return factors

    def _lambda(self) -> float:
        return 1.0 if self.dampening is None else float(self.dampening)

    def _output_and_state(self, out, x_shape: tuple, what: str):
        """``out`` must be a pair (output of x's shape × scale, a next state that is not None)."""
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            got = f"a {type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            raise ValueError(f"{what} returned {got}; expected a pair (output, next state)")
        y, state = out
        self._check_output(y, x_shape, what)
        if state is None:
            raise ValueError(f"{what} returned the next state None: the next frames would start again from the "
                             "initial state (return the state it carries)")
        return y, state

    def _check_output(self, y, x_shape: tuple, what: str) -> None:
        """y must be x's shape with the spatial size × scale (x_shape: of a frame or a clip)."""
        want = (*x_shape[:-3], self.in_channels, x_shape[-2] * self.scale, x_shape[-1] * self.scale)
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"{what} returned an output of type {type(y).__name__}; expected a tensor of shape "
                             f"{want}")
        if tuple(y.shape) != want:
            raise ValueError(f"{what} returned an output of shape {tuple(y.shape)} for an input of shape "
                             f"{tuple(x_shape)}; expected {want} (in_channels={self.in_channels}, task "
                             f"{self.task!r}: scale {self.scale})")

    def _probe(self, check_size, frames: int) -> None:
        """Run the wrapper once on a zero clip (eval mode, no gradients): a wrong wrapping fails here."""
        if check_size is None:
            return
        if isinstance(check_size, bool) or not isinstance(check_size, int) or check_size < 1:
            raise ValueError(f"check_size must be an int >= 1 (side of the test frame) or None, got {check_size!r}")
        param = next(iter(self.module.parameters()), None)
        like = dict(device=param.device, dtype=param.dtype) if param is not None else {}
        x = torch.zeros(1, frames, self.in_channels, check_size, check_size, **like)
        modes = [(m, m.training) for m in self.modules()]  # each restored as it was (frozen BN stays frozen)
        self.eval()
        try:
            with torch.no_grad():
                self._run_probe(x)
        except ValueError:
            raise
        except Exception as error:
            raise ValueError(f"{self.name} failed on a {'×'.join(map(str, x.shape))} zero clip (in_channels="
                             f"{self.in_channels}, check_size={check_size}): {type(error).__name__}: {error}. "
                             "Is in_channels right? (check_size=None skips this check)") from error
        finally:
            for m, training in modes:
                m.training = training

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, task={self.task!r}, recurrent={self.is_recurrent}, "
                f"loop_convs={len(self._loop)}, certificate={getattr(self._rule, '__name__', self._rule)!r}")


class StepModel(_Wrapper):
    """A cell ``step_module(frame, state) -> (output, next_state)`` as a streaming :class:`VideoModel`.

    Args:
        step_module: the cell (an nn.Module). ``frame`` is B×C×H×W in [0, 1], ``output``
            B×C×sH×sW, ``state`` anything made of tensors (a tensor, a tuple, a dict, ...).
        in_channels: image channels C.
        task: ``"denoise"`` (output of the frame's size) or ``"sr2"`` (twice its size).
        initial_state: ``fn(first_frame) -> state``, the state before frame 0 (e.g. zeros); None:
            the cell receives ``state=None`` on the first frame and makes its own.
        loop_convs, certificate: the loop and its certificate (module docstring); by default L̂ = ∞.
        recurrent: False for a cell whose state never feeds back into itself (L̂ = 0, λ₁ = −∞).
        check_size: side of the zero frames the wrapping is checked on at construction (None: skip).
        name: what reports call the model (default the cell's class name).

    Feature dampening λ (``model.dampening``, appendix F) scales every floating-point tensor of
    the state before it is fed to the cell: the whole fed-back state is the signal dampened.
    """

    def __init__(self, step_module: nn.Module, *, in_channels: int, task: str = "denoise",
                 initial_state: Callable[[torch.Tensor], object] | None = None, loop_convs=None,
                 certificate: str | CertificateRule | None = None, recurrent: bool = True,
                 check_size: int | None = 32, name: str | None = None):
        super().__init__(step_module, "step_module", in_channels, task, recurrent, loop_convs, certificate, name)
        if initial_state is not None and not callable(initial_state):
            raise ValueError(f"initial_state must be a function first_frame -> state, or None, got "
                             f"{type(initial_state).__name__}")
        self._initial_state = initial_state
        self._probe(check_size, frames=2)

    def initial_state(self, x: torch.Tensor):
        return None if self._initial_state is None else self._initial_state(x[:, 0])

    def step(self, frame: torch.Tensor, state):
        if state is not None and self.dampening != 1:
            lam = self.dampening
            state = tree_map(lambda v: lam * v if torch.is_tensor(v) and v.is_floating_point() else v, state)
        return self._output_and_state(self.module(frame, state), tuple(frame.shape), f"the step module {self.name}")

    def _run_probe(self, x: torch.Tensor) -> None:
        y, _ = self.process(x)
        self._check_output(y, tuple(x.shape), self.name)


class ClipModel(_Wrapper):
    """A module whose forward takes a whole clip, ``clip_module(x) -> y`` (B×T×C×H×W -> B×T×C×sH×sW),
    as a :class:`VideoModel`.

    It is not streamable (``process`` refuses, λ₁ and the onset test are skipped), unless its
    forward carries a state, ``clip_module(x, state) -> (y, state)`` with ``state=None`` the
    initial state: ``carries_state=True``. Feature dampening cannot be applied from outside a clip
    (``dampening`` is None). Other arguments: as :class:`StepModel`.
    """

    def __init__(self, clip_module: nn.Module, *, in_channels: int, task: str = "denoise",
                 carries_state: bool = False, loop_convs=None, certificate: str | CertificateRule | None = None,
                 recurrent: bool = True, check_size: int | None = 32, name: str | None = None):
        super().__init__(clip_module, "clip_module", in_channels, task, recurrent, loop_convs, certificate, name)
        if not isinstance(carries_state, bool):
            raise ValueError(f"carries_state must be True or False, got {carries_state!r}")
        self.streamable = carries_state
        self.dampening = None
        self._probe(check_size, frames=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.streamable:
            return self.process(x)[0]
        self.check_input(x)
        y = self.module(x)
        self._check_output(y, tuple(x.shape), f"the clip module {self.name}")
        return y

    def process(self, x: torch.Tensor, state=None):
        if not self.streamable:
            raise StreamingNotSupported(
                f"{self.name} takes the whole clip (ClipModel, carries_state=False): call model(x) on the full "
                "clip; to stream, its forward must take and return a state: forward(x, state) -> (y, state), "
                "wrapped with carries_state=True")
        self.check_input(x)
        return self._output_and_state(self.module(x, state), tuple(x.shape),
                                      f"the clip module {self.name} (carries_state=True)")

    def _run_probe(self, x: torch.Tensor) -> None:
        self.forward(x)

