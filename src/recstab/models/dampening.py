"""Feature dampening (appendix F) as a scoped setting for diagnostics.

Scaling the recurrent kernel by λ equals scaling the fed-back features,
(λK) * h = K * (λh), so every recstab model carries ``model.dampening`` (1: off,
0: recurrence cut) and applies it to what it feeds back. Diagnostics run a model
in eval mode at some λ and must leave it as they found it: :func:`evaluating`.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from recstab.models.interface import traits


@contextmanager
def evaluating(model: nn.Module, dampening: float | None = None):
    """Eval mode, and feature dampening λ when given, for the block; both restored after."""
    old_dampening = traits(model).dampening
    if dampening is not None and old_dampening is None:
        raise ValueError(f"dampening={dampening} asked but {type(model).__name__} has no "
                         "`dampening` attribute (feature dampening of appendix F)")
    was_training = model.training
    model.eval()
    if dampening is not None:
        model.dampening = float(dampening)
    try:
        yield model
    finally:
        model.train(was_training)
        if dampening is not None:
            model.dampening = old_dampening
