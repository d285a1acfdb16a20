"""Synthetic video clips from still photographs: the default, download-free dataset.

Each clip is one of the photographs that scikit-image ships inside its wheel
(no network), filmed by a virtual camera with smooth random motion, in the spirit
of the synthetic-motion sequences of the paper's Appendix G. Per clip we draw

- a translation velocity (uniform direction, speed in [0, max_speed] px/frame)
  and a constant acceleration (each axis in [-max_accel, max_accel] px/frame^2),
- a rotation rate in [-max_rotation, max_rotation] degrees/frame,
- a zoom rate in [-max_zoom, max_zoom] log-scale/frame,

all quadratic/linear in time and centred on the middle frame, so the camera path is
smooth. Frame t is rendered directly at the crop size with kornia's
``warp_affine`` (bicubic, clamped to [0, 1]) from a source point whose start
position is uniform among those that keep the whole clip inside the photograph
(that start position is the "random crop"; if no such position exists, e.g. for
long clips, the motion is halved until one does). Finally the whole clip is
flipped horizontally and/or vertically with probability 1/2 each.

Splits use disjoint photographs (``SPLITS``), so validation and test measure
generalisation to unseen content. Everything random comes from
``make_generator(seed, split, index, epoch, stream)``: a clip depends only on
(seed, split, index, epoch), and val/test (always epoch 0) are fixed per
(seed, index). Indices beyond ``length`` are "virtual": key k means index
k % length at epoch k // length, which is how the training sampler gets fresh
clips and noise every epoch (see ``recstab.lit.datamodules.EpochSampler``).

``synthetic_scene_changes`` builds the long static-with-scene-changes sequences
of Appendix H.
"""

from __future__ import annotations

import functools
import math

import kornia
import torch
from skimage import data as skdata
from torch.utils.data import Dataset

from recstab.data.degradations import Degradation, make_generator

# still name -> loader returning an H x W (x 3|4) uint8 array; all bundled with scikit-image
_LOADERS = {
    "astronaut": skdata.astronaut,
    "brick": skdata.brick,
    "camera": skdata.camera,
    "chelsea": skdata.chelsea,
    "clock": skdata.clock,
    "coffee": skdata.coffee,
    "coins": skdata.coins,
    "grass": skdata.grass,
    "gravel": skdata.gravel,
    "hubble_deep_field": skdata.hubble_deep_field,
    "immunohistochemistry": skdata.immunohistochemistry,
    "moon": skdata.moon,
    "motorcycle": lambda: skdata.stereo_motorcycle()[0],
    "page": skdata.page,
    "rocket": skdata.rocket,
    "text": skdata.text,
}

# fixed, disjoint split of the photographs (each split has colour and grey content)
SPLITS = {
    "train": ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "motorcycle",
              "moon", "grass", "gravel", "clock", "page", "text"),
    "val": ("chelsea", "coins"),
    "test": ("coffee", "camera", "brick"),
}
_SPLIT_ID = {"train": 0, "val": 1, "test": 2, "scenes": 3}  # salt of the seed per split
_CONTENT, _NOISE = 0, 1  # generator streams: clip content vs. noise


@functools.lru_cache(maxsize=None)
def load_still(name: str, channels: int = 3) -> torch.Tensor:
    """One bundled photograph as a C x H x W float32 tensor in [0, 1] (cached; treat as read-only).

    Grey photographs are repeated to 3 channels; colour ones are converted to
    luminance (ITU-R 601, kornia) when ``channels == 1``; alpha is dropped.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown still {name!r}; valid: {', '.join(sorted(_LOADERS))}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    array = _LOADERS[name]()
    img = torch.from_numpy(array).float().div_(255)
    img = img[None] if img.ndim == 2 else img[..., :3].permute(2, 0, 1)
    if channels == 1 and img.shape[0] == 3:
        img = kornia.color.rgb_to_grayscale(img)
    elif channels == 3 and img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.contiguous()


def split_stills(split: str) -> tuple[str, ...]:
    """Names of the photographs of a split ("train", "val" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(map(repr, SPLITS))}")
    return SPLITS[split]


def max_crop(split: str) -> int:
    """The largest crop every photograph of ``split`` can provide (its smallest side)."""
    return min(min(load_still(n, 1).shape[-2:]) for n in split_stills(split))


