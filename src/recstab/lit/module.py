"""The LightningModule: back-propagation through time over a clip, per-frame metrics.

``VideoRestorationModule`` takes the model's config — a plain dict with a ``_target_`` and its arguments
(``conf/model/*.yaml``: ``{"_target_": "recstab.models.build_model", "backbone": "vresnet", ...}``,
``{"_target_": "recstab.models.baselines.FastDVDnet", "channels": 64, ...}``) — and the weight
normalisation's (``conf/norm/*.yaml``: ``{"_target_": "recstab.norms.SRNC", "alpha": 2.0, ...}``),
instantiates both with ``hydra.utils.instantiate`` and calls ``save_hyperparameters()``, so
``VideoRestorationModule.load_from_checkpoint(path)`` rebuilds the model anywhere, without a Hydra app.
The norm is applied when the model is built, before any state dict is loaded, so its buffers load with it.

One training step unrolls the recurrent model over the whole clip (7 frames for
Vimeo-90k) and back-propagates through time. The step runs under
``torch.nn.utils.parametrize.cached()``: a normalised weight is computed once per
optimisation step, not once per time step of the unroll.

A non-finite loss is counted (``train/nonfinite_steps``) and its step skipped,
so a run that meets a diverging batch keeps going and says so.
"""

from __future__ import annotations

import math

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.utils import parametrize
from torchmetrics import MeanMetric
from torchmetrics.functional.image import peak_signal_noise_ratio

from recstab.models.dampening import evaluating
from recstab.norms import make_norm, normalised_convs, refresh

LOSSES = ("mse", "l1", "charbonnier")


