"""Backbone × temporal connection × task: the recurrent video model of the paper.

A model processes a clip frame by frame, ``y_t = f(x_{t-k+1..t}, state_{t-1})``. The
temporal connection (:mod:`recstab.models.connections`) decides what the state is, what it
feeds to the backbone and what it keeps; this module owns what is common: the causal input
window, the backbone (:mod:`recstab.models.backbones`), the tail and the residual output.

Multi-frame windows are causal: frame t sees t-k+1..t, the first frame replicated
before the start, so processing a video in chunks with the carried state equals
processing it whole. The initial recurrent state is zero (h_{-1} = 0).

The output is residual: the tail predicts a correction added to the current frame
(denoise) or to its bicubic ×2 upsampling after depth-to-space (sr2).

Feature dampening (appendix F): ``model.dampening = λ`` scales every fed-back
recurrent signal by λ at each step (λ·K * h = K * (λ·h)); 1 leaves the model
unchanged, 0 turns the recurrence off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recstab.models.backbones import Backbone, conv3x3, he_init_
from recstab.models.certificate import LoopCertificate, default_conv_norm
from recstab.models.connections import RECURRENCES, TemporalConnection, connection
from recstab.models.interface import StreamingNotSupported, VideoModel, check_task

INITS = ("he", "near_identity")  # He-normal everywhere | the same with the tail scaled down
NEAR_IDENTITY_TAIL_GAIN = 0.1    # the residual correction starts 10x smaller than He-normal's


class RecurrentVideoModel(VideoModel):
    """Backbone × temporal connection × task. ``model(x)``: B×T×C×H×W -> B×T×C×sH×sW.

    Args:
        backbone: ``vdncnn`` | ``vresnet``.
        recurrence: a name of :data:`RECURRENCES` or a :class:`TemporalConnection`.
        task: ``denoise`` | ``sr2``.
        channels: hidden width C (64 in the paper).
        in_channels: image channels (3 = RGB; 1 for the grey experiments of appendix G).
        depth: number of blocks (default 10 for vdncnn, 5 for vresnet).
        init: ``he`` (He-normal, the paper's Fig. 2) or ``near_identity`` (tail ×0.1).
    """

    def __init__(self, backbone: str = "vresnet", recurrence: str | TemporalConnection = "feat",
                 task: str = "denoise", channels: int = 64, in_channels: int = 3,
                 depth: int | None = None, init: str = "he"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid inits: {', '.join(INITS)}")
        if channels < 1 or in_channels < 1:
            raise ValueError(f"channels and in_channels must be >= 1, got {channels}, {in_channels}")
        self.scale = check_task(task)
        self.connection = connection(recurrence)
        self.backbone_name, self.recurrence, self.task = backbone, self.connection.recurrence, task
        self.window = self.connection.window
        self.in_channels, self.channels = in_channels, channels

        head_in = in_channels * self.window + self.connection.fed_channels(in_channels, channels, self.scale)
        side = self.connection.side_channels(channels)
        self.body = Backbone(backbone, head_in, channels, depth, side)
        if self.bidirectional:
            self.body_backward = Backbone(backbone, head_in, channels, depth, side)
        tail_in = 2 * channels if self.bidirectional else channels
        self.tail = conv3x3(tail_in, in_channels * self.scale ** 2)
        he_init_(self)
        if init == "near_identity":
            with torch.no_grad():
                self.tail.weight.mul_(NEAR_IDENTITY_TAIL_GAIN)

    @property
    def bidirectional(self) -> bool:
        return self.connection.bidirectional

    @property
    def is_recurrent(self) -> bool:
        return self.connection.recurrent

    @property
    def streamable(self) -> bool:
        return not self.bidirectional

    @property
    def bodies(self) -> tuple[Backbone, ...]:
        return (self.body, self.body_backward) if self.bidirectional else (self.body,)

    # ------------------------------------------------------------------ sequence API
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-sequence processing from the initial state."""
        if self.bidirectional:
            self.check_input(x)
            return self._forward_bidirectional(x)
        return self.process(x)[0]

    def process(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Process a chunk of frames, carrying the state across calls.

        ``process(x[:, :k])`` then ``process(x[:, k:], state)`` equals ``model(x)``.
        ``state=None`` starts (or resets) from the initial state.
        """
        if self.bidirectional:
            raise StreamingNotSupported(
                f"recurrence {self.recurrence!r} is bidirectional: it needs the whole sequence, "
                "call model(x) on the full clip instead of streaming with process()")
        return super().process(x, state)

    def initial_state(self, x: torch.Tensor) -> dict:
        b, _, c, h, w = x.shape
        return {"frames": x[:, :1].expand(b, self.window - 1, c, h, w),
                **self.connection.initial_state(self, x)}

    def step(self, frame: torch.Tensor, state: dict, body: Backbone | None = None,
             output: bool = True) -> tuple[torch.Tensor, dict]:
        """One frame. ``output=False`` returns the hidden features instead (bidirectional)."""
        frames = frame[:, None]  # B×k×C×H×W, oldest first (k = window)
        if self.window > 1:
            frames = torch.cat([state["frames"], frames], dim=1)
        extra, sides = self.connection.feed(self, state)
        hidden, block_in, block_out = (body or self.body)(torch.cat([frames.flatten(1, 2), *extra], 1), sides)
        y = self._reconstruct(self.tail(hidden), frame) if output else hidden
        new_state = self.connection.update(state, hidden, block_in, block_out, y if output else None)
        return y, {"frames": frames[:, 1:], **new_state}

    # ------------------------------------------------------------------ internals
    def _reconstruct(self, residual: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        if self.scale == 1:
            return frame + residual
        base = F.interpolate(frame, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return base + F.pixel_shuffle(residual, self.scale)

    def _hiddens(self, x: torch.Tensor, body: Backbone) -> torch.Tensor:
        state, hiddens = self.initial_state(x), []
        for t in range(x.shape[1]):
            hidden, state = self.step(x[:, t], state, body, output=False)
            hiddens.append(hidden)
        return torch.stack(hiddens, dim=1)

    def _forward_bidirectional(self, x: torch.Tensor) -> torch.Tensor:
        forward_h = self._hiddens(x, self.body)
        backward_h = self._hiddens(x.flip(1), self.body_backward).flip(1)
        hidden = torch.cat([forward_h, backward_h], dim=2)  # B×T×2C×H×W
        b, t = hidden.shape[:2]
        residual = self.tail(hidden.flatten(0, 1))
        return self._reconstruct(residual, x.flatten(0, 1)).unflatten(0, (b, t))

    # ------------------------------------------------------------------ stability structure
    def recurrent_convs(self) -> list[nn.Conv2d]:
        """The convs inside the recurrent loop (what a Lipschitz constraint must bind)."""
        return self.connection.loop_convs(self)

    def loop_certificate(self, conv_norm=None) -> LoopCertificate:
        """Proven bound of the recurrence map (see :mod:`recstab.models.certificate`)."""
        return self.connection.certificate(self, conv_norm or default_conv_norm())

    @property
    def memory(self) -> int | None:
        return None if self.is_recurrent else self.connection.memory(self)

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name}, recurrence={self.recurrence}, task={self.task}"


__all__ = ["RecurrentVideoModel", "RECURRENCES", "INITS", "StreamingNotSupported"]