def check_crop(crop: int, split: str) -> None:
    """Refuse a crop that is not a positive integer or exceeds the smallest still of ``split``."""
    if not isinstance(crop, int) or crop < 1:
        raise ValueError(f"crop must be a positive integer, got {crop!r}")
    if crop > max_crop(split):
        raise ValueError(
            f"crop={crop} is larger than the smallest {split} still "
            f"({max_crop(split)} px; stills: {', '.join(split_stills(split))})"
        )


def _uniform(g: torch.Generator, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64)


def render_clip(still: torch.Tensor, frames: int, crop: int, g: torch.Generator, *,
                max_speed: float = 2.0, max_accel: float = 0.1, max_rotation: float = 0.5,
                max_zoom: float = 0.01) -> torch.Tensor:
    """Film ``still`` (C x H x W) with a random smooth camera path: frames x C x crop x crop."""
    _, height, width = still.shape
    if crop > min(height, width):
        raise ValueError(f"crop={crop} is larger than the still ({height}x{width})")
    t = torch.arange(frames, dtype=torch.float64) - (frames - 1) / 2  # time centred on the middle frame
    angle = 2 * math.pi * _uniform(g)
    velocity = max_speed * _uniform(g) * torch.stack([torch.cos(angle), torch.sin(angle)])  # (x, y)
    accel = _uniform(g, 2, low=-max_accel, high=max_accel)
    omega = _uniform(g, low=-max_rotation, high=max_rotation)  # degrees/frame
    zeta = _uniform(g, low=-max_zoom, high=max_zoom)  # log-zoom/frame
    start_u = _uniform(g, 2)  # where the path starts within the feasible box
    half = (crop - 1) / 2

    for _ in range(12):  # halve the motion until the whole path fits in the still
        shift = t[:, None] * velocity + 0.5 * t[:, None] ** 2 * accel  # T x 2
        theta = omega * t
        zoom = torch.exp(zeta * t)
        rad = torch.deg2rad(theta)
        extent = half / zoom * (rad.cos().abs() + rad.sin().abs())  # half-size of the footprint
        size = torch.tensor([width - 1, height - 1], dtype=torch.float64)
        low = (extent[:, None] - shift).amax(0)
        high = (size - extent[:, None] - shift).amin(0)
        if (low <= high).all():
            break
        velocity, accel, omega, zeta = velocity / 2, accel / 2, omega / 2, zeta / 2
    else:  # static camera always fits since crop <= min(height, width)
        shift, theta, zoom = torch.zeros(frames, 2, dtype=torch.float64), t * 0, t * 0 + 1
        extent = t * 0 + half
        low, high = torch.full((2,), half, dtype=torch.float64), size - half
    centre = low + start_u * (high - low) + shift  # T x 2 source points (x, y) seen at the crop centre

    # cut the bounding box of the path (+2 px for bicubic taps) so the warp reads a small source
    x0 = max(int(math.floor((centre[:, 0] - extent).min())) - 2, 0)
    y0 = max(int(math.floor((centre[:, 1] - extent).min())) - 2, 0)
    x1 = min(int(math.ceil((centre[:, 0] + extent).max())) + 3, width)
    y1 = min(int(math.ceil((centre[:, 1] + extent).max())) + 3, height)
    source = still[:, y0:y1, x0:x1]
    centre = (centre - torch.tensor([x0, y0], dtype=torch.float64)).float()

    # M maps source pixels to output pixels: rotate/zoom about the path point, move it to the crop centre
    matrix = kornia.geometry.transform.get_affine_matrix2d(
        translations=half - centre, center=centre,
        scale=zoom.float()[:, None].expand(frames, 2), angle=theta.float())
    clip = kornia.geometry.transform.warp_affine(
        source[None].expand(frames, -1, -1, -1), matrix[:, :2], dsize=(crop, crop),
        mode="bicubic", padding_mode="reflection", align_corners=True)
    clip = clip.clamp_(0, 1)
    if torch.rand((), generator=g) < 0.5:
        clip = clip.flip(-1)
    if torch.rand((), generator=g) < 0.5:
        clip = clip.flip(-2)
    return clip.contiguous()


