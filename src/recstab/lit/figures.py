"""Pictures of a validation epoch: the per-frame PSNR curve and sample outputs.

``ValidationFigures`` keeps the first validation clip, and at the end of each
validation epoch writes (1) PSNR_t against t and (2) a grid of degraded / restored /
clean frames, as PNGs under ``<run dir>/figures/`` and as images in W&B when a
``WandbLogger`` is attached. Each frame of the grid is drawn ``panel_inches`` wide
(3.2 in at 100 dpi: a 48-pixel crop becomes 320 pixels) with nearest-neighbour
upsampling, so noise and restoration can be judged by eye, and carries its PSNR.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from recstab.lit.publish import publish_image  # noqa: E402


def log_figure(trainer: L.Trainer, fig, name: str, out_dir: Path) -> Path:
    """Save a matplotlib figure as PNG and send it to every W&B logger of the trainer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_step{trainer.global_step:07d}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    publish_image(trainer, f"figures/{name}", path, trainer.global_step)
    return path


class ValidationFigures(L.Callback):
    """Args: frames_shown: how many frames of the sample clip to draw (evenly spaced);
    panel_inches: width of each drawn frame (inches, at 100 dpi)."""

    def __init__(self, frames_shown: int = 4, panel_inches: float = 3.2):
        if frames_shown < 1 or not panel_inches > 0:
            raise ValueError(f"frames_shown must be >= 1 and panel_inches > 0, got {frames_shown}, {panel_inches}")
        self.frames_shown = frames_shown
        self.panel_inches = float(panel_inches)
        self._sample: tuple[torch.Tensor, ...] | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and isinstance(outputs, torch.Tensor):
            self._sample = tuple(t[0].detach().float().cpu() for t in (batch["input"], outputs, batch["target"]))

    def on_validation_end(self, trainer, pl_module):  # after the epoch-end metrics are logged
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        out_dir = Path(trainer.default_root_dir) / "figures"
        metrics = trainer.callback_metrics
        curve = [float(metrics[k]) for t in range(1, 1000) if (k := f"val/psnr_{t}") in metrics]
        if curve:
            fig, ax = plt.subplots(figsize=(4, 3))
            ax.plot(range(1, len(curve) + 1), curve, "o-")
            ax.set(xlabel="frame t", ylabel="PSNR_t (dB)", title=f"validation, step {trainer.global_step}")
            ax.grid(alpha=0.3)
            log_figure(trainer, fig, "val_psnr_per_frame", out_dir)
        if self._sample is not None:
            log_figure(trainer, self.sample_grid(*self._sample), "val_samples", out_dir)

    def sample_grid(self, degraded: torch.Tensor, restored: torch.Tensor, clean: torch.Tensor):
        t = clean.shape[0]
        shown = sorted({round(i * (t - 1) / max(1, self.frames_shown - 1)) for i in range(self.frames_shown)})
        if degraded.shape[-1] != clean.shape[-1]:  # sr: show the input at the output size
            degraded = F.interpolate(degraded, size=clean.shape[-2:], mode="nearest")
        w = self.panel_inches
        fig, axes = plt.subplots(3, len(shown), figsize=(w * len(shown), 3 * w * clean.shape[-2] / clean.shape[-1]
                                                          + 0.8), squeeze=False)
        for row, (name, clip) in enumerate((("degraded", degraded), ("restored", restored), ("clean", clean))):
            for col, i in enumerate(shown):
                frame = clip[i].clamp(0, 1)
                image = frame.permute(1, 2, 0).squeeze(-1).numpy()
                ax = axes[row][col]
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(name)
                title = f"frame {i + 1}" if row == 0 else ""
                if row < 2:  # PSNR against the clean frame
                    mse = torch.mean((frame - clean[i].clamp(0, 1)) ** 2).item()
                    title += f"{'  ' if title else ''}{-10 * torch.log10(torch.tensor(max(mse, 1e-12))).item():.2f} dB"
                ax.set_title(title, fontsize=9)
        fig.tight_layout()
        return fig
