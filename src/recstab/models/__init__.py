"""Models: ``build_model(backbone, recurrence, task, channels)``.

The paper's backbones × temporal connections live in :mod:`.temporal` and
:mod:`.backbones`; the published baselines of Table 1 (FastDVDnet, FRVSR,
DBDNet) in :mod:`.baselines`, reachable with ``backbone=<name>``.
"""

from __future__ import annotations

from torch import nn

from recstab.models.backbones import BACKBONES, he_init_
from recstab.models.temporal import (RECURRENCES, TASKS, RecurrentVideoModel,
                                     StreamingNotSupported, parse_recurrence)


def _baselines() -> dict:
    try:
        from recstab.models.baselines import BASELINES
    except ImportError:  # baselines not installed in this checkout
        return {}
    return BASELINES


def build_model(backbone: str = "vresnet", recurrence: str = "feat", task: str = "denoise",
                channels: int = 64, in_channels: int = 3, depth: int | None = None) -> nn.Module:
    """Build a video restoration model with the sequence API ``model(x)`` / ``model.process(x, state)``.

    ``backbone`` is ``vdncnn`` or ``vresnet`` (then ``recurrence`` picks the temporal
    connection) or a baseline name (then ``recurrence`` is ignored).
    """
    baselines = _baselines()
    if backbone in baselines:
        return baselines[backbone](task=task, in_channels=in_channels)
    if backbone not in BACKBONES:
        valid = ", ".join(list(BACKBONES) + list(baselines))
        raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {valid}")
    return RecurrentVideoModel(backbone, recurrence, task, channels, in_channels, depth)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["build_model", "count_parameters", "RecurrentVideoModel", "StreamingNotSupported",
           "BACKBONES", "RECURRENCES", "TASKS", "parse_recurrence", "he_init_"]
