"""Models: ``build_model(backbone, recurrence, task, channels)``.

Every model is a :class:`~recstab.models.interface.VideoModel` (:mod:`.interface`): the paper's
backbones (:mod:`.backbones`) × temporal connections (:mod:`.connections`, objects that own their
state, feed/update step, in-loop convs and part of the loop certificate, :mod:`.certificate`), put
together in :mod:`.temporal`; the published baselines of Table 1 (FastDVDnet, FRVSR, DBDNet, BM3D) in
:mod:`.baselines`, reachable with ``backbone=<name>``; reference linear recurrences with known
stability in :mod:`.reference`.
"""

from __future__ import annotations

import inspect

from torch import nn

from recstab.models.backbones import BACKBONES, he_init_
from recstab.models.adapter import ClipModel, StepModel
from recstab.models.certificate import (LoopCertificate, chain_certificate, default_conv_norm, triangular_certificate,
                                        unbounded_certificate)
from recstab.models.connections import (CONNECTIONS, RECURRENCES, BiRLSP, FeatureRecurrence, FeatureShift,
                                        FrameRecurrence, NoRecurrence, RLSP, TemporalConnection, connection)
from recstab.models.interface import TASKS, StreamingNotSupported, VideoModel, check_clip
from recstab.models.temporal import INITS, BidirectionalVideoModel, RecurrentVideoModel


def _baselines() -> dict:
    try:
        from recstab.models.baselines import BASELINES
    except ImportError:  # baselines not installed in this checkout
        return {}
    return BASELINES


def build_model(backbone: str = "vresnet", recurrence: str | TemporalConnection = "feat", task: str = "denoise",
                channels: int = 64, in_channels: int = 3, depth: int | None = None, init: str = "he",
                norm=None) -> VideoModel:
    """Build a video restoration model with the sequence API ``model(x)`` / ``model.process(x, state)``.

    ``backbone`` is ``vdncnn`` or ``vresnet`` (then ``recurrence`` picks the temporal
    connection: a name of :data:`RECURRENCES` or a :class:`TemporalConnection` object, which
    is what a ``conf/recurrence`` file with a ``_target_`` gives) or a baseline name (then
    ``recurrence`` is ignored). ``init``: ``he``
    (He-normal, the paper's Fig. 2 setting) or ``near_identity`` (the same with the tail
    scaled by 0.1: a 10× smaller initial correction, not the identity, so that training
    does not spend its first steps undoing a large random correction). ``norm``: a weight
    normalisation object (``recstab.norms.SRNC(alpha=2, beta=0.1)``, what ``conf/norm/*.yaml``
    instantiates), applied to the built model with ``norm(model)``; a dict is read by
    :func:`recstab.norms.make_norm`; ``None`` leaves it unconstrained.
    """
    baselines = _baselines()
    if backbone in baselines:
        model = _build_baseline(baselines[backbone], task, channels, in_channels, depth)
    elif backbone not in BACKBONES:
        valid = ", ".join(list(BACKBONES) + list(baselines))
        raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {valid}")
    elif connection(recurrence).bidirectional:
        model = BidirectionalVideoModel.build(backbone, connection(recurrence), task, channels, in_channels, depth, init)
    else:
        model = RecurrentVideoModel(backbone, recurrence, task, channels, in_channels, depth, init)
    if norm is not None:
        from recstab.norms import make_norm  # models do not depend on norms at import
        model = make_norm(norm)(model)
    return model


def _build_baseline(cls: type, task: str, channels: int, in_channels: int, depth: int | None) -> VideoModel:
    """A baseline at its published size by default; ``channels`` (and ``depth``) resize the ones that have them."""
    knobs = inspect.signature(cls).parameters
    if depth is not None and "depth" not in knobs:
        raise ValueError(f"{cls.__name__} has a fixed depth (got depth={depth}); leave model.depth null")
    kwargs = {"channels": channels} if "channels" in knobs else {}  # BM3D has no width: channels is moot
    if depth is not None:
        kwargs["depth"] = depth
    return cls(task=task, in_channels=in_channels, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["build_model", "count_parameters", "VideoModel", "StepModel", "ClipModel", "chain_certificate",
           "triangular_certificate", "unbounded_certificate", "default_conv_norm", "RecurrentVideoModel",
           "BidirectionalVideoModel", "StreamingNotSupported",
           "LoopCertificate", "TemporalConnection", "NoRecurrence", "FeatureShift", "FeatureRecurrence",
           "FrameRecurrence", "RLSP", "BiRLSP", "CONNECTIONS", "connection", "check_clip",
           "BACKBONES", "RECURRENCES", "TASKS", "INITS", "he_init_"]
