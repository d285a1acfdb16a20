"""BM3D (Dabov et al., 2007) as a per-frame, non-learned baseline with the sequence API.

Each frame is denoised alone by the PyPI ``bm3d`` package (Mäkinen, Azzari & Foi's
reference implementation): ``bm3d.bm3d_rgb`` (CBM3D, block matching in an opponent
colour space) for RGB frames, ``bm3d.bm3d`` for grey ones, with the noise standard
deviation ``sigma/255`` on the [0, 1] scale. The paper used the authors' Matlab code.

The model has no parameters and no state: it can be tested, not trained. It is slow on
CPU (tens of seconds per 448×256 RGB frame on one core: benchmarks/results), so the full Table 1 test set
(1024 × 7 frames) is a long job; ``fps`` in the report measures exactly that.

VNLB (Arias & Morel, 2018), the other non-learned method of Table 1, has no Python
release (C++ only) and is not wrapped.
"""

from __future__ import annotations

import numpy as np
import torch

from recstab.models.interface import VideoModel


class BM3D(VideoModel):
    """Per-frame BM3D denoiser. ``model(x)``: B×T×C×H×W in [0, 1] -> same shape.

    Args:
        task: only ``denoise``.
        in_channels: 3 (CBM3D) or 1 (BM3D).
        sigma: noise standard deviation on the 0-255 scale (the paper's 30).
        profile: the ``bm3d`` package's profile name (``np``: normal profile).
    """

    name = "bm3d"  # build_model("bm3d") and the name of its reports
    memory = 1  # every frame alone: no loop

    def __init__(self, task: str = "denoise", in_channels: int = 3, sigma: float = 30.0, profile: str = "np"):
        super().__init__()
        if task != "denoise":
            raise ValueError(f"BM3D baseline supports task 'denoise' only, got task {task!r}")
        if in_channels not in (1, 3):
            raise ValueError(f"BM3D handles in_channels 1 (grey) or 3 (RGB), got {in_channels}")
        if sigma <= 0:
            raise ValueError(f"BM3D needs a noise level sigma > 0 (0-255 scale), got {sigma}")
        self.task, self.in_channels, self.sigma, self.profile = task, in_channels, float(sigma), profile

    @torch.no_grad()
    def process(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Denoise every frame independently; the state is empty."""
        self.check_input(x)
        frames = x.detach().cpu().double().numpy()
        out = np.empty_like(frames)
        for b in range(frames.shape[0]):
            for t in range(frames.shape[1]):
                out[b, t] = self.denoise_frame(frames[b, t])
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype), {}

    def denoise_frame(self, frame: np.ndarray) -> np.ndarray:
        """frame: C×H×W float array -> denoised C×H×W."""
        try:
            import bm3d
        except ImportError as err:
            raise ImportError("the BM3D baseline needs the PyPI package 'bm3d': "
                              "pip install 'recstab[baselines]' (or pip install bm3d)") from err
        sigma = self.sigma / 255
        if self.in_channels == 3:
            return np.asarray(bm3d.bm3d_rgb(frame.transpose(1, 2, 0), sigma, profile=self.profile)).transpose(2, 0, 1)
        return np.asarray(bm3d.bm3d(frame[0], sigma, profile=self.profile)).reshape(frame.shape)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, profile={self.profile!r}"
