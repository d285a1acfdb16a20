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

A bidirectional model (``birlsp``) is two one-directional models, one run forward in time and
one backward, whose residual corrections add up (:class:`BidirectionalVideoModel`):

    y_t = base(x_t) + T_f * h_t^f + T_b * h_t^b,

which is the paper's single tail conv T over the joined features [h_t^f, h_t^b] (a conv of a
concatenation is the sum of the convs of its parts, T = [T_f, T_b]; the two biases add up to one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recstab.models.backbones import Backbone, conv3x3, he_init_
from recstab.models.certificate import LoopCertificate, evaluate
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

    One direction in time; ``BiRLSP`` is :class:`BidirectionalVideoModel` (``build_model`` picks it).
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
        if self.connection.bidirectional:
            raise ValueError(f"recurrence {self.connection.recurrence!r} runs in both directions: build it with "
                             f"BidirectionalVideoModel.build(...) or build_model(...), not RecurrentVideoModel")
        self.backbone_name, self.recurrence, self.task = backbone, self.connection.recurrence, task
        self.window = self.connection.window
        self.in_channels, self.channels = in_channels, channels

        head_in = in_channels * self.window + self.connection.fed_channels(in_channels, channels, self.scale)
        side = self.connection.side_channels(channels)
        self.body = Backbone(backbone, head_in, channels, depth, side)
        self.tail = conv3x3(channels, in_channels * self.scale ** 2)
        he_init_(self)
        if init == "near_identity":
            with torch.no_grad():
                self.tail.weight.mul_(NEAR_IDENTITY_TAIL_GAIN)

    @property
    def is_recurrent(self) -> bool:
        return self.connection.recurrent

    # ------------------------------------------------------------------ sequence API
    def initial_state(self, x: torch.Tensor) -> dict:
        b, _, c, h, w = x.shape
        return {"frames": x[:, :1].expand(b, self.window - 1, c, h, w),
                **self.connection.initial_state(x, self.body, self.scale)}

    def step(self, frame: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        frames = frame[:, None]  # B×k×C×H×W, oldest first (k = window)
        if self.window > 1:
            frames = torch.cat([state["frames"], frames], dim=1)
        extra, sides = self.connection.feed(state, self.dampening, self.scale)
        hidden, block_in, block_out = self.body(torch.cat([frames.flatten(1, 2), *extra], 1), sides)
        y = upscale(frame, self.scale) + self._residual(hidden)
        new_state = self.connection.update(state, hidden, block_in, block_out, y)
        return y, {"frames": frames[:, 1:], **new_state}

    def _residual(self, hidden: torch.Tensor) -> torch.Tensor:
        residual = self.tail(hidden)
        return residual if self.scale == 1 else F.pixel_shuffle(residual, self.scale)

    # ------------------------------------------------------------------ stability structure
    def recurrent_convs(self) -> list[nn.Conv2d]:
        """The convs inside the recurrent loop (what a Lipschitz constraint must bind)."""
        return self.connection.loop_convs(self.body, self.tail)

    def loop_certificate(self, conv_norm=None) -> LoopCertificate:
        """Proven bound of the recurrence map (see :mod:`recstab.models.certificate`)."""
        return evaluate(lambda norm: self.connection.certificate(self.body, self.tail, norm, self.dampening), conv_norm)

    @property
    def memory(self) -> int | None:
        return None if self.is_recurrent else self.connection.memory(self.body)

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name}, recurrence={self.recurrence}, task={self.task}"


def upscale(frame: torch.Tensor, scale: int) -> torch.Tensor:
    """What the residual is added to: the frame itself (denoise) or its bicubic upsampling (SR)."""
    return frame if scale == 1 else F.interpolate(frame, scale_factor=scale, mode="bicubic", align_corners=False)


