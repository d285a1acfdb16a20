"""Models: ``build_model(backbone, recurrence, task, channels)``.

Every model is a :class:`~recstab.models.interface.VideoModel` (:mod:`.interface`): the paper's
backbones (:mod:`.backbones`) × temporal connections (:mod:`.connections`, objects that own their
state, feed/update step, in-loop convs and part of the loop certificate, :mod:`.certificate`), put
together in :mod:`.temporal`; the published baselines of Table 1 (FastDVDnet, FRVSR, DBDNet, BM3D) in
:mod:`.baselines` (each a class that ``conf/model/<name>.yaml`` names by ``_target_``; ``backbone=<name>`` here);
reference linear recurrences with known stability in :mod:`.reference`.
"""

from __future__ import annotations

import inspect

from torch import nn

from recstab.models.backbones import BACKBONES, he_init_
from recstab.models.adapter import ClipModel, StepModel
from recstab.models.baselines import BASELINES
from recstab.models.certificate import (LoopCertificate, chain_certificate, default_conv_norm, triangular_certificate,
                                        unbounded_certificate)
from recstab.models.connections import (CONNECTIONS, RECURRENCES, BiRLSP, FeatureRecurrence, FeatureShift,
                                        FrameRecurrence, NoRecurrence, RLSP, TemporalConnection, connection)
from recstab.models.interface import TASKS, StreamingNotSupported, VideoModel, check_clip
from recstab.models.temporal import INITS, BidirectionalVideoModel, RecurrentVideoModel


def build_model(backbone: str = "vresnet", recurrence: str | TemporalConnection | None = None, task: str = "denoise",
                channels: int | None = None, in_channels: int = 3, depth: int | None = None, init: str | None = None,
                norm=None) -> VideoModel:
    """Build a video restoration model with the sequence API ``model(x)`` / ``model.process(x, state)``.

    ``backbone`` is ``vdncnn`` or ``vresnet``: then ``recurrence`` (default ``feat``) picks the temporal
    connection: a name of :data:`RECURRENCES` or a :class:`TemporalConnection` object, which
    is what a ``conf/recurrence`` file with a ``_target_`` gives; ``channels`` defaults to 64; ``init``: ``he``
    (the default: He-normal, the paper's Fig. 2 setting) or ``near_identity`` (the same with the tail
    scaled by 0.1: a 10× smaller initial correction, not the identity, so that training
    does not spend its first steps undoing a large random correction).

    Or ``backbone`` is the ``name`` of a baseline (:data:`BASELINES`: fastdvdnet, frvsr, dbdnet, bm3d): its class
    is built with ``task``, ``in_channels`` and the ``channels`` / ``depth`` given (None: the published size);
    it has its own temporal structure and He init, so ``recurrence`` must be None and ``init`` None or ``he``.
    The configs name the classes themselves (``conf/model/fastdvdnet.yaml``); this shorthand also loads the
    checkpoints written before they did (``{"_target_": "recstab.models.build_model", "backbone": "fastdvdnet"}``).

    ``norm``: a weight normalisation object (``recstab.norms.SRNC(alpha=2, beta=0.1)``, what
    ``conf/norm/*.yaml`` instantiates), applied to the built model with ``norm(model)``; a dict is read by
    :func:`recstab.norms.make_norm`; ``None`` leaves it unconstrained.
    """
    if backbone in BASELINES:
        model = _build_baseline(BASELINES[backbone], recurrence, task, channels, in_channels, depth, init)
    elif backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {', '.join([*BACKBONES, *BASELINES])}")
    else:
        recurrence = "feat" if recurrence is None else recurrence
        channels, init = 64 if channels is None else channels, "he" if init is None else init
        if connection(recurrence).bidirectional:
            model = BidirectionalVideoModel.build(backbone, connection(recurrence), task, channels, in_channels, depth,
                                                  init)
        else:
            model = RecurrentVideoModel(backbone, recurrence, task, channels, in_channels, depth, init)
    if norm is not None:
        from recstab.norms import make_norm  # models do not depend on norms at import
        model = make_norm(norm)(model)
    return model


def _build_baseline(cls: type, recurrence, task: str, channels: int | None, in_channels: int, depth: int | None,
                    init: str | None) -> VideoModel:
    """``cls(task, in_channels, channels, depth)`` with only the sizes given: None keeps the class's published one."""
    if recurrence is not None:
        raise ValueError(f"{cls.name} has its own temporal structure: recurrence={recurrence!r} is for the "
                         f"backbones {', '.join(BACKBONES)}; leave it None")
    if init not in (None, "he"):
        raise ValueError(f"{cls.name} is He-initialised: init={init!r} is for the backbones {', '.join(BACKBONES)}; "
                         "leave it None")
    sizes = {key: value for key, value in (("channels", channels), ("depth", depth)) if value is not None}
    arguments = inspect.signature(cls).parameters
    for key, value in sizes.items():
        if key not in arguments:
            raise ValueError(f"{cls.name} has no {key} (got {key}={value}); its arguments: {', '.join(arguments)}")
    return cls(task=task, in_channels=in_channels, **sizes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["build_model", "count_parameters", "VideoModel", "StepModel", "ClipModel", "chain_certificate",
           "triangular_certificate", "unbounded_certificate", "default_conv_norm", "RecurrentVideoModel",
           "BidirectionalVideoModel", "StreamingNotSupported",
           "LoopCertificate", "TemporalConnection", "NoRecurrence", "FeatureShift", "FeatureRecurrence",
           "FrameRecurrence", "RLSP", "BiRLSP", "CONNECTIONS", "connection", "check_clip",
           "BACKBONES", "BASELINES", "RECURRENCES", "TASKS", "INITS", "he_init_"]
