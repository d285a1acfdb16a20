"""The two backbones of the paper (section 3.1, appendix C): VDnCNN and VResNet.

Both are a head conv (input channels -> C), a stack of blocks and, outside this
module, a tail conv (C -> output channels) owned by the temporal model:

- ``vdncnn``: DnCNN-like, ``depth`` = 10 blocks of conv3x3 + ReLU (the head is
  followed by a ReLU too);
- ``vresnet``: ResNet-like, ``depth`` = 5 residual blocks ``x + conv(relu(conv(x)))``.

Every block may take a *side input* of C extra channels concatenated to the input
of its first conv. Temporal connections use it: feature-recurrence feeds a block
its own previous output, feature-shifting its previous input.

With C = 64 and 3x3 kernels a C->C conv holds 36 928 parameters, the head 1 792
and the tail 1 731: both backbones total 372 803, and each side input adds
64·64·9 = 36 864 per block, which is how Table 1's counts come out (feat: +10
blocks for VDnCNN = 741k, +5 for VResNet = 557k; RLSP widens the head = 410k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ("vdncnn", "vresnet")
DEFAULT_DEPTH = {"vdncnn": 10, "vresnet": 5}


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)


def he_init_(module: nn.Module) -> None:
    """DnCNN-style He-normal init (fan-in, ReLU gain) of every conv; zero biases.

    The paper's Fig. 2 depends on it: with this init, untrained recurrent models
    diverge on random input while feedforward ones stay bounded. PyTorch's
    default (Kaiming-uniform with a=sqrt(5), i.e. weights 1/sqrt(3) as large)
    makes every connection look stable.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ConvReLU(nn.Module):
    """VDnCNN block: relu(conv([x, side]))."""

    def __init__(self, channels: int, side_channels: int = 0):
        super().__init__()
        self.conv = conv3x3(channels + side_channels, channels)

    def forward(self, x: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        if side is not None:
            x = torch.cat([x, side], dim=1)
        return F.relu(self.conv(x))

    def convs(self) -> list[nn.Conv2d]:
        return [self.conv]

    def lipschitz(self, conv_norm) -> tuple[float, float]:
        """Bounds (in the main input, in the side input): the two slices of the kernel."""
        w, c = self.conv.weight, self.conv.out_channels
        return conv_norm(w[:, :c]), (conv_norm(w[:, c:]) if w.shape[1] > c else 0.0)


class ResidualBlock(nn.Module):
    """VResNet block: x + conv2(relu(conv1([x, side])))."""

    def __init__(self, channels: int, side_channels: int = 0):
        super().__init__()
        self.conv1 = conv3x3(channels + side_channels, channels)
        self.conv2 = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        inp = x if side is None else torch.cat([x, side], dim=1)
        return x + self.conv2(F.relu(self.conv1(inp)))

    def convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2]

    def lipschitz(self, conv_norm) -> tuple[float, float]:
        """Bounds (in the main input: 1 + ‖K2‖‖K1_main‖, in the side input: ‖K2‖‖K1_side‖)."""
        w1, c = self.conv1.weight, self.conv2.out_channels
        k2 = conv_norm(self.conv2.weight)
        side = k2 * conv_norm(w1[:, c:]) if w1.shape[1] > c else 0.0
        return 1.0 + k2 * conv_norm(w1[:, :c]), side


class Backbone(nn.Module):
    """Head conv + a stack of blocks; returns the last hidden features (C channels).

    Args:
        kind: ``vdncnn`` or ``vresnet``.
        in_channels: channels entering the head (frames of the window + any fed-back signal).
        channels: width C of every hidden layer.
        depth: number of blocks (default 10 for vdncnn, 5 for vresnet).
        side_channels: extra channels each block's first conv accepts (0: none).
    """

    def __init__(self, kind: str, in_channels: int, channels: int, depth: int | None = None,
                 side_channels: int = 0):
        super().__init__()
        if kind not in BACKBONES:
            raise ValueError(f"unknown backbone {kind!r}; valid backbones: {', '.join(BACKBONES)}")
        depth = DEFAULT_DEPTH[kind] if depth is None else depth
        if depth < 1:
            raise ValueError(f"backbone depth must be >= 1, got {depth}")
        self.kind = kind
        self.head = conv3x3(in_channels, channels)
        block = ConvReLU if kind == "vdncnn" else ResidualBlock
        self.blocks = nn.ModuleList(block(channels, side_channels) for _ in range(depth))

    def forward(self, x: torch.Tensor, sides: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Returns (hidden, block_inputs, block_outputs)."""
        h = self.head(x)
        if self.kind == "vdncnn":
            h = F.relu(h)
        inputs, outputs = [], []
        for i, block in enumerate(self.blocks):
            inputs.append(h)
            h = block(h, None if sides is None else sides[i])
            outputs.append(h)
        return h, inputs, outputs

    def convs(self) -> list[nn.Conv2d]:
        return [self.head] + [conv for block in self.blocks for conv in block.convs()]

    def chain_factors(self, conv_norm, fed_from: int) -> dict[str, float]:
        """Bounds of head (input channels ``fed_from:`` only, the fed-back part) -> blocks."""
        factors = {"head": conv_norm(self.head.weight[:, fed_from:])}
        for i, block in enumerate(self.blocks):
            factors[f"block{i + 1}"] = block.lipschitz(conv_norm)[0]
        return factors
