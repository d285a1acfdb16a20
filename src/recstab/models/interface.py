"""The one interface every recstab video model implements: :class:`VideoModel`.

Diagnostics, norms, training and the sweeps call only what is defined here, so a new
model (or a published baseline) is diagnosable as soon as it subclasses it:

=========================== ===============================================================
``model(x)``                B×T×C×H×W in [0, 1] -> B×T×C×sH×sW, from the initial state
``model.process(x, state)`` the same on a chunk, carrying the state across calls
                            (``state=None``: the initial state). For a streamable model,
                            ``process(x[:, :k])`` then ``process(x[:, k:], state)`` equals
                            ``model(x)``.
``initial_state(x)``,       what a streaming model defines: its state before the first
``step(frame, state)``      frame (a dict of tensors or lists of tensors) and one frame of
                            processing, ``(y_t, state_t)``; ``process`` loops over them
``in_channels``, ``scale``, image channels, spatial output scale (1 denoise, 2 sr2), the task
``task``
``streamable``              False for models that need the future (bidirectional): they
                            refuse ``process`` with :class:`StreamingNotSupported`
``is_recurrent``            whether the state feeds back into itself (a loop exists)
``dampening``               feature dampening λ (appendix F): the fed-back signal is scaled
                            by λ (1 = the trained model, 0 = recurrence off)
``recurrent_convs()``       the convs inside the loop (what a Lipschitz constraint binds)
``loop_certificate()``      an upper bound of the recurrence map's Lipschitz constant in a
                            stated norm (:mod:`recstab.models.certificate`)
=========================== ===============================================================
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from recstab.models.certificate import LoopCertificate, feedforward_certificate

TASKS = {"denoise": 1, "sr2": 2}  # task -> spatial upscaling factor of the output


def check_task(task: str) -> int:
    """The output scale of ``task``; a clear error for an unknown one."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[task]


def check_clip(x: torch.Tensor, channels: int) -> None:
    """Refuse anything but a B×T×C×H×W clip with the model's channel count."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[2] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected input B×T×{channels}×H×W, got shape {shape}")


class StreamingNotSupported(RuntimeError):
    """Raised when a model that needs the whole sequence is asked to stream chunk by chunk."""


class VideoModel(nn.Module):
    """Base class of every recstab video model (see the module docstring for the contract).

    A subclass sets ``in_channels``, ``scale``, ``task`` and defines ``initial_state`` and
    ``step`` (streaming models), or overrides ``forward``/``process`` (whole-clip models);
    recurrent ones also define ``recurrent_convs`` and ``loop_certificate``.
    """

    is_recurrent: bool = False
    streamable: bool = True
    scale: int = 1
    task: str = "denoise"
    in_channels: int = 3

    def __init__(self):
        super().__init__()
        self.dampening = 1.0

    # ------------------------------------------------------------------ sequence API
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-sequence processing from the initial state."""
        return self.process(x)[0]

    def process(self, x: torch.Tensor, state=None) -> tuple[torch.Tensor, dict]:
        """Process a chunk of frames, carrying the state across calls (``None``: initial state)."""
        if not self.streamable:
            raise StreamingNotSupported(
                f"{type(self).__name__} ({self.extra_repr()}) needs the whole sequence: "
                "call model(x) on the full clip instead of streaming with process()")
        self.check_input(x)
        state = self.initial_state(x) if state is None else state
        outputs = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            outputs.append(y)
        return torch.stack(outputs, dim=1), state

    def initial_state(self, x: torch.Tensor) -> dict:
        """The state before the first frame of clip ``x`` (B×T×C×H×W)."""
        raise NotImplementedError(f"{type(self).__name__} defines no initial_state()")

    def step(self, frame: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """One frame (B×C×H×W) -> (output frame, next state)."""
        raise NotImplementedError(f"{type(self).__name__} defines no step()")

    def check_input(self, x: torch.Tensor) -> None:
        check_clip(x, self.in_channels)

    # ------------------------------------------------------------------ stability structure
    def recurrent_convs(self) -> list[nn.Conv2d]:
        """The convs inside the recurrent loop (none for a feedforward model)."""
        return []

    def loop_certificate(self, conv_norm=None) -> LoopCertificate:
        """Bound of the recurrence map in the fed-back state (feedforward: no loop)."""
        return feedforward_certificate(self.memory)

    @property
    def memory(self) -> int | None:
        """How many input frames y_t depends on, for a model without a loop (None: unknown)."""
        return None


class Traits(NamedTuple):
    """What the diagnostics need to know of a model, whatever its class."""

    in_channels: int
    scale: int
    task: str
    streamable: bool       # has process(x, state) and can stream chunk by chunk
    is_recurrent: bool
    dampening: float | None  # None: the model has no feature dampening


def traits(model: nn.Module) -> Traits:
    """A :class:`VideoModel`'s own answers; for any other module with ``forward(x)`` (the
    diagnostics accept one), the documented defaults: 3 channels, denoise, streamable when it
    has ``process(x, state)``, recurrent unless it says otherwise, no dampening."""
    if isinstance(model, VideoModel):
        return Traits(model.in_channels, model.scale, model.task, model.streamable, model.is_recurrent,
                      model.dampening)
    has_process = callable(getattr(model, "process", None))
    return Traits(int(getattr(model, "in_channels", 3)), int(getattr(model, "scale", 1)),
                  getattr(model, "task", "denoise"), has_process and getattr(model, "streamable", True),
                  getattr(model, "is_recurrent", True), getattr(model, "dampening", None))
