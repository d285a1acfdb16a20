"""FastDVDnet (Tassano, Delon & Veit, CVPR 2020), a feedforward video denoiser.

Two cascaded stages of the same small U-Net ("denoising block"), no optical flow:
stage 1 denoises three overlapping triplets of a 5-frame window with shared weights,
stage 2 fuses the three stage-1 estimates into the output frame.

One denoising block on frames (a, b, c), with reference frame r (see *window* below)::

    input   per-frame grouped conv (C [+1 noise map] -> 30, groups=3), BN, ReLU,
            conv 90 -> 32, BN, ReLU                                        x0 (32, H)
    down    conv stride 2 32 -> 64, BN, ReLU, 2x[conv 64, BN, ReLU]        x1 (64, H/2)
    down    conv stride 2 64 -> 128, BN, ReLU, 2x[conv 128, BN, ReLU]      x2 (128, H/4)
    up      2x[conv 128, BN, ReLU], conv 128 -> 4*64, pixel shuffle        (64, H/2)
    up      2x[conv 64, BN, ReLU] on x1 + ..., conv 64 -> 4*32, shuffle    (32, H)
    output  conv 32, BN, ReLU, conv 32 -> C on x0 + ...;  result = r - that

With ``channels = w`` the three U-Net levels are w/2, w, 2w wide (the paper's w = 64:
32, 64, 128 as above; the 30 per-frame features of the input conv stay). Convs have no
bias (BatchNorm follows them), as in the original. In training mode the
BatchNorm statistics are those of the B windows of one time step (frames are processed
one at a time, so chunked and whole-clip processing agree in both modes).

Parameter count (C = 3, blind), one block:
input 3*30*9 + 180 (BN) + 90*32*9 + 64 = 28 594; first down 32*64*9 + 128 + 2*(64*64*9 + 128)
= 92 544; second down 64*128*9 + 256 + 2*(128*128*9 + 256) = 369 408; first up
2*(128*128*9 + 256) + 128*256*9 = 590 336; second up 2*(64*64*9 + 128) + 64*128*9 = 147 712;
output 32*32*9 + 64 + 32*3*9 = 10 144; block total 1 238 738, two blocks **2 477 476**
(Table 1: 2.49M, -0.5 %). The noise map adds 3*30*9 = 810 per block (2 479 096).

Window (adaptation for streaming). The original is centred: frame t sees t-2..t+2 and
each block subtracts its residual from the middle frame. The recstab contract wants
uni-directional models that stream, so by default (``causal=True``) frame t sees the
causal window t-4..t (the first frame replicated before the start), and each block's
reference is its newest frame: stage 1 estimates frames t-2, t-1, t from the triplets
(t-4..t-2), (t-3..t-1), (t-2..t), stage 2 refines the estimate of t. Same architecture,
same parameters; the state carries the last 4 frames. ``causal=False`` gives the original
centred model (last frame replicated after the end too), whole clips only.

Noise map: FastDVDnet takes the noise level as an extra constant input channel per
frame. The paper trains at one fixed sigma, where that channel is a constant that carries
no information, so the default is blind (``noise_sigma=None``); ``noise_sigma=30`` (0-255
scale) appends the map sigma/255.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recstab.models.backbones import he_init_
from recstab.models.interface import StreamingNotSupported, VideoModel

WINDOW = 5


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, groups=groups, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class DenoisingBlock(nn.Module):
    """The U-Net of one FastDVDnet stage: three frames -> estimate of the reference frame."""

    def __init__(self, in_channels: int, noise_map: bool, reference: int, channels: int = 64):
        super().__init__()
        per_frame = in_channels + int(noise_map)
        w1, w2, w3 = channels // 2, channels, 2 * channels  # the three levels (32, 64, 128 in the paper)
        self.reference = reference
        self.input = nn.Sequential(*conv_bn_relu(3 * per_frame, 3 * 30, groups=3), *conv_bn_relu(90, w1))
        self.down1 = nn.Sequential(*conv_bn_relu(w1, w2, stride=2), *conv_bn_relu(w2, w2), *conv_bn_relu(w2, w2))
        self.down2 = nn.Sequential(*conv_bn_relu(w2, w3, stride=2), *conv_bn_relu(w3, w3), *conv_bn_relu(w3, w3))
        self.up2 = nn.Sequential(*conv_bn_relu(w3, w3), *conv_bn_relu(w3, w3),
                                 nn.Conv2d(w3, 4 * w2, 3, padding=1, bias=False), nn.PixelShuffle(2))
        self.up1 = nn.Sequential(*conv_bn_relu(w2, w2), *conv_bn_relu(w2, w2),
                                 nn.Conv2d(w2, 4 * w1, 3, padding=1, bias=False), nn.PixelShuffle(2))
        self.output = nn.Sequential(*conv_bn_relu(w1, w1), nn.Conv2d(w1, in_channels, 3, padding=1, bias=False))

    def forward(self, frames: list[torch.Tensor], noise_map: torch.Tensor | None) -> torch.Tensor:
        """frames: three B×C×H×W tensors (H, W multiples of 4); noise_map: B×1×H×W or None."""
        groups = [torch.cat([f, noise_map], 1) if noise_map is not None else f for f in frames]
        x0 = self.input(torch.cat(groups, dim=1))
        x1 = self.down1(x0)
        x1 = x1 + self.up2(self.down2(x1))
        return frames[self.reference] - self.output(x0 + self.up1(x1))


class FastDVDnet(VideoModel):
    """Two-stage FastDVDnet on a 5-frame window; feedforward. See the module docstring.

    Args:
        task: only ``denoise``.
        in_channels: image channels.
        channels: width w of the middle U-Net level (64, the paper's; levels w/2, w, 2w).
        noise_sigma: None (blind, default) or the noise level on the 0-255 scale fed as a map.
        causal: True (default): window t-4..t, streamable; False: the original centred
            window t-2..t+2, whole clips only.
    """

    name = "fastdvdnet"  # build_model("fastdvdnet") and the name of its reports
    is_recurrent = False

    def __init__(self, task: str = "denoise", in_channels: int = 3, channels: int = 64,
                 noise_sigma: float | None = None, causal: bool = True):
        super().__init__()
        if task != "denoise":
            raise ValueError(f"FastDVDnet baseline supports task 'denoise' only, got task {task!r}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if channels < 2 or channels % 2:
            raise ValueError(f"channels (the middle U-Net width) must be even and >= 2, got {channels}")
        self.task, self.in_channels, self.noise_sigma, self.causal = task, in_channels, noise_sigma, causal
        reference = 2 if causal else 1  # newest frame of each triplet (causal) or the middle one
        self.stage1 = DenoisingBlock(in_channels, noise_sigma is not None, reference, channels)
        self.stage2 = DenoisingBlock(in_channels, noise_sigma is not None, reference, channels)
        he_init_(self)  # dampening (from VideoModel) has no effect: no recurrence

    @property
    def streamable(self) -> bool:
        return self.causal

    # ------------------------------------------------------------------ sequence API
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.causal:
            return self.process(x)[0]
        self.check_input(x)
        padded = torch.cat([x[:, :1], x[:, :1], x, x[:, -1:], x[:, -1:]], dim=1)
        return torch.stack([self.denoise_window(padded[:, t:t + WINDOW]) for t in range(x.shape[1])], 1)

    def initial_state(self, x: torch.Tensor) -> dict:
        """The last 4 input frames (the first frame replicated before the start)."""
        return {"frames": x[:, :1].expand(-1, WINDOW - 1, -1, -1, -1)}

    def step(self, frame: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        frames = torch.cat([state["frames"], frame[:, None]], dim=1)
        return self.denoise_window(frames), {"frames": frames[:, 1:]}

    def process(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        if not self.causal:
            raise StreamingNotSupported("FastDVDnet with causal=False uses the future frames t+1, t+2: "
                                        "call model(x) on the whole clip, or build it with causal=True")
        return super().process(x, state)

    @property
    def memory(self) -> int:
        return WINDOW

    def denoise_window(self, window: torch.Tensor) -> torch.Tensor:
        """window: B×5×C×H×W (oldest first) -> B×C×H×W estimate of the reference frame."""
        h, w = window.shape[-2:]
        pad = (0, -w % 4, 0, -h % 4)  # the U-Net halves the size twice
        frames = [F.pad(window[:, i], pad, mode="replicate") if any(pad) else window[:, i] for i in range(WINDOW)]
        noise_map = None
        if self.noise_sigma is not None:
            noise_map = frames[0].new_full((frames[0].shape[0], 1, *frames[0].shape[-2:]), self.noise_sigma / 255)
        first = [self.stage1(frames[i:i + 3], noise_map) for i in range(3)]
        return self.stage2(first, noise_map)[..., :h, :w]

    def extra_repr(self) -> str:
        return f"causal={self.causal}, noise_sigma={self.noise_sigma}"
