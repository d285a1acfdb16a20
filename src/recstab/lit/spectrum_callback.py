"""Watch the exact spectra of the conv layers while a model trains.

Every `every_n_steps` optimisation steps (and once before training starts),
`SpectrumMonitor` computes the exact singular values of each stride-1 conv of the
LightningModule on an n×n map with the measurement engine
(`recstab.diagnostics.engine.conv_spectra`, FFT) — of the weight the layer actually
uses, i.e. the normalised one when a norm is applied — and

- logs the engine's `spectra/*` keys to every attached logger: `spectra/<layer>/sigma1`
  (spectral norm), `spectra/<layer>/srank` (stable rank ‖W‖_F²/‖W‖₂²), `spectra/sigma1_max`,
  `spectra/sigma1_mean`, `spectra/srank_ratio_mean`, ...;
- draws the paper's "average singular value spectrum" (Tables 2–3): the sorted
  spectrum of every layer against its normalised index (faint) and their mean
  (bold), in absolute value (left: the spectral norms show at index 0) and
  relative to σ₁ (right: the area under it is srank/(n²·m)). The PNG goes to
  `<trainer.default_root_dir>/spectra/spectrum_step<step>.png` (the run dir) and,
  with a WandbLogger, to W&B as `spectra/average`.

Reading a normalised weight here never advances its power iteration (the layer
is read in eval mode). Cost: one FFT + batched SVD per layer, ~0.5 s for a
64-channel layer at n = 64 on a CPU — keep `every_n_steps` in the hundreds.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from recstab.diagnostics.engine import conv_spectra  # noqa: E402
from recstab.lit.publish import publish_image, publish_metrics  # noqa: E402


def spectrum_figure(spectra: dict[str, np.ndarray], title: str = ""):
    """The average singular value spectrum: each layer faint, the mean over layers bold."""
    grid = np.linspace(0.0, 1.0, 200)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, relative in zip(axes, (False, True)):
        curves = []
        for values in spectra.values():
            s = np.asarray(values, dtype=np.float64)
            s = s / s[0] if relative and s[0] > 0 else s
            curve = np.interp(grid, np.linspace(0.0, 1.0, len(s)), s)
            curves.append(curve)
            ax.plot(grid, curve, color="tab:blue", alpha=0.2, lw=0.8)
        if curves:
            ax.plot(grid, np.mean(curves, axis=0), color="tab:blue", lw=2.0, label=f"mean of {len(curves)} layers")
            ax.legend(loc="upper right", fontsize=8)
        ax.set(xlabel="normalised index k / (n²·m)", ylabel="σ_k / σ_1" if relative else "σ_k",
               ylim=(0, None), xlim=(0, 1))
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return fig


class SpectrumMonitor(L.Callback):
    """Args: every_n_steps: log period in optimisation steps (>= 1); n: side of the feature map (>= 1);
    plot: also draw and save the average spectrum."""

    def __init__(self, every_n_steps: int = 1000, n: int = 64, plot: bool = True):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (side of the feature map) must be an int >= 1, got {n!r}")
        self.every_n_steps, self.n, self.plot = every_n_steps, n, plot
        self.last_metrics: dict[str, float] = {}
        self.last_figure: Path | None = None
        self._done_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(trainer, pl_module)  # the final weights (after the last refresh)

    def summary(self) -> dict[str, float]:
        """The last measurement, for the run's metrics.json."""
        return dict(self.last_metrics)

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._done_step or not trainer.is_global_zero:
            return
        self._done_step = step
        measured = conv_spectra(getattr(pl_module, "model", pl_module), self.n)  # keys as every caller names them
        if not measured.rows:
            return
        spectra = measured.values
        metrics = measured.metrics()
        self.last_metrics = metrics
        publish_metrics(trainer, metrics, step)
        if self.plot:
            self._plot(trainer, spectra, step)

    def _plot(self, trainer: L.Trainer, spectra: dict[str, np.ndarray], step: int) -> None:
        out_dir = Path(trainer.default_root_dir) / "spectra"  # the run dir, next to figures/
        out_dir.mkdir(parents=True, exist_ok=True)
        fig = spectrum_figure(spectra, f"average singular value spectrum (n={self.n}), step {step}")
        path = out_dir / f"spectrum_step{step:07d}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        self.last_figure = path
        publish_image(trainer, "spectra/average", path, step)
