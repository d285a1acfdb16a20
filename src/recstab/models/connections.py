"""Temporal connections: what a model carries from frame t−1 to frame t (sections 1.1, 3.1, app. B).

A connection is a small object that the :class:`~recstab.models.temporal.RecurrentVideoModel`
asks, at every frame, what to feed and what to keep. It owns four things:

- its **state** (``initial_state``): the fed-back tensors, zero before the first frame;
- its **feed / update step**: ``feed`` returns the extra head input and the blocks' side
  inputs (the fed-back signals, scaled by the dampening λ), ``update`` the next state;
- its **in-loop convs** (``loop_convs``): what a Lipschitz constraint must bind;
- its **part of the bound** (``certificate``): see :mod:`recstab.models.certificate`.

It receives the parts of the model it feeds — the backbone ``body`` (``head``, ``blocks``,
``convs()``, ``chain_factors()``: :class:`~recstab.models.backbones.Backbone`) and the ``tail``
conv — and the model's numbers (dampening λ, output scale), never the model itself.

=================== ========================================================= ==========
class (name)        carried from t−1 to t                                     recurrent
=================== ========================================================= ==========
``NoRecurrence``    nothing; ``window=k`` (``mf3``, ``mf7``): the last k−1    no
(none, mf3, mf7)    input frames (a causal multi-frame window)
``FeatureShift``    each block's previous *input*, fed to the block's side    no
(shift)             (information climbs one block per frame)
``FeatureRecurrence`` each block's previous *output*, fed to its own side     yes
(feat)
``FrameRecurrence`` the previous output frame, fed to the head                yes
(frame)             (space-to-depth for sr2)
``RLSP`` (rlsp)     the previous last hidden features, fed to the head        yes
``BiRLSP`` (birlsp) RLSP forward and backward in time: two one-directional    yes
                    RLSP models, their residuals added
                    (:class:`~recstab.models.temporal.BidirectionalVideoModel`)
=================== ========================================================= ==========

Every connection takes ``window`` (the multi-frame input of appendix B: ``rlsp-mf3`` is
``RLSP(window=3)``). The input window itself is kept by the model, not the connection.

A new connection is one subclass here (or anywhere: Hydra's ``_target_`` finds it) and
one config file ``conf/recurrence/<name>.yaml`` (``_target_``, ``name``, ``window``); see the README.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recstab.models.certificate import (LoopCertificate, chain_certificate, feedforward_certificate,
                                        triangular_certificate)


class TemporalConnection:
    """No recurrence: a single-frame (``window=1``) or causal multi-frame model."""

    name = "none"
    recurrent = False
    bidirectional = False

    def __init__(self, window: int = 1, name: str | None = None):
        """``name``: what a config file calls it (``conf/recurrence/<name>.yaml``); checked
        against the class and window so that a config cannot mislabel a run."""
        if isinstance(window, bool) or int(window) != window or window < 1:
            raise ValueError(f"window must be an integer >= 1 (number of input frames), got {window!r}")
        self.window = int(window)
        if name is not None and name != self.recurrence:
            raise ValueError(f"recurrence name {name!r} does not match {type(self).__name__}(window={window}), "
                             f"which is {self.recurrence!r}: fix the name or the window in the config")

    @property
    def recurrence(self) -> str:
        """The config name: ``feat``, ``mf3``, ``rlsp-mf7``, ..."""
        if self.window == 1:
            return self.name
        return f"mf{self.window}" if self.name == "none" else f"{self.name}-mf{self.window}"

    # -- shapes ------------------------------------------------------------------------------
    def fed_channels(self, in_channels: int, channels: int, scale: int) -> int:
        """Channels the connection appends to the head input (after the frame window)."""
        return 0

    def side_channels(self, channels: int) -> int:
        """Channels it feeds to every block's side input."""
        return 0

    # -- state and step ----------------------------------------------------------------------
    def initial_state(self, x: torch.Tensor, body, scale: int) -> dict:
        """The fed-back tensors before the first frame of clip ``x`` (B×T×C×H×W), all zero."""
        return {}

    def feed(self, state: dict, dampening: float, scale: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """(extra head inputs, per-block side inputs or None) for the current frame; the
        fed-back signals are scaled by ``dampening``."""
        return [], None

    def update(self, state: dict, hidden, block_in, block_out, output) -> dict:
        """The next state, from this frame's hidden features, block inputs/outputs and output."""
        return {}

    # -- stability structure -----------------------------------------------------------------
    def loop_convs(self, body, tail) -> list:
        return []

    def memory(self, body) -> int:
        """Input frames y_t depends on, for connections without a loop."""
        return self.window

    def certificate(self, body, tail, conv_norm, dampening: float) -> LoopCertificate:
        return feedforward_certificate(self.memory(body))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self.window})"


NoRecurrence = TemporalConnection


def _damp(tensor: torch.Tensor, dampening: float) -> torch.Tensor:
    return tensor if dampening == 1 else dampening * tensor  # no copy when dampening is off


def _zeros_like_features(body, x: torch.Tensor, count: int) -> list[torch.Tensor]:
    b, _, _, h, w = x.shape
    return [x.new_zeros(b, body.head.out_channels, h, w) for _ in range(count)]