class BidirectionalVideoModel(VideoModel):
    """Two one-directional models, ``causal`` run forward in time and ``anticausal`` backward on the
    whole clip; their residual corrections add up (module docstring). Needs the whole sequence.

    ``BidirectionalVideoModel.build(backbone, BiRLSP(...), ...)`` makes the paper's ``birlsp``: two
    RLSP models. Its loop certificate is each direction's (the larger bound); its in-loop convs both's.
    """

    streamable = False

    def __init__(self, causal: RecurrentVideoModel, anticausal: RecurrentVideoModel, name: str | None = None):
        super().__init__()
        for what in ("in_channels", "scale", "task"):
            if getattr(causal, what) != getattr(anticausal, what):
                raise ValueError(f"the two directions differ in {what}: {getattr(causal, what)!r} vs "
                                 f"{getattr(anticausal, what)!r}")
        if not (causal.streamable and anticausal.streamable):
            raise ValueError("each direction must be a one-directional (streamable) model")
        self.causal, self.anticausal = causal, anticausal
        self.in_channels, self.scale, self.task = causal.in_channels, causal.scale, causal.task
        self.recurrence = name or f"bi{causal.recurrence}"
        self.backbone_name, self.channels, self.window = causal.backbone_name, causal.channels, causal.window
        self.register_load_state_dict_pre_hook(_split_joint_tail)

    @classmethod
    def build(cls, backbone: str, recurrence: TemporalConnection, task: str = "denoise", channels: int = 64,
              in_channels: int = 3, depth: int | None = None, init: str = "he") -> "BidirectionalVideoModel":
        """Two :class:`RecurrentVideoModel` with ``recurrence.direction()``, named after ``recurrence``."""
        one = recurrence.direction()
        causal, anticausal = (RecurrentVideoModel(backbone, one, task, channels, in_channels, depth, init)
                              for _ in range(2))
        with torch.no_grad():  # each tail sees half of the joined features: He-normal over both, as one tail
            for tail in (causal.tail, anticausal.tail):
                tail.weight.mul_(2 ** -0.5)
        return cls(causal, anticausal, name=recurrence.recurrence)

    @property
    def dampening(self) -> float:
        return self.causal.dampening if "causal" in self._modules else 1.0

    @dampening.setter
    def dampening(self, value: float) -> None:
        if "causal" in self._modules:  # VideoModel.__init__ sets 1.0 before the directions exist
            self.causal.dampening = self.anticausal.dampening = value

    @property
    def is_recurrent(self) -> bool:
        return self.causal.is_recurrent or self.anticausal.is_recurrent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        ahead = self.causal(x)
        behind = self.anticausal(x.flip(1)).flip(1)
        b, t = x.shape[:2]
        base = upscale(x.flatten(0, 1), self.scale).unflatten(0, (b, t))
        return ahead + behind - base

    def process(self, x: torch.Tensor, state=None):
        raise StreamingNotSupported(
            f"recurrence {self.recurrence!r} is bidirectional: it needs the whole sequence, "
            "call model(x) on the full clip instead of streaming with process()")

    def recurrent_convs(self) -> list[nn.Conv2d]:
        return self.causal.recurrent_convs() + self.anticausal.recurrent_convs()

    def loop_certificate(self, conv_norm=None) -> LoopCertificate:
        def larger(norm):
            return max((self.causal.loop_certificate(norm), self.anticausal.loop_certificate(norm)),
                       key=lambda c: c.bound)
        cert = evaluate(larger, conv_norm)   # both directions' kernels in one search
        return LoopCertificate(cert.bound, cert.norm + ", for each direction's recurrence (the larger bound)",
                               cert.weights, cert.factors)

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name}, recurrence={self.recurrence}, task={self.task}"


def _split_joint_tail(module, state_dict, prefix, *args) -> None:
    """Read a checkpoint of the earlier layout (``body``, ``body_backward``, one tail over the joined
    features) into the two directions: the same function (module docstring)."""
    if not any(k.startswith(prefix + "body_backward.") for k in state_dict):
        return
    if prefix + "tail.weight" not in state_dict:
        raise ValueError("a bidirectional checkpoint of the earlier layout (body, body_backward, one joined tail) "
                         "with a parametrised tail cannot be split into two directions: save its plain weights first")
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.startswith("body."):
            state_dict[prefix + "causal." + rest] = state_dict.pop(key)
        elif rest.startswith("body_backward."):
            state_dict[prefix + "anticausal.body." + rest[len("body_backward."):]] = state_dict.pop(key)
    weight, bias = state_dict.pop(prefix + "tail.weight"), state_dict.pop(prefix + "tail.bias")
    c = weight.shape[1] // 2
    state_dict[prefix + "causal.tail.weight"], state_dict[prefix + "anticausal.tail.weight"] = weight[:, :c], weight[:, c:]
    state_dict[prefix + "causal.tail.bias"], state_dict[prefix + "anticausal.tail.bias"] = bias, torch.zeros_like(bias)


__all__ = ["RecurrentVideoModel", "BidirectionalVideoModel", "RECURRENCES", "INITS", "StreamingNotSupported"]
