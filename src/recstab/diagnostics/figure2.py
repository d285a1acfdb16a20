"""Figure 2 of the paper: untrained models of every temporal connection on random input.

Each temporal connection (single frame, multi-frame, feature-shifting,
feature-recurrence, frame-recurrence, RLSP, bidirectional RLSP) is built around
the same untrained backbone (He-normal init, as the paper's Fig. 2 needs) and fed
the same sequence of i.i.d. uniform random frames x_t ~ U[0, 1] (frame t seeded by
(seed, t)). The curve of a connection is the output norm RMS(y_t) = ‖y_t‖₂/√numel
against t. Feedforward connections stay flat; recurrent ones grow geometrically
until they overflow (the curve stops at the first non-finite output).

A curve *diverges* when an output is non-finite or its RMS exceeds ``blowup``
(1e6: the inputs are in [0, 1] and every feedforward connection of the figure stays
below 10² on them, so 10⁶ is four orders of magnitude of growth). This labels the
curves of the figure; it is not a verdict on a model (the stability report's proofs
are scale-free, see :mod:`recstab.diagnostics.engine`).

Streamable models run chunk by chunk with ``process`` (constant memory);
bidirectional ones (``birlsp``) run on the whole sequence at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import parametrize
from recstab.models.interface import traits

BLOWUP = 1e6  # RMS(y_t) above this counts as diverged (inputs and sane outputs are ~[0, 1])

LABELS = {"none": "single frame", "mf3": "multi-frame (3)", "mf7": "multi-frame (7)",
          "shift": "feature-shifting", "feat": "feature-recurrence", "frame": "frame-recurrence",
          "rlsp": "RLSP", "birlsp": "bidirectional RLSP"}


@dataclass
class Figure2Result:
    norms: dict                     # connection -> (frames,) RMS(y_t), nan after divergence
    diverged: dict                  # connection -> bool
    diverged_at: dict               # connection -> first frame beyond blowup / non-finite (or None)
    path: Path | None = None
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"diverged": self.diverged, "diverged_at": self.diverged_at, "settings": self.settings,
                "final_rms": {k: float(v[np.isfinite(v)][-1]) if np.isfinite(v).any() else None
                              for k, v in self.norms.items()}}


def random_frames(frames: int, channels: int, size: int, seed: int, start: int = 0) -> torch.Tensor:
    """Frames start..start+frames-1 of the random input: T×C×H×W uniform, frame t seeded by (seed, t)."""
    from recstab.data.degradations import make_generator
    return torch.stack([torch.rand(channels, size, size, generator=make_generator(seed, start + t))
                        for t in range(frames)])


def output_norms(model, frames: int, size: int, seed: int = 0, chunk: int = 10,
                 blowup: float = BLOWUP) -> tuple[np.ndarray, int | None]:
    """RMS(y_t) of `model` on the random input, and the first frame that diverged (or None)."""
    channels = traits(model).in_channels
    rms = np.full(frames, np.nan)
    model.eval()
    with torch.no_grad(), parametrize.cached():
        if not traits(model).streamable:
            y = model(random_frames(frames, channels, size, seed)[None])[0]
            rms[:] = y.double().pow(2).flatten(1).mean(1).sqrt().numpy()
        else:
            state = None
            for start in range(0, frames, chunk):
                k = min(chunk, frames - start)
                y, state = model.process(random_frames(k, channels, size, seed, start)[None], state)
                rms[start:start + k] = y[0].double().pow(2).flatten(1).mean(1).sqrt().numpy()
                if not np.isfinite(rms[start:start + k]).all():
                    break
    bad = np.nonzero(~np.isfinite(rms) | (rms > blowup))[0]
    first = int(bad[0]) if len(bad) else None
    return rms, first


def figure2(path: str | Path | None, connections, backbone: str = "vresnet",
            channels: int = 64, depth: int | None = None, frames: int = 100, size: int = 64,
            seed: int = 0, chunk: int = 10, blowup: float = BLOWUP) -> Figure2Result:
    """Build every connection untrained, run it on the random input, plot RMS(y_t) against t.

    Args:
        path: PNG to write (None: no file).
        connections: recurrence names (``fig2.connections`` of conf/diagnose.yaml lists the paper's).
        backbone, channels, depth: the backbone (the paper: five conv+ReLU layers; default VResNet, 64).
        frames, size: length and H = W of the random input.
        seed: seeds the weights (each model built from ``seed``) and the input frames.
        chunk: frames per ``process`` call.
    """
    from recstab.models import build_model

    if frames < 1 or size < 1 or chunk < 1:
        raise ValueError(f"frames, size and chunk must be >= 1, got {frames}, {size}, {chunk}")
    if isinstance(connections, str):
        connections = [connections]
    norms, diverged, diverged_at = {}, {}, {}
    for name in connections:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_model(backbone, name, "denoise", channels, depth=depth)
        norms[name], diverged_at[name] = output_norms(model, frames, size, seed, chunk, blowup)
        diverged[name] = diverged_at[name] is not None
    settings = {"backbone": backbone, "channels": channels, "depth": depth, "frames": frames,
                "size": size, "seed": seed, "blowup": blowup}
    result = Figure2Result(norms, diverged, diverged_at, None, settings)
    if path is not None:
        result.path = save_figure2(result, path)
    return result


def save_figure2(result: Figure2Result, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rms in result.norms.items():
        t = np.arange(1, len(rms) + 1)
        style = "-" if result.diverged[name] else "--"
        ax.semilogy(t, rms, style, label=LABELS.get(name, name) + (" (diverges)" if result.diverged[name] else ""))
    ax.axhline(result.settings["blowup"], color="k", lw=0.5, ls=":")
    s = result.settings
    ax.set_xlabel("frame t")
    ax.set_ylabel("output norm RMS(y_t)")
    ax.set_title(f"untrained {s['backbone']} ({s['channels']} ch, He init) on random input", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