def restoration_loss(kind: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(prediction, target)
    if kind == "l1":
        return F.l1_loss(prediction, target)
    return torch.sqrt((prediction - target) ** 2 + 1e-6).mean()  # charbonnier


def model_config(model) -> dict:
    """The model config as a plain dict with a ``_target_`` (``None``: build_model's defaults)."""
    if model is None:
        return {"_target_": "recstab.models.build_model"}
    if isinstance(model, DictConfig):
        model = OmegaConf.to_container(model, resolve=True)
    if not isinstance(model, dict) or "_target_" not in model:
        raise ValueError(f"model must be a model config: a _target_ (a model class, or recstab.models.build_model) "
                         f"and its arguments, e.g. conf/model/fastdvdnet.yaml: "
                         f"{{'_target_': 'recstab.models.baselines.FastDVDnet', 'channels': 64, ...}}; got {model!r}")
    return dict(model)


class VideoRestorationModule(L.LightningModule):
    """Train / evaluate one backbone × recurrence × task model.

    Args:
        model: the model config, instantiated with ``hydra.utils.instantiate``: ``_target_``
            (a model class, or ``recstab.models.build_model`` for the backbones) and its keyword arguments. A DictConfig
            is resolved to a plain dict. ``None``: ``build_model``'s defaults.
        norm: the weight normalisation config (``conf/norm/*.yaml``: ``{"_target_": "recstab.norms.SRNC",
            "alpha": 2, ...}``), instantiated and applied to the model before any state dict loads
            (:func:`recstab.norms.make_norm`; ``None``: unconstrained).
        frames: clip length T of the evaluation clips (the number of per-frame PSNR metrics).
        loss: ``mse`` (the paper), ``l1`` or ``charbonnier``.
        lr, betas, weight_decay: Adam.
        lr_schedule: ``constant`` or ``cosine`` (cosine decay to 1 % over ``max_steps`` of the trainer).
        dampening: feature dampening λ (appendix F) used at evaluation; training always uses 1.
        refresh_iters: power iterations run on every normalised layer before validation and
            testing (checkpoints are written right after validation, so they carry the refreshed
            vectors): the spectral norm is exact when it is measured and saved (0: never).
        lpips: also compute LPIPS on the last frame of the test clips (``test/lpips_7``).
    """

    def __init__(self, model: dict | None = None, norm: dict | None = None, frames: int = 7, loss: str = "mse", lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 lr_schedule: str = "constant", dampening: float = 1.0, refresh_iters: int = 20,
                 lpips: bool = False):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; valid: constant, cosine")
        if frames < 1:
            raise ValueError(f"clip length (frames) must be >= 1, got {frames}")
        model = model_config(model)
        if isinstance(norm, DictConfig):
            norm = OmegaConf.to_container(norm, resolve=True)
        self.save_hyperparameters()  # the plain-dict model config: checkpoints load without Hydra
        self.model = make_norm(norm)(hydra.utils.instantiate(model, _convert_="all"))
        self.frame_psnr = torch.nn.ModuleDict({
            split: torch.nn.ModuleList(MeanMetric() for _ in range(frames)) for split in ("val", "test")})
        self.test_lpips = None  # built in on_test_start: AlexNet stays out of checkpoints
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int):
        with parametrize.cached():
            prediction = self.model(batch["input"])
            loss = restoration_loss(self.hparams.loss, prediction, batch["target"])
        if not torch.isfinite(loss):
            self.nonfinite_steps += 1
            self.log("train/nonfinite_steps", self.nonfinite_steps.float(), prog_bar=True)
            return None  # Lightning skips the optimiser step
        with torch.no_grad():
            mse = F.mse_loss(prediction[:, -1].clamp(0, 1), batch["target"][:, -1])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/psnr_last", -10 * torch.log10(mse + 1e-12), prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        if not any(p.requires_grad for p in self.parameters()):  # a non-learned model: BM3D
            raise ValueError(f"{type(self.model).__name__} has no parameters to train: test it with train=false "
                             "(row=bm3d and experiment=bm3d set it)")
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                     weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.max_steps if self.trainer.max_steps > 0 else 1))
        cosine = lambda step: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def on_validation_start(self) -> None:
        self._refresh_norms()

    def on_test_start(self) -> None:
        self._refresh_norms()
        if self.hparams.lpips and self.test_lpips is None:
            from recstab.metrics import make_lpips_metric
            # not registered as a submodule, so its frozen AlexNet never enters the state dict
            object.__setattr__(self, "test_lpips", make_lpips_metric().to(self.device))

    def _refresh_norms(self) -> None:
        if self.hparams.refresh_iters > 0 and normalised_convs(self.model):
            refresh(self.model, iters=self.hparams.refresh_iters)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._evaluate("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        prediction = self._evaluate("test", batch)
        if self.test_lpips is not None:
            self.test_lpips.update(prediction[:, -1], batch["target"][:, -1])
        return prediction

    def _evaluate(self, split: str, batch: dict) -> torch.Tensor:
        with evaluating(self.model, self.hparams.dampening):
            prediction = self.model(batch["input"]).clamp(0, 1)
        target = batch["target"]
        metrics = self.frame_psnr[split]
        if target.shape[1] != len(metrics):
            raise ValueError(f"{split} clips have {target.shape[1]} frames but the module was built "
                             f"for frames={len(metrics)}; set module frames to the data's clip length")
        for t, metric in enumerate(metrics):
            psnr = peak_signal_noise_ratio(prediction[:, t], target[:, t], data_range=1.0,
                                           reduction="none", dim=(1, 2, 3))
            metric.update(psnr)
        return prediction

    def on_validation_epoch_end(self) -> None:
        self._log_frame_psnr("val")

    def on_test_epoch_end(self) -> None:
        self._log_frame_psnr("test")
        if self.test_lpips is not None:
            self.log("test/lpips_7", self.test_lpips.compute())
            self.test_lpips.reset()

    def _log_frame_psnr(self, split: str) -> None:
        values = []
        for t, metric in enumerate(self.frame_psnr[split]):
            value = metric.compute()
            values.append(value)
            self.log(f"{split}/psnr_{t + 1}", value)
            metric.reset()
        self.log(f"{split}/psnr_mean", torch.stack(values).mean(), prog_bar=split == "val")
