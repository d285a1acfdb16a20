"""Degradations that turn clean clips into network inputs, and their seeding.

Two tasks, as in the paper:

- ``denoise``: x + n, n ~ N(0, (sigma/255)^2) i.i.d. per pixel. Not clamped: the
  network sees (and PSNR is measured against) the raw Gaussian model.
- ``sr2``: x2 bicubic downsampling with antialiasing, then optional noise
  (``sigma=0`` by default). Downsampling uses
  ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``, i.e. a
  bicubic kernel (a = -0.5) stretched by the scale factor, like PIL/MATLAB
  ``imresize``; its output is clamped to [0, 1] (bicubic overshoots at edges and
  a low-resolution camera would not), the noise added afterwards is not.

Randomness comes only from an explicit ``torch.Generator``. ``make_generator(seed,
*keys)`` hashes integer keys with numpy's ``SeedSequence`` (no collisions between
e.g. (1, 23) and (12, 3)), so the noise of sample or frame i depends only on
(seed, i) and not on batch size, worker count or chunking.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from recstab.models.interface import TASKS  # task name -> spatial scale factor of the output


def make_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` whose state depends only on ``(seed, *keys)``."""
    entropy = [int(seed), *(int(k) for k in keys)]
    if any(k < 0 for k in entropy):
        raise ValueError(f"seed and keys must be non-negative integers, got {entropy}")
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def check_task(task: str, sigma: float, scale: int | None = None) -> int:
    """Validate a (task, sigma, scale) triple and return the scale factor of the task."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(map(repr, TASKS))}")
    if not sigma >= 0:  # also catches NaN
        raise ValueError(f"sigma must be >= 0 (0-255 scale, e.g. 30), got {sigma}")
    if scale is not None and int(scale) != TASKS[task]:
        raise ValueError(f"task {task!r} has scale {TASKS[task]}, got scale={scale}")
    return TASKS[task]


class Degradation:
    """Degrade a clean clip: ``Degradation("denoise", sigma=30)(clean, generator)``.

    Args:
        task: "denoise" or "sr2".
        sigma: std of the additive Gaussian noise on the 0-255 scale (divided by 255 here).
        scale: optional consistency check; must equal the task's factor (1 or 2).
    """

    def __init__(self, task: str = "denoise", sigma: float = 30.0, scale: int | None = None):
        self.scale = check_task(task, sigma, scale)
        self.task = task
        self.sigma = float(sigma)

    def __repr__(self) -> str:
        return f"Degradation(task={self.task!r}, sigma={self.sigma}, scale={self.scale})"

    def check_size(self, height: int, width: int) -> None:
        """Refuse frames that the scale factor does not divide."""
        if height % self.scale or width % self.scale:
            raise ValueError(
                f"task {self.task!r} needs frame sizes divisible by {self.scale}, got {height}x{width}"
            )

    def __call__(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """clean: (..., C, H, W) in [0, 1] -> degraded (..., C, H/scale, W/scale), float32.

        ``generator`` (a CPU generator) drives the noise; None uses torch's global RNG.
        """
        x = clean.float()
        if self.scale > 1:
            *lead, c, h, w = x.shape
            self.check_size(h, w)
            x = F.interpolate(x.reshape(-1, c, h, w), size=(h // self.scale, w // self.scale),
                              mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0, 1).reshape(*lead, c, h // self.scale, w // self.scale)
        if self.sigma > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
            x = x + noise.to(x.device) * (self.sigma / 255.0)
        return x