class FeatureShift(TemporalConnection):
    """Each block sees its own *input* of the previous frame (not recurrent: finite memory)."""

    name = "shift"

    def side_channels(self, channels: int) -> int:
        return channels

    def initial_state(self, x, body, scale):
        return {"features": _zeros_like_features(body, x, len(body.blocks))}

    def feed(self, state, dampening, scale):
        return [], state["features"]

    def update(self, state, hidden, block_in, block_out, output):
        return {"features": block_in}

    def memory(self, body) -> int:
        return self.window + len(body.blocks)  # block l's side reaches l frames back


class FeatureRecurrence(TemporalConnection):
    """Each block sees its own *output* of the previous frame: a block-triangular loop."""

    name = "feat"
    recurrent = True

    def side_channels(self, channels: int) -> int:
        return channels

    def initial_state(self, x, body, scale):
        return {"features": _zeros_like_features(body, x, len(body.blocks))}

    def feed(self, state, dampening, scale):
        return [], [_damp(f, dampening) for f in state["features"]]

    def update(self, state, hidden, block_in, block_out, output):
        return {"features": block_out}

    def loop_convs(self, body, tail) -> list:
        return [conv for block in body.blocks for conv in block.convs()]

    def certificate(self, body, tail, conv_norm, dampening) -> LoopCertificate:
        main, own = zip(*(block.lipschitz(conv_norm) for block in body.blocks))
        return triangular_certificate(main, own, dampening,
                                      state=f"the {len(own)} block outputs o_l of frame t−1")


class FrameRecurrence(TemporalConnection):
    """The previous output frame is fed to the head (space-to-depth for sr2)."""

    name = "frame"
    recurrent = True

    def fed_channels(self, in_channels, channels, scale):
        return in_channels * scale ** 2

    def initial_state(self, x, body, scale):
        b, _, c, h, w = x.shape
        return {"output": x.new_zeros(b, c, h * scale, w * scale)}

    def feed(self, state, dampening, scale):
        return [F.pixel_unshuffle(_damp(state["output"], dampening), scale)], None

    def update(self, state, hidden, block_in, block_out, output):
        return {"output": output}

    def loop_convs(self, body, tail) -> list:
        return body.convs() + [tail]

    def certificate(self, body, tail, conv_norm, dampening) -> LoopCertificate:
        fed_from = body.head.in_channels - tail.out_channels  # the head's last inputs: the unshuffled y_{t−1}
        factors = body.chain_factors(conv_norm, fed_from)
        factors["tail"] = conv_norm(tail.weight)
        return chain_certificate(factors, dampening, "the fed-back output frame y_{t−1}")


class RLSP(TemporalConnection):
    """Recurrent latent space propagation: the last hidden features are fed to the head."""

    name = "rlsp"
    recurrent = True

    def fed_channels(self, in_channels, channels, scale):
        return channels

    def initial_state(self, x, body, scale):
        return {"hidden": _zeros_like_features(body, x, 1)[0]}

    def feed(self, state, dampening, scale):
        return [_damp(state["hidden"], dampening)], None

    def update(self, state, hidden, block_in, block_out, output):
        return {"hidden": hidden}

    def loop_convs(self, body, tail) -> list:
        return body.convs()

    def certificate(self, body, tail, conv_norm, dampening) -> LoopCertificate:
        fed_from = body.head.in_channels - body.head.out_channels  # the head's last inputs: h_{t−1}
        return chain_certificate(body.chain_factors(conv_norm, fed_from), dampening,
                                 "the fed-back hidden features h_{t−1}")


class BiRLSP(RLSP):
    """RLSP forward and backward in time (whole sequences only).

    What a config names; the model is two one-directional :class:`RLSP` models
    (:meth:`direction`) composed by :class:`~recstab.models.temporal.BidirectionalVideoModel`."""

    name = "birlsp"
    bidirectional = True

    def direction(self) -> RLSP:
        """The connection of each direction."""
        return RLSP(window=self.window)


CONNECTIONS = {c.name: c for c in (TemporalConnection, FeatureShift, FeatureRecurrence, FrameRecurrence,
                                   RLSP, BiRLSP)}
WINDOWS = (3, 7)  # the multi-frame windows of the paper (appendix B); connection() takes any k >= 2
RECURRENCES = ("none", *(f"mf{k}" for k in WINDOWS), *(name for name in CONNECTIONS if name != "none"),
               *(f"{name}-mf{k}" for name in ("rlsp", "birlsp") for k in WINDOWS))  # the paper's names


def connection(recurrence: str | TemporalConnection) -> TemporalConnection:
    """A name as the configs write it -> the connection: ``'rlsp-mf3'`` -> ``RLSP(window=3)``,
    ``'mf7'`` -> ``NoRecurrence(window=7)``, ``'feat'`` -> ``FeatureRecurrence()``; objects pass through.

    The grammar: ``<name>`` (a key of :data:`CONNECTIONS`), ``mf<k>`` or ``<name>-mf<k>`` (a causal
    window of k >= 2 input frames); :data:`RECURRENCES` lists the paper's."""
    if isinstance(recurrence, TemporalConnection):
        return recurrence
    name, _, window = str(recurrence).partition("-")
    if name.startswith("mf") and not window:
        name, window = "none", name
    k = window[2:] if window.startswith("mf") else ""
    if (name not in CONNECTIONS or (window and not (k.isdigit() and int(k) >= 2))
            or (name == "none" and "-" in str(recurrence))):
        raise ValueError(f"unknown recurrence {recurrence!r}; valid: {', '.join(CONNECTIONS)}, mf<k>, <name>-mf<k> "
                         f"(k >= 2 input frames), e.g. {', '.join(RECURRENCES)}")
    return CONNECTIONS[name](window=int(k) if window else 1)
