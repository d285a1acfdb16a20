"""FRVSR (Sajjadi, Vemulapalli & Brown, CVPR 2018), frame-recurrent, adapted to denoising.

At each frame a flow network (FNet) estimates the motion between the previous and the
current noisy input, the previous *output* is warped with it, and a residual network
(SRNet) denoises the current frame given that warped estimate::

    flow_t = FNet([x_{t-1}, x_t])                      (B×2×H×W, pixels, backward flow)
    w_t    = warp(λ·y_{t-1}, flow_t)                   (bilinear, grid_sample, border)
    y_t    = x_t + SRNet([x_t, w_t])

Adaptation to denoising (scale 1): the flow is not upscaled, the warped estimate is not
passed through space-to-depth, and SRNet has no transposed convs; it predicts a residual
added to the noisy frame, like the recstab models. The initial state is y_{-1} = 0 (FRVSR's
black first estimate) and x_{-1} = x_0. λ is ``model.dampening`` (1: the model as trained).

FNet (LeakyReLU 0.2 after every conv but the last): 2x conv 32, max-pool, 2x conv 64,
max-pool, 2x conv 128, max-pool, 2x conv 256, bilinear x2, 2x conv 128, bilinear x2,
2x conv 64, bilinear x2, conv 32, conv 2, then 24·tanh (displacements of at most 24 px, as
in the public FRVSR/TecoGAN FNet). Inputs are padded (replicate) to a multiple of 8.
SRNet: conv 2C -> 64 + ReLU, 10 residual blocks x + conv(relu(conv(x))), conv 64 -> C.
``channels`` (64) is SRNet's width; FNet's widths scale with it (channels/2 .. 4·channels,
the 32 .. 256 above at the paper's 64).

Parameter count (C = 3, 3x3 convs with bias):
FNet 6*32*9+32 = 1 760, 9 248, 18 496, 36 928, 73 856, 147 584, 295 168, 590 080,
295 040, 147 584, 73 792, 36 928, 18 464, 32*2*9+2 = 578: 1 745 506;
SRNet 6*64*9+64 = 3 520, 20 x 36 928 = 738 560, 64*3*9+3 = 1 731: 743 811;
total **2 489 317** (Table 1: 2.49M).

Stability structure: the loop runs through SRNet (head, blocks, tail) and the warp. No
Lipschitz bound is derived: bilinear warping is linear in the warped image, but its
ℓ2 operator norm depends on the (input-dependent) flow and can reach sqrt(H·W) when the
flow gathers many pixels at one place, so the loop certificate has an infinite bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recstab.models.backbones import ResidualBlock, conv3x3, he_init_
from recstab.models.certificate import LoopCertificate, unbounded_certificate
from recstab.models.interface import VideoModel

MAX_FLOW = 24.0  # pixels


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warping: out(p) = image(p + flow(p)), bilinear, border padding.

    image: B×C×H×W; flow: B×2×H×W in pixels, channel 0 horizontal (x), 1 vertical (y).
    """
    b, _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=image.device, dtype=image.dtype),
                            torch.arange(w, device=image.device, dtype=image.dtype), indexing="ij")
    gx = 2 * (xs + flow[:, 0]) / max(w - 1, 1) - 1  # align_corners=True: -1, 1 are pixel centres
    gy = 2 * (ys + flow[:, 1]) / max(h - 1, 1) - 1
    grid = torch.stack([gx, gy], dim=-1)  # B×H×W×2
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def conv_pair(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convs, each followed by LeakyReLU(0.2)."""
    return nn.Sequential(conv3x3(c_in, c_out), nn.LeakyReLU(0.2), conv3x3(c_out, c_out), nn.LeakyReLU(0.2))


class FlowNet(nn.Module):
    """FNet: encoder-decoder from two frames to the backward flow of the second one."""

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        w = width  # of the first stage: w, 2w, 4w, 8w down, 4w, 2w, w up (32 .. 256 in FRVSR)
        self.encoder = nn.ModuleList([conv_pair(2 * in_channels, w), conv_pair(w, 2 * w), conv_pair(2 * w, 4 * w)])
        self.bottom = conv_pair(4 * w, 8 * w)
        self.decoder = nn.ModuleList([conv_pair(8 * w, 4 * w), conv_pair(4 * w, 2 * w)])
        self.out = nn.Sequential(conv3x3(2 * w, w), nn.LeakyReLU(0.2), conv3x3(w, 2))

    def forward(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        h, w = current.shape[-2:]
        pad = (0, -w % 8, 0, -h % 8)  # three 2x poolings
        x = torch.cat([previous, current], dim=1)
        x = F.pad(x, pad, mode="replicate") if any(pad) else x
        for stage in self.encoder:
            x = F.max_pool2d(stage(x), 2)
        x = self.bottom(x)
        for stage in self.decoder:
            x = stage(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        x = self.out(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return MAX_FLOW * torch.tanh(x[..., :h, :w])


class FRVSR(VideoModel):
    """Frame-recurrent video denoiser with flow-based alignment (FRVSR adapted to denoising).

    Args:
        task: only ``denoise``.
        in_channels: image channels.
        channels: SRNet width (64); FNet's first stage is channels // 2 wide.
        depth: number of SRNet residual blocks (10).
    """

    name = "frvsr"  # build_model("frvsr") and the name of its reports
    is_recurrent = True

    def __init__(self, task: str = "denoise", in_channels: int = 3, channels: int = 64, depth: int = 10):
        super().__init__()
        if task != "denoise":
            raise ValueError(f"FRVSR baseline supports task 'denoise' only, got task {task!r}")
        if in_channels < 1 or channels < 2 or depth < 1:
            raise ValueError(f"need in_channels >= 1, channels >= 2, depth >= 1; "
                             f"got {in_channels}, {channels}, {depth}")
        self.task, self.in_channels = task, in_channels
        self.flow = FlowNet(in_channels, channels // 2)
        self.head = conv3x3(2 * in_channels, channels)
        self.blocks = nn.ModuleList(ResidualBlock(channels) for _ in range(depth))
        self.tail = conv3x3(channels, in_channels)
        he_init_(self)

    # ------------------------------------------------------------------ sequence API
    def initial_state(self, x: torch.Tensor) -> dict:
        """The previous input (x_{-1} = x_0) and output (y_{-1} = 0) frames."""
        return {"input": x[:, 0], "output": torch.zeros_like(x[:, 0])}

    def step(self, frame: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        y = self.denoise(frame, state["input"], state["output"])
        return y, {"input": frame, "output": y}

    def denoise(self, frame: torch.Tensor, previous_frame: torch.Tensor, previous_output: torch.Tensor
                ) -> torch.Tensor:
        warped = warp(self.dampening * previous_output, self.flow(previous_frame, frame))
        h = F.relu(self.head(torch.cat([frame, warped], dim=1)))
        for block in self.blocks:
            h = block(h)
        return frame + self.tail(h)

    # ------------------------------------------------------------------ stability structure
    def recurrent_convs(self) -> list[nn.Conv2d]:
        """SRNet's convs: the fed-back output goes through all of them (FNet sees inputs only)."""
        return [self.head] + [conv for block in self.blocks for conv in block.convs()] + [self.tail]

    def loop_certificate(self, conv_norm=None) -> LoopCertificate:
        """Infinite: the warp's operator norm depends on the flow (see the module docstring)."""
        return unbounded_certificate("the warp of the fed-back output has a flow-dependent operator norm")
