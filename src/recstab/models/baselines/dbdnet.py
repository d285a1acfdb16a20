"""Deep Burst Denoising (Godard, Matzen & Uyttendaele, ECCV 2018): "DBDNet" in the paper.

Two branches of D = 8 layers of 3x3 convs with F = 64 features:

- a single-frame branch, a plain DnCNN-like denoiser applied to each frame alone::

      s_1 = relu(conv(x_t)),  s_l = relu(conv(s_{l-1})) for l = 2..D-1,  s_D = x_t + conv(s_{D-1})

- a multi-frame branch whose every layer sees the single-frame features of its level,
  the multi-frame features of the layer below and *its own output at the previous frame*
  (feature-recurrence; λ = ``model.dampening`` scales the fed-back features)::

      m_1 = relu(conv([s_1, λ·m_1^{t-1}]))
      m_l = relu(conv([s_l, m_{l-1}, λ·m_l^{t-1}]))          l = 2..D-1
      m_D = x_t + conv([s_D, m_{D-1}, λ·m_D^{t-1}])          = y_t, the output

The last layers (no ReLU) predict a residual added to the noisy frame, like the recstab
models, so the last multi-frame layer's own previous output is the previous output frame.
The initial state is m_l^{-1} = 0. Only the multi-frame output is returned (the original
also supervises the single-frame output; recstab trains on y_t alone).

Parameter count (C = 3, F = 64, D = 8, convs with bias):
single-frame 3*64*9+64 = 1 792, 6 x (64*64*9+64) = 221 568, 64*3*9+3 = 1 731: 225 091;
multi-frame 128*64*9+64 = 73 792, 6 x (192*64*9+64) = 663 936, (3+64+3)*3*9+3 = 1 893:
739 621; total **964 712** (Table 1: 965k).

Stability structure: the loop is block-triangular like the recstab feature-recurrence
(layer l sees its own past and the present of the layer below), so its certificate is the
weighted-norm bound of :func:`recstab.models.certificate.triangular_certificate`, with
A_l and S_l the bounds of the kernel slices that read m_{l-1} and m_l^{t-1}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recstab.models.backbones import conv3x3, he_init_
from recstab.models.certificate import LoopCertificate, evaluate, triangular_certificate
from recstab.models.interface import VideoModel


class DBDNet(VideoModel):
    """Deep Burst Denoising network (single-frame + feature-recurrent multi-frame branch).

    Args:
        task: only ``denoise``.
        in_channels: image channels C.
        channels: features per layer F (64).
        depth: layers per branch D (8, at least 2).
    """

    name = "dbdnet"  # build_model("dbdnet") and the name of its reports
    is_recurrent = True

    def __init__(self, task: str = "denoise", in_channels: int = 3, channels: int = 64, depth: int = 8):
        super().__init__()
        if task != "denoise":
            raise ValueError(f"DBDNet baseline supports task 'denoise' only, got task {task!r}")
        if in_channels < 1 or channels < 1 or depth < 2:
            raise ValueError(f"need in_channels >= 1, channels >= 1, depth >= 2; "
                             f"got {in_channels}, {channels}, {depth}")
        c, f = in_channels, channels
        self.task, self.in_channels, self.channels = task, in_channels, channels
        self.single = nn.ModuleList([conv3x3(c, f)] + [conv3x3(f, f) for _ in range(depth - 2)] + [conv3x3(f, c)])
        self.multi = nn.ModuleList([conv3x3(2 * f, f)] + [conv3x3(3 * f, f) for _ in range(depth - 2)]
                                   + [conv3x3(c + f + c, c)])
        he_init_(self)

    # ------------------------------------------------------------------ sequence API
    def initial_state(self, x: torch.Tensor) -> dict:
        """Every multi-frame layer's last output, zero before the first frame."""
        b, _, c, h, w = x.shape
        return {"features": [x.new_zeros(b, self.channels, h, w) for _ in self.multi[:-1]]
                + [x.new_zeros(b, c, h, w)]}

    def step(self, frame: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        features = self.layers(frame, state["features"])
        return features[-1], {"features": features}

    def layers(self, frame: torch.Tensor, previous: list[torch.Tensor]) -> list[torch.Tensor]:
        """One frame: returns the multi-frame outputs m_1..m_D (m_D is the output frame)."""
        lam, last = self.dampening, len(self.multi) - 1
        s = F.relu(self.single[0](frame))
        m = F.relu(self.multi[0](torch.cat([s, lam * previous[0]], dim=1)))
        outputs = [m]
        for l in range(1, last + 1):
            if l < last:
                s = F.relu(self.single[l](s))
                m = F.relu(self.multi[l](torch.cat([s, m, lam * previous[l]], dim=1)))
            else:
                s = frame + self.single[l](s)
                m = frame + self.multi[l](torch.cat([s, m, lam * previous[l]], dim=1))
            outputs.append(m)
        return outputs

    # ------------------------------------------------------------------ stability structure
    def recurrent_convs(self) -> list[nn.Conv2d]:
        """The multi-frame branch's convs (each takes its own previous output)."""
        return list(self.multi)

    def loop_certificate(self, conv_norm=None) -> LoopCertificate:
        """Weighted-norm bound of the triangular loop over m_1..m_D (see the module docstring)."""
        f, c = self.channels, self.in_channels
        # input channel layout: first [s_1, prev]; middle [s_l, m_{l-1}, prev]; last [s_D, m_{D-1}, prev]
        slices = [(None, slice(f, 2 * f))] + [(slice(f, 2 * f), slice(2 * f, 3 * f))] * (len(self.multi) - 2) \
            + [(slice(c, c + f), slice(c + f, c + f + c))]

        def rule(norm):
            main = [0.0 if m is None else norm(conv.weight[:, m]) for conv, (m, _) in zip(self.multi, slices)]
            own = [norm(conv.weight[:, o]) for conv, (_, o) in zip(self.multi, slices)]
            return triangular_certificate(main, own, self.dampening, state="the multi-frame outputs m_1..m_D")
        return evaluate(rule, conv_norm)
