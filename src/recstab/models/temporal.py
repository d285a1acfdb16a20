"""Temporal connections around a backbone: the recurrent video model of the paper.

A model processes a clip frame by frame, ``y_t = f(x_{t-k+1..t}, state_{t-1})``.
The ``recurrence`` name picks the connection (sections 1.1, 3.1, appendices B, C):

========== ========================================================= ==========
name       what is carried from frame t-1 to frame t                 recurrent
========== ========================================================= ==========
none       nothing (single frame)                                    no
mf3, mf7   the last 2 / 6 input frames (causal multi-frame window)   no
shift      each block's previous *input*, fed to the block's side    no
           (feature-shifting: information climbs one block per frame)
feat       each block's previous *output*, fed to its own side       yes
           (feature-recurrence)
frame      the previous output frame, fed to the head                yes
           (frame-recurrence; space-to-depth for sr2)
rlsp       the previous last hidden features, fed to the head        yes
           (recurrent latent space propagation)
birlsp     RLSP forward and backward in time, tails joined           yes
========== ========================================================= ==========

``rlsp-mf3``, ``birlsp-mf7`` etc. combine RLSP with a multi-frame window.

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

RECURRENCES = ("none", "mf3", "mf7", "shift", "feat", "frame", "rlsp", "birlsp",
               "rlsp-mf3", "rlsp-mf7", "birlsp-mf3", "birlsp-mf7")
TASKS = {"denoise": 1, "sr2": 2}  # task -> spatial upscaling factor
RECURRENT = ("feat", "frame", "rlsp", "birlsp")


def check_clip(x: torch.Tensor, channels: int) -> None:
    """Refuse anything but a B×T×C×H×W clip with the model's channel count."""
    if x.dim() != 5 or x.shape[2] != channels:
        raise ValueError(f"expected input B×T×{channels}×H×W, got shape {tuple(x.shape)}")


class StreamingNotSupported(RuntimeError):
    """Raised when a bidirectional model is asked to process a stream chunk by chunk."""


def parse_recurrence(recurrence: str) -> tuple[str, int]:
    """'rlsp-mf3' -> ('rlsp', 3); 'mf7' -> ('none', 7); 'feat' -> ('feat', 1)."""
    if recurrence not in RECURRENCES:
        raise ValueError(f"unknown recurrence {recurrence!r}; valid recurrences: {', '.join(RECURRENCES)}")
    connection, _, window = recurrence.partition("-")
    if connection.startswith("mf"):
        return "none", int(connection[2:])
    return connection, int(window[2:]) if window else 1


