"""Helpers that write small test data sets on disk (import them from tests; not fixtures per se)."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.io import encode_png, write_file

from recstab.data.synthetic import load_still


def write_vimeo90k(root: Path, n_sequences: int = 3, size: tuple[int, int] = (96, 64),
                   frames: int = 7, still: str = "astronaut") -> Path:
    """Write a tiny data set in exactly the Vimeo-90k septuplet layout; return ``root``.

    ``n_sequences`` go to ``sep_trainlist.txt`` and ``n_sequences`` others to
    ``sep_testlist.txt`` (spread over two top folders, like "00001/0001"). Frames
    are ``size = (W, H)`` crops of a scikit-image photograph, panned by a few
    pixels per frame with a different offset and velocity per sequence, so content
    really moves. ``frames`` < 7 writes incomplete sequences (for error tests).
    """
    root = Path(root)
    width, height = size
    image = (load_still(still, 3) * 255).round().to(torch.uint8)
    _, big_h, big_w = image.shape
    names = [f"{1 + k // 2:05d}/{1 + k % 2:04d}" for k in range(2 * n_sequences)]
    for k, name in enumerate(names):
        vx, vy = (k % 3) - 1, (k % 2) * 2 - 1  # pixels/frame, in [-1, 1]
        x0 = 8 + (13 * k) % max(big_w - width - 16, 1)
        y0 = 8 + (29 * k) % max(big_h - height - 16, 1)
        folder = root / "sequences" / name
        folder.mkdir(parents=True, exist_ok=True)
        for t in range(frames):
            x, y = x0 + vx * t, y0 + vy * t
            write_file(str(folder / f"im{t + 1}.png"), encode_png(image[:, y:y + height, x:x + width].contiguous()))
    (root / "sep_trainlist.txt").write_text("\n".join(names[:n_sequences]) + "\n")
    (root / "sep_testlist.txt").write_text("\n".join(names[n_sequences:]) + "\n\n")  # trailing blank, as the original
    return root
