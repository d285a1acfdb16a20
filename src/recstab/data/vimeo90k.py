"""Vimeo-90k septuplets (Xue et al., 2019), the paper's training and test data.

Expected layout (``vimeo_septuplet.zip`` from http://toflow.csail.mit.edu, unpacked)::

    <root>/sep_trainlist.txt        lines like "00001/0001"
    <root>/sep_testlist.txt
    <root>/sequences/00001/0001/im1.png ... im7.png   (448 x 256 RGB)

Splits:

- ``train``: every sequence of ``sep_trainlist.txt`` (or its first ``max_sequences``);
  a random window of ``frames`` consecutive frames, a random ``crop`` x ``crop``
  crop (the paper: 7 frames, 64 x 64) and random horizontal/vertical flips.
- ``test``: the first ``max_sequences`` (1024 in the paper) sequences of
  ``sep_testlist.txt``, frames 1..``frames``, full resolution, no augmentation.
- ``val``: the *last* ``max_sequences`` sequences of ``sep_testlist.txt`` at full
  resolution, so model selection does not look at the test sequences as long as
  the list is longer than both together (7824 > 1024 + 256 on the real data set).

Frames are decoded with ``torchvision.io.decode_png`` once per sample. Randomness
(crop, flips, noise) follows the scheme of ``recstab.data.synthetic``: it depends
only on (seed, split, index, epoch), with key k meaning index k % len at epoch
k // len.
"""

from __future__ import annotations

from pathlib import Path

import kornia
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_png, read_file

from recstab.data.degradations import Degradation, make_generator

SEPTUPLET = 7  # frames per Vimeo-90k sequence
LIST_FILES = {"train": "sep_trainlist.txt", "val": "sep_testlist.txt", "test": "sep_testlist.txt"}
_SPLIT_ID = {"train": 0, "val": 1, "test": 2}  # salt of the seed per split
_CONTENT, _NOISE = 0, 1  # generator streams: crop/flips vs. noise
LAYOUT = ("<root>/sep_trainlist.txt, <root>/sep_testlist.txt (lines like '00001/0001') and "
          "<root>/sequences/00001/0001/im1.png ... im7.png")


def check_root(root: str | Path) -> Path:
    """Return ``root`` as a Path if it looks like Vimeo-90k, else raise FileNotFoundError."""
    root = Path(root).expanduser()
    missing = [p for p in (root, root / "sequences", *(root / f for f in set(LIST_FILES.values())))
               if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"Vimeo-90k not found: {missing[0]} does not exist (config key data.root={root}). "
            f"Expected layout: {LAYOUT}. Download vimeo_septuplet.zip from http://toflow.csail.mit.edu "
            f"and set data.root, or use the download-free data=synthetic."
        )
    return root


def read_list(root: str | Path, split: str) -> list[str]:
    """Sequence names ("00001/0001") of a split's list file, in file order."""
    if split not in LIST_FILES:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(map(repr, LIST_FILES))}")
    path = check_root(root) / LIST_FILES[split]
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} lists no sequences")
    return names


def read_frame(path: Path) -> torch.Tensor:
    """Decode one PNG as a 3 x H x W uint8 RGB tensor."""
    if not path.is_file():
        raise FileNotFoundError(f"missing Vimeo-90k frame {path} (expected layout: {LAYOUT})")
    return decode_png(read_file(str(path)), mode=ImageReadMode.RGB)


def frame_size(root: str | Path) -> tuple[int, int]:
    """(height, width) of the first frame of the first training sequence."""
    first = read_list(root, "train")[0]
    return tuple(read_frame(Path(root) / "sequences" / first / "im1.png").shape[-2:])


class Vimeo90k(Dataset):
    """Vimeo-90k septuplet clips; items ``{"input", "target", "index"}``.

    ``target``: frames x C x H x W float32 in [0, 1] (H = W = crop for train, full
    frames otherwise); ``input``: the degraded clip (H/scale for "sr2");
    ``index``: position of the sequence in the split.
    """

    def __init__(self, root: str | Path, split: str = "train", frames: int = SEPTUPLET,
                 crop: int = 64, channels: int = 3, task: str = "denoise", sigma: float = 30.0,
                 scale: int | None = None, seed: int = 0, max_sequences: int | None = None):
        if not isinstance(frames, int) or not 1 <= frames <= SEPTUPLET:
            raise ValueError(f"frames must be an integer in [1, {SEPTUPLET}] for Vimeo-90k, got {frames!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        if max_sequences is not None and (not isinstance(max_sequences, int) or max_sequences < 1):
            raise ValueError(f"max_sequences must be a positive integer or None, got {max_sequences!r}")
        self.degradation = Degradation(task, sigma, scale)
        self.root = check_root(root)
        names = read_list(self.root, split)
        if max_sequences is not None:
            names = names[-max_sequences:] if split == "val" else names[:max_sequences]
        self.names, self.split, self.frames, self.channels, self.seed = names, split, frames, channels, seed
        height, width = read_frame(self.root / "sequences" / names[0] / "im1.png").shape[-2:]
        if split == "train":
            if not isinstance(crop, int) or not 1 <= crop <= min(height, width):
                raise ValueError(f"crop must be an integer in [1, {min(height, width)}] "
                                 f"(frames are {height}x{width}), got {crop!r}")
            self.degradation.check_size(crop, crop)
        else:
            self.degradation.check_size(height, width)
        self.crop = crop

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, key: int) -> dict:
        """Sequence ``key % len`` (its random crop/noise of epoch ``key // len``)."""
        key = int(key)
        if key < 0:
            raise IndexError(f"index must be >= 0, got {key}")
        index, epoch = key % len(self), key // len(self)
        salt = (self.seed, _SPLIT_ID[self.split], index, epoch)
        folder = self.root / "sequences" / self.names[index]
        g = make_generator(*salt, _CONTENT)
        first = int(torch.randint(SEPTUPLET - self.frames + 1, (), generator=g)) if self.split == "train" else 0
        clip = torch.stack([read_frame(folder / f"im{first + t + 1}.png") for t in range(self.frames)])
        if self.split == "train":
            _, _, h, w = clip.shape
            y = int(torch.randint(h - self.crop + 1, (), generator=g))
            x = int(torch.randint(w - self.crop + 1, (), generator=g))
            clip = clip[..., y:y + self.crop, x:x + self.crop]
            if torch.rand((), generator=g) < 0.5:
                clip = clip.flip(-1)
            if torch.rand((), generator=g) < 0.5:
                clip = clip.flip(-2)
        target = clip.float().div_(255)
        if self.channels == 1:
            target = kornia.color.rgb_to_grayscale(target)
        target = target.contiguous()
        return {"input": self.degradation(target, make_generator(*salt, _NOISE)),
                "target": target, "index": index}