class RecurrentVideoModel(nn.Module):
    """Backbone × temporal connection × task. ``model(x)``: B×T×C×H×W -> B×T×C×sH×sW.

    Args:
        backbone: ``vdncnn`` | ``vresnet``.
        recurrence: one of :data:`RECURRENCES`.
        task: ``denoise`` | ``sr2``.
        channels: hidden width C (64 in the paper).
        in_channels: image channels (3 = RGB; 1 for the grey experiments of appendix G).
        depth: number of blocks (default 10 for vdncnn, 5 for vresnet).
    """

    def __init__(self, backbone: str = "vresnet", recurrence: str = "feat", task: str = "denoise",
                 channels: int = 64, in_channels: int = 3, depth: int | None = None):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
        if channels < 1 or in_channels < 1:
            raise ValueError(f"channels and in_channels must be >= 1, got {channels}, {in_channels}")
        self.backbone_name, self.recurrence, self.task = backbone, recurrence, task
        self.connection, self.window = parse_recurrence(recurrence)
        self.scale = TASKS[task]
        self.in_channels, self.channels = in_channels, channels
        self.bidirectional = self.connection == "birlsp"
        self.dampening = 1.0

        head_in = in_channels * self.window
        if self.connection == "frame":
            head_in += in_channels * self.scale ** 2
        elif self.connection in ("rlsp", "birlsp"):
            head_in += channels
        side = channels if self.connection in ("feat", "shift") else 0
        self.body = Backbone(backbone, head_in, channels, depth, side)
        if self.bidirectional:
            self.body_backward = Backbone(backbone, head_in, channels, depth, side)
        tail_in = 2 * channels if self.bidirectional else channels
        self.tail = conv3x3(tail_in, in_channels * self.scale ** 2)
        he_init_(self)

    @property
    def is_recurrent(self) -> bool:
        return self.connection in RECURRENT

    @property
    def streamable(self) -> bool:
        return not self.bidirectional

    # ------------------------------------------------------------------ sequence API
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-sequence processing from the initial state."""
        self._check_input(x)
        if self.bidirectional:
            return self._forward_bidirectional(x)
        return self._unroll(x, None, self.body)[0]

    def process(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Process a chunk of frames, carrying the state across calls.

        ``process(x[:, :k])`` then ``process(x[:, k:], state)`` equals ``model(x)``.
        ``state=None`` starts (or resets) from the initial state.
        """
        if self.bidirectional:
            raise StreamingNotSupported(
                f"recurrence {self.recurrence!r} is bidirectional: it needs the whole sequence, "
                "call model(x) on the full clip instead of streaming with process()")
        self._check_input(x)
        return self._unroll(x, state, self.body)

    # ------------------------------------------------------------------ internals
    def _check_input(self, x: torch.Tensor) -> None:
        check_clip(x, self.in_channels)

    def _initial_state(self, x: torch.Tensor, body: Backbone) -> dict:
        b, _, c, h, w = x.shape
        zeros = lambda ch, hh=h, ww=w: x.new_zeros(b, ch, hh, ww)  # noqa: E731
        state: dict = {"frames": x[:, :1].expand(b, self.window - 1, c, h, w)}
        if self.connection in ("feat", "shift"):
            state["features"] = [zeros(self.channels) for _ in body.blocks]
        elif self.connection == "frame":
            state["output"] = zeros(c, h * self.scale, w * self.scale)
        elif self.connection in ("rlsp", "birlsp"):
            state["hidden"] = zeros(self.channels)
        return state

    def _unroll(self, x: torch.Tensor, state: dict | None, body: Backbone,
                hiddens_only: bool = False) -> tuple[torch.Tensor, dict]:
        state = self._initial_state(x, body) if state is None else state
        frames = torch.cat([state["frames"], x], dim=1)
        lam = self.dampening
        damp = (lambda h: h) if lam == 1 else (lambda h: lam * h)  # noqa: E731 — no copy when off
        outputs = []
        for t in range(x.shape[1]):
            window = frames[:, t:t + self.window].flatten(1, 2)  # B×(k·C)×H×W, oldest first
            head_in, sides = [window], None
            if self.connection == "frame":
                head_in.append(F.pixel_unshuffle(damp(state["output"]), self.scale))
            elif self.connection in ("rlsp", "birlsp"):
                head_in.append(damp(state["hidden"]))
            elif self.connection == "feat":
                sides = [damp(f) for f in state["features"]]
            elif self.connection == "shift":
                sides = state["features"]
            hidden, block_in, block_out = body(torch.cat(head_in, dim=1), sides)
            state = dict(state)
            if self.connection == "feat":
                state["features"] = block_out
            elif self.connection == "shift":
                state["features"] = block_in
            elif self.connection in ("rlsp", "birlsp"):
                state["hidden"] = hidden
            if hiddens_only:
                outputs.append(hidden)
                continue
            y = self._reconstruct(self.tail(hidden), x[:, t])
            if self.connection == "frame":
                state["output"] = y
            outputs.append(y)
        state["frames"] = frames[:, frames.shape[1] - (self.window - 1):]
        return torch.stack(outputs, dim=1), state

    def _reconstruct(self, residual: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        if self.scale == 1:
            return frame + residual
        base = F.interpolate(frame, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return base + F.pixel_shuffle(residual, self.scale)

    def _forward_bidirectional(self, x: torch.Tensor) -> torch.Tensor:
        forward_h, _ = self._unroll(x, None, self.body, hiddens_only=True)
        backward_h, _ = self._unroll(x.flip(1), None, self.body_backward, hiddens_only=True)
        hidden = torch.cat([forward_h, backward_h.flip(1)], dim=2)  # B×T×2C×H×W
        b, t = hidden.shape[:2]
        residual = self.tail(hidden.flatten(0, 1))
        return self._reconstruct(residual, x.flatten(0, 1)).unflatten(0, (b, t))

    # ------------------------------------------------------------------ stability structure
    def recurrent_convs(self) -> list[nn.Conv2d]:
        """The convs inside the recurrent loop (what a Lipschitz constraint must bind)."""
        if self.connection == "feat":
            return [conv for block in self.body.blocks for conv in block.convs()]
        if self.connection == "rlsp":
            return [self.body.head] + [c for block in self.body.blocks for c in block.convs()]
        if self.connection == "birlsp":
            return [body.head for body in (self.body, self.body_backward)] + [
                c for body in (self.body, self.body_backward) for block in body.blocks for c in block.convs()]
        if self.connection == "frame":
            return [self.body.head] + [c for block in self.body.blocks for c in block.convs()] + [self.tail]
        return []

    def loop_lipschitz_bound(self, conv_norm) -> float:
        """Upper bound of the recurrence map's Lipschitz constant in the fed-back state.

        ``conv_norm(conv) -> float`` gives each conv's operator norm (e.g. the exact
        FFT spectral norm). ReLU is 1-Lipschitz, a residual block is bounded by
        1 + ‖W1‖‖W2‖, a chain by the product (Proposition 1 of the paper), the
        dampening λ multiplies the loop. Feature-recurrence is block-triangular
        (block l sees its own past and the present of the blocks below it): it is
        contractive in a suitably weighted norm when every block's own loop is, so
        the bound is the largest per-block bound. Non-recurrent models have no loop: 0.
        """
        lam = abs(self.dampening)
        if self.connection == "feat":
            def own_loop(block):  # the block's output as a function of its own past output
                convs = block.convs()
                return conv_norm(convs[0]) * (conv_norm(convs[1]) if len(convs) > 1 else 1.0)
            return lam * max(own_loop(block) for block in self.body.blocks)
        if self.connection in ("rlsp", "birlsp"):
            bodies = (self.body, self.body_backward) if self.bidirectional else (self.body,)
            return lam * max(body.lipschitz_chain(conv_norm) for body in bodies)
        if self.connection == "frame":
            return lam * self.body.lipschitz_chain(conv_norm) * conv_norm(self.tail)
        return 0.0

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name}, recurrence={self.recurrence}, task={self.task}"