class SyntheticClips(Dataset):
    """Moving clips cut from bundled photographs; items ``{"input", "target", "index"}``.

    ``target``: frames x C x crop x crop float32 in [0, 1]; ``input``: the degraded
    clip (crop/scale for "sr2"); ``index``: the sample index in [0, length).
    """

    def __init__(self, split: str = "train", length: int = 512, frames: int = 7, crop: int = 64,
                 channels: int = 3, task: str = "denoise", sigma: float = 30.0,
                 scale: int | None = None, seed: int = 0, max_speed: float = 2.0,
                 max_accel: float = 0.1, max_rotation: float = 0.5, max_zoom: float = 0.01):
        names = split_stills(split)
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length (clips per epoch) must be a positive integer, got {length!r}")
        if not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive integer, got {frames!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        if min(max_speed, max_accel, max_rotation, max_zoom) < 0:
            raise ValueError("motion bounds (max_speed, max_accel, max_rotation, max_zoom) must be >= 0")
        check_crop(crop, split)
        self.degradation = Degradation(task, sigma, scale)
        self.degradation.check_size(crop, crop)
        self.split, self.length, self.frames, self.crop, self.seed = split, length, frames, crop, seed
        self.motion = dict(max_speed=max_speed, max_accel=max_accel,
                           max_rotation=max_rotation, max_zoom=max_zoom)
        self.stills = [load_still(n, channels) for n in names]  # decoded once, shared

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: int) -> dict:
        """Clip ``key % length`` of epoch ``key // length``."""
        key = int(key)
        if key < 0:
            raise IndexError(f"index must be >= 0, got {key}")
        index, epoch = key % self.length, key // self.length
        salt = (self.seed, _SPLIT_ID[self.split], index, epoch)
        still = self.stills[index % len(self.stills)]
        target = render_clip(still, self.frames, self.crop, make_generator(*salt, _CONTENT), **self.motion)
        return {"input": self.degradation(target, make_generator(*salt, _NOISE)),
                "target": target, "index": index}


class SceneChangeVideo:
    """A long clean sequence made of ``n_distinct`` static scenes (paper, Appendix H).

    Frame t (of ``total_frames``) shows scene ``t * n_distinct // total_frames``, so
    n_distinct = 1 is one static scene, 2 has one cut in the middle and
    n_distinct = total_frames changes scene every frame. A scene is a random
    ``size`` x ``size`` crop (with random flips) of a random still of ``split``,
    drawn from (seed, scene): frames are rendered lazily and never stored.
    Iterating yields C x size x size float32 frames in [0, 1].
    """

    def __init__(self, n_distinct: int, total_frames: int = 2048, size: int = 64,
                 channels: int = 3, seed: int = 0, split: str = "test"):
        if not isinstance(total_frames, int) or total_frames < 1:
            raise ValueError(f"total_frames must be a positive integer, got {total_frames!r}")
        if not isinstance(n_distinct, int) or not 1 <= n_distinct <= total_frames:
            raise ValueError(f"n_distinct must be an integer in [1, total_frames={total_frames}], "
                             f"got {n_distinct!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        check_crop(size, split)
        self.n_distinct, self.total_frames, self.size, self.seed = n_distinct, total_frames, size, seed
        self.stills = [load_still(n, channels) for n in split_stills(split)]

    def __len__(self) -> int:
        return self.total_frames

    def scene(self, j: int) -> torch.Tensor:
        """The frame shown during scene j."""
        g = make_generator(self.seed, _SPLIT_ID["scenes"], j)
        still = self.stills[int(torch.randint(len(self.stills), (), generator=g))]
        _, h, w = still.shape
        y = int(torch.randint(h - self.size + 1, (), generator=g))
        x = int(torch.randint(w - self.size + 1, (), generator=g))
        frame = still[:, y:y + self.size, x:x + self.size]
        if torch.rand((), generator=g) < 0.5:
            frame = frame.flip(-1)
        if torch.rand((), generator=g) < 0.5:
            frame = frame.flip(-2)
        return frame.contiguous()

    def __getitem__(self, t: int) -> torch.Tensor:
        if not 0 <= t < self.total_frames:
            raise IndexError(f"frame {t} out of range [0, {self.total_frames})")
        return self.scene(t * self.n_distinct // self.total_frames)

    def __iter__(self):
        scene, frame = -1, None
        for t in range(self.total_frames):
            j = t * self.n_distinct // self.total_frames
            if j != scene:
                scene, frame = j, self.scene(j)
            yield frame.clone()


def synthetic_scene_changes(n_distinct: int, total_frames: int = 2048, size: int = 64,
                            channels: int = 3, seed: int = 0, split: str = "test") -> SceneChangeVideo:
    """Appendix H's sequence of ``total_frames`` frames made of ``n_distinct`` static scenes."""
    return SceneChangeVideo(n_distinct, total_frames, size, channels, seed, split)
